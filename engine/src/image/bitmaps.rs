//! Persistent dirty bitmaps (the qcow2 "bitmaps" extension, autoclear
//! bit 0): loaded at open, marked by every guest write, write zeroes and
//! discard, changed by the `bitmap_*` operations, and stored by each
//! backend's rule:
//!
//! - flush ordering does what QEMU does: every bitmap it maintains is
//!   marked `in_use` on disk, durably, before the first write; the bits
//!   live in memory; a clean close writes them, flushes, and only then
//!   clears `in_use`. A crash leaves them `in_use`: inconsistent, as QEMU's.
//! - the journal writes the changed bitmap clusters in every epoch, so they
//!   travel in the transaction that holds the L2 changes they describe, and
//!   never sets `in_use` (spec/qjournal.md, "Persistent dirty bitmaps").
//!   A write that overwrites clusters in place changes no L2 entry: when it
//!   sets a new bit, the bit is committed before the data is written.
//!
//! Bitmaps that are `in_use` at open, or carry extra data we do not know,
//! are not maintained: they are reported, left untouched, and a writable
//! open clears autoclear bit 0 so QEMU knows they are stale.

use qj_journal::Storage;
use qj_spec::error::FormatError;
use qj_spec::qcow2::features::{AUTOCLEAR_BITMAPS_BIT, AUTOCLEAR_BITMAPS_MASK};
use qj_spec::qcow2::{
    bitmap_table_entries, decode_bitmap_directory, encode_bitmap_directory, read_table_entry,
    validate_bitmap_entry, validate_bitmap_table_entry, validate_bitmaps_extension,
    validate_directory_fill, write_table_entry, BitmapDirectoryEntry, BitmapsExtension, Header,
    L2Entry, BITMAPS_MAX, BITMAP_FLAG_AUTO, BITMAP_FLAG_EXTRA_DATA_COMPATIBLE, BITMAP_FLAG_IN_USE,
    BITMAP_GRANULARITY_BITS_MAX, BITMAP_GRANULARITY_BITS_MIN, BITMAP_NAME_LEN_MAX,
    BITMAP_TABLE_ENTRIES_MAX, BITMAP_TABLE_ENTRY_ALL_ONES, BITMAP_TABLE_ENTRY_OFFSET_MASK,
    BITMAP_TYPE_DIRTY_TRACKING,
};
use qj_spec::units::{Geometry, HostCluster, HostOffset};
use serde::Serialize;

use super::Image;
use crate::backend::{BackendKind, MetadataBackend, MetadataWrite};
use crate::dirty_bitmap::DirtyBitmap;
use crate::error::{Error, IoContext, Result};
use crate::metadata_map::{MetadataKind, MetadataMap};
use crate::sync::Ordering;

/// What `qj info` shows of one persistent bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes one bit covers.
    pub granularity: u64,
    /// The directory flags as this open found them: `in-use`, `auto`
    /// (enabled: writes mark it), `extra-data-compatible`.
    pub flags: Vec<String>,
    /// Guest bytes covered by set bits; `None` for a bitmap whose bits
    /// cannot be trusted (in use) and were not read.
    pub dirty_bytes: Option<u64>,
}

/// One bitmap with its place on disk.
#[derive(Debug)]
struct StoredBitmap {
    bits: DirtyBitmap,
    table_offset: u64,
    table: Vec<u64>,
    /// The table changed in memory since it was last handed to the disk.
    table_changed: bool,
    /// The table's clusters were allocated in this epoch.
    table_fresh: bool,
}

/// Every bitmap of the image and how this open keeps them.
#[derive(Debug, Default)]
pub(super) struct BitmapState {
    /// Writes mark the bitmaps and they are stored (a writable open that
    /// found nothing it cannot maintain).
    maintained: bool,
    bitmaps: Vec<StoredBitmap>,
    /// Bitmaps listed by the directory but not loaded (in use, extra data).
    not_loaded: Vec<BitmapInfo>,
    /// Why the bitmaps are not maintained, or could not be read.
    problem: Option<String>,
    /// The directory on disk: offset and length in bytes.
    directory: Option<(u64, u64)>,
    /// The directory must be written anew (a bitmap added, removed, or
    /// its flags changed).
    directory_changed: bool,
    /// Changed bitmap data goes to the disk at the next persist: always on
    /// the journal; on flush ordering only once a clean close stores them.
    storing: bool,
    /// Maintained bitmaps carry `in_use` in the directory on disk (flush
    /// ordering while open).
    in_use_on_disk: bool,
    /// The crash harness's mutation `bitmap-outside-transaction`: each
    /// epoch's bitmap writes are held back and go with the next epoch.
    late_by_one: bool,
    /// The writes held back by `late_by_one`.
    held_back: BitmapWrites,
}

/// The bitmap writes of one epoch, by ordering class.
#[derive(Debug, Default)]
pub(super) struct BitmapWrites {
    /// Clusters allocated in this epoch (nothing points to them yet).
    pub fresh: Vec<MetadataWrite>,
    /// Existing clusters changed in place.
    pub in_place: Vec<MetadataWrite>,
}

fn past_end(structure: &'static str, field: &'static str, at: u64, what: String) -> Error {
    FormatError::field(structure, field, at, what).into()
}

/// Reads and validates the bitmaps of `header`. For a writable open,
/// `metadata` is the guard's map: every bitmap data cluster joins it, and
/// one that lands on other metadata is refused. Nothing is written.
pub(super) fn load(
    storage: &dyn Storage,
    backend: &dyn MetadataBackend,
    header: &Header,
    file_len: u64,
    mut metadata: Option<&mut MetadataMap>,
) -> Result<BitmapState> {
    let mut state = BitmapState::default();
    let Some(ext) = header.bitmaps() else {
        state.maintained = true;
        return Ok(state);
    };
    if !header.has_autoclear(AUTOCLEAR_BITMAPS_BIT) {
        state.problem = Some(
            "autoclear bit 0 is clear: a program that does not maintain bitmaps wrote the image, so its bitmaps are stale (QEMU drops them)".into(),
        );
        return Ok(state);
    }
    let g = header.geometry();
    let cs = g.cluster_size();
    validate_bitmaps_extension(&ext, cs)?;
    if ext
        .bitmap_directory_offset
        .checked_add(ext.bitmap_directory_size)
        .is_none_or(|end| end > file_len)
    {
        return Err(past_end(
            "bitmaps extension",
            "bitmap_directory_offset",
            16,
            format!(
                "the directory at {:#x} ({} bytes) is past the end of the file ({file_len} bytes)",
                ext.bitmap_directory_offset, ext.bitmap_directory_size
            ),
        ));
    }
    let mut dir = vec![0u8; ext.bitmap_directory_size as usize];
    backend.read_metadata(storage, &mut dir, HostOffset(ext.bitmap_directory_offset))?;
    let entries = decode_bitmap_directory(&dir, ext.nb_bitmaps)?;
    validate_directory_fill(&entries, ext.bitmap_directory_size)?;
    let mut at = ext.bitmap_directory_offset;
    let mut names = std::collections::BTreeSet::new();
    for e in entries {
        validate_bitmap_entry(&e, at, cs, header.size)?;
        if !names.insert(e.name.clone()) {
            return Err(FormatError::field(
                "qcow2 bitmap directory",
                "name",
                at + 24 + e.extra_data.len() as u64,
                format!("bitmap name {:?} appears twice", e.name),
            )
            .into());
        }
        let entry_len = e.encoded_len().next_multiple_of(8) as u64;
        let in_use = e.flags & BITMAP_FLAG_IN_USE != 0;
        if in_use || !e.extra_data.is_empty() {
            let why = if in_use {
                "in use (left by a crash, or open in another program)"
            } else {
                "has extra data qj does not know"
            };
            state.problem = Some(format!(
                "bitmap {:?} {why}: its bitmaps are left untouched and marked stale by a write",
                e.name
            ));
            state.not_loaded.push(BitmapInfo {
                name: e.name.clone(),
                granularity: 1 << e.granularity_bits,
                flags: flag_names(e.flags),
                dirty_bytes: None,
            });
            at += entry_len;
            continue;
        }
        let bitmap = load_one(
            storage,
            backend,
            g,
            &e,
            at,
            (header.size, file_len),
            metadata.as_deref_mut(),
        )?;
        state.bitmaps.push(bitmap);
        at += entry_len;
    }
    state.maintained = state.not_loaded.is_empty();
    state.directory = Some((ext.bitmap_directory_offset, ext.bitmap_directory_size));
    Ok(state)
}

/// Loads the table and bits of the bitmap of directory entry `e` (at byte
/// `at` of the file) for a disk of `disk_size` bytes.
fn load_one(
    storage: &dyn Storage,
    backend: &dyn MetadataBackend,
    g: Geometry,
    e: &BitmapDirectoryEntry,
    at: u64,
    (disk_size, file_len): (u64, u64),
    mut metadata: Option<&mut MetadataMap>,
) -> Result<StoredBitmap> {
    let cs = g.cluster_size();
    let table_bytes = u64::from(e.bitmap_table_size) * 8;
    if e.bitmap_table_offset + table_bytes > file_len {
        return Err(past_end(
            "qcow2 bitmap directory",
            "bitmap_table_offset",
            at,
            format!(
                "bitmap {:?}: the table at {:#x} ({table_bytes} bytes) is past the end of the file ({file_len} bytes)",
                e.name, e.bitmap_table_offset
            ),
        ));
    }
    let mut raw = vec![0u8; table_bytes as usize];
    backend.read_metadata(storage, &mut raw, HostOffset(e.bitmap_table_offset))?;
    let table: Vec<u64> = (0..e.bitmap_table_size as usize)
        .map(|i| read_table_entry(&raw, i))
        .collect();
    let mut bits = DirtyBitmap::new(
        e.name.clone(),
        e.granularity_bits,
        e.flags & !BITMAP_FLAG_IN_USE,
        disk_size,
        cs,
    );
    let mut cluster = vec![0u8; cs as usize];
    for (i, &entry) in table.iter().enumerate() {
        let entry_at = e.bitmap_table_offset + i as u64 * 8;
        validate_bitmap_table_entry(entry, i as u64, cs).map_err(|err| {
            past_end(
                "qcow2 bitmap table",
                "entry",
                entry_at,
                format!("bitmap {:?}: {err}", e.name),
            )
        })?;
        let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
        if offset == 0 {
            if entry & BITMAP_TABLE_ENTRY_ALL_ONES != 0 {
                bits.fill_cluster(i as u64);
            }
            continue;
        }
        if offset + cs > file_len {
            return Err(past_end(
                "qcow2 bitmap table",
                "entry",
                entry_at,
                format!(
                    "bitmap {:?}: entry {i} points to {offset:#x}, past the end of the file ({file_len} bytes)",
                    e.name
                ),
            ));
        }
        if let Some(map) = metadata.as_deref_mut() {
            let c = g.host_cluster(HostOffset(offset));
            if let Some(kind) = map.kind_of(c) {
                return Err(past_end(
                    "qcow2 bitmap table",
                    "entry",
                    entry_at,
                    format!(
                        "bitmap {:?}: entry {i} points to {offset:#x}, which holds the {kind}",
                        e.name
                    ),
                ));
            }
            map.insert(c, 1, MetadataKind::BitmapData)
                .map_err(|o| Error::Corrupt(format!("bitmap data overlaps the {}", o.existing)))?;
        }
        backend.read_metadata(storage, &mut cluster, HostOffset(offset))?;
        bits.load_cluster(i as u64, &cluster);
    }
    bits.forget_changes();
    Ok(StoredBitmap {
        bits,
        table_offset: e.bitmap_table_offset,
        table,
        table_changed: false,
        table_fresh: false,
    })
}

/// The flags of a directory entry by name, as `qj info` lists them.
fn flag_names(flags: u32) -> Vec<String> {
    [
        (BITMAP_FLAG_IN_USE, "in-use"),
        (BITMAP_FLAG_AUTO, "auto"),
        (BITMAP_FLAG_EXTRA_DATA_COMPATIBLE, "extra-data-compatible"),
    ]
    .into_iter()
    .filter(|&(bit, _)| flags & bit != 0)
    .map(|(_, name)| name.to_string())
    .collect()
}

/// A table's bytes, padded to whole clusters.
fn encode_table(table: &[u64], cluster_size: u64) -> Vec<u8> {
    let len = (table.len() as u64 * 8).next_multiple_of(cluster_size) as usize;
    let mut bytes = vec![0u8; len];
    for (i, &e) in table.iter().enumerate() {
        write_table_entry(&mut bytes, i, e);
    }
    bytes
}

impl BitmapState {
    /// The state of an image whose bitmaps could not be read: none is
    /// maintained, and `why` is reported.
    pub(super) fn unreadable(why: String) -> Self {
        Self {
            problem: Some(format!("the bitmaps cannot be read: {why}")),
            ..Self::default()
        }
    }

    /// The directory entries as they go to disk now.
    fn directory_entries(&self) -> Vec<BitmapDirectoryEntry> {
        let in_use = if self.in_use_on_disk {
            BITMAP_FLAG_IN_USE
        } else {
            0
        };
        self.bitmaps
            .iter()
            .map(|b| BitmapDirectoryEntry {
                bitmap_table_offset: b.table_offset,
                bitmap_table_size: b.table.len() as u32,
                flags: b.bits.flags | in_use,
                bitmap_type: BITMAP_TYPE_DIRTY_TRACKING,
                granularity_bits: b.bits.granularity_bits,
                extra_data: Vec::new(),
                name: b.bits.name.clone(),
            })
            .collect()
    }

    fn find(&mut self, name: &str) -> Result<usize> {
        self.bitmaps
            .iter()
            .position(|b| b.bits.name == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no bitmap named {name:?}")))
    }

    /// Injects the crash harness's bitmap mutation (see `late_by_one`).
    pub(super) fn with_mutation(mut self, mutation: crate::mutation::JournalMutation) -> Self {
        self.late_by_one = mutation == crate::mutation::JournalMutation::BitmapOutsideTransaction;
        self
    }

    /// Bytes of bitmap data changed in memory and not yet handed to the
    /// disk (whole sectors).
    pub(super) fn changed_bytes(&self) -> u64 {
        if !self.storing {
            return 0;
        }
        self.bitmaps
            .iter()
            .map(|b| b.bits.changed_sector_count() as u64 * 512)
            .sum()
    }
}

impl Image {
    /// Starts maintaining the bitmaps on a writable open, before anything
    /// else is written: keeps autoclear bit 0 when every bitmap can be
    /// maintained (clears it, and every unknown autoclear bit, otherwise),
    /// and on flush ordering makes `in_use` durable in the directory.
    pub(super) fn start_bitmaps(&self) -> Result<()> {
        let journal = self.backend.kind() == BackendKind::Journal;
        let mut st = self.bitmaps.lock();
        let mut kept = if journal {
            qj_spec::qcow2::features::AUTOCLEAR_JOURNAL_VALID_MASK
        } else {
            0
        };
        if st.maintained {
            kept |= AUTOCLEAR_BITMAPS_MASK;
        }
        st.storing = journal;
        let mut h = self.header.lock();
        let mut wrote = false;
        if h.mem.autoclear_features & !kept != 0 {
            h.mem.autoclear_features &= kept;
            let bytes = h.mem.encode()?;
            self.storage
                .write_at(&bytes, 0)
                .ctx(|| "clearing autoclear feature bits".into())?;
            self.counters.metadata_write(bytes.len());
            h.disk = h.mem.clone();
            wrote = true;
        }
        drop(h);
        if st.maintained && !journal && !st.bitmaps.is_empty() {
            // QEMU's rule: the bitmaps are inconsistent on disk from the
            // first write until a clean close stores them.
            st.in_use_on_disk = true;
            self.write_directory_in_place(&st)?;
            wrote = true;
        }
        if wrote {
            self.counters.flush();
            self.storage
                .flush()
                .ctx(|| "flushing the header and bitmap directory".into())?;
        }
        Ok(())
    }

    fn write_directory_in_place(&self, st: &BitmapState) -> Result<()> {
        let Some((offset, len)) = st.directory else {
            return Ok(());
        };
        let bytes = encode_bitmap_directory(&st.directory_entries())?;
        if bytes.len() as u64 != len {
            return Err(Error::Corrupt(format!(
                "the bitmap directory would change size in place ({len} to {} bytes)",
                bytes.len()
            )));
        }
        self.storage
            .write_at(&bytes, offset)
            .ctx(|| format!("writing the bitmap directory at {offset:#x}"))?;
        self.counters.metadata_write(bytes.len());
        Ok(())
    }

    /// Marks `[offset, offset + len)` in every enabled bitmap, before a
    /// guest write, write zeroes or discard changes it. On the journal, a
    /// newly set bit over clusters overwritten in place is committed first:
    /// no L2 change carries it, and the data may reach the disk at any time.
    pub(super) fn mark_bitmaps(&self, offset: u64, len: u64) -> Result<()> {
        let newly = {
            let mut st = self.bitmaps.lock();
            if !st.maintained {
                return Ok(());
            }
            let mut newly = false;
            for b in st.bitmaps.iter_mut().filter(|b| b.bits.is_enabled()) {
                newly |= b.bits.set_range(offset, len);
            }
            newly
        };
        // Ordering rule (journal, spec 11.6): a newly set bit must be
        // durable before the data it describes. An allocating write carries
        // its bit in the transaction of its L2 entry; a write in place
        // changes no L2 entry and may reach the disk before any commit, so
        // the bit is committed here, first. On flush ordering the bitmap is
        // `in_use` until a clean close, so no order is needed.
        if newly
            && self.backend.kind() == BackendKind::Journal
            && self.overwrites_in_place(offset, len)?
        {
            // The bit changed is the operation: done before the persist.
            drop(self.begin_op());
            let r = self.persist(None);
            self.poisoned(r)?;
        }
        Ok(())
    }

    /// Whether some cluster of the range is allocated and owned, so that a
    /// write there goes in place.
    fn overwrites_in_place(&self, offset: u64, len: u64) -> Result<bool> {
        for (cluster, ..) in self.pieces(offset, len) {
            if let Some(L2Entry::Normal { copied: true, .. }) = self.entry_of(cluster)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Bitmap writes for the epoch being gathered: changed data clusters
    /// (allocating those that have none yet), changed tables, and a new
    /// directory with the header that points to it. Called with the gate
    /// held exclusively, before the refcount side's epoch is taken, so that
    /// the counts of what is allocated here travel in the same epoch.
    pub(super) fn gather_bitmap_writes(&self) -> Result<BitmapWrites> {
        let mut out = BitmapWrites::default();
        // The data clusters' bits, apart from the structure (tables,
        // directory) that the mutation below must not touch.
        let mut bits = BitmapWrites::default();
        let mut st = self.bitmaps.lock();
        if !st.maintained || !self.writable {
            return Ok(out);
        }
        let cs = self.geometry.cluster_size();
        let storing = st.storing;
        for b in st.bitmaps.iter_mut() {
            if storing {
                let per = b.bits.sectors_per_cluster();
                let mut by_cluster: std::collections::BTreeMap<u64, Vec<u64>> =
                    std::collections::BTreeMap::new();
                for sector in b.bits.take_changed_sectors() {
                    by_cluster.entry(sector / per).or_default().push(sector);
                }
                for (index, sectors) in by_cluster {
                    let entry = b.table[index as usize];
                    let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
                    if offset != 0 {
                        // Only the changed sectors: one set bit costs 512
                        // bytes of journal, not a cluster. Runs are merged.
                        let mut runs: Vec<(u64, u64)> = Vec::new();
                        for s in sectors {
                            match runs.last_mut() {
                                Some((first, count)) if *first + *count == s => *count += 1,
                                _ => runs.push((s, 1)),
                            }
                        }
                        for (first, count) in runs {
                            bits.in_place.push(MetadataWrite {
                                offset: HostOffset(offset + (first - index * per) * 512),
                                bytes: b.bits.encode_sectors(first, count),
                            });
                        }
                    } else if b.bits.cluster_is_clear(index) {
                        if entry != 0 {
                            b.table[index as usize] = 0;
                            b.table_changed = true;
                        }
                    } else {
                        let c = self.allocate_metadata(1, MetadataKind::BitmapData)?;
                        bits.fresh.push(MetadataWrite {
                            offset: c,
                            bytes: b.bits.encode_cluster(index),
                        });
                        b.table[index as usize] = c.0;
                        b.table_changed = true;
                    }
                }
            }
            if b.table_fresh {
                out.fresh.push(MetadataWrite {
                    offset: HostOffset(b.table_offset),
                    bytes: encode_table(&b.table, cs),
                });
            } else if b.table_changed {
                out.in_place.push(MetadataWrite {
                    offset: HostOffset(b.table_offset),
                    bytes: encode_table(&b.table, cs),
                });
            }
            b.table_fresh = false;
            b.table_changed = false;
        }
        if st.directory_changed {
            self.move_directory(&mut st, &mut out)?;
        }
        if st.late_by_one {
            // Deliberately wrong (mutation): the bits miss the transaction
            // that holds the L2 changes they describe.
            std::mem::swap(&mut bits, &mut st.held_back);
        }
        out.fresh.append(&mut bits.fresh);
        out.in_place.append(&mut bits.in_place);
        Ok(out)
    }

    /// Writes the directory at a fresh place, points the header at it and
    /// frees the old one; without bitmaps, drops the extension and
    /// autoclear bit 0 (as QEMU does).
    fn move_directory(&self, st: &mut BitmapState, out: &mut BitmapWrites) -> Result<()> {
        let cs = self.geometry.cluster_size();
        let new_ext = if st.bitmaps.is_empty() {
            None
        } else {
            let bytes = encode_bitmap_directory(&st.directory_entries())?;
            let len = bytes.len() as u64;
            let clusters = len.div_ceil(cs);
            let offset = self.allocate_metadata(clusters, MetadataKind::BitmapDirectory)?;
            let mut padded = bytes;
            padded.resize((clusters * cs) as usize, 0);
            out.fresh.push(MetadataWrite {
                offset,
                bytes: padded,
            });
            Some(BitmapsExtension {
                nb_bitmaps: st.bitmaps.len() as u32,
                bitmap_directory_size: len,
                bitmap_directory_offset: offset.0,
            })
        };
        if let Some((old, len)) = st.directory.take() {
            self.free_metadata_run(HostOffset(old), len.div_ceil(cs))?;
        }
        st.directory = new_ext.map(|e| (e.bitmap_directory_offset, e.bitmap_directory_size));
        st.directory_changed = false;
        let mut h = self.header.lock();
        h.mem.set_bitmaps(new_ext);
        if new_ext.is_some() {
            h.mem.autoclear_features |= AUTOCLEAR_BITMAPS_MASK;
        } else {
            h.mem.autoclear_features &= !AUTOCLEAR_BITMAPS_MASK;
        }
        h.dirty = true;
        Ok(())
    }

    /// Allocates `clusters` contiguous clusters for bitmap metadata of
    /// `kind` and enters them in the guard's map.
    fn allocate_metadata(&self, clusters: u64, kind: MetadataKind) -> Result<HostOffset> {
        let at = self.allocate_metadata_run(clusters, kind)?;
        self.fresh_tables.fetch_add(clusters, Ordering::Relaxed);
        Ok(at)
    }

    /// Frees a run of bitmap metadata clusters starting at `offset`.
    fn free_metadata_run(&self, offset: HostOffset, clusters: u64) -> Result<()> {
        let first = self.geometry.host_cluster(offset);
        self.metadata.write().remove(first);
        let mut rc = self.refcounts.lock();
        for c in first.0..first.0 + clusters {
            rc.free_metadata(&*self.storage, &*self.backend, HostCluster(c))?;
        }
        Ok(())
    }

    /// On a clean close, before the last persist: the bitmaps' data goes
    /// to the disk with it.
    pub(super) fn begin_storing_bitmaps(&self) {
        self.bitmaps.lock().storing = true;
    }

    /// On a clean close, after the last persist made the bitmaps durable:
    /// flush ordering clears `in_use` in place (QEMU's store).
    pub(super) fn finish_storing_bitmaps(&self) -> Result<()> {
        let mut st = self.bitmaps.lock();
        if !st.maintained || !st.in_use_on_disk {
            return Ok(());
        }
        st.in_use_on_disk = false;
        self.write_directory_in_place(&st)?;
        self.counters.flush();
        self.storage
            .flush()
            .ctx(|| "flushing the bitmap directory".into())
    }

    /// The image's persistent bitmaps, as `qj info` lists them.
    pub fn bitmaps(&self) -> Vec<BitmapInfo> {
        let st = self.bitmaps.lock();
        let mut out: Vec<BitmapInfo> = st
            .bitmaps
            .iter()
            .map(|b| BitmapInfo {
                name: b.bits.name.clone(),
                granularity: b.bits.granularity_bytes(),
                flags: flag_names(b.bits.flags),
                dirty_bytes: Some(b.bits.dirty_bytes()),
            })
            .collect();
        out.extend(st.not_loaded.iter().cloned());
        out
    }

    /// Why the bitmaps are not maintained (or could not be read), if so.
    pub fn bitmap_problem(&self) -> Option<String> {
        self.bitmaps.lock().problem.clone()
    }

    /// The guest ranges whose bits are set in bitmap `name`, as
    /// `(offset, length)` runs.
    pub fn bitmap_dirty_ranges(&self, name: &str) -> Result<Vec<(u64, u64)>> {
        let mut st = self.bitmaps.lock();
        let i = st.find(name)?;
        Ok(st.bitmaps[i].bits.dirty_ranges())
    }

    /// Runs a bitmap operation under the exclusive gate, on a writable
    /// image whose bitmaps are maintained; durable after the next flush.
    fn bitmap_op<T>(&self, op: impl FnOnce(&mut BitmapState) -> Result<T>) -> Result<T> {
        self.check_writable()?;
        let _gate = self.gate.write();
        let mut st = self.bitmaps.lock();
        if !st.maintained {
            return Err(Error::Unsupported(format!(
                "the image's bitmaps are not maintained: {}",
                st.problem.as_deref().unwrap_or("unknown reason")
            )));
        }
        let _op = self.begin_op();
        op(&mut st)
    }

    /// Adds an empty bitmap (`qemu-img bitmap --add`): `granularity_bytes`
    /// per bit (a power of two from 512 bytes to 2 GiB), enabled (marked
    /// by writes) unless `disabled`.
    pub fn bitmap_add(&self, name: &str, granularity_bytes: u64, disabled: bool) -> Result<()> {
        if name.is_empty() || name.len() > BITMAP_NAME_LEN_MAX {
            return Err(Error::InvalidArgument(format!(
                "bitmap name must be 1 to {BITMAP_NAME_LEN_MAX} bytes"
            )));
        }
        let granularity_bits = granularity_bytes.trailing_zeros() as u8;
        if !granularity_bytes.is_power_of_two()
            || !(BITMAP_GRANULARITY_BITS_MIN..=BITMAP_GRANULARITY_BITS_MAX)
                .contains(&granularity_bits)
        {
            return Err(Error::InvalidArgument(format!(
                "granularity {granularity_bytes} must be a power of two from 512 bytes to 2 GiB"
            )));
        }
        let cs = self.geometry.cluster_size();
        let entries = bitmap_table_entries(self.virtual_size(), granularity_bits, cs);
        if entries > BITMAP_TABLE_ENTRIES_MAX {
            return Err(Error::InvalidArgument(format!(
                "granularity {granularity_bytes} is too fine for a disk of {} bytes",
                self.virtual_size()
            )));
        }
        self.bitmap_op(|st| {
            if st.bitmaps.iter().any(|b| b.bits.name == name) {
                return Err(Error::InvalidArgument(format!(
                    "a bitmap named {name:?} already exists"
                )));
            }
            if st.bitmaps.len() >= BITMAPS_MAX as usize {
                return Err(Error::InvalidArgument(format!(
                    "the image has {BITMAPS_MAX} bitmaps already"
                )));
            }
            let table_clusters = (entries * 8).div_ceil(cs).max(1);
            let table_offset = self.allocate_metadata(table_clusters, MetadataKind::BitmapTable)?;
            let flags = if disabled { 0 } else { BITMAP_FLAG_AUTO };
            st.bitmaps.push(StoredBitmap {
                bits: DirtyBitmap::new(
                    name.to_string(),
                    granularity_bits,
                    flags,
                    self.virtual_size(),
                    cs,
                ),
                table_offset: table_offset.0,
                table: vec![0; entries as usize],
                table_changed: false,
                table_fresh: true,
            });
            st.directory_changed = true;
            Ok(())
        })
    }

    /// Removes bitmap `name` and frees its clusters.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.find(name)?;
            let b = st.bitmaps.remove(i);
            let cs = self.geometry.cluster_size();
            for &entry in &b.table {
                let offset = entry & BITMAP_TABLE_ENTRY_OFFSET_MASK;
                if offset != 0 {
                    self.free_metadata_run(HostOffset(offset), 1)?;
                }
            }
            let table_clusters = (b.table.len() as u64 * 8).div_ceil(cs).max(1);
            self.free_metadata_run(HostOffset(b.table_offset), table_clusters)?;
            st.directory_changed = true;
            Ok(())
        })
    }

    /// Clears every bit of bitmap `name`.
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.find(name)?;
            st.bitmaps[i].bits.clear();
            Ok(())
        })
    }

    /// Enables (writes mark it) or disables bitmap `name`.
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.bitmap_op(|st| {
            let i = st.find(name)?;
            let flags = &mut st.bitmaps[i].bits.flags;
            let new = if enabled {
                *flags | BITMAP_FLAG_AUTO
            } else {
                *flags & !BITMAP_FLAG_AUTO
            };
            if new != *flags {
                *flags = new;
                st.directory_changed = true;
            }
            Ok(())
        })
    }

    /// Sets in bitmap `target` every bit set in bitmap `source`.
    pub fn bitmap_merge(&self, source: &str, target: &str) -> Result<()> {
        self.bitmap_op(|st| {
            let s = st.find(source)?;
            let t = st.find(target)?;
            if s != t {
                let src = st.bitmaps[s].bits.clone();
                st.bitmaps[t].bits.merge_from(&src);
            }
            Ok(())
        })
    }

    /// Refuses, before anything changes, a resize to `new_size` bytes the
    /// bitmaps cannot follow: a shrink (qj does not truncate bitmaps), or
    /// a grow past what a bitmap's table may cover.
    pub(super) fn refuse_resize_for_bitmaps(&self, new_size: u64) -> Result<()> {
        let st = self.bitmaps.lock();
        if !st.maintained || st.bitmaps.is_empty() {
            return Ok(());
        }
        if new_size < self.virtual_size() {
            return Err(Error::Unsupported(
                "shrinking an image with persistent bitmaps (remove them first with `qj bitmap --remove`)".into(),
            ));
        }
        let cs = self.geometry.cluster_size();
        for b in &st.bitmaps {
            if bitmap_table_entries(new_size, b.bits.granularity_bits, cs)
                > BITMAP_TABLE_ENTRIES_MAX
            {
                return Err(Error::InvalidArgument(format!(
                    "bitmap {:?} ({} bytes per bit) cannot cover {new_size} bytes",
                    b.bits.name,
                    b.bits.granularity_bytes()
                )));
            }
        }
        Ok(())
    }

    /// Extends every bitmap to a disk grown to `new_size` bytes (checked
    /// by [`Image::refuse_resize_for_bitmaps`]): a table that needs more
    /// clusters moves, in the same epoch as the header's new size. Caller
    /// holds the gate exclusively.
    pub(super) fn grow_bitmaps(&self, new_size: u64) -> Result<()> {
        let mut st = self.bitmaps.lock();
        if !st.maintained {
            return Ok(());
        }
        let cs = self.geometry.cluster_size();
        let table_clusters = |entries: u64| (entries * 8).div_ceil(cs).max(1);
        let mut directory_changed = false;
        for b in st.bitmaps.iter_mut() {
            b.bits.grow(new_size);
            let entries = bitmap_table_entries(new_size, b.bits.granularity_bits, cs);
            let old_entries = b.table.len() as u64;
            if entries <= old_entries {
                continue;
            }
            b.table.resize(entries as usize, 0);
            directory_changed = true;
            if table_clusters(entries) > table_clusters(old_entries) {
                let moved =
                    self.allocate_metadata(table_clusters(entries), MetadataKind::BitmapTable)?;
                self.free_metadata_run(HostOffset(b.table_offset), table_clusters(old_entries))?;
                b.table_offset = moved.0;
                b.table_fresh = true;
            } else {
                b.table_changed = true;
            }
        }
        st.directory_changed |= directory_changed;
        Ok(())
    }
}
