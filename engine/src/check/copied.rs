//! The COPIED flag (bit 63 of L1 and L2 entries) must be set exactly when
//! the refcount is 1 (QEMU's check_oflag_copied); only the active L1 table
//! and its L2 tables are checked, since snapshot tables never carry it.

use qj_spec::qcow2::{L1Entry, L2Entry, L2_COPIED, L2_OFFSET_MASK};

use super::checker::Checker;
use super::error::CheckError;
use super::image::{read_vec, DiskRefcounts};
use super::report::Tally;

impl Checker<'_> {
    /// Checks (and with `repair` fixes) COPIED flags against the stored
    /// refcounts, which are final by now.
    pub fn check_oflag_copied(&mut self, tally: &mut Tally) -> Result<(), CheckError> {
        let repair = if self.mode.fixes_errors() {
            true
        } else if self.mode.fixes_leaks() {
            // The refcounts were just corrected, so they are right exactly
            // when nothing else is left broken.
            tally.check_errors == 0 && tally.corruptions == 0 && tally.leaks == 0
        } else {
            false
        };
        let g = self.image.geometry;
        let cluster_size = g.cluster_size();
        let verb = if repair { "Repairing" } else { "ERROR" };
        let mut disk = DiskRefcounts::new(&self.image);
        let mut wrote = false;
        for i in 0..self.image.l1_table.len() {
            let l1_entry = self.image.l1_table[i];
            let l2_offset = l1_entry & L1Entry::OFFSET_MASK;
            if l2_offset == 0 {
                continue;
            }
            // A table we could not place safely is not rewritten: writing a
            // misaligned or out-of-file "cluster" would hit other data.
            let writable = g.is_aligned(l2_offset) && l2_offset + cluster_size <= self.file_len;
            if let Ok(refcount) = disk.get(self.storage, l2_offset >> g.cluster_bits) {
                let copied = l1_entry & L1Entry::COPIED != 0;
                if (refcount == 1) != copied {
                    tally.corruptions += 1;
                    self.msg(format!("{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}"));
                    if repair {
                        let fixed = if refcount == 1 {
                            l1_entry | L1Entry::COPIED
                        } else {
                            l1_entry & !L1Entry::COPIED
                        };
                        let at = self.image.header.l1_table_offset + i as u64 * 8;
                        self.write(&fixed.to_be_bytes(), at, "an L1 entry")?;
                        self.image.l1_table[i] = fixed;
                        wrote = true;
                        tally.corruption_fixed();
                    }
                }
            }

            let mut l2 = read_vec(self.storage, l2_offset, cluster_size, "an L2 table")?;
            let mut dirty = 0u64;
            for j in 0..g.l2_entries() as usize {
                let raw = u64::from_be_bytes(l2[j * 8..j * 8 + 8].try_into().expect("8 bytes"));
                let entry = L2Entry::decode(raw, g.cluster_bits);
                if !matches!(
                    entry,
                    L2Entry::Normal { .. }
                        | L2Entry::Zero {
                            preallocated: Some(_),
                            ..
                        }
                ) {
                    continue;
                }
                let data_cluster = (raw & L2_OFFSET_MASK) >> g.cluster_bits;
                let Ok(refcount) = disk.get(self.storage, data_cluster) else {
                    // Already reported by the comparison.
                    continue;
                };
                if (refcount == 1) != (raw & L2_COPIED != 0) {
                    tally.corruptions += 1;
                    self.msg(format!(
                        "{verb} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={refcount}"
                    ));
                    if repair && writable {
                        let fixed = if refcount == 1 {
                            raw | L2_COPIED
                        } else {
                            raw & !L2_COPIED
                        };
                        l2[j * 8..j * 8 + 8].copy_from_slice(&fixed.to_be_bytes());
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                self.write(&l2, l2_offset, "an L2 table")?;
                wrote = true;
                tally.corruptions -= dirty;
                tally.corruptions_fixed += dirty;
            }
        }
        if wrote {
            // Ordering: the flag repairs are durable before the dirty and
            // corrupt bits are cleared, which declares the image consistent.
            self.flush("COPIED flag repairs")?;
        }
        Ok(())
    }
}
