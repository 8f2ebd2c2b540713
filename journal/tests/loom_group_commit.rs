//! Loom model of group commit: with every interleaving of three
//! committers (up to three preemptions), each item is written exactly
//! once, batches finish in the order they were written even though
//! flushes overlap, each committer gets its own result, and the waiting
//! rule holds: a batch is written while an earlier one is still in flight
//! only if it fills the queue.
//!
//! Run: `RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=/tmp/qj-loom cargo test -p qj-journal --test loom_group_commit --release`

#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use qj_journal::{BatchPipeline, GroupCommit};

/// The queue's capacity in the model.
const CAPACITY: usize = 2;

#[derive(Default)]
struct Recorder {
    written: Mutex<Vec<Vec<u32>>>,
    next_batch: AtomicU64,
    finished: AtomicU64,
    /// Batches written and not yet finished.
    in_flight: AtomicU64,
}

impl BatchPipeline<u32, u32> for Recorder {
    type Batch = (u64, Vec<u32>);
    fn write(&self, items: Vec<u32>) -> Self::Batch {
        assert!(
            !items.is_empty() && items.len() <= CAPACITY,
            "batch {items:?}"
        );
        assert!(
            self.in_flight.load(Ordering::SeqCst) == 0 || items.len() == CAPACITY,
            "batch {items:?} taken while an earlier one was in flight"
        );
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.written.lock().unwrap().push(items.clone());
        (self.next_batch.fetch_add(1, Ordering::SeqCst), items)
    }
    fn flush(&self, _batch: &mut Self::Batch) {
        loom::thread::yield_now();
    }
    fn finish(&self, (number, items): Self::Batch) -> Vec<u32> {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let previous = self.finished.fetch_add(1, Ordering::SeqCst);
        assert_eq!(previous, number, "batches finish in write order");
        items.iter().map(|x| x + 100).collect()
    }
}

#[test]
fn every_item_is_processed_once_and_answered_to_its_owner() {
    // Three preemptions cover the hand-over between writer, flusher and
    // late arrivals, and keep the model to seconds instead of minutes.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(3);
    model.check(|| {
        let group: Arc<GroupCommit<u32, u32>> =
            Arc::new(GroupCommit::new(CAPACITY, std::time::Duration::ZERO));
        let recorder = Arc::new(Recorder::default());
        let threads: Vec<_> = (0..3u32)
            .map(|t| {
                let group = Arc::clone(&group);
                let recorder = Arc::clone(&recorder);
                loom::thread::spawn(move || {
                    assert_eq!(group.submit(t, &*recorder), t + 100);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let written = recorder.written.lock().unwrap();
        let mut all: Vec<u32> = written.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2], "each item written exactly once");
        assert_eq!(group.batches(), written.len() as u64);
    });
}
