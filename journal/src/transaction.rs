//! The transaction a caller builds and hands to commit: descriptors in
//! order, plus the data area their write chunks point into.

use qj_spec::journal::{
    checksum, CopyChunk, DataChecksumChunk, DedupEntry, Descriptor, RevokeRange, WriteChunk,
};

use crate::error::JournalError;

/// A set of operations that replay applies all or not at all.
///
/// Operations apply in the order they were added. Consecutive calls of the
/// same kind share one descriptor (several chunks), which changes nothing
/// about the order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transaction {
    descriptors: Vec<Descriptor>,
    data: Vec<u8>,
}

impl Transaction {
    /// An empty transaction (committing it only advances the sequence).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a no-op descriptor.
    pub fn no_op(&mut self) -> &mut Self {
        self.descriptors.push(Descriptor::NoOp { size_bytes: 8 });
        self
    }

    /// Writes `bytes` at device offset `target` when the transaction is
    /// applied. The bytes are stored in the log.
    pub fn write(&mut self, target: u64, bytes: &[u8]) -> Result<&mut Self, JournalError> {
        let refuse = |reason| JournalError::Refused {
            reason,
            offset: target,
            length: bytes.len() as u64,
        };
        if bytes.is_empty() {
            return Err(refuse("empty write"));
        }
        let length = u32::try_from(bytes.len()).map_err(|_| refuse("write chunk over 4 GiB"))?;
        let data_offset = u32::try_from(self.data.len())
            .ok()
            .filter(|offset| offset.checked_add(length).is_some())
            .ok_or_else(|| refuse("transaction data area over 4 GiB"))?;
        self.data.extend_from_slice(bytes);
        let chunk = WriteChunk {
            target,
            length,
            data_offset,
        };
        match self.descriptors.last_mut() {
            Some(Descriptor::WriteData(chunks)) => chunks.push(chunk),
            _ => self.descriptors.push(Descriptor::WriteData(vec![chunk])),
        }
        Ok(self)
    }

    /// Copies `length` bytes from device offset `source` to `target` when
    /// the transaction is applied. The ranges must not overlap, and the
    /// source must stay untouched until this transaction is synced.
    pub fn copy(
        &mut self,
        target: u64,
        source: u64,
        length: u32,
    ) -> Result<&mut Self, JournalError> {
        let overlaps = source < target.saturating_add(u64::from(length))
            && target < source.saturating_add(u64::from(length));
        if length == 0 || overlaps {
            return Err(JournalError::Refused {
                reason: "copy is empty or its source overlaps its target",
                offset: target,
                length: u64::from(length),
            });
        }
        let chunk = CopyChunk {
            target,
            source,
            length,
        };
        match self.descriptors.last_mut() {
            Some(Descriptor::Copy(chunks)) => chunks.push(chunk),
            _ => self.descriptors.push(Descriptor::Copy(vec![chunk])),
        }
        Ok(self)
    }

    /// Revokes the writes that all earlier transactions make to this range
    /// (not this transaction's own): they are skipped by checkpoint and
    /// replay, because the range has been freed and may be reused.
    pub fn revoke(&mut self, offset: u64, length: u64) -> Result<&mut Self, JournalError> {
        if length == 0 || offset.checked_add(length).is_none() {
            return Err(JournalError::Refused {
                reason: "revoked range is empty or overflows",
                offset,
                length,
            });
        }
        let range = RevokeRange { offset, length };
        match self.descriptors.last_mut() {
            Some(Descriptor::Revoke(ranges)) => ranges.push(range),
            _ => self.descriptors.push(Descriptor::Revoke(vec![range])),
        }
        Ok(self)
    }

    /// Records a dedup hash insertion, handed to the dedup consumer on
    /// replay.
    pub fn dedup_insert(&mut self, entry: DedupEntry) -> Result<&mut Self, JournalError> {
        check_hash(&entry)?;
        match self.descriptors.last_mut() {
            Some(Descriptor::DedupInsert(entries)) => entries.push(entry),
            _ => self.descriptors.push(Descriptor::DedupInsert(vec![entry])),
        }
        Ok(self)
    }

    /// Records a dedup hash deletion, handed to the dedup consumer on
    /// replay.
    pub fn dedup_delete(&mut self, entry: DedupEntry) -> Result<&mut Self, JournalError> {
        check_hash(&entry)?;
        match self.descriptors.last_mut() {
            Some(Descriptor::DedupDelete(entries)) => entries.push(entry),
            _ => self.descriptors.push(Descriptor::DedupDelete(vec![entry])),
        }
        Ok(self)
    }

    /// Makes the transaction depend on device bytes written outside the
    /// journal (guest data a new mapping points to): replay drops the
    /// transaction, and every later one, if `bytes` is not what
    /// `target..target + len` holds. See the spec for the writer's rules.
    pub fn data_checksum(&mut self, target: u64, bytes: &[u8]) -> Result<&mut Self, JournalError> {
        self.data_checksum_of(target, bytes.len() as u64, checksum::crc32c(bytes))
    }

    /// [`Transaction::data_checksum`] with the CRC-32C of the `length`
    /// bytes at `target` already known (taken from the buffer that was
    /// written there). The caller answers for it matching the device:
    /// if it does not, replay drops this transaction and every later one.
    pub fn data_checksum_of(
        &mut self,
        target: u64,
        length: u64,
        crc32c: u32,
    ) -> Result<&mut Self, JournalError> {
        let length = u32::try_from(length)
            .ok()
            .filter(|length| *length > 0)
            .ok_or(JournalError::Refused {
                reason: "checksummed range is empty or over 4 GiB",
                offset: target,
                length,
            })?;
        let chunk = DataChecksumChunk {
            target,
            length,
            crc32c,
        };
        match self.descriptors.last_mut() {
            Some(Descriptor::DataChecksum(chunks)) => chunks.push(chunk),
            _ => self.descriptors.push(Descriptor::DataChecksum(vec![chunk])),
        }
        Ok(self)
    }

    /// Adds a private-range descriptor (type 0x8000 or above) that replay
    /// skips and dump shows.
    pub fn private(
        &mut self,
        descriptor_type: u16,
        payload: &[u8],
    ) -> Result<&mut Self, JournalError> {
        if descriptor_type < qj_spec::journal::PRIVATE_TYPE_MIN || payload.len() > 65_520 {
            return Err(JournalError::Refused {
                reason: "private descriptor types start at 0x8000 and hold at most 65520 bytes",
                offset: u64::from(descriptor_type),
                length: payload.len() as u64,
            });
        }
        let mut padded = payload.to_vec();
        padded.resize(payload.len().div_ceil(8) * 8, 0);
        self.descriptors.push(Descriptor::Private {
            descriptor_type,
            count: 0,
            payload: padded,
        });
        Ok(self)
    }

    /// The descriptors, in order.
    #[must_use]
    pub fn descriptors(&self) -> &[Descriptor] {
        &self.descriptors
    }

    /// The data area write chunks point into.
    #[must_use]
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Whether the transaction has no descriptor at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.descriptors.is_empty()
    }

    pub(crate) fn into_parts(self) -> (Vec<Descriptor>, Vec<u8>) {
        (self.descriptors, self.data)
    }
}

fn check_hash(entry: &DedupEntry) -> Result<(), JournalError> {
    if entry.hash.is_empty()
        || entry.hash.len() > qj_spec::journal::descriptor::DEDUP_HASH_MAX_BYTES
    {
        return Err(JournalError::Refused {
            reason: "dedup hash must be 1 to 64 bytes",
            offset: entry.host_offset,
            length: entry.hash.len() as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_operations_share_a_descriptor() {
        let mut tx = Transaction::new();
        tx.write(0, b"ab").unwrap().write(10, b"cd").unwrap();
        tx.revoke(100, 5).unwrap();
        tx.write(20, b"e").unwrap();
        assert_eq!(tx.descriptors().len(), 3);
        assert_eq!(tx.data(), b"abcde");
        match &tx.descriptors()[0] {
            Descriptor::WriteData(chunks) => {
                assert_eq!(chunks.len(), 2);
                assert_eq!(chunks[1].data_offset, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_operations_are_refused() {
        let mut tx = Transaction::new();
        assert!(tx.write(0, b"").is_err());
        assert!(tx.copy(0, 10, 11).is_err());
        assert!(tx.copy(10, 0, 11).is_err());
        assert!(tx.copy(0, 10, 10).is_ok());
        assert!(tx.revoke(u64::MAX, 2).is_err());
        assert!(tx
            .dedup_insert(DedupEntry {
                host_offset: 0,
                hash_algorithm: 1,
                hash: vec![]
            })
            .is_err());
        assert!(tx.data_checksum(0, b"").is_err());
        assert!(tx.private(5, b"x").is_err());
    }
}
