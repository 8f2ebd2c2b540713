//! Guest data that deduplicates, for the `journal-dedup` crash target.
//!
//! Every sector the workload writes names its own guest sector
//! (`sector_pattern.rs`), so no two clusters of a disk are ever equal and
//! deduplication would never happen. The dedup target stores each written
//! sector as the pattern of the same write for the sector's position
//! *within its cluster* instead ([`store`]), and turns it back on read
//! ([`load`]). The clusters that one multi-cluster write covers whole are
//! then byte for byte equal, and the engine shares them; the guest model
//! still sees exactly the bytes it wrote.
//!
//! The mapping is a bijection given the guest position, so nothing the
//! model checks is lost, with one exception that is the point of
//! deduplication: a cluster mapped to another cluster holding the same
//! write's data reads the same bytes.

use crate::medium::SECTOR_BYTES;
use crate::sector_pattern::{decode, fill_sector, Content, Decoded};

/// The sector whose pattern stands for guest sector `sector`: its position
/// in its cluster of `sectors_per_cluster` sectors.
fn stored_sector(sector: u64, sectors_per_cluster: u64) -> u64 {
    sector % sectors_per_cluster
}

/// Rewrites `buf`, the workload's data for guest byte `offset`, into the
/// bytes to store. Sectors that are not a write's pattern stay as they are.
pub fn store(buf: &mut [u8], offset: u64, sectors_per_cluster: u64) {
    let first = offset / SECTOR_BYTES;
    for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
        let at = first + i as u64;
        if let Decoded::Content(Content::Write(id)) = decode(sector, at) {
            fill_sector(sector, id, stored_sector(at, sectors_per_cluster));
        }
    }
}

/// Turns bytes read at guest byte `offset` back into the workload's data.
/// A sector that is not a stored pattern for its position (zeros, backing
/// data, garbage, another position's data) stays as it is, so the model
/// judges it as read.
pub fn load(buf: &mut [u8], offset: u64, sectors_per_cluster: u64) {
    let first = offset / SECTOR_BYTES;
    for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
        let at = first + i as u64;
        let stored = stored_sector(at, sectors_per_cluster);
        if let Decoded::Content(Content::Write(id)) = decode(sector, stored) {
            fill_sector(sector, id, at);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sector_pattern::fill_write;

    #[test]
    fn whole_clusters_of_one_write_are_equal_and_read_back_exactly() {
        let per_cluster = 8;
        let cluster = (per_cluster * SECTOR_BYTES) as usize;
        let mut data = vec![0u8; 3 * cluster];
        fill_write(&mut data, 7, 16);
        let original = data.clone();
        store(&mut data, 16 * SECTOR_BYTES, per_cluster);
        assert_eq!(data[..cluster], data[cluster..2 * cluster]);
        assert_eq!(data[..cluster], data[2 * cluster..]);
        load(&mut data, 16 * SECTOR_BYTES, per_cluster);
        assert_eq!(data, original);
    }

    #[test]
    fn other_writes_and_positions_stay_distinct() {
        let per_cluster = 8;
        let mut a = vec![0u8; 512];
        let mut b = vec![0u8; 512];
        fill_write(&mut a, 1, 8);
        fill_write(&mut b, 2, 8);
        store(&mut a, 8 * 512, per_cluster);
        store(&mut b, 8 * 512, per_cluster);
        assert_ne!(a, b);
        // Read at a position whose stored sector differs: left alone, so
        // the model sees data of the wrong place.
        let mut moved = a.clone();
        load(&mut moved, 9 * 512, per_cluster);
        assert_eq!(moved, a);
        let mut zeros = vec![0u8; 512];
        load(&mut zeros, 0, per_cluster);
        assert!(zeros.iter().all(|&z| z == 0));
    }
}
