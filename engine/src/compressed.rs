//! Reading compressed clusters (zlib compression type: raw deflate, as QEMU
//! writes it with a 12-bit window and no zlib header).

use flate2::{Decompress, FlushDecompress};

use crate::error::{Error, Result};

/// Inflates `compressed` into exactly one cluster of `cluster_size` bytes.
/// Trailing bytes after the deflate stream are allowed (the stored size is
/// rounded up to sectors); a stream that ends before the cluster is full, or
/// does not decode, is an error naming the host offset.
pub fn inflate_cluster(
    compressed: &[u8],
    cluster_size: usize,
    host_offset: u64,
) -> Result<Vec<u8>> {
    let mut out = vec![0u8; cluster_size];
    let mut inflater = Decompress::new(false);
    inflater
        .decompress(compressed, &mut out, FlushDecompress::Finish)
        .map_err(|e| {
            Error::Corrupt(format!(
                "compressed cluster at {host_offset:#x} does not inflate: {e}"
            ))
        })?;
    let produced = inflater.total_out() as usize;
    // Like QEMU, a stream that filled the cluster is accepted whether or not
    // its end marker was seen (the stored size is rounded up to sectors).
    if produced != cluster_size {
        return Err(Error::Corrupt(format!(
            "compressed cluster at {host_offset:#x} inflates to {produced} bytes, not {cluster_size}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    fn deflate_raw(data: &[u8]) -> Vec<u8> {
        let mut c = Compress::new(Compression::default(), false);
        let mut out = vec![0u8; data.len() + 1024];
        c.compress(data, &mut out, FlushCompress::Finish).unwrap();
        out.truncate(c.total_out() as usize);
        out
    }

    #[test]
    fn inflates_a_cluster_with_sector_padding() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut z = deflate_raw(&data);
        z.resize(z.len().next_multiple_of(512), 0);
        assert_eq!(inflate_cluster(&z, 4096, 0).unwrap(), data);
    }

    #[test]
    fn garbage_is_an_error_not_garbage_data() {
        let err = inflate_cluster(&[0xff; 512], 4096, 0x1234).unwrap_err();
        assert!(err.to_string().contains("0x1234"), "{err}");
        let short = deflate_raw(&[1u8; 100]);
        assert!(inflate_cluster(&short, 4096, 0).is_err());
    }
}
