//! Where a descriptor may write: outside the journal region and below the
//! device limit the caller gives. Replay checks every target against this
//! before it writes a byte, so a corrupt or hostile log can never make it
//! write into the journal itself or past the end of the device.

use super::descriptor::Descriptor;
use super::error::JournalFormatError;

const STRUCTURE: &str = "journal descriptor";

/// The ranges a descriptor may touch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetBounds {
    /// First byte of the journal region on the device.
    pub journal_start: u64,
    /// First byte after the journal region.
    pub journal_end: u64,
    /// Every byte written or read must lie below this (the device size the
    /// caller allows, e.g. the largest image size).
    pub device_limit: u64,
}

impl TargetBounds {
    /// Bounds that only keep targets out of the journal (for a dump, which
    /// writes nothing and knows no device limit).
    #[must_use]
    pub const fn outside_journal(journal_start: u64, journal_end: u64) -> Self {
        Self {
            journal_start,
            journal_end,
            device_limit: u64::MAX,
        }
    }

    /// Checks one device range; `field` and `offset` name it in the error.
    pub fn check_range(
        &self,
        start: u64,
        length: u64,
        field: &'static str,
        offset: u64,
    ) -> Result<(), JournalFormatError> {
        let end = start.checked_add(length).ok_or_else(|| {
            JournalFormatError::field(STRUCTURE, field, offset, start, "range end overflows")
        })?;
        if end > self.device_limit {
            return Err(JournalFormatError::field(
                STRUCTURE,
                field,
                offset,
                start,
                "range reaches past the device limit",
            ));
        }
        if start < self.journal_end && self.journal_start < end {
            return Err(JournalFormatError::field(
                STRUCTURE,
                field,
                offset,
                start,
                "range overlaps the journal region",
            ));
        }
        Ok(())
    }

    /// Checks every device range a descriptor writes or reads. `offset` is
    /// the descriptor's position, for errors (entry offsets are added).
    pub fn check(&self, descriptor: &Descriptor, offset: u64) -> Result<(), JournalFormatError> {
        let entry = |i: usize, size: usize, within: usize| offset + 8 + (i * size + within) as u64;
        match descriptor {
            Descriptor::WriteData(chunks) => {
                for (i, c) in chunks.iter().enumerate() {
                    self.check_range(c.target, u64::from(c.length), "target", entry(i, 16, 0))?;
                }
            }
            Descriptor::Copy(chunks) => {
                for (i, c) in chunks.iter().enumerate() {
                    self.check_range(c.target, u64::from(c.length), "target", entry(i, 24, 0))?;
                    self.check_range(c.source, u64::from(c.length), "source", entry(i, 24, 8))?;
                }
            }
            Descriptor::DataChecksum(chunks) => {
                for (i, c) in chunks.iter().enumerate() {
                    self.check_range(c.target, u64::from(c.length), "target", entry(i, 16, 0))?;
                }
            }
            Descriptor::NoOp { .. }
            | Descriptor::Revoke(_)
            | Descriptor::DedupInsert(_)
            | Descriptor::DedupDelete(_)
            | Descriptor::Escape(_)
            | Descriptor::Private { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::descriptor::{CopyChunk, WriteChunk};

    #[test]
    fn targets_inside_the_journal_or_past_the_limit_are_refused() {
        let b = TargetBounds {
            journal_start: 0x10000,
            journal_end: 0x20000,
            device_limit: 0x100000,
        };
        assert!(b.check_range(0, 0x10000, "target", 0).is_ok());
        assert!(b.check_range(0x20000, 0x1000, "target", 0).is_ok());
        assert!(b.check_range(0xffff, 2, "target", 0).is_err());
        assert!(b.check_range(0x1ffff, 1, "target", 0).is_err());
        assert!(b.check_range(0xff000, 0x1001, "target", 0).is_err());
        assert!(b.check_range(u64::MAX, 2, "target", 0).is_err());
        let d = Descriptor::Copy(vec![CopyChunk {
            target: 0x30000,
            source: 0x18000,
            length: 16,
        }]);
        assert!(matches!(
            b.check(&d, 40),
            Err(JournalFormatError::Field {
                field: "source",
                offset: 56,
                ..
            })
        ));
        let d = Descriptor::WriteData(vec![
            WriteChunk {
                target: 0x30000,
                length: 1,
                data_offset: 0,
            },
            WriteChunk {
                target: 0x200000,
                length: 1,
                data_offset: 0,
            },
        ]);
        assert!(matches!(
            b.check(&d, 0),
            Err(JournalFormatError::Field {
                field: "target",
                offset: 24,
                ..
            })
        ));
    }
}
