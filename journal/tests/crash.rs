//! Power cuts at every device operation of a run of commits and
//! checkpoints, keeping any subset of the unflushed sectors: after replay
//! the device holds exactly a prefix of the commits, and that prefix holds
//! every commit that returned. Then power cuts during replay itself:
//! replaying again gives the same device.

mod common;

use common::{pattern, CrashDevice, Rng};
use qj_journal::{
    CommitProtocol, Journal, JournalOptions, MemStorage, NoDedup, Storage, Transaction,
};

const BLOCK: u32 = 512;
const SIZE: u64 = 1024 + 24 * BLOCK as u64;
const LIMIT: u64 = 1 << 20;
const AREA: u64 = 0x10000;
const AREA_BYTES: usize = 0x8000;
/// Never written after setup: the copy source.
const SRC: u64 = AREA + 0x6000;
/// Guest data a transaction checksums.
const GUEST: u64 = AREA + 0x5000;

/// What a commit does to the model: bytes written, or ranges whose content
/// no longer matters (revoked, or guest data not yet mapped).
enum Effect {
    Write(u64, Vec<u8>),
    DontCare(u64, u64),
}

enum Step {
    /// Guest data written in place (not journalled, not flushed).
    GuestWrite(u64, Vec<u8>),
    Commit(Transaction, Vec<Effect>),
    Checkpoint,
}

fn src_bytes() -> Vec<u8> {
    pattern(0x5c, 0x400)
}

fn scenario() -> Vec<Step> {
    let w = |target: u64, tag: u8, len: usize| (target, pattern(tag, len));
    let mut steps = Vec::new();
    let commit = |writes: Vec<(u64, Vec<u8>)>,
                  extra: &dyn Fn(&mut Transaction, &mut Vec<Effect>)| {
        let mut tx = Transaction::new();
        let mut effects = Vec::new();
        extra(&mut tx, &mut effects);
        for (target, bytes) in writes {
            tx.write(target, &bytes).unwrap();
            effects.push(Effect::Write(target, bytes));
        }
        Step::Commit(tx, effects)
    };
    steps.push(commit(
        vec![w(AREA, 1, 600), w(AREA + 0x1000, 2, 20)],
        &|_, _| {},
    ));
    steps.push(commit(vec![w(AREA + 0x100, 3, 40)], &|tx, effects| {
        tx.copy(AREA + 0x2000, SRC, 300).unwrap();
        effects.push(Effect::Write(AREA + 0x2000, src_bytes()[..300].to_vec()));
    }));
    steps.push(Step::Checkpoint);
    steps.push(commit(vec![w(AREA + 0x3000, 4, 512)], &|_, _| {}));
    steps.push(commit(vec![w(AREA + 0x3400, 5, 100)], &|tx, effects| {
        tx.revoke(AREA + 0x3000, 512).unwrap();
        effects.push(Effect::DontCare(AREA + 0x3000, 512));
    }));
    steps.push(commit(vec![w(AREA + 0x4000, 6, 2500)], &|_, _| {}));
    steps.push(Step::GuestWrite(GUEST, pattern(7, 1024)));
    steps.push(commit(vec![w(AREA + 0x3800, 8, 16)], &|tx, effects| {
        tx.data_checksum(GUEST, &pattern(7, 1024)).unwrap();
        effects.push(Effect::Write(GUEST, pattern(7, 1024)));
    }));
    steps.push(commit(vec![w(AREA + 0x4800, 9, 1800)], &|_, _| {}));
    steps.push(commit(vec![w(AREA, 10, 64)], &|_, _| {}));
    steps.push(Step::Checkpoint);
    steps.push(commit(vec![w(AREA + 0x3000, 11, 512)], &|_, _| {}));
    steps.push(commit(vec![w(AREA + 0x4000, 12, 3000)], &|_, _| {}));
    steps.push(commit(
        vec![w(AREA + 0x10, 13, 8), w(AREA + 0x1010, 14, 8)],
        &|_, _| {},
    ));
    steps
}

/// The area after the first `prefix` commits; `None` is "any content".
fn model(steps: &[Step], prefix: usize) -> Vec<Option<u8>> {
    let mut area: Vec<Option<u8>> = vec![Some(0); AREA_BYTES];
    let src_at = (SRC - AREA) as usize;
    for (i, b) in src_bytes().iter().enumerate() {
        area[src_at + i] = Some(*b);
    }
    let guest_at = (GUEST - AREA) as usize;
    area[guest_at..guest_at + 1024].fill(None);
    let commits = steps.iter().filter_map(|s| match s {
        Step::Commit(_, effects) => Some(effects),
        _ => None,
    });
    for effects in commits.take(prefix) {
        for effect in effects {
            match effect {
                Effect::DontCare(offset, len) => {
                    let at = (offset - AREA) as usize;
                    area[at..at + *len as usize].fill(None);
                }
                Effect::Write(offset, bytes) => {
                    let at = (offset - AREA) as usize;
                    for (i, b) in bytes.iter().enumerate() {
                        area[at + i] = Some(*b);
                    }
                }
            }
        }
    }
    area
}

fn matches(model: &[Option<u8>], actual: &[u8]) -> bool {
    model
        .iter()
        .zip(actual)
        .all(|(m, a)| m.is_none_or(|m| m == *a))
}

fn options(protocol: CommitProtocol) -> JournalOptions {
    let mut options = JournalOptions::new(LIMIT);
    options.commit_protocol = protocol;
    options
}

/// A fresh device with the journal created and the copy source durable.
fn setup(
    protocol: CommitProtocol,
) -> (
    CrashDevice,
    Journal<std::sync::Arc<CrashDevice>>,
    std::sync::Arc<CrashDevice>,
) {
    let device = std::sync::Arc::new(CrashDevice::default());
    let journal = Journal::create(
        std::sync::Arc::clone(&device),
        0,
        SIZE,
        BLOCK,
        options(protocol),
    )
    .unwrap();
    device.write_at(&src_bytes(), SRC).unwrap();
    device.flush().unwrap();
    (CrashDevice::default(), journal, device)
}

/// Runs the scenario until the device fails. Returns (commits acknowledged,
/// commits attempted).
fn run(journal: &Journal<std::sync::Arc<CrashDevice>>, steps: Vec<Step>) -> (usize, usize) {
    let mut acked = 0;
    for step in steps {
        match step {
            Step::GuestWrite(offset, bytes) => {
                if journal.storage().write_at(&bytes, offset).is_err() {
                    return (acked, acked);
                }
            }
            Step::Commit(tx, _) => match journal.commit(tx) {
                Ok(seq) => {
                    acked += 1;
                    assert_eq!(seq, acked as u64);
                }
                Err(e) => {
                    if std::env::var("QJ_DEBUG").is_ok() {
                        eprintln!("commit {} failed: {e}", acked + 1);
                    }
                    return (acked, acked + 1);
                }
            },
            Step::Checkpoint => {
                if journal.checkpoint().is_err() {
                    return (acked, acked);
                }
            }
        }
    }
    (acked, acked)
}

/// Which subsets of `n` unflushed sectors to try.
fn keep_masks(n: usize, rng: &mut Rng) -> Vec<Vec<bool>> {
    if n <= 8 {
        return (0..1u32 << n)
            .map(|m| (0..n).map(|i| m & (1 << i) != 0).collect())
            .collect();
    }
    let mut masks = vec![vec![true; n], vec![false; n]];
    for k in 1..n {
        masks.push((0..n).map(|i| i < k).collect());
        masks.push((0..n).map(|i| i != k).collect());
        masks.push((0..n).map(|i| i == k).collect());
    }
    for _ in 0..24 {
        masks.push((0..n).map(|_| rng.below(2) == 1).collect());
    }
    masks
}

fn area_of(storage: &dyn Storage) -> Vec<u8> {
    let mut buf = vec![0u8; AREA_BYTES];
    storage.read_at(&mut buf, AREA).unwrap();
    buf
}

/// Replays `image` cleanly, then again with a power cut at every
/// operation of the replay (keeping a few sector subsets), followed by a
/// second replay: every path ends in the same device content.
fn check_replay_idempotent(image: &[u8], protocol: CommitProtocol, rng: &mut Rng) {
    let clean = MemStorage::from_bytes(image.to_vec());
    Journal::open(&clean, 0, SIZE, options(protocol), &mut NoDedup).unwrap();
    let want = area_of(&clean);
    let counting = CrashDevice::from_bytes(image.to_vec());
    Journal::open(&counting, 0, SIZE, options(protocol), &mut NoDedup).unwrap();
    let replay_ops = counting.ops();
    for cut in 1..=replay_ops {
        let device = CrashDevice::from_bytes(image.to_vec());
        device.crash_at(cut);
        assert!(Journal::open(&device, 0, SIZE, options(protocol), &mut NoDedup).is_err());
        let n = device.pending_sectors().len();
        let random: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
        for keep in [vec![true; n], vec![false; n], random] {
            let after = MemStorage::from_bytes(device.image_after_crash(&|i| keep[i]));
            Journal::open(&after, 0, SIZE, options(protocol), &mut NoDedup)
                .unwrap_or_else(|e| panic!("replay after a cut at replay op {cut}: {e}"));
            assert_eq!(
                area_of(&after),
                want,
                "replay cut at op {cut} is not idempotent"
            );
        }
    }
}

fn crash_everywhere(protocol: CommitProtocol) {
    let commits = scenario()
        .iter()
        .filter(|s| matches!(s, Step::Commit(..)))
        .count();
    assert_eq!(commits, 11);
    let prefixes: Vec<Vec<Option<u8>>> = (0..=commits).map(|p| model(&scenario(), p)).collect();
    let (_, journal, device) = setup(protocol);
    let base_ops = device.ops();
    assert_eq!(
        run(&journal, scenario()),
        (commits, commits),
        "the scenario runs without a crash"
    );
    let total_ops = device.ops() - base_ops;
    assert!(
        journal.stats().checkpoints >= 3,
        "the ring filled and checkpointed by itself"
    );
    journal.checkpoint().unwrap();
    assert!(
        matches(&prefixes[commits], &area_of(&*device)),
        "the model describes a clean run"
    );
    drop(journal);

    let mut rng = Rng::new(0x9e37_79b9 + total_ops);
    let mut images_checked = 0u64;
    for cut in 1..=total_ops + 1 {
        let (_, journal, device) = setup(protocol);
        device.crash_at(cut);
        let (acked, attempted) = run(&journal, scenario());
        drop(journal);
        assert_eq!(device.crashed(), cut <= total_ops);
        let sectors = device.pending_sectors().len();
        for keep in keep_masks(sectors, &mut rng) {
            let image = device.image_after_crash(&|i| keep[i]);
            let storage = MemStorage::from_bytes(image.clone());
            let (_, report) = Journal::open(&storage, 0, SIZE, options(protocol), &mut NoDedup)
                .unwrap_or_else(|e| panic!("cut at op {cut}, keep {keep:?}: open failed: {e}"));
            let area = area_of(&storage);
            let prefix = (acked..=attempted).find(|p| matches(&prefixes[*p], &area));
            assert!(
                prefix.is_some(),
                "cut at op {cut} ({acked} acked, {attempted} attempted), keep {keep:?}: \
                 the device holds no prefix of the commits; replay: {report:?}"
            );
            images_checked += 1;
        }
        if cut % 3 == 0 || cut > total_ops - 4 {
            let image = device.image_after_crash(&|_| true);
            check_replay_idempotent(&image, protocol, &mut rng);
        }
    }
    eprintln!("{protocol:?}: {total_ops} cut points, {images_checked} crash images replayed");
    assert!(
        images_checked > total_ops * 4,
        "{images_checked} crash images for {total_ops} cuts"
    );
}

#[test]
fn single_flush_commits_survive_a_crash_at_every_operation() {
    crash_everywhere(CommitProtocol::SingleFlush);
}

#[test]
fn two_flush_commits_survive_a_crash_at_every_operation() {
    crash_everywhere(CommitProtocol::TwoFlush);
}

/// Four threads commit at once (pipelined group commit) until a power cut
/// at device operation `cut`; every acknowledged commit must survive, and
/// replay must apply exactly a run of consecutive sequence numbers.
fn concurrent_cut(cut: u64, protocol: CommitProtocol, rng: &mut Rng) {
    const THREADS: u64 = 4;
    const PER_THREAD: u64 = 8;
    let slot_offset = |slot: u64| AREA + slot * 64;
    let device = std::sync::Arc::new(CrashDevice::default());
    let journal = Journal::create(
        std::sync::Arc::clone(&device),
        0,
        SIZE,
        BLOCK,
        options(protocol),
    )
    .unwrap();
    device.crash_at(cut);
    let acked: Vec<(u64, u64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let journal = &journal;
                s.spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0..PER_THREAD {
                        let slot = t * PER_THREAD + i;
                        let mut tx = Transaction::new();
                        tx.write(slot_offset(slot), &pattern(slot as u8 + 1, 64))
                            .unwrap();
                        match journal.commit(tx) {
                            Ok(seq) => acked.push((slot, seq)),
                            Err(_) => break,
                        }
                    }
                    acked
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    drop(journal);
    let n = device.pending_sectors().len();
    let random: Vec<bool> = (0..n).map(|_| rng.below(2) == 1).collect();
    for keep in [vec![true; n], vec![false; n], random] {
        let storage = MemStorage::from_bytes(device.image_after_crash(&|i| keep[i]));
        let log = qj_journal::dump(&storage, 0, SIZE).unwrap();
        let synced = log.header.synced_seq;
        let logged: Vec<u64> = log.transactions.iter().map(|t| t.seq).collect();
        assert_eq!(
            logged,
            (synced + 1..=synced + logged.len() as u64).collect::<Vec<_>>(),
            "the valid log is consecutive after the synced ones"
        );
        Journal::open(&storage, 0, SIZE, options(protocol), &mut NoDedup)
            .unwrap_or_else(|e| panic!("cut {cut}: open failed: {e}"));
        let area = area_of(&storage);
        let applied: Vec<u64> = (0..THREADS * PER_THREAD)
            .filter(|slot| {
                let at = (slot_offset(*slot) - AREA) as usize;
                area[at..at + 64] == pattern(*slot as u8 + 1, 64)[..]
            })
            .collect();
        assert_eq!(
            applied.len() as u64,
            synced + logged.len() as u64,
            "cut {cut}: the device holds exactly the synced transactions and the valid log"
        );
        for (slot, seq) in &acked {
            assert!(
                applied.contains(slot),
                "cut {cut}: acknowledged commit {seq} (slot {slot}) lost"
            );
        }
    }
}

#[test]
fn concurrent_commits_survive_a_crash_at_every_operation() {
    let mut rng = Rng::new(0x5eed);
    for protocol in [CommitProtocol::SingleFlush, CommitProtocol::TwoFlush] {
        // 32 commits in a 24-block ring also exercise checkpoints.
        for cut in 1..=90 {
            concurrent_cut(cut, protocol, &mut rng);
        }
    }
}
