//! The guest data ranges an epoch newly references, with the checksum of
//! their bytes taken from the write's own buffer where that is still what
//! the disk holds.
//!
//! A journal checksums each such range in the transaction that links it
//! (rule 2 of `backend/journal.rs`). Reading the bytes back at submit time
//! costs a device read per new cluster under the exclusive gate (with
//! `cache=none`, an O_DIRECT read each); the write that put them there
//! already had them. A checksum taken at write time stays right only while
//! nothing else writes into the range before the epoch is gathered, so
//! every guest data write into a cluster that has a range here drops that
//! range's checksum (the submit then reads it back, as before).

use std::collections::HashMap;

use crate::backend::NewData;
use crate::sync::{AtomicUsize, Ordering};

/// Ranges newly referenced since the last persist.
#[derive(Debug, Default)]
pub(super) struct NewDataLog {
    ranges: Vec<NewData>,
    /// Cluster start to the index of its newest range in `ranges`: the only
    /// range of that cluster that may still carry a checksum.
    by_cluster: HashMap<u64, usize>,
}

impl NewDataLog {
    /// Records a range; `crc32c` is of the bytes just written there, if the
    /// caller has them. An older range of the same cluster loses its
    /// checksum: this write may have changed its bytes.
    pub(super) fn push(&mut self, cluster_size: u64, range: NewData, held: &AtomicUsize) {
        let cluster = range.offset.0 - range.offset.0 % cluster_size;
        if let Some(&older) = self.by_cluster.get(&cluster) {
            self.ranges[older].crc32c = None;
        }
        self.by_cluster.insert(cluster, self.ranges.len());
        self.ranges.push(range);
        held.store(self.ranges.len(), Ordering::SeqCst);
    }

    /// A guest data write landed in the cluster at `cluster_start`: its
    /// range, if any, is checksummed from the disk at submit.
    pub(super) fn overwritten(&mut self, cluster_start: u64) {
        if let Some(&newest) = self.by_cluster.get(&cluster_start) {
            self.ranges[newest].crc32c = None;
        }
    }

    /// Takes the epoch's ranges (under the exclusive gate).
    pub(super) fn take(&mut self, held: &AtomicUsize) -> Vec<NewData> {
        self.by_cluster.clear();
        held.store(0, Ordering::SeqCst);
        std::mem::take(&mut self.ranges)
    }
}
