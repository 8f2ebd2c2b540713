//! Many threads on one `Arc<Image>` backed by a real file: writes, reads,
//! write-zeroes, discards and flushes on regions each thread owns and on a
//! region all of them share, with a metadata cache small enough that
//! write-back and eviction happen under the load.
//!
//! Owned regions must match each thread's model byte for byte. In the
//! shared region a 512-byte sector may hold any value some thread wrote to
//! it (or zero), but never a mix: every write and zeroing there is
//! sector-aligned. QEMU must find the closed image clean and see the same.
//!
//! The same load runs on a journalled image with logged data, a small ring
//! and checkpoints on their own thread (`OpenOptions::background_checkpoint`,
//! as `qj serve` opens images): checkpoints then write tables in place and
//! empty the journal's overlay while the threads allocate, read tables the
//! cache evicted, and flush.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::thread;

use common::*;
use qj_engine::{CreateOptions, Image, JournalConfig, OpenOptions};

const THREADS: u64 = 8;
const CLUSTER: u64 = 4096;
const SECTOR: u64 = 512;
/// Each thread's own region.
const OWN_BYTES: u64 = 512 << 10;
/// The region every thread writes, after the owned regions.
const SHARED_START: u64 = THREADS * OWN_BYTES;
const SHARED_BYTES: u64 = 256 << 10;
const DISK: u64 = SHARED_START + SHARED_BYTES;
const OPS_PER_THREAD: u64 = 600;
/// Sessions (open, run every thread, close) on the same file.
const SESSIONS: u64 = 3;
const WRITE_BYTES_MAX: u64 = 40 << 10;

#[test]
fn image_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Image>();
    assert_send_sync::<Arc<Image>>();
}

/// What one thread did: its owned region's content, and every value it put
/// in shared sectors (sector index relative to the shared region, value).
struct ThreadLog {
    own: Vec<u8>,
    shared_values: Vec<(u64, u8)>,
}

/// A pattern byte no other thread uses: thread `t` writes values whose low
/// 3 bits are `t`, never zero (zero is what zeroing writes).
fn value(thread: u64, rng: &mut Rng) -> u8 {
    let v = ((rng.below(31) + 1) << 3 | thread) as u8;
    assert_ne!(v, 0);
    v
}

/// Whole clusters inside `[offset, offset + len)`: what a discard releases.
fn whole_clusters(offset: u64, len: u64) -> Option<(u64, u64)> {
    let start = offset.next_multiple_of(CLUSTER);
    let end = (offset + len) / CLUSTER * CLUSTER;
    (end > start).then_some((start, end))
}

fn worker(image: &Image, thread: u64, session: u64, mut own: Vec<u8>) -> ThreadLog {
    let mut rng = Rng::new(0x5eed_0000 + session * THREADS + thread);
    let base = thread * OWN_BYTES;
    let mut shared_values = Vec::new();
    let own_range = |rng: &mut Rng| {
        let offset = rng.below(OWN_BYTES);
        let len = (rng.below(WRITE_BYTES_MAX) + 1).min(OWN_BYTES - offset);
        (offset, len)
    };
    let shared_sectors = |rng: &mut Rng| {
        let sectors = SHARED_BYTES / SECTOR;
        let first = rng.below(sectors);
        let count = (rng.below(WRITE_BYTES_MAX / SECTOR) + 1).min(sectors - first);
        (first, count)
    };
    for op in 0..OPS_PER_THREAD {
        let ctx = |what: &str| format!("session {session}, thread {thread}, op {op}: {what}");
        match rng.below(100) {
            0..=39 => {
                let (offset, len) = own_range(&mut rng);
                let v = value(thread, &mut rng);
                image
                    .write(&vec![v; len as usize], base + offset)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("write")));
                own[offset as usize..(offset + len) as usize].fill(v);
            }
            40..=54 => {
                let (offset, len) = own_range(&mut rng);
                let mut buf = vec![0u8; len as usize];
                image
                    .read(&mut buf, base + offset)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("read")));
                assert_same_disk(
                    &buf,
                    &own[offset as usize..(offset + len) as usize],
                    &ctx(&format!("read of own bytes at {offset} len {len}")),
                );
            }
            55..=62 => {
                let (offset, len) = own_range(&mut rng);
                image
                    .write_zeroes(base + offset, len)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("write_zeroes")));
                own[offset as usize..(offset + len) as usize].fill(0);
            }
            63..=69 => {
                let (offset, len) = own_range(&mut rng);
                image
                    .discard(base + offset, len)
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("discard")));
                // Whole clusters read as zeros; partial ones are left alone.
                if let Some((start, end)) = whole_clusters(offset, len) {
                    own[start as usize..end as usize].fill(0);
                }
            }
            70..=89 => {
                let (first, count) = shared_sectors(&mut rng);
                let v = value(thread, &mut rng);
                image
                    .write(
                        &vec![v; (count * SECTOR) as usize],
                        SHARED_START + first * SECTOR,
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", ctx("shared write")));
                shared_values.extend((first..first + count).map(|s| (s, v)));
            }
            90..=94 => {
                let (first, count) = shared_sectors(&mut rng);
                let (offset, len) = (SHARED_START + first * SECTOR, count * SECTOR);
                if rng.below(2) == 0 {
                    image
                        .write_zeroes(offset, len)
                        .unwrap_or_else(|e| panic!("{}: {e}", ctx("shared zero")));
                } else {
                    image
                        .discard(offset, len)
                        .unwrap_or_else(|e| panic!("{}: {e}", ctx("shared discard")));
                }
                // Zero is allowed in every shared sector anyway.
            }
            _ => image
                .flush()
                .unwrap_or_else(|e| panic!("{}: {e}", ctx("flush"))),
        }
    }
    ThreadLog { own, shared_values }
}

/// Owned regions equal their models; each shared sector is uniform and
/// holds zero or a value some thread wrote to it.
fn assert_disk_consistent(disk: &[u8], logs: &[ThreadLog], allowed: &[BTreeSet<u8>], when: &str) {
    assert_eq!(disk.len() as u64, DISK, "{when}: disk size");
    for (t, log) in logs.iter().enumerate() {
        let base = t * OWN_BYTES as usize;
        assert_same_disk(
            &disk[base..base + OWN_BYTES as usize],
            &log.own,
            &format!("{when}: thread {t}'s region"),
        );
    }
    let shared = &disk[SHARED_START as usize..];
    for (s, sector) in shared.chunks(SECTOR as usize).enumerate() {
        let v = sector[0];
        assert!(
            sector.iter().all(|&b| b == v),
            "{when}: shared sector {s} is torn: {:02x?}",
            sector.iter().collect::<BTreeSet<_>>()
        );
        assert!(
            v == 0 || allowed[s].contains(&v),
            "{when}: shared sector {s} holds {v:#04x}, which no thread wrote there"
        );
    }
}

/// One session: open, run every thread from the disk content `before`,
/// check, close. Returns the logs and each shared sector's allowed values
/// (what it held before, zero, and what any thread wrote there).
fn run_threads(
    path: &Path,
    session: u64,
    before: &[u8],
    journalled: bool,
) -> (Vec<ThreadLog>, Vec<BTreeSet<u8>>) {
    let mut opts = OpenOptions::read_write();
    opts.background_checkpoint = journalled;
    // A handful of tables per cache: eviction and write-back run while
    // other threads allocate, look up and free.
    opts.cache_bytes_max = 8 * CLUSTER;
    let image = Arc::new(Image::open_path(path, &opts).expect("open"));
    let synced_seq = |image: &Image| {
        image
            .info()
            .expect("info")
            .journal
            .map_or(0, |journal| journal.synced_seq)
    };
    let synced_at_open = synced_seq(&image);
    let logs: Vec<ThreadLog> = thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let image = Arc::clone(&image);
                let base = (t * OWN_BYTES) as usize;
                let own = before[base..base + OWN_BYTES as usize].to_vec();
                scope.spawn(move || worker(&image, t, session, own))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .collect()
    });
    let mut allowed: Vec<BTreeSet<u8>> = before[SHARED_START as usize..]
        .chunks(SECTOR as usize)
        .map(|sector| BTreeSet::from([sector[0]]))
        .collect();
    for log in &logs {
        for &(s, v) in &log.shared_values {
            allowed[s as usize].insert(v);
        }
    }
    assert_disk_consistent(&read_all(&image), &logs, &allowed, "before close");
    assert!(
        !journalled || synced_seq(&image) > synced_at_open,
        "no checkpoint ran during the load, so none raced it"
    );
    let image = Arc::into_inner(image).expect("every thread is done");
    image.close().expect("close");
    (logs, allowed)
}

#[test]
fn eight_threads_on_one_image() {
    eight_threads(None);
}

#[test]
fn eight_threads_on_a_journalled_image_with_background_checkpoints() {
    eight_threads(Some(JournalConfig {
        // Small, so that the load makes many checkpoints.
        size_bytes: 256 << 10,
        two_flush: false,
        log_data: true,
        dedup: false,
    }));
}

fn eight_threads(journal: Option<JournalConfig>) {
    let journalled = journal.is_some();
    let dir = temp_dir();
    let path = in_dir(&dir, "shared.qcow2");
    Image::create_path(
        &path,
        &CreateOptions {
            virtual_size: DISK,
            cluster_size: CLUSTER,
            refcount_bits: 16,
            journal,
            ..CreateOptions::default()
        },
    )
    .expect("create");
    let mut disk = vec![0u8; DISK as usize];
    for session in 0..SESSIONS {
        let (logs, allowed) = run_threads(&path, session, &disk, journalled);
        let when = |what: &str| format!("session {session}: {what}");
        assert_checks_clean(&path, &when("after close"));
        let qemu = convert_raw(&path, None);
        assert_disk_consistent(&qemu, &logs, &allowed, &when("qemu-img convert"));
        let reopened = Image::open_path(&path, &OpenOptions::read_only()).expect("reopen");
        disk = read_all(&reopened);
        drop(reopened);
        assert_disk_consistent(&disk, &logs, &allowed, &when("after reopen"));
        assert_same_disk(&disk, &qemu, &when("our read vs qemu-img convert"));
    }
    // QEMU's own reader agrees with every byte.
    assert_qemu_io_sees(&path, &disk);
}
