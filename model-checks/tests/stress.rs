//! Multi-threaded stress test on a real file, on every backend: flush
//! ordering, the journal with single-flush commits, the journal with the
//! draft's two-flush commits, the single-flush journal on a disk shared
//! with internal snapshots (delayed copy-on-write), and the single-flush
//! journal with logged data (small writes into fresh clusters in the
//! transaction, reads of them from memory until checkpoint). 8 threads issue
//! overlapping writes,
//! write-zeroes, discards, reads and flushes on one image, all over the same
//! small disk, with a metadata cache far smaller than the metadata so that
//! eviction and write-back run under the load, and (journal backends) a
//! journal so small that the ring wraps, so checkpoints run while threads
//! write. Then every byte is checked against a model, and the image against
//! our `check` and `qemu-img check`; QEMU must read the same bytes.
//!
//! Delayed copy-on-write (`journal-cow`): before the first session every
//! cluster of the disk gets base content and `qemu-img snapshot -c base`
//! shares it with an internal snapshot; QEMU clears the journal-valid bit,
//! so the next open re-creates the journal (checked: our check finds no
//! leak, QEMU exactly the new journal's clusters). After every session but
//! the last another QEMU snapshot shares the whole disk again, so every
//! session starts with each allocated cluster shared. A partial write into
//! a shared cluster then writes only its bytes and journals a copy of the
//! rest (rule 6 in `journal.rs`): with half the requests shorter than a
//! cluster, at 256-byte granularity, copies are delayed, overwritten while
//! pending (before and after a flush), read while pending, and left pending
//! at an abandon (the replay must make the committed ones). The model starts
//! from the base content; after each session every snapshot must still
//! read, through `qemu-img convert -l`, as when it was taken.
//!
//! Four sessions on the same file, so later ones start from tables on disk:
//! 1. open, stress, read the live image, close, reopen: the same bytes;
//! 2. open, stress, read the live image, `Image::abandon` (no close: the
//!    journal is replayed at the next open, flush ordering loses its cached
//!    metadata). A journalled image must carry the journal-dirty bit, and
//!    QEMU must refuse it. Reopen: every sector holds what a crash allows,
//!    so everything flushed before the abandon is there;
//! 3. as 2, starting from the image that replay (or repair) left;
//! 4. as 1.
//!
//! After each session, with the image closed: our check finds no
//! corruption and no leak (after an abandon on flush ordering, leaks are
//! allowed, must match QEMU's count, and are repaired), the journal-dirty
//! bit is clear, and `qemu-img check` finds no corruption and, as leaks,
//! exactly the journal's clusters (QEMU does not know the journal
//! extension). qemu-img missing fails the test.
//!
//! An abandon loses no write the process made, only state in memory, so
//! this catches logic bugs (a lost commit, a wrong replay, a missing dirty
//! bit), not ordering bugs that need a power loss: those are the crash
//! harness's (`engine_crash.rs`).
//!
//! Sizes: 8 threads x 1500 operations x 4 sessions per backend, 1 KiB
//! clusters, a 2 MiB disk, a 256 KiB journal (about 20 wraps of the ring
//! per session); the five backends run as five tests, about 10 s in all in
//! the test profile on 2 cores.
//!
//! The model is per sector and real-time. Its sectors are 256 bytes, half a
//! disk sector, so that requests are not 512-aligned and a write inside a
//! 1 KiB cluster can leave untouched bytes on both sides. Every operation
//! takes a ticket from a global clock when it starts and when it returns.
//! Every written sector carries the id of the operation that wrote it (and
//! its own index), so a sector's content names its writer. A sector must hold the
//! value of an operation on it that no other operation on it followed in
//! real time (or its value from before the session if none touched it). A
//! read is checked the same way on the sectors no operation touched while
//! it ran (a read racing a write of the same sector may see either, or a
//! mix on a real file: the block layer promises nothing there). After an
//! abandon, a flush covers the changes that returned before it started: a
//! sector must hold a value the covered changes allow, or the value of a
//! change no flush covered.

#![cfg(not(loom))]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use qj_engine::check::{check, RepairMode};
use qj_engine::{
    BackendKind, CreateOptions, FileStorage, Image, JournalConfig, OpenOptions, Stats,
};
use qj_spec::qcow2::features::{AUTOCLEAR_JOURNAL_VALID_BIT, INCOMPAT_JOURNAL_DIRTY_BIT};

/// A backend under test: how its images are created. Opening is the same
/// for all (the header says which backend runs).
#[derive(Clone, Copy, Debug)]
enum Backend {
    /// QEMU-style flush ordering.
    Ordered,
    /// The journal, single-flush commits.
    Journal,
    /// The journal, the draft's two-flush commits.
    JournalDraft,
    /// The journal, single-flush commits, on a disk shared with internal
    /// snapshots: partial writes are delayed copies-on-write.
    JournalCow,
    /// The journal, single-flush commits, with logged data: small writes
    /// into fresh clusters travel in the transaction (rule 7).
    JournalLogged,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Ordered => "flush-ordering",
            Backend::Journal => "journal",
            Backend::JournalDraft => "journal-draft",
            Backend::JournalCow => "journal-cow",
            Backend::JournalLogged => "journal-logged",
        }
    }

    fn journal(self) -> Option<JournalConfig> {
        let two_flush = match self {
            Backend::Ordered => return None,
            Backend::Journal | Backend::JournalCow | Backend::JournalLogged => false,
            Backend::JournalDraft => true,
        };
        Some(JournalConfig {
            size_bytes: JOURNAL_BYTES,
            two_flush,
            log_data: false,
            dedup: false,
        })
    }

    fn kind(self) -> BackendKind {
        match self {
            Backend::Ordered => BackendKind::FlushOrdering,
            Backend::Journal
            | Backend::JournalDraft
            | Backend::JournalCow
            | Backend::JournalLogged => BackendKind::Journal,
        }
    }

    /// Whether the disk starts with base content shared with an internal
    /// snapshot, and is shared again with a new one after every session.
    fn shares_snapshots(self) -> bool {
        matches!(self, Backend::JournalCow)
    }

    /// Clusters of the journal, which QEMU counts as leaks.
    fn journal_clusters(self) -> u64 {
        self.journal().map_or(0, |j| j.size_bytes / CLUSTER_BYTES)
    }

    fn open(self, path: &Path) -> Image {
        let opts = OpenOptions {
            cache_bytes_max: CACHE_BYTES_MAX,
            // The default, spelled out: `JournalCow` exists to stress it.
            delayed_cow: true,
            log_fresh_data: matches!(self, Backend::JournalLogged),
            ..OpenOptions::read_write()
        };
        let image = Image::open_path(path, &opts).expect("opening the image");
        assert_eq!(image.backend_kind(), self.kind(), "{}", self.name());
        image
    }
}

/// How a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Close,
    /// No close: what the engine has not flushed may be lost.
    Abandon,
}

/// Two abandons in a row: the second replays over an image the first
/// replay left.
const SESSION_ENDS: [End; 4] = [End::Close, End::Abandon, End::Abandon, End::Close];

const THREADS: u64 = 8;
/// The model's sector: half a disk sector, so that requests are not
/// 512-aligned and a write can fall strictly inside a cluster.
const SECTOR_BYTES: u64 = 256;
/// Small clusters: many L2 tables and refcount entries for little data.
const CLUSTER_BYTES: u64 = 1024;
const CLUSTER_SECTORS: u64 = CLUSTER_BYTES / SECTOR_BYTES;
const CLUSTERS: usize = (DISK_BYTES / CLUSTER_BYTES) as usize;
/// 16 L2 tables' worth of guest disk, all of it shared by every thread.
const DISK_BYTES: u64 = 16 * (CLUSTER_BYTES / 8) * CLUSTER_BYTES;
const SECTORS: usize = (DISK_BYTES / SECTOR_BYTES) as usize;
/// Room for 4 tables per cache (the engine's minimum): far fewer than the
/// 16 L2 tables, so lookups evict and write back all the time.
const CACHE_BYTES_MAX: u64 = 4 * CLUSTER_BYTES;
/// A small journal (256 clusters, near the minimum of 8 clusters + 64 KiB)
/// so the ring wraps several times per session: checkpoints run under load.
const JOURNAL_BYTES: u64 = 256 << 10;
const OPS_PER_THREAD: u64 = 1500;
/// Longest request, in sectors: up to 6 clusters, crossing cluster and L2
/// table boundaries. Half the requests are shorter than a cluster instead.
const REQUEST_SECTORS_MAX: u64 = 6 * CLUSTER_SECTORS;
/// The hot spot: the first 8 clusters.
const HOT_SECTORS: u64 = 8 * CLUSTER_SECTORS;
/// The model value of every sector of the base content a snapshot-sharing
/// backend starts from; the sessions' operation ids start above it.
const BASE_ID: SectorValue = 1;
/// The internal snapshot made of the base content.
const BASE_SNAPSHOT: &str = "base";
/// Per session, the least delayed copies, changes into their untouched
/// bytes (before a flush, and after one) and reads of those bytes that
/// prove the delayed copy-on-write ran under the load (see
/// [`CowExercise`]): about a fifth of what a run shows (600 to 800 copies,
/// 180 to 210 changes before a flush, 360 to 480 after, 150 to 250 reads).
const COW_DELAYED_COPIES_MIN: usize = 150;
const COW_PENDING_CHANGES_MIN: usize = 40;
const COW_PENDING_READS_MIN: usize = 30;

/// A sector's content in the model: the id of the operation that wrote it,
/// or zero (never written, zeroed, or discarded).
type SectorValue = u32;

/// The bytes of sector `sector` written by operation `op_id` (nonzero): the
/// pair (op id, sector index) repeated, so that a sector names its writer
/// and a misplaced or torn sector is detected.
fn sector_bytes(op_id: SectorValue, sector: usize, out: &mut [u8]) {
    assert_ne!(op_id, 0, "op ids start at 1: 0 means zeros");
    for word in out.chunks_exact_mut(8) {
        word[..4].copy_from_slice(&op_id.to_le_bytes());
        word[4..].copy_from_slice(&(sector as u32).to_le_bytes());
    }
}

/// The model value a sector's bytes hold, or `None` when they are neither
/// zeros nor one operation's whole sector.
fn decode_sector(bytes: &[u8], sector: usize) -> Option<SectorValue> {
    if bytes.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let first = &bytes[..8];
    let op_id = u32::from_le_bytes(first[..4].try_into().unwrap());
    let index = u32::from_le_bytes(first[4..].try_into().unwrap());
    let whole = bytes.chunks_exact(8).all(|w| w == first);
    (whole && op_id != 0 && index as usize == sector).then_some(op_id)
}

/// What a worker does next.
enum Op {
    Change(Kind),
    Read,
    Flush,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Write,
    Zero,
    Discard,
}

/// One completed change, with its real-time interval.
#[derive(Debug)]
struct Change {
    id: SectorValue,
    kind: Kind,
    offset: u64,
    len: u64,
    start: u64,
    end: u64,
}

impl Change {
    /// The sectors this change set, and to what. A discard releases whole
    /// clusters only (it is advisory): partial clusters keep their data.
    fn effects(&self) -> impl Iterator<Item = (usize, SectorValue)> + '_ {
        let (from, to) = match self.kind {
            Kind::Discard => (
                self.offset.next_multiple_of(CLUSTER_BYTES),
                (self.offset + self.len) / CLUSTER_BYTES * CLUSTER_BYTES,
            ),
            Kind::Write | Kind::Zero => (self.offset, self.offset + self.len),
        };
        let value = if self.kind == Kind::Write { self.id } else { 0 };
        let sectors = if from < to {
            (from / SECTOR_BYTES) as usize..(to / SECTOR_BYTES) as usize
        } else {
            0..0
        };
        sectors.map(move |s| (s, value))
    }
}

/// One completed read: what it saw in each sector (`None`: not a whole
/// value).
struct ReadSeen {
    offset: u64,
    start: u64,
    end: u64,
    sectors: Vec<Option<SectorValue>>,
}

/// What one thread did.
#[derive(Default)]
struct ThreadLog {
    changes: Vec<Change>,
    reads: Vec<ReadSeen>,
    /// Clock ticks at which completed flushes started.
    flush_starts: Vec<u64>,
}

/// xorshift64*: a deterministic stream per (session, thread).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % bound
    }
}

/// Everything the threads share: the image, the real-time clock, the
/// source of operation ids.
struct Shared {
    image: Image,
    clock: AtomicU64,
    next_id: AtomicU64,
}

impl Shared {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

fn worker(shared: &Shared, seed: u64) -> ThreadLog {
    let mut rng = Rng::new(seed);
    let mut log = ThreadLog::default();
    let image = &shared.image;
    // After a write that ended inside a cluster: (first sector, sectors)
    // of a range in the part of that cluster it left untouched.
    let mut follow_up: Option<(u64, u64)> = None;
    for _ in 0..OPS_PER_THREAD {
        let (first, sectors, op) = match follow_up.take() {
            // Half the time the next operation writes there: into a cluster
            // shared with a snapshot, that is a write into the untouched
            // bytes of a delayed copy just registered, often before any
            // flush submitted it.
            Some((first, sectors)) if rng.below(2) == 0 => {
                (first, sectors, Op::Change(Kind::Write))
            }
            _ => {
                // Half the requests fall inside one cluster or straddle two
                // without covering either: partial writes, which on a
                // shared cluster are delayed copies.
                let sectors = if rng.below(2) == 0 {
                    rng.below(CLUSTER_SECTORS - 1) + 1
                } else {
                    rng.below(REQUEST_SECTORS_MAX) + 1
                };
                // Half the requests go to a hot spot of a few clusters,
                // where discards and writes make threads race to allocate
                // the same clusters and tables; the rest anywhere.
                let window = if rng.below(2) == 0 {
                    HOT_SECTORS
                } else {
                    SECTORS as u64
                };
                let first = rng.below(window - sectors + 1);
                let op = match rng.below(20) {
                    0..=8 => Op::Change(Kind::Write),
                    9..=10 => Op::Change(Kind::Zero),
                    11..=13 => Op::Change(Kind::Discard),
                    14..=18 => Op::Read,
                    _ => Op::Flush,
                };
                (first, sectors, op)
            }
        };
        let (offset, len) = (first * SECTOR_BYTES, sectors * SECTOR_BYTES);
        let kind = match op {
            Op::Change(kind) => kind,
            Op::Read => {
                let start = shared.tick();
                let mut buf = vec![0u8; len as usize];
                image.read(&mut buf, offset).expect("read");
                let end = shared.tick();
                let sectors = buf
                    .chunks_exact(SECTOR_BYTES as usize)
                    .enumerate()
                    .map(|(i, bytes)| decode_sector(bytes, first as usize + i))
                    .collect();
                log.reads.push(ReadSeen {
                    offset,
                    start,
                    end,
                    sectors,
                });
                continue;
            }
            Op::Flush => {
                let start = shared.tick();
                image.flush().expect("flush");
                log.flush_starts.push(start);
                continue;
            }
        };
        let id = shared.next_id.fetch_add(1, Ordering::SeqCst) as SectorValue;
        let start = shared.tick();
        match kind {
            Kind::Write => {
                let mut buf = vec![0u8; len as usize];
                for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
                    sector_bytes(id, first as usize + i, sector);
                }
                image.write(&buf, offset).expect("write");
                let end = first + sectors;
                let untouched = CLUSTER_SECTORS - end % CLUSTER_SECTORS;
                if untouched < CLUSTER_SECTORS {
                    follow_up = Some((end, rng.below(untouched) + 1));
                }
            }
            Kind::Zero => image.write_zeroes(offset, len).expect("write zeroes"),
            Kind::Discard => image.discard(offset, len).expect("discard"),
        }
        let end = shared.tick();
        log.changes.push(Change {
            id,
            kind,
            offset,
            len,
            start,
            end,
        });
    }
    log
}

/// Per sector, the changes that touched it: (start, end, value).
type History = Vec<Vec<(u64, u64, SectorValue)>>;

fn history(logs: &[ThreadLog]) -> History {
    let mut history: History = vec![Vec::new(); SECTORS];
    for change in logs.iter().flat_map(|l| &l.changes) {
        for (sector, value) in change.effects() {
            history[sector].push((change.start, change.end, value));
        }
    }
    history
}

/// The values sector `sector` may hold as seen by an observer starting at
/// `before`: those of the changes that returned before it and that no other
/// such change followed in real time; the session's initial value if none.
fn allowed(
    history: &History,
    initial: &[SectorValue],
    sector: usize,
    before: u64,
) -> BTreeSet<SectorValue> {
    let done: Vec<_> = history[sector].iter().filter(|c| c.1 < before).collect();
    match done.iter().map(|c| c.0).max() {
        None => BTreeSet::from([initial[sector]]),
        // A change is superseded when another one started after it
        // returned; the one that started last (clock ticks are unique) and
        // those still running when it started are not.
        Some(latest_start) => done
            .iter()
            .filter(|c| c.1 > latest_start)
            .map(|c| c.2)
            .collect(),
    }
}

/// The values sector `sector` may hold after the image was abandoned, when
/// the last flush started at `flushed_before`: what the changes that flush
/// covered allow, or the value of any change it did not cover (whether
/// those survive is up to the engine).
fn allowed_after_abandon(
    history: &History,
    initial: &[SectorValue],
    sector: usize,
    flushed_before: u64,
) -> BTreeSet<SectorValue> {
    let mut values = allowed(history, initial, sector, flushed_before);
    values.extend(
        history[sector]
            .iter()
            .filter(|c| c.1 >= flushed_before)
            .map(|c| c.2),
    );
    values
}

/// Reads that saw a sector no change touched during the read must have
/// seen an allowed value: a stale L2 table or a lost write shows here first.
fn check_reads(logs: &[ThreadLog], history: &History, initial: &[SectorValue]) -> usize {
    let mut checked = 0;
    for read in logs.iter().flat_map(|l| &l.reads) {
        let first = (read.offset / SECTOR_BYTES) as usize;
        for (i, seen) in read.sectors.iter().enumerate() {
            let sector = first + i;
            let racing = history[sector]
                .iter()
                .any(|&(start, end, _)| start < read.end && end > read.start);
            if racing {
                continue;
            }
            let allowed = allowed(history, initial, sector, read.start);
            assert!(
                seen.is_some_and(|v| allowed.contains(&v)),
                "a read (clock {}..{}) saw {seen:?} in sector {sector}, allowed {allowed:?}",
                read.start,
                read.end
            );
            checked += 1;
        }
    }
    checked
}

/// The whole disk as the image reads it, one model value per sector.
fn read_disk(image: &Image) -> Vec<SectorValue> {
    let mut bytes = vec![0u8; DISK_BYTES as usize];
    image.read(&mut bytes, 0).expect("reading the disk");
    bytes
        .chunks_exact(SECTOR_BYTES as usize)
        .enumerate()
        .map(|(sector, b)| {
            decode_sector(b, sector)
                .unwrap_or_else(|| panic!("sector {sector} holds neither zeros nor one write"))
        })
        .collect()
}

/// The bytes of a disk whose sectors hold `values`.
fn encode_disk(values: &[SectorValue]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len() * SECTOR_BYTES as usize];
    let sectors = bytes.chunks_exact_mut(SECTOR_BYTES as usize).zip(values);
    for (sector, (out, &value)) in sectors.enumerate() {
        if value != 0 {
            sector_bytes(value, sector, out);
        }
    }
    bytes
}

/// How much a session exercised delayed copy-on-write, as far as the model
/// sees it (the engine's checkpoints, which end a pending copy, are not
/// visible here): partial writes that were the first change to a cluster
/// holding data when the last snapshot was taken (each is a delayed copy),
/// the first later write or zeroing into the bytes such a write left
/// untouched (split by whether a flush started in between), and the reads
/// of those bytes in between.
#[derive(Debug, Default)]
struct CowExercise {
    delayed_copies: usize,
    changes_into_untouched_before_flush: usize,
    changes_into_untouched_after_flush: usize,
    reads_of_untouched: usize,
}

fn cow_exercise(logs: &[ThreadLog], initial: &[SectorValue]) -> CowExercise {
    let cluster_of = |sector: usize| sector / CLUSTER_SECTORS as usize;
    let mut changes: Vec<Vec<&Change>> = vec![Vec::new(); CLUSTERS];
    for change in logs.iter().flat_map(|l| &l.changes) {
        let touched: BTreeSet<usize> = change.effects().map(|(s, _)| cluster_of(s)).collect();
        for cluster in touched {
            changes[cluster].push(change);
        }
    }
    let mut reads: Vec<Vec<&ReadSeen>> = vec![Vec::new(); CLUSTERS];
    for read in logs.iter().flat_map(|l| &l.reads) {
        let first = (read.offset / SECTOR_BYTES) as usize;
        let touched = cluster_of(first)..=cluster_of(first + read.sectors.len() - 1);
        for per_cluster in &mut reads[touched] {
            per_cluster.push(read);
        }
    }
    let flush_starts: Vec<u64> = logs.iter().flat_map(|l| &l.flush_starts).copied().collect();
    let sectors_of = |offset: u64, len: u64| {
        (offset / SECTOR_BYTES) as usize..((offset + len) / SECTOR_BYTES) as usize
    };
    let mut exercise = CowExercise::default();
    for (cluster, changes) in changes.iter().enumerate() {
        let in_cluster =
            cluster * CLUSTER_SECTORS as usize..(cluster + 1) * CLUSTER_SECTORS as usize;
        // Unallocated, zero or zeroed when the snapshot was taken: not
        // shared with it, or not known to be.
        if initial[in_cluster.clone()].iter().all(|&v| v == 0) {
            continue;
        }
        let Some(first) = changes.iter().min_by_key(|c| c.start) else {
            continue;
        };
        let written = sectors_of(first.offset, first.len);
        let partial = in_cluster.clone().any(|s| !written.contains(&s));
        if first.kind != Kind::Write || !partial {
            continue;
        }
        exercise.delayed_copies += 1;
        let into_untouched = |offset: u64, len: u64| {
            sectors_of(offset, len).any(|s| in_cluster.contains(&s) && !written.contains(&s))
        };
        let next = changes
            .iter()
            .filter(|c| c.kind != Kind::Discard && c.start > first.end)
            .filter(|c| into_untouched(c.offset, c.len))
            .min_by_key(|c| c.start);
        if let Some(next) = next {
            let flushed = flush_starts
                .iter()
                .any(|&f| f > first.end && f < next.start);
            if flushed {
                exercise.changes_into_untouched_after_flush += 1;
            } else {
                exercise.changes_into_untouched_before_flush += 1;
            }
        }
        let until = next.map_or(u64::MAX, |c| c.start);
        exercise.reads_of_untouched += reads[cluster]
            .iter()
            .filter(|r| r.start > first.end && r.end < until)
            .filter(|r| into_untouched(r.offset, r.sectors.len() as u64 * SECTOR_BYTES))
            .count();
    }
    exercise
}

/// What a session left: the threads' logs, the disk as the live image read
/// it once every thread was done, and the counters at that moment.
struct SessionOutcome {
    logs: Vec<ThreadLog>,
    live_disk: Vec<SectorValue>,
    stats: Stats,
}

/// Runs one session: open, 8 threads, read the live disk, close or abandon.
fn run_session(
    backend: Backend,
    path: &Path,
    session: u64,
    first_id: u64,
    end: End,
) -> SessionOutcome {
    let shared = Arc::new(Shared {
        image: backend.open(path),
        clock: AtomicU64::new(0),
        next_id: AtomicU64::new(first_id),
    });
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = shared.clone();
            thread::spawn(move || worker(&shared, session * THREADS + t + 1))
        })
        .collect();
    // A worker panics on an engine error or an engine panic (for instance
    // an arithmetic overflow in the engine under this load); its own message
    // is printed above this one.
    let logs: Vec<_> = threads
        .into_iter()
        .enumerate()
        .map(|(t, handle)| {
            handle.join().unwrap_or_else(|_| {
                panic!(
                    "{} session {session}: worker thread {t} (seed {}) panicked inside the engine or on an engine error; see its message above",
                    backend.name(),
                    session * THREADS + t as u64 + 1
                )
            })
        })
        .collect();
    let shared = Arc::into_inner(shared).expect("every thread is done");
    let live_disk = read_disk(&shared.image);
    let stats = shared.image.stats();
    match end {
        End::Close => shared.image.close().expect("closing the image"),
        End::Abandon => {
            shared.image.abandon();
            check_abandoned(backend, path);
        }
    }
    SessionOutcome {
        logs,
        live_disk,
        stats,
    }
}

/// Whether the journal-dirty bit is set in the header on disk.
fn journal_dirty(path: &Path) -> bool {
    let storage = FileStorage::open(path, false).expect("opening the file");
    let header = Image::read_header(&storage).expect("reading the header");
    header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT)
}

/// An abandoned journalled image holds committed transactions not yet in
/// place (a session commits thousands; only a clean close checkpoints them
/// all and clears the bit): its header must carry the journal-dirty bit, so
/// that QEMU, which cannot replay, refuses it instead of reading stale
/// tables.
fn check_abandoned(backend: Backend, path: &Path) {
    if backend.journal().is_none() {
        return;
    }
    let name = backend.name();
    assert!(
        journal_dirty(path),
        "{name}: abandoned with committed transactions, the journal-dirty bit is clear"
    );
    let out = Command::new("qemu-img")
        .args(["info", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img is installed (our independent oracle)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("journal dirty"),
        "{name}: QEMU must refuse a dirty journalled image, naming the bit: {stderr}"
    );
}

/// Our check and `qemu-img check` on the closed image. Only after an
/// abandon on flush ordering may there be leaks (clusters whose refcount
/// reached the disk before the L2 entry that would use them); QEMU must
/// count the same ones, and our repair must fix them all.
fn check_image(backend: Backend, path: &Path, end: End) {
    let name = backend.name();
    let storage = FileStorage::open(path, false).expect("opening the file");
    let header = Image::read_header(&storage).expect("reading the header");
    let journal_clusters = header.journal().map_or(0, |j| j.size / CLUSTER_BYTES);
    assert_eq!(
        journal_clusters,
        backend.journal_clusters(),
        "{name}: the journal has another size than it was created with"
    );
    assert!(
        !header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT),
        "{name}: a clean close must clear the journal-dirty bit"
    );
    let report = check(&storage, RepairMode::None, &[]).expect("checking the image");
    drop(storage);
    let leaks_allowed = end == End::Abandon && backend.journal().is_none();
    assert_eq!(
        (report.corruptions, report.check_errors),
        (0, 0),
        "{name}: our check: {:?}",
        report.messages
    );
    assert!(
        report.leaks == 0 || leaks_allowed,
        "{name} after {end:?}: our check found {} leaks: {:?}",
        report.leaks,
        report.messages
    );

    let qemu = qemu_check(path);
    let field = |key: &str| qemu.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(
        (field("corruptions"), field("check-errors")),
        (0, 0),
        "{name}: qemu-img check: {qemu}"
    );
    // QEMU does not know the journal extension: its clusters, and only
    // they, are refcounted but unreferenced for QEMU.
    assert_eq!(
        field("leaks"),
        report.leaks + journal_clusters,
        "{name}: qemu-img check leaks are not ours plus the journal's {journal_clusters} clusters: {qemu}"
    );

    if report.leaks > 0 {
        let storage = FileStorage::open(path, true).expect("opening the file to repair");
        let repair = check(&storage, RepairMode::Leaks, &[]).expect("repairing leaks");
        assert_eq!(
            repair.leaks_fixed, report.leaks,
            "{name}: repair: {:?}",
            repair.messages
        );
        let after = check(&storage, RepairMode::None, &[]).expect("checking the repair");
        assert_eq!(
            (after.corruptions, after.leaks, after.check_errors),
            (0, 0, 0),
            "{name}: after repair: {:?}",
            after.messages
        );
    }
}

/// `qemu-img check --output=json`: its JSON object. Missing qemu-img fails
/// (it is our independent oracle, not an optional extra).
fn qemu_check(path: &Path) -> serde_json::Value {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is installed (our independent oracle)");
    let code = out.status.code().unwrap_or(-1);
    // 0 clean, 3 leaks only; anything else is checked below through the
    // JSON or fails here when there is none.
    assert!(
        code == 0 || code == 3,
        "qemu-img check exited {code}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("qemu-img check prints JSON")
}

/// QEMU's reading of the guest disk, or of internal snapshot `snapshot`,
/// byte for byte.
fn qemu_raw(path: &Path, dir: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    let mut command = Command::new("qemu-img");
    command.args(["convert", "-f", "qcow2", "-O", "raw"]);
    if let Some(name) = snapshot {
        command.arg("-l").arg(format!("snapshot.name={name}"));
    }
    let out = command
        .arg(path)
        .arg(&raw)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img convert: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&raw).expect("reading the converted disk")
}

/// Panics at the first guest offset where QEMU reads other bytes than
/// `expected`.
fn assert_qemu_reads(expected: &[u8], theirs: &[u8], what: &str) {
    assert_eq!(
        theirs.len(),
        expected.len(),
        "{what}: QEMU's disk has another size"
    );
    if let Some(at) = (0..expected.len()).find(|&i| expected[i] != theirs[i]) {
        panic!(
            "{what}: QEMU reads other bytes, first at guest offset {at} (model sector {})",
            at as u64 / SECTOR_BYTES
        );
    }
}

/// `qemu-img snapshot -c name`: QEMU shares every allocated cluster with a
/// new internal snapshot (and, writing the image, clears the journal-valid
/// autoclear bit it does not know).
fn qemu_snapshot(path: &Path, name: &str) {
    let out = Command::new("qemu-img")
        .args(["snapshot", "-c", name])
        .arg(path)
        .output()
        .expect("qemu-img is installed");
    assert!(
        out.status.success(),
        "qemu-img snapshot -c {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the header on disk says the journal is valid.
fn journal_valid(path: &Path) -> bool {
    let storage = FileStorage::open(path, false).expect("opening the file");
    let header = Image::read_header(&storage).expect("reading the header");
    header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT)
}

/// Shares the whole (closed, clean) image with a new snapshot made by
/// QEMU, so that its rules hold, then lets our next read-write open
/// re-create the journal QEMU invalidated. In between QEMU counts exactly
/// the old journal's clusters as leaked; after, our check must count none
/// (the re-creation frees them) and QEMU exactly the new journal's.
fn share_with_snapshot(backend: Backend, path: &Path, snapshot: &str) {
    let name = backend.name();
    assert!(journal_valid(path), "{name}: our close keeps the journal");
    qemu_snapshot(path, snapshot);
    assert!(
        !journal_valid(path),
        "{name}: QEMU kept the journal-valid autoclear bit it does not know"
    );
    let qemu = qemu_check(path);
    assert_eq!(
        qemu["leaks"].as_u64().unwrap_or(0),
        backend.journal_clusters(),
        "{name}: after qemu-img snapshot, QEMU's leaks are not the journal's clusters: {qemu}"
    );
    backend
        .open(path)
        .close()
        .expect("re-creating the journal and closing");
    assert!(
        journal_valid(path),
        "{name}: the journal was not re-created"
    );
    check_image(backend, path, End::Close);
}

/// The disk after reopening must be what the session allows: exactly the
/// live image after a close; after an abandon, per sector what the flushes
/// made durable or a change no flush covered.
fn check_reopened(
    backend: Backend,
    session: usize,
    end: End,
    outcome: &SessionOutcome,
    history: &History,
    initial: &[SectorValue],
    reopened: &[SectorValue],
) {
    let name = backend.name();
    match end {
        End::Close => {
            if let Some(sector) = (0..SECTORS).find(|&s| reopened[s] != outcome.live_disk[s]) {
                panic!(
                    "{name} session {session}: after close and reopen sector {sector} holds {}, the live image read {}",
                    reopened[sector], outcome.live_disk[sector]
                );
            }
        }
        End::Abandon => {
            let flushed_before = outcome
                .logs
                .iter()
                .flat_map(|l| &l.flush_starts)
                .copied()
                .max()
                .expect("some thread flushed");
            // The last flush must cover most of the work, or the check
            // proves little about durability.
            let changes: Vec<_> = outcome.logs.iter().flat_map(|l| &l.changes).collect();
            let covered = changes.iter().filter(|c| c.end < flushed_before).count();
            assert!(
                covered * 10 > changes.len() * 9,
                "{name}: the last flush covers only {covered} of {} changes",
                changes.len()
            );
            for (sector, &value) in reopened.iter().enumerate() {
                let allowed = allowed_after_abandon(history, initial, sector, flushed_before);
                assert!(
                    allowed.contains(&value),
                    "{name} session {session}: after abandon and replay sector {sector} holds {value}, \
                     allowed {allowed:?} (last flush started at clock {flushed_before}; live image read {})",
                    outcome.live_disk[sector]
                );
            }
        }
    }
}

/// Creates the image; returns the model of its guest disk: zeros, or for
/// a snapshot-sharing backend base content in every sector, shared with
/// snapshot `base`.
fn create_image(backend: Backend, path: &Path) -> Vec<SectorValue> {
    Image::create_path(
        path,
        &CreateOptions {
            virtual_size: DISK_BYTES,
            cluster_size: CLUSTER_BYTES,
            journal: backend.journal(),
            ..CreateOptions::default()
        },
    )
    .expect("creating the image");
    if !backend.shares_snapshots() {
        return vec![0; SECTORS];
    }
    let base = vec![BASE_ID; SECTORS];
    let image = backend.open(path);
    image
        .write(&encode_disk(&base), 0)
        .expect("writing the base content");
    image.close().expect("closing the image");
    share_with_snapshot(backend, path, BASE_SNAPSHOT);
    base
}

fn stress(backend: Backend) {
    let name = backend.name();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("stress.qcow2");
    let mut disk = create_image(backend, &path);
    // Internal snapshots, and the guest bytes each must keep.
    let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
    if backend.shares_snapshots() {
        snapshots.push((BASE_SNAPSHOT.to_string(), encode_disk(&disk)));
    }
    let mut next_id = u64::from(BASE_ID) + 1;
    for (session, &end) in SESSION_ENDS.iter().enumerate() {
        let outcome = run_session(backend, &path, session as u64, next_id, end);
        let changes: usize = outcome.logs.iter().map(|l| l.changes.len()).sum();
        next_id += changes as u64;
        let history = history(&outcome.logs);
        let reads_checked = check_reads(&outcome.logs, &history, &disk);

        // The live image, once every thread is done: every sector holds an
        // allowed value.
        for (sector, &value) in outcome.live_disk.iter().enumerate() {
            let allowed = allowed(&history, &disk, sector, u64::MAX);
            assert!(
                allowed.contains(&value),
                "{name} session {session}: the live image's sector {sector} holds {value}, allowed {allowed:?}"
            );
        }
        // The model must have been exercised, or the checks prove nothing.
        let changed = (0..SECTORS)
            .filter(|&s| outcome.live_disk[s] != disk[s])
            .count();
        assert!(
            changed > SECTORS / 4,
            "{name} session {session}: only {changed} sectors changed"
        );
        assert!(
            reads_checked > 1000,
            "only {reads_checked} read sectors checked"
        );
        // The ring can be reused only after a checkpoint: more bytes
        // through it than it holds means checkpoints ran while threads
        // wrote.
        if backend.journal().is_some() {
            assert!(
                outcome.stats.journal_bytes > 2 * JOURNAL_BYTES,
                "{name} session {session}: only {} journal bytes written, the {JOURNAL_BYTES}-byte ring never wrapped: {:?}",
                outcome.stats.journal_bytes,
                outcome.stats
            );
        }
        if backend.shares_snapshots() {
            let cow = cow_exercise(&outcome.logs, &disk);
            assert!(
                cow.delayed_copies > COW_DELAYED_COPIES_MIN
                    && cow.changes_into_untouched_before_flush > COW_PENDING_CHANGES_MIN
                    && cow.changes_into_untouched_after_flush > COW_PENDING_CHANGES_MIN
                    && cow.reads_of_untouched > COW_PENDING_READS_MIN,
                "{name} session {session}: delayed copy-on-write barely exercised: {cow:?}"
            );
        }

        let image = backend.open(&path);
        let reopened = read_disk(&image);
        image.close().expect("closing the image");
        check_reopened(backend, session, end, &outcome, &history, &disk, &reopened);
        disk = reopened;

        check_image(backend, &path, end);
        let mut ours = vec![0u8; DISK_BYTES as usize];
        let image = backend.open(&path);
        image.read(&mut ours, 0).expect("reading the disk");
        image.close().expect("closing the image");
        let theirs = qemu_raw(&path, dir.path(), None);
        assert_qemu_reads(&ours, &theirs, &format!("{name} session {session}"));
        // Nothing a session does may reach a snapshot's clusters.
        for (snapshot, content) in &snapshots {
            let theirs = qemu_raw(&path, dir.path(), Some(snapshot));
            assert_qemu_reads(
                content,
                &theirs,
                &format!("{name} session {session}: snapshot {snapshot}"),
            );
        }
        if backend.shares_snapshots() && session + 1 < SESSION_ENDS.len() {
            let snapshot = format!("after-session-{session}");
            share_with_snapshot(backend, &path, &snapshot);
            snapshots.push((snapshot, ours));
        }
    }
}

#[test]
fn eight_threads_overlapping_on_flush_ordering() {
    stress(Backend::Ordered);
}

#[test]
fn eight_threads_overlapping_on_the_journal() {
    stress(Backend::Journal);
}

#[test]
fn eight_threads_overlapping_on_the_two_flush_draft_journal() {
    stress(Backend::JournalDraft);
}

#[test]
fn eight_threads_overlapping_on_the_journal_with_delayed_copy_on_write() {
    stress(Backend::JournalCow);
}

#[test]
fn eight_threads_overlapping_on_the_journal_with_logged_data() {
    stress(Backend::JournalLogged);
}
