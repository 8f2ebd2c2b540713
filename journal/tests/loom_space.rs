//! Loom model of journal space: commits that find the ring full, and
//! checkpoints racing them, never overwrite a transaction that is not yet
//! synced, never deadlock, and never lose an acknowledged commit.
//!
//! The model runs the real `qj_journal::Journal` (its locks, condvars and
//! atomics come from `qj_journal::sync`, loom's under `--cfg loom`) over
//! [`ModelDevice`], a device in this file with a volatile write cache
//! whose every access takes a loom mutex, so that each device operation is
//! a scheduling point. (`MemStorage` takes a parking_lot lock that loom
//! cannot see, and has no cache.) The ring is the smallest the format
//! accepts, 4 blocks of 512 bytes. Committer 0's transaction (one write of
//! two data blocks) takes all 4, every other committer's (one small write)
//! takes 3: no two fit, so every commit after the first finds the ring
//! full and must checkpoint, then, depending on the order, pad to the
//! ring's end and wrap, or rewind the empty log to block 0, while other
//! commits are being written, flushed or checkpointed.
//!
//! How "never overwrite an unsynced transaction" is checked: not by
//! recomputing which ring blocks belong to whom (that would restate the
//! journal's own bookkeeping), but by its consequence, which is what
//! matters. Overwriting ring blocks whose transaction is neither applied
//! in place durably nor retired by a durable header makes replay stop
//! there, losing that transaction and every later one. So at every device
//! operation the device records what a power cut at that instant may
//! leave, with the set of commits that had returned `Ok` by then:
//! * at every write: the durable content plus that write alone (the cache
//!   lost everything else) and the durable content plus every unflushed
//!   write (the cache kept everything);
//! * at every flush, and as each commit returns: the durable content.
//!
//! After the threads join, each recorded image is replayed in memory by
//! the real replay (`ReplayMode::InMemory`) and must open without error,
//! show every acknowledged payload at its target (from the log or already
//! in place), and show nothing but zeros or the owner's payload at any
//! target. A reservation that ignores the synced tail, ring space freed
//! before the header retiring it is durable, or a header advanced before
//! the in-place writes are durable each produce such an image (see
//! `model-checks/LOOM.md` for the experiments). Finally, the device as the
//! last flush left it is opened for real (`ReplayMode::Apply`): every
//! payload must be in place.
//!
//! Run (bound and cost in `model-checks/LOOM.md`):
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom LOOM_MAX_PREEMPTIONS=3 \
//!     cargo test --release -p qj-journal --test loom_space
//! ```

#![cfg(loom)]

use std::collections::HashMap;
use std::io;

use loom::sync::Mutex;
use qj_journal::{
    CommitProtocol, Journal, JournalError, JournalOptions, MemStorage, Mutation, NoDedup,
    ReplayMode, Storage, Transaction,
};

/// The preemption bound when `LOOM_MAX_PREEMPTIONS` is not set (CI sets
/// the same value).
const PREEMPTIONS_DEFAULT: usize = 3;

/// The smallest block the format accepts.
const BLOCK_BYTES: u32 = 512;
/// The smallest ring the format accepts.
const RING_BLOCKS: u64 = 4;
/// Header area (two 512-byte slots) and ring.
const JOURNAL_BYTES: u64 = 1024 + RING_BLOCKS * BLOCK_BYTES as u64;
/// The journal region starts the device.
const JOURNAL_BASE: u64 = 0;
/// Committer `t` writes its payload at `TARGETS_BASE + t * TARGET_STRIDE`,
/// past the journal.
const TARGETS_BASE: u64 = 0x2000;
const TARGET_STRIDE: u64 = 0x400;
const DEVICE_LIMIT_BYTES: u64 = 0x4000;
/// Committer 0's payload: two data blocks, so that its transaction
/// (descriptor, data, data, commit) takes the whole ring.
const WHOLE_RING_PAYLOAD_BYTES: usize = 600;
/// Blocks every other committer's transaction takes: descriptor, data,
/// commit.
const SMALL_TX_BLOCKS: u64 = 3;
const _: () = assert!(2 * SMALL_TX_BLOCKS > RING_BLOCKS, "no two transactions fit");
/// The bound of the three-committer models: bound 3 passes too but takes
/// about three minutes, over the CI budget (`model-checks/LOOM.md`).
const THREE_COMMITTERS_PREEMPTIONS: usize = 2;
/// Most committers a model runs (each has its own target).
const COMMITTERS_MAX: usize = 3;

fn target_of(committer: usize) -> u64 {
    TARGETS_BASE + committer as u64 * TARGET_STRIDE
}

/// A payload no other committer's resembles, and never all zeros (the
/// content of a target nothing was written to).
fn payload_of(committer: usize) -> Vec<u8> {
    let text = format!("payload of committer {committer}; ");
    if committer == 0 {
        text.bytes()
            .cycle()
            .take(WHOLE_RING_PAYLOAD_BYTES)
            .collect()
    } else {
        text.into_bytes()
    }
}

fn transaction_of(committer: usize) -> Transaction {
    let mut tx = Transaction::new();
    tx.write(target_of(committer), &payload_of(committer))
        .expect("a valid write");
    tx
}

/// What a power cut at one instant may leave on the device.
#[derive(Debug)]
struct CrashImage {
    /// Which device operation this was taken at (1-based) and how.
    label: String,
    bytes: Vec<u8>,
    /// Committers whose commit had returned `Ok` by then.
    acknowledged: Vec<usize>,
}

#[derive(Debug, Default)]
struct DeviceState {
    durable: Vec<u8>,
    /// Written, not flushed, in issue order.
    pending: Vec<(u64, Vec<u8>)>,
    /// Record crash images only once the journal is created.
    recording: bool,
    operations: u64,
    acknowledged: Vec<usize>,
    images: Vec<CrashImage>,
}

fn overlay(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let start = usize::try_from(offset).expect("model offsets are small");
    let end = start + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[start..end].copy_from_slice(data);
}

impl DeviceState {
    fn current(&self) -> Vec<u8> {
        let mut bytes = self.durable.clone();
        for (offset, data) in &self.pending {
            overlay(&mut bytes, *offset, data);
        }
        bytes
    }

    fn record(&mut self, label: String, bytes: Vec<u8>) {
        if self.recording {
            self.images.push(CrashImage {
                label,
                bytes,
                acknowledged: self.acknowledged.clone(),
            });
        }
    }
}

/// A device with a volatile write cache (writes are durable only once a
/// later flush returns) whose every operation is a loom scheduling point.
#[derive(Debug, Default)]
struct ModelDevice {
    state: Mutex<DeviceState>,
}

impl ModelDevice {
    fn start_recording(&self) {
        self.state.lock().unwrap().recording = true;
    }

    /// Called by a committer as soon as its commit returned `Ok`: from
    /// here on every crash image must hold its payload.
    fn acknowledge(&self, committer: usize) {
        let mut state = self.state.lock().unwrap();
        state.acknowledged.push(committer);
        // A power cut right after the return: nothing but what is durable.
        // Without this image, the last commit of a run would be checked
        // only by the final reopen.
        let durable = state.durable.clone();
        state.record(
            format!("the return of committer {committer}'s commit"),
            durable,
        );
    }

    fn durable(&self) -> Vec<u8> {
        self.state.lock().unwrap().durable.clone()
    }

    fn take_images(&self) -> Vec<CrashImage> {
        std::mem::take(&mut self.state.lock().unwrap().images)
    }
}

impl Storage for ModelDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock().unwrap();
        let bytes = state.current();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = start.saturating_add(buf.len()).min(bytes.len());
        let n = end - start;
        buf[..n].copy_from_slice(&bytes[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.operations += 1;
        let operation = state.operations;
        let mut alone = state.durable.clone();
        overlay(&mut alone, offset, buf);
        state.record(
            format!("write #{operation} at {offset:#x}+{:#x}, alone", buf.len()),
            alone,
        );
        state.pending.push((offset, buf.to_vec()));
        let everything = state.current();
        state.record(
            format!(
                "write #{operation} at {offset:#x}+{:#x}, with every unflushed write",
                buf.len()
            ),
            everything,
        );
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock().unwrap();
        state.operations += 1;
        let operation = state.operations;
        state.durable = state.current();
        state.pending.clear();
        let durable = state.durable.clone();
        state.record(format!("flush #{operation}"), durable);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().unwrap().current().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).expect("model lengths are small");
        let mut state = self.state.lock().unwrap();
        let mut bytes = state.current();
        bytes.resize(len, 0);
        // Not a journal operation; modelled as durable at once.
        state.durable = bytes;
        state.pending.clear();
        Ok(())
    }
}

fn options(mutation: Mutation, replay_mode: ReplayMode) -> JournalOptions {
    let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
    // Two waiting transactions at most: a third committer blocks on the
    // queue until a writer drains it, one more path through group commit.
    options.queue_capacity = 2;
    options.group_commit_gather_max = std::time::Duration::ZERO;
    options.replay_mode = replay_mode;
    options.mutation = mutation;
    options
}

/// What each committer's target holds after an in-memory replay of
/// `bytes`, or the replay's error.
fn replayed_targets(bytes: &[u8], committers: usize) -> Result<Vec<Vec<u8>>, JournalError> {
    let storage = MemStorage::from_bytes(bytes.to_vec());
    let (journal, _) = Journal::open(
        storage,
        JOURNAL_BASE,
        JOURNAL_BYTES,
        options(Mutation::None, ReplayMode::InMemory),
        &mut NoDedup,
    )?;
    let targets = (0..committers)
        .map(|committer| {
            let mut buf = vec![0u8; payload_of(committer).len()];
            journal
                .overlay()
                .read_through(journal.storage(), &mut buf, target_of(committer))
                .expect("memory reads do not fail");
            buf
        })
        .collect();
    Ok(targets)
}

/// Asserts what every crash image of one execution must show.
fn check_crash_images(images: &[CrashImage], committers: usize) {
    // Many images repeat (a flush that changed nothing, a read-only
    // stretch): replay each distinct one once.
    let mut replays: HashMap<&[u8], Result<Vec<Vec<u8>>, String>> = HashMap::new();
    for image in images {
        let replayed = replays.entry(&image.bytes).or_insert_with(|| {
            replayed_targets(&image.bytes, committers).map_err(|e| e.to_string())
        });
        let targets = match replayed {
            Ok(targets) => targets,
            Err(error) => panic!(
                "a power cut at {} leaves a journal replay refuses: {error}",
                image.label
            ),
        };
        for (committer, found) in targets.iter().enumerate() {
            let payload = payload_of(committer);
            if image.acknowledged.contains(&committer) {
                assert_eq!(
                    *found, payload,
                    "a power cut at {} loses the acknowledged commit of committer {committer} \
                     (acknowledged: {:?})",
                    image.label, image.acknowledged
                );
            } else {
                assert!(
                    *found == payload || found.iter().all(|b| *b == 0),
                    "a power cut at {} leaves neither zeros nor the payload at committer \
                     {committer}'s target: {found:?}",
                    image.label
                );
            }
        }
    }
}

/// One model's threads and journal options.
#[derive(Clone, Copy, Debug)]
struct Scenario {
    /// Threads committing one transaction each, into a ring that holds one.
    committers: usize,
    /// Whether one more thread calls [`Journal::checkpoint`] meanwhile.
    checkpointer: bool,
    protocol: CommitProtocol,
    mutation: Mutation,
}

fn space_model(scenario: Scenario) {
    let Scenario {
        committers,
        checkpointer,
        protocol,
        mutation,
    } = scenario;
    assert!((1..=COMMITTERS_MAX).contains(&committers));
    let device = std::sync::Arc::new(ModelDevice::default());
    let journal = Journal::create(
        std::sync::Arc::clone(&device),
        JOURNAL_BASE,
        JOURNAL_BYTES,
        BLOCK_BYTES,
        JournalOptions {
            commit_protocol: protocol,
            ..options(mutation, ReplayMode::Apply)
        },
    )
    .expect("create");
    // The model's premise: no two transactions fit, so every commit but
    // the first meets a full ring.
    assert_eq!(u64::from(journal.geometry().ring_blocks()), RING_BLOCKS);
    assert_eq!(journal.blocks_needed(&transaction_of(0)), RING_BLOCKS);
    assert_eq!(journal.blocks_needed(&transaction_of(1)), SMALL_TX_BLOCKS);
    device.start_recording();

    let journal = loom::sync::Arc::new(journal);
    let mut threads = Vec::new();
    for committer in 0..committers {
        let journal = loom::sync::Arc::clone(&journal);
        let device = std::sync::Arc::clone(&device);
        threads.push(loom::thread::spawn(move || {
            let seq = match journal.commit(transaction_of(committer)) {
                Ok(seq) => seq,
                Err(e) => panic!("commit of committer {committer} failed: {e}"),
            };
            device.acknowledge(committer);
            Some(seq)
        }));
    }
    if checkpointer {
        let journal = loom::sync::Arc::clone(&journal);
        threads.push(loom::thread::spawn(move || {
            if let Err(e) = journal.checkpoint() {
                panic!("explicit checkpoint failed: {e}");
            }
            None
        }));
    }
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .filter_map(|thread| thread.join().expect("thread"))
        .collect();
    seqs.sort_unstable();
    let expected: Vec<u64> = (1..=committers as u64).collect();
    assert_eq!(seqs, expected, "each commit got its own sequence number");
    assert_eq!(journal.committed_seq(), committers as u64);

    check_crash_images(&device.take_images(), committers);
    assert!(
        journal.fill().used_blocks <= RING_BLOCKS,
        "ring over-allocated"
    );

    // Everything acknowledged is durable now: the device as the last flush
    // left it, opened for real, has every payload in place.
    let durable = MemStorage::from_bytes(device.durable());
    let (reopened, report) = Journal::open(
        &durable,
        JOURNAL_BASE,
        JOURNAL_BYTES,
        options(Mutation::None, ReplayMode::Apply),
        &mut NoDedup,
    )
    .expect("reopen after the run");
    drop(reopened);
    assert_eq!(report.last_replayed_seq, committers as u64);
    for committer in 0..committers {
        let mut buf = vec![0u8; payload_of(committer).len()];
        durable
            .read_at(&mut buf, target_of(committer))
            .expect("memory read");
        assert_eq!(
            buf,
            payload_of(committer),
            "committer {committer} after reopen"
        );
    }
}

/// Runs `model` under loom with at most `preemptions_max` preemptions
/// (fewer if `LOOM_MAX_PREEMPTIONS` says so).
fn check_model(preemptions_max: usize, model: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    let preemptions = builder
        .preemption_bound
        .unwrap_or(PREEMPTIONS_DEFAULT)
        .min(preemptions_max);
    builder.preemption_bound = Some(preemptions);
    builder.check(model);
}

/// Two commits, each meeting the ring full or filling it, race an
/// explicit checkpoint (which also covers the schedules where it runs
/// first and finds nothing to do: two committers alone).
#[test]
fn explicit_checkpoint_races_two_commits_through_a_full_ring() {
    check_model(PREEMPTIONS_DEFAULT, || {
        space_model(Scenario {
            committers: 2,
            checkpointer: true,
            protocol: CommitProtocol::SingleFlush,
            mutation: Mutation::None,
        });
    });
}

/// Three commits through a ring that holds one: the in-commit checkpoint,
/// the wrap with padding, and a third committer that joins a batch or
/// blocks on the full group-commit queue.
#[test]
fn three_commits_through_a_one_transaction_ring() {
    check_model(THREE_COMMITTERS_PREEMPTIONS, || {
        space_model(Scenario {
            committers: 3,
            checkpointer: false,
            protocol: CommitProtocol::SingleFlush,
            mutation: Mutation::None,
        });
    });
}

/// The same with the draft's two-flush commit, whose in-commit checkpoint
/// writes and flushes the batch's bodies before their commit blocks.
#[test]
fn three_two_flush_commits_through_a_one_transaction_ring() {
    check_model(THREE_COMMITTERS_PREEMPTIONS, || {
        space_model(Scenario {
            committers: 3,
            checkpointer: false,
            protocol: CommitProtocol::TwoFlush,
            mutation: Mutation::None,
        });
    });
}

/// The model has teeth: with the header advanced before the in-place
/// writes are flushed (the crash harness's `checkpoint-before-flush`),
/// a power cut between that header write and its flush loses an
/// acknowledged commit.
#[test]
fn checkpoint_before_flush_is_caught() {
    let outcome = std::panic::catch_unwind(|| {
        check_model(PREEMPTIONS_DEFAULT, || {
            space_model(Scenario {
                committers: 2,
                checkpointer: false,
                protocol: CommitProtocol::SingleFlush,
                mutation: Mutation::CheckpointBeforeFlush,
            });
        });
    });
    let payload = outcome.expect_err("the model must fail with the mutation");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_default();
    assert!(
        message.contains("loses the acknowledged commit"),
        "failed for another reason: {message}"
    );
}
