//! The workloads, by name.

use std::fmt;

/// One benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// 4 KiB writes, each to a new cluster, each followed by a flush.
    AllocSync4k,
    /// Whole-cluster writes to new clusters, each followed by a flush.
    AllocSyncCluster,
    /// 4 KiB writes to new clusters, one flush at the end.
    AllocBatch,
    /// 4 KiB writes to already allocated clusters, one flush at the end.
    Overwrite,
    /// 4 KiB writes to already allocated clusters, each followed by a
    /// flush: nothing to allocate, so a preallocated raw file is the limit.
    OverwriteSync,
    /// 4 KiB reads of allocated clusters.
    Read,
    /// Synced 4 KiB allocating writes from several threads (one row per
    /// thread count).
    ThreadsSync,
    /// Whole-cluster writes to new clusters, none repeating content written
    /// before, one flush at the end (opt-in: not in `ALL`): what hashing
    /// costs when deduplication finds nothing.
    Dedup0,
    /// [`Workload::Dedup0`] with a flush after each write.
    Dedup0Sync,
    /// Whole-cluster writes to new clusters, half of them repeating content
    /// written before, one flush at the end (opt-in: not in `ALL`).
    Dedup50,
    /// [`Workload::Dedup50`] with a flush after each write.
    Dedup50Sync,
    /// Whole-cluster writes to new clusters, 90% of them repeating content
    /// written before, one flush at the end (opt-in: not in `ALL`).
    Dedup90,
    /// [`Workload::Dedup90`] with a flush after each write.
    Dedup90Sync,
}

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 7] = [
        Workload::AllocSync4k,
        Workload::AllocSyncCluster,
        Workload::AllocBatch,
        Workload::Overwrite,
        Workload::OverwriteSync,
        Workload::Read,
        Workload::ThreadsSync,
    ];

    /// Workloads run only when named: deduplication, whose whole-cluster
    /// writes would more than double the default run.
    pub const OPT_IN: [Workload; 6] = [
        Workload::Dedup0,
        Workload::Dedup0Sync,
        Workload::Dedup50,
        Workload::Dedup50Sync,
        Workload::Dedup90,
        Workload::Dedup90Sync,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Workload::AllocSync4k => "alloc-sync-4k",
            Workload::AllocSyncCluster => "alloc-sync-cluster",
            Workload::AllocBatch => "alloc-batch",
            Workload::Overwrite => "overwrite",
            Workload::OverwriteSync => "overwrite-sync",
            Workload::Read => "read",
            Workload::ThreadsSync => "threads-sync",
            Workload::Dedup0 => "dedup-0",
            Workload::Dedup0Sync => "dedup-0-sync",
            Workload::Dedup50 => "dedup-50",
            Workload::Dedup50Sync => "dedup-50-sync",
            Workload::Dedup90 => "dedup-90",
            Workload::Dedup90Sync => "dedup-90-sync",
        }
    }

    /// Parses a name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Workload, String> {
        Self::ALL
            .iter()
            .chain(&Self::OPT_IN)
            .copied()
            .find(|w| w.name() == name)
            .ok_or_else(|| {
                let valid: Vec<_> = Self::ALL
                    .iter()
                    .chain(&Self::OPT_IN)
                    .map(|w| w.name())
                    .collect();
                format!("unknown workload {name:?}; valid: {}", valid.join(", "))
            })
    }

    /// Whether each operation is followed by a flush.
    pub fn synced(&self) -> bool {
        matches!(
            self,
            Workload::AllocSync4k
                | Workload::AllocSyncCluster
                | Workload::OverwriteSync
                | Workload::ThreadsSync
                | Workload::Dedup0Sync
                | Workload::Dedup50Sync
                | Workload::Dedup90Sync
        )
    }

    /// Whether the workload writes clusters that are not yet allocated.
    pub fn allocates(&self) -> bool {
        !matches!(
            self,
            Workload::Overwrite | Workload::OverwriteSync | Workload::Read
        )
    }

    /// The share of writes, in percent, that repeat content written before
    /// in the same run; `None` for workloads whose content does not vary.
    pub fn duplicate_percent(&self) -> Option<u64> {
        match self {
            Workload::Dedup0 | Workload::Dedup0Sync => Some(0),
            Workload::Dedup50 | Workload::Dedup50Sync => Some(50),
            Workload::Dedup90 | Workload::Dedup90Sync => Some(90),
            _ => None,
        }
    }

    /// Bytes of one request: whole clusters for the cluster workloads,
    /// 4 KiB for the others.
    pub fn request_bytes(&self, cluster_size: u64) -> u64 {
        if *self == Workload::AllocSyncCluster || self.duplicate_percent().is_some() {
            cluster_size
        } else {
            4096
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
