//! Test helpers: a device with a volatile write cache that can lose any
//! subset of unflushed writes (torn per 512-byte sector) and a power cut at
//! any device operation; a tiny deterministic RNG; patterns.

#![allow(dead_code)]

use std::io;

use parking_lot::Mutex;
use qj_journal::Storage;

/// Sector size of the crash model: a power loss keeps or drops each
/// 512-byte sector of an unflushed write as a whole.
pub const SECTOR: u64 = 512;

#[derive(Debug, Default)]
struct Inner {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    ops: u64,
    crash_at: Option<u64>,
    crashed: bool,
    flushes: u64,
}

/// A device whose writes sit in a volatile cache until a flush.
#[derive(Debug, Default)]
pub struct CrashDevice {
    inner: Mutex<Inner>,
}

fn apply(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset as usize..end].copy_from_slice(data);
}

impl CrashDevice {
    /// A device whose durable content is `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                durable: bytes,
                ..Inner::default()
            }),
        }
    }

    /// Makes the `op`-th device operation from now (1-based; reads do not
    /// count) fail as a power cut: it and everything after it fail.
    pub fn crash_at(&self, op: u64) {
        let mut inner = self.inner.lock();
        inner.crash_at = Some(inner.ops + op);
    }

    /// Device operations (writes and flushes) so far.
    pub fn ops(&self) -> u64 {
        self.inner.lock().ops
    }

    /// Flushes so far.
    pub fn flushes(&self) -> u64 {
        self.inner.lock().flushes
    }

    /// Whether the power cut happened.
    pub fn crashed(&self) -> bool {
        self.inner.lock().crashed
    }

    /// Unflushed writes, split into sectors: (offset, bytes) in issue order.
    pub fn pending_sectors(&self) -> Vec<(u64, Vec<u8>)> {
        let inner = self.inner.lock();
        let mut out = Vec::new();
        for (offset, data) in &inner.pending {
            let mut at = *offset;
            let end = offset + data.len() as u64;
            while at < end {
                let next = ((at / SECTOR) + 1) * SECTOR;
                let piece_end = next.min(end);
                out.push((
                    at,
                    data[(at - offset) as usize..(piece_end - offset) as usize].to_vec(),
                ));
                at = piece_end;
            }
        }
        out
    }

    /// The durable content plus the unflushed sectors `keep` selects (in
    /// issue order): what the disk may hold after the power cut.
    pub fn image_after_crash(&self, keep: &dyn Fn(usize) -> bool) -> Vec<u8> {
        let mut bytes = self.inner.lock().durable.clone();
        for (i, (offset, data)) in self.pending_sectors().into_iter().enumerate() {
            if keep(i) {
                apply(&mut bytes, offset, &data);
            }
        }
        bytes
    }

    /// What reads see now (cache included).
    pub fn current(&self) -> Vec<u8> {
        let inner = self.inner.lock();
        let mut bytes = inner.durable.clone();
        for (offset, data) in &inner.pending {
            apply(&mut bytes, *offset, data);
        }
        bytes
    }

    fn op(inner: &mut Inner) -> io::Result<()> {
        if inner.crashed {
            return Err(io::Error::other("power lost"));
        }
        inner.ops += 1;
        if inner.crash_at == Some(inner.ops) {
            inner.crashed = true;
            return Err(io::Error::other("power lost"));
        }
        Ok(())
    }
}

impl Storage for CrashDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let inner = self.inner.lock();
        buf.fill(0);
        let read_end = offset + buf.len() as u64;
        let mut copy = |at: u64, data: &[u8]| {
            let end = at + data.len() as u64;
            let from = at.max(offset);
            let to = end.min(read_end);
            if from < to {
                buf[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&data[(from - at) as usize..(to - at) as usize]);
            }
        };
        copy(0, &inner.durable);
        for (at, data) in &inner.pending {
            copy(*at, data);
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        Self::op(&mut inner)?;
        inner.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut inner = self.inner.lock();
        Self::op(&mut inner)?;
        let pending = std::mem::take(&mut inner.pending);
        for (offset, data) in pending {
            apply(&mut inner.durable, offset, &data);
        }
        inner.flushes += 1;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let inner = self.inner.lock();
        let pending_end = inner
            .pending
            .iter()
            .map(|(o, d)| o + d.len() as u64)
            .max()
            .unwrap_or(0);
        Ok(pending_end.max(inner.durable.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut inner = self.inner.lock();
        Self::op(&mut inner)?;
        let len = len as usize;
        inner.durable.resize(len, 0);
        for (offset, data) in inner.pending.iter_mut() {
            let end = (*offset as usize).saturating_add(data.len());
            if end > len {
                data.truncate(len.saturating_sub(*offset as usize));
            }
        }
        Ok(())
    }
}

/// A device that counts flushes on top of memory.
#[derive(Debug, Default)]
pub struct CountingDevice {
    pub bytes: qj_journal::MemStorage,
    pub flushes: std::sync::atomic::AtomicU64,
    pub writes: std::sync::atomic::AtomicU64,
}

impl Storage for CountingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.bytes.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bytes.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        self.bytes.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.set_len(len)
    }
}

/// xorshift64*: deterministic, seedable, good enough to pick subsets.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// `len` bytes that depend on `tag`, so that writes of different tags can
/// be told apart.
pub fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| tag.wrapping_mul(31).wrapping_add((i % 251) as u8) ^ tag)
        .collect()
}
