//! Internal snapshots: create, list, apply (revert to) and delete, as
//! `qemu-img snapshot` does them (QEMU's `block/qcow2-snapshot.c`).
//!
//! Each operation is a short list of dependent *phases*, each a set of
//! in-memory metadata changes made under the exclusive gate:
//!
//! - create: (1) raise the count of every cluster the active L1 reaches,
//!   clear COPIED in the active tables, write the L1 copy; (2) write the
//!   new snapshot table and switch the header to it;
//! - apply: (1) raise the counts of what the snapshot reaches, point the
//!   active L1 at the snapshot's tables, drop the old active references;
//!   (2) set COPIED again where a count is back to 1;
//! - delete: (1) switch the header to a table without the entry, drop the
//!   snapshot's references and its L1 copy; (2) set COPIED where a count
//!   is back to 1.
//!
//! How the phases reach the disk is the backend's difference:
//!
//! - flush ordering persists after every phase, which is QEMU's order: the
//!   increments and the cleared COPIED flags are durable before the table
//!   names the snapshot, and the header switch before any decrement (the
//!   backend defers decrements until the change that unreferences is
//!   durable). A crash in between leaks clusters, never more.
//! - the journal runs all phases under one gate hold and persists once:
//!   one epoch, one transaction, so a crash leaves all of the operation or
//!   none of it, and no leak. The epoch must fit one transaction: an
//!   operation whose metadata would not is refused before anything
//!   changes, with the size it needs and the journal's limit (grow the
//!   journal with `qj journal` and retry).
//!
//! A snapshot carries no bitmaps (QEMU's rule: bitmaps belong to the
//! active image); the header keeps every extension as it was.

use std::time::{SystemTime, UNIX_EPOCH};

use qj_spec::error::FormatError;
use qj_spec::qcow2::{
    encode_snapshot_table, read_table_entry, write_table_entry, L1Entry, L2Entry, SnapshotHeader,
    L1_SIZE_BYTES_MAX, SNAPSHOTS_MAX, SNAPSHOT_TABLE_LEN_MAX,
};
use qj_spec::units::{Geometry, HostCluster, HostOffset};

use super::Image;
use crate::backend::journal::JournalMutation;
use crate::backend::ordered::OrderingMutation;
use crate::backend::{BackendKind, MetadataWrite};
use crate::error::{Error, Result};
use crate::metadata_map::MetadataKind;
use crate::sync::Ordering;

const TABLE: &str = "qcow2 snapshot table";

/// Longest snapshot name `create` accepts: the name's length is a 16-bit
/// field; QEMU's own tools limit names to 256 bytes.
pub const SNAPSHOT_NAME_LEN_MAX: usize = 256;

/// The phases of one operation, in order, and their count (bounded).
const PHASES_MAX: usize = 2;

/// Checks a snapshot table read from disk: every L1 copy inside the file,
/// cluster aligned and no larger than QEMU allows, and every id unique.
/// The error names the entry's field and its offset in the table.
pub(super) fn validate_snapshot_entries(
    entries: &[SnapshotHeader],
    geometry: Geometry,
    file_len: u64,
) -> Result<()> {
    let mut pos = 0u64;
    for (i, e) in entries.iter().enumerate() {
        pos = pos.next_multiple_of(8);
        let bad = |field: &'static str, at: u64, reason: String| {
            Error::Format(FormatError::Field {
                structure: TABLE,
                field,
                offset: pos + at,
                reason: format!("entry {i} (id {:?}, name {:?}): {reason}", e.id, e.name),
            })
        };
        let l1_bytes = u64::from(e.l1_size) * 8;
        if l1_bytes > L1_SIZE_BYTES_MAX {
            return Err(bad(
                "l1_size",
                8,
                format!(
                    "{} entries, QEMU allows at most {L1_SIZE_BYTES_MAX} bytes",
                    e.l1_size
                ),
            ));
        }
        if e.l1_table_offset == 0 || !geometry.is_aligned(e.l1_table_offset) {
            return Err(bad(
                "l1_table_offset",
                0,
                format!(
                    "{:#x} is not a cluster-aligned offset past the header",
                    e.l1_table_offset
                ),
            ));
        }
        if e.l1_table_offset
            .checked_add(l1_bytes)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad(
                "l1_table_offset",
                0,
                format!(
                    "L1 table of {l1_bytes} bytes at {:#x} runs past the end of the file ({file_len} bytes)",
                    e.l1_table_offset
                ),
            ));
        }
        if let Some(first) = entries[..i].iter().position(|o| o.id == e.id) {
            return Err(bad(
                "id_str",
                SNAPSHOT_ID_AT,
                format!("the same id as entry {first}: ids must be unique"),
            ));
        }
        pos += e.encoded_len() as u64;
    }
    Ok(())
}

/// Where the id string starts in an entry with no extra data; only used to
/// point an error near the field.
const SNAPSHOT_ID_AT: u64 = 40;

/// The entry `key` names: the one whose id is `key`, else the only one
/// whose name is `key` (QEMU takes the first of several; qj refuses to
/// guess and asks for the id).
fn find(entries: &[SnapshotHeader], key: &str) -> Result<usize> {
    if let Some(i) = entries.iter().position(|e| e.id == key) {
        return Ok(i);
    }
    let named: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].name == key)
        .collect();
    match named.as_slice() {
        [] => Err(Error::InvalidArgument(format!(
            "snapshot {key:?} not found (no snapshot has that id or name)"
        ))),
        [i] => Ok(*i),
        many => Err(Error::InvalidArgument(format!(
            "snapshot name {key:?} is ambiguous: snapshots with ids {} share it; name one by its id",
            many.iter()
                .map(|&i| entries[i].id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// QEMU's id for a new snapshot: one more than the largest numeric id.
fn next_id(entries: &[SnapshotHeader]) -> String {
    let max = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

/// The extra data QEMU writes for a disk-only snapshot: vm_state_size_large
/// 0, the virtual disk size, and icount 0 (what `qemu-img snapshot -c`
/// records).
fn extra_data(disk_size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(24);
    for word in [0, disk_size, 0u64] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out
}

/// Bytes of an operation's epoch, at most: every table it may change or
/// write, counted whole, plus the header.
#[derive(Debug, Default)]
struct EpochBudget {
    clusters: u64,
}

impl Image {
    /// Every internal snapshot, in table order (as `qemu-img snapshot -l`
    /// lists them). A table that fails validation is an error naming the
    /// field.
    pub fn snapshots(&self) -> Result<Vec<SnapshotHeader>> {
        let header = self.header.lock().mem.clone();
        let entries = if header.nb_snapshots == 0 {
            Vec::new()
        } else {
            super::guard::read_snapshot_table(&*self.storage, &*self.backend, &header)?.0
        };
        let file_len = self.file_len()?;
        validate_snapshot_entries(&entries, self.geometry, file_len)?;
        Ok(entries)
    }

    /// How far the image reaches: the file, or further where a journal
    /// holds tables not yet written in place (the end of the last cluster
    /// in use, as the refcounts say, covers those).
    fn file_len(&self) -> Result<u64> {
        use crate::error::IoContext;
        let file = self
            .storage
            .len()
            .ctx(|| "reading the image length".into())?;
        let in_use = self
            .geometry
            .host_offset(HostCluster(self.refcounts.lock().free_index().end()))
            .0;
        Ok(file.max(self.backend.held_end()).max(in_use))
    }

    /// Creates an internal snapshot named `name` of the image as it is now
    /// (everything written before the call), and returns its entry. A name
    /// already in use is refused (QEMU accepts duplicates; `-a` and `-d`
    /// would then have to guess).
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotHeader> {
        self.check_writable()?;
        if name.is_empty() || name.len() > SNAPSHOT_NAME_LEN_MAX || name.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "snapshot name {name:?}: 1 to {SNAPSHOT_NAME_LEN_MAX} bytes, no NUL"
            )));
        }
        let entries = self.snapshots()?;
        if entries.iter().any(|e| e.name == name) {
            return Err(Error::InvalidArgument(format!(
                "a snapshot named {name:?} already exists"
            )));
        }
        if entries.len() as u64 >= u64::from(SNAPSHOTS_MAX) {
            return Err(Error::InvalidArgument(format!(
                "the image has {} snapshots, QEMU allows at most {SNAPSHOTS_MAX}",
                entries.len()
            )));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let l1_len = self.l1.read().entries.len();
        let mut entry = SnapshotHeader {
            l1_table_offset: 0,
            l1_size: l1_len as u32,
            id: next_id(&entries),
            name: name.to_owned(),
            // A u32 of seconds lasts until 2106, as in QEMU.
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra_data: extra_data(self.virtual_size()),
        };
        let mut new_table = entries.clone();
        new_table.push(entry.clone());
        let table_len = encode_snapshot_table(&new_table)?.len();
        if table_len > SNAPSHOT_TABLE_LEN_MAX {
            return Err(Error::InvalidArgument(format!(
                "the snapshot table would grow to {table_len} bytes, QEMU allows at most {SNAPSHOT_TABLE_LEN_MAX}"
            )));
        }
        let l1_clusters = self.geometry.clusters_for(l1_len as u64 * 8).max(1);
        let mut budget = self.active_budget()?;
        budget.clusters += l1_clusters + self.geometry.clusters_for(table_len as u64) + 1;
        self.check_budget(&budget, "creating a snapshot")?;

        // QEMU's order: the references first, then the L1 copy and the
        // table that names it. The mutation swaps them: the table names the
        // snapshot before its counts are durable.
        let order = if self.ordering_mutation == OrderingMutation::SnapshotTableFirst {
            [1, 0]
        } else {
            [0, 1]
        };
        self.run_phases(PHASES_MAX, |phase| match order[phase] {
            0 => self.reference_active(),
            _ => {
                entry.l1_table_offset = self.write_l1_copy(l1_clusters)?.0;
                let mut table = entries.clone();
                table.push(entry.clone());
                self.switch_table(&table)
            }
        })?;
        Ok(entry)
    }

    /// Reverts the active image to the snapshot `key` (an id, or a unique
    /// name). The snapshot stays.
    pub fn snapshot_apply(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        let entries = self.snapshots()?;
        let sn = entries[find(&entries, key)?].clone();
        let size = self.virtual_size();
        if let Some(disk_size) = sn.disk_size() {
            if disk_size != size {
                return Err(Error::Unsupported(format!(
                    "snapshot {:?} has a virtual size of {disk_size} bytes, the image {size}: qj does not resize on apply (qemu-img snapshot -a does)",
                    sn.name
                )));
            }
        }
        let l1_len = self.l1.read().entries.len();
        if sn.l1_size as usize > l1_len {
            return Err(Error::Unsupported(format!(
                "snapshot {:?} has {} L1 entries, the active table {l1_len}: qj does not grow the L1 table on apply",
                sn.name, sn.l1_size
            )));
        }
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let mut budget = self.active_budget()?;
        budget.clusters += self.tables_of(&sn_l1) + self.geometry.clusters_for(l1_len as u64 * 8);
        self.check_budget(&budget, "applying a snapshot")?;
        self.run_phases(PHASES_MAX, |phase| match phase {
            0 => self.revert_to(&sn_l1),
            _ => self.restore_copied(),
        })
    }

    /// Deletes the snapshot `key` (an id, or a unique name) and frees the
    /// clusters only it used.
    pub fn snapshot_delete(&self, key: &str) -> Result<()> {
        self.check_writable()?;
        let entries = self.snapshots()?;
        let index = find(&entries, key)?;
        let sn = entries[index].clone();
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let mut table = entries.clone();
        table.remove(index);
        let table_len = encode_snapshot_table(&table)?.len() as u64;
        let mut budget = self.active_budget()?;
        budget.clusters += self.tables_of(&sn_l1) + self.geometry.clusters_for(table_len) + 1;
        self.check_budget(&budget, "deleting a snapshot")?;
        self.run_phases(PHASES_MAX, |phase| match phase {
            0 => {
                self.switch_table(&table)?;
                self.unreference_snapshot(&sn, &sn_l1)
            }
            _ => self.restore_copied(),
        })
    }

    /// Runs `phases` phases of one snapshot operation: on a backend whose
    /// epochs are atomic (the journal), all under one gate hold and then
    /// one persist; otherwise one persist after each (the persist also
    /// writes the deferred decrements the phase caused). Whatever the guest
    /// wrote before goes first, in an epoch of its own. A phase that fails
    /// poisons the image: memory may be ahead of the disk, and nothing more
    /// is written.
    fn run_phases(&self, phases: usize, mut phase: impl FnMut(usize) -> Result<()>) -> Result<()> {
        let r = self.persist_all();
        self.poisoned(r)?;
        let atomic = self.backend.kind() == BackendKind::Journal
            && self.journal_mutation != JournalMutation::SnapshotStepsSplit;
        if atomic {
            {
                let _gate = self.gate.write();
                let _op = self.begin_op();
                for i in 0..phases {
                    let r = phase(i);
                    self.poisoned(r)?;
                }
            }
            let r = self.persist_all();
            return self.poisoned(r);
        }
        for i in 0..phases {
            {
                let _gate = self.gate.write();
                let _op = self.begin_op();
                let r = phase(i);
                self.poisoned(r)?;
            }
            let r = self.persist_all();
            self.poisoned(r)?;
        }
        Ok(())
    }

    /// The clusters an operation may change in the active image: every L2
    /// table the active L1 reaches, every refcount block, the L1 table, and
    /// room for a few new refcount blocks.
    fn active_budget(&self) -> Result<EpochBudget> {
        let l1 = self.l1.read();
        let l2_tables = l1
            .entries
            .iter()
            .filter(|&&e| L1Entry(e).l2_offset().is_some())
            .count() as u64;
        let l1_clusters = self.geometry.clusters_for(l1.entries.len() as u64 * 8);
        drop(l1);
        let (_, table_clusters) = self.refcounts.lock().table_location();
        let metadata = self.metadata.read();
        let blocks = metadata
            .runs()
            .filter(|r| r.2 == MetadataKind::RefcountBlock)
            .map(|r| r.1)
            .sum::<u64>();
        drop(metadata);
        // New clusters (an L1 copy, a table) may need a new refcount block
        // and a moved refcount table: the table is counted above, once
        // more for its copy, plus the block.
        let growth_clusters = table_clusters + 1;
        Ok(EpochBudget {
            clusters: l2_tables + l1_clusters + blocks + table_clusters + growth_clusters,
        })
    }

    /// L2 tables an L1 table reaches.
    fn tables_of(&self, l1: &[u64]) -> u64 {
        l1.iter()
            .filter(|&&e| L1Entry(e).l2_offset().is_some())
            .count() as u64
    }

    /// Refuses an operation whose epoch could exceed what one journal
    /// transaction may hold: nothing has changed yet. Guest epochs keep to
    /// a quarter of the ring so that a checkpoint can make room while
    /// others wait; a snapshot operation runs alone after a persist, so it
    /// may take half (the hard limit is the whole ring, descriptors
    /// included).
    fn check_budget(&self, budget: &EpochBudget, what: &str) -> Result<()> {
        let Some(guest_epoch_max) = self.backend.epoch_bytes_max() else {
            return Ok(());
        };
        let max = guest_epoch_max * 2;
        let bytes = budget.clusters * self.geometry.cluster_size();
        if bytes > max {
            return Err(Error::Unsupported(format!(
                "{what} changes up to {bytes} bytes of metadata, more than one journal transaction holds ({max} bytes): grow the journal (qj journal) and retry"
            )));
        }
        Ok(())
    }

    /// A snapshot's L1 table, as the backend knows it.
    pub(super) fn read_snapshot_l1(&self, sn: &SnapshotHeader) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; sn.l1_size as usize * 8];
        self.backend
            .read_metadata(&*self.storage, &mut raw, HostOffset(sn.l1_table_offset))?;
        let entries: Vec<u64> = (0..sn.l1_size as usize)
            .map(|i| read_table_entry(&raw, i))
            .collect();
        for (i, &e) in entries.iter().enumerate() {
            let entry = L1Entry(e);
            if entry.reserved_bits() != 0
                || entry
                    .l2_offset()
                    .is_some_and(|o| !self.geometry.is_aligned(o.0))
            {
                return Err(Error::Corrupt(format!(
                    "snapshot {:?} L1 entry {i} is invalid ({e:#x})",
                    sn.name
                )));
            }
        }
        Ok(entries)
    }

    /// Create, phase 1: one more reference on every cluster the active L1
    /// reaches (each L2 table and, through it, each data cluster), and
    /// COPIED cleared in the active tables. Caller holds the gate.
    fn reference_active(&self) -> Result<()> {
        let mut l1 = self.l1.write();
        let bits = self.geometry.cluster_bits;
        for index in 0..l1.entries.len() {
            let entry = L1Entry(l1.entries[index]);
            let Some(l2) = entry.l2_offset() else {
                continue;
            };
            let table = self.load_l2(l2)?;
            let mut t = table.data.write();
            for i in 0..self.geometry.l2_entries() as usize {
                let raw = read_table_entry(&t.bytes, i);
                let decoded = L2Entry::decode(raw, bits);
                self.add_references(decoded, 1)?;
                let cleared = match decoded {
                    L2Entry::Normal {
                        offset,
                        copied: true,
                    } => L2Entry::Normal {
                        offset,
                        copied: false,
                    },
                    L2Entry::Zero {
                        preallocated,
                        copied: true,
                    } => L2Entry::Zero {
                        preallocated,
                        copied: false,
                    },
                    _ => continue,
                };
                t.set_entry(i, cleared.encode(bits));
            }
            drop(t);
            self.refcounts.lock().increment(
                &*self.storage,
                &*self.backend,
                self.geometry.host_cluster(l2),
            )?;
            self.metadata
                .write()
                .insert(self.geometry.host_cluster(l2), 1, MetadataKind::L2Table)
                .map_err(|o| Error::Corrupt(format!("L2 table overlaps the {}", o.existing)))?;
            if entry.is_copied() {
                l1.entries[index] = L1Entry::new(l2, false).0;
                if !l1.fresh {
                    l1.dirty_clusters
                        .insert(index as u64 * 8 / self.geometry.cluster_size());
                }
            }
        }
        Ok(())
    }

    /// Create, phase 2: the active L1 table, COPIED clear, written into
    /// fresh clusters. Returns where. Caller holds the gate.
    fn write_l1_copy(&self, l1_clusters: u64) -> Result<HostOffset> {
        let copy: Vec<u64> = self
            .l1
            .read()
            .entries
            .iter()
            .map(|&e| e & !L1Entry::COPIED)
            .collect();
        let at = self.allocate_metadata_run(l1_clusters, MetadataKind::SnapshotL1)?;
        self.queue_fresh(at, l1_clusters, |bytes| {
            for (i, &e) in copy.iter().enumerate() {
                write_table_entry(bytes, i, e);
            }
        });
        Ok(at)
    }

    /// Queues `clusters` fresh clusters at `at`, filled by `fill`, for the
    /// next epoch.
    fn queue_fresh(&self, at: HostOffset, clusters: u64, fill: impl FnOnce(&mut [u8])) {
        let cs = self.geometry.cluster_size();
        let mut bytes = vec![0u8; (clusters * cs) as usize];
        fill(&mut bytes);
        let mut fresh = self.fresh_metadata.lock();
        for (c, chunk) in bytes.chunks(cs as usize).enumerate() {
            fresh.push(MetadataWrite {
                offset: HostOffset(at.0 + c as u64 * cs),
                bytes: chunk.to_vec(),
            });
        }
        self.fresh_tables.fetch_add(clusters, Ordering::Relaxed);
    }

    /// Adds (`delta` 1) or drops (`delta` -1) one reference on every host
    /// cluster `entry` holds. Drops go through the free rules (deferred on
    /// flush ordering).
    fn add_references(&self, entry: L2Entry, delta: i64) -> Result<()> {
        let clusters = self.referenced_clusters(entry);
        if clusters.is_empty() {
            return Ok(());
        }
        if delta < 0 {
            self.guard_release(entry)?;
        }
        let mut rc = self.refcounts.lock();
        for c in clusters {
            if delta > 0 {
                rc.increment(&*self.storage, &*self.backend, HostCluster(c))?;
            } else {
                rc.free(&*self.storage, &*self.backend, HostCluster(c))?;
                if self.dedups() {
                    // A data cluster a delete or an apply frees leaves the
                    // dedup index in the same transaction, like one a
                    // guest write frees (`release_entry`).
                    let count = rc.get(&*self.storage, &*self.backend, HostCluster(c))?;
                    self.dedup_freed(HostCluster(c), count);
                }
            }
        }
        Ok(())
    }

    /// Writes `table` into fresh clusters, switches the header to it and
    /// frees the old table (by the free rules: after the switch is
    /// durable). No table at all when `table` is empty. Caller holds the
    /// gate.
    fn switch_table(&self, table: &[SnapshotHeader]) -> Result<()> {
        let bytes = encode_snapshot_table(table)?;
        let g = self.geometry;
        let new_at = if table.is_empty() {
            0
        } else {
            let clusters = g.clusters_for(bytes.len() as u64).max(1);
            let at = self.allocate_metadata_run(clusters, MetadataKind::SnapshotTable)?;
            self.queue_fresh(at, clusters, |out| {
                out[..bytes.len()].copy_from_slice(&bytes)
            });
            at.0
        };
        let (old_at, old_nb) = {
            let mut h = self.header.lock();
            let old = (h.mem.snapshots_offset, h.mem.nb_snapshots);
            h.mem.snapshots_offset = new_at;
            h.mem.nb_snapshots = table.len() as u32;
            h.dirty = true;
            old
        };
        if old_nb > 0 {
            let old_header = {
                let mut h = self.header.lock().mem.clone();
                h.snapshots_offset = old_at;
                h.nb_snapshots = old_nb;
                h
            };
            let (_, old_end) =
                super::guard::read_snapshot_table(&*self.storage, &*self.backend, &old_header)?;
            let first = g.host_cluster(HostOffset(old_at));
            let clusters = g.clusters_for(old_end.max(old_at + 1)) - first.0;
            self.metadata.write().remove(first);
            let mut rc = self.refcounts.lock();
            for c in first.0..first.0 + clusters {
                rc.free_metadata(&*self.storage, &*self.backend, HostCluster(c))?;
            }
        }
        Ok(())
    }

    /// Delete, phase 1 (after the table switch): drops the snapshot's
    /// reference on every cluster its L1 reaches, and frees its L1 copy.
    /// Caller holds the gate.
    fn unreference_snapshot(&self, sn: &SnapshotHeader, sn_l1: &[u64]) -> Result<()> {
        for &raw in sn_l1 {
            if let Some(l2) = L1Entry(raw).l2_offset() {
                self.unreference_table(l2)?;
            }
        }
        let g = self.geometry;
        let first = g.host_cluster(HostOffset(sn.l1_table_offset));
        let clusters =
            g.clusters_for(sn.l1_table_offset + (u64::from(sn.l1_size) * 8).max(1)) - first.0;
        self.metadata.write().remove(first);
        let mut rc = self.refcounts.lock();
        for c in first.0..first.0 + clusters {
            rc.free_metadata(&*self.storage, &*self.backend, HostCluster(c))?;
        }
        Ok(())
    }

    /// Drops one reference on the L2 table at `l2` and on every cluster it
    /// maps (a data cluster's count is the number of L1 tables reaching
    /// it, through shared tables too).
    fn unreference_table(&self, l2: HostOffset) -> Result<()> {
        let table = self.load_l2(l2)?;
        let bytes = table.data.read().bytes.clone();
        for i in 0..self.geometry.l2_entries() as usize {
            let entry = L2Entry::decode(read_table_entry(&bytes, i), self.geometry.cluster_bits);
            self.add_references(entry, -1)?;
        }
        let cluster = self.geometry.host_cluster(l2);
        self.metadata.write().remove(cluster);
        self.refcounts
            .lock()
            .free_metadata(&*self.storage, &*self.backend, cluster)
    }

    /// Apply, phase 1: one more reference on everything the snapshot
    /// reaches, the active L1 replaced by the snapshot's (COPIED clear, the
    /// rest of the table empty), and the old active references dropped.
    /// Caller holds the gate.
    fn revert_to(&self, sn_l1: &[u64]) -> Result<()> {
        for &raw in sn_l1 {
            let Some(l2) = L1Entry(raw).l2_offset() else {
                continue;
            };
            let table = self.load_l2(l2)?;
            let bytes = table.data.read().bytes.clone();
            for i in 0..self.geometry.l2_entries() as usize {
                let entry =
                    L2Entry::decode(read_table_entry(&bytes, i), self.geometry.cluster_bits);
                self.add_references(entry, 1)?;
            }
            let cluster = self.geometry.host_cluster(l2);
            self.refcounts
                .lock()
                .increment(&*self.storage, &*self.backend, cluster)?;
            self.metadata
                .write()
                .insert(cluster, 1, MetadataKind::L2Table)
                .map_err(|o| Error::Corrupt(format!("L2 table overlaps the {}", o.existing)))?;
        }
        let old = {
            let mut l1 = self.l1.write();
            let mut new = vec![0u64; l1.entries.len()];
            for (slot, &raw) in new.iter_mut().zip(sn_l1) {
                *slot = raw & !L1Entry::COPIED;
            }
            let old = std::mem::replace(&mut l1.entries, new);
            if !l1.fresh {
                let clusters = self.geometry.clusters_for(l1.entries.len() as u64 * 8);
                l1.dirty_clusters.extend(0..clusters);
            }
            old
        };
        for raw in old {
            if let Some(l2) = L1Entry(raw).l2_offset() {
                self.unreference_table(l2)?;
            }
        }
        Ok(())
    }

    /// Sets COPIED exactly where the count is 1, in the active L1 and the
    /// L2 tables it reaches (QEMU's update_snapshot_refcount with addend
    /// 0). Runs once the decrements that brought counts back to 1 are in
    /// memory: on flush ordering, after they are durable too, since a
    /// COPIED flag over a count of 2 on disk is a corruption. Caller holds
    /// the gate.
    fn restore_copied(&self) -> Result<()> {
        let bits = self.geometry.cluster_bits;
        let mut l1 = self.l1.write();
        for index in 0..l1.entries.len() {
            let entry = L1Entry(l1.entries[index]);
            let Some(l2) = entry.l2_offset() else {
                continue;
            };
            let table_count = self.count(self.geometry.host_cluster(l2))?;
            let table = self.load_l2(l2)?;
            let mut t = table.data.write();
            for i in 0..self.geometry.l2_entries() as usize {
                let decoded = L2Entry::decode(read_table_entry(&t.bytes, i), bits);
                let fixed = match decoded {
                    L2Entry::Normal { offset, copied } => {
                        let own = self.count(self.geometry.host_cluster(offset))? == 1;
                        if own == copied {
                            continue;
                        }
                        L2Entry::Normal {
                            offset,
                            copied: own,
                        }
                    }
                    L2Entry::Zero {
                        preallocated: Some(offset),
                        copied,
                    } => {
                        let own = self.count(self.geometry.host_cluster(offset))? == 1;
                        if own == copied {
                            continue;
                        }
                        L2Entry::Zero {
                            preallocated: Some(offset),
                            copied: own,
                        }
                    }
                    _ => continue,
                };
                t.set_entry(i, fixed.encode(bits));
            }
            drop(t);
            let own = table_count == 1;
            if own != entry.is_copied() {
                l1.entries[index] = L1Entry::new(l2, own).0;
                if !l1.fresh {
                    l1.dirty_clusters
                        .insert(index as u64 * 8 / self.geometry.cluster_size());
                }
            }
        }
        Ok(())
    }

    fn count(&self, cluster: HostCluster) -> Result<u64> {
        self.refcounts
            .lock()
            .get(&*self.storage, &*self.backend, cluster)
    }
}
