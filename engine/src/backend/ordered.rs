//! The flush-ordering backend: metadata written in place, in dependency
//! order, with a device flush between dependent groups. This is how QEMU
//! keeps qcow2 consistent today (seeds 000 and 001).
//!
//! The ordering rules, all enforced in `FlushOrdering::persist`:
//!
//! 1. A fresh refcount block or refcount table is durable before anything
//!    points to it (flush after `fresh_refcount`), and the pointer to it is
//!    durable before any count inside it is relied upon (flush after
//!    `refcount_links`). Otherwise a crash leaves a table entry pointing to
//!    garbage, or counts that nothing reaches.
//! 2. A refcount increase is durable before any L2 or L1 entry references
//!    the cluster (flush after `refcount_blocks`). Otherwise a crash leaves
//!    an entry pointing to a cluster with refcount 0, which the next
//!    allocation hands out again: two owners of one cluster.
//! 3. Guest data is durable before the L2 entry that makes it visible: the
//!    same flush (after `refcount_blocks`) covers every data write that
//!    completed before `persist` was called. Otherwise a crash shows stale
//!    bytes of a reused cluster, or zeros where backing data belonged.
//! 4. A fresh L2 or L1 table is durable before the entry or header write
//!    that links it (it is written with the refcount blocks, before that
//!    flush), and a new L1 table is switched to by one header write.
//! 5. On free, the cleared entry is durable before the refcount drops: the
//!    image defers decrements until after `persist` returns (see
//!    [`MetadataBackend::defers_refcount_decrements`]), so a decrement is
//!    written at the earliest in the next epoch, after the final flush here.
//!
//! A crash between any two steps leaves the image consistent; it may leak
//! clusters whose count was raised but whose reference never landed.

use qj_journal::Storage;
use qj_spec::units::HostOffset;

use super::{BackendKind, Epoch, MetadataBackend, MetadataWrite};
use crate::error::{IoContext, Result};
pub use crate::mutation::OrderingMutation;
use crate::stats::Counters;

/// The flush-ordering backend.
#[derive(Debug, Default)]
pub struct FlushOrdering {
    mutation: OrderingMutation,
}

impl FlushOrdering {
    /// The correct backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend with a deliberate ordering bug, for the crash harness.
    pub fn with_mutation(mutation: OrderingMutation) -> Self {
        Self { mutation }
    }

    fn write_all(
        storage: &dyn Storage,
        writes: &[MetadataWrite],
        counters: &Counters,
    ) -> Result<()> {
        for w in writes {
            storage
                .write_at(&w.bytes, w.offset.0)
                .ctx(|| format!("writing metadata at {}", w.offset))?;
            counters.metadata_write(w.bytes.len());
        }
        Ok(())
    }

    fn flush(storage: &dyn Storage, counters: &Counters, why: &str) -> Result<()> {
        counters.flush();
        storage.flush().ctx(|| format!("flushing {why}"))
    }
}

impl MetadataBackend for FlushOrdering {
    fn kind(&self) -> BackendKind {
        BackendKind::FlushOrdering
    }

    fn defers_refcount_decrements(&self) -> bool {
        true
    }

    fn submit(&self, storage: &dyn Storage, epoch: Epoch, counters: &Counters) -> Result<u64> {
        self.persist(storage, epoch, counters).map(|()| 0)
    }

    fn wait_durable(&self, _: &dyn Storage, _: u64, _: &Counters) -> Result<()> {
        // `submit` did all the work synchronously.
        Ok(())
    }

    fn read_metadata(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        offset: HostOffset,
    ) -> Result<()> {
        storage
            .read_at(buf, offset.0)
            .ctx(|| format!("reading metadata at {offset}"))
    }
}

impl FlushOrdering {
    /// Writes the epoch in place in dependency order (rules 1-4 above).
    fn persist(&self, storage: &dyn Storage, epoch: Epoch, counters: &Counters) -> Result<()> {
        if epoch.is_empty() {
            // Only guest data to make durable.
            return Self::flush(storage, counters, "guest data");
        }

        // Rule 1: fresh refcount structures, then the links to them.
        if !epoch.fresh_refcount.is_empty() || !epoch.refcount_links.is_empty() {
            Self::write_all(storage, &epoch.fresh_refcount, counters)?;
            Self::flush(storage, counters, "fresh refcount structures")?;
            Self::write_all(storage, &epoch.refcount_links, counters)?;
            Self::flush(storage, counters, "refcount table links")?;
        }

        if self.mutation == OrderingMutation::TablesBeforeData {
            // Deliberately wrong: entries may reach the disk before the data.
            Self::write_all(storage, &epoch.refcount_blocks, counters)?;
            Self::write_all(storage, &epoch.fresh_tables, counters)?;
            Self::write_all(storage, &epoch.tables, counters)?;
            return Self::flush(storage, counters, "everything at once (mutation)");
        }

        // Rules 2, 3 and 4: counts, fresh tables and guest data durable ...
        Self::write_all(storage, &epoch.refcount_blocks, counters)?;
        Self::write_all(storage, &epoch.fresh_tables, counters)?;
        if self.mutation != OrderingMutation::SkipRefcountFlush {
            Self::flush(storage, counters, "refcounts and guest data")?;
        }
        if epoch.tables.is_empty() && epoch.fresh_tables.is_empty() {
            // Only counts changed (deferred decrements): nothing depends on them.
            return Ok(());
        }
        // ... before the entries that reference them.
        Self::write_all(storage, &epoch.tables, counters)?;
        Self::flush(storage, counters, "L2/L1 tables and header")
    }
}
