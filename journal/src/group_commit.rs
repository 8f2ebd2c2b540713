//! Group commit: committers queue their transactions; one of them becomes
//! the writer, takes the whole queue, and writes it as one batch; then,
//! while it flushes that batch, the next committer can already become the
//! writer of the next batch, but it takes the queue only once that flush
//! is done (or the queue is full), so the next batch carries everyone who
//! arrived during the flush ([`GroupCommit::wait`]'s waiting rule). Batches
//! finish, and committers get their results, strictly in batch order.
//!
//! Committers that loop (commit, wait, commit) would otherwise split into
//! groups that alternate between flushes: those released by one flush
//! arrive while the next is already being written. So a new writer gathers
//! first: it waits until as many committers as were recently active have
//! queued, but never longer than [`GATHER_BATCH_TIMES`] times the last
//! batch took (jbd2 waits about one commit time) nor the configured
//! maximum, and not at all while only one committer is active.
//!
//! All of the coordination state lives in [`GroupCommit`] and the I/O is a
//! [`BatchPipeline`], so a loom model can drive this exact code with a fake
//! pipeline.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::sync::{AtomicU64, Condvar, Mutex, MutexGuard, Ordering};

/// The three stages of a batch.
pub trait BatchPipeline<T, R> {
    /// What a written batch carries to its flush and finish.
    type Batch;
    /// Writes a batch. Runs for one batch at a time, in batch order.
    fn write(&self, items: Vec<T>) -> Self::Batch;
    /// Makes a written batch durable. May run while the next batch is
    /// written or flushed.
    fn flush(&self, batch: &mut Self::Batch);
    /// Produces one result per item, in item order. Runs in batch order,
    /// after every earlier batch finished.
    fn finish(&self, batch: Self::Batch) -> Vec<R>;
}

/// How many batches' peaks say how many committers are active. One batch's
/// peak is a poor estimate: batches that gather too few committers release
/// too few at once, so the next peak is small again, and the estimate
/// locks in small batches (eight NBD connections each flushing measured
/// about two ops per batch). The maximum over several rounds finds the
/// real number, and falls back within as many batches when load drops (a
/// lone committer then stops waiting to gather).
const PEAK_ROUNDS: usize = 16;

/// How many of the last batch's durations a writer gathers for at most.
/// A batch's duration runs from its write to its finish, while a committer
/// released by it needs a whole round trip to its client (an NBD reply,
/// the next WRITE, its reply, the FLUSH) to come back: with one batch
/// time, 8 flushing connections on a fresh image (`cache=none`) missed
/// their batch often enough to make 0.19-0.21 flushes per op; with three,
/// 0.13, at the same rate or better (and 0.16 against 0.23 on written
/// clusters). A lone committer never gathers, so this costs QD1 nothing;
/// a writer whose committers do not come waits at most `gather_max`.
const GATHER_BATCH_TIMES: u32 = 3;

/// The state shared by committers.
#[derive(Debug)]
struct Queue<T, R> {
    next_ticket: u64,
    waiting: VecDeque<(u64, T)>,
    writer_active: bool,
    finished: Vec<(u64, R)>,
    /// Batches taken by a writer so far (the next batch's number).
    batches_started: u64,
    /// Batches finished so far (the number of the next to finish).
    batches_finished: u64,
    /// Tickets issued whose results were not yet taken: the committers
    /// currently inside `submit`.
    pending: usize,
    /// The largest `pending` seen since the last batch finished.
    peak_this_round: usize,
    /// The largest `pending` of each of the last [`PEAK_ROUNDS`] batches
    /// (a ring): their maximum is how many committers are active.
    recent_peaks: [usize; PEAK_ROUNDS],
    /// How long the last batch took from write to finish.
    last_batch: Duration,
    /// Committers asleep in `wait` for their turn or their result: the
    /// unit tests wait for them to be asleep before they act.
    #[cfg(test)]
    asleep: usize,
}

/// Batches items from many threads through a write-then-flush pipeline.
#[derive(Debug)]
pub struct GroupCommit<T, R> {
    queue: Mutex<Queue<T, R>>,
    /// Committers wait here for their result, or for the writer role while
    /// their item is queued. Notified only when one of them can act: a
    /// batch finished (results, and the end of the flush that a queued
    /// item's new writer would wait for anyway), or the queue is full with
    /// no writer. Why so few: each wakeup is a context switch of every
    /// waiting connection; notified also after every drain and every
    /// write, 8 flushing NBD connections made 2.7 of them per op, and
    /// their CPU time sits between one batch's flush and the next.
    /// Liveness rests on the finish alone: whoever sleeps here has a batch
    /// ahead of it that will finish (its own, the active writer's, which
    /// may still be gathering, or an earlier one), and every finish
    /// notifies (loom model `loom_group_commit` deadlocks without that
    /// notify). The full-queue wakeups only take a full queue early; the
    /// unit tests
    /// `sleepers_take_a_queue_left_full_by_a_write_without_waiting_for_its_flush`
    /// and `an_enqueue_that_fills_the_queue_wakes_a_sleeper_when_no_one_writes`
    /// fail without them.
    changed: Condvar,
    /// A writer waits here for arrivals (gathering, or the flush ahead).
    arrivals: Condvar,
    /// Committers blocked on a full queue wait here for a drain.
    space: Condvar,
    capacity: usize,
    gather_max: Duration,
    /// `batches_finished`, readable without the queue's lock: statistics
    /// are read after every commit, and taking the lock for them made
    /// every flusher queue behind the committers.
    batches_finished: AtomicU64,
}

impl<T, R> GroupCommit<T, R> {
    /// A group commit whose queue holds at most `capacity` waiting items
    /// (more committers block until a writer takes the queue) and whose
    /// writers gather for at most `gather_max` (zero: never).
    #[must_use]
    pub fn new(capacity: usize, gather_max: Duration) -> Self {
        assert!(capacity > 0, "group commit queue of capacity 0");
        Self {
            queue: Mutex::new(Queue {
                next_ticket: 0,
                waiting: VecDeque::new(),
                writer_active: false,
                finished: Vec::new(),
                batches_started: 0,
                batches_finished: 0,
                pending: 0,
                peak_this_round: 0,
                recent_peaks: [0; PEAK_ROUNDS],
                last_batch: Duration::ZERO,
                #[cfg(test)]
                asleep: 0,
            }),
            changed: Condvar::new(),
            arrivals: Condvar::new(),
            space: Condvar::new(),
            capacity,
            gather_max,
            batches_finished: AtomicU64::new(0),
        }
    }

    /// Number of batches finished so far.
    #[must_use]
    pub fn batches(&self) -> u64 {
        self.batches_finished.load(Ordering::Acquire)
    }

    /// Queues `item` and returns its result. If no writer is active, this
    /// thread becomes the writer of a batch of everything queued, then
    /// flushes and finishes that batch.
    pub fn submit<P: BatchPipeline<T, R> + ?Sized>(&self, item: T, pipeline: &P) -> R {
        let ticket = self.enqueue(item);
        self.wait(ticket, pipeline)
    }

    /// Queues `item` and returns its ticket without waiting. Items are
    /// batched, written and finished in the order they were enqueued, so a
    /// caller that must keep an order between its items (the engine's
    /// epochs) enqueues them in that order, under its own lock, and waits
    /// for them outside it. Every ticket must be passed to [`Self::wait`].
    #[must_use = "an enqueued item must be waited for"]
    pub fn enqueue(&self, item: T) -> u64 {
        let mut queue = self.queue.lock();
        // Bounded queue: wait for a writer to drain it.
        while queue.waiting.len() >= self.capacity {
            queue = self.space.wait(queue);
        }
        let ticket = queue.next_ticket;
        queue.next_ticket += 1;
        queue.waiting.push_back((ticket, item));
        queue.pending += 1;
        queue.peak_this_round = queue.peak_this_round.max(queue.pending);
        self.arrivals.notify_all();
        if queue.waiting.len() >= self.capacity && !queue.writer_active {
            // Full with no writer: a queued committer takes it now.
            self.changed.notify_all();
        }
        ticket
    }

    /// Returns the result of the item queued as `ticket`; if no writer is
    /// active and the item is still queued, this thread becomes the writer
    /// of a batch of everything queued, then flushes and finishes it.
    pub fn wait<P: BatchPipeline<T, R> + ?Sized>(&self, ticket: u64, pipeline: &P) -> R {
        let mut queue = self.queue.lock();
        loop {
            if let Some(index) = queue.finished.iter().position(|(t, _)| *t == ticket) {
                let (_, result) = queue.finished.swap_remove(index);
                queue.pending -= 1;
                return result;
            }
            if queue.writer_active || queue.waiting.iter().all(|(t, _)| *t != ticket) {
                // Someone is writing, or our item is in a batch in flight.
                #[cfg(test)]
                {
                    queue.asleep += 1;
                }
                queue = self.changed.wait(queue);
                #[cfg(test)]
                {
                    queue.asleep -= 1;
                }
                continue;
            }
            queue.writer_active = true;
            queue = self.await_flush_in_flight(queue);
            queue = self.gather(queue);
            let (tickets, items): (Vec<u64>, Vec<T>) = queue.waiting.drain(..).unzip();
            let batch_number = queue.batches_started;
            queue.batches_started += 1;
            // The queue drained: wake committers blocked on capacity.
            self.space.notify_all();
            drop(queue);

            let started = Instant::now();
            let mut batch = pipeline.write(items);
            queue = self.queue.lock();
            queue.writer_active = false;
            // The next batch may be written while this one flushes, but
            // its writer would wait for this flush unless the queue is
            // full (`await_flush_in_flight`): only then is a queued
            // committer woken now; else the finish wakes it.
            if queue.waiting.len() >= self.capacity {
                self.changed.notify_all();
            }
            drop(queue);

            pipeline.flush(&mut batch);

            queue = self.queue.lock();
            // Bounded by the number of batches in flight ahead of ours.
            while queue.batches_finished != batch_number {
                queue = self.changed.wait(queue);
            }
            drop(queue);
            // Only this thread may finish now: later batches wait above.
            let results = pipeline.finish(batch);
            assert_eq!(results.len(), tickets.len(), "one result per batched item");

            queue = self.queue.lock();
            queue.finished.extend(tickets.into_iter().zip(results));
            queue.batches_finished += 1;
            self.batches_finished
                .store(queue.batches_finished, Ordering::Release);
            queue.last_batch = started.elapsed();
            let slot = (batch_number % PEAK_ROUNDS as u64) as usize;
            queue.recent_peaks[slot] = queue.peak_this_round;
            queue.peak_this_round = queue.pending;
            self.changed.notify_all();
            // A writer may be waiting for this flush (`await_flush_in_flight`).
            self.arrivals.notify_all();
        }
    }

    /// The waiting rule of a new writer (jbd2's): while an earlier batch
    /// is still between its write and its finish, it does not take the
    /// queue, so everyone who arrives during that flush rides in the next
    /// batch instead of splitting into batches whose flushes run side by
    /// side (with eight connections each flushing, that split made batches
    /// of about two ops and 0.47 flushes per op). It takes the queue early
    /// only when full: waiting could not make the batch larger. A lone
    /// committer never waits here (its previous batch finished before it
    /// came back). Bounded: the batch in flight finishes without anything
    /// this thread holds (its flusher needs only earlier batches, never
    /// the writer role), and each finish, like each enqueue, notifies
    /// `arrivals`.
    fn await_flush_in_flight<'a>(
        &self,
        mut queue: MutexGuard<'a, Queue<T, R>>,
    ) -> MutexGuard<'a, Queue<T, R>> {
        while queue.batches_finished != queue.batches_started && queue.waiting.len() < self.capacity
        {
            queue = self.arrivals.wait(queue);
        }
        queue
    }

    /// Waits (bounded) for the recently active committers to queue.
    fn gather<'a>(&self, mut queue: MutexGuard<'a, Queue<T, R>>) -> MutexGuard<'a, Queue<T, R>> {
        let active = queue.recent_peaks.iter().copied().max().unwrap_or(0);
        let want = active.min(self.capacity);
        // Gathering only delays a batch and never changes any result, and
        // loom cannot model a timed wait (it would wait for an arrival that
        // may never come): under loom the writer does not gather.
        let window = queue
            .last_batch
            .saturating_mul(GATHER_BATCH_TIMES)
            .min(self.gather_max);
        if want <= 1 || window.is_zero() || cfg!(loom) {
            return queue;
        }
        let deadline = Instant::now() + window;
        // Bounded by the deadline; each round waits for an arrival.
        while queue.waiting.len() < want {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            queue = self.arrivals.wait_timeout(queue, deadline - now);
        }
        queue
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// Doubles items; checks the stage order rules as it goes.
    struct Doubler {
        written: AtomicU64,
        finished: AtomicU64,
        calls: AtomicUsize,
    }

    impl BatchPipeline<u64, u64> for Doubler {
        type Batch = (u64, Vec<u64>);
        fn write(&self, items: Vec<u64>) -> Self::Batch {
            self.calls.fetch_add(1, Ordering::Relaxed);
            assert!(items.len() <= 8, "queue capacity bounds the batch");
            (self.written.fetch_add(1, Ordering::SeqCst), items)
        }
        fn flush(&self, _batch: &mut Self::Batch) {
            // A slow "flush" lets others queue up.
            std::thread::sleep(Duration::from_micros(200));
        }
        fn finish(&self, (number, items): Self::Batch) -> Vec<u64> {
            assert_eq!(
                self.finished.fetch_add(1, Ordering::SeqCst),
                number,
                "finish in batch order"
            );
            items.iter().map(|x| x * 2).collect()
        }
    }

    #[test]
    fn every_item_gets_its_own_result_and_batches_form() {
        let group: GroupCommit<u64, u64> = GroupCommit::new(8, Duration::from_millis(1));
        let pipeline = Doubler {
            written: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
        };
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let group = &group;
                let pipeline = &pipeline;
                s.spawn(move || {
                    for i in 0..50u64 {
                        let item = t * 1000 + i;
                        assert_eq!(group.submit(item, pipeline), item * 2);
                    }
                });
            }
        });
        let batches = pipeline.calls.load(Ordering::Relaxed) as u64;
        assert_eq!(group.batches(), batches);
        assert!(
            batches < 200,
            "400 items in {batches} batches: nothing was grouped"
        );
    }

    #[test]
    fn everyone_who_arrives_during_a_flush_rides_in_the_next_batch() {
        // One committer's batch is flushing; seven more queue meanwhile and
        // the first of them to wait becomes the next writer. However the
        // threads are scheduled, that writer must not take the queue before
        // the flush ends: the seven share one batch and one flush.
        let (pipeline, gates) = gated_pipeline(false);
        let group: GroupCommit<u64, u64> = GroupCommit::new(64, Duration::ZERO);
        std::thread::scope(|s| {
            let (group, pipeline) = (&group, &pipeline);
            s.spawn(move || assert_eq!(group.submit(0, pipeline), 0));
            gates.entered_first_flush.recv().unwrap();
            let (queued_tx, queued_rx) = std::sync::mpsc::channel();
            for item in 1..8u64 {
                let queued_tx = queued_tx.clone();
                s.spawn(move || {
                    let ticket = group.enqueue(item);
                    queued_tx.send(()).unwrap();
                    assert_eq!(group.wait(ticket, pipeline), item);
                });
            }
            for _ in 1..8 {
                queued_rx.recv().unwrap();
            }
            gates.open_first_flush.send(()).unwrap();
        });
        assert_eq!(*pipeline.sizes.lock().unwrap(), vec![1, 7]);
        assert_eq!(pipeline.flushes.load(Ordering::SeqCst), 2);
        assert_eq!(group.batches(), 2);
    }

    #[test]
    fn a_full_queue_does_not_wait_for_the_flush_in_flight() {
        // Capacity 2: while the first batch flushes, a full queue is taken
        // at once (waiting could not make it larger), so its batch is
        // written before the first flush is allowed to end.
        let (pipeline, gates) = gated_pipeline(false);
        let group: GroupCommit<u64, u64> = GroupCommit::new(2, Duration::ZERO);
        std::thread::scope(|s| {
            let (group, pipeline) = (&group, &pipeline);
            s.spawn(move || assert_eq!(group.submit(0, pipeline), 0));
            gates.entered_first_flush.recv().unwrap();
            let tickets = [group.enqueue(1), group.enqueue(2)];
            let waiter = s.spawn(move || group.wait(tickets[1], pipeline));
            // The second batch is written while the first flush is held.
            for _ in 0..10_000_000 {
                if pipeline.sizes.lock().unwrap().len() == 2 {
                    break;
                }
                std::thread::yield_now();
            }
            let written_during_flush = pipeline.sizes.lock().unwrap().len();
            gates.open_first_flush.send(()).unwrap();
            assert_eq!(written_during_flush, 2, "a full queue waited for the flush");
            assert_eq!(waiter.join().unwrap(), 2);
            assert_eq!(group.wait(tickets[0], pipeline), 1);
        });
        assert_eq!(*pipeline.sizes.lock().unwrap(), vec![1, 2]);
    }

    /// Records batch sizes; holds the first batch's flush (and, if asked,
    /// its write) until the test opens the gate.
    struct Gated {
        sizes: std::sync::Mutex<Vec<usize>>,
        gate_first_write: bool,
        writes: AtomicUsize,
        flushes: AtomicUsize,
        entered_first_write: std::sync::mpsc::SyncSender<()>,
        open_first_write: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        entered_first_flush: std::sync::mpsc::SyncSender<()>,
        open_first_flush: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
    }

    impl BatchPipeline<u64, u64> for Gated {
        type Batch = Vec<u64>;
        fn write(&self, items: Vec<u64>) -> Self::Batch {
            if self.writes.fetch_add(1, Ordering::SeqCst) == 0 && self.gate_first_write {
                self.entered_first_write.send(()).unwrap();
                self.open_first_write.lock().unwrap().recv().unwrap();
            }
            self.sizes.lock().unwrap().push(items.len());
            items
        }
        fn flush(&self, _batch: &mut Self::Batch) {
            if self.flushes.fetch_add(1, Ordering::SeqCst) == 0 {
                self.entered_first_flush.send(()).unwrap();
                self.open_first_flush.lock().unwrap().recv().unwrap();
            }
        }
        fn finish(&self, batch: Self::Batch) -> Vec<u64> {
            batch
        }
    }

    /// The gates of a [`Gated`] pipeline, held by the test.
    struct Gates {
        entered_first_write: std::sync::mpsc::Receiver<()>,
        open_first_write: std::sync::mpsc::Sender<()>,
        entered_first_flush: std::sync::mpsc::Receiver<()>,
        open_first_flush: std::sync::mpsc::Sender<()>,
    }

    fn gated_pipeline(gate_first_write: bool) -> (Gated, Gates) {
        let (entered_write_tx, entered_write_rx) = std::sync::mpsc::sync_channel(1);
        let (open_write_tx, open_write_rx) = std::sync::mpsc::channel();
        let (entered_flush_tx, entered_flush_rx) = std::sync::mpsc::sync_channel(1);
        let (open_flush_tx, open_flush_rx) = std::sync::mpsc::channel();
        let pipeline = Gated {
            sizes: std::sync::Mutex::new(Vec::new()),
            gate_first_write,
            writes: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
            entered_first_write: entered_write_tx,
            open_first_write: std::sync::Mutex::new(open_write_rx),
            entered_first_flush: entered_flush_tx,
            open_first_flush: std::sync::Mutex::new(open_flush_rx),
        };
        let gates = Gates {
            entered_first_write: entered_write_rx,
            open_first_write: open_write_tx,
            entered_first_flush: entered_flush_rx,
            open_first_flush: open_flush_tx,
        };
        (pipeline, gates)
    }

    /// How long the tests below wait for another thread to get somewhere:
    /// a bound on a wait that should end at once, generous for a loaded
    /// CI machine (never a measure of speed).
    const PATIENCE: Duration = Duration::from_secs(10);

    /// Waits (bounded) until `n` committers are asleep in `wait`.
    fn until_asleep<T, R>(group: &GroupCommit<T, R>, n: usize) {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if group.queue.lock().asleep == n {
                return;
            }
            std::thread::yield_now();
        }
        panic!("{n} committers never fell asleep");
    }

    /// Waits (bounded) for the second batch's write; how many batches
    /// were written by then.
    fn batches_written_soon(pipeline: &Gated) -> usize {
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if pipeline.sizes.lock().unwrap().len() == 2 {
                break;
            }
            std::thread::yield_now();
        }
        pipeline.sizes.lock().unwrap().len()
    }

    /// With capacity 2: item 0's batch is held in its write while the
    /// `sleepers` queue and fall asleep; then its write ends and its flush
    /// is held while `fill` (if any) is enqueued. Returns how many batches
    /// were written before that flush was let go, and the batch sizes.
    fn batches_written_during_the_first_flush(sleepers: &[u64], fill: Option<u64>) -> usize {
        let (pipeline, gates) = gated_pipeline(true);
        let group: GroupCommit<u64, u64> = GroupCommit::new(2, Duration::ZERO);
        let written = std::thread::scope(|s| {
            let (group, pipeline) = (&group, &pipeline);
            s.spawn(move || assert_eq!(group.submit(0, pipeline), 0));
            gates.entered_first_write.recv().unwrap();
            for &item in sleepers {
                s.spawn(move || assert_eq!(group.submit(item, pipeline), item));
            }
            until_asleep(group, sleepers.len());
            gates.open_first_write.send(()).unwrap();
            gates.entered_first_flush.recv().unwrap();
            let ticket = fill.map(|item| (item, group.enqueue(item)));
            let written = batches_written_soon(pipeline);
            gates.open_first_flush.send(()).unwrap();
            if let Some((item, ticket)) = ticket {
                assert_eq!(group.wait(ticket, pipeline), item);
            }
            written
        });
        assert_eq!(*pipeline.sizes.lock().unwrap(), vec![1, 2]);
        written
    }

    #[test]
    fn sleepers_take_a_queue_left_full_by_a_write_without_waiting_for_its_flush() {
        // Two committers queue and fall asleep while the first batch is
        // written, filling the queue. When that write ends, one of them
        // must be woken to take the full queue, while the first batch's
        // flush is still held: nothing else would wake them before that
        // flush ends.
        let written = batches_written_during_the_first_flush(&[1, 2], None);
        assert_eq!(written, 2, "the full queue waited for the flush");
    }

    #[test]
    fn an_enqueue_that_fills_the_queue_wakes_a_sleeper_when_no_one_writes() {
        // A committer fell asleep while the first batch was written; that
        // write ended with the queue not full, so it was left asleep (its
        // new writer would only wait for the flush). An enqueue that then
        // fills the queue must wake it to take the queue at once.
        let written = batches_written_during_the_first_flush(&[1], Some(2));
        assert_eq!(written, 2, "the full queue waited for the flush");
    }

    #[test]
    fn a_lone_committer_never_waits_to_gather() {
        let group: GroupCommit<u64, u64> = GroupCommit::new(4, Duration::from_millis(1));
        let pipeline = Doubler {
            written: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            calls: AtomicUsize::new(0),
        };
        let started = Instant::now();
        for i in 0..200 {
            assert_eq!(group.submit(i, &pipeline), i * 2);
        }
        assert_eq!(group.batches(), 200);
        // 200 flushes of 200 us; a gather window would add up to 50 us each.
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
