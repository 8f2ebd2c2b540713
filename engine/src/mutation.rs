//! Deliberate ordering bugs, one enum per backend, for the crash harness
//! only: every rule a backend enforces has a mutation that breaks it, and
//! the harness must catch each (`model-checks/MUTATIONS.md`). They live
//! apart from the backends so that [`crate::options`] can name them
//! without depending on a backend.

/// Ordering bugs the crash harness must catch: off unless a test or
/// `qj crash --mutate` asks for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OrderingMutation {
    /// Correct behaviour.
    #[default]
    None,
    /// Rule 2 broken: L2/L1 entries written without first flushing the
    /// refcount increase.
    SkipRefcountFlush,
    /// Rule 3 broken: L2 entries made durable before the guest data: the
    /// tables are written before the flush that covers the data.
    TablesBeforeData,
    /// QEMU's snapshot order broken: `snapshot -c` writes the L1 copy and
    /// the snapshot table (and switches the header to it) before the
    /// refcount increments and cleared COPIED flags are durable.
    SnapshotTableFirst,
}

/// Deliberate bugs in the journalled backend, for the crash harness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum JournalMutation {
    /// Correct behaviour.
    #[default]
    None,
    /// Rule 2 broken: single-flush commits without data checksums.
    SkipDataChecksums,
    /// Rule 5 broken: freed metadata clusters are not revoked.
    SkipRevokes,
    /// Rule 1 broken: the journal-dirty bit is never set.
    SkipDirtyBit,
    /// Rule 6 broken: a write into the untouched bytes of a pending
    /// delayed copy does not make the copy first (the copy, applied later,
    /// overwrites the write).
    SkipCopyBeforeWrite,
    /// Rule 7 broken: a write into a logged cluster whose bytes are already
    /// in a submitted transaction goes in place (the older logged bytes,
    /// applied later, overwrite it).
    WriteLoggedInPlace,
    /// Kept clusters broken (`logged_data.rs`): the transaction of a kept
    /// cluster joined again carries its dirty span whole, zeros where the
    /// file holds bytes it did not log (checkpoint and replay write the
    /// zeros over them).
    LoggedZerosOverKept,
    /// Dedup broken: a write that finds its content in the index maps the
    /// existing cluster without raising its refcount (the cluster is freed
    /// while still mapped).
    DedupSkipIncrement,
    /// Dedup broken: a cluster whose refcount reaches zero leaves the index
    /// without a deletion in the journal (a replayed index names a free,
    /// later reused, cluster).
    DedupSkipDeletion,
    /// Snapshot atomicity broken: each step of a snapshot operation is
    /// committed as a transaction of its own (as flush ordering persists
    /// them), so a crash can leave half an operation.
    SnapshotStepsSplit,
    /// Bitmap rule broken (spec 11.6): the bitmap changes of an epoch are
    /// committed one transaction late, not with the L2 changes they
    /// describe.
    BitmapOutsideTransaction,
    /// A rule of the journal itself broken (replay or checkpoint), passed
    /// to it in [`qj_journal::JournalOptions::mutation`].
    Journal(qj_journal::Mutation),
}
