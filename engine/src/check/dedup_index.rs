//! `qj check` of the persisted dedup index (spec §3.6): every entry must
//! name a counted data cluster inside the file whose bytes have the
//! entry's SHA-256. A stale entry is a corruption of the index, not of the
//! image (no guest data depends on it): `-r all` rewrites the index in its
//! clusters without it. Checked only while "journal valid" is set: after a
//! program that does not know the journal wrote the image, the index is
//! not ours to judge (the next read-write open drops it). While the
//! journal is dirty the index may be older than the log (it is written
//! after checkpoints, and the next open rehashes it): stale entries are
//! then noted, not counted.

use qj_spec::qcow2::dedup_index::{
    decode_index, encode_index, DedupIndexExtension, DEDUP_INDEX_ENTRY_BYTES, EXT_DEDUP_INDEX,
};
use qj_spec::qcow2::features::AUTOCLEAR_JOURNAL_VALID_BIT;

use super::checker::Checker;
use super::error::CheckError;
use super::image::{read_vec, DiskRefcounts};
use super::report::Tally;
use super::RepairMode;
use crate::dedup::cluster_hash;

impl Checker<'_> {
    /// Verifies the persisted dedup index, and with `-r all` drops its
    /// stale entries. Runs after the refcounts are checked (and repaired).
    pub fn check_dedup_index(&mut self, tally: &mut Tally) -> Result<(), CheckError> {
        let header = &self.image.header;
        if !header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT) {
            return Ok(());
        }
        let ext = match header.dedup_index() {
            None => return Ok(()),
            Some(Ok(ext)) if ext.is_empty() => return Ok(()),
            Some(Ok(ext)) => ext,
            Some(Err(why)) => {
                self.msg(format!(
                    "ERROR {why}; the next read-write open drops the dedup index"
                ));
                tally.corruptions += 1;
                return Ok(());
            }
        };
        let cs = self.cluster_size();
        let bytes_max = u64::from(ext.clusters) * cs;
        let inside = self.image.geometry.is_aligned(ext.offset)
            && ext.offset > 0
            && ext
                .offset
                .checked_add(bytes_max)
                .is_some_and(|end| end <= self.file_len);
        let entries = if inside {
            let bytes = read_vec(self.storage, ext.offset, bytes_max, "the dedup index")?;
            decode_index(&bytes, &ext)
        } else {
            Err(format!(
                "dedup index of {} cluster(s) at {:#x} is not inside the file",
                ext.clusters, ext.offset
            ))
        };
        let entries = match entries {
            Ok(entries) => entries,
            Err(why) => {
                self.msg(format!(
                    "ERROR {why}; the next read-write open drops the dedup index"
                ));
                tally.corruptions += 1;
                return Ok(());
            }
        };
        let mut refcounts = DiskRefcounts::new(&self.image);
        let mut cluster = vec![0u8; cs as usize];
        let mut kept = Vec::with_capacity(entries.len());
        let mut stale = 0u64;
        for (i, &(offset, hash)) in entries.iter().enumerate() {
            let why = if !self.image.geometry.is_aligned(offset) {
                Some("is not cluster aligned")
            } else if offset.checked_add(cs).is_none_or(|end| end > self.file_len) {
                Some("is past the end of the file")
            } else if refcounts
                .get(self.storage, offset >> self.cluster_bits())
                .map_err(|e| e.into_check_error("reading a dedup index entry's refcount"))?
                == 0
            {
                Some("is free")
            } else {
                self.storage
                    .read_at(&mut cluster, offset)
                    .map_err(CheckError::io(format!("reading cluster {offset:#x}")))?;
                (cluster_hash(&cluster) != hash).then_some("does not have the entry's hash")
            };
            match why {
                Some(why) if self.journal_was_dirty => {
                    // After an unclean shutdown the index may be older
                    // than the log (spec §3.6): expected, not a corruption.
                    self.msg(format!(
                        "NOTE dedup index entry {i}: cluster {offset:#x} {why}; the journal was dirty, so the index may be older than its log: the next read-write open rehashes it and drops this entry"
                    ));
                }
                Some(why) => {
                    self.msg(format!(
                        "ERROR dedup index entry {i}: cluster {offset:#x} {why} (a stale entry: a corruption of the index, not of the image)"
                    ));
                    stale += 1;
                }
                None => kept.push((offset, hash)),
            }
        }
        tally.corruptions += stale;
        if stale == 0 || self.mode != RepairMode::All {
            return Ok(());
        }
        self.rewrite_dedup_index(&ext, &kept)?;
        for _ in 0..stale {
            tally.corruption_fixed();
        }
        Ok(())
    }

    /// Writes `kept` over the index's own clusters, then the extension
    /// naming them (index first: until the extension changes, its checksum
    /// refuses the half-written index, which open then drops).
    fn rewrite_dedup_index(
        &mut self,
        ext: &DedupIndexExtension,
        kept: &[(u64, [u8; 32])],
    ) -> Result<(), CheckError> {
        let mut bytes = encode_index(kept);
        let body = kept.len() * DEDUP_INDEX_ENTRY_BYTES;
        bytes.resize((u64::from(ext.clusters) * self.cluster_size()) as usize, 0);
        self.write(&bytes, ext.offset, "the dedup index")?;
        self.flush("the dedup index")?;
        let new = DedupIndexExtension {
            entries: kept.len() as u64,
            crc32c: qj_spec::journal::checksum::crc32c(&bytes[..body]),
            ..*ext
        };
        let header = read_vec(self.storage, 0, self.cluster_size(), "the header cluster")?;
        let Some(at) = extension_data_offset(&header, self.image.header.header_length) else {
            return Err(CheckError::Unsupported(
                "the dedup index extension could not be found in the header to rewrite".into(),
            ));
        };
        self.write(&new.encode(), at, "the dedup index extension")?;
        self.flush("the dedup index extension")?;
        self.image.header.set_dedup_index(Some(new));
        self.msg(format!(
            "Repaired the dedup index: {} stale entr(ies) dropped",
            ext.entries - new.entries
        ));
        Ok(())
    }
}

/// Byte offset, in the header cluster `header`, of the dedup index
/// extension's data. Bounded by the cluster: each step moves forward.
fn extension_data_offset(header: &[u8], header_length: u32) -> Option<u64> {
    let mut at = header_length as usize;
    while at + 8 <= header.len() {
        let kind = u32::from_be_bytes(header[at..at + 4].try_into().ok()?);
        let len = u32::from_be_bytes(header[at + 4..at + 8].try_into().ok()?) as usize;
        if kind == 0 {
            return None;
        }
        if kind == EXT_DEDUP_INDEX {
            return Some(at as u64 + 8);
        }
        at += 8 + len.next_multiple_of(8);
    }
    None
}
