//! Dedup descriptors are not applied to the device: replay hands them, in
//! log order, to a consumer the caller registers (the owner of the dedup
//! hash table).

use qj_spec::journal::DedupEntry;

/// Insertion or deletion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum DedupOp {
    /// The hash now maps to the entry's host offset.
    Insert,
    /// The mapping from the hash to the entry's host offset is gone.
    Delete,
}

/// One dedup descriptor entry found by replay.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupEvent {
    /// The transaction carrying it.
    pub seq: u64,
    /// Insert or delete.
    pub op: DedupOp,
    /// The entry.
    pub entry: DedupEntry,
}

/// Receives the dedup entries of replayed transactions, in order. Replay
/// may run again after a crash during replay, so a consumer must treat
/// inserting a mapping that exists and deleting one that does not as
/// no-ops.
pub trait DedupConsumer {
    /// Says, without taking it, whether the consumer can take `event`.
    /// Replay asks this of every entry of the replayed log before it writes
    /// anything, so that a log the consumer cannot take is refused with the
    /// device untouched (spec 8.5).
    fn admits(&self, event: &DedupEvent) -> Result<(), String> {
        let _ = event;
        Ok(())
    }

    /// Takes one entry; an `Err` stops replay before anything more is
    /// applied.
    fn consume(&mut self, event: &DedupEvent) -> Result<(), String>;
}

/// Collects the events, for callers that handle them after open.
impl DedupConsumer for Vec<DedupEvent> {
    fn consume(&mut self, event: &DedupEvent) -> Result<(), String> {
        self.push(event.clone());
        Ok(())
    }
}

/// A consumer for callers without dedup: any dedup entry in the log is an
/// error, since dropping it silently would lose a committed update.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDedup;

impl DedupConsumer for NoDedup {
    fn admits(&self, event: &DedupEvent) -> Result<(), String> {
        Err(format!(
            "dedup {:?} of host offset {:#x} found, but no dedup consumer was registered",
            event.op, event.entry.host_offset
        ))
    }

    fn consume(&mut self, event: &DedupEvent) -> Result<(), String> {
        self.admits(event)
    }
}
