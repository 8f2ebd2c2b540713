//! Where each guest cluster's content comes from, as a disk reports it:
//! what lets the harness check only what differs between two crash states
//! of one crash point (see [`crate::checks::observe_changed`]).

/// The source of one guest cluster's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentSource {
    /// Reads as zeros.
    Zero,
    /// Reads as the backing file at the same guest offset.
    Backing,
    /// Reads as the device holds it at this byte offset.
    Host(u64),
    /// Anything else (compressed, or the disk cannot say): always read.
    Opaque,
}

/// The sources of every guest cluster of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentMap {
    /// Bytes per guest cluster (a multiple of the sector size).
    pub cluster_bytes: u64,
    /// One source per cluster, in guest order; the last cluster may be
    /// partial.
    pub sources: Vec<ContentSource>,
}
