//! Applying a transaction's operations to their targets, honouring
//! revokes; shared by checkpoint (an overlay written in place), replay
//! (device) and in-memory replay (overlay).

use qj_spec::journal::{checksum, DataChecksumChunk, Descriptor};

use crate::error::JournalError;
use crate::overlay::Overlay;
use crate::revoke::RevokeTable;
use crate::Storage;

/// Largest buffer a copy or checksum verification reads at once.
const IO_PIECE_BYTES: u64 = 1 << 20;

/// Where applied writes go.
pub(crate) trait ApplyTarget {
    /// Reads as the target currently stands.
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), JournalError>;
    /// Writes.
    fn write(&mut self, bytes: &[u8], offset: u64) -> Result<(), JournalError>;
}

/// The device itself.
pub(crate) struct DeviceTarget<'a> {
    pub storage: &'a dyn Storage,
}

impl ApplyTarget for DeviceTarget<'_> {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), JournalError> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| JournalError::io("read", offset, e))
    }
    fn write(&mut self, bytes: &[u8], offset: u64) -> Result<(), JournalError> {
        self.storage
            .write_at(bytes, offset)
            .map_err(|e| JournalError::io("write", offset, e))
    }
}

/// An overlay over a device that this target never writes (checkpoint
/// writes its overlay in place itself).
pub(crate) struct OverlayTarget<'a> {
    pub storage: &'a dyn Storage,
    pub overlay: &'a mut Overlay,
}

impl ApplyTarget for OverlayTarget<'_> {
    fn read(&mut self, buf: &mut [u8], offset: u64) -> Result<(), JournalError> {
        self.overlay
            .read_through(self.storage, buf, offset)
            .map_err(|e| JournalError::io("read", offset, e))
    }
    fn write(&mut self, bytes: &[u8], offset: u64) -> Result<(), JournalError> {
        self.overlay.write(offset, bytes);
        Ok(())
    }
}

/// What applying one transaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// Bytes written to targets.
    pub bytes_written: u64,
    /// Bytes skipped because a later transaction revoked them.
    pub bytes_revoked: u64,
    /// Target ranges written, as (offset, length).
    pub ranges: Vec<(u64, u64)>,
}

/// Applies the write-data and copy descriptors of transaction `seq`, in
/// order, skipping the bytes that later transactions revoked. Other
/// descriptors write nothing.
pub(crate) fn apply_transaction(
    target: &mut dyn ApplyTarget,
    seq: u64,
    descriptors: &[Descriptor],
    data: &[u8],
    revokes: &RevokeTable,
) -> Result<Applied, JournalError> {
    let mut applied = Applied::default();
    for descriptor in descriptors {
        match descriptor {
            Descriptor::WriteData(chunks) => {
                for chunk in chunks {
                    let start = chunk.data_offset as usize;
                    let bytes = data.get(start..start + chunk.length as usize).ok_or(
                        JournalError::Refused {
                            reason: "write chunk outside the data area",
                            offset: chunk.target,
                            length: u64::from(chunk.length),
                        },
                    )?;
                    apply_pieces(
                        &mut applied,
                        revokes,
                        seq,
                        chunk.target,
                        u64::from(chunk.length),
                        |piece, length| {
                            let from = (piece - chunk.target) as usize;
                            target.write(&bytes[from..from + length as usize], piece)
                        },
                    )?;
                }
            }
            Descriptor::Copy(chunks) => {
                for chunk in chunks {
                    apply_pieces(
                        &mut applied,
                        revokes,
                        seq,
                        chunk.target,
                        u64::from(chunk.length),
                        |piece, length| {
                            let mut done = 0;
                            // Bounded: each round moves up to 1 MiB of a
                            // chunk of at most 4 GiB.
                            while done < length {
                                let step = (length - done).min(IO_PIECE_BYTES);
                                let mut buf = vec![0u8; step as usize];
                                let source = chunk.source + (piece - chunk.target) + done;
                                target.read(&mut buf, source)?;
                                target.write(&buf, piece + done)?;
                                done += step;
                            }
                            Ok(())
                        },
                    )?;
                }
            }
            Descriptor::NoOp { .. }
            | Descriptor::Revoke(_)
            | Descriptor::DedupInsert(_)
            | Descriptor::DedupDelete(_)
            | Descriptor::DataChecksum(_)
            | Descriptor::Escape(_)
            | Descriptor::Private { .. } => {}
        }
    }
    Ok(applied)
}

fn apply_pieces(
    applied: &mut Applied,
    revokes: &RevokeTable,
    seq: u64,
    start: u64,
    length: u64,
    mut write: impl FnMut(u64, u64) -> Result<(), JournalError>,
) -> Result<(), JournalError> {
    let pieces = revokes.unrevoked(start, length, seq);
    let kept: u64 = pieces.iter().map(|(_, l)| l).sum();
    applied.bytes_revoked += length - kept;
    for (piece, piece_length) in pieces {
        write(piece, piece_length)?;
        applied.bytes_written += piece_length;
        applied.ranges.push((piece, piece_length));
    }
    Ok(())
}

/// A data checksum that did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DataChecksumMismatch {
    /// First byte of the checksummed range.
    pub target: u64,
    /// Its length.
    pub length: u32,
    /// The CRC32C the transaction recorded.
    pub expected_crc32c: u32,
    /// The CRC32C of what the device holds.
    pub found_crc32c: u32,
}

/// Checks every data checksum descriptor of a transaction against the
/// target; returns the first mismatch.
pub(crate) fn verify_data_checksums(
    target: &mut dyn ApplyTarget,
    descriptors: &[Descriptor],
) -> Result<Option<DataChecksumMismatch>, JournalError> {
    for descriptor in descriptors {
        let Descriptor::DataChecksum(chunks) = descriptor else {
            continue;
        };
        for chunk in chunks {
            let found = crc_of(target, chunk)?;
            if found != chunk.crc32c {
                return Ok(Some(DataChecksumMismatch {
                    target: chunk.target,
                    length: chunk.length,
                    expected_crc32c: chunk.crc32c,
                    found_crc32c: found,
                }));
            }
        }
    }
    Ok(None)
}

fn crc_of(target: &mut dyn ApplyTarget, chunk: &DataChecksumChunk) -> Result<u32, JournalError> {
    let length = u64::from(chunk.length);
    let mut crc = 0u32;
    let mut done = 0;
    // Bounded: at most 4096 rounds of 1 MiB for a 4 GiB range.
    while done < length {
        let step = (length - done).min(IO_PIECE_BYTES);
        let mut buf = vec![0u8; step as usize];
        target.read(&mut buf, chunk.target + done)?;
        crc = checksum::salted_append(crc, &buf);
        done += step;
    }
    Ok(crc)
}

/// Sorts and merges (offset, length) ranges.
#[must_use]
pub(crate) fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, length) in ranges {
        if let Some((last_start, last_length)) = out.last_mut() {
            let last_end = *last_start + *last_length;
            if start <= last_end {
                *last_length = last_end.max(start + length) - *last_start;
                continue;
            }
        }
        out.push((start, length));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemStorage;
    use qj_spec::journal::{CopyChunk, RevokeRange, WriteChunk};

    #[test]
    fn writes_and_copies_skip_revoked_bytes() {
        let storage = MemStorage::from_bytes((0..=255u8).cycle().take(4096).collect());
        let mut revokes = RevokeTable::new();
        revokes.insert(
            RevokeRange {
                offset: 1002,
                length: 2,
            },
            9,
        );
        let descriptors = vec![
            Descriptor::WriteData(vec![WriteChunk {
                target: 1000,
                length: 6,
                data_offset: 0,
            }]),
            Descriptor::Copy(vec![CopyChunk {
                target: 2000,
                source: 0,
                length: 4,
            }]),
        ];
        let applied = apply_transaction(
            &mut DeviceTarget { storage: &storage },
            3,
            &descriptors,
            b"abcdef",
            &revokes,
        )
        .unwrap();
        let bytes = storage.to_bytes();
        assert_eq!(
            &bytes[1000..1006],
            &[b'a', b'b', 1002u16 as u8, 1003u16 as u8, b'e', b'f']
        );
        assert_eq!(&bytes[2000..2004], &[0, 1, 2, 3]);
        assert_eq!(applied.bytes_written, 8);
        assert_eq!(applied.bytes_revoked, 2);
        assert_eq!(
            merge_ranges(applied.ranges),
            vec![(1000, 2), (1004, 2), (2000, 4)]
        );
    }

    #[test]
    fn overlay_target_leaves_the_device_alone() {
        let storage = MemStorage::from_bytes(vec![7u8; 64]);
        let mut overlay = Overlay::new();
        let descriptors = vec![
            Descriptor::WriteData(vec![WriteChunk {
                target: 0,
                length: 2,
                data_offset: 0,
            }]),
            Descriptor::Copy(vec![CopyChunk {
                target: 10,
                source: 0,
                length: 4,
            }]),
        ];
        let mut target = OverlayTarget {
            storage: &storage,
            overlay: &mut overlay,
        };
        apply_transaction(&mut target, 1, &descriptors, b"xy", &RevokeTable::new()).unwrap();
        assert_eq!(storage.to_bytes(), vec![7u8; 64]);
        let mut buf = [0u8; 4];
        overlay.read_through(&storage, &mut buf, 10).unwrap();
        assert_eq!(&buf, b"xy\x07\x07");
    }

    #[test]
    fn data_checksums_are_verified() {
        let storage = MemStorage::from_bytes(b"hello world".to_vec());
        let good = DataChecksumChunk {
            target: 0,
            length: 5,
            crc32c: checksum::crc32c(b"hello"),
        };
        let bad = DataChecksumChunk {
            target: 6,
            length: 5,
            crc32c: checksum::crc32c(b"WORLD"),
        };
        let mut target = DeviceTarget { storage: &storage };
        assert_eq!(
            verify_data_checksums(&mut target, &[Descriptor::DataChecksum(vec![good])]).unwrap(),
            None
        );
        let mismatch =
            verify_data_checksums(&mut target, &[Descriptor::DataChecksum(vec![good, bad])])
                .unwrap();
        assert_eq!(mismatch.map(|m| m.target), Some(6));
        assert_eq!(
            mismatch.map(|m| m.found_crc32c),
            Some(checksum::crc32c(b"world"))
        );
    }
}
