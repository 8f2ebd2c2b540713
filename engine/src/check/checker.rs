//! The state one check pass carries, and reference counting into the
//! in-memory refcount table (QEMU's qcow2_inc_refcounts_imrt).

use std::collections::BTreeSet;

use qj_journal::Storage;
use qj_spec::units::HostOffset;

use super::error::CheckError;
use super::image::Image;
use super::imrt::Imrt;
use super::report::{Log, Tally};
use super::snapshots::SnapshotRef;
use super::RepairMode;

/// Most clusters referenced past the end of the file that a pass remembers
/// (so a rebuild does not allocate its new structures where a corrupt entry
/// points); beyond this the list stops growing.
pub(crate) const BEYOND_EOF_MAX: usize = 1 << 16;

/// One pass over one image.
pub(crate) struct Checker<'a> {
    pub storage: &'a dyn Storage,
    pub mode: RepairMode,
    pub extra_refs: &'a [(HostOffset, u64)],
    pub image: Image,
    pub file_len: u64,
    pub log: Log,
    /// Snapshot table entries as read (possibly shortened by a repair).
    pub snapshots: Vec<SnapshotRef>,
    /// Bytes of the snapshot table (end of the last entry, unpadded).
    pub snapshots_size: u64,
    /// Clusters referenced past the end of the file (not counted).
    pub beyond_eof: BTreeSet<u64>,
    /// The image's journal was dirty (replayed in memory for this pass):
    /// its persisted dedup index may be older than the log (spec §3.6).
    pub journal_was_dirty: bool,
}

impl<'a> Checker<'a> {
    pub fn new(
        storage: &'a dyn Storage,
        mode: RepairMode,
        extra_refs: &'a [(HostOffset, u64)],
        image: Image,
    ) -> Result<Self, CheckError> {
        let file_len = storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        Ok(Checker {
            storage,
            mode,
            extra_refs,
            image,
            file_len,
            log: Log::default(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            beyond_eof: BTreeSet::new(),
            journal_was_dirty: false,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        self.image.geometry.cluster_size()
    }

    pub fn cluster_bits(&self) -> u32 {
        self.image.geometry.cluster_bits
    }

    pub fn msg(&mut self, line: String) {
        self.log.push(line);
    }

    /// Counts one reference to every cluster of `[offset, offset + size)`.
    /// A range ending a cluster or more past the end of the file is a
    /// corruption and is not counted (the last cluster of an image may be
    /// partly allocated, so less than a cluster past the end is fine).
    pub fn inc_refcounts(
        &mut self,
        imrt: &mut Imrt,
        tally: &mut Tally,
        offset: u64,
        size: u64,
    ) -> Result<(), CheckError> {
        if size == 0 {
            return Ok(());
        }
        let cluster_size = self.cluster_size();
        // i128: offsets come from disk and may be anywhere in u64.
        let overshoot = i128::from(offset) + i128::from(size) - i128::from(self.file_len);
        if overshoot >= i128::from(cluster_size) {
            self.msg(format!(
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {offset:#x} size {size:#x}"
            ));
            tally.corruptions += 1;
            let first = offset >> self.cluster_bits();
            if self.beyond_eof.len() < BEYOND_EOF_MAX {
                self.beyond_eof.insert(first);
            }
            return Ok(());
        }
        // offset + size < file_len + cluster_size, so this cannot overflow.
        let start = offset >> self.cluster_bits();
        let last = (offset + size - 1) >> self.cluster_bits();
        let max = self.image.geometry.refcount_max();
        for k in start..=last {
            if k >= imrt.clusters() && imrt.grow(k + 1).is_none() {
                return Err(CheckError::TooLarge { clusters: k + 1 });
            }
            let refcount = imrt.get(k);
            if refcount == max {
                self.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.cluster_bits()
                ));
                self.msg(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing"
                        .into(),
                );
                tally.corruptions += 1;
                continue;
            }
            imrt.set(k, refcount + 1);
        }
        Ok(())
    }

    /// Writes `bytes` at `offset` as part of a repair.
    pub fn write(&self, bytes: &[u8], offset: u64, what: &str) -> Result<(), CheckError> {
        debug_assert!(
            self.mode != RepairMode::None,
            "a read-only check wrote {what}"
        );
        self.storage
            .write_at(bytes, offset)
            .map_err(CheckError::io(format!("writing {what} at {offset:#x}")))
    }

    /// Makes every repair write so far durable.
    pub fn flush(&self, what: &str) -> Result<(), CheckError> {
        self.storage
            .flush()
            .map_err(CheckError::io(format!("flushing {what}")))
    }
}
