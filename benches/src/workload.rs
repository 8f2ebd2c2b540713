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
        }
    }

    /// Parses a name; the error lists the valid ones.
    pub fn parse(name: &str) -> Result<Workload, String> {
        Self::ALL
            .iter()
            .copied()
            .find(|w| w.name() == name)
            .ok_or_else(|| {
                let valid: Vec<_> = Self::ALL.iter().map(|w| w.name()).collect();
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
        )
    }

    /// Whether the workload writes clusters that are not yet allocated.
    pub fn allocates(&self) -> bool {
        !matches!(
            self,
            Workload::Overwrite | Workload::OverwriteSync | Workload::Read
        )
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
