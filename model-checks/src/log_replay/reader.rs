//! Reading a dm-log-writes log for replay: the spec's decoder (xfstests'
//! rules), then the checks that need the base image, then the entries as
//! device operations in log order.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qj_spec::log_writes::{decode_log, EntryKind, LogError};

/// Largest log read (it is held in memory).
pub const LOG_BYTES_MAX: u64 = 1 << 30;

/// How far past the device's end (the base image grown by the entries
/// before it) an entry may start: one cluster of the largest qcow2 cluster
/// size. A qcow2 file grows at its end, and a write may skip the unwritten
/// rest of the cluster before it; an entry further out cannot come from an
/// image this base holds.
pub const GROWTH_SLACK_BYTES: u64 = 2 << 20;

/// A device operation of the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogOp {
    /// Write `data` at byte `offset`.
    Write {
        /// Device byte offset.
        offset: u64,
        /// The bytes.
        data: Arc<[u8]>,
    },
    /// Discard `len` bytes at `offset`: replay writes zeros there (as
    /// `replay-log` does on a device that cannot discard).
    Discard {
        /// Device byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Everything before is durable.
    Flush,
    /// A label.
    Mark(String),
}

/// One operation and the entry it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedOp {
    /// Index of the entry (from 0).
    pub entry: u64,
    /// Byte offset of the entry's header in the log.
    pub log_offset: u64,
    /// What it does.
    pub op: LogOp,
}

/// A log ready to replay.
#[derive(Clone, Debug)]
pub struct ReplayLog {
    /// Operations in log order. A write with the FLUSH flag (a pre-flush)
    /// is a flush then a write; one with FUA is a write then a flush (a
    /// stronger barrier than FUA, which makes only itself durable: neither
    /// QEMU nor qj writes it).
    pub ops: Vec<LoggedOp>,
    /// Entries in the log.
    pub entries: u64,
    /// The log's sector size.
    pub sector_bytes: u32,
}

impl ReplayLog {
    /// Whether the log carries labels (qj writes one per guest operation
    /// and journal commit; QEMU writes none).
    #[must_use]
    pub fn has_marks(&self) -> bool {
        self.ops.iter().any(|o| matches!(o.op, LogOp::Mark(_)))
    }

    /// Flushes in the log.
    #[must_use]
    pub fn flushes(&self) -> u64 {
        self.ops.iter().filter(|o| o.op == LogOp::Flush).count() as u64
    }
}

/// Why a log cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum LogReadError {
    /// Reading a file failed.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The log is larger than [`LOG_BYTES_MAX`].
    #[error("{}: {len} bytes, more than the {LOG_BYTES_MAX} a replay holds in memory", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// The log is malformed (names the entry and its byte offset).
    #[error(transparent)]
    Format(#[from] LogError),
}

/// Reads and checks the log at `path` for a base image of `base_len`
/// bytes. Reads only: nothing is written anywhere.
pub fn read_log(path: &Path, base_len: u64) -> Result<ReplayLog, LogReadError> {
    let io = |source| LogReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > LOG_BYTES_MAX {
        return Err(LogReadError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    let bytes = std::fs::read(path).map_err(io)?;
    Ok(parse_log(&bytes, base_len)?)
}

/// Decodes and checks a log held in memory; see [`read_log`].
pub fn parse_log(bytes: &[u8], base_len: u64) -> Result<ReplayLog, LogError> {
    let decoded = decode_log(bytes)?;
    let sector_bytes = decoded.super_block.sector_bytes;
    let mut ops = Vec::with_capacity(decoded.entries.len());
    let mut device_end = base_len;
    for entry in &decoded.entries {
        let at = |op| LoggedOp {
            entry: entry.index,
            log_offset: entry.log_offset,
            op,
        };
        let offset = entry.device_offset(sector_bytes);
        let len = entry.device_len(sector_bytes);
        if matches!(entry.kind, EntryKind::Write { .. } | EntryKind::Discard) {
            if offset > device_end.saturating_add(GROWTH_SLACK_BYTES) {
                return Err(LogError::Entry {
                    index: entry.index,
                    offset: entry.log_offset,
                    reason: format!(
                        "{entry} starts at device byte {offset}, past the end of the base image ({base_len} bytes, {device_end} with the entries before it) by more than {GROWTH_SLACK_BYTES} bytes: the log is not of this image"
                    ),
                });
            }
            device_end = device_end.max(offset + len);
        }
        match entry.kind {
            EntryKind::Flush => ops.push(at(LogOp::Flush)),
            EntryKind::Mark => ops.push(at(LogOp::Mark(entry.label.clone()))),
            EntryKind::Discard => ops.push(at(LogOp::Discard { offset, len })),
            EntryKind::Write { preflush, fua } => {
                if preflush {
                    ops.push(at(LogOp::Flush));
                }
                ops.push(at(LogOp::Write {
                    offset,
                    data: Arc::from(&bytes[entry.data.clone()]),
                }));
                if fua {
                    ops.push(at(LogOp::Flush));
                }
            }
        }
    }
    Ok(ReplayLog {
        ops,
        entries: decoded.entries.len() as u64,
        sector_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qj_spec::log_writes::{LogEntry, LogSuper};

    fn log(entries: &[(LogEntry, Vec<u8>)]) -> Vec<u8> {
        let mut log = LogSuper {
            nr_entries: entries.len() as u64,
            sector_bytes: 512,
        }
        .encode();
        for (entry, data) in entries {
            log.extend(entry.encode(b"", 512).unwrap());
            log.extend(data);
        }
        log
    }

    #[test]
    fn flags_become_operations_in_order() {
        let preflush_fua = LogEntry {
            flags: 1 | 2,
            ..LogEntry::write(4, 1)
        };
        let bytes = log(&[
            (LogEntry::write(0, 1), vec![7; 512]),
            (preflush_fua, vec![8; 512]),
            (LogEntry::discard(2, 2), vec![]),
        ]);
        let replay = parse_log(&bytes, 4096).unwrap();
        let ops: Vec<&LogOp> = replay.ops.iter().map(|o| &o.op).collect();
        assert!(matches!(ops[0], LogOp::Write { offset: 0, .. }));
        assert_eq!(ops[1], &LogOp::Flush);
        assert!(matches!(ops[2], LogOp::Write { offset: 2048, .. }));
        assert_eq!(ops[3], &LogOp::Flush);
        assert_eq!(
            ops[4],
            &LogOp::Discard {
                offset: 1024,
                len: 1024
            }
        );
        assert_eq!(replay.ops[2].entry, 1);
        assert!(!replay.has_marks());
    }

    #[test]
    fn an_entry_far_past_the_base_end_names_its_index_and_offset() {
        let far = (4096 + GROWTH_SLACK_BYTES) / 512 + 1;
        let bytes = log(&[
            (LogEntry::write(0, 1), vec![7; 512]),
            (LogEntry::write(far, 1), vec![8; 512]),
        ]);
        match parse_log(&bytes, 4096) {
            Err(LogError::Entry {
                index,
                offset,
                reason,
            }) => {
                assert_eq!((index, offset), (1, 512 * 3));
                assert!(
                    reason.contains("past the end of the base image"),
                    "{reason}"
                );
            }
            other => panic!("expected an entry error, got {other:?}"),
        }
        // Growing step by step is fine.
        let near = 4096 / 512 + 1;
        let bytes = log(&[(LogEntry::write(near, 1), vec![8; 512])]);
        assert!(parse_log(&bytes, 4096).is_ok());
    }
}
