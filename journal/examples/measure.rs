//! Quick measurements of the journal on a real file (fdatasync per flush):
//! flushes per commit for both protocols, group-commit scaling from 1 to 8
//! threads, and replay time of a full 16 MiB journal.
//!
//! Run: `cargo run --release -p qj-journal --example measure [DIR]`
//! (DIR defaults to the system temp dir; it must be on a real disk).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use qj_journal::{
    CommitProtocol, FileStorage, Journal, JournalError, JournalOptions, NoDedup, Storage,
    Transaction, WhenFull,
};

/// A file that counts its flushes.
#[derive(Debug)]
struct Counted {
    file: FileStorage,
    flushes: AtomicU64,
}

impl Storage for Counted {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        self.file.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.file.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.file.set_len(len)
    }
}

const JOURNAL_BYTES: u64 = 16 << 20;
const TARGETS: u64 = 32 << 20;
const FILE_BYTES: u64 = 64 << 20;
/// Journal block size for the commit measurements: a 4 KiB transaction then
/// writes 5 KiB (descriptor block, data, commit block).
const BLOCK: u32 = 512;
/// Journal block size for the replay measurement.
const REPLAY_BLOCK: u32 = 4096;

/// A preallocated file (written with zeros and synced), so that commits
/// overwrite allocated blocks instead of growing the file.
fn preallocated(dir: &Path, name: &str) -> Counted {
    let path = dir.join(name);
    let file = FileStorage::create(&path).expect("create file");
    let zeros = vec![0u8; 1 << 20];
    for mib in 0..FILE_BYTES >> 20 {
        file.write_at(&zeros, mib << 20).expect("preallocate");
    }
    file.flush().expect("sync");
    Counted {
        file,
        flushes: AtomicU64::new(0),
    }
}

fn options(protocol: CommitProtocol) -> JournalOptions {
    let mut options = JournalOptions::new(FILE_BYTES);
    options.commit_protocol = protocol;
    options
}

fn one_block_tx(slot: u64) -> Transaction {
    let mut tx = Transaction::new();
    let bytes = vec![(slot % 251) as u8; 4096];
    tx.write(TARGETS + (slot % 4096) * 4096, &bytes)
        .expect("valid write");
    tx
}

/// Commits `per_thread` transactions from each of `threads` threads, with
/// a checkpoint whenever the journal asks; returns (commits/s, flushes per
/// commit, commits per batch).
fn commit_rate(
    storage: &Counted,
    protocol: CommitProtocol,
    threads: u64,
    per_thread: u64,
) -> (f64, f64, f64) {
    commit_rate_with(storage, options(protocol), threads, per_thread)
}

/// [`commit_rate`] with explicit options.
fn commit_rate_with(
    storage: &Counted,
    options: JournalOptions,
    threads: u64,
    per_thread: u64,
) -> (f64, f64, f64) {
    let journal = Journal::create(storage, 0, JOURNAL_BYTES, BLOCK, options).expect("create");
    let before = journal.stats();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let journal = &journal;
            s.spawn(move || {
                for i in 0..per_thread {
                    journal
                        .commit(one_block_tx(t * per_thread + i))
                        .expect("commit");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let stats = journal.stats();
    let commits = (stats.commits - before.commits) as f64;
    (
        commits / elapsed.as_secs_f64(),
        (stats.commit_flushes - before.commit_flushes) as f64 / commits,
        commits / (stats.batches - before.batches) as f64,
    )
}

/// Rounds of each interleaved comparison.
const ROUNDS: usize = 9;

/// The physical reference: 4 KiB overwrite + fdatasync, one at a time.
fn raw_sync_rate(storage: &Counted, count: u64) -> f64 {
    raw_sync_rate_threads(storage, 1, count, 4096)
}

/// The same from `threads` threads at once, each writing `bytes` (the
/// kernel then merges concurrent flushes: the device's own group commit).
fn raw_sync_rate_threads(storage: &Counted, threads: u64, per_thread: u64, bytes: usize) -> f64 {
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || {
                let block = vec![0x5au8; bytes];
                for i in 0..per_thread {
                    let slot = (t * per_thread + i) % 256;
                    storage
                        .write_at(&block, TARGETS + slot * bytes as u64)
                        .expect("write");
                    storage.flush().expect("flush");
                }
            });
        }
    });
    (threads * per_thread) as f64 / start.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map_or_else(std::env::temp_dir, Into::into);
    let scratch = tempfile::tempdir_in(&dir).expect("scratch dir");
    let storage = preallocated(scratch.path(), "journal.img");

    // Warm-up: the first fdatasyncs after preallocating are slow.
    commit_rate(&storage, CommitProtocol::SingleFlush, 1, 300);

    println!("# per commit, 1 thread, 4 KiB transactions, 512-byte journal blocks (interleaved rounds, medians)");
    let mut raw = Vec::new();
    let mut single = Vec::new();
    let mut two = Vec::new();
    let mut flushes = (0.0, 0.0);
    for _ in 0..ROUNDS {
        raw.push(raw_sync_rate(&storage, 300));
        let (rate, f, _) = commit_rate(&storage, CommitProtocol::SingleFlush, 1, 300);
        single.push(rate);
        flushes.0 = f;
        let (rate, f, _) = commit_rate(&storage, CommitProtocol::TwoFlush, 1, 300);
        two.push(rate);
        flushes.1 = f;
    }
    println!("raw 4 KiB pwrite + fdatasync: {:.0}/s", median(raw));
    println!(
        "SingleFlush: {:.2} flushes/commit, {:.0} commits/s",
        flushes.0,
        median(single)
    );
    println!(
        "TwoFlush: {:.2} flushes/commit, {:.0} commits/s",
        flushes.1,
        median(two)
    );

    println!("# group commit, single-flush protocol (1 vs 8 threads, interleaved rounds)");
    let mut one = Vec::new();
    let mut eight = Vec::new();
    let mut eight_no_gather = Vec::new();
    let mut ratios = Vec::new();
    let mut raw_ratios = Vec::new();
    let mut no_gather = options(CommitProtocol::SingleFlush);
    no_gather.group_commit_gather_max = Duration::ZERO;
    for _ in 0..ROUNDS {
        let (rate1, _, _) = commit_rate(&storage, CommitProtocol::SingleFlush, 1, 300);
        let (rate8, flushes8, batch8) = commit_rate(&storage, CommitProtocol::SingleFlush, 8, 150);
        let (rate8n, _, batch8n) = commit_rate_with(&storage, no_gather.clone(), 8, 150);
        // What a commit writes with 512-byte blocks: descriptor, 4 KiB, commit.
        let raw1 = raw_sync_rate_threads(&storage, 1, 300, 5120);
        let raw8 = raw_sync_rate_threads(&storage, 8, 150, 5120);
        raw_ratios.push(raw8 / raw1);
        println!(
            "  1 thread {rate1:.0}/s; 8 threads {rate8:.0}/s ({flushes8:.3} flushes/commit, {batch8:.1} commits/batch); \
             8 threads without gathering {rate8n:.0}/s ({batch8n:.1} commits/batch); \
             raw 5 KiB write+fdatasync 1 thread {raw1:.0}/s, 8 threads {raw8:.0}/s"
        );
        ratios.push(rate8 / rate1);
        one.push(rate1);
        eight.push(rate8);
        eight_no_gather.push(rate8n);
    }
    println!(
        "median: 1 thread {:.0} commits/s, 8 threads {:.0} commits/s (without gathering {:.0}), ratio of medians {:.1}x, median of ratios {:.1}x",
        median(one.clone()),
        median(eight.clone()),
        median(eight_no_gather),
        median(eight) / median(one),
        median(ratios)
    );
    println!(
        "reference: 8 threads of raw write+fdatasync reach {:.1}x one thread (median)",
        median(raw_ratios)
    );

    println!("# replay of a full 16 MiB journal (4 KiB blocks)");
    for data_blocks in [1usize, 15] {
        let mut opts = options(CommitProtocol::SingleFlush);
        opts.when_full = WhenFull::Fail;
        let journal =
            Journal::create(&storage, 0, JOURNAL_BYTES, REPLAY_BLOCK, opts).expect("create");
        let mut slot = 0u64;
        loop {
            let mut tx = Transaction::new();
            for _ in 0..data_blocks {
                tx.write(
                    TARGETS + (slot % 4096) * 4096,
                    &vec![(slot % 251) as u8; 4096],
                )
                .expect("valid write");
                slot += 1;
            }
            match journal.commit(tx) {
                Ok(_) => {}
                Err(JournalError::Full { .. }) => break,
                Err(e) => panic!("commit: {e}"),
            }
        }
        let fill = journal.fill();
        drop(journal);
        let mut times = Vec::new();
        let mut replayed = 0;
        for round in 0..3 {
            // Replay retires the log, so every round replays a fresh copy
            // of the full ring (read back from the file after round 0).
            let ring = {
                let mut bytes = vec![0u8; JOURNAL_BYTES as usize];
                storage.read_at(&mut bytes, 0).expect("read ring");
                bytes
            };
            let start = Instant::now();
            let (_, report) = Journal::open(
                &storage,
                0,
                JOURNAL_BYTES,
                options(CommitProtocol::SingleFlush),
                &mut NoDedup,
            )
            .expect("open");
            times.push(start.elapsed());
            replayed = report.transactions_replayed;
            storage.write_at(&ring, 0).expect("restore ring");
            storage.flush().expect("sync");
            let _ = round;
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{data_blocks} data block(s)/transaction: {} of {} blocks used, {replayed} transactions, replay median {:.1} ms (min {:.1}, max {:.1}), flushes included",
            fill.used_blocks,
            fill.ring_blocks,
            ms(times[1]),
            ms(times[0]),
            ms(times[2])
        );
    }
    println!(
        "total device flushes: {}",
        storage.flushes.load(Ordering::Relaxed)
    );
}
