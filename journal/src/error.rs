//! The journal's error type.

use std::io;

use qj_spec::journal::JournalFormatError;

/// Everything the journal can fail with. Variants name the field, the
/// sequence number and the device offset involved.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The device failed.
    #[error("device {operation} at offset {offset} failed: {source}")]
    Io {
        /// "read", "write" or "flush".
        operation: &'static str,
        /// Device offset of the request (0 for a flush).
        offset: u64,
        /// The device's error.
        #[source]
        source: io::Error,
    },
    /// Bytes on the device do not decode.
    #[error("malformed journal structure at device offset {device_offset}: {source}")]
    Format {
        /// Device offset of the structure whose field is wrong (the error
        /// inside gives the field's offset within it).
        device_offset: u64,
        /// What is wrong.
        #[source]
        source: JournalFormatError,
    },
    /// Neither header slot is valid: this region holds no journal.
    #[error("no valid journal header at device offset {device_offset}: slot 0: {slot0}; slot 1: {slot1}")]
    NoValidHeader {
        /// Device offset of the region.
        device_offset: u64,
        /// Why slot 0 was refused.
        slot0: Box<JournalFormatError>,
        /// Why slot 1 was refused.
        slot1: Box<JournalFormatError>,
    },
    /// The newest sealed header slot (magic and checksum hold) has a field
    /// this implementation cannot accept. The older slot is not used
    /// instead: it may describe a log that no longer exists.
    #[error(
        "journal header slot {slot} at device offset {device_offset} is refused: {source}; \
         the older slot is not used in its place (it may not describe the current log)"
    )]
    RefusedHeader {
        /// The slot in charge (0 or 1).
        slot: usize,
        /// Device offset of the slot.
        device_offset: u64,
        /// What is wrong with it.
        #[source]
        source: JournalFormatError,
    },
    /// A caller-given parameter is out of range.
    #[error("invalid journal parameter `{field}` = {value}: {reason}")]
    Parameter {
        /// The parameter.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A transaction that was durably committed (a later transaction says
    /// so) fails its checks: the log is damaged in the middle. Nothing was
    /// written; open with `salvage` to apply the valid prefix anyway.
    #[error(
        "journal damaged in the middle: transaction {seq} at device offset {device_offset} fails ({reason}), \
         but transaction {evidence_seq} proves it was committed"
    )]
    CorruptLog {
        /// The damaged transaction.
        seq: u64,
        /// Where it starts on the device.
        device_offset: u64,
        /// Why it was refused.
        reason: String,
        /// A later transaction whose `durable_seq` covers `seq`.
        evidence_seq: u64,
    },
    /// A transaction passes its checksums but breaks the format rules (a
    /// descriptor overrunning its block, a target outside the device): the
    /// writer was buggy or foreign. Nothing was written.
    #[error("invalid transaction {seq} at device offset {device_offset}: {source}")]
    InvalidTransaction {
        /// The transaction.
        seq: u64,
        /// Device offset of the transaction's first block (the inner error's
        /// offset is relative to it).
        device_offset: u64,
        /// What is wrong.
        #[source]
        source: JournalFormatError,
    },
    /// A transaction handed to commit breaks a rule; it was not committed.
    #[error("transaction refused: {reason} (range {offset:#x}+{length:#x})")]
    Refused {
        /// Which rule.
        reason: &'static str,
        /// Start of the offending range.
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// A descriptor of a transaction handed to commit breaks the format
    /// (a target outside the device or inside the journal, say).
    #[error("transaction refused: descriptor {index}: {source}")]
    RefusedDescriptor {
        /// Position of the descriptor in the transaction.
        index: usize,
        /// What is wrong.
        #[source]
        source: JournalFormatError,
    },
    /// The ring has no room and the journal was told not to checkpoint by
    /// itself: call `checkpoint` and commit again.
    #[error("journal full: transaction needs {needed_blocks} blocks, {free_blocks} of {ring_blocks} free")]
    Full {
        /// Blocks the transaction needs.
        needed_blocks: u64,
        /// Blocks free now.
        free_blocks: u64,
        /// Blocks in the ring.
        ring_blocks: u64,
    },
    /// The transaction is larger than the whole ring.
    #[error("transaction of {needed_blocks} blocks can never fit a ring of {ring_blocks} blocks")]
    TooLarge {
        /// Blocks the transaction needs.
        needed_blocks: u64,
        /// Blocks in the ring.
        ring_blocks: u64,
    },
    /// The journal was opened with `ReplayMode::InMemory` and writes nothing.
    #[error("journal is open read-only (in-memory replay)")]
    ReadOnly,
    /// An earlier device failure left the journal in an unknown state; it
    /// refuses everything until it is reopened (which replays).
    #[error("journal stopped after an earlier failure: {reason}")]
    Poisoned {
        /// The first failure.
        reason: String,
    },
    /// A flush-only item ([`crate::Journal::flush_enqueue`]) promises every
    /// transaction queued before it durable; one of them failed and never
    /// will be, so the flush cannot be acknowledged.
    #[error(
        "flush refused: {failed} transaction(s) queued before it failed and will never be \
         durable (the first: {first})"
    )]
    EarlierCommitFailed {
        /// Transactions answered with an error since the journal opened.
        failed: u64,
        /// The first one's error.
        first: String,
    },
    /// The dedup consumer refused an entry during replay.
    #[error("dedup consumer failed on transaction {seq}: {reason}")]
    Dedup {
        /// The transaction.
        seq: u64,
        /// The consumer's message.
        reason: String,
    },
}

impl JournalError {
    pub(crate) fn io(operation: &'static str, offset: u64, source: io::Error) -> Self {
        Self::Io {
            operation,
            offset,
            source,
        }
    }

    pub(crate) fn format(device_offset: u64, source: JournalFormatError) -> Self {
        Self::Format {
            device_offset,
            source,
        }
    }
}
