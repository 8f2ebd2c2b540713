//! One persistent dirty bitmap as the image keeps it in memory: a bit per
//! granule of the guest disk, in the on-disk bit order (bit `n` is bit
//! `n % 8` of byte `n / 8`, qcow2.txt "Bitmaps"), and which sectors of
//! bitmap data changed since they were last handed to the disk (a write
//! that sets one bit rewrites one sector of bitmap data, not a cluster).

use std::collections::BTreeSet;

use qj_spec::qcow2::{bitmap_bit_count, BITMAP_FLAG_AUTO};

/// Bits in one 512-byte sector of bitmap data.
const BITS_PER_SECTOR: u64 = 512 * 8;

/// A dirty bitmap's bits and the bookkeeping of its changed data clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap's name (unique in the image).
    pub name: String,
    /// log2 of the guest bytes one bit covers.
    pub granularity_bits: u8,
    /// The directory flags other than `in_use` (which says whether the
    /// copy on disk can be trusted, not something the bitmap has).
    pub flags: u32,
    disk_size_bytes: u64,
    bits_per_cluster: u64,
    words: Vec<u64>,
    /// 512-byte sectors of the bitmap data (counted from its first bit)
    /// changed since the last [`DirtyBitmap::take_changed_sectors`].
    changed_sectors: BTreeSet<u64>,
}

impl DirtyBitmap {
    /// An empty bitmap covering `disk_size_bytes`, stored in clusters of
    /// `cluster_size` bytes.
    pub fn new(
        name: String,
        granularity_bits: u8,
        flags: u32,
        disk_size_bytes: u64,
        cluster_size: u64,
    ) -> Self {
        let bits = bitmap_bit_count(disk_size_bytes, granularity_bits);
        Self {
            name,
            granularity_bits,
            flags,
            disk_size_bytes,
            bits_per_cluster: cluster_size * 8,
            words: vec![0; bits.div_ceil(64) as usize],
            changed_sectors: BTreeSet::new(),
        }
    }

    /// Covers a disk grown to `disk_size_bytes`: the new bits are clear
    /// (the grown space was never written), as QEMU's.
    pub fn grow(&mut self, disk_size_bytes: u64) {
        if disk_size_bytes <= self.disk_size_bytes {
            return;
        }
        self.disk_size_bytes = disk_size_bytes;
        let bits = bitmap_bit_count(disk_size_bytes, self.granularity_bits);
        self.words.resize(bits.div_ceil(64) as usize, 0);
    }

    /// Whether writes mark this bitmap (the `auto` flag: QEMU's "enabled").
    pub fn is_enabled(&self) -> bool {
        self.flags & BITMAP_FLAG_AUTO != 0
    }

    /// Bytes of guest disk one bit covers.
    pub fn granularity_bytes(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// How many bits the bitmap has.
    pub fn bit_count(&self) -> u64 {
        bitmap_bit_count(self.disk_size_bytes, self.granularity_bits)
    }

    /// Whether the bit covering guest byte `offset` is set.
    pub fn is_set(&self, offset: u64) -> bool {
        self.bit(offset >> self.granularity_bits)
    }

    fn bit(&self, n: u64) -> bool {
        self.words
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// Sets the bits covering guest bytes `[offset, offset + len)`; true if
    /// any bit was clear before.
    pub fn set_range(&mut self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let end = offset.saturating_add(len).min(self.disk_size_bytes);
        if offset >= end {
            return false;
        }
        let first = offset >> self.granularity_bits;
        let last = (end - 1) >> self.granularity_bits;
        self.set_bits(first, last)
    }

    /// Sets bits `first..=last`, word by word.
    fn set_bits(&mut self, first: u64, last: u64) -> bool {
        let mut newly = false;
        let mut n = first;
        // Bounded: each pass advances `n` by at least one bit.
        while n <= last {
            let word = (n / 64) as usize;
            let lo = n % 64;
            let hi = if last / 64 == n / 64 { last % 64 } else { 63 };
            let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
            if self.words[word] & mask != mask {
                self.words[word] |= mask;
                newly = true;
                self.mark_changed(n, n + (hi - lo));
            }
            n += hi - lo + 1;
        }
        newly
    }

    fn mark_changed(&mut self, first_bit: u64, last_bit: u64) {
        for s in first_bit / BITS_PER_SECTOR..=last_bit / BITS_PER_SECTOR {
            self.changed_sectors.insert(s);
        }
    }

    /// Clears every bit; the data clusters that had bits set change.
    pub fn clear(&mut self) {
        for i in 0..self.words.len() {
            if self.words[i] != 0 {
                self.words[i] = 0;
                self.changed_sectors.insert(i as u64 * 64 / BITS_PER_SECTOR);
            }
        }
    }

    /// Sets every bit that is set in `source`, whatever its granularity
    /// (a coarser source bit sets every finer bit it covers).
    pub fn merge_from(&mut self, source: &DirtyBitmap) {
        for (offset, len) in source.dirty_ranges() {
            self.set_range(offset, len);
        }
    }

    /// The guest ranges whose bits are set, as `(offset, length)` runs,
    /// merged and clipped to the disk.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let g = self.granularity_bytes();
        for (w, &word) in self.words.iter().enumerate() {
            if word == 0 {
                continue;
            }
            for b in 0..64u64 {
                if word & (1 << b) == 0 {
                    continue;
                }
                let start = (w as u64 * 64 + b) * g;
                let end = (start + g).min(self.disk_size_bytes);
                match out.last_mut() {
                    Some((s, l)) if *s + *l == start => *l = end - *s,
                    _ => out.push((start, end - start)),
                }
            }
        }
        out
    }

    /// Guest bytes covered by set bits (the last granule clipped to the disk).
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_ranges().iter().map(|&(_, len)| len).sum()
    }

    /// The bits of data cluster `index` (entry `index` of the bitmap table)
    /// in their on-disk layout, `cluster_size` bytes.
    pub fn encode_cluster(&self, index: u64) -> Vec<u8> {
        let words_per_cluster = (self.bits_per_cluster / 64) as usize;
        let first = index as usize * words_per_cluster;
        let mut bytes = Vec::with_capacity(words_per_cluster * 8);
        for i in first..first + words_per_cluster {
            bytes.extend_from_slice(&self.words.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        bytes
    }

    /// Loads data cluster `index` from its on-disk bytes. Bits past the end
    /// of the disk are ignored.
    pub fn load_cluster(&mut self, index: u64, bytes: &[u8]) {
        let words_per_cluster = (self.bits_per_cluster / 64) as usize;
        let first = index as usize * words_per_cluster;
        for (i, chunk) in bytes.chunks_exact(8).enumerate() {
            if let Some(w) = self.words.get_mut(first + i) {
                let mut b = [0u8; 8];
                b.copy_from_slice(chunk);
                *w = u64::from_le_bytes(b);
            }
        }
        self.clip_tail();
    }

    /// Sets every bit of data cluster `index` (a table entry that says
    /// "all ones").
    pub fn fill_cluster(&mut self, index: u64) {
        let first = index * self.bits_per_cluster;
        let last = (first + self.bits_per_cluster).min(self.bit_count());
        if first < last {
            self.set_bits(first, last - 1);
        }
        let per = self.sectors_per_cluster();
        let first_sector = index * per;
        let gone: Vec<u64> = self
            .changed_sectors
            .range(first_sector..first_sector + per)
            .copied()
            .collect();
        for s in gone {
            self.changed_sectors.remove(&s);
        }
    }

    /// Clears the bits past the last granule of the disk, which no guest
    /// byte maps to.
    fn clip_tail(&mut self) {
        let bits = self.bit_count();
        if !bits.is_multiple_of(64) {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << (bits % 64)) - 1;
            }
        }
    }

    /// Whether data cluster `index` has no bit set.
    pub fn cluster_is_clear(&self, index: u64) -> bool {
        self.encode_cluster(index).iter().all(|&b| b == 0)
    }

    /// Sectors of bitmap data in one data cluster.
    pub fn sectors_per_cluster(&self) -> u64 {
        self.bits_per_cluster / BITS_PER_SECTOR
    }

    /// Takes the sectors of bitmap data changed since the last call.
    pub fn take_changed_sectors(&mut self) -> BTreeSet<u64> {
        std::mem::take(&mut self.changed_sectors)
    }

    /// The bytes of bitmap data sectors `first..first + count`, in their
    /// on-disk layout.
    pub fn encode_sectors(&self, first: u64, count: u64) -> Vec<u8> {
        let words_per_sector = BITS_PER_SECTOR / 64;
        let start = (first * words_per_sector) as usize;
        let end = ((first + count) * words_per_sector) as usize;
        let mut bytes = Vec::with_capacity((end - start) * 8);
        for i in start..end {
            bytes.extend_from_slice(&self.words.get(i).copied().unwrap_or(0).to_le_bytes());
        }
        bytes
    }

    /// Forgets which clusters changed (their content was just loaded, or
    /// is written by other means).
    pub fn forget_changes(&mut self) {
        self.changed_sectors.clear();
    }

    /// How many sectors of bitmap data changed since they were last taken.
    pub fn changed_sector_count(&self) -> usize {
        self.changed_sectors.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmap(disk: u64, granularity_bits: u8, cluster: u64) -> DirtyBitmap {
        DirtyBitmap::new(
            "b".into(),
            granularity_bits,
            BITMAP_FLAG_AUTO,
            disk,
            cluster,
        )
    }

    #[test]
    fn set_range_marks_every_granule_it_touches_and_reports_new_bits() {
        let mut b = bitmap(1 << 20, 16, 512);
        assert!(b.set_range(65535, 2));
        assert!(b.is_set(0) && b.is_set(65536) && !b.is_set(131072));
        assert!(!b.set_range(100, 10), "already set");
        assert_eq!(b.dirty_ranges(), vec![(0, 131072)]);
        assert_eq!(b.dirty_bytes(), 131072);
        assert!(!b.set_range(1 << 20, 512), "past the disk");
    }

    #[test]
    fn on_disk_layout_is_little_endian_bits_per_byte() {
        let mut b = bitmap(1 << 30, 9, 512);
        b.set_range(9 * 512, 512);
        let bytes = b.encode_cluster(0);
        assert_eq!(bytes.len(), 512);
        assert_eq!(bytes[1], 0b10, "bit 9 is bit 1 of byte 1");
        // Bit 4096 is the first bit of the second data cluster.
        b.set_range(4096 * 512, 1);
        assert_eq!(b.encode_cluster(1)[0], 1);
        assert_eq!(
            b.take_changed_sectors().into_iter().collect::<Vec<_>>(),
            vec![0, 1]
        );
        let mut copy = bitmap(1 << 30, 9, 512);
        copy.load_cluster(0, &b.encode_cluster(0));
        copy.load_cluster(1, &b.encode_cluster(1));
        assert_eq!(copy.dirty_ranges(), b.dirty_ranges());
    }

    #[test]
    fn last_granule_is_clipped_to_the_disk() {
        let mut b = bitmap(65536 + 512, 16, 512);
        b.fill_cluster(0);
        assert_eq!(b.dirty_bytes(), 65536 + 512);
        let mut loaded = bitmap(65536 + 512, 16, 512);
        loaded.load_cluster(0, &[0xff; 512]);
        assert_eq!(loaded.dirty_ranges(), vec![(0, 65536 + 512)]);
    }

    #[test]
    fn grow_keeps_bits_and_adds_clear_ones() {
        let mut b = bitmap(65536, 12, 512);
        b.set_range(0, 4096);
        b.grow(1 << 20);
        assert_eq!(b.dirty_ranges(), vec![(0, 4096)]);
        assert!(b.set_range(900 << 10, 1));
        assert_eq!(b.bit_count(), 256);
    }

    #[test]
    fn merge_maps_between_granularities_and_clear_empties() {
        let mut coarse = bitmap(1 << 20, 17, 512);
        coarse.set_range(131072, 1);
        let mut fine = bitmap(1 << 20, 12, 512);
        fine.merge_from(&coarse);
        assert_eq!(fine.dirty_ranges(), vec![(131072, 131072)]);
        fine.clear();
        assert_eq!(fine.dirty_bytes(), 0);
    }
}
