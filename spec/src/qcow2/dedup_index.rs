//! The persisted dedup index (spec `qjournal.md` §3.6): header extension
//! "qjdx" (0x716a6478) naming a run of clusters that holds the index's
//! entries, written after each checkpoint and at a clean close so that open
//! does not rehash the image.
//!
//! Extension payload, 40 bytes, big-endian:
//!
//! ```text
//!  0 -  7  offset: host offset of the first index cluster (cluster aligned)
//!  8 - 15  entries: number of entries
//! 16 - 23  clusters_saved: guest clusters that shared an indexed cluster
//!          beyond its first mapping when the index was written
//! 24 - 27  clusters: number of index clusters (contiguous)
//! 28 - 31  crc32c of the entries' bytes (entries * 40 bytes)
//! 32 - 39  reserved, zero
//! ```
//!
//! Each entry is 40 bytes: host_offset u64 big-endian, then the 32-byte
//! SHA-256 of that cluster's content.

use crate::qcow2::{Header, HeaderExtension};

/// Header extension type of the persisted dedup index ("qjdx").
pub const EXT_DEDUP_INDEX: u32 = 0x716a_6478;

/// Bytes of one index entry.
pub const DEDUP_INDEX_ENTRY_BYTES: usize = 40;

/// Bytes of the extension payload.
pub const DEDUP_INDEX_EXTENSION_BYTES: usize = 40;

/// One entry: a host offset and the SHA-256 of the cluster there.
pub type DedupIndexEntry = (u64, [u8; 32]);

/// The "qjdx" extension payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupIndexExtension {
    /// Host offset of the first index cluster.
    pub offset: u64,
    /// Number of entries.
    pub entries: u64,
    /// Clusters shared beyond their first mapping when written.
    pub clusters_saved: u64,
    /// Number of index clusters.
    pub clusters: u32,
    /// CRC32C of the entries' bytes.
    pub crc32c: u32,
}

impl DedupIndexExtension {
    /// No index persisted. A dedup image keeps the extension, empty, for
    /// as long as dedup is on, so that writing or dropping an index never
    /// changes the header's length: with a backing file name after the
    /// extensions, a longer header would move the name, and a replay torn
    /// between the header's sectors would leave a header no one can read.
    pub const EMPTY: DedupIndexExtension = DedupIndexExtension {
        offset: 0,
        entries: 0,
        clusters_saved: 0,
        clusters: 0,
        crc32c: 0,
    };

    /// Whether no index is persisted.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.clusters == 0
    }

    /// The 40-byte payload.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DEDUP_INDEX_EXTENSION_BYTES);
        b.extend_from_slice(&self.offset.to_be_bytes());
        b.extend_from_slice(&self.entries.to_be_bytes());
        b.extend_from_slice(&self.clusters_saved.to_be_bytes());
        b.extend_from_slice(&self.clusters.to_be_bytes());
        b.extend_from_slice(&self.crc32c.to_be_bytes());
        b.extend_from_slice(&[0u8; 8]);
        b
    }

    /// Decodes a payload; the error names the field that is wrong.
    pub fn decode(data: &[u8]) -> Result<Self, String> {
        if data.len() != DEDUP_INDEX_EXTENSION_BYTES {
            return Err(format!(
                "dedup index extension: length {} is not {DEDUP_INDEX_EXTENSION_BYTES}",
                data.len()
            ));
        }
        let u64_at = |at: usize| u64::from_be_bytes(data[at..at + 8].try_into().expect("8 bytes"));
        let u32_at = |at: usize| u32::from_be_bytes(data[at..at + 4].try_into().expect("4 bytes"));
        if u64_at(32) != 0 {
            return Err("dedup index extension: reserved bytes 32-39 are not zero".into());
        }
        let ext = Self {
            offset: u64_at(0),
            entries: u64_at(8),
            clusters_saved: u64_at(16),
            clusters: u32_at(24),
            crc32c: u32_at(28),
        };
        Ok(ext)
    }

    /// Bytes the entries take.
    #[must_use]
    pub fn entry_bytes(&self) -> Option<u64> {
        self.entries.checked_mul(DEDUP_INDEX_ENTRY_BYTES as u64)
    }
}

/// The entries' bytes.
#[must_use]
pub fn encode_index(entries: &[DedupIndexEntry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(entries.len() * DEDUP_INDEX_ENTRY_BYTES);
    for (offset, hash) in entries {
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(hash);
    }
    b
}

/// Decodes `ext.entries` entries from `bytes` (at least that long) and
/// checks them against the extension's checksum.
pub fn decode_index(
    bytes: &[u8],
    ext: &DedupIndexExtension,
) -> Result<Vec<DedupIndexEntry>, String> {
    let len = ext
        .entry_bytes()
        .filter(|&n| n <= bytes.len() as u64)
        .ok_or_else(|| {
            format!(
                "dedup index: {} entries do not fit its {} bytes",
                ext.entries,
                bytes.len()
            )
        })? as usize;
    let body = &bytes[..len];
    let crc = crc32c::crc32c(body);
    if crc != ext.crc32c {
        return Err(format!(
            "dedup index: checksum {crc:#010x} does not match the extension's {:#010x}",
            ext.crc32c
        ));
    }
    Ok(body
        .chunks_exact(DEDUP_INDEX_ENTRY_BYTES)
        .map(|e| {
            let offset = u64::from_be_bytes(e[..8].try_into().expect("8 bytes"));
            let hash: [u8; 32] = e[8..].try_into().expect("32 bytes");
            (offset, hash)
        })
        .collect())
}

impl Header {
    /// The persisted dedup index extension, if the header has one; `Err`
    /// when it is there but malformed.
    pub fn dedup_index(&self) -> Option<Result<DedupIndexExtension, String>> {
        self.extensions.iter().find_map(|e| match e {
            HeaderExtension::Unknown { kind, data } if *kind == EXT_DEDUP_INDEX => {
                Some(DedupIndexExtension::decode(data))
            }
            _ => None,
        })
    }

    /// Replaces the dedup index extension (or removes it with `None`).
    pub fn set_dedup_index(&mut self, index: Option<DedupIndexExtension>) {
        let at = self
            .extensions
            .iter()
            .position(|e| e.kind() == EXT_DEDUP_INDEX);
        let new = index.map(|i| HeaderExtension::Unknown {
            kind: EXT_DEDUP_INDEX,
            data: i.encode(),
        });
        match (at, new) {
            (Some(i), Some(e)) => self.extensions[i] = e,
            (Some(i), None) => {
                self.extensions.remove(i);
            }
            (None, Some(e)) => self.extensions.push(e),
            (None, None) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extension_and_entries_round_trip_and_damage_is_refused() {
        let entries = vec![(0x10000u64, [7u8; 32]), (0x20000, [9u8; 32])];
        let bytes = encode_index(&entries);
        let ext = DedupIndexExtension {
            offset: 0x50000,
            entries: 2,
            clusters_saved: 3,
            clusters: 1,
            crc32c: crc32c::crc32c(&bytes),
        };
        assert_eq!(DedupIndexExtension::decode(&ext.encode()), Ok(ext));
        assert_eq!(decode_index(&bytes, &ext), Ok(entries));
        let mut bad = bytes.clone();
        bad[50] ^= 1;
        assert!(decode_index(&bad, &ext).unwrap_err().contains("checksum"));
        assert!(decode_index(&bytes[..60], &ext)
            .unwrap_err()
            .contains("do not fit"));
        let mut reserved = ext.encode();
        reserved[39] = 1;
        assert!(DedupIndexExtension::decode(&reserved)
            .unwrap_err()
            .contains("reserved"));
        assert!(DedupIndexExtension::decode(&reserved[..20])
            .unwrap_err()
            .contains("length"));
    }
}
