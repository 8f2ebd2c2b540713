//! The qjournal: a ring of journal blocks holding transactions of metadata
//! updates, with commit, checkpoint and replay, over any [`Storage`].
//!
//! This crate knows nothing of qcow2; the engine embeds it.

pub mod storage;

pub use storage::{FileStorage, MemStorage, Storage};
