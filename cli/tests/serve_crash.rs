//! Crash through the front door: two clients write numbered 4 KiB blocks
//! over NBD, each write followed by a FLUSH or sent with FUA, while the
//! server is killed with SIGKILL at a random moment. After each kill the
//! server restarts on the same image and every block whose write a FLUSH
//! (or FUA) acknowledged must read back exactly; the one write in flight
//! per client may read as before or after. `qj check` finds no corruption
//! after each crash (and no leak on journal images), and `qemu-img check`
//! none on the flush-ordering images it can open; after a final clean
//! stop both checks pass. Every other round the killed server runs with
//! `--cache none` (`O_DIRECT`), whose file keeps space reserved past its
//! length (reading as zeros) until a clean close: a kill leaves it, and the
//! restarted server and both checkers must take it as free space.

mod nbd_client;
mod serve_common;
mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nbd_client::{Client, FLAG_FUA};
use serve_common::{create, qj, run, text, Server, BACKENDS};

const BLOCK_BYTES: usize = 4096;
/// Kills per backend.
const ROUNDS: usize = 20;
/// Writes per client per round at most (the kill comes much earlier).
const WRITES_MAX: u64 = 100_000;
const CLIENTS: u64 = 2;

/// Deterministic pseudo-random numbers (xorshift64*), seeded per run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The content of write number `seq` to block `slot`: both numbers, then
/// a pattern that differs from write to write.
fn block(seq: u64, slot: u64) -> Vec<u8> {
    let mut b = vec![(seq % 251) as u8 + 1; BLOCK_BYTES];
    b[0..8].copy_from_slice(&seq.to_le_bytes());
    b[8..16].copy_from_slice(&slot.to_le_bytes());
    b
}

/// What one client learned in one round.
#[derive(Default)]
struct Log {
    /// slot -> seq of the last write whose durability was acknowledged.
    durable: BTreeMap<u64, u64>,
    /// The write sent but not yet acknowledged durable when the server died.
    in_flight: Option<(u64, u64)>,
}

/// One client: writes to its own slots (slot % CLIENTS == id) until the
/// server dies. Even writes are followed by FLUSH, odd ones carry FUA.
fn writer(socket: &Path, id: u64, first_seq: u64, seed: u64, stop: &AtomicBool) -> Log {
    let mut log = Log::default();
    let Ok(mut c) = Client::connect(socket) else {
        return log;
    };
    let blocks = c.size / BLOCK_BYTES as u64;
    let mut rng = Rng(seed | 1);
    for n in 0..WRITES_MAX {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let seq = first_seq + n;
        let slot = rng.below(blocks / CLIENTS) * CLIENTS + id;
        let offset = slot * BLOCK_BYTES as u64;
        log.in_flight = Some((slot, seq));
        let fua = n % 2 == 1;
        let r = c
            .write(offset, &block(seq, slot), if fua { FLAG_FUA } else { 0 })
            .and_then(|()| if fua { Ok(()) } else { c.flush() });
        if r.is_err() {
            return log;
        }
        log.durable.insert(slot, seq);
        log.in_flight = None;
    }
    log
}

/// Reads every slot that must hold something and compares.
fn verify(socket: &Path, durable: &BTreeMap<u64, u64>, in_flight: &[(u64, u64)], context: &str) {
    let mut c = Client::connect(socket).unwrap();
    let mut slots: Vec<u64> = durable.keys().copied().collect();
    slots.extend(in_flight.iter().map(|(s, _)| *s));
    for slot in slots {
        let got = c
            .read(slot * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
            .unwrap();
        let before = durable
            .get(&slot)
            .map_or_else(|| vec![0u8; BLOCK_BYTES], |&seq| block(seq, slot));
        let pending = in_flight.iter().find(|(s, _)| *s == slot);
        let after = pending.map(|&(_, seq)| block(seq, slot));
        let got_seq = u64::from_le_bytes(got[0..8].try_into().unwrap());
        assert!(
            got == before || after.as_ref() == Some(&got),
            "{context}: slot {slot} holds write {got_seq}, want write {:?} (in flight: {pending:?})",
            durable.get(&slot)
        );
    }
    c.disconnect().unwrap();
}

/// `qj check` after a crash: no corruption (exit 0), or only leaks (exit
/// 3) where the backend may leak; `qemu-img check` likewise when it can
/// open the image (not while a journal is dirty: QEMU refuses that bit).
fn check_after_crash(dir: &Path, image: &str, journal: bool, context: &str) {
    let out = qj(dir, &["check", image]);
    let allowed: &[i32] = if journal { &[0] } else { &[0, 3] };
    assert!(
        allowed.contains(&out.status.code().unwrap_or(-1)),
        "{context}: qj check exit {:?}\n{}{}",
        out.status.code(),
        text(&out.stdout),
        text(&out.stderr)
    );
    if !journal {
        let out = run("qemu-img", &["check", "-f", "qcow2", image], dir);
        assert!(
            [0, 3].contains(&out.status.code().unwrap_or(-1)),
            "{context}: qemu-img check exit {:?}\n{}{}",
            out.status.code(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut rng = Rng(seed | 1);
    for (backend, opts) in BACKENDS {
        let journal = !opts.is_empty();
        // On the project's disk: /tmp may be tmpfs, which has no O_DIRECT.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let d = dir.path();
        let image = create(d, "a.qcow2", opts);
        let socket = d.join("s.sock");
        let mut durable: BTreeMap<u64, u64> = BTreeMap::new();
        let mut next_seq = 1u64;
        let mut writes_total = 0usize;
        for round in 0..ROUNDS {
            let cache = ["writeback", "none"][round % 2];
            let context = format!("{backend}, cache {cache}, seed {seed}, round {round}");
            let server = Server::start(&image, &socket, &["-t", "-e", "4", "--cache", cache]);
            let stop = Arc::new(AtomicBool::new(false));
            let writers: Vec<_> = (0..CLIENTS)
                .map(|id| {
                    let (socket, stop) = (socket.clone(), Arc::clone(&stop));
                    let first = next_seq + id * WRITES_MAX;
                    let seed = rng.next();
                    std::thread::spawn(move || writer(&socket, id, first, seed, &stop))
                })
                .collect();
            next_seq += CLIENTS * WRITES_MAX;
            std::thread::sleep(Duration::from_millis(5 + rng.below(80)));
            server.kill();
            stop.store(true, Ordering::SeqCst);
            let mut in_flight = Vec::new();
            for w in writers {
                let log = w.join().unwrap();
                writes_total += log.durable.len();
                durable.extend(log.durable);
                in_flight.extend(log.in_flight);
            }
            check_after_crash(d, "a.qcow2", journal, &context);
            let server = Server::start(&image, &socket, &["-t", "-e", "4"]);
            verify(&socket, &durable, &in_flight, &context);
            // What the in-flight writes left is what later rounds build on.
            let mut c = Client::connect(&socket).unwrap();
            for (slot, _) in in_flight {
                let got = c
                    .read(slot * BLOCK_BYTES as u64, BLOCK_BYTES as u32)
                    .unwrap();
                let seq = u64::from_le_bytes(got[0..8].try_into().unwrap());
                if got.iter().any(|&b| b != 0) {
                    durable.insert(slot, seq);
                } else {
                    durable.remove(&slot);
                }
            }
            c.flush().unwrap();
            c.disconnect().unwrap();
            server.stop();
        }
        assert!(
            writes_total >= ROUNDS,
            "{backend}: only {writes_total} acknowledged writes in {ROUNDS} rounds"
        );
        // At the end, after a clean stop: a journal image is clean for both
        // checkers (QEMU counts only the journal region as leaked); a
        // flush-ordering image may keep clusters leaked by the crashes,
        // never a corruption.
        if journal {
            serve_common::assert_clean(d, &image);
        } else {
            check_after_crash(d, "a.qcow2", false, backend);
        }
    }
}
