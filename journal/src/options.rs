//! How a journal is opened and how it commits.

/// How commit makes a transaction durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum CommitProtocol {
    /// Write every block of the batch, commit blocks included, then flush
    /// once. A crash before the flush returns may keep any subset of the
    /// blocks; replay detects that with the transaction checksum in the
    /// commit block and drops the transaction.
    SingleFlush,
    /// The 2013 draft's order: write descriptor and data blocks, flush,
    /// write the commit blocks, flush. Costs a second flush per batch; the
    /// commit block then only ever describes blocks already durable.
    TwoFlush,
}

/// What opening does with committed but unsynced transactions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum ReplayMode {
    /// Write them to their targets, flush, and start a fresh log.
    Apply,
    /// Write nothing: collect the writes replay would make in an
    /// [`crate::Overlay`] (for a read-only open of a dirty image). The
    /// journal is then read-only.
    InMemory,
}

/// What commit does when the ring has no room.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum WhenFull {
    /// Run a checkpoint inside the commit and retry.
    Checkpoint,
    /// Fail with [`crate::JournalError::Full`].
    Fail,
}

/// Deliberate bugs for the crash harness; never set them otherwise.
///
/// Each one breaks exactly one rule of `spec/qjournal.md` §10-11 at the
/// one place the journal enforces it, so that the crash harness can prove
/// it notices (`qj crash --mutate NAME`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Mutation {
    /// Correct behaviour.
    #[default]
    None,
    /// `replay-skips-tx-checksum`: the scan accepts a transaction whose
    /// whole-transaction checksum (in the commit block, over every block
    /// before it) does not match, so a partly written transaction is
    /// replayed with whatever its missing blocks hold (`scan.rs`).
    ReplaySkipsTxChecksum,
    /// `replay-ignores-revokes`: replay applies writes that a later
    /// transaction of the log revoked (`replay.rs`, pass 2).
    ReplayIgnoresRevokes,
    /// `checkpoint-before-flush`: checkpoint writes the header advancing
    /// the synced sequence number without first flushing its in-place
    /// writes, so the header may be durable while they are not
    /// (`checkpoint.rs`).
    CheckpointBeforeFlush,
}

/// Options for [`crate::Journal::create`] and [`crate::Journal::open`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// Every device range a descriptor writes or reads must end at or
    /// below this (besides lying outside the journal).
    pub device_limit_bytes: u64,
    /// The commit protocol.
    pub commit_protocol: CommitProtocol,
    /// Behaviour of a commit that finds the ring full.
    pub when_full: WhenFull,
    /// [`crate::Journal::needs_checkpoint`] turns true at this fill level.
    pub checkpoint_threshold_percent: u8,
    /// Most transactions waiting for the group-commit leader; more
    /// committers block until the queue drains.
    pub queue_capacity: usize,
    /// Longest a group-commit writer waits for the recently active
    /// committers to queue before writing a batch (also never more than
    /// `GATHER_BATCH_TIMES` times the last batch's duration,
    /// `group_commit.rs`; zero disables gathering). A lone committer never
    /// waits.
    pub group_commit_gather_max: std::time::Duration,
    /// What open does with a dirty log.
    pub replay_mode: ReplayMode,
    /// When the log is damaged in the middle (a committed transaction is
    /// lost), apply the valid prefix instead of refusing to open.
    pub salvage: bool,
    /// A deliberate bug for the crash harness; [`Mutation::None`] except
    /// in harness runs that must show the bug is caught.
    pub mutation: Mutation,
}

impl JournalOptions {
    /// Defaults: single-flush commit, checkpoint when full, threshold 50%,
    /// queue of 1024, gathering for at most 1 ms, replay by applying, no
    /// salvage, no mutation.
    #[must_use]
    pub fn new(device_limit_bytes: u64) -> Self {
        Self {
            device_limit_bytes,
            commit_protocol: CommitProtocol::SingleFlush,
            when_full: WhenFull::Checkpoint,
            checkpoint_threshold_percent: 50,
            queue_capacity: 1024,
            group_commit_gather_max: std::time::Duration::from_millis(1),
            replay_mode: ReplayMode::Apply,
            salvage: false,
            mutation: Mutation::None,
        }
    }
}
