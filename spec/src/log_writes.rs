//! The dm-log-writes log format (Linux `drivers/md/dm-log-writes.c`, read
//! by xfstests' `replay-log`, written by QEMU's `blklogwrites` filter), as
//! pure code: encoders and a decoder with no I/O.
//!
//! All fields are little-endian. Sector 0 of the log holds the super block
//! (`magic`, `version`, `nr_entries`, `sectorsize`), zero-padded to one log
//! sector. Every entry then takes one log sector for its header (`sector`,
//! `nr_sectors`, `flags`, `data_len`), zero-padded, followed by
//! `nr_sectors` log sectors of data, except for a discard, whose range
//! carries no data. A MARK entry's label sits right after its header in
//! the same sector (`data_len` bytes). `sector` and `nr_sectors` count
//! sectors of `sectorsize` bytes on the logged device.
//!
//! The decoder applies xfstests' rules strictly, since a checker that
//! guesses at a damaged log judges states that never existed: padding is
//! zero, no entry is empty (no flags and no sectors), only data-less MARK
//! entries carry a label, and the METADATA flag (16) of newer kernels is
//! refused, as QEMU refuses it. Every error names the entry's index and the
//! byte offset of its header in the log.

use std::fmt;

/// `log_write_super.magic`.
pub const MAGIC: u64 = 0x006a_7366_7773_6872;
/// `log_write_super.version`: the only version there is.
pub const VERSION: u64 = 1;
/// The flush flag: everything completed before this entry is durable.
pub const FLAG_FLUSH: u64 = 1;
/// Forced unit access: this entry's data is durable when it completes.
pub const FLAG_FUA: u64 = 2;
/// A discard of the range; no data follows in the log.
pub const FLAG_DISCARD: u64 = 4;
/// A label for replay tools; the label follows the header.
pub const FLAG_MARK: u64 = 8;
/// Newer kernels tag metadata writes with it; QEMU refuses it, and so do we.
pub const FLAG_METADATA: u64 = 16;
/// Every flag this decoder accepts.
pub const FLAGS_KNOWN: u64 = FLAG_FLUSH | FLAG_FUA | FLAG_DISCARD | FLAG_MARK;

/// Encoded size of the super block before its padding.
pub const SUPER_BYTES: usize = 28;
/// Encoded size of an entry header before its padding (or label).
pub const ENTRY_BYTES: usize = 32;
/// Smallest log sector accepted: an entry header must fit.
pub const SECTOR_BYTES_MIN: u32 = 512;
/// Largest log sector accepted (QEMU's limit is below 16 MiB; the kernel
/// uses the device's logical block size, at most 64 KiB in practice).
pub const SECTOR_BYTES_MAX: u32 = 1 << 16;

/// Why a log could not be decoded. Entry errors name the entry's index
/// (from 0) and the byte offset of its header sector in the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The super block is malformed.
    #[error("dm-log-writes super block: field `{field}` at byte {offset}: {reason}")]
    Super {
        /// The field holding the bad value.
        field: &'static str,
        /// Byte offset of the field in the log.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry is malformed.
    #[error("dm-log-writes entry {index} at byte {offset}: {reason}")]
    Entry {
        /// The entry's index, from 0.
        index: u64,
        /// Byte offset of the entry's header sector in the log.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
}

impl LogError {
    fn entry(index: u64, offset: u64, reason: impl Into<String>) -> Self {
        LogError::Entry {
            index,
            offset,
            reason: reason.into(),
        }
    }
}

/// The super block: how many entries the log holds and its sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSuper {
    /// Entries that are complete in the log (writers update this at each
    /// flush; entries past it are not part of the log).
    pub nr_entries: u64,
    /// Bytes per log sector and per device sector of `sector`/`nr_sectors`.
    pub sector_bytes: u32,
}

fn le64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl LogSuper {
    /// The super block's sector: fields, then zeros to `sector_bytes`.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut sector = vec![0u8; self.sector_bytes as usize];
        sector[0..8].copy_from_slice(&MAGIC.to_le_bytes());
        sector[8..16].copy_from_slice(&VERSION.to_le_bytes());
        sector[16..24].copy_from_slice(&self.nr_entries.to_le_bytes());
        sector[24..28].copy_from_slice(&self.sector_bytes.to_le_bytes());
        sector
    }

    /// Decodes the super block from the start of `log` (which must hold at
    /// least its whole first sector).
    pub fn decode(log: &[u8]) -> Result<Self, LogError> {
        let bad = |field, offset, reason: String| LogError::Super {
            field,
            offset,
            reason,
        };
        if log.len() < SUPER_BYTES {
            return Err(bad(
                "magic",
                0,
                format!(
                    "the log is {} bytes, shorter than a super block ({SUPER_BYTES})",
                    log.len()
                ),
            ));
        }
        let magic = le64(log, 0);
        if magic != MAGIC {
            return Err(bad(
                "magic",
                0,
                format!("{magic:#x} is not the dm-log-writes magic {MAGIC:#x}"),
            ));
        }
        let version = le64(log, 8);
        if version != VERSION {
            return Err(bad(
                "version",
                8,
                format!("version {version} is not supported (only {VERSION})"),
            ));
        }
        let nr_entries = le64(log, 16);
        let mut size = [0u8; 4];
        size.copy_from_slice(&log[24..28]);
        let sector_bytes = u32::from_le_bytes(size);
        if !sector_bytes.is_power_of_two()
            || !(SECTOR_BYTES_MIN..=SECTOR_BYTES_MAX).contains(&sector_bytes)
        {
            return Err(bad(
                "sectorsize",
                24,
                format!(
                    "{sector_bytes} is not a power of two from {SECTOR_BYTES_MIN} to {SECTOR_BYTES_MAX}"
                ),
            ));
        }
        let sector_end = sector_bytes as usize;
        if log.len() < sector_end {
            return Err(bad(
                "sectorsize",
                24,
                format!(
                    "the log is {} bytes, shorter than its first sector ({sector_bytes})",
                    log.len()
                ),
            ));
        }
        if let Some(at) = log[SUPER_BYTES..sector_end].iter().position(|&b| b != 0) {
            return Err(bad(
                "padding",
                (SUPER_BYTES + at) as u64,
                "padding after the super block is not zero".into(),
            ));
        }
        Ok(Self {
            nr_entries,
            sector_bytes,
        })
    }
}

/// One entry header (`struct log_write_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogEntry {
    /// First device sector the entry touches.
    pub sector: u64,
    /// Device sectors it touches (data follows unless it is a discard).
    pub nr_sectors: u64,
    /// `FLAG_*` bits.
    pub flags: u64,
    /// Bytes of MARK label after the header; 0 for any other entry.
    pub data_len: u64,
}

impl LogEntry {
    /// A write of `nr_sectors` sectors at `sector` (the data follows).
    #[must_use]
    pub fn write(sector: u64, nr_sectors: u64) -> Self {
        Self {
            sector,
            nr_sectors,
            flags: 0,
            data_len: 0,
        }
    }

    /// A flush with no data.
    #[must_use]
    pub fn flush() -> Self {
        Self {
            sector: 0,
            nr_sectors: 0,
            flags: FLAG_FLUSH,
            data_len: 0,
        }
    }

    /// A discard of `nr_sectors` sectors at `sector` (no data follows).
    #[must_use]
    pub fn discard(sector: u64, nr_sectors: u64) -> Self {
        Self {
            sector,
            nr_sectors,
            flags: FLAG_DISCARD,
            data_len: 0,
        }
    }

    /// Whether this entry carries `flag`.
    #[must_use]
    pub fn has(&self, flag: u64) -> bool {
        self.flags & flag != 0
    }

    /// Log sectors of data that follow the header.
    #[must_use]
    pub fn data_sectors(&self) -> u64 {
        if self.has(FLAG_DISCARD) {
            0
        } else {
            self.nr_sectors
        }
    }

    /// The header sector of this entry, with `label` after the fields (a
    /// MARK's label; empty for any other entry). `data_len` is set from
    /// `label`. Fails if the label does not fit in the sector.
    pub fn encode(&self, label: &[u8], sector_bytes: u32) -> Result<Vec<u8>, LogError> {
        let room = sector_bytes as usize - ENTRY_BYTES;
        if label.len() > room {
            return Err(LogError::entry(
                0,
                0,
                format!(
                    "a label of {} bytes does not fit in a {sector_bytes}-byte sector after the header ({room} bytes free)",
                    label.len()
                ),
            ));
        }
        let mut sector = vec![0u8; sector_bytes as usize];
        sector[0..8].copy_from_slice(&self.sector.to_le_bytes());
        sector[8..16].copy_from_slice(&self.nr_sectors.to_le_bytes());
        sector[16..24].copy_from_slice(&self.flags.to_le_bytes());
        sector[24..32].copy_from_slice(&(label.len() as u64).to_le_bytes());
        sector[ENTRY_BYTES..ENTRY_BYTES + label.len()].copy_from_slice(label);
        Ok(sector)
    }

    /// A MARK entry's header sector carrying `label`.
    pub fn encode_mark(label: &str, sector_bytes: u32) -> Result<Vec<u8>, LogError> {
        Self {
            sector: 0,
            nr_sectors: 0,
            flags: FLAG_MARK,
            data_len: 0,
        }
        .encode(label.as_bytes(), sector_bytes)
    }
}

/// What an entry does, decoded and validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A flush, with no data.
    Flush,
    /// A write; a FLUSH flag on it means a flush before the write (the
    /// kernel's PREFLUSH), FUA that the write is durable when it completes.
    Write {
        /// Flush before the write.
        preflush: bool,
        /// Durable on completion.
        fua: bool,
    },
    /// A discard of the range.
    Discard,
    /// A label.
    Mark,
}

/// One decoded entry: where it sits in the log and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedEntry {
    /// Index from 0.
    pub index: u64,
    /// Byte offset of its header sector in the log.
    pub log_offset: u64,
    /// The header.
    pub header: LogEntry,
    /// What it does.
    pub kind: EntryKind,
    /// A MARK's label (lossy UTF-8); empty otherwise.
    pub label: String,
    /// Byte range of its data in the log (empty without data).
    pub data: std::ops::Range<usize>,
}

impl DecodedEntry {
    /// Byte offset on the logged device.
    #[must_use]
    pub fn device_offset(&self, sector_bytes: u32) -> u64 {
        self.header.sector * u64::from(sector_bytes)
    }

    /// Bytes on the logged device.
    #[must_use]
    pub fn device_len(&self, sector_bytes: u32) -> u64 {
        self.header.nr_sectors * u64::from(sector_bytes)
    }
}

impl fmt::Display for DecodedEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            EntryKind::Flush => write!(f, "flush"),
            EntryKind::Mark => write!(f, "mark {:?}", self.label),
            EntryKind::Discard => write!(
                f,
                "discard sectors {}+{}",
                self.header.sector, self.header.nr_sectors
            ),
            EntryKind::Write { preflush, fua } => write!(
                f,
                "write sectors {}+{}{}{}",
                self.header.sector,
                self.header.nr_sectors,
                if preflush { " (preflush)" } else { "" },
                if fua { " (fua)" } else { "" }
            ),
        }
    }
}

/// A whole log held in memory, decoded and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedLog {
    /// The super block.
    pub super_block: LogSuper,
    /// Its `nr_entries` entries, in log order.
    pub entries: Vec<DecodedEntry>,
}

/// Decodes one entry whose header sector starts at `offset` in `log`.
fn decode_entry(
    log: &[u8],
    index: u64,
    offset: u64,
    sector_bytes: u32,
) -> Result<DecodedEntry, LogError> {
    let err = |reason: String| LogError::entry(index, offset, reason);
    let sector_len = sector_bytes as usize;
    let start = usize::try_from(offset).map_err(|_| err("offset too large".into()))?;
    let Some(header_sector) = start
        .checked_add(sector_len)
        .and_then(|end| log.get(start..end))
    else {
        return Err(err(format!(
            "truncated: the header sector needs {sector_bytes} bytes, the log has {} left",
            log.len().saturating_sub(start)
        )));
    };
    let header = LogEntry {
        sector: le64(header_sector, 0),
        nr_sectors: le64(header_sector, 8),
        flags: le64(header_sector, 16),
        data_len: le64(header_sector, 24),
    };
    if header.has(FLAG_METADATA) {
        return Err(err(format!(
            "flags {:#x}: the METADATA flag (16) is not supported (QEMU refuses it too)",
            header.flags
        )));
    }
    if header.flags & !FLAGS_KNOWN != 0 {
        return Err(err(format!("unknown flags {:#x}", header.flags)));
    }
    if header.flags == 0 && header.nr_sectors == 0 {
        return Err(err("empty entry: no flags and no sectors".into()));
    }
    let room = (sector_bytes as usize - ENTRY_BYTES) as u64;
    let label_len = if header.has(FLAG_MARK) {
        if header.flags != FLAG_MARK || header.nr_sectors != 0 {
            return Err(err(format!(
                "a MARK entry carries flags {:#x} and {} sectors; a mark is a label only",
                header.flags, header.nr_sectors
            )));
        }
        if header.data_len > room {
            return Err(err(format!(
                "mark label of {} bytes does not fit in the sector ({room} bytes free)",
                header.data_len
            )));
        }
        header.data_len as usize
    } else {
        if header.data_len != 0 {
            return Err(err(format!(
                "data_len {} on an entry that is not a MARK",
                header.data_len
            )));
        }
        0
    };
    if header.has(FLAG_DISCARD) && (header.has(FLAG_FLUSH) || header.nr_sectors == 0) {
        return Err(err(format!(
            "a discard with flags {:#x} and {} sectors",
            header.flags, header.nr_sectors
        )));
    }
    let label_end = ENTRY_BYTES + label_len;
    if let Some(at) = header_sector[label_end..].iter().position(|&b| b != 0) {
        return Err(err(format!(
            "padding at byte {} of the header sector is not zero",
            label_end + at
        )));
    }
    let label = String::from_utf8_lossy(&header_sector[ENTRY_BYTES..label_end]).into_owned();
    let data_bytes = header
        .data_sectors()
        .checked_mul(u64::from(sector_bytes))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| err(format!("{} data sectors overflow", header.nr_sectors)))?;
    let data_start = start + sector_len;
    let data_end = data_start
        .checked_add(data_bytes)
        .filter(|&end| end <= log.len())
        .ok_or_else(|| {
            err(format!(
                "truncated: {data_bytes} bytes of data, the log has {} left",
                log.len().saturating_sub(data_start)
            ))
        })?;
    header
        .sector
        .checked_add(header.nr_sectors)
        .and_then(|end| end.checked_mul(u64::from(sector_bytes)))
        .ok_or_else(|| {
            err(format!(
                "sectors {}+{} overflow a 64-bit byte offset",
                header.sector, header.nr_sectors
            ))
        })?;
    let kind = if header.has(FLAG_MARK) {
        EntryKind::Mark
    } else if header.has(FLAG_DISCARD) {
        EntryKind::Discard
    } else if header.nr_sectors == 0 {
        if header.has(FLAG_FUA) {
            return Err(err("a FUA flag on an entry with no data".into()));
        }
        EntryKind::Flush
    } else {
        EntryKind::Write {
            preflush: header.has(FLAG_FLUSH),
            fua: header.has(FLAG_FUA),
        }
    };
    Ok(DecodedEntry {
        index,
        log_offset: offset,
        header,
        kind,
        label,
        data: data_start..data_end,
    })
}

/// Decodes a whole log: the super block, then exactly `nr_entries`
/// entries. Bytes past the last counted entry are ignored (a writer that
/// crashed after the last flush left them; they are not part of the log).
pub fn decode_log(log: &[u8]) -> Result<DecodedLog, LogError> {
    let super_block = LogSuper::decode(log)?;
    let sector_bytes = super_block.sector_bytes;
    // Each entry takes at least one sector: a count beyond that cannot be
    // met, and bounds the loop and the allocation below.
    let entries_max = log.len() as u64 / u64::from(sector_bytes);
    let mut entries = Vec::with_capacity(super_block.nr_entries.min(entries_max) as usize);
    let mut offset = u64::from(sector_bytes);
    for index in 0..super_block.nr_entries {
        if index >= entries_max {
            return Err(LogError::entry(
                index,
                offset,
                format!(
                    "truncated: the super block counts {} entries, the log ends after {index}",
                    super_block.nr_entries
                ),
            ));
        }
        let entry = decode_entry(log, index, offset, sector_bytes)?;
        offset = entry.data.end as u64;
        entries.push(entry);
    }
    Ok(DecodedLog {
        super_block,
        entries,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(sector_bytes: u32, entries: &[(LogEntry, &[u8], Vec<u8>)]) -> Vec<u8> {
        let mut log = LogSuper {
            nr_entries: entries.len() as u64,
            sector_bytes,
        }
        .encode();
        for (entry, label, data) in entries {
            log.extend(entry.encode(label, sector_bytes).unwrap());
            log.extend(data);
        }
        log
    }

    fn sample() -> Vec<u8> {
        log_of(
            512,
            &[
                (LogEntry::write(8, 2), b"", vec![0xa1; 1024]),
                (LogEntry::flush(), b"", vec![]),
                (LogEntry::discard(16, 4), b"", vec![]),
                (
                    LogEntry {
                        flags: FLAG_MARK,
                        ..LogEntry::flush()
                    },
                    b"op 1 write 0x1000+1024",
                    vec![],
                ),
            ],
        )
    }

    #[test]
    fn encoded_log_decodes_back() {
        let log = sample();
        let decoded = decode_log(&log).unwrap();
        assert_eq!(decoded.super_block.sector_bytes, 512);
        let kinds: Vec<EntryKind> = decoded.entries.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                EntryKind::Write {
                    preflush: false,
                    fua: false
                },
                EntryKind::Flush,
                EntryKind::Discard,
                EntryKind::Mark
            ]
        );
        let write = &decoded.entries[0];
        assert_eq!(write.device_offset(512), 4096);
        assert_eq!(write.device_len(512), 1024);
        assert!(log[write.data.clone()].iter().all(|&b| b == 0xa1));
        assert_eq!(decoded.entries[1].log_offset, 512 * 4);
        assert_eq!(decoded.entries[3].label, "op 1 write 0x1000+1024");
        assert_eq!(decoded.entries[3].log_offset, 512 * 6);
    }

    #[test]
    fn super_block_layout_matches_the_kernel() {
        let sector = LogSuper {
            nr_entries: 3,
            sector_bytes: 4096,
        }
        .encode();
        assert_eq!(sector.len(), 4096);
        assert_eq!(&sector[0..8], &0x6a736677736872u64.to_le_bytes());
        assert_eq!(&sector[8..16], &1u64.to_le_bytes());
        assert_eq!(&sector[16..24], &3u64.to_le_bytes());
        assert_eq!(&sector[24..28], &4096u32.to_le_bytes());
    }

    fn entry_error(log: &[u8]) -> (u64, u64, String) {
        match decode_log(log) {
            Err(LogError::Entry {
                index,
                offset,
                reason,
            }) => (index, offset, reason),
            other => panic!("expected an entry error, got {other:?}"),
        }
    }

    #[test]
    fn bad_super_blocks_name_the_field() {
        let mut log = sample();
        log[0] ^= 1;
        assert!(matches!(
            decode_log(&log),
            Err(LogError::Super {
                field: "magic",
                offset: 0,
                ..
            })
        ));
        let mut log = sample();
        log[8] = 2;
        let err = decode_log(&log).unwrap_err();
        assert!(matches!(
            err,
            LogError::Super {
                field: "version",
                offset: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("version 2"), "{err}");
        let mut log = sample();
        log[100] = 1;
        assert!(matches!(
            decode_log(&log),
            Err(LogError::Super {
                field: "padding",
                offset: 100,
                ..
            })
        ));
        assert!(decode_log(&[0u8; 10]).is_err());
    }

    #[test]
    fn truncated_entries_name_index_and_offset() {
        let log = sample();
        // Cut inside the first entry's data.
        let (index, offset, reason) = entry_error(&log[..512 * 2 + 100]);
        assert_eq!((index, offset), (0, 512));
        assert!(reason.contains("truncated"), "{reason}");
        // Cut before the last entry's header.
        let (index, offset, _) = entry_error(&log[..512 * 6]);
        assert_eq!((index, offset), (3, 512 * 6));
    }

    #[test]
    fn entries_past_nr_entries_are_not_part_of_the_log() {
        let mut log = sample();
        log[16] = 2;
        assert_eq!(decode_log(&log).unwrap().entries.len(), 2);
    }

    #[test]
    fn bad_entries_are_refused_with_their_index_and_offset() {
        let header_at = 512 * 4; // the flush
        let cases: [(usize, u8, &str); 4] = [
            (header_at + 16, 16 | 1, "METADATA"),
            (header_at + 16, 0, "empty entry"),
            (header_at + 200, 7, "padding"),
            (header_at + 24, 3, "data_len"),
        ];
        for (at, value, want) in cases {
            let mut log = sample();
            log[at] = value;
            let (index, offset, reason) = entry_error(&log);
            assert_eq!((index, offset), (1, header_at as u64), "{want}");
            assert!(reason.contains(want), "{reason} should mention {want}");
        }
        let mut log = sample();
        log[512 * 6 + 24] = 200; // mark label longer than its padding allows
        let mut log2 = log.clone();
        log2[512 * 6 + 24] = 255;
        log2[512 * 6 + 25] = 1;
        let (index, _, reason) = entry_error(&log2);
        assert_eq!(index, 3);
        assert!(reason.contains("does not fit"), "{reason}");
        // A longer label is fine as long as the bytes are there: 200 bytes
        // of label, the first 22 set, the rest zeros - accepted, shown lossy.
        assert_eq!(decode_log(&log).unwrap().entries[3].label.len(), 200);
    }

    #[test]
    fn labels_too_long_for_the_sector_are_refused_when_encoding() {
        assert!(LogEntry::encode_mark(&"x".repeat(480), 512).is_ok());
        assert!(LogEntry::encode_mark(&"x".repeat(481), 512).is_err());
    }

    #[test]
    fn overflowing_ranges_are_refused() {
        let mut log = sample();
        log[512 + 7] = 0xff; // sector of the first write: huge
        let (index, _, reason) = entry_error(&log);
        assert_eq!(index, 0);
        assert!(reason.contains("overflow"), "{reason}");
    }
}
