//! The qjournal: a ring of journal blocks holding transactions of metadata
//! updates, with commit, checkpoint and replay, over any [`Storage`].
//!
//! This crate knows nothing of qcow2; the engine embeds it. The on-disk
//! format is `qj_spec::journal`, specified in `spec/qjournal.md`.
//!
//! * [`Journal::create`] formats a region, [`Journal::open`] replays it.
//! * [`Journal::commit`] makes a [`Transaction`] durable (group commit:
//!   concurrent committers share flushes).
//! * [`Journal::checkpoint`] applies committed transactions in place and
//!   frees their ring space.
//! * [`dump`] describes a region, torn or not, for `qj journal dump`.

#![warn(missing_docs)]

mod apply;
mod checkpoint;
mod commit;
mod dedup;
mod direct;
mod dump;
mod error;
mod file_length;
mod group_commit;
mod guards;
mod journal;
mod options;
mod overlay;
mod region;
mod replay;
mod revoke;
mod ring;
mod scan;
mod stats;
pub mod storage;
pub mod sync;
mod transaction;

pub use apply::DataChecksumMismatch;
pub use checkpoint::CheckpointReport;
pub use commit::CommitTicket;
pub use dedup::{DedupConsumer, DedupEvent, DedupOp, NoDedup};
pub use direct::DirectFileStorage;
pub use dump::{
    dump, CopyChunkDump, DataChecksumDump, DedupEntryDump, DescriptorDump, HeaderDump, JournalDump,
    RangeDump, SlotDump, TransactionDump, WriteChunkDump,
};
pub use error::JournalError;
pub use group_commit::{BatchPipeline, GroupCommit};
pub use journal::{Journal, JournalFill};
pub use options::{CommitProtocol, JournalOptions, Mutation, ReplayMode, WhenFull};
pub use overlay::Overlay;
pub use replay::{LogEndReport, ReplayReport};
pub use revoke::RevokeTable;
pub use scan::LogEndKind;
pub use stats::JournalStats;
pub use storage::{FileStorage, MemStorage, Storage};
pub use transaction::Transaction;
