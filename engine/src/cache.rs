//! A bounded cache of cluster-sized metadata tables (L2 tables and refcount
//! blocks), with one lock per table.
//!
//! Why this shape (the seed thread 003 shows how easy it is to get wrong):
//! - Lookups of the same table from many threads load it once: the first
//!   thread to find an entry unloaded loads it while holding the entry's
//!   `load` mutex; the others block on that mutex and then see it loaded.
//!   The map lock is never held across I/O.
//! - An entry is visible to readers of its bytes only once fully loaded:
//!   `loaded` is set under the `load` mutex after the bytes are in place.
//! - A dirty entry is never evicted: only the flush path ([`crate::image`])
//!   makes entries clean, and eviction skips dirty entries and entries that
//!   someone still holds (`Arc::strong_count > 1`).
//! - A table whose write-back was taken stays pinned ([`WritebackPins`])
//!   until the backend has its bytes: it is clean in the cache but not yet
//!   on disk, and evicting it would let a lookup reload the old bytes, so
//!   the change would be lost for good.
//! - A table that was just allocated (`fresh`) is referenced by nothing on
//!   disk yet; backends order its write before the write that links it.

use std::collections::HashMap;

use qj_spec::units::HostOffset;

use crate::error::Result;
use crate::sync::{Arc, AtomicBool, AtomicU64, Mutex, Ordering, RwLock};

/// Write-back granularity: a table is written back in runs of changed
/// 512-byte sectors, the unit a device writes atomically in our crash
/// model. Both backends use the same granularity, so their byte counts
/// compare fairly.
pub const SECTOR_BYTES: usize = 512;

/// The bytes of one cached table and its write-back state.
#[derive(Debug)]
pub struct TableData {
    /// The table, exactly one cluster long.
    pub bytes: Vec<u8>,
    /// Changed in memory since it was last handed to a backend.
    pub dirty: bool,
    /// Allocated in this epoch: no on-disk structure points to it yet.
    pub fresh: bool,
    /// One bit per 512-byte sector changed since the last write-back.
    dirty_sectors: Vec<u64>,
}

impl TableData {
    fn new(cluster_size: usize) -> Self {
        Self {
            bytes: vec![0; cluster_size],
            dirty: false,
            fresh: false,
            dirty_sectors: vec![0; (cluster_size / SECTOR_BYTES).div_ceil(64)],
        }
    }

    /// Records that `len` bytes at `offset` changed.
    pub fn mark_dirty(&mut self, offset: usize, len: usize) {
        assert!(
            offset + len <= self.bytes.len(),
            "dirty range past the table"
        );
        if len == 0 {
            return;
        }
        for sector in offset / SECTOR_BYTES..=(offset + len - 1) / SECTOR_BYTES {
            self.dirty_sectors[sector / 64] |= 1 << (sector % 64);
        }
        self.dirty = true;
    }

    /// Writes big-endian 64-bit entry `index` and marks it dirty.
    pub fn set_entry(&mut self, index: usize, value: u64) {
        qj_spec::qcow2::write_table_entry(&mut self.bytes, index, value);
        self.mark_dirty(index * 8, 8);
    }

    /// Takes the write-back of this table: the whole table when it is fresh,
    /// else each run of changed sectors as (offset in table, bytes). Leaves
    /// the table clean.
    pub fn take_writeback(&mut self) -> Vec<(usize, Vec<u8>)> {
        let sectors = self.bytes.len() / SECTOR_BYTES;
        let runs = if self.fresh {
            vec![(0, self.bytes.clone())]
        } else {
            let is_dirty = |s: usize| self.dirty_sectors[s / 64] & (1 << (s % 64)) != 0;
            let mut runs = Vec::new();
            let mut s = 0;
            while s < sectors {
                if !is_dirty(s) {
                    s += 1;
                    continue;
                }
                let start = s;
                while s < sectors && is_dirty(s) {
                    s += 1;
                }
                let (a, b) = (start * SECTOR_BYTES, s * SECTOR_BYTES);
                runs.push((a, self.bytes[a..b].to_vec()));
            }
            runs
        };
        self.dirty = false;
        self.fresh = false;
        self.dirty_sectors.fill(0);
        runs
    }
}

/// One cached table.
#[derive(Debug)]
pub struct CachedTable {
    /// Where the table lives in the image file.
    pub offset: HostOffset,
    /// The table's bytes; lock order: after the image's L1 lock, before the
    /// refcount state.
    pub data: RwLock<TableData>,
    load: Mutex<()>,
    loaded: AtomicBool,
    last_use: AtomicU64,
}

impl CachedTable {
    fn new(offset: HostOffset, cluster_size: usize) -> Self {
        Self {
            offset,
            data: RwLock::new(TableData::new(cluster_size)),
            load: Mutex::new(()),
            loaded: AtomicBool::new(false),
            last_use: AtomicU64::new(0),
        }
    }
}

/// The map's hasher. Under loom it must be deterministic: eviction and
/// write-back visit entries in map order, taking a lock on each, and loom
/// replays a schedule only if every execution takes the same steps.
#[cfg(not(loom))]
type MapHasher = std::collections::hash_map::RandomState;
#[cfg(loom)]
type MapHasher = std::hash::BuildHasherDefault<std::collections::hash_map::DefaultHasher>;

/// Tables whose write-back was taken by [`TableCache::take_writebacks`] and
/// may not have reached the backend yet. While pinned, a table cannot be
/// evicted: it is clean in the cache but its bytes are not on disk, so a
/// reload would read the old bytes and the change would be lost.
#[derive(Debug, Default)]
#[must_use = "hold the pins until the backend has the write-back, then drop them"]
pub struct WritebackPins {
    tables: Vec<Arc<CachedTable>>,
}

impl WritebackPins {
    /// Adds `other`'s pins to these.
    pub fn append(&mut self, mut other: WritebackPins) {
        self.tables.append(&mut other.tables);
    }

    /// Number of pinned tables.
    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// A bounded map from host offset to cached table.
#[derive(Debug)]
pub struct TableCache {
    name: &'static str,
    cluster_size: usize,
    tables_max: usize,
    map: Mutex<HashMap<HostOffset, Arc<CachedTable>, MapHasher>>,
    clock: AtomicU64,
}

impl TableCache {
    /// A cache of `tables_max` tables (at least 4) of `cluster_size` bytes.
    pub fn new(name: &'static str, cluster_size: usize, tables_max: usize) -> Self {
        Self {
            name,
            cluster_size,
            tables_max: tables_max.max(4),
            map: Mutex::new(HashMap::default()),
            clock: AtomicU64::new(0),
        }
    }

    /// The cache's name, for diagnostics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The table at `offset`, loading it with `load` on a miss. Concurrent
    /// callers for the same offset share one load.
    pub fn get(
        &self,
        offset: HostOffset,
        load: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Arc<CachedTable>> {
        let entry = {
            let mut map = self.map.lock();
            map.entry(offset)
                .or_insert_with(|| Arc::new(CachedTable::new(offset, self.cluster_size)))
                .clone()
        };
        entry.last_use.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if !entry.loaded.load(Ordering::Acquire) {
            let _loading = entry.load.lock();
            // Checked again under the load lock: whoever held it may have
            // loaded the table meanwhile, and a table is loaded once.
            if !entry.loaded.load(Ordering::Acquire) {
                let mut data = entry.data.write();
                // A failed load leaves the entry in the map, unloaded: the
                // next caller (or one already waiting on the load lock)
                // retries into the entry the cache keeps. Removing it would
                // hand a caller already holding it an entry the cache no
                // longer has, whose changes would never be written back (the
                // loom model `failed_load_leaves_no_orphan_entry` found it).
                load(&mut data.bytes)?;
                drop(data);
                // Published only now, after the bytes are in place: a caller
                // that sees `loaded` reads the table without the load lock.
                entry.loaded.store(true, Ordering::Release);
            }
        }
        Ok(entry)
    }

    /// Inserts a table just allocated at `offset` with the given content,
    /// marked dirty and fresh. Replaces any stale entry for that offset
    /// (a freed table whose cluster is being reused).
    pub fn insert_fresh(&self, offset: HostOffset, bytes: Vec<u8>) -> Arc<CachedTable> {
        assert_eq!(bytes.len(), self.cluster_size, "{}: table size", self.name);
        let entry = Arc::new(CachedTable::new(offset, self.cluster_size));
        {
            let mut data = entry.data.write();
            data.bytes = bytes;
            data.fresh = true;
            let len = data.bytes.len();
            data.mark_dirty(0, len);
        }
        entry.loaded.store(true, Ordering::Release);
        entry.last_use.store(
            self.clock.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        self.map.lock().insert(offset, entry.clone());
        entry
    }

    /// Drops the entry for `offset` whatever its state: the cluster was freed
    /// and its content no longer matters.
    pub fn forget(&self, offset: HostOffset) {
        self.map.lock().remove(&offset);
    }

    /// Every entry that is dirty, sorted by offset (so write-back is sequential).
    pub fn dirty_entries(&self) -> Vec<Arc<CachedTable>> {
        let map = self.map.lock();
        let mut dirty: Vec<_> = map
            .values()
            .filter(|e| e.data.read().dirty)
            .cloned()
            .collect();
        dirty.sort_by_key(|e| e.offset);
        dirty
    }

    /// Takes the write-back of every dirty table, in offset order: calls
    /// `emit(file offset, the table is fresh, bytes)` for each run of changed
    /// sectors ([`TableData::take_writeback`]) and leaves the table clean.
    /// The tables stay pinned against eviction until the returned pins are
    /// dropped, which the caller does only once the backend has the bytes
    /// (its `read_metadata` returns them).
    pub fn take_writebacks(
        &self,
        mut emit: impl FnMut(HostOffset, bool, Vec<u8>),
    ) -> WritebackPins {
        let tables = self.dirty_entries();
        for table in &tables {
            // The runs are taken and the table made clean under one write
            // lock: a change made after it stays dirty for the next
            // write-back, and none is written half.
            let mut data = table.data.write();
            let fresh = data.fresh;
            for (at, bytes) in data.take_writeback() {
                emit(HostOffset(table.offset.0 + at as u64), fresh, bytes);
            }
        }
        WritebackPins { tables }
    }

    /// Number of dirty entries.
    pub fn dirty_count(&self) -> usize {
        self.map
            .lock()
            .values()
            .filter(|e| e.data.read().dirty)
            .count()
    }

    /// Whether the cache holds more tables than its bound.
    pub fn over_capacity(&self) -> bool {
        self.map.lock().len() > self.tables_max
    }

    /// Evicts clean, unused entries, least recently used first, until the
    /// cache is within its bound. Returns whether it is within bound (false:
    /// only dirty or busy entries are left, and the caller should flush).
    pub fn evict(&self) -> bool {
        let mut map = self.map.lock();
        if map.len() <= self.tables_max {
            return true;
        }
        let mut candidates: Vec<(u64, HostOffset)> = map
            .values()
            // Busy: someone holds the Arc besides the map (a caller, or the
            // pins of a write-back in flight). Dirty: must be written first.
            .filter(|e| Arc::strong_count(e) == 1 && !e.data.read().dirty)
            .map(|e| (e.last_use.load(Ordering::Relaxed), e.offset))
            .collect();
        candidates.sort_unstable();
        let excess = map.len() - self.tables_max;
        for (_, offset) in candidates.into_iter().take(excess) {
            map.remove(&offset);
        }
        map.len() <= self.tables_max
    }

    /// Number of cached tables.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The largest number of tables kept.
    pub fn tables_max(&self) -> usize {
        self.tables_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn concurrent_lookups_load_once() {
        let cache = Arc::new(TableCache::new("t", 512, 8));
        let loads = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let cache = cache.clone();
                let loads = loads.clone();
                std::thread::spawn(move || {
                    let e = cache
                        .get(HostOffset(4096), |b| {
                            loads.fetch_add(1, Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(5));
                            b.fill(7);
                            Ok(())
                        })
                        .unwrap();
                    assert!(
                        e.data.read().bytes.iter().all(|&b| b == 7),
                        "saw a half-loaded table"
                    );
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn eviction_keeps_dirty_and_busy_entries() {
        let cache = TableCache::new("t", 512, 4);
        let held = cache.get(HostOffset(0), |_| Ok(())).unwrap();
        cache.insert_fresh(HostOffset(512), vec![1; 512]);
        for i in 2..10u64 {
            cache.get(HostOffset(i * 512), |_| Ok(())).unwrap();
        }
        assert!(cache.evict());
        assert_eq!(cache.len(), 4);
        let map = cache.map.lock();
        assert!(map.contains_key(&HostOffset(0)), "busy entry evicted");
        assert!(map.contains_key(&HostOffset(512)), "dirty entry evicted");
        drop(map);
        drop(held);
    }

    #[test]
    fn tables_taken_for_write_back_stay_until_unpinned() {
        let cache = TableCache::new("t", 512, 4);
        // Table 0 is dirty and the least recently used.
        cache
            .get(HostOffset(0), |_| Ok(()))
            .unwrap()
            .data
            .write()
            .set_entry(3, 7);
        for i in 1..4u64 {
            cache.get(HostOffset(i * 512), |_| Ok(())).unwrap();
        }
        let mut runs = Vec::new();
        let pins = cache.take_writebacks(|offset, fresh, bytes| {
            runs.push((offset, fresh, bytes.len()));
        });
        assert_eq!(runs, [(HostOffset(0), false, 512)]);
        assert_eq!(pins.len(), 1);
        assert_eq!(cache.dirty_count(), 0);
        cache.get(HostOffset(4 * 512), |_| Ok(())).unwrap();
        assert!(cache.evict());
        assert!(
            cache.map.lock().contains_key(&HostOffset(0)),
            "a table was evicted before its write-back reached the backend"
        );
        drop(pins);
        cache.get(HostOffset(5 * 512), |_| Ok(())).unwrap();
        assert!(cache.evict());
        assert!(
            !cache.map.lock().contains_key(&HostOffset(0)),
            "an unpinned clean table is evicted least recently used first"
        );
    }

    #[test]
    fn writeback_takes_changed_sectors_only() {
        let cache = TableCache::new("t", 4096, 4);
        let e = cache.get(HostOffset(0), |_| Ok(())).unwrap();
        let mut d = e.data.write();
        d.set_entry(0, 1);
        d.set_entry(64, 2); // byte 512: sector 1
        d.set_entry(511, 3); // byte 4088: sector 7
        let runs = d.take_writeback();
        assert_eq!(
            runs.iter().map(|(o, b)| (*o, b.len())).collect::<Vec<_>>(),
            [(0, 1024), (3584, 512)]
        );
        assert!(!d.dirty);
        assert!(d.take_writeback().is_empty());
    }

    #[test]
    fn failed_load_is_retried() {
        let cache = TableCache::new("t", 512, 4);
        let err = cache.get(HostOffset(0), |_| Err(crate::error::Error::ReadOnly));
        assert!(err.is_err());
        let e = cache.get(HostOffset(0), |b| {
            b.fill(3);
            Ok(())
        });
        assert_eq!(e.unwrap().data.read().bytes[0], 3);
    }
}
