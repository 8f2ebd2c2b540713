//! Behaviour of the journal: every descriptor through commit, checkpoint,
//! replay and dump; wraparound; revokes; torn, corrupt and stale logs; bad
//! input; space accounting; flush counts; group commit.

mod common;

use std::sync::atomic::Ordering;

use common::{pattern, CountingDevice, CrashDevice};
use qj_journal::{
    dump, CommitProtocol, DedupEvent, DedupOp, DescriptorDump, Journal, JournalError,
    JournalOptions, LogEndKind, MemStorage, NoDedup, ReplayMode, Storage, Transaction, WhenFull,
};
use qj_spec::journal::{
    checksum, encode_transaction, BlockHeader, DedupEntry, Descriptor, JournalFormatError,
    JournalGeometry, JournalHeader, TransactionParams, WriteChunk,
};

const BLOCK: u32 = 512;
const RING_BLOCKS: u64 = 32;
const SIZE: u64 = 1024 + RING_BLOCKS * BLOCK as u64;
const LIMIT: u64 = 1 << 20;
/// Where tests put their targets, well past the journal.
const AREA: u64 = 0x10000;

fn options() -> JournalOptions {
    JournalOptions::new(LIMIT)
}

fn create<S: Storage>(storage: S) -> Journal<S> {
    Journal::create(storage, 0, SIZE, BLOCK, options()).unwrap()
}

fn reopen<S: Storage>(storage: S) -> (Journal<S>, qj_journal::ReplayReport) {
    Journal::open(storage, 0, SIZE, options(), &mut NoDedup).unwrap()
}

fn read(storage: &dyn Storage, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    storage.read_at(&mut buf, offset).unwrap();
    buf
}

fn tx_write(target: u64, bytes: &[u8]) -> Transaction {
    let mut tx = Transaction::new();
    tx.write(target, bytes).unwrap();
    tx
}

fn hash(tag: u8) -> Vec<u8> {
    (0..32).map(|i| tag ^ i).collect()
}

/// A transaction with every descriptor type, and the device it expects
/// (copy source and checksummed guest data already in place).
fn everything(storage: &MemStorage) -> Transaction {
    storage
        .write_at(&pattern(0xc0, 0x300), AREA + 0x3000)
        .unwrap();
    storage
        .write_at(&pattern(0xd0, 200), AREA + 0x4000)
        .unwrap();
    let mut tx = Transaction::new();
    tx.no_op();
    tx.write(AREA, &pattern(1, 700))
        .unwrap()
        .write(AREA + 0x1000, &pattern(2, 5))
        .unwrap();
    tx.copy(AREA + 0x2000, AREA + 0x3000, 100)
        .unwrap()
        .copy(AREA + 0x2100, AREA + 0x3100, 200)
        .unwrap();
    tx.revoke(AREA + 0x5000, 0x1000)
        .unwrap()
        .revoke(AREA + 0x7000, 8)
        .unwrap();
    tx.dedup_insert(DedupEntry {
        host_offset: 0x40000,
        hash_algorithm: 1,
        hash: hash(1),
    })
    .unwrap();
    tx.dedup_delete(DedupEntry {
        host_offset: 0x50000,
        hash_algorithm: 1,
        hash: hash(2)[..20].to_vec(),
    })
    .unwrap();
    tx.data_checksum(AREA + 0x4000, &pattern(0xd0, 200))
        .unwrap();
    tx.private(0x8001, b"engine private").unwrap();
    tx
}

fn check_everything_applied(storage: &dyn Storage) {
    assert_eq!(read(storage, AREA, 700), pattern(1, 700));
    assert_eq!(read(storage, AREA + 0x1000, 5), pattern(2, 5));
    assert_eq!(
        read(storage, AREA + 0x2000, 100),
        pattern(0xc0, 0x300)[..100]
    );
    assert_eq!(
        read(storage, AREA + 0x2100, 200),
        pattern(0xc0, 0x300)[0x100..0x100 + 200]
    );
}

#[test]
fn every_descriptor_round_trips_through_the_log() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let tx = everything(&storage);
    let want: Vec<DescriptorDump> = tx.descriptors().iter().map(DescriptorDump::from).collect();
    assert_eq!(journal.commit(tx).unwrap(), 1);
    let dumped = dump(&storage, 0, SIZE).unwrap();
    assert!(dumped.dirty);
    assert_eq!(dumped.transactions.len(), 1);
    assert_eq!(dumped.transactions[0].descriptors, want);
    assert_eq!(dumped.log_end.kind, LogEndKind::Clean);
    assert_eq!(dumped.log_end.expected_seq, 2);
    let json = serde_json::to_value(&dumped).unwrap();
    assert_eq!(
        json["transactions"][0]["descriptors"][1]["type"],
        "write_data"
    );
    assert_eq!(
        json["transactions"][0]["descriptors"][4]["type"],
        "dedup_insert"
    );
    assert_eq!(json["log_end"]["kind"], "clean");
    let text = dumped.to_string();
    assert!(text.contains("transaction 1 at block 0"), "{text}");
    assert!(
        text.contains("revoke: 0x15000+0x1000 0x17000+0x8"),
        "{text}"
    );
}

#[test]
fn replay_applies_every_descriptor_type_and_hands_dedup_in_order() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(everything(&storage)).unwrap();
    let mut more = Transaction::new();
    more.dedup_insert(DedupEntry {
        host_offset: 0x60000,
        hash_algorithm: 1,
        hash: hash(3),
    })
    .unwrap();
    journal.commit(more).unwrap();
    drop(journal);
    assert_eq!(
        read(&storage, AREA, 4),
        vec![0; 4],
        "nothing applied in place before replay"
    );

    let mut events: Vec<DedupEvent> = Vec::new();
    let (journal, report) = Journal::open(&storage, 0, SIZE, options(), &mut events).unwrap();
    check_everything_applied(&storage);
    assert_eq!(report.transactions_replayed, 2);
    assert_eq!(report.last_replayed_seq, 2);
    assert_eq!(report.bytes_written, 700 + 5 + 300);
    assert_eq!(
        report.ranges_written,
        vec![
            (AREA, 700),
            (AREA + 0x1000, 5),
            (AREA + 0x2000, 100),
            (AREA + 0x2100, 200)
        ]
    );
    let ops: Vec<(u64, DedupOp, u64)> = events
        .iter()
        .map(|e| (e.seq, e.op, e.entry.host_offset))
        .collect();
    assert_eq!(
        ops,
        vec![
            (1, DedupOp::Insert, 0x40000),
            (1, DedupOp::Delete, 0x50000),
            (2, DedupOp::Insert, 0x60000)
        ]
    );
    assert_eq!(events[1].entry.hash, hash(2)[..20].to_vec());
    assert_eq!(journal.synced_seq(), 2);
    assert_eq!(journal.committed_seq(), 2);
    assert!(!journal.has_unsynced());
    drop(journal);

    // Replay retired the log: a second open finds nothing.
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 0);
    assert_eq!(report.synced_seq_before, 2);
}

#[test]
fn dedup_entries_without_a_consumer_refuse_the_open() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    // A plain write first: the refusal must come before it is replayed.
    journal.commit(tx_write(AREA + 0x8000, b"earlier")).unwrap();
    journal.commit(everything(&storage)).unwrap();
    drop(journal);
    let before = storage.to_bytes();
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    assert!(matches!(err, JournalError::Dedup { seq: 2, .. }), "{err}");
    assert_eq!(storage.to_bytes(), before, "a refused open writes nothing");
    // The log is still there: an open with a consumer replays it.
    let mut events = Vec::new();
    let (_, report) = Journal::open(&storage, 0, SIZE, options(), &mut events).unwrap();
    assert_eq!(report.transactions_replayed, 2);
    assert_eq!(events.len(), 2);
    assert_eq!(read(&storage, AREA + 0x8000, 7), b"earlier");
    check_everything_applied(&storage);
}

/// A device whose in-place writes (at `AREA` and past) wait, while held,
/// until released (a checkpoint stays inside its writes meanwhile), and
/// are logged as (offset, length).
#[derive(Debug, Default)]
struct HeldDevice {
    inner: MemStorage,
    held: std::sync::Mutex<bool>,
    released: std::sync::Condvar,
    writes_waiting: std::sync::atomic::AtomicUsize,
    writes: std::sync::Mutex<Vec<(u64, usize)>>,
}

impl Storage for HeldDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset >= AREA {
            self.writes.lock().unwrap().push((offset, buf.len()));
            let mut held = self.held.lock().unwrap();
            self.writes_waiting.fetch_add(1, Ordering::SeqCst);
            while *held {
                held = self.released.wait(held).unwrap();
            }
        }
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

#[test]
fn try_checkpoint_does_not_wait_for_a_running_checkpoint() {
    let device = HeldDevice::default();
    let journal = create(&device);
    assert_eq!(journal.commit(tx_write(AREA, b"first")).unwrap(), 1);
    *device.held.lock().unwrap() = true;
    std::thread::scope(|scope| {
        let running = scope.spawn(|| journal.checkpoint().unwrap());
        let started = std::time::Instant::now();
        while device.writes_waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(30),
                "the checkpoint never reached its in-place write"
            );
            std::thread::yield_now();
        }
        let tried = journal.try_checkpoint();
        // Released before asserting: a failed assertion must not leave the
        // running checkpoint blocked (the scope would wait for it forever).
        *device.held.lock().unwrap() = false;
        device.released.notify_all();
        assert!(
            tried.is_none(),
            "try_checkpoint waited for, or ran beside, the running checkpoint"
        );
        assert_eq!(running.join().unwrap().synced_seq, 1);
    });
    assert_eq!(journal.commit(tx_write(AREA, b"second")).unwrap(), 2);
    let report = journal
        .try_checkpoint()
        .expect("no checkpoint is running")
        .unwrap();
    assert_eq!(report.synced_seq, 2);
    assert_eq!(read(&device.inner, AREA, 6), b"second");
}

#[test]
fn checkpoint_applies_in_place_and_reports_ranges() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut tx = Transaction::new();
    tx.write(AREA + 100, b"abc")
        .unwrap()
        .write(AREA + 103, b"def")
        .unwrap()
        .write(AREA + 0x800, b"x")
        .unwrap();
    assert_eq!(journal.commit(tx).unwrap(), 1);
    assert!(journal.has_unsynced());
    assert!(journal.pending_overlap(AREA + 0x800, 1));
    assert!(!journal.pending_overlap(AREA + 0x801, 10));
    assert!(journal.fill().used_blocks > 0);
    let report = journal.checkpoint().unwrap();
    assert_eq!(report.synced_seq, 1);
    assert_eq!(report.transactions, 1);
    assert_eq!(
        report.ranges_written,
        vec![(AREA + 100, 6), (AREA + 0x800, 1)]
    );
    assert_eq!(report.flushes, 2);
    assert_eq!(read(&storage, AREA + 100, 6), b"abcdef");
    assert_eq!(journal.fill().used_blocks, 0);
    assert!(!journal.has_unsynced());
    assert!(!journal.pending_overlap(AREA + 0x800, 1));
    let idle = journal.checkpoint().unwrap();
    assert_eq!((idle.transactions, idle.flushes), (0, 0));
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(
        report.transactions_replayed, 0,
        "a synced transaction is not replayed"
    );
}

/// A sector that every commit rewrote is written once per checkpoint,
/// with the last commit's bytes; ranges that touch go as one write; a
/// copy reads its source as the transactions before it left it (in the
/// checkpoint's overlay, not yet on the device).
#[test]
fn checkpoint_writes_each_range_once_with_its_last_version() {
    let device = HeldDevice::default();
    let journal = create(&device);
    for version in 1..=3u8 {
        journal.commit(tx_write(AREA, &[version; 512])).unwrap();
    }
    journal.commit(tx_write(AREA + 512, &[6; 512])).unwrap();
    journal.commit(tx_write(AREA + 0x4000, &[7; 100])).unwrap();
    let mut copy = Transaction::new();
    copy.copy(AREA + 0x8000, AREA + 0x4000, 100).unwrap();
    journal.commit(copy).unwrap();
    assert!(
        device.writes.lock().unwrap().is_empty(),
        "nothing in place before the checkpoint"
    );

    let report = journal.checkpoint().unwrap();
    assert_eq!(report.transactions, 6);
    assert_eq!(
        *device.writes.lock().unwrap(),
        vec![(AREA, 1024), (AREA + 0x4000, 100), (AREA + 0x8000, 100)],
        "each range once, touching ranges joined, in offset order"
    );
    assert_eq!(report.bytes_written, 1024 + 100 + 100);
    assert_eq!(
        report.ranges_written,
        vec![(AREA, 1024), (AREA + 0x4000, 100), (AREA + 0x8000, 100)]
    );
    assert_eq!(read(&device.inner, AREA, 512), vec![3; 512]);
    assert_eq!(read(&device.inner, AREA + 512, 512), vec![6; 512]);
    assert_eq!(read(&device.inner, AREA + 0x4000, 100), vec![7; 100]);
    assert_eq!(
        read(&device.inner, AREA + 0x8000, 100),
        vec![7; 100],
        "the copy read its source as the transaction before it wrote it, \
         though those bytes were not in place yet"
    );
    drop(journal);
    let (_, replayed) = reopen(&device);
    assert_eq!(replayed.transactions_replayed, 0, "all synced");
}

#[test]
fn wraparound_pads_and_keeps_every_commit() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut model = vec![0u8; 0x4000];
    let mut saw_padding = false;
    for round in 0..60u64 {
        // 1 to 6 data blocks, so transactions stop short of the ring end.
        let len = 512 * (1 + round % 6) as usize - 7;
        let offset = (round * 0x97) % 0x3000;
        let bytes = pattern(round as u8, len);
        journal.commit(tx_write(AREA + offset, &bytes)).unwrap();
        model[offset as usize..offset as usize + len].copy_from_slice(&bytes);
        let dumped = dump(&storage, 0, SIZE).unwrap();
        saw_padding |= dumped.transactions.iter().any(|t| t.padding_blocks > 0);
        if round % 7 == 3 {
            // Replay from whatever state the ring is in now.
            let copy = MemStorage::from_bytes(storage.to_bytes());
            let (_, report) = reopen(&copy);
            assert_eq!(
                report.end.kind,
                LogEndKind::Clean,
                "round {round}: {}",
                report.end.reason
            );
            assert_eq!(read(&copy, AREA, model.len()), model, "round {round}");
        }
    }
    assert!(
        saw_padding,
        "60 commits of up to 8 blocks in 32 must have wrapped with padding"
    );
    assert!(
        journal.stats().checkpoints > 0,
        "a full ring checkpointed by itself"
    );
    let auto = journal.take_auto_checkpoint_ranges();
    assert!(
        !auto.is_empty()
            && auto
                .iter()
                .all(|(o, l)| *o >= AREA && o + l <= AREA + 0x4000),
        "{auto:?}"
    );
    assert!(journal.take_auto_checkpoint_ranges().is_empty(), "taken");
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.end.kind, LogEndKind::Clean);
    assert_eq!(read(&storage, AREA, model.len()), model);
}

#[test]
fn revoke_keeps_a_reused_l1_cluster_safe() {
    // The draft's example. T1 journals an L1 table at X. T2 grows the L1
    // to Y and frees X (revoking it). X is then reused for guest data,
    // written in place. Neither checkpoint nor replay may put T1's stale L1
    // back over the data.
    const X: u64 = AREA;
    const Y: u64 = AREA + 0x1000;
    for crash_instead_of_checkpoint in [false, true] {
        let storage = MemStorage::new();
        let journal = create(&storage);
        journal.commit(tx_write(X, &pattern(0x11, 512))).unwrap();
        let mut t2 = Transaction::new();
        t2.write(Y, &pattern(0x22, 1024))
            .unwrap()
            .revoke(X, 512)
            .unwrap();
        journal.commit(t2).unwrap();
        // The revoking commit returned: X may be reused outside the journal.
        storage.write_at(&pattern(0xda, 512), X).unwrap();
        if crash_instead_of_checkpoint {
            drop(journal);
            let (_, report) = reopen(&storage);
            assert_eq!(report.transactions_replayed, 2);
            assert_eq!(report.bytes_revoked, 512);
        } else {
            let report = journal.checkpoint().unwrap();
            assert_eq!(report.bytes_revoked, 512);
            assert_eq!(report.ranges_written, vec![(Y, 1024)]);
        }
        assert_eq!(
            read(&storage, X, 512),
            pattern(0xda, 512),
            "guest data survives"
        );
        assert_eq!(read(&storage, Y, 1024), pattern(0x22, 1024));
    }
}

#[test]
fn revoke_covers_earlier_transactions_only() {
    // X reused as journalled metadata: the reusing transaction carries the
    // revoke and its own new content for X, which must be applied.
    const X: u64 = AREA;
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut t1 = Transaction::new();
    t1.write(X, &pattern(1, 1024)).unwrap();
    journal.commit(t1).unwrap();
    let mut t2 = Transaction::new();
    t2.revoke(X, 1024)
        .unwrap()
        .write(X + 512, &pattern(2, 512))
        .unwrap();
    journal.commit(t2).unwrap();
    let mut t3 = Transaction::new();
    t3.write(X + 100, b"late").unwrap();
    journal.commit(t3).unwrap();
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.bytes_revoked, 1024);
    assert_eq!(read(&storage, X, 100), vec![0; 100], "T1 revoked by T2");
    assert_eq!(
        read(&storage, X + 100, 4),
        b"late",
        "T3 comes after the revoke"
    );
    assert_eq!(
        read(&storage, X + 512, 512),
        pattern(2, 512),
        "T2's own write is not revoked by T2"
    );
}

/// Commits T1 and T2 fully, then T3 on a device that loses power at its
/// flush, keeping only the unflushed sectors `keep` selects.
fn torn_third_commit(keep: &dyn Fn(usize, usize) -> bool) -> MemStorage {
    let device = CrashDevice::default();
    let journal = create(&device);
    journal.commit(tx_write(AREA, &pattern(1, 600))).unwrap();
    journal
        .commit(tx_write(AREA + 0x1000, &pattern(2, 600)))
        .unwrap();
    // T3's single write, then its flush (op 2) fails.
    device.crash_at(2);
    let err = journal
        .commit(tx_write(AREA + 0x2000, &pattern(3, 1500)))
        .unwrap_err();
    assert!(matches!(err, JournalError::Poisoned { .. }), "{err}");
    let sectors = device.pending_sectors().len();
    MemStorage::from_bytes(device.image_after_crash(&|i| keep(i, sectors)))
}

#[test]
fn torn_tail_is_dropped() {
    // Everything but the commit block of T3 reached the disk.
    let storage = torn_third_commit(&|i, n| i + 1 < n);
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 2);
    assert_eq!(
        report.end.kind,
        LogEndKind::TornTail,
        "{}",
        report.end.reason
    );
    assert_eq!(report.end.expected_seq, 3);
    // Begun but incomplete: reported, naming the transaction, because the
    // same bytes are what damage to an acknowledged transaction leaves.
    let warning = report.torn_tail_warning().expect("a torn tail is reported");
    assert!(warning.contains("sequence number 3"), "{warning}");
    assert!(warning.contains("acknowledged"), "{warning}");
    assert_eq!(read(&storage, AREA, 600), pattern(1, 600));
    assert_eq!(read(&storage, AREA + 0x1000, 600), pattern(2, 600));
    assert_eq!(read(&storage, AREA + 0x2000, 8), vec![0; 8]);
    // Nothing of T3 at all: a clean end, nothing to report.
    let storage = torn_third_commit(&|_, _| false);
    let (journal, report) = reopen(&storage);
    assert_eq!(report.end.kind, LogEndKind::Clean);
    assert_eq!(report.torn_tail_warning(), None);
    assert_eq!(report.transactions_replayed, 2);
    // The journal goes on after a torn tail, with new numbers for new commits.
    assert_eq!(journal.commit(tx_write(AREA + 0x3000, b"next")).unwrap(), 3);
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(read(&storage, AREA + 0x3000, 4), b"next");
}

#[test]
fn dropped_tail_transactions_never_come_back() {
    // T3 torn (commit block lost) with an intact T4 behind it would be
    // replayable if sequence numbers were reused under the same id: replay
    // retires the log with a new journal id, so it is not.
    let device = CrashDevice::default();
    let journal = create(&device);
    journal.commit(tx_write(AREA, &pattern(1, 100))).unwrap();
    device.crash_at(2);
    assert!(journal
        .commit(tx_write(AREA + 0x1000, &pattern(3, 100)))
        .is_err());
    let storage = MemStorage::from_bytes(device.image_after_crash(&|_| true));
    // Make T2's block 0 unreadable: a torn tail.
    let t2_offset = dump(&storage, 0, SIZE).unwrap().transactions[1].device_offset;
    storage.write_at(&[0xff], t2_offset + 100).unwrap();
    let (journal, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 1);
    // New T2, shorter than the dropped one; the old one's later blocks stay.
    journal.commit(tx_write(AREA + 0x2000, b"new")).unwrap();
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(
        read(&storage, AREA + 0x1000, 4),
        vec![0; 4],
        "the dropped T2 never applies"
    );
}

/// Sets byte `at` of block `block` of the transaction at `tx_offset`
/// (`blocks` long, commit block last) to `value`, and seals everything
/// again with the journal's id (block checksums, transaction checksum), as
/// a broken writer would have.
fn poke_sealed(
    storage: &MemStorage,
    tx_offset: u64,
    blocks: u64,
    block: u64,
    at: usize,
    value: u8,
) {
    let id = dump(storage, 0, SIZE).unwrap().header.journal_id;
    let id = u64::from_str_radix(id.trim_start_matches("0x"), 16).unwrap();
    let bs = BLOCK as usize;
    let mut tx = read(storage, tx_offset, blocks as usize * bs);
    tx[block as usize * bs + at] = value;
    let seq = u64::from_be_bytes(tx[8..16].try_into().unwrap());
    let seal = |b: &mut [u8]| {
        b[28..32].fill(0);
        let crc = checksum::block_checksum(id, seq, b, 28);
        b[28..32].copy_from_slice(&crc.to_be_bytes());
    };
    let commit_at = (blocks as usize - 1) * bs;
    for b in tx[..commit_at].chunks_mut(bs) {
        if b[..4] == *b"qjbk" {
            seal(b);
        }
    }
    let tx_crc = checksum::salted_append(checksum::salt(id, seq), &tx[..commit_at]);
    tx[commit_at + 40..commit_at + 44].copy_from_slice(&tx_crc.to_be_bytes());
    seal(&mut tx[commit_at..]);
    storage.write_at(&tx, tx_offset).unwrap();
}

#[test]
fn reserved_bytes_behind_a_good_checksum_refuse_the_log_in_every_block() {
    // (which block of transaction 2, byte) : block 0's header reserved
    // bytes, the bytes after its descriptors, the commit block's reserved
    // word and its tail. Every one is invalid, never the end of the log.
    for (block, at) in [(0u64, 6usize), (0, 25), (0, 400), (2, 44), (2, 300)] {
        let storage = MemStorage::new();
        let journal = create(&storage);
        journal.commit(tx_write(AREA, b"first")).unwrap();
        journal.commit(tx_write(AREA + 8, b"second")).unwrap();
        drop(journal);
        let t2 = dump(&storage, 0, SIZE).unwrap().transactions[1].clone();
        assert_eq!((t2.descriptor_blocks, t2.data_blocks), (1, 1));
        poke_sealed(&storage, t2.device_offset, 3, block, at, 1);
        let before = storage.to_bytes();
        let Err(err) = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup) else {
            panic!("block {block} byte {at}: opened");
        };
        match &err {
            JournalError::InvalidTransaction { seq, source, .. } => {
                assert_eq!(*seq, 2, "block {block} byte {at}: {err}");
                assert!(
                    matches!(
                        source,
                        JournalFormatError::Field {
                            field: "reserved",
                            ..
                        }
                    ),
                    "block {block} byte {at}: {err}"
                );
            }
            other => panic!("block {block} byte {at}: {other}"),
        }
        assert_eq!(storage.to_bytes(), before, "a refused open writes nothing");
        assert_eq!(
            dump(&storage, 0, SIZE).unwrap().log_end.kind,
            LogEndKind::Invalid
        );
    }
}

#[test]
fn corrupt_middle_is_reported_and_nothing_written() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, &pattern(1, 600))).unwrap();
    journal
        .commit(tx_write(AREA + 0x1000, &pattern(2, 600)))
        .unwrap();
    journal
        .commit(tx_write(AREA + 0x2000, &pattern(3, 600)))
        .unwrap();
    drop(journal);
    // Damage a data block of T2: T3's durable_seq (2) proves T2 was committed.
    let t2 = dump(&storage, 0, SIZE).unwrap().transactions[1].clone();
    let data_block = t2.device_offset + u64::from(t2.descriptor_blocks) * 512;
    storage.write_at(&[0x5a], data_block + 10).unwrap();
    let before = storage.to_bytes();
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    match &err {
        JournalError::CorruptLog {
            seq,
            evidence_seq,
            device_offset,
            ..
        } => {
            assert_eq!((*seq, *evidence_seq), (2, 3));
            assert_eq!(*device_offset, t2.device_offset);
        }
        other => panic!("{other}"),
    }
    assert_eq!(storage.to_bytes(), before, "a refused open writes nothing");
    let dumped = dump(&storage, 0, SIZE).unwrap();
    assert_eq!(dumped.log_end.kind, LogEndKind::Corrupt);
    assert_eq!(dumped.log_end.evidence_seq, Some(3));

    let mut salvage = options();
    salvage.salvage = true;
    let (_, report) = Journal::open(&storage, 0, SIZE, salvage, &mut NoDedup).unwrap();
    assert!(report.salvaged);
    assert_eq!(report.transactions_replayed, 1, "the valid prefix");
    assert_eq!(read(&storage, AREA, 600), pattern(1, 600));
    assert_eq!(
        read(&storage, AREA + 0x2000, 8),
        vec![0; 8],
        "nothing after the damage"
    );
}

#[test]
fn stale_blocks_from_earlier_laps_and_journals_are_not_replayed() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    // Several laps; every transaction writes a canary area too.
    for round in 0..40u64 {
        let mut tx = Transaction::new();
        tx.write(AREA + 0x8000, &pattern(round as u8, 900)).unwrap();
        tx.write(AREA + (round % 8) * 0x100, &[round as u8; 64])
            .unwrap();
        journal.commit(tx).unwrap();
        if round % 5 == 4 {
            journal.checkpoint().unwrap();
        }
    }
    journal.checkpoint().unwrap();
    drop(journal);
    // The ring is full of valid blocks of this journal id from earlier laps.
    let dumped = dump(&storage, 0, SIZE).unwrap();
    assert!(!dumped.dirty);
    storage.write_at(&[0xee; 900], AREA + 0x8000).unwrap();
    let (journal, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 0);
    assert_eq!(
        read(&storage, AREA + 0x8000, 900),
        vec![0xee; 900],
        "no stale transaction applied"
    );
    drop(journal);

    // A new journal formatted over the old one ignores all of its blocks.
    let old_ring = storage.to_bytes();
    let journal = create(&storage);
    drop(journal);
    storage
        .write_at(&old_ring[1024..SIZE as usize], 1024)
        .unwrap();
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 0);
    assert_eq!(read(&storage, AREA + 0x8000, 900), vec![0xee; 900]);
}

#[test]
fn data_blocks_starting_with_the_magic_are_escaped() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut bytes = pattern(9, 1536);
    bytes[..4].copy_from_slice(b"qjbk");
    bytes[1024..1028].copy_from_slice(b"qjbk");
    journal.commit(tx_write(AREA, &bytes)).unwrap();
    journal.commit(tx_write(AREA + 0x1000, b"after")).unwrap();
    let dumped = dump(&storage, 0, SIZE).unwrap();
    assert!(dumped.transactions[0]
        .descriptors
        .contains(&DescriptorDump::Escape {
            data_blocks: vec![0, 2]
        }));
    // On disk, no block but journal blocks starts with the magic.
    let ring = read(&storage, 1024, (SIZE - 1024) as usize);
    let magic_blocks = ring.chunks(512).filter(|b| b.starts_with(b"qjbk")).count();
    assert_eq!(magic_blocks, 4, "two descriptor and two commit blocks");
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 2);
    assert_eq!(read(&storage, AREA, 1536), bytes);
    assert_eq!(read(&storage, AREA + 0x1000, 5), b"after");
}

#[test]
fn data_checksum_mismatch_drops_the_unanchored_tail() {
    const GUEST: u64 = AREA + 0x4000;
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, b"one")).unwrap();
    // The engine wrote guest data, then committed the mapping with a
    // checksum of it; the data did not reach the disk.
    let mut t2 = Transaction::new();
    t2.write(AREA + 0x100, b"mapping")
        .unwrap()
        .data_checksum(GUEST, &pattern(7, 4096))
        .unwrap();
    journal.commit(t2).unwrap();
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 1);
    let (seq, mismatch) = report.data_checksum_mismatch.unwrap();
    assert_eq!((seq, mismatch.target, mismatch.length), (2, GUEST, 4096));
    assert_eq!(
        mismatch.expected_crc32c,
        checksum::crc32c(&pattern(7, 4096))
    );
    assert_eq!(report.end.kind, LogEndKind::TornTail);
    assert_eq!(
        report.torn_tail_warning(),
        None,
        "a mismatch proves the commit never returned"
    );
    assert_eq!(
        read(&storage, AREA + 0x100, 7),
        vec![0; 7],
        "the mapping is not applied"
    );

    // With the data in place the transaction applies.
    let storage = MemStorage::new();
    let journal = create(&storage);
    storage.write_at(&pattern(7, 4096), GUEST).unwrap();
    let mut t1 = Transaction::new();
    t1.write(AREA + 0x100, b"mapping")
        .unwrap()
        .data_checksum(GUEST, &pattern(7, 4096))
        .unwrap();
    journal.commit(t1).unwrap();
    assert_eq!(journal.anchored_seq(), 0);
    // A later commit anchors T1; from then on the guest may rewrite its
    // data in place, and replay no longer checks it.
    journal.commit(tx_write(AREA + 0x200, b"later")).unwrap();
    assert_eq!(journal.anchored_seq(), 1);
    storage.write_at(&pattern(8, 4096), GUEST).unwrap();
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.data_checksum_mismatch, None);
    assert_eq!(report.transactions_replayed, 2);
    assert_eq!(read(&storage, AREA + 0x100, 7), b"mapping");
}

/// Found by the crash harness (journal backend, grow workload): a grow
/// committed a new L1 table and revoked the old one, but its guest data
/// never reached the disk, so the grow was dropped at replay, yet its
/// revoke still suppressed the earlier transaction's write of the old L1
/// table, and the image lost a mapping. A dropped transaction's revokes
/// never happened.
#[test]
fn a_dropped_transaction_revokes_nothing() {
    const GUEST: u64 = AREA + 0x4000;
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, b"old table")).unwrap();
    let mut t2 = Transaction::new();
    t2.revoke(AREA, 0x1000)
        .unwrap()
        .write(AREA + 0x1000, b"new table")
        .unwrap()
        .data_checksum(GUEST, &pattern(9, 4096))
        .unwrap();
    journal.commit(t2).unwrap();
    drop(journal);
    let (_, report) = reopen(&storage);
    assert_eq!(report.data_checksum_mismatch.map(|(seq, _)| seq), Some(2));
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(report.bytes_revoked, 0, "transaction 2's revoke is void");
    assert_eq!(read(&storage, AREA, 9), b"old table");
    assert_eq!(read(&storage, AREA + 0x1000, 9), vec![0; 9]);
}

#[test]
fn copy_sources_and_checksummed_ranges_are_protected_until_synced() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut t1 = Transaction::new();
    t1.copy(AREA + 0x1000, AREA, 512).unwrap();
    journal.commit(t1).unwrap();
    let err = journal.commit(tx_write(AREA + 10, b"x")).unwrap_err();
    assert!(
        matches!(err, JournalError::Refused { offset, .. } if offset == AREA + 10),
        "{err}"
    );
    let mut revoke = Transaction::new();
    revoke.revoke(AREA, 4096).unwrap();
    assert!(
        journal.commit(revoke).is_err(),
        "the source must not be freed either"
    );
    let mut same = Transaction::new();
    same.copy(AREA + 0x3000, AREA + 0x2000, 16)
        .unwrap()
        .write(AREA + 0x2008, b"y")
        .unwrap();
    assert!(
        journal.commit(same).is_err(),
        "a later write into the source in the same transaction"
    );
    journal.checkpoint().unwrap();
    assert_eq!(
        journal.commit(tx_write(AREA + 10, b"x")).unwrap(),
        2,
        "allowed once synced"
    );
}

#[test]
fn a_flush_queued_after_a_refused_transaction_is_not_acknowledged() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let mut copy = Transaction::new();
    copy.copy(AREA + 0x1000, AREA, 512).unwrap();
    journal.commit(copy).unwrap();
    assert_eq!(journal.failed_commits(), 0);
    // Queued together, they land in one batch: the write into the copy's
    // source is refused at plan time, and the flush-only item queued after
    // it (its owner may be flushing for that write) must not hear Ok.
    let refused = journal.commit_enqueue(tx_write(AREA + 10, b"x")).unwrap();
    let flush = journal.flush_enqueue().unwrap();
    let err = journal.commit_wait(flush).unwrap_err();
    assert!(
        matches!(&err, JournalError::EarlierCommitFailed { failed: 1, first } if first.contains("refused")),
        "{err}"
    );
    assert!(matches!(
        journal.commit_wait(refused),
        Err(JournalError::Refused { .. })
    ));
    assert_eq!(journal.failed_commits(), 1);
    // A later batch too: the refused transaction will never be durable.
    let later = journal.flush_enqueue().unwrap();
    assert!(matches!(
        journal.commit_wait(later),
        Err(JournalError::EarlierCommitFailed { .. })
    ));
    // The refusal had no effect: a transaction's own commit still works.
    assert_eq!(journal.commit(tx_write(AREA + 0x8000, b"y")).unwrap(), 2);
    assert_eq!(journal.failed_commits(), 1);
}

#[test]
fn bad_input_is_a_typed_error_naming_the_field() {
    // Nothing there: bad magic in both slots.
    let storage = MemStorage::from_bytes(vec![0; SIZE as usize]);
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    match &err {
        JournalError::NoValidHeader { slot0, .. } => {
            assert!(
                matches!(**slot0, JournalFormatError::BadMagic { offset: 0, .. }),
                "{err}"
            )
        }
        other => panic!("{other}"),
    }
    assert!(matches!(
        dump(&storage, 0, SIZE),
        Err(JournalError::NoValidHeader { .. })
    ));

    // Geometry at create.
    let err = Journal::create(MemStorage::new(), 0, SIZE, 256, options()).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::Format {
                source: JournalFormatError::Field {
                    field: "block_size_order",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let err = Journal::create(MemStorage::new(), 0, 10_000, 512, options()).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::Format {
                source: JournalFormatError::Field {
                    field: "journal_size",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let err = Journal::create(MemStorage::new(), 100, SIZE, 512, options()).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::Parameter {
                field: "base_offset",
                ..
            }
        ),
        "{err}"
    );

    // A header whose block size order is out of range (CRC recomputed).
    let storage = MemStorage::new();
    drop(create(&storage));
    let mut slots = read(&storage, 0, 1024);
    for slot in slots.chunks_mut(512) {
        slot[15] = 20;
        let crc = checksum::crc32c(&slot[..508]);
        slot[508..].copy_from_slice(&crc.to_be_bytes());
    }
    storage.write_at(&slots, 0).unwrap();
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    match &err {
        JournalError::RefusedHeader {
            slot: 1, source, ..
        } => assert!(
            matches!(
                source,
                JournalFormatError::Field {
                    field: "block_size_order",
                    offset: 12,
                    ..
                }
            ),
            "{err}"
        ),
        other => panic!("{other}"),
    }
    // The caller's size disagrees with the header's.
    let storage = MemStorage::new();
    drop(create(&storage));
    let err = Journal::open(&storage, 0, SIZE + 512, options(), &mut NoDedup).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::Format {
                source: JournalFormatError::Field {
                    field: "journal_size",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );

    // Targets outside the device or in the journal are refused at commit.
    let journal = create(MemStorage::new());
    let err = journal.commit(tx_write(LIMIT - 2, b"abc")).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::RefusedDescriptor {
                source: JournalFormatError::Field {
                    field: "target",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let err = journal.commit(tx_write(1024, b"abc")).unwrap_err();
    assert!(
        matches!(&err, JournalError::RefusedDescriptor { .. }),
        "{err}"
    );
    let mut copy = Transaction::new();
    copy.copy(AREA, 600, 8).unwrap();
    assert!(matches!(
        journal.commit(copy),
        Err(JournalError::RefusedDescriptor { .. })
    ));

    // A log written for a larger device: replay refuses to write past the
    // limit it is given, and writes nothing.
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, b"inside")).unwrap();
    journal
        .commit(tx_write(LIMIT - 16, b"near the end"))
        .unwrap();
    drop(journal);
    let before = storage.to_bytes();
    let err = Journal::open(
        &storage,
        0,
        SIZE,
        JournalOptions::new(LIMIT / 2),
        &mut NoDedup,
    )
    .unwrap_err();
    match &err {
        JournalError::InvalidTransaction {
            seq: 2,
            source: JournalFormatError::Field {
                field: "target", ..
            },
            ..
        } => {}
        other => panic!("{other}"),
    }
    assert_eq!(storage.to_bytes(), before);
}

/// Writes a hand-made transaction as the first log entry of a fresh
/// journal, resealing every checksum after `damage` ran.
fn forge_first_transaction(damage: &dyn Fn(&mut [u8])) -> MemStorage {
    let storage = MemStorage::new();
    let journal = create(&storage);
    let id = journal.journal_id();
    drop(journal);
    let descriptors = vec![Descriptor::WriteData(vec![WriteChunk {
        target: AREA,
        length: 4,
        data_offset: 0,
    }])];
    let params = TransactionParams {
        journal_id: id,
        seq: 1,
        durable_seq: 0,
        block_size: 512,
    };
    let mut bytes = encode_transaction(&params, &descriptors, b"abcd")
        .unwrap()
        .bytes;
    damage(&mut bytes);
    let n = bytes.len();
    for block in [0usize, n - 512] {
        let seal = |b: &mut [u8]| {
            b[28..32].fill(0);
            let crc = checksum::block_checksum(id, 1, b, 28);
            b[28..32].copy_from_slice(&crc.to_be_bytes());
        };
        if block == n - 512 {
            let crc = checksum::salted_append(checksum::salt(id, 1), &bytes[..n - 512]);
            bytes[n - 512 + 40..n - 512 + 44].copy_from_slice(&crc.to_be_bytes());
        }
        seal(&mut bytes[block..block + 512]);
        assert!(BlockHeader::decode(&bytes[block..block + 512], id).is_ok());
    }
    storage.write_at(&bytes, 1024).unwrap();
    storage
}

#[test]
fn a_descriptor_overrunning_its_block_is_named() {
    let storage = forge_first_transaction(&|_| {});
    let (_, report) = reopen(&storage);
    assert_eq!(report.transactions_replayed, 1, "the forge itself is sound");
    assert_eq!(read(&storage, AREA, 4), b"abcd");

    // Descriptor size 0x1000 in a 512-byte block (used_bytes kept).
    let storage =
        forge_first_transaction(&|b| b[48 + 2..48 + 4].copy_from_slice(&0x1000u16.to_be_bytes()));
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    match &err {
        JournalError::InvalidTransaction {
            seq: 1,
            device_offset: 1024,
            source,
        } => {
            assert!(
                matches!(
                    source,
                    JournalFormatError::Field {
                        field: "size",
                        offset: 50,
                        value: 0x1000,
                        ..
                    }
                ),
                "{source}"
            );
        }
        other => panic!("{other}"),
    }
    // used_bytes larger than the block.
    let storage = forge_first_transaction(&|b| b[20..24].copy_from_slice(&600u32.to_be_bytes()));
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::InvalidTransaction {
                source: JournalFormatError::Field {
                    field: "used_bytes",
                    offset: 20,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    // A write chunk past the data area.
    let storage = forge_first_transaction(&|b| {
        b[48 + 8 + 12..48 + 8 + 16].copy_from_slice(&510u32.to_be_bytes())
    });
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::InvalidTransaction {
                source: JournalFormatError::Field {
                    field: "data_offset",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn in_memory_replay_writes_nothing() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(everything(&storage)).unwrap();
    drop(journal);
    let before = storage.to_bytes();
    let mut opts = options();
    opts.replay_mode = ReplayMode::InMemory;
    let mut events = Vec::new();
    let (journal, report) = Journal::open(&storage, 0, SIZE, opts, &mut events).unwrap();
    assert_eq!(
        storage.to_bytes(),
        before,
        "nothing written, not even the header"
    );
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(events.len(), 2);
    assert!(journal.is_read_only());
    let mut buf = vec![0u8; 700];
    journal
        .overlay()
        .read_through(&storage, &mut buf, AREA)
        .unwrap();
    assert_eq!(buf, pattern(1, 700));
    let mut copied = vec![0u8; 100];
    journal
        .overlay()
        .read_through(&storage, &mut copied, AREA + 0x2000)
        .unwrap();
    assert_eq!(copied, pattern(0xc0, 0x300)[..100]);
    assert!(matches!(
        journal.commit(Transaction::new()),
        Err(JournalError::ReadOnly)
    ));
    assert!(matches!(
        journal.flush_enqueue(),
        Err(JournalError::ReadOnly)
    ));
    assert!(matches!(journal.checkpoint(), Err(JournalError::ReadOnly)));
}

#[test]
fn full_ring_fails_or_checkpoints_and_oversize_is_refused() {
    let storage = MemStorage::new();
    let mut opts = options();
    opts.when_full = WhenFull::Fail;
    let journal = Journal::create(&storage, 0, SIZE, BLOCK, opts).unwrap();
    let big = pattern(1, 512 * 6);
    let mut committed = 0;
    let err = loop {
        match journal.commit(tx_write(AREA, &big)) {
            Ok(_) => committed += 1,
            Err(e) => break e,
        }
        assert!(
            committed < 10,
            "a 32-block ring holds four 8-block transactions"
        );
    };
    assert_eq!(committed, 4);
    assert!(
        matches!(
            err,
            JournalError::Full {
                needed_blocks: 8,
                free_blocks: 0,
                ring_blocks: 32
            }
        ),
        "{err}"
    );
    assert!(journal.needs_checkpoint());
    assert_eq!(journal.fill().used_percent(), 100);
    journal.checkpoint().unwrap();
    assert_eq!(
        journal.commit(tx_write(AREA, &big)).unwrap(),
        5,
        "no sequence number lost to the refusal"
    );
    let huge = pattern(2, 512 * 40);
    let err = journal.commit(tx_write(AREA, &huge)).unwrap_err();
    assert!(
        matches!(
            err,
            JournalError::TooLarge {
                ring_blocks: 32,
                ..
            }
        ),
        "{err}"
    );
    // A transaction as large as the whole ring fits once the log is
    // rewound to block 0.
    let whole = Journal::create(MemStorage::new(), 0, SIZE, BLOCK, options()).unwrap();
    whole.commit(tx_write(AREA, &pattern(3, 512 * 5))).unwrap();
    let ring_sized = pattern(4, 512 * 30 - 100);
    assert_eq!(whole.blocks_needed(&tx_write(AREA, &ring_sized)), 32);
    whole.commit(tx_write(AREA, &ring_sized)).unwrap();
    let storage = whole.storage();
    let copy = MemStorage::from_bytes(storage.to_bytes());
    drop(whole);
    let (_, report) = reopen(&copy);
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(read(&copy, AREA, ring_sized.len()), ring_sized);
}

#[test]
fn flushes_per_commit_by_protocol() {
    for (protocol, per_commit) in [
        (CommitProtocol::SingleFlush, 1),
        (CommitProtocol::TwoFlush, 2),
    ] {
        let device = CountingDevice::default();
        let mut opts = options();
        opts.commit_protocol = protocol;
        let journal = Journal::create(&device, 0, SIZE, BLOCK, opts).unwrap();
        let after_create = device.flushes.load(Ordering::Relaxed);
        for i in 0..20u8 {
            journal
                .commit(tx_write(AREA + u64::from(i) * 8, &[i; 8]))
                .unwrap();
            if i % 5 == 4 {
                journal.checkpoint().unwrap();
            }
        }
        let stats = journal.stats();
        assert_eq!(stats.commits, 20);
        assert_eq!(stats.commit_flushes, 20 * per_commit);
        assert_eq!(stats.checkpoints, 4);
        assert_eq!(
            device.flushes.load(Ordering::Relaxed) - after_create,
            20 * per_commit + stats.checkpoint_flushes
        );
        drop(journal);
        let (_, report) = reopen(&device.bytes);
        assert_eq!(report.end.kind, LogEndKind::Clean);
        assert_eq!(
            read(&device.bytes, AREA, 160),
            (0..20u8).flat_map(|i| [i; 8]).collect::<Vec<_>>()
        );
    }
}

#[test]
fn group_commit_shares_flushes_between_threads() {
    /// Memory with a slow flush, as a disk has.
    #[derive(Debug, Default)]
    struct SlowFlush(CountingDevice);
    impl Storage for SlowFlush {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.0.read_at(buf, offset)
        }
        fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.0.write_at(buf, offset)
        }
        fn flush(&self) -> std::io::Result<()> {
            std::thread::sleep(std::time::Duration::from_micros(300));
            self.0.flush()
        }
        fn len(&self) -> std::io::Result<u64> {
            self.0.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.0.set_len(len)
        }
    }
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 40;
    let device = SlowFlush::default();
    let size = 1024 + 1024 * 512;
    let mut opts = options();
    opts.device_limit_bytes = 1 << 24;
    let journal = Journal::create(&device, 0, size, BLOCK, opts.clone()).unwrap();
    let mut seqs: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let journal = &journal;
                s.spawn(move || {
                    (0..PER_THREAD)
                        .map(|i| {
                            let slot = t * PER_THREAD + i;
                            journal
                                .commit(tx_write(0x200000 + slot * 8, &slot.to_be_bytes()))
                                .unwrap()
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    seqs.sort_unstable();
    assert_eq!(
        seqs,
        (1..=THREADS * PER_THREAD).collect::<Vec<_>>(),
        "every commit got its own number"
    );
    let stats = journal.stats();
    assert_eq!(stats.commits, THREADS * PER_THREAD);
    assert_eq!(stats.commit_flushes, stats.batches, "one flush per batch");
    assert!(
        stats.batches < THREADS * PER_THREAD / 2,
        "{} batches for {} commits",
        stats.batches,
        stats.commits
    );
    drop(journal);
    let (_, report) = Journal::open(&device.0.bytes, 0, size, opts, &mut NoDedup).unwrap();
    assert_eq!(report.transactions_replayed, THREADS * PER_THREAD);
    for slot in 0..THREADS * PER_THREAD {
        assert_eq!(
            read(&device.0.bytes, 0x200000 + slot * 8, 8),
            slot.to_be_bytes()
        );
    }
}

#[test]
fn a_torn_header_slot_leaves_its_mirror_in_charge() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, b"first")).unwrap();
    journal.checkpoint().unwrap();
    journal.commit(tx_write(AREA + 8, b"second")).unwrap();
    let header = dump(&storage, 0, SIZE).unwrap().header;
    drop(journal);
    // Tear the newest slot: its mirror, one generation older, describes
    // the same journal (same id, same synced state), so nothing synced is
    // re-applied and nothing committed is lost.
    storage
        .write_at(
            &[0xff; 16],
            JournalGeometry::header_slot_offset(header.slot) + 100,
        )
        .unwrap();
    let dumped = dump(&storage, 0, SIZE).unwrap();
    assert!(dumped.slots[header.slot].error.is_some());
    assert_eq!(dumped.header.generation, header.generation - 1);
    assert_eq!(
        (
            &dumped.header.journal_id,
            dumped.header.synced_seq,
            dumped.header.tail_block
        ),
        (&header.journal_id, header.synced_seq, header.tail_block)
    );
    storage.write_at(b"XXXXX", AREA).unwrap();
    let (_, report) = reopen(&storage);
    assert_eq!(report.synced_seq_before, 1);
    assert_eq!(report.transactions_replayed, 1);
    assert_eq!(read(&storage, AREA, 5), b"XXXXX", "synced, not re-applied");
    assert_eq!(read(&storage, AREA + 8, 6), b"second");
    let slots = read(&storage, 0, 1024);
    let headers: Vec<_> = slots
        .chunks(512)
        .filter_map(|s| JournalHeader::decode(s).ok())
        .collect();
    assert_eq!(headers.len(), 2, "the open rewrote the torn slot");
    assert_eq!(headers[0].journal_id, headers[1].journal_id);
}

#[test]
fn a_newer_slot_with_unknown_fields_refuses_instead_of_falling_back() {
    let storage = MemStorage::new();
    let journal = create(&storage);
    journal.commit(tx_write(AREA, b"first")).unwrap();
    let header = dump(&storage, 0, SIZE).unwrap().header;
    drop(journal);
    // The newest slot gains an unknown incompatible feature bit (sealed
    // again, as a future writer would): the journal is refused, the older
    // slot does not take over, and nothing is written.
    let at = JournalGeometry::header_slot_offset(header.slot);
    let mut slot = read(&storage, at, 512);
    slot[55] |= 1;
    let crc = checksum::crc32c(&slot[..508]);
    slot[508..].copy_from_slice(&crc.to_be_bytes());
    storage.write_at(&slot, at).unwrap();
    let before = read(&storage, 0, SIZE as usize + 4096);
    let err = Journal::open(&storage, 0, SIZE, options(), &mut NoDedup).unwrap_err();
    assert!(
        matches!(
            &err,
            JournalError::RefusedHeader {
                source: JournalFormatError::Field {
                    field: "incompatible_features",
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("slot {}", header.slot)),
        "{err}"
    );
    assert!(matches!(
        dump(&storage, 0, SIZE),
        Err(JournalError::RefusedHeader { .. })
    ));
    assert_eq!(read(&storage, 0, SIZE as usize + 4096), before);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    /// Random damage anywhere in a dirty journal region: open either
    /// succeeds or returns a typed error; it never panics and never writes
    /// at or past the device limit.
    #[test]
    fn damaged_journals_never_panic_or_write_out_of_bounds(
        damage in proptest::collection::vec((0u64..SIZE, 0u8..=255), 1..12),
    ) {
        let storage = MemStorage::new();
        let journal = create(&storage);
        journal.commit(everything(&storage)).unwrap();
        journal.commit(tx_write(AREA + 0x100, &pattern(5, 1500))).unwrap();
        let mut wrap = Transaction::new();
        wrap.write(AREA + 0x200, b"tail").unwrap().revoke(AREA, 16).unwrap();
        journal.commit(wrap).unwrap();
        drop(journal);
        for (at, value) in damage {
            storage.write_at(&[value], at).unwrap();
        }
        let mut events = Vec::new();
        let limit = AREA + 0x8000;
        match Journal::open(&storage, 0, SIZE, JournalOptions::new(limit), &mut events) {
            Ok((_, report)) => proptest::prop_assert!(report.transactions_replayed <= 3),
            Err(e) => {
                let _ = e.to_string();
            }
        }
        proptest::prop_assert!(storage.len().unwrap() <= limit);
        let _ = dump(&storage, 0, SIZE).map(|d| d.to_string());
    }
}

#[test]
fn a_flush_only_item_returns_after_the_transactions_queued_before_it() {
    // A flush queued behind a transaction is answered in the same batch,
    // with one device flush, and only once that transaction is committed:
    // a caller whose data depends on it cannot return before it.
    let device = CountingDevice::default();
    let journal = create(&device);
    let flushes_before = device.flushes.load(Ordering::Relaxed);
    let tx = journal
        .commit_enqueue(tx_write(AREA, &pattern(1, 512)))
        .unwrap();
    let flush = journal.flush_enqueue().unwrap();
    let flushed_through = journal.commit_wait(flush).unwrap();
    assert_eq!(journal.committed_seq(), flushed_through);
    assert_eq!(journal.commit_wait(tx).unwrap(), flushed_through);
    assert_eq!(device.flushes.load(Ordering::Relaxed) - flushes_before, 1);
    // Alone, a flush still reaches the device and commits nothing.
    let alone = journal.flush_enqueue().unwrap();
    assert_eq!(journal.commit_wait(alone).unwrap(), flushed_through);
    assert_eq!(device.flushes.load(Ordering::Relaxed) - flushes_before, 2);
    assert_eq!(journal.committed_seq(), flushed_through);
}
