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
//! Kept clusters: once its transactions are synced, a cluster whose bytes
//! do not fill it stays here (within [`KEPT_BYTES_MAX`]) as a copy of what
//! the file holds, and a later write that reaches bytes never written
//! joins the journal again instead of going in place.
//!
//! Why: the blocks of those bytes were never written (the file was
//! reserved with `fallocate`, or not at all), and the file system converts
//! a block on its first write, which the next `fdatasync` pays for with
//! metadata writes. A guest's in-place writes land at random in the
//! extent tree; the checkpoint writes in offset order. Eight flushing fio
//! jobs on a fresh image (`cache=none`) wrote about four metadata blocks
//! in each `fdatasync`; with kept clusters they ran 0.90-1.03x the
//! preallocated raw file, against 0.84-0.89x (RFC.md 6.2).
//!
//! The rule that keeps this safe: a kept cluster's bytes are the file's
//! bytes of that cluster, whole (its extents, zeros elsewhere: the cluster
//! was fresh when logged, and every write since went through here). So
//! any write into it that does not join the journal drops it first
//! ([`LoggedData::absorb`]), and a cluster is dropped when it is freed
//! ([`LoggedData::may_reuse`]), before anything else can own its bytes.
//! Joined again, it is logged data like any other: the rules above apply,
//! and a crash before its transaction commits leaves the file's bytes,
//! which the kept copy equals.

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
    /// range the entry is a kept copy; with one, a kept cluster written
    /// again, waiting for its next transaction.
    Synced,
}

/// Largest write logged: bigger ones cost more to write twice than the
/// file growth they avoid (ZFS draws the same line at 32 KiB,
/// `zfs_immediate_write_sz`).
pub const LOGGED_WRITE_BYTES_MAX: usize = 32 << 10;

/// Most bytes of synced clusters kept. A fresh 1 GiB image written 4 KiB
/// at random holds 16,384 such clusters of about 4 KiB each: 64 MiB keeps
/// all of them, and past it a cluster is simply not kept (its later
/// writes go in place, as without keeping).
pub const KEPT_BYTES_MAX: u64 = 64 << 20;

/// One cluster's logged bytes.
#[derive(Debug)]
struct Logged {
    /// The bytes written into the cluster, as extents at offsets in the
    /// cluster; the rest of the cluster reads as zeros (a fresh cluster
    /// past the end of the file). Extents, not one span: a cluster written
    /// 4 KiB here and there would otherwise hold up to a cluster of zeros
    /// between them, which counted against the bounds.
    content: Overlay,
    /// Bytes the extents hold.
    len: u64,
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
            dirty: Some((at, at + data.len() as u64)),
            carrier: None,
        }
    }

    /// A synced copy of the file's bytes, carrying nothing.
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

    /// The cluster's bytes `[at, at + out.len())`.
    fn read(&self, at: u64, out: &mut [u8]) {
        out.fill(0);
        self.content.patch(out, at);
    }
}

/// Logged data not yet synced, and kept copies of synced clusters, by
/// cluster offset, with bounds on the bytes held in memory (and so on the
/// data one transaction carries).
#[derive(Debug)]
pub struct LoggedData {
    clusters: BTreeMap<u64, Logged>,
    cluster_size: u64,
    /// Bytes of logged extents held, kept clusters apart.
    held_bytes: u64,
    /// Bytes of kept clusters: at most `kept_bytes_max`.
    kept_bytes: u64,
    /// [`KEPT_BYTES_MAX`] (smaller in tests).
    kept_bytes_max: u64,
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
            kept_bytes: 0,
            kept_bytes_max: KEPT_BYTES_MAX,
            held_bytes_max,
            dirty_clusters: BTreeSet::new(),
            submitted: BTreeMap::new(),
            dirty_bytes: 0,
            dirty_bytes_max,
        }
    }

    /// Clusters held.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// Bytes held (kept clusters apart), and the most that may be.
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
        // A kept copy is dropped when its cluster is freed (`may_reuse`).
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
    /// goes in place, and the copy would no longer be the file's).
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
            let kept = logged.len;
            let joins = !logged.content.covers_range(at, end)
                && data.len() <= LOGGED_WRITE_BYTES_MAX
                && self.held_bytes + kept + data.len() as u64 <= self.held_bytes_max
                && self.dirty_bytes + data.len() as u64 <= self.dirty_bytes_max;
            self.kept_bytes -= kept;
            if !joins {
                // Where every byte was written, so were the blocks: in
                // place costs the file system nothing more.
                self.clusters.remove(&cluster);
                return false;
            }
            self.held_bytes += kept;
        }
        self.held_bytes += logged.put(at, data);
        let (lo, hi) = match logged.dirty {
            Some((lo, hi)) => {
                self.dirty_bytes -= hi - lo;
                (lo.min(at), hi.max(end))
            }
            None => {
                self.dirty_clusters.insert(cluster);
                (at, end)
            }
        };
        self.dirty_bytes += hi - lo;
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
            let mut bytes = vec![0u8; (hi - lo) as usize];
            logged.read(lo, &mut bytes);
            writes.push((cluster + lo, bytes));
        }
        if !taken.is_empty() {
            self.submitted.insert(ticket, taken.into_iter().collect());
        }
        self.dirty_bytes = 0;
        writes
    }

    /// The epoch with `ticket` committed as transaction `seq`.
    pub fn committed(&mut self, ticket: u64, seq: u64) {
        for cluster in self.submitted.remove(&ticket).unwrap_or_default() {
            if let Some(logged) = self.clusters.get_mut(&cluster) {
                if logged.carrier == Some(Carrier::Submitted(ticket)) {
                    logged.carrier = Some(Carrier::Committed(seq));
                }
            }
        }
    }

    /// Forgets the clusters whose every logged byte transactions up to
    /// `synced` put in place, or keeps them as copies of the file's bytes
    /// (those whose bytes do not fill the cluster, within the kept bound).
    pub fn forget_synced(&mut self, synced: u64) {
        let cs = self.cluster_size;
        let (mut done, mut kept) = (0, self.kept_bytes);
        self.clusters.retain(|_, logged| {
            let in_place = logged.dirty.is_none()
                && matches!(logged.carrier, Some(Carrier::Committed(s)) if s <= synced);
            if !in_place {
                return true;
            }
            let len = logged.len;
            done += len;
            if len < cs && kept + len <= self.kept_bytes_max {
                kept += len;
                logged.carrier = Some(Carrier::Synced);
                return true;
            }
            false
        });
        self.held_bytes -= done;
        self.kept_bytes = kept;
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
    /// copy is dropped (its next owner's bytes are not these).
    pub fn may_reuse(&mut self, cluster: u64) -> bool {
        match self.clusters.get(&cluster) {
            Some(logged) if logged.is_kept() => {
                self.kept_bytes -= logged.len;
                self.clusters.remove(&cluster);
                true
            }
            Some(_) => false,
            None => true,
        }
    }

    /// Bytes of kept clusters.
    pub fn kept_bytes(&self) -> u64 {
        self.kept_bytes
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

    /// Fills `buf` with the bytes at file offset `offset` (inside one
    /// cluster) if that cluster holds logged data; false if it does not.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> bool {
        let cs = self.cluster_size;
        let cluster = offset - offset % cs;
        let Some(logged) = self.clusters.get(&cluster) else {
            return false;
        };
        logged.read(offset - cluster, buf);
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
        l.kept_bytes_max = 0; // Synced clusters go (kept ones: below).
        assert!(l.log_fresh(CS, 512, &[7; 512]));
        let mut buf = [9u8; 2048];
        assert!(l.read(&mut buf, CS));
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
        assert!(!l.read(&mut buf, CS), "nothing left");
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
        assert!(l.read(&mut buf, CS + 6));
        assert_eq!(buf, [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        l.take_dirty(1);
        l.committed(1, 1);
        l.forget_synced(1);
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
        l.take_dirty(seq);
        l.committed(seq, seq);
        l.forget_synced(seq);
    }

    #[test]
    fn a_synced_cluster_is_kept_and_a_write_into_bytes_never_written_joins_the_journal_again() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 512, &[7; 512], 1);
        assert!(!l.holds(CS), "synced: the file has the bytes");
        assert_eq!((l.held_bytes().0, l.kept_bytes()), (0, 512));
        let mut buf = [9u8; 1024];
        assert!(l.read(&mut buf, CS), "a kept cluster is read from memory");
        assert_eq!(&buf[..512], &[0; 512]);
        assert_eq!(&buf[512..], &[7; 512]);
        // Into bytes never written: logged again, and only the new bytes
        // travel.
        assert!(l.absorb(CS + 2048, &[8; 100]));
        assert!(l.holds(CS) && l.has_dirty());
        assert_eq!(
            (l.held_bytes().0, l.kept_bytes()),
            (612, 0),
            "no zeros held"
        );
        assert_eq!(l.take_dirty(2), vec![(CS + 2048, vec![8; 100])]);
        assert!(l.may_reuse(2 * CS));
        assert!(!l.may_reuse(CS), "carrying unsynced bytes");
        l.committed(2, 2);
        l.forget_synced(2);
        // Kept again; the bytes between read as zeros, as in the file.
        assert_eq!(l.kept_bytes(), 612);
        let mut buf = [9u8; 2148];
        assert!(l.read(&mut buf, CS));
        assert_eq!(&buf[512..1024], &[7; 512]);
        assert!(buf[1024..2048].iter().all(|&b| b == 0));
        assert_eq!(&buf[2048..], &[8; 100]);
    }

    #[test]
    fn a_write_inside_written_bytes_drops_the_kept_copy_and_goes_in_place() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 512, &[7; 512], 1);
        assert!(
            !l.absorb(CS + 600, &[1; 10]),
            "inside written bytes: in place"
        );
        assert!(l.is_empty(), "the copy would no longer be the file's");
        assert_eq!(l.kept_bytes(), 0);
        let mut buf = [9u8; 16];
        assert!(!l.read(&mut buf, CS + 600), "read from the file");
        // Across a gap between two written extents: logged; inside one of
        // them: in place.
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        logged_and_synced(&mut l, CS, 0, &[7; 512], 1);
        assert!(l.absorb(CS + 1024, &[8; 512]), "past the written bytes");
        l.take_dirty(2);
        l.committed(2, 2);
        l.forget_synced(2);
        assert_eq!(l.kept_bytes(), 1024);
        assert!(
            l.absorb(CS + 256, &[9; 1024]),
            "the gap at 512..1024 was never written"
        );
        l.take_dirty(3);
        l.committed(3, 3);
        l.forget_synced(3);
        assert!(!l.absorb(CS + 1034, &[1; 10]), "every byte written");
        assert!(l.is_empty());
        // Past the bounds: dropped as well.
        let mut l = LoggedData::new(CS, 1024, 4 * CS);
        logged_and_synced(&mut l, CS, 0, &[7; 512], 1);
        assert!(!l.absorb(CS + 2048, &[8; 600]), "past the held bound");
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
        assert!(l.is_empty() && l.kept_bytes() == 0);
        assert!(l.log_fresh(CS, 1024, &[5; 8]), "a fresh cluster again");
        let mut buf = [9u8; 8];
        assert!(l.read(&mut buf, CS));
        assert_eq!(buf, [0; 8], "nothing of the old owner's bytes");
    }

    #[test]
    fn a_full_cluster_is_not_kept_nor_more_than_the_bound() {
        let mut l = LoggedData::new(CS, 4 * CS, 4 * CS);
        l.kept_bytes_max = 1000;
        logged_and_synced(&mut l, 0, 0, &[1; CS as usize], 1);
        assert!(l.is_empty(), "every block written: nothing to gain");
        logged_and_synced(&mut l, CS, 0, &[2; 600], 2);
        logged_and_synced(&mut l, 2 * CS, 0, &[3; 600], 3);
        assert_eq!(l.len(), 1, "the second would pass the bound");
        assert_eq!(l.kept_bytes(), 600);
        assert!(!l.absorb(2 * CS + 1000, &[4; 4]), "not kept: in place");
    }

    #[test]
    fn each_submit_and_commit_concerns_only_its_own_clusters() {
        let mut l = LoggedData::new(CS, 8 * CS, 8 * CS);
        l.kept_bytes_max = 0;
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
}
