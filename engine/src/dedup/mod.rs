//! Inline deduplication of whole clusters (spec `qjournal.md` §3.6).
//!
//! A write that covers a whole cluster is hashed ([`hash`]); if the
//! in-memory [`index`] knows a cluster with that content, the guest
//! cluster is mapped to it and its refcount rises by one, and nothing is
//! written for the data. The index changes travel as dedup descriptors in
//! the same journal transaction as the L2 entries and refcounts they
//! describe, so after a crash the index replayed from the journal agrees
//! with the metadata replayed with it. The image side of it (write path,
//! copied flags, open) is `image/dedup.rs`.

pub mod hash;
pub mod index;

pub use hash::{cluster_hash, ClusterHash, HASH_ALGORITHM_SHA256};
pub use index::{DedupChange, DedupIndex, DedupStats};
