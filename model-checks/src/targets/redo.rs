//! A tiny redo-logged disk: the harness's proof that it checks that
//! recovery is idempotent (check (d)).
//!
//! Layout: sector 0 is the redo header (magic, virtual size, valid flag,
//! guest sector, count, CRC); sectors 1..=128 the redo area; guest sector
//! `s` lives at byte `(129 + s) * 512`. A guest write of up to 128 sectors:
//! redo area, flush, header (valid), flush, home, flush, header (clear),
//! flush. Open replays a valid record to its home location, flushes, and
//! clears the header.
//!
//! Mutation `xor-delta` logs `old ^ new` instead of `new`, and replay XORs
//! it into the home sectors: replaying twice undoes the write. Every single
//! recovery leaves allowed content (old or new data of a write in flight),
//! so only a crash during recovery followed by a second recovery shows the
//! bug.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use qj_journal::Storage;

use crate::medium::SECTOR_BYTES;
use crate::target::{CheckSummary, CrashTarget, GuestDisk, TargetError};
use crate::targets::raw::{check_range, copy_backing};

const MAGIC: u64 = 0x4f44_4552_4a51_4a51; // "QJQJREDO"
const REDO_SECTORS: u64 = 128;
const HOME_START: u64 = (1 + REDO_SECTORS) * SECTOR_BYTES;
const SIZE_BYTES_MAX: u64 = 256 << 20;
const SECTOR: usize = SECTOR_BYTES as usize;
const HEADER_WORDS: usize = 5;

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedoTarget {
    /// Mutation: log and replay XOR deltas (not idempotent).
    pub xor_delta: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    size_bytes: u64,
    record: Option<(u64, u64)>,
}

fn word(buf: &[u8], index: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&buf[index * 8..index * 8 + 8]);
    u64::from_le_bytes(le)
}

fn encode(header: Header) -> [u8; SECTOR] {
    let (valid, first, count) = match header.record {
        Some((first, count)) => (1, first, count),
        None => (0, 0, 0),
    };
    let words = [MAGIC, header.size_bytes, valid, first, count];
    let mut sector = [0u8; SECTOR];
    for (i, w) in words.iter().enumerate() {
        sector[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
    }
    let crc = crc32c::crc32c(&sector[..HEADER_WORDS * 8]);
    sector[HEADER_WORDS * 8..HEADER_WORDS * 8 + 4].copy_from_slice(&crc.to_le_bytes());
    sector
}

fn read_header(dev: &dyn Storage) -> Result<Header, TargetError> {
    let mut sector = [0u8; SECTOR];
    dev.read_at(&mut sector, 0)?;
    let corrupt = |what: String, offset: u64| TargetError::Corrupt { what, offset };
    if word(&sector, 0) != MAGIC {
        return Err(corrupt(format!("header magic {:#x}", word(&sector, 0)), 0));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&sector[HEADER_WORDS * 8..HEADER_WORDS * 8 + 4]);
    if u32::from_le_bytes(crc) != crc32c::crc32c(&sector[..HEADER_WORDS * 8]) {
        return Err(corrupt("header CRC mismatch".to_string(), 40));
    }
    let size_bytes = word(&sector, 1);
    if !size_bytes.is_multiple_of(SECTOR_BYTES) || size_bytes > SIZE_BYTES_MAX {
        return Err(corrupt(format!("virtual size {size_bytes}"), 8));
    }
    let record = match word(&sector, 2) {
        0 => None,
        1 => {
            let (first, count) = (word(&sector, 3), word(&sector, 4));
            let fits = first
                .checked_add(count)
                .is_some_and(|end| end <= size_bytes / SECTOR_BYTES);
            if count == 0 || count > REDO_SECTORS || !fits {
                return Err(corrupt(format!("redo record range {first}+{count}"), 24));
            }
            Some((first, count))
        }
        other => return Err(corrupt(format!("valid flag {other}"), 16)),
    };
    Ok(Header { size_bytes, record })
}

fn xor_into(target: &mut [u8], delta: &[u8]) {
    for (t, d) in target.iter_mut().zip(delta) {
        *t ^= d;
    }
}

impl CrashTarget for RedoTarget {
    fn name(&self) -> String {
        "redo".to_string()
    }

    fn mutation(&self) -> Option<String> {
        self.xor_delta.then(|| "xor-delta".to_string())
    }

    fn create(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        virtual_size_bytes: u64,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        if !virtual_size_bytes.is_multiple_of(SECTOR_BYTES) || virtual_size_bytes > SIZE_BYTES_MAX {
            return Err(TargetError::Invalid(format!(
                "virtual size {virtual_size_bytes}"
            )));
        }
        if let Some(backing) = backing {
            let len = backing.len()?.min(virtual_size_bytes);
            copy_backing(&*backing, &*dev, len, HOME_START)?;
        }
        dev.write_at(
            &encode(Header {
                size_bytes: virtual_size_bytes,
                record: None,
            }),
            0,
        )?;
        // create() must return a durable image.
        dev.flush()?;
        Ok(Box::new(RedoDisk {
            dev,
            xor_delta: self.xor_delta,
            size_bytes: AtomicU64::new(virtual_size_bytes),
            writer: Mutex::new(()),
        }))
    }

    fn open(
        &self,
        dev: Arc<dyn Storage>,
        _backing: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        let header = read_header(&*dev)?;
        if let Some((first, count)) = header.record {
            let len = (count * SECTOR_BYTES) as usize;
            let mut redo = vec![0u8; len];
            dev.read_at(&mut redo, SECTOR_BYTES)?;
            let home = HOME_START + first * SECTOR_BYTES;
            if self.xor_delta {
                let mut current = vec![0u8; len];
                dev.read_at(&mut current, home)?;
                xor_into(&mut current, &redo);
                redo = current;
            }
            dev.write_at(&redo, home)?;
            // The replayed data must be durable before the record that
            // allows replaying it is cleared.
            dev.flush()?;
            dev.write_at(
                &encode(Header {
                    size_bytes: header.size_bytes,
                    record: None,
                }),
                0,
            )?;
            // The clear must be durable before the redo area is reused.
            dev.flush()?;
        }
        Ok(Box::new(RedoDisk {
            dev,
            xor_delta: self.xor_delta,
            size_bytes: AtomicU64::new(header.size_bytes),
            writer: Mutex::new(()),
        }))
    }

    fn check(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        match read_header(&*dev) {
            Ok(_) => Ok(CheckSummary::default()),
            Err(TargetError::Corrupt { .. }) => Ok(CheckSummary {
                corruptions: 1,
                leaks: 0,
            }),
            Err(other) => Err(other),
        }
    }

    fn leaks_allowed(&self) -> bool {
        false
    }
}

struct RedoDisk {
    dev: Arc<dyn Storage>,
    xor_delta: bool,
    size_bytes: AtomicU64,
    /// One redo area: writes (and resizes, which rewrite the header) go one
    /// at a time.
    writer: Mutex<()>,
}

impl RedoDisk {
    fn write_chunk(&self, data: &[u8], first: u64) -> Result<(), TargetError> {
        let size_bytes = self.size_bytes.load(Ordering::Acquire);
        let count = data.len() as u64 / SECTOR_BYTES;
        let home = HOME_START + first * SECTOR_BYTES;
        let logged = if self.xor_delta {
            let mut delta = vec![0u8; data.len()];
            self.dev.read_at(&mut delta, home)?;
            xor_into(&mut delta, data);
            delta
        } else {
            data.to_vec()
        };
        self.dev.write_at(&logged, SECTOR_BYTES)?;
        // The redo data must be durable before the header makes it valid.
        self.dev.flush()?;
        let header = |record| encode(Header { size_bytes, record });
        self.dev.write_at(&header(Some((first, count))), 0)?;
        // The record must be committed before home is overwritten, so that
        // a torn home write can be redone.
        self.dev.flush()?;
        self.dev.write_at(data, home)?;
        // Home must be durable before the record is cleared.
        self.dev.flush()?;
        self.dev.write_at(&header(None), 0)?;
        // The clear must be durable before the redo area is reused.
        self.dev.flush()?;
        Ok(())
    }
}

impl GuestDisk for RedoDisk {
    fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, buf.len() as u64)?;
        Ok(self.dev.read_at(buf, HOME_START + offset)?)
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, buf.len() as u64)?;
        if !offset.is_multiple_of(SECTOR_BYTES) || !buf.len().is_multiple_of(SECTOR) {
            return Err(TargetError::Invalid("unaligned write".to_string()));
        }
        let _writer = self.writer.lock();
        let chunk_bytes = (REDO_SECTORS * SECTOR_BYTES) as usize;
        for (i, chunk) in buf.chunks(chunk_bytes).enumerate() {
            let first = offset / SECTOR_BYTES + (i * chunk_bytes) as u64 / SECTOR_BYTES;
            self.write_chunk(chunk, first)?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        let len = usize::try_from(len_bytes)
            .map_err(|_| TargetError::Invalid(format!("length {len_bytes}")))?;
        self.write(&vec![0u8; len], offset)
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        check_range(self.size_bytes(), offset, len_bytes)
    }

    fn flush(&self) -> Result<(), TargetError> {
        // Every write is durable when it returns; this only orders.
        Ok(self.dev.flush()?)
    }

    fn resize(&self, new_size_bytes: u64) -> Result<(), TargetError> {
        if !new_size_bytes.is_multiple_of(SECTOR_BYTES) || new_size_bytes > SIZE_BYTES_MAX {
            return Err(TargetError::Invalid(format!("size {new_size_bytes}")));
        }
        let _writer = self.writer.lock();
        self.dev.write_at(
            &encode(Header {
                size_bytes: new_size_bytes,
                record: None,
            }),
            0,
        )?;
        self.dev.flush()?;
        self.size_bytes.store(new_size_bytes, Ordering::Release);
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<(), TargetError> {
        self.flush()
    }
}
