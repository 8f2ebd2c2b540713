//! Runs a workload against a guest disk while keeping the model in step.
//!
//! Ordering with the model: an operation is begun in the model before the
//! disk sees it and ended after the disk returns, so at any device
//! operation the model already allows what is in flight and requires only
//! what completed. The model lock is never held across a disk call: the
//! device's crash observer takes it.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::guest_model::{GuestModel, ModelError, OpToken};
use crate::medium::SECTOR_BYTES;
use crate::sector_pattern::fill_write;
use crate::target::{GuestDisk, TargetError};
use crate::workload::{GuestOp, Workload};

/// Why a workload run stopped early.
#[derive(Debug, thiserror::Error)]
pub enum RunFailure {
    /// The model rejected an operation (an invalid operation list).
    #[error("thread {thread} operation {index} ({op}): {source}")]
    Model {
        /// Workload thread.
        thread: usize,
        /// Index in that thread.
        index: usize,
        /// The operation.
        op: GuestOp,
        /// Why.
        source: ModelError,
    },
    /// The disk returned an error.
    #[error("thread {thread} operation {index} ({op}) failed: {source}")]
    Disk {
        /// Workload thread.
        thread: usize,
        /// Index in that thread (`usize::MAX` for the final close).
        index: usize,
        /// The operation.
        op: GuestOp,
        /// The disk's error.
        source: TargetError,
    },
}

fn begin(model: &Mutex<GuestModel>, op: GuestOp) -> Result<OpToken, ModelError> {
    let mut model = model.lock();
    match op {
        GuestOp::Write { sector, count } => model.begin_write(sector, count),
        GuestOp::WriteZeroes { sector, count } => model.begin_write_zeroes(sector, count),
        GuestOp::Discard { sector, count } => model.begin_discard(sector, count),
        GuestOp::Flush => Ok(model.begin_flush()),
        GuestOp::Grow { sectors } => model.begin_grow(sectors),
        GuestOp::SnapshotCreate { id } => model.begin_snapshot_create(id),
        GuestOp::SnapshotApply { id } => model.begin_snapshot_apply(id),
        GuestOp::SnapshotDelete { id } => model.begin_snapshot_delete(id),
    }
}

fn bytes(sectors: u64) -> u64 {
    sectors * SECTOR_BYTES
}

fn issue(
    disk: &dyn GuestDisk,
    op: GuestOp,
    token: &OpToken,
    buf: &mut Vec<u8>,
) -> Result<(), TargetError> {
    match op {
        GuestOp::Write { sector, count } => {
            let len = usize::try_from(bytes(count))
                .map_err(|_| TargetError::Invalid(format!("write of {count} sectors")))?;
            buf.resize(len, 0);
            fill_write(buf, token.write_id(), sector);
            disk.write(buf, bytes(sector))
        }
        GuestOp::WriteZeroes { sector, count } => disk.write_zeroes(bytes(sector), bytes(count)),
        GuestOp::Discard { sector, count } => disk.discard(bytes(sector), bytes(count)),
        GuestOp::Flush => disk.flush(),
        GuestOp::Grow { sectors } => disk.resize(bytes(sectors)),
        GuestOp::SnapshotCreate { id } => disk.snapshot_create(id),
        GuestOp::SnapshotApply { id } => disk.snapshot_apply(id),
        GuestOp::SnapshotDelete { id } => disk.snapshot_delete(id),
    }
}

fn run_thread(
    disk: &dyn GuestDisk,
    model: &Mutex<GuestModel>,
    thread: usize,
    ops: &[GuestOp],
    stop: &AtomicBool,
) -> Result<(), RunFailure> {
    let mut buf = Vec::new();
    for (index, &op) in ops.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let token = begin(model, op).map_err(|source| RunFailure::Model {
            thread,
            index,
            op,
            source,
        })?;
        // On failure the operation stays in flight in the model: its
        // effect is unknown, so its content stays allowed, never required.
        issue(disk, op, &token, &mut buf).map_err(|source| RunFailure::Disk {
            thread,
            index,
            op,
            source,
        })?;
        model.lock().end(token);
    }
    Ok(())
}

/// Runs every thread of `workload` against `disk` (threads concurrently),
/// stopping at the first failure.
pub fn run_workload(
    disk: &dyn GuestDisk,
    model: &Mutex<GuestModel>,
    workload: &Workload,
) -> Result<(), RunFailure> {
    let stop = AtomicBool::new(false);
    if workload.threads.len() == 1 {
        return run_thread(disk, model, 0, &workload.threads[0], &stop);
    }
    let results: Vec<Result<(), RunFailure>> = std::thread::scope(|scope| {
        let handles: Vec<_> = workload
            .threads
            .iter()
            .enumerate()
            .map(|(thread, ops)| {
                let stop = &stop;
                scope.spawn(move || {
                    let result = run_thread(disk, model, thread, ops, stop);
                    if result.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    result
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    results.into_iter().collect()
}

/// Closes `disk` cleanly; the model treats a close as a flush.
pub fn close_disk(disk: Box<dyn GuestDisk>, model: &Mutex<GuestModel>) -> Result<(), RunFailure> {
    let token = model.lock().begin_flush();
    disk.close().map_err(|source| RunFailure::Disk {
        thread: 0,
        index: usize::MAX,
        op: GuestOp::Flush,
        source,
    })?;
    model.lock().end(token);
    Ok(())
}
