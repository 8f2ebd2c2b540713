//! Where metadata lives: every host cluster that holds qcow2 or journal
//! metadata, and what kind, in one map kept current as tables move.
//!
//! The overlap guard asks it before guest data is written to a host
//! cluster, before a data reference to a cluster is dropped, and before
//! the allocator hands a cluster out: a corrupt entry (an L2 entry naming
//! an L1 table, a refcount of zero on an L2 table) must never let guest
//! bytes or a new table land on metadata. QEMU's `overlap-check=all`
//! covers the same structures (`qcow2_check_metadata_overlap`); here each
//! guard is one lookup in an ordered map of runs, not a scan of tables.
//!
//! Kept current by the owners of each structure: the refcount side
//! (refcount table moves, new refcount blocks), the image (L2 tables, L1
//! moves, the journal). A run is removed when its clusters are freed, so a
//! freed table's cluster becomes allocatable like any other.

use std::collections::BTreeMap;
use std::fmt;

use qj_spec::units::HostCluster;

/// The kind of metadata a host cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetadataKind {
    /// The qcow2 header cluster (with its extensions and backing name).
    Header,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The active L1 table.
    ActiveL1,
    /// An L2 table, active or reachable from a snapshot only.
    L2Table,
    /// The snapshot table.
    SnapshotTable,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// A cluster of bitmap data (bits, named by a bitmap table).
    BitmapData,
    /// The qjournal region.
    Journal,
}

impl MetadataKind {
    /// The structure's name as QEMU's overlap message spells it
    /// ("Preventing invalid write on metadata (overlaps with active L1 table)").
    pub fn name(self) -> &'static str {
        match self {
            MetadataKind::Header => "qcow2_header",
            MetadataKind::RefcountTable => "refcount table",
            MetadataKind::RefcountBlock => "refcount block",
            MetadataKind::ActiveL1 => "active L1 table",
            MetadataKind::L2Table => "L2 table",
            MetadataKind::SnapshotTable => "snapshot table",
            MetadataKind::SnapshotL1 => "inactive L1 table",
            MetadataKind::BitmapDirectory => "bitmap directory",
            MetadataKind::BitmapTable => "bitmap table",
            MetadataKind::BitmapData => "bitmap data",
            MetadataKind::Journal => "qjournal",
        }
    }
}

impl fmt::Display for MetadataKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One run of metadata clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    clusters: u64,
    kind: MetadataKind,
    /// How many structures claim this run: an L2 table shared by the active
    /// L1 and a snapshot's is one cluster with two owners, and stays
    /// metadata until both let go.
    owners: u32,
}

/// Every metadata cluster of an image, as runs keyed by their first
/// cluster. Runs never overlap: a structure inserted over another is a
/// corrupt image, reported by [`MetadataMap::insert`].
#[derive(Debug, Default, Clone)]
pub struct MetadataMap {
    runs: BTreeMap<u64, Run>,
}

/// Two structures claim the same cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overlap {
    /// The first cluster both claim.
    pub cluster: HostCluster,
    /// What already holds it.
    pub existing: MetadataKind,
    /// What was being added.
    pub added: MetadataKind,
}

impl MetadataMap {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `clusters` clusters from `first` as holding `kind`. The same
    /// run of the same kind inserted again gains an owner (shared L2
    /// tables); anything else overlapping is an error and changes nothing.
    pub fn insert(
        &mut self,
        first: HostCluster,
        clusters: u64,
        kind: MetadataKind,
    ) -> Result<(), Overlap> {
        let clusters = clusters.max(1);
        if let Some(run) = self.runs.get_mut(&first.0) {
            if run.kind == kind && run.clusters == clusters {
                run.owners = run.owners.saturating_add(1);
                return Ok(());
            }
        }
        if let Some((cluster, existing)) = self.overlapping(first, clusters) {
            return Err(Overlap {
                cluster,
                existing,
                added: kind,
            });
        }
        self.runs.insert(
            first.0,
            Run {
                clusters,
                kind,
                owners: 1,
            },
        );
        Ok(())
    }

    /// Drops one owner of the run starting at `first`; the run leaves the
    /// map with its last owner. Returns the kind it held, if any.
    pub fn remove(&mut self, first: HostCluster) -> Option<MetadataKind> {
        let run = self.runs.get_mut(&first.0)?;
        let kind = run.kind;
        run.owners -= 1;
        if run.owners == 0 {
            self.runs.remove(&first.0);
        }
        Some(kind)
    }

    /// What `cluster` holds, if it is metadata.
    pub fn kind_of(&self, cluster: HostCluster) -> Option<MetadataKind> {
        let (&start, run) = self.runs.range(..=cluster.0).next_back()?;
        (cluster.0 < start + run.clusters).then_some(run.kind)
    }

    /// A metadata cluster in `[first, first + clusters)`, with its kind:
    /// the first one when a single run overlaps (the usual case), else one
    /// of them. One ordered-map search: runs never overlap, so the last run
    /// that starts before the end of the range is the only one that can
    /// reach into it from the left, and any run starting inside the range
    /// is found by the same search.
    pub fn overlapping(
        &self,
        first: HostCluster,
        clusters: u64,
    ) -> Option<(HostCluster, MetadataKind)> {
        if clusters == 0 {
            return None;
        }
        let end = first.0.saturating_add(clusters);
        let (&start, run) = self.runs.range(..end).next_back()?;
        if start + run.clusters <= first.0 {
            return None;
        }
        Some((HostCluster(start.max(first.0)), run.kind))
    }

    /// Number of runs (for statistics and tests).
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Every run, in cluster order: (first cluster, clusters, kind).
    pub fn runs(&self) -> impl Iterator<Item = (HostCluster, u64, MetadataKind)> + '_ {
        self.runs
            .iter()
            .map(|(&start, run)| (HostCluster(start), run.clusters, run.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_run_holding_a_cluster() {
        let mut map = MetadataMap::new();
        map.insert(HostCluster(0), 1, MetadataKind::Header).unwrap();
        map.insert(HostCluster(3), 2, MetadataKind::ActiveL1)
            .unwrap();
        assert_eq!(map.kind_of(HostCluster(0)), Some(MetadataKind::Header));
        assert_eq!(map.kind_of(HostCluster(1)), None);
        assert_eq!(map.kind_of(HostCluster(4)), Some(MetadataKind::ActiveL1));
        assert_eq!(map.kind_of(HostCluster(5)), None);
        assert_eq!(
            map.overlapping(HostCluster(1), 3),
            Some((HostCluster(3), MetadataKind::ActiveL1))
        );
        assert_eq!(map.overlapping(HostCluster(1), 2), None);
        assert_eq!(map.overlapping(HostCluster(0), 0), None, "an empty range");
    }

    #[test]
    fn a_different_structure_over_a_run_is_refused_and_changes_nothing() {
        let mut map = MetadataMap::new();
        map.insert(HostCluster(4), 4, MetadataKind::RefcountTable)
            .unwrap();
        let err = map
            .insert(HostCluster(6), 1, MetadataKind::L2Table)
            .unwrap_err();
        assert_eq!(err.existing, MetadataKind::RefcountTable);
        assert_eq!(err.cluster, HostCluster(6));
        assert_eq!(map.len(), 1);
        assert!(map
            .insert(HostCluster(2), 3, MetadataKind::L2Table)
            .is_err());
    }

    #[test]
    fn a_shared_table_stays_until_its_last_owner_lets_go() {
        let mut map = MetadataMap::new();
        map.insert(HostCluster(9), 1, MetadataKind::L2Table)
            .unwrap();
        map.insert(HostCluster(9), 1, MetadataKind::L2Table)
            .unwrap();
        assert_eq!(map.remove(HostCluster(9)), Some(MetadataKind::L2Table));
        assert_eq!(map.kind_of(HostCluster(9)), Some(MetadataKind::L2Table));
        assert_eq!(map.remove(HostCluster(9)), Some(MetadataKind::L2Table));
        assert_eq!(map.kind_of(HostCluster(9)), None);
        assert_eq!(map.remove(HostCluster(9)), None);
    }
}
