//! Logged data: guest writes into fresh clusters past the end of the file
//! that travel in the journal transaction instead of being written in
//! place before it.
//!
//! Why: on a file-backed image the expensive part of a synced allocating
//! write is not the number of flushes but what one of them carries. A data
//! write past the end of the file allocates file-system blocks and changes
//! the file's size, so the `fdatasync` after it must also commit the file
//! system's own journal; a flush after overwrites only is about half as
//! costly (`shared/notes/baseline.md`: 9,000/s against 3,900/s). With the
//! data in the transaction, the commit's one flush covers overwrites of the
//! (already allocated) journal ring only; the file grows later, at
//! checkpoint, once for many writes. ZFS's intent log does the same with
//! small synchronous writes. The price: the data is written twice (journal,
//! then in place), which the statistics show.
//!
//! The rules this file keeps the state for (the journalled backend enforces
//! them, `journal.rs` rule 7):
//! - the bytes are in the same transaction as the L2 entry that makes the
//!   cluster reachable, so replay writes them before anything reads them;
//! - while the newest bytes of a cluster live in the journal, every later
//!   write into it goes into the journal too (merged while not submitted,
//!   else in the next transaction): written in place, it would be
//!   overwritten by the older logged bytes at checkpoint or replay;
//! - until the last of its transactions is synced, reads of the cluster are
//!   served from here (the file does not hold the bytes, and may not even
//!   reach the cluster);
//! - the cluster is not reused until then: a replay would write the old
//!   bytes over its next owner's.
//!
//! Kept clusters: once its transactions are synced, a cluster whose
//! written bytes do not fill it stays here (within [`KEPT_CLUSTERS_MAX`])
//! as the list of the byte ranges the file holds for it, and a later write
//! that reaches bytes never written joins the journal again instead of
//! going in place.
//!
//! Why: the blocks of those bytes were never written (the file was
//! reserved with `fallocate`, or not at all), and the file system converts
//! a block on its first write, which the next `fdatasync` pays for with
//! metadata writes. A guest's in-place writes land at random in the
//! extent tree; the checkpoint writes in offset order (each of its
//! writers, `journal/src/checkpoint.rs`). Eight flushing fio
//! jobs on a fresh image (`cache=none`) wrote about four metadata blocks
//! in each `fdatasync`; with kept clusters they ran 0.90-1.03x the
//! preallocated raw file, against 0.84-0.89x (RFC.md 6.2).
//!
//! A kept cluster holds ranges, not bytes: the file has its bytes (that is
//! what synced means). Kept as copies of the bytes, they were bounded at
//! 64 MiB, which eight jobs writing a 1 GiB image at random filled within
//! their 4 seconds: a count by a throwaway build found 1,662-3,109 of
//! about 27,000 writes in place for want of it, and 15-24 with the bound
//! lifted.
//!
//! The rules that keep this safe:
//! - a kept cluster's ranges are every range of it the file holds bytes
//!   for; elsewhere the file reads zeros (the cluster was fresh when
//!   logged, and every write since went through here). So any write into
//!   it that does not join the journal drops it first ([`LoggedData::absorb`]),
//!   and a cluster is dropped when it is freed ([`LoggedData::may_reuse`]),
//!   before anything else can own its bytes;
//! - joined again, its new bytes are logged data like any other (the
//!   rules above apply, and a crash before their transaction commits
//!   leaves the file's bytes), but reads of it are the file's bytes under
//!   the logged ones ([`LoggedData::read`]). While it holds logged bytes,
//!   nothing writes the rest of it in place (every write joins), and the
//!   checkpoint writes in place only logged bytes, which the overlay
//!   holds the newest of: so a read of the file patched with them is
//!   right at any moment, as long as the cluster still holds them when it
//!   is patched. [`LoggedData::patch`] checks that no cluster gave up its
//!   logged bytes since the read began (`forgets`).

use std::collections::{BTreeMap, BTreeSet};

use qj_journal::Overlay;

/// The last transaction that carries a cluster's logged bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carrier {
    /// In the epoch with this engine ticket, enqueued, not known committed.
    Submitted(u64),
    /// In the committed transaction with this sequence number.
    Committed(u64),
    /// Synced: the file holds every byte carried so far. With no dirty
    /// range the entry is a kept cluster; with one, a kept cluster written
    /// again, waiting for its next transaction.
    Synced,
}

/// Largest write logged: bigger ones cost more to write twice than the
/// file growth they avoid (ZFS draws the same line at 32 KiB,
/// `zfs_immediate_write_sz`).
pub const LOGGED_WRITE_BYTES_MAX: usize = 32 << 10;

/// Most clusters kept (or joined again). Each costs its map entry (104
/// bytes) with the map's slack, about 160 bytes: 20 MiB at most, for
/// 8 GiB of clusters of 64 KiB (a 1 GiB image has 16,384). Past it, a
/// synced cluster is simply not kept (its later writes go in place, as
/// without keeping).
pub const KEPT_CLUSTERS_MAX: usize = 1 << 17;

/// Most ranges held for those clusters (16 bytes each, up to twice that
/// with their allocations' slack: 16 MiB at most): a cluster written in
/// many small pieces has as many ranges, so the clusters alone do not
/// bound the memory (a 2 MiB cluster written 4 KiB apart has 256).
pub const RANGES_MAX: usize = 1 << 19;

/// One cluster's logged bytes.
#[derive(Debug)]
struct Logged {
    /// The bytes logged into the cluster and not yet synced, as extents at
    /// offsets in the cluster. Extents, not one span: a cluster written
    /// 4 KiB here and there would otherwise hold up to a cluster of zeros
    /// between them, which counted against the bounds.
    content: Overlay,
    /// Bytes the extents hold.
    len: u64,
    /// For a cluster that was synced before (kept, and perhaps joined
    /// again): the ranges `[start, end)` of it the file holds bytes for,
    /// ascending and apart; the file holds the rest of the cluster as
    /// zeros, and reads come from the file under `content`. `None` for a
    /// fresh cluster, whose bytes are all in `content` (the file may not
    /// even reach it) and which reads as zeros elsewhere.
    in_file: Option<Vec<(u64, u64)>>,
    /// The part written since the last submit, `[lo, hi)` in the cluster:
    /// what the next transaction carries.
    dirty: Option<(u64, u64)>,
    /// The last transaction submitted with bytes of this cluster.
    carrier: Option<Carrier>,
}

impl Logged {
    /// Logged bytes `data` at byte `at` of a fresh cluster.
    fn fresh(at: u64, data: &[u8]) -> Self {
        let mut content = Overlay::new();
        content.write(at, data);
        Self {
            content,
            len: data.len() as u64,
            in_file: None,
            dirty: Some((at, at + data.len() as u64)),
            carrier: None,
        }
    }

    /// Synced, carrying nothing: the file holds the cluster.
    fn is_kept(&self) -> bool {
        self.carrier == Some(Carrier::Synced) && self.dirty.is_none()
    }

    /// Copies `data` in at byte `at` of the cluster; returns how many
    /// bytes the extents grew.
    fn put(&mut self, at: u64, data: &[u8]) -> u64 {
        self.content.write(at, data);
        let len: u64 = self.content.extents().map(|(_, b)| b.len() as u64).sum();
        let grown = len - self.len;
        self.len = len;
        grown
    }

    /// The bytes `[lo, hi)` the next transaction carries, as (offset in the
    /// cluster, bytes) writes. A fresh cluster's span goes whole (its gaps
    /// are zeros in the file too); a cluster the file holds sends only its
    /// logged extents, since the bytes between are the file's.
    fn dirty_writes(&self, lo: u64, hi: u64) -> Vec<(u64, Vec<u8>)> {
        if self.in_file.is_none() {
            return vec![(lo, self.span(lo, hi))];
        }
        self.content
            .extents()
            .filter_map(|(at, bytes)| {
                let start = at.max(lo);
                let end = (at + bytes.len() as u64).min(hi);
                (start < end).then(|| {
                    let from = (start - at) as usize;
                    (start, bytes[from..from + (end - start) as usize].to_vec())
                })
            })
            .collect()
    }

    /// The cluster's bytes `[lo, hi)` as logged: the extents, zeros
    /// between them.
    fn span(&self, lo: u64, hi: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; (hi - lo) as usize];
        self.content.patch(&mut bytes, lo);
        bytes
    }

    /// What the next transaction carries for `[lo, hi)` at most, as the
    /// bound on one transaction's data counts it: a fresh cluster's whole
    /// span; for a cluster the file holds, only logged extents travel,
    /// and no more than `content` holds.
    fn dirty_cost(&self, lo: u64, hi: u64) -> u64 {
        match self.in_file {
            None => hi - lo,
            Some(_) => (hi - lo).min(self.len),
        }
    }

    /// The ranges the file holds once `content` is in place.
    fn ranges_in_file(&self) -> Vec<(u64, u64)> {
        let mut ranges = self.in_file.clone().unwrap_or_default();
        for (at, bytes) in self.content.extents() {
            insert_range(&mut ranges, at, at + bytes.len() as u64);
        }
        ranges
    }
}

/// Adds `[start, end)` to `ranges` (ascending, apart), merging it with
/// every range it overlaps or touches.
fn insert_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    let first = ranges.partition_point(|&(_, e)| e < start);
    let last = ranges.partition_point(|&(s, _)| s <= end);
    let (mut lo, mut hi) = (start, end);
    if first < last {
        lo = lo.min(ranges[first].0);
        hi = hi.max(ranges[last - 1].1);
    }
    ranges.splice(first..last, [(lo, hi)]);
}

/// Whether `ranges` (ascending, apart) hold every byte of `[start, end)`.
fn covers(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(_, e)| e <= start);
    ranges.get(i).is_some_and(|&(s, e)| s <= start && end <= e)
}

/// Where a read of logged data comes from ([`LoggedData::read`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoggedRead {
    /// The cluster holds no logged bytes: the file has them all.
    NotHeld,
    /// Served from memory (a fresh cluster's bytes).
    Served,
    /// Read the file, then [`LoggedData::patch`] with this ticket.
    FileThenPatch(u64),
}

/// Logged data not yet synced, and the written ranges of kept clusters,
/// by cluster offset, with bounds on the bytes held in memory (and so on
/// the data one transaction carries).
#[derive(Debug)]
pub struct LoggedData {
    clusters: BTreeMap<u64, Logged>,
    cluster_size: u64,
    /// Bytes of logged extents held.
    held_bytes: u64,
    /// Clusters the file holds (`in_file`), kept or joined again: at most
    /// `kept_clusters_max` once a forget has run (a join leaves the
    /// count as it is; the forget that keeps the cluster again counts it
    /// anew).
    kept_clusters: usize,
    /// [`KEPT_CLUSTERS_MAX`] (smaller in tests).
    kept_clusters_max: usize,
    /// Ranges of every cluster the file holds (`in_file`), kept or joined
    /// again: at most `ranges_max` once a forget has run (a join adds
    /// none; the forget that keeps the cluster again counts them anew).
    ranges: usize,
    /// [`RANGES_MAX`] (smaller in tests).
    ranges_max: usize,
    /// The crash harness's mutation `LoggedZerosOverKept`: a joined
    /// cluster's transaction carries its span whole.
    zeros_over_kept: bool,
    /// How many times a cluster the file holds gave up logged bytes (they
    /// are in place, or the cluster is gone): a read that began before
    /// one must not be patched with what is left ([`Self::patch`]).
    forgets: u64,
    /// Most bytes held; past it, fresh clusters are written in place as
    /// without logging.
    held_bytes_max: u64,
    /// Clusters with bytes not yet submitted. An index beside `clusters`,
    /// as is `submitted`: a submit and a commit each touch only the
    /// clusters they concern. Scanning every held cluster instead (a few
    /// thousand between checkpoints) put two walks of the whole map, under
    /// its lock, on every commit's path.
    dirty_clusters: BTreeSet<u64>,
    /// The clusters each submitted, not yet committed, ticket carries.
    submitted: BTreeMap<u64, Vec<u64>>,
    /// The clusters each committed transaction carries, by sequence
    /// number, until a forget looks at them: a forget touches only these,
    /// not every kept cluster (up to [`KEPT_CLUSTERS_MAX`], under the lock
    /// every read and write of a logged image takes).
    committed: BTreeMap<u64, Vec<u64>>,
    /// Bytes not yet submitted (the spans the next transaction carries).
    dirty_bytes: u64,
    /// Most bytes not yet submitted that fresh clusters may add: bounds
    /// the data one transaction carries.
    dirty_bytes_max: u64,
}

impl LoggedData {
    /// Nothing logged yet; fresh clusters are logged while at most
    /// `held_bytes_max` bytes are held and at most `dirty_bytes_max` wait
    /// for the next transaction.
    pub fn new(cluster_size: u64, held_bytes_max: u64, dirty_bytes_max: u64) -> Self {
        Self {
            clusters: BTreeMap::new(),
            cluster_size,
            held_bytes: 0,
            kept_clusters: 0,
            kept_clusters_max: KEPT_CLUSTERS_MAX,
            ranges: 0,
            ranges_max: RANGES_MAX,
            zeros_over_kept: false,
            forgets: 0,
            held_bytes_max,
            dirty_clusters: BTreeSet::new(),
            submitted: BTreeMap::new(),
            committed: BTreeMap::new(),
            dirty_bytes: 0,
            dirty_bytes_max,
        }
    }

    /// Injects the crash harness's mutation `LoggedZerosOverKept`
    /// (`crate::mutation`): never set otherwise.
    pub fn break_kept_transactions(&mut self) {
        self.zeros_over_kept = true;
    }

    /// Clusters held.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Bytes of logged extents held, and the most that may be.
    pub fn held_bytes(&self) -> (u64, u64) {
        (self.held_bytes, self.held_bytes_max)
    }

    /// Whether some bytes wait for the next transaction.
    pub fn has_dirty(&self) -> bool {
        !self.dirty_clusters.is_empty()
    }

    /// Logs `data` written at `in_cluster` into the fresh cluster at
    /// `cluster` (whose L2 entry is about to be set), if the bounds allow.
    /// False: the caller writes in place.
    pub fn log_fresh(&mut self, cluster: u64, in_cluster: u64, data: &[u8]) -> bool {
        let cs = self.cluster_size;
        assert!(
            cluster.is_multiple_of(cs),
            "logged cluster {cluster:#x} is not aligned"
        );
        assert!(
            in_cluster + data.len() as u64 <= cs,
            "logged data crosses a cluster"
        );
        // A kept cluster is dropped when it is freed (`may_reuse`).
        assert!(
            !self.clusters.contains_key(&cluster),
            "fresh cluster {cluster:#x} already holds logged data"
        );
        if data.len() > LOGGED_WRITE_BYTES_MAX
            || self.held_bytes + data.len() as u64 > self.held_bytes_max
            || self.dirty_bytes + data.len() as u64 > self.dirty_bytes_max
        {
            return false;
        }
        self.clusters
            .insert(cluster, Logged::fresh(in_cluster, data));
        self.held_bytes += data.len() as u64;
        self.dirty_bytes += data.len() as u64;
        self.dirty_clusters.insert(cluster);
        true
    }

    /// A write of `data` at byte `offset` of the file (inside one cluster):
    /// true if the cluster holds logged data and the write joined it (the
    /// caller must not write in place). Never refused: a cluster whose
    /// newest bytes are logged takes every write (at most a cluster each,
    /// so the bound is exceeded by less than a cluster per logged cluster).
    ///
    /// A kept cluster joins again if the write reaches bytes never written
    /// and the bounds allow; otherwise it is dropped (false: the write
    /// goes in place, and its ranges would no longer be all the file
    /// holds).
    pub fn absorb(&mut self, offset: u64, data: &[u8]) -> bool {
        let cs = self.cluster_size;
        let cluster = offset - offset % cs;
        let Some(logged) = self.clusters.get_mut(&cluster) else {
            return false;
        };
        let at = offset - cluster;
        let end = at + data.len() as u64;
        assert!(end <= cs, "a data write crosses a cluster");
        if logged.is_kept() {
            let in_file = logged.in_file.as_deref().unwrap_or_default();
            let joins = !covers(in_file, at, end)
                && data.len() <= LOGGED_WRITE_BYTES_MAX
                && self.held_bytes + data.len() as u64 <= self.held_bytes_max
                && self.dirty_bytes + data.len() as u64 <= self.dirty_bytes_max;
            if !joins {
                // Where every byte was written, so were the blocks: in
                // place costs the file system nothing more.
                self.kept_clusters -= 1;
                self.ranges -= in_file.len();
                self.clusters.remove(&cluster);
                return false;
            }
        }
        let old = logged.dirty.map(|(lo, hi)| logged.dirty_cost(lo, hi));
        self.held_bytes += logged.put(at, data);
        let (lo, hi) = match (logged.dirty, old) {
            (Some((lo, hi)), Some(cost)) => {
                self.dirty_bytes -= cost;
                (lo.min(at), hi.max(end))
            }
            _ => {
                self.dirty_clusters.insert(cluster);
                (at, end)
            }
        };
        self.dirty_bytes += logged.dirty_cost(lo, hi);
        logged.dirty = Some((lo, hi));
        true
    }

    /// Hands the bytes written since the last submit to the epoch with
    /// engine ticket `ticket`, as (file offset, bytes) writes.
    pub fn take_dirty(&mut self, ticket: u64) -> Vec<(u64, Vec<u8>)> {
        let taken = std::mem::take(&mut self.dirty_clusters);
        let mut writes = Vec::with_capacity(taken.len());
        for &cluster in &taken {
            let logged = self
                .clusters
                .get_mut(&cluster)
                .expect("a dirty cluster is held");
            let (lo, hi) = logged.dirty.take().expect("an indexed cluster is dirty");
            logged.carrier = Some(Carrier::Submitted(ticket));
            let carried = if self.zeros_over_kept {
                vec![(lo, logged.span(lo, hi))]
            } else {
                logged.dirty_writes(lo, hi)
            };
            writes.extend(carried.into_iter().map(|(at, bytes)| (cluster + at, bytes)));
        }
        if !taken.is_empty() {
            self.submitted.insert(ticket, taken.into_iter().collect());
        }
        self.dirty_bytes = 0;
        writes
    }

    /// The epoch with `ticket` committed as transaction `seq`.
    pub fn committed(&mut self, ticket: u64, seq: u64) {
        let mut carried = Vec::new();
        for cluster in self.submitted.remove(&ticket).unwrap_or_default() {
            if let Some(logged) = self.clusters.get_mut(&cluster) {
                if logged.carrier == Some(Carrier::Submitted(ticket)) {
                    logged.carrier = Some(Carrier::Committed(seq));
                    carried.push(cluster);
                }
            }
        }
        if !carried.is_empty() {
            self.committed.entry(seq).or_default().extend(carried);
        }
    }

    /// Forgets the logged bytes that transactions up to `synced` put in
    /// place; a cluster left with unwritten bytes stays as a kept cluster
    /// (within the kept bound), the others go.
    pub fn forget_synced(&mut self, synced: u64) {
        let cs = self.cluster_size;
        let later = self.committed.split_off(&(synced + 1));
        let due = std::mem::replace(&mut self.committed, later);
        // A cluster listed under a transaction it no longer waits for (it
        // was written again since) is listed under its newest one as well.
        for cluster in due.into_values().flatten() {
            let Some(logged) = self.clusters.get_mut(&cluster) else {
                continue;
            };
            let in_place = logged.dirty.is_none()
                && matches!(logged.carrier, Some(Carrier::Committed(s)) if s <= synced);
            if !in_place {
                continue;
            }
            self.held_bytes -= logged.len;
            if let Some(in_file) = &logged.in_file {
                self.kept_clusters -= 1;
                self.ranges -= in_file.len();
                self.forgets += 1;
            }
            let ranges = logged.ranges_in_file();
            if covers(&ranges, 0, cs)
                || self.kept_clusters >= self.kept_clusters_max
                || self.ranges + ranges.len() > self.ranges_max
            {
                self.clusters.remove(&cluster);
                continue;
            }
            self.kept_clusters += 1;
            self.ranges += ranges.len();
            *logged = Logged {
                content: Overlay::new(),
                len: 0,
                in_file: Some(ranges),
                dirty: None,
                carrier: Some(Carrier::Synced),
            };
        }
        // A ticket whose commit failed is never `committed`: its clusters
        // stay `Submitted` and are never forgotten, nor is its entry. The
        // image is poisoned by then, so neither grows.
        let clusters = &self.clusters;
        self.submitted.retain(|_, taken| {
            taken.retain(|c| clusters.get(c).is_some_and(|l| !l.is_kept()));
            !taken.is_empty()
        });
    }

    /// Whether the cluster at file offset `cluster` may be reused now that
    /// it is free: not while it holds logged bytes not yet synced; a kept
    /// cluster is dropped (its next owner's bytes are not these).
    pub fn may_reuse(&mut self, cluster: u64) -> bool {
        match self.clusters.get(&cluster) {
            Some(logged) if logged.is_kept() => {
                self.kept_clusters -= 1;
                self.ranges -= logged.in_file.as_ref().map_or(0, Vec::len);
                self.clusters.remove(&cluster);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Clusters the file holds, kept or joined again.
    pub fn kept_clusters(&self) -> usize {
        self.kept_clusters
    }

    /// Whether the cluster holding file offset `offset` holds logged data
    /// that is all in submitted transactions, not yet synced (nothing
    /// waits for the next).
    pub fn is_submitted(&self, offset: u64) -> bool {
        self.clusters
            .get(&(offset - offset % self.cluster_size))
            .is_some_and(|logged| {
                logged.dirty.is_none()
                    && matches!(
                        logged.carrier,
                        Some(Carrier::Submitted(_) | Carrier::Committed(_))
                    )
            })
    }

    /// Whether the cluster holding file offset `offset` holds logged data
    /// not yet synced: the file may not have its bytes (it may not even
    /// reach the cluster), and a transaction carries them.
    pub fn holds(&self, offset: u64) -> bool {
        self.clusters
            .get(&(offset - offset % self.cluster_size))
            .is_some_and(|logged| !logged.is_kept())
    }

    /// Where the bytes at file offset `offset` (inside one cluster) come
    /// from: a fresh cluster's are served into `buf` here; a cluster the
    /// file holds, with logged bytes on top, is read from the file and
    /// then patched ([`Self::patch`]); otherwise the file has them.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> LoggedRead {
        let cs = self.cluster_size;
        let cluster = offset - offset % cs;
        match self.clusters.get(&cluster) {
            None => LoggedRead::NotHeld,
            Some(logged) if logged.is_kept() => LoggedRead::NotHeld,
            Some(logged) if logged.in_file.is_some() => LoggedRead::FileThenPatch(self.forgets),
            Some(logged) => {
                buf.fill(0);
                logged.content.patch(buf, offset - cluster);
                LoggedRead::Served
            }
        }
    }

    /// Lays the logged bytes of the cluster holding `offset` over `buf`,
    /// just read from the file there, if no cluster the file holds gave
    /// up logged bytes since [`Self::read`] returned `ticket`; false if
    /// one did (the read may have raced the checkpoint's in-place write of
    /// bytes no longer held: read again).
    ///
    /// Why the file read is right otherwise: the cluster held logged bytes
    /// for the whole read, and while it does, every write into it joins
    /// the journal and the checkpoint writes in place only logged bytes,
    /// whose newest version is in `content`. So the file's bytes outside
    /// `content` did not change during the read, and those inside are
    /// covered here.
    #[must_use]
    pub fn patch(&self, buf: &mut [u8], offset: u64, ticket: u64) -> bool {
        if self.forgets != ticket {
            return false;
        }
        let cs = self.cluster_size;
        let cluster = offset - offset % cs;
        let logged = self
            .clusters
            .get(&cluster)
            .expect("a cluster the file holds keeps its logged bytes until a forget");
        logged.content.patch(buf, offset - cluster);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    #[test]
    fn reads_see_logged_bytes_and_later_writes_join_the_next_transaction() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        l.kept_clusters_max = 0; // Synced clusters go (kept ones: below).
        assert!(l.log_fresh(CS, 512, &[7; 512]));
        let mut buf = [9u8; 2048];
        assert_eq!(l.read(&mut buf, CS), LoggedRead::Served);
        assert_eq!(&buf[..512], &[0; 512], "the unwritten part reads zeros");
        assert_eq!(&buf[512..1024], &[7; 512]);
        assert!(l.absorb(CS + 1024, &[8; 100]), "merged before submit");
        assert!(!l.absorb(3 * CS, &[8; 100]), "not logged");
        let writes = l.take_dirty(5);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0, CS + 512);
        assert_eq!(writes[0].1.len(), 612);
        assert_eq!(&writes[0].1[512..], &[8; 100]);
        assert!(!l.has_dirty());
        // After submit, a write still goes to the journal: the next
        // transaction.
        assert!(l.absorb(CS, &[1; 4]));
        assert!(l.has_dirty());
        l.committed(5, 11);
        l.forget_synced(11);
        assert!(l.holds(CS + 100), "bytes wait for the next transaction");
        assert_eq!(l.take_dirty(6), vec![(CS, vec![1; 4])]);
        l.committed(6, 12);
        l.forget_synced(11);
        assert!(l.holds(CS), "synced 11 does not cover seq 12");
        l.forget_synced(12);
        assert!(l.is_empty());
        let mut buf = [9u8; 16];
        assert_eq!(l.read(&mut buf, CS), LoggedRead::NotHeld, "nothing left");
    }

    #[test]
    fn past_the_bound_fresh_clusters_go_in_place() {
        let mut l = LoggedData::new(CS, 4097, 4097);
        assert!(l.log_fresh(0, 0, &[1; 4096]));
        assert!(l.log_fresh(CS, 7, &[1; 1]));
        assert!(!l.log_fresh(2 * CS, 0, &[1; 1]), "bytes held bound");
        assert_eq!(l.held_bytes(), (4097, 4097));
        // A later write adds its bytes, not the zeros between.
        assert!(l.absorb(CS + 100, &[2; 4]));
        assert_eq!(l.held_bytes().0, 4096 + 1 + 4);
        let mut buf = [9u8; 12];
        assert_eq!(l.read(&mut buf, CS + 6), LoggedRead::Served);
        assert_eq!(buf, [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        sync(&mut l, 1);
        assert_eq!(l.held_bytes().0, 0);
        assert!(l.log_fresh(2 * CS, 0, &[1; 1]));
        // The transaction's bound: only what is not yet submitted counts.
        let mut l = LoggedData::new(CS, 8 * CS, CS);
        assert!(l.log_fresh(0, 0, &[1; 4096]));
        assert!(!l.log_fresh(CS, 0, &[1; 1]), "dirty bytes bound");
        l.take_dirty(2);
        assert!(l.log_fresh(CS, 0, &[1; 1]));
        let big = vec![1u8; LOGGED_WRITE_BYTES_MAX + 1];
        let mut l = LoggedData::new(2 * big.len() as u64, 1 << 20, 1 << 20);
        assert!(!l.log_fresh(0, 0, &big), "too big to log");
    }

    /// Logs `data` at `in_cluster` of `cluster`, and commits and syncs it
    /// as transaction `seq`.
    fn logged_and_synced(l: &mut LoggedData, cluster: u64, in_cluster: u64, data: &[u8], seq: u64) {
        assert!(l.log_fresh(cluster, in_cluster, data));
        sync(l, seq);
    }

    /// Submits what is dirty, and commits and syncs it, as transaction
    /// (and ticket) `seq`.
    fn sync(l: &mut LoggedData, seq: u64) {
        l.take_dirty(seq);
        l.committed(seq, seq);
        l.forget_synced(seq);
    }

    /// The cluster at `CS` as the file holds it once `[at, at + len)` of
    /// it was synced with `byte`.
    fn file_with(at: usize, len: usize, byte: u8) -> Vec<u8> {
        let mut file = vec![0u8; CS as usize];
        file[at..at + len].fill(byte);
        file
    }

    #[test]
    fn a_synced_cluster_is_kept_and_a_write_into_bytes_never_written_joins_the_journal_again() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 512, &[7; 512], 1);
        assert!(!l.holds(CS), "synced: the file has the bytes");
        assert_eq!((l.held_bytes().0, l.kept_clusters()), (0, 1));
        let mut buf = [9u8; 1024];
        assert_eq!(
            l.read(&mut buf, CS),
            LoggedRead::NotHeld,
            "a kept cluster is read from the file"
        );
        // Into bytes never written: logged again, and only the new bytes
        // are held and travel.
        assert!(l.absorb(CS + 2048, &[8; 100]));
        assert!(l.holds(CS) && l.has_dirty());
        assert_eq!(
            (l.held_bytes().0, l.kept_clusters()),
            (100, 1),
            "joined: still counted against the kept bound"
        );
        assert_eq!(l.take_dirty(2), vec![(CS + 2048, vec![8; 100])]);
        // Read: the file's bytes under the logged ones.
        let mut buf = file_with(512, 512, 7);
        let LoggedRead::FileThenPatch(ticket) = l.read(&mut buf, CS) else {
            panic!("a kept cluster joined again is read from the file, then patched");
        };
        assert!(l.patch(&mut buf, CS, ticket));
        let mut want = file_with(512, 512, 7);
        want[2048..2148].fill(8);
        assert_eq!(buf, want);
        // A later transaction's span runs over the file's bytes at
        // 512..1024: only the logged extents travel, never zeros over them.
        assert!(l.absorb(CS + 100, &[5; 10]));
        assert!(l.absorb(CS + 2100, &[4; 10]));
        assert_eq!(
            l.take_dirty(3),
            vec![
                (CS + 100, vec![5; 10]),
                (CS + 2048, vec![8; 52]),
                (CS + 2100, vec![4; 10])
            ]
        );
        assert!(l.may_reuse(2 * CS));
        assert!(!l.may_reuse(CS), "carrying unsynced bytes");
        // A forget between the file read and the patch: read again.
        let mut buf = file_with(512, 512, 7);
        let LoggedRead::FileThenPatch(ticket) = l.read(&mut buf, CS) else {
            panic!("still joined");
        };
        l.committed(2, 2);
        l.committed(3, 3);
        l.forget_synced(3);
        assert!(
            !l.patch(&mut buf, CS, ticket),
            "the read may predate the checkpoint's write"
        );
        // Kept again, with every range the file now holds.
        assert_eq!((l.held_bytes().0, l.kept_clusters()), (0, 1));
        assert_eq!(l.read(&mut buf, CS), LoggedRead::NotHeld);
        assert!(
            !l.absorb(CS + 600, &[1; 4]),
            "written by the first transaction"
        );
        let mut l2 = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l2, CS, 512, &[7; 512], 1);
        assert!(l2.absorb(CS + 2048, &[8; 100]));
        sync(&mut l2, 2);
        assert!(
            l2.absorb(CS + 1024, &[1; 1024]),
            "between the two: never written"
        );
        sync(&mut l2, 3);
        assert_eq!(l2.kept_clusters(), 1);
        assert!(
            !l2.absorb(CS + 2100, &[1; 4]),
            "written by the joined transaction"
        );
        assert!(l2.is_empty());
    }

    #[test]
    fn a_write_inside_written_bytes_drops_the_kept_cluster_and_goes_in_place() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 512, &[7; 512], 1);
        assert!(
            !l.absorb(CS + 600, &[1; 10]),
            "inside written bytes: in place"
        );
        assert!(
            l.is_empty(),
            "its ranges would no longer be all the file holds"
        );
        assert_eq!(l.kept_clusters(), 0);
        let mut buf = [9u8; 16];
        assert_eq!(l.read(&mut buf, CS + 600), LoggedRead::NotHeld);
        // Across a gap between two written extents: logged; inside one of
        // them: in place.
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 0, &[7; 512], 1);
        assert!(l.absorb(CS + 1024, &[8; 512]), "past the written bytes");
        sync(&mut l, 2);
        assert_eq!(l.kept_clusters(), 1);
        assert!(
            l.absorb(CS + 256, &[9; 1024]),
            "the gap at 512..1024 was never written"
        );
        sync(&mut l, 3);
        assert!(!l.absorb(CS + 1034, &[1; 10]), "every byte written");
        assert!(l.is_empty());
        // Past the bounds: dropped as well.
        let mut l = LoggedData::new(CS, 1024, 4 * CS);
        logged_and_synced(&mut l, CS, 0, &[7; 512], 1);
        assert!(!l.absorb(CS + 2048, &[8; 1025]), "past the held bound");
        assert!(l.is_empty());
        let mut l = LoggedData::new(CS, 4 * CS, 256);
        logged_and_synced(&mut l, CS, 0, &[7; 128], 1);
        assert!(
            !l.absorb(CS + 2048, &[8; 512]),
            "past the transaction's bound"
        );
        assert!(l.is_empty());
    }

    #[test]
    fn a_freed_kept_cluster_is_dropped_and_its_next_owner_starts_fresh() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        assert!(l.log_fresh(CS, 0, &[7; 512]));
        assert!(!l.may_reuse(CS), "rule 7: not before its bytes are synced");
        l.take_dirty(1);
        l.committed(1, 1);
        assert!(!l.may_reuse(CS));
        l.forget_synced(1);
        assert!(l.may_reuse(CS));
        assert!(l.is_empty() && l.kept_clusters() == 0);
        assert!(l.log_fresh(CS, 1024, &[5; 8]), "a fresh cluster again");
        let mut buf = [9u8; 8];
        assert_eq!(l.read(&mut buf, CS), LoggedRead::Served);
        assert_eq!(buf, [0; 8], "nothing of the old owner's bytes");
    }

    #[test]
    fn a_full_cluster_is_not_kept_nor_more_than_the_bound() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        l.kept_clusters_max = 1;
        logged_and_synced(&mut l, 0, 0, &[1; CS as usize], 1);
        assert!(l.is_empty(), "every block written: nothing to gain");
        logged_and_synced(&mut l, CS, 0, &[2; 600], 2);
        logged_and_synced(&mut l, 2 * CS, 0, &[3; 600], 3);
        assert_eq!(l.len(), 1, "the second would pass the bound");
        assert_eq!(l.kept_clusters(), 1);
        assert!(!l.absorb(2 * CS + 1000, &[4; 4]), "not kept: in place");
        // A kept cluster joined again still counts: a third is not kept.
        assert!(l.log_fresh(3 * CS, 0, &[6; 600]));
        l.take_dirty(3);
        l.committed(3, 3);
        assert!(l.absorb(CS + 1000, &[5; 4]));
        l.forget_synced(3);
        assert!(
            l.holds(CS) && l.len() == 1,
            "the joined cluster holds the one place"
        );
    }

    #[test]
    fn each_submit_and_commit_concerns_only_its_own_clusters() {
        let mut l = LoggedData::new(CS, 8 * CS, 8 * CS);
        l.kept_clusters_max = 0;
        assert!(l.log_fresh(0, 0, &[1; 8]));
        assert!(l.log_fresh(CS, 0, &[2; 8]));
        let first = l.take_dirty(5);
        assert_eq!(first.len(), 2);
        assert!(l.take_dirty(6).is_empty(), "nothing dirty is left");
        // A cluster of the first submit written again, and a fresh one.
        assert!(l.absorb(CS + 8, &[3; 8]));
        assert!(l.log_fresh(2 * CS, 0, &[4; 8]));
        let second = l.take_dirty(7);
        let offsets: Vec<u64> = second.iter().map(|(o, _)| *o).collect();
        assert_eq!(offsets, [CS + 8, 2 * CS], "only the spans written since");
        // The later transaction commits and syncs first: the clusters it
        // carries last go; cluster 0 still waits for ticket 5.
        l.committed(7, 12);
        l.forget_synced(12);
        assert!(l.holds(0) && !l.holds(CS) && !l.holds(2 * CS));
        l.committed(5, 11);
        l.forget_synced(12);
        assert!(l.is_empty());
        assert_eq!(l.held_bytes().0, 0);
    }

    #[test]
    fn ranges_merge_what_overlaps_or_touches_and_cover_only_what_they_hold() {
        let mut r = Vec::new();
        insert_range(&mut r, 10, 20);
        insert_range(&mut r, 30, 40);
        insert_range(&mut r, 0, 5);
        assert_eq!(r, [(0, 5), (10, 20), (30, 40)]);
        insert_range(&mut r, 20, 25);
        assert_eq!(r, [(0, 5), (10, 25), (30, 40)], "touching: joined");
        insert_range(&mut r, 3, 32);
        assert_eq!(r, [(0, 40)], "spanning several: one");
        insert_range(&mut r, 50, 60);
        assert!(covers(&r, 0, 40) && covers(&r, 5, 6) && covers(&r, 55, 60));
        assert!(!covers(&r, 39, 41), "runs past a range");
        assert!(!covers(&r, 40, 50), "the gap");
        assert!(!covers(&r, 45, 55), "into a range from the gap");
        assert!(!covers(&[], 0, 1));
    }

    #[test]
    fn the_ranges_of_kept_clusters_are_bounded_and_counted_until_they_go() {
        let mut l = LoggedData::new(CS, 8 * CS, 8 * CS);
        l.ranges_max = 3;
        assert!(l.log_fresh(0, 0, &[1; 8]));
        assert!(l.absorb(100, &[1; 8]));
        sync(&mut l, 1);
        assert_eq!((l.kept_clusters(), l.ranges), (1, 2));
        logged_and_synced(&mut l, CS, 0, &[2; 8], 2);
        assert_eq!((l.kept_clusters(), l.ranges), (2, 3));
        logged_and_synced(&mut l, 2 * CS, 0, &[3; 8], 3);
        assert_eq!(
            (l.kept_clusters(), l.ranges),
            (2, 3),
            "a fourth range would pass the bound"
        );
        // Joined again and kept again: its ranges counted once, merged.
        assert!(l.absorb(8, &[4; 92]));
        assert_eq!(l.ranges, 3, "a join adds none");
        sync(&mut l, 4);
        assert_eq!(
            (l.kept_clusters(), l.ranges),
            (2, 2),
            "0..108 is one range now"
        );
        assert!(l.may_reuse(CS));
        assert!(!l.absorb(50, &[5; 8]), "inside written bytes: dropped");
        assert_eq!((l.kept_clusters(), l.ranges), (0, 0));
        assert!(l.is_empty());
    }

    #[test]
    fn a_cluster_the_file_holds_counts_only_its_logged_bytes_against_the_transaction_bound() {
        let mut l = LoggedData::new(CS, 8 * CS, 8 * CS);
        logged_and_synced(&mut l, CS, 1000, &[7; 100], 1);
        assert!(l.absorb(CS, &[1; 8]));
        assert!(l.absorb(CS + 4000, &[2; 8]));
        assert_eq!(l.dirty_bytes, 16, "not the 4008 bytes of the span");
        assert_eq!(
            l.take_dirty(2).iter().map(|(_, b)| b.len()).sum::<usize>(),
            16
        );
        assert_eq!(l.dirty_bytes, 0);
        // A fresh cluster's span travels whole, zeros between included.
        assert!(l.log_fresh(2 * CS, 0, &[3; 8]));
        assert!(l.absorb(2 * CS + 4000, &[4; 8]));
        assert_eq!(l.dirty_bytes, 4008);
        assert_eq!(
            l.take_dirty(3),
            vec![(2 * CS, {
                let mut span = vec![0u8; 4008];
                span[..8].fill(3);
                span[4000..].fill(4);
                span
            })]
        );
    }
}
