//! Multi-threaded stress test on a real file: 8 threads issue overlapping
//! writes, write-zeroes, discards, reads and flushes on one image, all over
//! the same small disk, with a metadata cache far smaller than the metadata
//! so that eviction and write-back run under the load. Then every byte is
//! checked against a model, and the image against our `check` and
//! `qemu-img check`; QEMU must read the same bytes. Two sessions (open, run,
//! close) on the same file, so the second starts from tables on disk.
//!
//! The model is per 512-byte sector and real-time: every operation takes a
//! ticket from a global clock when it starts and when it returns. Every
//! written sector carries the id of the operation that wrote it (and its own
//! index), so a sector's content names its writer. A sector must hold the
//! value of an operation on it that no other operation on it followed in
//! real time (or its value from before the session if none touched it). A
//! read is checked the same way on the sectors no operation touched while
//! it ran (a read racing a write of the same sector may see either, or a
//! mix on a real file: the block layer promises nothing there).
//!
//! Backends are a list: the journal backend is one more entry.

#![cfg(not(loom))]

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;

use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, FileStorage, Image, OpenOptions};

/// A backend under test: how to open an image on it, and what `qemu-img
/// check` may report on a closed image it wrote.
struct Backend {
    name: &'static str,
    open: fn(&Path) -> qj_engine::Result<Image>,
    /// Accepted `qemu-img check` exit codes (0: clean; a journal, whose
    /// clusters QEMU does not know, would also accept 3: leaks only).
    qemu_check_exit_codes: &'static [i32],
}

const BACKENDS: &[Backend] = &[Backend {
    name: "flush-ordering",
    open: open_flush_ordering,
    qemu_check_exit_codes: &[0],
}];

fn open_flush_ordering(path: &Path) -> qj_engine::Result<Image> {
    let mut opts = OpenOptions::read_write();
    opts.cache_bytes_max = CACHE_BYTES_MAX;
    Image::open_path(path, &opts)
}

const THREADS: u64 = 8;
const SECTOR_BYTES: u64 = 512;
/// Small clusters: many L2 tables and refcount entries for little data.
const CLUSTER_BYTES: u64 = 1024;
/// 16 L2 tables' worth of guest disk, all of it shared by every thread.
const DISK_BYTES: u64 = 16 * (CLUSTER_BYTES / 8) * CLUSTER_BYTES;
const SECTORS: usize = (DISK_BYTES / SECTOR_BYTES) as usize;
/// Room for 4 tables per cache (the engine's minimum): far fewer than the
/// 16 L2 tables, so lookups evict and write back all the time.
const CACHE_BYTES_MAX: u64 = 4 * CLUSTER_BYTES;
const OPS_PER_THREAD: u64 = 1000;
/// Longest request, in sectors: up to 6 clusters, crossing cluster and L2
/// table boundaries.
const REQUEST_SECTORS_MAX: u64 = 12;
const SESSIONS: u64 = 3;
/// The hot spot: the first 8 clusters.
const HOT_SECTORS: u64 = 8 * CLUSTER_BYTES / SECTOR_BYTES;

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
    for _ in 0..OPS_PER_THREAD {
        let sectors = rng.below(REQUEST_SECTORS_MAX) + 1;
        // Half the requests go to a hot spot of a few clusters, where
        // discards and writes make threads race to allocate the same
        // clusters and tables; the rest anywhere.
        let window = if rng.below(2) == 0 {
            HOT_SECTORS
        } else {
            SECTORS as u64
        };
        let first = rng.below(window - sectors + 1);
        let (offset, len) = (first * SECTOR_BYTES, sectors * SECTOR_BYTES);
        let kind = match rng.below(20) {
            0..=8 => Kind::Write,
            9..=10 => Kind::Zero,
            11..=13 => Kind::Discard,
            14..=18 => {
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
            _ => {
                image.flush().expect("flush");
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

/// Runs one session: open, 8 threads, close. Returns the threads' logs.
fn run_session(backend: &Backend, path: &Path, session: u64, first_id: u64) -> Vec<ThreadLog> {
    let image = (backend.open)(path).expect("opening the image");
    let shared = Arc::new(Shared {
        image,
        clock: AtomicU64::new(0),
        next_id: AtomicU64::new(first_id),
    });
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = shared.clone();
            thread::spawn(move || worker(&shared, session * THREADS + t + 1))
        })
        .collect();
    let logs: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let shared = Arc::into_inner(shared).expect("every thread is done");
    shared.image.close().expect("closing the image");
    logs
}

/// Our check and `qemu-img check` on the closed image.
fn check_image(backend: &Backend, path: &Path) {
    let storage = FileStorage::open(path, false).expect("opening the file");
    let report = check(&storage, RepairMode::None, &[]).expect("checking the image");
    assert_eq!(
        (report.corruptions, report.leaks, report.check_errors),
        (0, 0, 0),
        "{}: our check: {:?}",
        backend.name,
        report.messages
    );
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img is installed (our independent oracle)");
    let code = out.status.code().unwrap_or(-1);
    assert!(
        backend.qemu_check_exit_codes.contains(&code),
        "{}: qemu-img check exited {code}: {}{}",
        backend.name,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// QEMU's reading of the guest disk, byte for byte.
fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let raw = dir.join("guest.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
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

fn stress(backend: &Backend) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("stress.qcow2");
    Image::create_path(
        &path,
        &CreateOptions {
            virtual_size: DISK_BYTES,
            cluster_size: CLUSTER_BYTES,
            ..CreateOptions::default()
        },
    )
    .expect("creating the image");
    let mut disk: Vec<SectorValue> = vec![0; SECTORS];
    let mut next_id = 1;
    for session in 0..SESSIONS {
        let logs = run_session(backend, &path, session, next_id);
        let changes: usize = logs.iter().map(|l| l.changes.len()).sum();
        next_id += changes as u64;
        let history = history(&logs);
        let reads_checked = check_reads(&logs, &history, &disk);

        // Reopened from the file: every sector holds an allowed value.
        let image = (backend.open)(&path).expect("reopening the image");
        let now = read_disk(&image);
        image.close().expect("closing the image");
        for (sector, &value) in now.iter().enumerate() {
            let allowed = allowed(&history, &disk, sector, u64::MAX);
            assert!(
                allowed.contains(&value),
                "{} session {session}: sector {sector} holds {value}, allowed {allowed:?}",
                backend.name
            );
        }
        // The model must have been exercised, or the checks prove nothing.
        let written = now.iter().filter(|&&v| v != 0).count();
        assert!(written > SECTORS / 4, "only {written} sectors hold data");
        assert!(
            reads_checked > 1000,
            "only {reads_checked} read sectors checked"
        );
        disk = now;

        check_image(backend, &path);
        let mut ours = vec![0u8; DISK_BYTES as usize];
        let image = (backend.open)(&path).expect("reopening the image");
        image.read(&mut ours, 0).expect("reading the disk");
        image.close().expect("closing the image");
        let theirs = qemu_raw(&path, dir.path());
        assert_eq!(theirs.len(), ours.len(), "QEMU's disk has another size");
        if let Some(at) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
            panic!(
                "{} session {session}: QEMU reads other bytes than we do, first at guest offset {at}",
                backend.name
            );
        }
    }
}

#[test]
fn eight_threads_overlapping_on_every_backend() {
    for backend in BACKENDS {
        stress(backend);
    }
}
