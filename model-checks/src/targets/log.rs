//! A tiny log-structured disk: the harness's proof that it sees ordering
//! bugs between a pointer and the data it points to.
//!
//! Layout: sector 0 is the superblock (magic, virtual size, end of the
//! valid log, CRC); from byte 512 on, records are appended: a header sector
//! (magic, guest sector, count, kind, CRC of the header) followed, for data
//! records, by the data sectors. Record data carries no checksum: only the
//! superblock says how much of the log is valid. Open scans the log up to
//! the superblock's end and rebuilds the map in memory.
//!
//! Correct flush: device flush (records durable), then superblock, then
//! device flush. Mutation `header-before-data` writes the superblock
//! before the records are durable, with one flush for both: after a crash
//! the superblock may point at records that never reached the medium.
//! Mutation `header-before-data-after-reopen` has the same bug only in a
//! disk that was opened after a crash, so only the continuation check (e)
//! can catch it.

use std::sync::Arc;

use parking_lot::Mutex;
use qj_journal::Storage;

use crate::medium::SECTOR_BYTES;
use crate::target::{CheckSummary, CrashTarget, GuestDisk, TargetError};
use crate::targets::raw::check_range;

const SUPER_MAGIC: u64 = 0x3142_5347_4f4c_4a51; // "QJLOGSB1"
const RECORD_MAGIC: u64 = 0x4345_5247_4f4c_4a51; // "QJLOGREC"
const LOG_START: u64 = SECTOR_BYTES;
/// Longest log accepted on open: bounds the scan.
const LOG_BYTES_MAX: u64 = 512 << 20;
/// Largest virtual size accepted on open: bounds the in-memory map.
const SIZE_BYTES_MAX: u64 = 256 << 20;
const KIND_DATA: u64 = 0;
const KIND_ZERO: u64 = 1;
const SECTOR: usize = SECTOR_BYTES as usize;

/// Which ordering bug, if any, the log target carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogMutation {
    /// Correct ordering.
    #[default]
    None,
    /// Superblock written before the records are durable.
    HeaderBeforeData,
    /// The same bug, only after a reopen.
    HeaderBeforeDataAfterReopen,
}

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct LogTarget {
    /// The injected bug.
    pub mutation: LogMutation,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mapping {
    Initial,
    Zero,
    At(u64),
}

fn word(buf: &[u8], index: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&buf[index * 8..index * 8 + 8]);
    u64::from_le_bytes(le)
}

fn put_word(buf: &mut [u8], index: usize, value: u64) {
    buf[index * 8..index * 8 + 8].copy_from_slice(&value.to_le_bytes());
}

fn sealed(words: &[u64]) -> [u8; SECTOR] {
    let mut sector = [0u8; SECTOR];
    for (i, &w) in words.iter().enumerate() {
        put_word(&mut sector, i, w);
    }
    let crc = crc32c::crc32c(&sector[..words.len() * 8]);
    put_word(&mut sector, words.len(), u64::from(crc));
    sector
}

fn seal_ok(sector: &[u8], words: usize) -> bool {
    word(sector, words) == u64::from(crc32c::crc32c(&sector[..words * 8]))
}

struct Scan {
    size_bytes: u64,
    log_end: u64,
    map: Vec<Mapping>,
}

fn corrupt(what: String, offset: u64) -> TargetError {
    TargetError::Corrupt { what, offset }
}

/// Reads the superblock and every record below its log end.
fn scan(dev: &dyn Storage) -> Result<Scan, TargetError> {
    let mut sector = [0u8; SECTOR];
    dev.read_at(&mut sector, 0)?;
    if word(&sector, 0) != SUPER_MAGIC {
        return Err(corrupt(
            format!("superblock magic {:#x}", word(&sector, 0)),
            0,
        ));
    }
    if !seal_ok(&sector, 3) {
        return Err(corrupt("superblock CRC mismatch".to_string(), 24));
    }
    let size_bytes = word(&sector, 1);
    let log_end = word(&sector, 2);
    if !size_bytes.is_multiple_of(SECTOR_BYTES) || size_bytes > SIZE_BYTES_MAX {
        return Err(corrupt(format!("virtual size {size_bytes}"), 8));
    }
    if !(LOG_START..=LOG_START + LOG_BYTES_MAX).contains(&log_end)
        || !log_end.is_multiple_of(SECTOR_BYTES)
    {
        return Err(corrupt(format!("log end {log_end}"), 16));
    }
    let sectors = size_bytes / SECTOR_BYTES;
    let mut map = vec![Mapping::Initial; sectors as usize];
    let mut at = LOG_START;
    // Every record advances by at least one sector and the log end is
    // bounded, so this loop is bounded.
    while at < log_end {
        dev.read_at(&mut sector, at)?;
        if word(&sector, 0) != RECORD_MAGIC || !seal_ok(&sector, 4) {
            return Err(corrupt("record header magic or CRC".to_string(), at));
        }
        let first = word(&sector, 1);
        let count = word(&sector, 2);
        let kind = word(&sector, 3);
        let in_range = first.checked_add(count).is_some_and(|end| end <= sectors) && count > 0;
        if !in_range {
            return Err(corrupt(format!("record range {first}+{count}"), at + 8));
        }
        let data_bytes = match kind {
            KIND_DATA => count * SECTOR_BYTES,
            KIND_ZERO => 0,
            other => return Err(corrupt(format!("record kind {other}"), at + 24)),
        };
        let end = at + SECTOR_BYTES + data_bytes;
        if end > log_end {
            return Err(corrupt(
                format!("record ends at {end} past the log end {log_end}"),
                at,
            ));
        }
        for i in 0..count {
            map[(first + i) as usize] = if kind == KIND_DATA {
                Mapping::At(at + SECTOR_BYTES * (1 + i))
            } else {
                Mapping::Zero
            };
        }
        at = end;
    }
    Ok(Scan {
        size_bytes,
        log_end,
        map,
    })
}

struct LogState {
    size_bytes: u64,
    tail: u64,
    map: Vec<Mapping>,
    /// What the last superblock written says (size, log end).
    superblock: (u64, u64),
}

struct LogDisk {
    dev: Arc<dyn Storage>,
    backing: Option<Arc<dyn Storage>>,
    backing_bytes: u64,
    header_before_data: bool,
    state: Mutex<LogState>,
}

impl LogTarget {
    fn disk(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        scan: Scan,
        reopened: bool,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        let backing_bytes = match &backing {
            Some(b) => b.len()?,
            None => 0,
        };
        let header_before_data = match self.mutation {
            LogMutation::None => false,
            LogMutation::HeaderBeforeData => true,
            LogMutation::HeaderBeforeDataAfterReopen => reopened,
        };
        Ok(Box::new(LogDisk {
            dev,
            backing,
            backing_bytes,
            header_before_data,
            state: Mutex::new(LogState {
                size_bytes: scan.size_bytes,
                tail: scan.log_end,
                map: scan.map,
                superblock: (scan.size_bytes, scan.log_end),
            }),
        }))
    }
}

impl CrashTarget for LogTarget {
    fn name(&self) -> String {
        "log".to_string()
    }

    fn mutation(&self) -> Option<String> {
        match self.mutation {
            LogMutation::None => None,
            LogMutation::HeaderBeforeData => Some("header-before-data".to_string()),
            LogMutation::HeaderBeforeDataAfterReopen => {
                Some("header-before-data-after-reopen".to_string())
            }
        }
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
        dev.write_at(&sealed(&[SUPER_MAGIC, virtual_size_bytes, LOG_START]), 0)?;
        // create() must return a durable image.
        dev.flush()?;
        let scan = Scan {
            size_bytes: virtual_size_bytes,
            log_end: LOG_START,
            map: vec![Mapping::Initial; (virtual_size_bytes / SECTOR_BYTES) as usize],
        };
        self.disk(dev, backing, scan, false)
    }

    fn open(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError> {
        let scan = scan(&*dev)?;
        self.disk(dev, backing, scan, true)
    }

    fn check(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        match scan(&*dev) {
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

impl LogDisk {
    fn append(&self, first: u64, count: u64, data: Option<&[u8]>) -> Result<(), TargetError> {
        let mut state = self.state.lock();
        check_range(state.size_bytes, first * SECTOR_BYTES, count * SECTOR_BYTES)?;
        let kind = if data.is_some() { KIND_DATA } else { KIND_ZERO };
        let header = sealed(&[RECORD_MAGIC, first, count, kind]);
        let data_bytes = data.map_or(0, |d| d.len() as u64);
        let end = state.tail + SECTOR_BYTES + data_bytes;
        if end > LOG_START + LOG_BYTES_MAX {
            return Err(TargetError::Invalid("log full".to_string()));
        }
        let mut record = Vec::with_capacity(SECTOR + data_bytes as usize);
        record.extend_from_slice(&header);
        if let Some(data) = data {
            record.extend_from_slice(data);
        }
        // Records are not durable here; the superblock will only point past
        // them after a flush has made them durable (see flush()).
        self.dev.write_at(&record, state.tail)?;
        let at = state.tail;
        for i in 0..count {
            state.map[(first + i) as usize] = if data.is_some() {
                Mapping::At(at + SECTOR_BYTES * (1 + i))
            } else {
                Mapping::Zero
            };
        }
        state.tail = end;
        Ok(())
    }
}

impl GuestDisk for LogDisk {
    fn size_bytes(&self) -> u64 {
        self.state.lock().size_bytes
    }

    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError> {
        let state = self.state.lock();
        check_range(state.size_bytes, offset, buf.len() as u64)?;
        if !offset.is_multiple_of(SECTOR_BYTES) || !buf.len().is_multiple_of(SECTOR) {
            return Err(TargetError::Invalid("unaligned read".to_string()));
        }
        for (i, sector_buf) in buf.chunks_exact_mut(SECTOR).enumerate() {
            let sector = offset / SECTOR_BYTES + i as u64;
            match state.map[sector as usize] {
                Mapping::At(at) => self.dev.read_at(sector_buf, at)?,
                Mapping::Zero => sector_buf.fill(0),
                Mapping::Initial => match &self.backing {
                    Some(b) if sector * SECTOR_BYTES < self.backing_bytes => {
                        b.read_at(sector_buf, sector * SECTOR_BYTES)?;
                    }
                    _ => sector_buf.fill(0),
                },
            }
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], offset: u64) -> Result<(), TargetError> {
        if !offset.is_multiple_of(SECTOR_BYTES)
            || !buf.len().is_multiple_of(SECTOR)
            || buf.is_empty()
        {
            return Err(TargetError::Invalid("unaligned write".to_string()));
        }
        self.append(
            offset / SECTOR_BYTES,
            buf.len() as u64 / SECTOR_BYTES,
            Some(buf),
        )
    }

    fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.append(offset / SECTOR_BYTES, len_bytes / SECTOR_BYTES, None)
    }

    fn discard(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError> {
        self.append(offset / SECTOR_BYTES, len_bytes / SECTOR_BYTES, None)
    }

    fn flush(&self) -> Result<(), TargetError> {
        let mut state = self.state.lock();
        let wanted = (state.size_bytes, state.tail);
        if wanted == state.superblock {
            return Ok(self.dev.flush()?);
        }
        let superblock = sealed(&[SUPER_MAGIC, wanted.0, wanted.1]);
        if self.header_before_data {
            // The injected bug: the superblock may reach the medium before
            // the records it points to.
            self.dev.write_at(&superblock, 0)?;
            self.dev.flush()?;
        } else {
            // Records must be durable before the superblock points past
            // them, or a crash leaves it pointing at garbage.
            self.dev.flush()?;
            self.dev.write_at(&superblock, 0)?;
            // The guest flush is complete only when the superblock is
            // durable: before, a crash would forget the flushed records.
            self.dev.flush()?;
        }
        state.superblock = wanted;
        Ok(())
    }

    fn resize(&self, new_size_bytes: u64) -> Result<(), TargetError> {
        let mut state = self.state.lock();
        if !new_size_bytes.is_multiple_of(SECTOR_BYTES) || new_size_bytes > SIZE_BYTES_MAX {
            return Err(TargetError::Invalid(format!("size {new_size_bytes}")));
        }
        if new_size_bytes < state.size_bytes {
            return Err(TargetError::Invalid(
                "shrinking is not supported".to_string(),
            ));
        }
        // The new size becomes durable with the next flush's superblock.
        state.size_bytes = new_size_bytes;
        let sectors = (new_size_bytes / SECTOR_BYTES) as usize;
        state.map.resize(sectors, Mapping::Zero);
        Ok(())
    }

    fn close(self: Box<Self>) -> Result<(), TargetError> {
        self.flush()
    }
}
