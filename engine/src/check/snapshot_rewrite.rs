//! Rewriting the snapshot table after `-r all` found entries QEMU repairs
//! (incomplete extra data, too much extra data): QEMU's
//! qcow2_check_fix_snapshot_table. The new table goes into fresh clusters at
//! the end of the file; the header is switched to it; the old table's
//! clusters are freed.

use qj_spec::qcow2::{encode_snapshot_table, SnapshotHeader};

use super::checker::Checker;
use super::error::CheckError;
use super::image::DiskRefcounts;
use super::report::Tally;

/// QEMU's completed extra data: vm_state_size_large, disk_size, icount,
/// then whatever unknown extra data followed.
fn complete_entry(entry: &SnapshotHeader, virtual_size: u64) -> SnapshotHeader {
    let word = |i: usize| {
        entry
            .extra_data
            .get(i * 8..i * 8 + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
    };
    let vm_state_size = word(0).unwrap_or(u64::from(entry.vm_state_size));
    let disk_size = word(1).unwrap_or(virtual_size);
    // QEMU stores -1 when the instruction count is unknown.
    let icount = word(2).unwrap_or(u64::MAX);
    let mut extra_data = Vec::with_capacity(entry.extra_data.len().max(24));
    for value in [vm_state_size, disk_size, icount] {
        extra_data.extend_from_slice(&value.to_be_bytes());
    }
    if let Some(unknown) = entry.extra_data.get(24..) {
        extra_data.extend_from_slice(unknown);
    }
    SnapshotHeader {
        // A VM state too large for the old 32-bit field reads as a
        // disk-only snapshot to old readers rather than a truncated one.
        vm_state_size: u32::try_from(vm_state_size).unwrap_or(0),
        extra_data,
        ..entry.clone()
    }
}

impl Checker<'_> {
    /// Rewrites the snapshot table if the snapshot pass found corruptions
    /// and the mode fixes them. `refcounts_ok` says whether the refcount
    /// pass left consistent refcounts, without which no cluster may be
    /// allocated.
    pub fn fix_snapshot_table(
        &mut self,
        tally: &mut Tally,
        refcounts_ok: bool,
    ) -> Result<(), CheckError> {
        if tally.corruptions == 0 || !self.mode.fixes_errors() {
            return Ok(());
        }
        let outcome = if refcounts_ok {
            self.rewrite_snapshot_table()?
        } else {
            Err("the refcounts are not consistent".to_owned())
        };
        match outcome {
            Ok(()) => {
                tally.corruptions_fixed += tally.corruptions;
                tally.corruptions = 0;
            }
            Err(reason) => {
                tally.check_errors += 1;
                self.msg(format!("ERROR failed to update snapshot table: {reason}"));
            }
        }
        Ok(())
    }

    /// Writes the completed table into new clusters at the end of the file.
    /// The inner error says why the rewrite was not attempted.
    fn rewrite_snapshot_table(&mut self) -> Result<Result<(), String>, CheckError> {
        let g = self.image.geometry;
        let cluster_size = g.cluster_size();
        let virtual_size = self.image.header.size / 512 * 512;
        let mut entries = Vec::with_capacity(self.snapshots.len());
        for sn in &self.snapshots {
            let Some(entry) = &sn.entry else {
                return Ok(Err(format!(
                    "snapshot {} has an id or name that is not UTF-8",
                    sn.id
                )));
            };
            entries.push(complete_entry(entry, virtual_size));
        }
        let mut table = encode_snapshot_table(&entries)?;
        let table_len = table.len() as u64;
        let clusters = g.clusters_for(table_len).max(1);
        table.resize((clusters * cluster_size) as usize, 0);
        let new_offset = self.file_len.next_multiple_of(cluster_size);
        let first = new_offset >> g.cluster_bits;

        // The new clusters need refcount entries in existing blocks; this
        // repair does not grow the refcount structure.
        let mut disk = DiskRefcounts::new(&self.image);
        for c in first..first + clusters {
            match disk.has_block(self.storage, c) {
                Ok(true) if disk.get(self.storage, c).ok() == Some(0) => {}
                _ => return Ok(Err(format!("no free refcount entry for cluster {c}"))),
            }
        }

        self.write(&table, new_offset, "the new snapshot table")?;
        for c in first..first + clusters {
            disk.set(self.storage, c, 1).map_err(|e| {
                e.into_check_error("setting the refcount of a new snapshot table cluster")
            })?;
        }
        disk.write_back(self.storage)
            .map_err(CheckError::io("writing a refcount block"))?;
        // Ordering: the new table and its refcounts are durable before the
        // header points at it; until then the old table stays in force.
        self.flush("the new snapshot table")?;

        let mut pointer = Vec::with_capacity(12);
        pointer.extend_from_slice(&self.image.header.nb_snapshots.to_be_bytes());
        pointer.extend_from_slice(&new_offset.to_be_bytes());
        // nb_snapshots and snapshots_offset are adjacent (bytes 60..72), in
        // one sector, so the switch is a single atomic sector write.
        self.write(&pointer, 60, "the snapshot table pointer")?;
        // Ordering: the switch is durable before the old table's clusters
        // are freed (a crash in between only leaks them).
        self.flush("the snapshot table pointer")?;

        let old_offset = self.image.header.snapshots_offset;
        if self.snapshots_size > 0 {
            let old_first = old_offset >> g.cluster_bits;
            let old_last = (old_offset + self.snapshots_size - 1) >> g.cluster_bits;
            for c in old_first..=old_last {
                if let Ok(r) = disk.get(self.storage, c) {
                    if r > 0 {
                        disk.set(self.storage, c, r - 1)
                            .map_err(|e| e.into_check_error("freeing the old snapshot table"))?;
                    }
                }
            }
            disk.write_back(self.storage)
                .map_err(CheckError::io("writing a refcount block"))?;
            self.flush("freeing the old snapshot table")?;
        }

        self.image.header.snapshots_offset = new_offset;
        self.snapshots_size = table_len;
        self.file_len = self
            .storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        Ok(Ok(()))
    }
}
