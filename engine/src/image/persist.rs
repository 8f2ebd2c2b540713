//! Flush: gathering every metadata change into an epoch, handing it to the
//! backend, and write-back when a cache needs room.

use qj_spec::qcow2::write_table_entry;
use qj_spec::units::HostOffset;

use super::Image;
use crate::backend::{Epoch, MetadataWrite};
use crate::cache::WritebackPins;
use crate::error::{Error, Result};
use crate::sync::Ordering;

impl Image {
    /// Labels this point in the image file's write log, if it has one
    /// (`OpenOptions::log_writes`): a replay tool can stop here.
    pub fn mark(&self, label: &str) {
        self.storage.mark(format_args!("{label}"));
    }

    /// Makes every write that completed before this call durable.
    ///
    /// Concurrent flushes share work: a flush whose operations were all
    /// covered by a persist that started after them returns at once, so N
    /// threads flushing together cost one persist (group commit), on both
    /// backends.
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        if let Some(why) = self.poison.lock().clone() {
            return Err(Error::Poisoned(why));
        }
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        // Every operation that completed before this call has a generation
        // up to `wanted` (persist returns at once if they are durable).
        let wanted = self.done_gen.load(Ordering::SeqCst);
        let r = self.persist(Some(wanted));
        self.poisoned(r)
    }

    /// With `covering`: `Some` when this persist needs no epoch of its own:
    /// `Ok(None)` when its operations are durable already, `Ok(Some(ticket))`
    /// for a flush-only ticket to wait for.
    fn covered_without_epoch(&self, covering: Option<u64>) -> Option<Result<Option<u64>>> {
        let wanted = covering?;
        if self.flushed_gen.load(Ordering::SeqCst) >= wanted {
            return Some(Ok(None));
        }
        if self.submitted_gen.load(Ordering::SeqCst) < wanted {
            return None;
        }
        Some(self.submit_flush_only(wanted)?.map(Some))
    }

    /// Waits for what [`Self::covered_without_epoch`] returned.
    fn wait_covered(&self, covered: Result<Option<u64>>) -> Result<()> {
        match covered? {
            None => Ok(()),
            Some(ticket) => self
                .backend
                .wait_durable(&*self.storage, ticket, &self.counters),
        }
    }

    /// For a flush whose operations an epoch already handed to the backend
    /// holds (another thread's persist gathered them): a ticket that needs
    /// no epoch of its own, so the flush does not take the gate, which
    /// would wait for every guest write in flight (an `O_DIRECT` data write
    /// each, with 8 NBD connections) and stop new ones. `None` if it must
    /// gather after all.
    ///
    /// Ordering: the backend's flush-only ticket is durable only after
    /// every epoch submitted before it. It is taken under `submit_order`,
    /// and `submitted_gen` is raised under that lock only after the submit
    /// of the epoch it names, so that epoch is ahead of the ticket. Caught
    /// when broken: the loom model `journal_flush_makes_completed_writes_durable`
    /// (the raise moved before the submit, or the ticket not waited for)
    /// and `engine/tests/flush_waits_for_commit.rs` (the latter).
    fn submit_flush_only(&self, wanted: u64) -> Option<Result<u64>> {
        let order = self.submit_order.lock();
        if let Some(why) = self.poison.lock().clone() {
            return Some(Err(Error::Poisoned(why)));
        }
        debug_assert!(self.submitted_gen.load(Ordering::SeqCst) >= wanted);
        let submitted = self.backend.flush_only()?;
        if let Err(e) = &submitted {
            // As a failed submit: no later epoch may be acknowledged.
            self.poison.lock().get_or_insert_with(|| e.to_string());
        }
        drop(order);
        Some(submitted)
    }

    /// One persist: gathers the epoch under the exclusive gate (so it holds
    /// whole operations only), submits it, then waits for durability
    /// without the gate (so a journal can batch other threads' epochs into
    /// the same commit), and finally applies the epoch's frees. With
    /// `covering`, returns early if another persist already made every
    /// operation up to that generation durable.
    pub(super) fn persist(&self, covering: Option<u64>) -> Result<()> {
        // Checked before and after waiting to gather: the gatherer ahead
        // may have taken this flush's operations. The wait is without
        // `gather_order`: held across it, the flushers behind could not
        // gather while this one's batch flushed, and their epochs missed
        // the next batch (8 connections in writeback went from 0.13 to
        // 0.23 flushes per op, and from 1.3x to 0.7x raw).
        if let Some(covered) = self.covered_without_epoch(covering) {
            return self.wait_covered(covered);
        }
        let gathering = self.gather_order.lock();
        if let Some(covered) = self.covered_without_epoch(covering) {
            drop(gathering);
            return self.wait_covered(covered);
        }
        let gate = self.gate.write();
        let started_gen = self.op_gen.load(Ordering::SeqCst);
        // A failed gather has taken part of the epoch: poisoned before the
        // gate is released, or a later persist would acknowledge without it.
        let gathered = self
            .dedup_persist_after_checkpoint()
            .and_then(|()| self.gather_epoch());
        let (epoch, pins) = match gathered {
            Ok(gathered) => gathered,
            Err(e) => {
                self.poison.lock().get_or_insert_with(|| e.to_string());
                drop(gate);
                return Err(e);
            }
        };
        let releases = self.refcounts.lock().take_releases();
        let dedup_epoch = self.dedup_epoch_gathered();
        // Epochs reach the backend in the order they were gathered (a later
        // epoch's entries may depend on an earlier epoch's counts), but the
        // gate is released first: guest operations go on while this epoch
        // is written and flushed, and gather the next one.
        let order = self.submit_order.lock();
        // Ordering: a later persist's Ok promises this epoch durable too
        // (its writes' metadata may be in this epoch). A failed submit
        // poisons the image before the order lock is released, and each
        // submit checks the poison under it, so no later epoch is
        // acknowledged after a failed one. (A failure seen only in
        // `wait_durable` is the backend's to order: see the journal's.)
        if let Some(why) = self.poison.lock().clone() {
            return Err(Error::Poisoned(why));
        }
        let submitted = if self.backend.submits_under_gate() {
            let submitted = self.backend.submit(&*self.storage, epoch, &self.counters);
            drop(gate);
            drop(gathering);
            submitted
        } else {
            drop(gate);
            drop(gathering);
            self.backend.submit(&*self.storage, epoch, &self.counters)
        };
        let ticket = match submitted {
            Ok(ticket) => ticket,
            Err(e) => {
                self.poison.lock().get_or_insert_with(|| e.to_string());
                // Released first: marking an image corrupt takes it.
                drop(order);
                return self.poisoned(Err(e));
            }
        };
        // After the submit, under the order: see `submit_flush_only`.
        self.submitted_gen.fetch_max(started_gen, Ordering::SeqCst);
        drop(order);
        self.backend
            .wait_durable(&*self.storage, ticket, &self.counters)?;
        // Ordering: the tables of the epoch stay pinned in their caches
        // until the backend has their bytes. They are clean since
        // `gather_epoch`; evicted before now, a lookup (a reader, or a
        // writer once the gate is free) would reload the old bytes from disk
        // and the change would be lost (loom model
        // `table_being_written_back_is_not_lost`).
        drop(pins);
        self.refcounts.lock().after_durable(
            &*self.storage,
            &*self.backend,
            &self.counters,
            releases,
        )?;
        self.dedup_epoch_durable(dedup_epoch);
        self.flushed_gen.fetch_max(started_gen, Ordering::SeqCst);
        Ok(())
    }

    /// Persists until nothing is pending: the first persist may apply
    /// deferred decrements that only a second one writes. Bounded: the
    /// second frees nothing, so a third finds nothing to do.
    pub(super) fn persist_all(&self) -> Result<()> {
        for _ in 0..3 {
            self.persist(None)?;
            if !self.refcounts.lock().has_pending() {
                break;
            }
        }
        Ok(())
    }

    /// Gathers every metadata change into an epoch, with the pins that keep
    /// the tables taken from being evicted until the backend has them.
    fn gather_epoch(&self) -> Result<(Epoch, WritebackPins)> {
        self.fresh_tables.store(0, Ordering::Relaxed);
        self.entries_changed.store(0, Ordering::Relaxed);
        let mut epoch = Epoch::default();
        let mut pins = WritebackPins::default();
        // First: what the bitmaps allocate counts in this epoch's refcounts.
        let bitmap_writes = self.gather_bitmap_writes()?;
        let moved_refcount_table = self.refcounts.lock().take_epoch(
            &mut epoch.fresh_refcount,
            &mut epoch.refcount_links,
            &mut epoch.refcount_blocks,
            &mut epoch.freed_metadata,
            &mut pins,
        );
        pins.append(self.l2_cache.take_writebacks(|offset, fresh, bytes| {
            let w = MetadataWrite { offset, bytes };
            if fresh {
                epoch.fresh_tables.push(w);
            } else {
                epoch.tables.push(w);
            }
        }));
        epoch.fresh_tables.append(&mut self.fresh_metadata.lock());
        epoch.fresh_tables.extend(bitmap_writes.fresh);
        epoch.tables.extend(bitmap_writes.in_place);
        let cs = self.geometry.cluster_size() as usize;
        let mut l1 = self.l1.write();
        let encode_l1 = |entries: &[u64], c: u64| {
            let mut bytes = vec![0u8; cs];
            let per = cs / 8;
            let start = c as usize * per;
            for (j, &e) in entries.iter().skip(start).take(per).enumerate() {
                write_table_entry(&mut bytes, j, e);
            }
            bytes
        };
        if l1.fresh {
            let clusters = self
                .geometry
                .clusters_for(l1.entries.len() as u64 * 8)
                .max(1);
            for c in 0..clusters {
                epoch.fresh_tables.push(MetadataWrite {
                    offset: HostOffset(l1.offset.0 + c * cs as u64),
                    bytes: encode_l1(&l1.entries, c),
                });
            }
            l1.fresh = false;
            l1.dirty_clusters.clear();
        }
        for c in std::mem::take(&mut l1.dirty_clusters) {
            epoch.tables.push(MetadataWrite {
                offset: HostOffset(l1.offset.0 + c * cs as u64),
                bytes: encode_l1(&l1.entries, c),
            });
        }
        drop(l1);
        let mut h = self.header.lock();
        if let Some((offset, clusters)) = moved_refcount_table {
            // The switch to the new refcount table is a header write of its
            // own, carrying only the refcount fields: the rest of the header
            // (a new L1 table, say) must wait for its own dependencies.
            let mut link = h.disk.clone();
            link.refcount_table_offset = offset.0;
            link.refcount_table_clusters = clusters as u32;
            h.mem.refcount_table_offset = offset.0;
            h.mem.refcount_table_clusters = clusters as u32;
            let old = h.disk.encode()?;
            epoch
                .refcount_links
                .push(header_write(&old, &link.encode()?));
            h.disk = link;
        }
        if h.dirty {
            let old = h.disk.encode()?;
            epoch.tables.push(header_write(&old, &h.mem.encode()?));
            h.disk = h.mem.clone();
            h.dirty = false;
        }
        drop(h);
        epoch.new_data = self.new_data.lock().take(&self.new_data_held);
        epoch.dedup = self.take_dedup_changes();
        Ok((epoch, pins))
    }

    pub(super) fn maybe_evict(&self) -> Result<()> {
        if let Some(max) = self.backend.epoch_bytes_max() {
            // Bound the epoch so its transaction fits the journal. Each
            // changed L2 entry dirties at most an L2 and a refcount sector
            // (budget 3 sectors with descriptor overhead); fresh tables
            // count whole. Overwrites in place change no entry and count
            // nothing (counting them forced needless persists, and flushes,
            // every ~2,700 overwrites).
            let fresh =
                self.fresh_tables.load(Ordering::Relaxed) + self.refcounts.lock().fresh_clusters;
            let entries = self.entries_changed.load(Ordering::Relaxed);
            let bitmap_bytes = self.bitmaps.lock().changed_bytes();
            let estimate = fresh * self.geometry.cluster_size() + entries * 1536 + bitmap_bytes;
            if estimate > max && self.writable {
                let r = self.persist(None);
                self.poisoned(r)?;
            }
        }
        if !self.l2_cache.over_capacity() && !self.refcounts.lock().blocks.over_capacity() {
            return Ok(());
        }
        let evict = || {
            // A table handed to a submit still in progress is clean in the
            // cache but not yet on disk: evicting it now would let a reload
            // read the old bytes. Holding the submit order lock means no
            // submit is in progress.
            let _order = self.submit_order.lock();
            let l2_ok = self.l2_cache.evict();
            let rc_ok = self.refcounts.lock().blocks.evict();
            l2_ok && rc_ok
        };
        if !evict() && self.writable {
            // Only dirty tables are left: write them back, then evict.
            let r = self.persist(None);
            self.poisoned(r)?;
            evict();
        }
        Ok(())
    }
}

/// A header write covering only the sectors that changed: the fields a
/// persist changes all sit in the first sector, so the write is one sector
/// and a torn write cannot mix old and new header fields.
fn header_write(old: &[u8], new: &[u8]) -> MetadataWrite {
    const SECTOR: usize = 512;
    let len = old.len().max(new.len()).next_multiple_of(SECTOR);
    let byte = |b: &[u8], i: usize| b.get(i).copied().unwrap_or(0);
    let differs = |s: usize| (s..s + SECTOR).any(|i| byte(old, i) != byte(new, i));
    let first = (0..len).step_by(SECTOR).find(|&s| differs(s)).unwrap_or(0);
    let last = (0..len)
        .step_by(SECTOR)
        .rev()
        .find(|&s| differs(s))
        .unwrap_or(0)
        + SECTOR;
    let bytes = (first..last).map(|i| byte(new, i)).collect();
    MetadataWrite {
        offset: HostOffset(first as u64),
        bytes,
    }
}
