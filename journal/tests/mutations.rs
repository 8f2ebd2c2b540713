//! The deliberate bugs of [`Mutation`] (for the crash harness), each shown
//! at the journal level: the same crash that the correct journal survives
//! loses or corrupts data with the mutation set.

mod common;

use std::sync::Arc;

use common::{pattern, CrashDevice};
use qj_journal::{
    Journal, JournalOptions, LogEndKind, MemStorage, Mutation, NoDedup, ReplayReport, Storage,
    Transaction,
};

const BLOCK: u32 = 512;
/// Two header slots and a ring of 32 blocks.
const SIZE: u64 = 1024 + 32 * BLOCK as u64;
const LIMIT: u64 = 1 << 20;
/// Where transactions write: outside the journal region `[0, SIZE)`.
const TARGET: u64 = 0x10000;
/// Two journal blocks of data.
const TX_BYTES: usize = 1024;

fn options(mutation: Mutation) -> JournalOptions {
    let mut options = JournalOptions::new(LIMIT);
    options.mutation = mutation;
    options
}

fn write_tx(tag: u8) -> Transaction {
    let mut tx = Transaction::new();
    tx.write(TARGET, &pattern(tag, TX_BYTES)).unwrap();
    tx
}

fn target_of(storage: &dyn Storage) -> Vec<u8> {
    let mut buf = vec![0u8; TX_BYTES];
    storage.read_at(&mut buf, TARGET).unwrap();
    buf
}

/// Opens (replays) `image` with `mutation`; returns the report and what
/// the target range holds afterwards.
fn replay(image: Vec<u8>, mutation: Mutation) -> (ReplayReport, Vec<u8>) {
    let device = MemStorage::from_bytes(image);
    let (_, report) = Journal::open(&device, 0, SIZE, options(mutation), &mut NoDedup).unwrap();
    (report, target_of(&device))
}

/// A device holding a fresh journal whose transaction 1 (tag 1) is
/// committed and durable.
fn with_one_commit(mutation: Mutation) -> (Arc<CrashDevice>, Journal<Arc<CrashDevice>>) {
    let device = Arc::new(CrashDevice::default());
    let journal = Journal::create(Arc::clone(&device), 0, SIZE, BLOCK, options(mutation)).unwrap();
    assert_eq!(journal.commit(write_tx(1)).unwrap(), 1);
    (device, journal)
}

/// Device operations `step` takes after [`with_one_commit`], measured on a
/// twin device: a power cut at that many operations from its start fails
/// the last one (for commit and checkpoint, the flush that ends it).
fn ops_of(mutation: Mutation, step: &dyn Fn(&Journal<Arc<CrashDevice>>)) -> u64 {
    let (device, journal) = with_one_commit(mutation);
    let before = device.ops();
    step(&journal);
    device.ops() - before
}

/// Transaction 2 (tag 2) torn by a power cut at its commit's flush: every
/// block reached the device except the first data block, so block 0 and
/// the commit block are intact and only the whole-transaction checksum
/// tells that the transaction is incomplete.
fn torn_second_commit_image() -> Vec<u8> {
    let commit = |journal: &Journal<Arc<CrashDevice>>| {
        journal.commit(write_tx(2)).unwrap();
    };
    let ops = ops_of(Mutation::None, &commit);
    let (device, journal) = with_one_commit(Mutation::None);
    device.crash_at(ops);
    assert!(journal.commit(write_tx(2)).is_err(), "the flush was cut");
    drop(journal);
    let second = pattern(2, TX_BYTES);
    let sectors = device.pending_sectors();
    let data_block = |half: usize| {
        let want = &second[half * BLOCK as usize..(half + 1) * BLOCK as usize];
        sectors
            .iter()
            .position(|(_, bytes)| bytes.as_slice() == want)
    };
    let dropped = data_block(0).expect("transaction 2's first data block is unflushed");
    assert!(data_block(1).is_some(), "so is its second");
    // Descriptor block, two data blocks, commit block.
    assert!(sectors.len() >= 4, "{} unflushed sectors", sectors.len());
    device.image_after_crash(&|i| i != dropped)
}

#[test]
fn replay_skips_tx_checksum_applies_a_torn_transaction() {
    let image = torn_second_commit_image();
    let first = pattern(1, TX_BYTES);
    let second = pattern(2, TX_BYTES);

    let (report, target) = replay(image.clone(), Mutation::None);
    assert_eq!(report.transactions_replayed, 1, "{report:?}");
    assert_eq!(report.end.kind, LogEndKind::TornTail, "{report:?}");
    assert!(report.end.reason.contains("torn"), "{}", report.end.reason);
    assert_eq!(target, first, "the torn transaction is dropped");

    let (report, target) = replay(image, Mutation::ReplaySkipsTxChecksum);
    assert_eq!(report.transactions_replayed, 2, "{report:?}");
    assert_eq!(report.last_replayed_seq, 2);
    // The missing block's bytes come from whatever the ring held there.
    assert_ne!(target[..BLOCK as usize], second[..BLOCK as usize]);
    assert_ne!(target[..BLOCK as usize], first[..BLOCK as usize]);
    assert_eq!(target[BLOCK as usize..], second[BLOCK as usize..]);
}

#[test]
fn replay_ignores_revokes_writes_over_a_reused_range() {
    let device = MemStorage::new();
    let journal = Journal::create(&device, 0, SIZE, BLOCK, options(Mutation::None)).unwrap();
    journal.commit(write_tx(1)).unwrap();
    let mut revoke = Transaction::new();
    revoke.revoke(TARGET, TX_BYTES as u64).unwrap();
    journal.commit(revoke).unwrap();
    // The revoking commit returned: the range may be reused outside the
    // journal, before any checkpoint.
    let reused = pattern(9, TX_BYTES);
    device.write_at(&reused, TARGET).unwrap();
    device.flush().unwrap();
    // Power cut: nothing was checkpointed.
    drop(journal);
    let image = device.to_bytes();

    let (report, target) = replay(image.clone(), Mutation::None);
    assert_eq!(report.transactions_replayed, 2, "{report:?}");
    assert_eq!(report.bytes_revoked, TX_BYTES as u64, "{report:?}");
    assert_eq!(target, reused, "the revoked write is skipped");

    let (report, target) = replay(image, Mutation::ReplayIgnoresRevokes);
    assert_eq!(report.transactions_replayed, 2, "{report:?}");
    assert_eq!(report.bytes_revoked, 0, "{report:?}");
    assert_eq!(
        target,
        pattern(1, TX_BYTES),
        "the reused range is overwritten by the revoked transaction"
    );
}

/// A power cut at the flush that ends a checkpoint of transaction 1; the
/// header sectors reached the device, the unflushed in-place writes (if
/// any are still unflushed) did not. Returns what replay leaves at the
/// target and the unflushed sectors outside the journal.
fn checkpoint_cut_at_last_flush(mutation: Mutation) -> (Vec<u8>, usize) {
    let checkpoint = |journal: &Journal<Arc<CrashDevice>>| {
        journal.checkpoint().unwrap();
    };
    // The checkpoint's last operation is the header's mirror write, which
    // follows the flush that makes the new header durable: cut that flush.
    let ops = ops_of(mutation, &checkpoint) - 1;
    let (device, journal) = with_one_commit(mutation);
    device.crash_at(ops);
    assert!(journal.checkpoint().is_err(), "the last flush was cut");
    drop(journal);
    let sectors = device.pending_sectors();
    let in_journal = |offset: u64| offset < SIZE;
    assert!(
        sectors.iter().any(|(offset, _)| in_journal(*offset)),
        "the advanced header is unflushed"
    );
    let outside = sectors.iter().filter(|(o, _)| !in_journal(*o)).count();
    let image = device.image_after_crash(&|i| in_journal(sectors[i].0));
    let (report, target) = replay(image, Mutation::None);
    assert_eq!(
        report.synced_seq_before, 1,
        "the new header won: {report:?}"
    );
    assert_eq!(report.transactions_replayed, 0, "{report:?}");
    (target, outside)
}

#[test]
fn checkpoint_before_flush_loses_a_committed_transaction() {
    let (target, outside) = checkpoint_cut_at_last_flush(Mutation::None);
    assert_eq!(outside, 0, "in-place writes were flushed before the header");
    assert_eq!(target, pattern(1, TX_BYTES), "transaction 1 is in place");

    let (target, outside) = checkpoint_cut_at_last_flush(Mutation::CheckpointBeforeFlush);
    assert!(
        outside > 0,
        "in-place writes still unflushed with the header"
    );
    assert_eq!(
        target,
        vec![0u8; TX_BYTES],
        "the header says synced, the committed write is lost"
    );
}

#[test]
fn checkpoint_before_flush_reports_one_flush_fewer() {
    for (mutation, flushes) in [(Mutation::None, 2), (Mutation::CheckpointBeforeFlush, 1)] {
        let (device, journal) = with_one_commit(mutation);
        let before = device.flushes();
        let report = journal.checkpoint().unwrap();
        assert_eq!(report.flushes, flushes, "{mutation:?}");
        assert_eq!(device.flushes() - before, flushes, "{mutation:?}");
        assert_eq!(journal.stats().checkpoint_flushes, flushes, "{mutation:?}");
    }
}

#[test]
fn mutations_default_to_none() {
    assert_eq!(JournalOptions::new(LIMIT).mutation, Mutation::None);
    assert_eq!(Mutation::default(), Mutation::None);
}
