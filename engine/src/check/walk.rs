//! Counting references: every structure that keeps a cluster in use adds
//! one to the in-memory refcount table (QEMU's calculate_refcounts,
//! check_refcounts_l1/l2 and check_refblocks), and the problems met on the
//! way are counted.

use qj_spec::qcow2::extension::EXT_CRYPTO_HEADER;
use qj_spec::qcow2::features::AUTOCLEAR_JOURNAL_VALID_BIT;
use qj_spec::qcow2::{
    HeaderExtension, L1Entry, L2Entry, L1_SIZE_BYTES_MAX, L2_COPIED, L2_OFFSET_MASK,
};

use super::checker::Checker;
use super::error::CheckError;
use super::image::{read_table, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use super::imrt::Imrt;
use super::report::Tally;

/// How one L1 walk is accounted.
#[derive(Clone, Copy)]
pub(crate) struct L1Walk {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Count allocated/fragmented clusters (active L1 only).
    pub frag_info: bool,
}

impl Checker<'_> {
    /// Counts every reference in the image into `imrt`. Sets `*rebuild` when
    /// the refcount structure itself is broken. Returns false where QEMU's
    /// check gives up (an unreadable bitmap directory).
    pub fn calculate_refcounts(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
        fix_errors: bool,
        rebuild: &mut bool,
    ) -> Result<bool, CheckError> {
        let cluster_size = self.cluster_size();
        // The header cluster.
        self.inc_refcounts(imrt, tally, 0, cluster_size)?;

        // The active L1 table, its L2 tables and their data clusters.
        let active = L1Walk {
            l1_table_offset: self.image.header.l1_table_offset,
            l1_size: self.image.header.l1_size,
            frag_info: true,
        };
        self.check_refcounts_l1(imrt, tally, active, fix_errors, true)?;

        // Snapshots: their L1 tables (skipping entries too broken to read),
        // then the snapshot table itself.
        for i in 0..self.snapshots.len() {
            let sn = self.snapshots[i].clone();
            if !self.image.geometry.is_aligned(sn.l1_table_offset) {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                tally.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) > L1_SIZE_BYTES_MAX / 8 {
                self.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                tally.corruptions += 1;
                continue;
            }
            let walk = L1Walk {
                l1_table_offset: sn.l1_table_offset,
                l1_size: sn.l1_size,
                frag_info: false,
            };
            self.check_refcounts_l1(imrt, tally, walk, fix_errors, false)?;
        }
        let (snapshots_offset, snapshots_size) =
            (self.image.header.snapshots_offset, self.snapshots_size);
        self.inc_refcounts(imrt, tally, snapshots_offset, snapshots_size)?;

        // The refcount table.
        let reftable_offset = self.image.header.refcount_table_offset;
        let reftable_bytes = self.image.reftable.len() as u64 * 8;
        self.inc_refcounts(imrt, tally, reftable_offset, reftable_bytes)?;

        // Structures QEMU does not know: the LUKS header (QEMU knows it, we
        // only count it), the qjournal, and whatever the caller names.
        self.count_extension_areas(imrt, tally)?;
        for &(offset, len) in self.extra_refs {
            self.inc_refcounts(imrt, tally, offset.0, len)?;
        }

        if !self.count_bitmaps(imrt, tally)? {
            // The bitmap directory is unreadable: QEMU's check stops here
            // with an error; there is no consistent picture to compare.
            tally.check_errors += 1;
            return Ok(false);
        }

        self.check_refblocks(imrt, tally, fix_errors, rebuild)?;
        Ok(true)
    }

    fn count_extension_areas(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
    ) -> Result<(), CheckError> {
        let mut areas = Vec::new();
        for ext in &self.image.header.extensions {
            match ext {
                // The journal's clusters are ours only while the journal is
                // valid: a writer that does not know the journal clears the
                // autoclear bit, may free the clusters (as leaks) and reuse
                // them, and counting them then would invent corruptions.
                HeaderExtension::Journal(j)
                    if self.image.header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT) =>
                {
                    if !self.image.geometry.is_aligned(j.offset) {
                        areas.push(Err(j.offset));
                    }
                    areas.push(Ok((j.offset, j.size)));
                }
                // The persisted dedup index, like the journal, is ours only
                // while "journal valid" is set. A damaged extension counts
                // nothing (open ignores it; its clusters show as leaks).
                HeaderExtension::Unknown { kind, data }
                    if *kind == qj_spec::qcow2::dedup_index::EXT_DEDUP_INDEX
                        && self.image.header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT) =>
                {
                    if let Ok(index) =
                        qj_spec::qcow2::dedup_index::DedupIndexExtension::decode(data)
                    {
                        if self.image.geometry.is_aligned(index.offset) && !index.is_empty() {
                            areas.push(Ok((
                                index.offset,
                                u64::from(index.clusters) * self.image.geometry.cluster_size(),
                            )));
                        }
                    }
                }
                HeaderExtension::Unknown { kind, data }
                    if *kind == EXT_CRYPTO_HEADER && data.len() == 16 =>
                {
                    let offset = u64::from_be_bytes(data[0..8].try_into().expect("8 bytes"));
                    let len = u64::from_be_bytes(data[8..16].try_into().expect("8 bytes"));
                    areas.push(Ok((offset, len)));
                }
                _ => {}
            }
        }
        for area in areas {
            match area {
                Ok((offset, len)) => self.inc_refcounts(imrt, tally, offset, len)?,
                Err(offset) => {
                    self.msg(format!("ERROR journal offset={offset:x}: journal is not cluster aligned; header extension corrupted"));
                    tally.corruptions += 1;
                }
            }
        }
        Ok(())
    }

    /// Counts an L1 table, its L2 tables and everything they map.
    pub fn check_refcounts_l1(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
        walk: L1Walk,
        fix_errors: bool,
        active: bool,
    ) -> Result<(), CheckError> {
        if walk.l1_size == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        self.inc_refcounts(
            imrt,
            tally,
            walk.l1_table_offset,
            u64::from(walk.l1_size) * 8,
        )?;
        let l1 = read_table(
            self.storage,
            walk.l1_table_offset,
            u64::from(walk.l1_size),
            "an L1 table",
        )?;
        for raw in l1 {
            if raw == 0 {
                continue;
            }
            let entry = L1Entry(raw);
            if entry.reserved_bits() != 0 {
                self.msg(format!(
                    "ERROR found L1 entry with reserved bits set: {raw:x}"
                ));
                tally.corruptions += 1;
            }
            // An entry with only flag bits counts offset 0, as QEMU does.
            let l2_offset = raw & L1Entry::OFFSET_MASK;
            self.inc_refcounts(imrt, tally, l2_offset, cluster_size)?;
            if !self.image.geometry.is_aligned(l2_offset) {
                self.msg(format!("ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted"));
                tally.corruptions += 1;
            }
            self.check_refcounts_l2(imrt, tally, l2_offset, walk.frag_info, fix_errors, active)?;
        }
        Ok(())
    }

    /// Counts the clusters one L2 table maps.
    fn check_refcounts_l2(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
        l2_offset: u64,
        frag_info: bool,
        fix_errors: bool,
        active: bool,
    ) -> Result<(), CheckError> {
        let g = self.image.geometry;
        let cluster_size = g.cluster_size();
        let l2 = read_table(self.storage, l2_offset, g.l2_entries(), "an L2 table")?;
        let mut next_contiguous_offset = 0u64;
        for (i, &raw) in l2.iter().enumerate() {
            let entry = L2Entry::decode(raw, g.cluster_bits);
            if L2Entry::reserved_bits(raw, g.cluster_bits) != 0 {
                self.msg(format!(
                    "ERROR found l2 entry with reserved bits set: {raw:x}"
                ));
                tally.corruptions += 1;
            }
            match entry {
                L2Entry::Compressed { .. } => {
                    let mut raw = raw;
                    if raw & L2_COPIED != 0 {
                        let shift = 62 - (g.cluster_bits - 8);
                        self.msg(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed clusters",
                            raw & ((1u64 << shift) - 1)
                        ));
                        raw &= !L2_COPIED;
                        tally.corruptions += 1;
                    }
                    let L2Entry::Compressed {
                        host_offset,
                        compressed_size_max,
                    } = L2Entry::decode(raw, g.cluster_bits)
                    else {
                        unreachable!("bit 62 still set");
                    };
                    self.inc_refcounts(imrt, tally, host_offset, compressed_size_max)?;
                    if frag_info {
                        // Compressed clusters share sectors: always fragmented.
                        tally.allocated_clusters += 1;
                        tally.fragmented_clusters += 1;
                    }
                }
                L2Entry::Normal { .. }
                | L2Entry::Zero {
                    preallocated: Some(_),
                    ..
                } => {
                    let offset = raw & L2_OFFSET_MASK;
                    if !g.is_aligned(offset) {
                        tally.corruptions += 1;
                        let contains_data = matches!(entry, L2Entry::Normal { .. });
                        if contains_data {
                            self.msg(format!("ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."));
                        } else {
                            let verb = if fix_errors { "Repairing" } else { "ERROR" };
                            self.msg(format!(
                                "{verb} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted."
                            ));
                            if fix_errors
                                && self.fix_l2_entry_by_zero(tally, l2_offset, i, active)?
                            {
                                // The entry no longer references the cluster.
                                continue;
                            }
                        }
                    }
                    if frag_info {
                        tally.allocated_clusters += 1;
                        if next_contiguous_offset != 0 && offset != next_contiguous_offset {
                            tally.fragmented_clusters += 1;
                        }
                        next_contiguous_offset = offset.wrapping_add(cluster_size);
                    }
                    self.inc_refcounts(imrt, tally, offset, cluster_size)?;
                }
                L2Entry::Zero {
                    preallocated: None, ..
                }
                | L2Entry::Unallocated => {}
            }
        }
        Ok(())
    }

    /// Turns a misaligned preallocated-zero entry into a plain zero entry
    /// (the guest reads zeros either way). Returns whether it was fixed.
    fn fix_l2_entry_by_zero(
        &mut self,
        tally: &mut Tally,
        l2_offset: u64,
        index: usize,
        active: bool,
    ) -> Result<bool, CheckError> {
        let _ = active; // QEMU only uses it to pick an overlap-check mask.
        let entry_offset = l2_offset + index as u64 * 8;
        // QEMU's overlap check before the write (qcow2_pre_write_overlap_check):
        // a table that is really the header, the active L1 table or the
        // refcount table (a corrupt L1 entry names it as an L2 table) must
        // not be "repaired" as one (found by the whole-image fuzz target:
        // an L1 entry pointing at its own table had its first entry zeroed).
        if self.overlaps_core_metadata(entry_offset, 8) {
            self.msg("ERROR: Overlap check failed".into());
            tally.check_errors += 1;
            return Ok(false);
        }
        if entry_offset
            .checked_add(8)
            .is_none_or(|end| end > self.file_len)
        {
            self.msg(
                "ERROR: Failed to overwrite L2 table entry: entry lies past the end of the file"
                    .into(),
            );
            tally.check_errors += 1;
            return Ok(false);
        }
        self.write(
            &L2Entry::Zero {
                preallocated: None,
                copied: false,
            }
            .encode(self.cluster_bits())
            .to_be_bytes(),
            entry_offset,
            "an L2 entry",
        )?;
        // Ordering: the entry must stop referencing the cluster durably
        // before the leak fix that follows drops the cluster's refcount,
        // or a crash in between could leave the entry pointing at a cluster
        // that the next allocation reuses.
        self.flush("an L2 entry repair")?;
        tally.corruption_fixed();
        Ok(true)
    }

    /// Whether `[offset, offset + len)` touches the header cluster, the
    /// active L1 table or the refcount table.
    fn overlaps_core_metadata(&self, offset: u64, len: u64) -> bool {
        let header = &self.image.header;
        let cs = self.image.geometry.cluster_size();
        let end = offset.saturating_add(len);
        let touches = |start: u64, bytes: u64| offset < start.saturating_add(bytes) && start < end;
        touches(0, cs)
            || touches(header.l1_table_offset, u64::from(header.l1_size) * 8)
            || touches(
                header.refcount_table_offset,
                u64::from(header.refcount_table_clusters) * cs,
            )
    }

    /// Counts the refcount blocks and checks the refcount table entries.
    fn check_refblocks(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
        fix_errors: bool,
        rebuild: &mut bool,
    ) -> Result<(), CheckError> {
        let cluster_size = self.cluster_size();
        for i in 0..self.image.reftable.len() {
            let raw = self.image.reftable[i];
            let offset = raw & REFT_OFFSET_MASK;
            let cluster = offset >> self.cluster_bits();
            if raw & REFT_RESERVED_MASK != 0 {
                self.msg(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                tally.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if !self.image.geometry.is_aligned(offset) {
                self.msg(format!("ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"));
                tally.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= imrt.clusters() {
                tally.corruptions += 1;
                let verb = if fix_errors { "Repairing" } else { "ERROR" };
                self.msg(format!("{verb} refcount block {i} is outside image"));
                if fix_errors {
                    match self.extend_file_over(imrt, offset) {
                        Ok(()) => {
                            tally.corruption_fixed();
                            self.inc_refcounts(imrt, tally, offset, cluster_size)?;
                            continue;
                        }
                        Err(reason) => {
                            *rebuild = true;
                            self.msg(format!("ERROR could not resize image: {reason}"));
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(imrt, tally, offset, cluster_size)?;
                let refcount = imrt.get(cluster);
                if refcount != 1 {
                    self.msg(format!("ERROR refcount block {i} refcount={refcount}"));
                    tally.corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// Extends the file so that the refcount block at `offset` lies inside
    /// it (it then reads as zeros: every cluster it covers has refcount 0,
    /// which the comparison turns into a rebuild if anything is in use).
    fn extend_file_over(&mut self, imrt: &mut Imrt, offset: u64) -> Result<(), String> {
        let new_len = offset
            .checked_add(self.cluster_size())
            .filter(|&l| l <= i64::MAX as u64)
            .ok_or("Invalid argument")?;
        let clusters = self.image.geometry.clusters_for(new_len);
        if !imrt.can_grow(clusters) {
            return Err("image would be too large to check".into());
        }
        self.storage.set_len(new_len).map_err(|e| e.to_string())?;
        // Ordering: the extension is durable before anything relies on it.
        self.storage.flush().map_err(|e| e.to_string())?;
        // Only a file that did grow widens the check (QEMU reallocates its
        // refcount array after the truncate succeeded): after a failed
        // resize, the rebuild sizes the new refcount structure for the
        // clusters the file really has, not up to the unreachable block.
        imrt.grow(clusters)
            .ok_or("image would be too large to check")?;
        self.file_len = new_len;
        Ok(())
    }
}
