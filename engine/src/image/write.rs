//! Guest writes, write zeroes and discard: allocation, copy-on-write, and
//! the release of whatever an entry pointed to before.

use qj_spec::qcow2::{L1Entry, L2Entry};
use qj_spec::units::{GuestCluster, HostCluster, HostOffset};

use super::Image;
use crate::backend::{DelayedCopy, NewData};
use crate::cache::CachedTable;
use crate::error::{Error, IoContext, Result};
use crate::metadata_map::MetadataKind;
use crate::sync::{Arc as SyncArc, Ordering};

impl Image {
    /// Writes guest bytes at `offset`. Durable after the next [`Image::flush`].
    pub fn write(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_unsynced(buf, offset)?;
        self.sync_if_writethrough()
    }

    /// [`Image::write`] without the writethrough flush.
    fn write_unsynced(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        self.mark_bitmaps(offset, buf.len() as u64)?;
        for (cluster, in_cluster, n, at) in self.pieces(offset, buf.len() as u64) {
            let _gate = self.gate.read();
            let _op = self.begin_op();
            let r = self.write_piece(cluster, in_cluster, &buf[at..at + n]);
            self.poisoned(r)?;
        }
        self.maybe_evict()
    }

    /// The L2 table mapping `cluster`, created (or copied, when shared with
    /// a snapshot) so that this image owns it. Caller holds the gate.
    pub(super) fn owned_l2(&self, cluster: GuestCluster) -> Result<SyncArc<CachedTable>> {
        let entry = self.l1_entry(cluster)?;
        if let (Some(o), true) = (entry.l2_offset(), entry.is_copied()) {
            return self.load_l2(o);
        }
        let index = self.geometry.l1_index(cluster) as usize;
        let mut l1 = self.l1.write();
        let Some(&raw) = l1.entries.get(index) else {
            return Err(Error::Corrupt(format!(
                "guest cluster {} is past the L1 table ({} entries)",
                cluster.0,
                l1.entries.len()
            )));
        };
        let entry = L1Entry(raw);
        if let (Some(o), true) = (entry.l2_offset(), entry.is_copied()) {
            // Another writer linked it while we waited for the lock.
            return self.load_l2(o);
        }
        let cs = self.geometry.cluster_size() as usize;
        let bytes = match entry.l2_offset() {
            None => vec![0u8; cs],
            // Shared with a snapshot: copy it. The data clusters it maps keep
            // their counts (each is referenced by the old and the new table).
            Some(old) => self.load_l2(old)?.data.read().bytes.clone(),
        };
        let new = {
            let mut rc = self.refcounts.lock();
            let new = rc.allocate(&*self.storage, &*self.backend, &self.counters)?;
            if let Some(old) = entry.l2_offset() {
                rc.free_metadata(
                    &*self.storage,
                    &*self.backend,
                    self.geometry.host_cluster(old),
                )?;
            }
            new
        };
        {
            let mut map = self.metadata.write();
            if let Some(old) = entry.l2_offset() {
                map.remove(self.geometry.host_cluster(old));
            }
            map.insert(new, 1, MetadataKind::L2Table)
                .map_err(|o| Error::Corrupt(format!("new L2 table overlaps the {}", o.existing)))?;
        }
        let offset = self.geometry.host_offset(new);
        self.fresh_tables.fetch_add(1, Ordering::Relaxed);
        let table = self.l2_cache.insert_fresh(offset, bytes);
        l1.entries[index] = L1Entry::new(offset, true).0;
        if !l1.fresh {
            let c = index as u64 * 8 / self.geometry.cluster_size();
            l1.dirty_clusters.insert(c);
        }
        Ok(table)
    }

    /// Writes `data` at byte `in_cluster` of guest cluster `cluster`.
    /// Caller holds the gate (shared or exclusive): an in-place overwrite
    /// relies on it, not on the L2 table's lock, to keep its cluster.
    pub(super) fn write_piece(
        &self,
        cluster: GuestCluster,
        in_cluster: usize,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let whole = in_cluster == 0 && data.len() == cs;
        // Deduplication (`dedup.rs`): a whole cluster may map to an indexed
        // cluster with the same bytes; else it is written, and indexed
        // under `index_as`.
        let index_as = match whole && self.dedups() {
            true => match self.dedup_write(cluster, data)? {
                super::dedup::DedupWrite::Done => return Ok(()),
                super::dedup::DedupWrite::Write(hash) => hash,
            },
            false => None,
        };
        let table = self.owned_l2(cluster)?;
        let index = self.geometry.l2_index(cluster) as usize;
        if index_as.is_none() {
            // Fast path: an allocated cluster this image owns is overwritten
            // in place; no metadata changes. Not for a cluster to index:
            // that is decided under the table's write lock, so that no
            // concurrent write changes the bytes the hash describes.
            let t = table.data.read();
            if let L2Entry::Normal {
                offset,
                copied: true,
            } = self.l2_entry(&t.bytes, cluster)?
            {
                if !self.dedup_no_in_place(offset) {
                    // The table is let go before the device write: held,
                    // every allocating write into the clusters it maps
                    // (8 NBD connections share the two L2 tables of a
                    // 1 GiB image) waited for this write's device time.
                    // The gate is what keeps the cluster this write's:
                    // a cluster released by a concurrent discard is reused
                    // only after a gather under the exclusive gate, which
                    // waits for this write; and its new-data records and
                    // the journal's guards are taken under the gate too.
                    // An entry changed meanwhile (discard, zeroing) is a
                    // concurrent request on the same range, which no
                    // protocol orders. Deduplication keeps the table: a
                    // cluster is hashed for the index under its write
                    // lock, and no write may change the bytes meanwhile.
                    if !self.dedups() {
                        drop(t);
                    }
                    return self.write_data(data, offset.0 + in_cluster as u64);
                }
            }
        }
        let mut t = table.data.write();
        let old = self.l2_entry(&t.bytes, cluster)?;
        if let L2Entry::Normal {
            offset,
            copied: true,
        } = old
        {
            // An indexed cluster keeps the bytes its hash describes, and a
            // cluster unshared in an epoch not yet durable keeps the bytes
            // its other mapping may still have after a crash: each is
            // copied on write like a shared one (`dedup.rs`).
            if !self.dedup_no_in_place(offset) {
                self.write_data(data, offset.0 + in_cluster as u64)?;
                if let Some(hash) = index_as {
                    // Once indexed, other guest clusters may map these
                    // bytes, and an in-place write is ordered before
                    // nothing: the transaction that carries the insertion
                    // must checksum them like a new cluster's (a journal
                    // drops it, and everything after, if they never
                    // reached the device). Else a link committed by it or
                    // a later one would map the cluster's old bytes.
                    let written = HostOffset(offset.0 + in_cluster as u64);
                    self.record_new_data(written, data.len() as u64, Some(data));
                    self.dedup_insert(offset, hash, cluster);
                }
                return Ok(());
            }
        }
        self.guard_release(old)?;
        let new = self
            .refcounts
            .lock()
            .allocate(&*self.storage, &*self.backend, &self.counters)?;
        let host = self.geometry.host_offset(new);
        let old_reads_zero = match old {
            L2Entry::Zero { .. } => true,
            L2Entry::Unallocated => self.backing.is_none(),
            _ => false,
        };
        let past_eof = host.0
            >= self
                .storage
                .len()
                .ctx(|| "reading the image length".into())?;
        // The bytes of the new cluster that this write puts on the disk:
        // what a journal's data checksum must cover (the rest of a cluster
        // past the end of the file is a hole no one else writes, and reads
        // as zeros however the crash falls).
        let delayed = match old {
            // Shared with a snapshot: the backend may carry the copy of
            // the untouched bytes (delayed copy-on-write) instead of us
            // making it now.
            L2Entry::Normal {
                offset: source,
                copied: false,
            } if !whole => {
                let end = (in_cluster + data.len()) as u64;
                let untouched: Vec<(u64, u64)> = [(0, in_cluster as u64), (end, cs as u64 - end)]
                    .into_iter()
                    .filter(|&(_, len)| len > 0)
                    .collect();
                self.backend.delay_copy(&DelayedCopy {
                    target: host.0,
                    source: source.0,
                    untouched,
                })
            }
            _ => false,
        };
        let at = HostOffset(host.0 + in_cluster as u64);
        let len = data.len() as u64;
        if delayed {
            // The untouched bytes come from the copy in the transaction
            // that links this cluster; only the guest's bytes are ours to
            // write (and to checksum).
            self.write_data(data, at.0)?;
            self.record_new_data(at, len, Some(data));
        } else if (whole || old_reads_zero)
            && past_eof
            && self.backend.log_fresh_data(host, in_cluster as u64, data)
        {
            // Logged data: the transaction that links the cluster carries
            // the bytes; the file reaches them at checkpoint.
            self.record_new_data(at, len, None);
        } else if whole || (old_reads_zero && past_eof) {
            // A cluster past the end of the file reads as zeros already, so
            // zero padding around the data need not be written (QEMU skips
            // it too); the data write extends the file.
            self.write_data(data, at.0)?;
            self.record_new_data(at, len, Some(data));
        } else {
            // Copy-on-write: the new cluster gets the old content around the
            // written bytes (from backing, a shared cluster, a compressed
            // cluster, or zeros over a reused cluster's stale bytes).
            let mut full = vec![0u8; cs];
            self.old_content(cluster, old, &mut full)?;
            full[in_cluster..in_cluster + data.len()].copy_from_slice(data);
            self.write_data(&full, host.0)?;
            self.record_new_data(host, cs as u64, Some(&full));
        }
        self.entries_changed.fetch_add(1, Ordering::Relaxed);
        t.set_entry(
            index,
            L2Entry::Normal {
                offset: host,
                copied: true,
            }
            .encode(self.geometry.cluster_bits),
        );
        if let Some(hash) = index_as {
            self.dedup_insert(host, hash, cluster);
        }
        let released = self.release_entry(old);
        drop(t);
        released?;
        self.dedup_after_release(old, cluster)
    }

    fn write_data(&self, data: &[u8], host: u64) -> Result<()> {
        self.guard_data_write(host, data.len() as u64)?;
        if self.backend.absorb_data_write(HostOffset(host), data) {
            return Ok(());
        }
        self.backend
            .before_data_write(HostOffset(host), data.len() as u64, &self.counters)?;
        self.storage
            .write_at(data, host)
            .ctx(|| format!("writing guest data at host {host:#x}"))?;
        self.counters.data_write(data.len());
        // A checksum taken from an earlier write into this cluster no
        // longer describes its bytes (`new_data.rs`). Checked after the
        // write, by a writer that read the cluster's entry under its L2
        // table's lock, so after any range recorded for it (a range is
        // recorded before its entry is set); and under the gate, so no
        // range for it can be recorded meanwhile (that takes a free and a
        // reuse, or deduplication, which keeps the table locked). The
        // gather waits for the gate.
        if self.new_data_held.load(Ordering::SeqCst) > 0 {
            let cs = self.geometry.cluster_size();
            self.new_data.lock().overwritten(host - host % cs);
        }
        Ok(())
    }

    /// Records a range of guest data newly referenced by this epoch, with
    /// the checksum of `written` (the bytes just written there) if the
    /// backend wants checksums.
    pub(super) fn record_new_data(&self, offset: HostOffset, length: u64, written: Option<&[u8]>) {
        let crc32c = written
            .filter(|_| self.backend.checksums_new_data())
            .map(qj_spec::journal::checksum::crc32c);
        debug_assert!(written.is_none_or(|w| w.len() as u64 == length));
        self.new_data.lock().push(
            self.geometry.cluster_size(),
            NewData {
                offset,
                length,
                crc32c,
            },
            &self.new_data_held,
        );
    }

    /// The host clusters an entry holds a reference on: a data cluster, or
    /// every cluster a compressed cluster's bytes touch.
    pub(super) fn referenced_clusters(&self, entry: L2Entry) -> std::ops::Range<u64> {
        let bits = self.geometry.cluster_bits;
        match entry {
            L2Entry::Unallocated
            | L2Entry::Zero {
                preallocated: None, ..
            } => 0..0,
            L2Entry::Normal { offset, .. }
            | L2Entry::Zero {
                preallocated: Some(offset),
                ..
            } => {
                let c = self.geometry.host_cluster(offset).0;
                c..c + 1
            }
            L2Entry::Compressed {
                host_offset,
                compressed_size_max,
            } => {
                let first = host_offset >> bits;
                let last = (host_offset + compressed_size_max.max(1) - 1) >> bits;
                first..last + 1
            }
        }
    }

    /// Refuses to go on with an operation that would drop `old`'s
    /// references when one of them names metadata: checked before anything
    /// is allocated or written, so the refusal changes nothing.
    pub(super) fn guard_release(&self, old: L2Entry) -> Result<()> {
        let clusters = self.referenced_clusters(old);
        let map = self.metadata.read();
        match map.overlapping(HostCluster(clusters.start), clusters.end - clusters.start) {
            None => Ok(()),
            Some((cluster, kind)) => Err(Error::MetadataOverlap {
                kind,
                offset: self.geometry.host_offset(cluster).0,
                what: "release of a data reference".into(),
            }),
        }
    }

    /// Drops this image's reference to whatever `old` pointed to. A data
    /// cluster whose count reaches zero leaves the dedup index, in the
    /// same epoch.
    pub(super) fn release_entry(&self, old: L2Entry) -> Result<()> {
        let mut rc = self.refcounts.lock();
        for c in self.referenced_clusters(old) {
            rc.free(&*self.storage, &*self.backend, HostCluster(c))?;
            if self.dedups() {
                let count = rc.get(&*self.storage, &*self.backend, HostCluster(c))?;
                self.dedup_freed(HostCluster(c), count);
            }
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole clusters become
    /// zero-flagged entries and release their storage; partial clusters are
    /// written with zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    /// Tells the image the guest no longer needs `[offset, offset + len)`.
    /// Whole clusters are released and read as zeros afterwards; partial
    /// clusters are left alone (discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    /// Write zeroes (`discard` false) or discard over a guest range, one
    /// cluster at a time, each under the gate.
    fn zero_range(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.zero_range_unsynced(offset, len, discard)?;
        self.sync_if_writethrough()
    }

    /// In writethrough cache modes, makes the operation that just completed
    /// durable before it returns.
    pub(super) fn sync_if_writethrough(&self) -> Result<()> {
        if self.writethrough {
            self.flush()?;
        }
        Ok(())
    }

    fn zero_range_unsynced(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.counters.guest_ops.fetch_add(1, Ordering::Relaxed);
        self.mark_bitmaps(offset, len)?;
        for (cluster, in_cluster, n, _) in self.pieces(offset, len) {
            let _gate = self.gate.read();
            let _op = self.begin_op();
            let r = self.zero_piece(cluster, in_cluster, n, discard);
            self.poisoned(r)?;
        }
        self.maybe_evict()
    }

    /// Zeroes or discards `n` bytes at byte `in_cluster` of guest cluster
    /// `cluster`. Caller holds the gate, as for [`Self::write_piece`].
    pub(super) fn zero_piece(
        &self,
        cluster: GuestCluster,
        in_cluster: usize,
        n: usize,
        discard: bool,
    ) -> Result<()> {
        let cs = self.geometry.cluster_size() as usize;
        let guest_end = self.geometry.guest_offset(cluster).0 + cs as u64;
        // The last cluster may extend past the virtual size: covering up to
        // the end of the disk counts as covering the whole cluster.
        let whole = in_cluster == 0
            && (n == cs
                || guest_end > self.virtual_size() && {
                    self.geometry.guest_offset(cluster).0 + n as u64 == self.virtual_size()
                });
        if !whole {
            if discard {
                return Ok(());
            }
            return self.write_piece(cluster, in_cluster, &vec![0u8; n]);
        }
        let v3 = self.header.lock().mem.version >= 3;
        let new_entry = if !v3 {
            if self.backing.is_some() && !discard {
                // v2 has no zero flag: zeros over backing data must be stored.
                return self.write_piece(cluster, in_cluster, &vec![0u8; n]);
            }
            L2Entry::Unallocated
        } else if self.backing.is_none() && discard {
            L2Entry::Unallocated
        } else {
            L2Entry::Zero {
                preallocated: None,
                copied: false,
            }
        };
        if self.l1_entry(cluster)?.l2_offset().is_none()
            && (self.backing.is_none() || new_entry == L2Entry::Unallocated)
        {
            // Nothing mapped and nothing to hide: already reads as zeros.
            return Ok(());
        }
        let table = self.owned_l2(cluster)?;
        let mut t = table.data.write();
        let old = self.l2_entry(&t.bytes, cluster)?;
        if old == new_entry {
            return Ok(());
        }
        self.guard_release(old)?;
        let index = self.geometry.l2_index(cluster) as usize;
        self.entries_changed.fetch_add(1, Ordering::Relaxed);
        t.set_entry(index, new_entry.encode(self.geometry.cluster_bits));
        let released = self.release_entry(old);
        drop(t);
        released?;
        self.dedup_after_release(old, cluster)
    }
}
