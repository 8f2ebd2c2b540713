//! The guest model: for every guest sector, the contents a crash may leave.
//!
//! Each sector keeps a list of candidates: its content at the last
//! completed flush and every content written to it since. A candidate
//! carries the model's sequence numbers of the begin and the end of the
//! operation that wrote it, so concurrent operations (several workload
//! threads) stay unordered: when a flush completes, a candidate is dropped
//! only if another candidate that supersedes it began after it ended and
//! ended before the flush began. What is left is the allowed set.
//!
//! Operation semantics:
//! - write: the sector holds the write's data;
//! - write zeroes: the sector reads zeros (with or without a backing file);
//! - discard: the sector may read its old content, zeros, or the backing
//!   file (qcow2 may ignore a partial-cluster discard, zero the cluster, or
//!   unmap it); a discard never supersedes anything;
//! - grow: new sectors read zeros; until a flush completes the disk may
//!   come back with its old size;
//! - flush (and clean close): everything completed before it began is
//!   durable.
//! - snapshot create and delete: a flush (the guest disk does not change);
//!   create records every sector's candidates as the flush left them;
//! - snapshot apply: a flush, then every sector takes the candidates its
//!   snapshot recorded, superseding the rest once the apply completes (a
//!   crash during it may leave either side).
//!
//! Snapshots are modelled for one thread: candidates recorded while
//! another thread has a write in flight keep that write's content too.
//!
//! Per-sector lists are bounded by the number of workload operations.

use std::collections::HashMap;

use crate::medium::SECTOR_BYTES;
use crate::sector_pattern::{Content, Decoded};

/// Sequence number of an operation still in flight.
const IN_FLIGHT: u64 = u64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Candidate {
    Exactly(Content),
    Discarded,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    op: u64,
    candidate: Candidate,
    begin: u64,
    end: u64,
    supersedes: bool,
}

#[derive(Clone, Copy, Debug)]
struct SizeEntry {
    op: u64,
    sectors: u64,
    begin: u64,
    end: u64,
}

#[derive(Clone, Copy, Debug)]
enum InFlight {
    Sectors { first: u64, count: u64 },
    Flush { begin: u64 },
    Grow,
    SnapshotCreate { begin: u64, id: u64 },
    SnapshotApply { begin: u64 },
    SnapshotDelete { begin: u64, id: u64 },
}

/// A guest operation begun in the model; pass it back to
/// [`GuestModel::end`] when the operation returns.
#[derive(Debug, PartialEq, Eq, Hash)]
#[must_use = "an operation never ended stays in flight and weakens the model"]
pub struct OpToken(u64);

impl OpToken {
    /// The write id of a data write (its sectors carry this id).
    #[must_use]
    pub fn write_id(&self) -> u64 {
        self.0
    }
}

/// A guest operation the model cannot accept.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// The range does not fit in the disk as it is now.
    #[error("{operation} of sectors {first}..{first}+{count} is beyond the disk end at sector {sectors}")]
    OutOfRange {
        /// The operation name.
        operation: &'static str,
        /// First sector.
        first: u64,
        /// Sector count.
        count: u64,
        /// The disk size in sectors.
        sectors: u64,
    },
    /// A grow to a size not larger than the current one.
    #[error("grow to {new_sectors} sectors does not grow a disk of {sectors} sectors")]
    NotAGrow {
        /// The requested size in sectors.
        new_sectors: u64,
        /// The current size in sectors.
        sectors: u64,
    },
    /// A snapshot operation naming a snapshot that does not exist, or a
    /// create naming one that does.
    #[error("{operation} of snapshot {id}: {reason}")]
    Snapshot {
        /// The operation name.
        operation: &'static str,
        /// The workload's snapshot number.
        id: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A grow beyond the model's limit.
    #[error("grow to {new_sectors} sectors exceeds the model limit of {limit} sectors")]
    TooLarge {
        /// The requested size in sectors.
        new_sectors: u64,
        /// The limit.
        limit: u64,
    },
}

/// Which check a sector failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorVerdict {
    /// The content is allowed.
    Allowed,
    /// The content was never allowed here: garbage, misplaced data, data
    /// that was never written (check (b)).
    NotAllowed,
    /// The content is older than what the last completed flush made
    /// durable (check (c)).
    FlushedDataLost,
}

/// What a guest disk showed after recovery: its size and every sector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// The disk size.
    pub size_bytes: u64,
    /// The content of every sector below `size_bytes`.
    pub contents: Vec<Content>,
}

/// The allowed contents of every guest sector; see the module docs.
#[derive(Clone, Debug)]
pub struct GuestModel {
    sectors: Vec<Vec<Entry>>,
    sizes: Vec<SizeEntry>,
    backing_sectors: u64,
    sectors_limit: u64,
    seq: u64,
    next_op: u64,
    dirty: Vec<u64>,
    is_dirty: Vec<bool>,
    in_flight: HashMap<u64, InFlight>,
    /// Per snapshot, every sector's candidates when it was made, and the
    /// disk size then (bounded by the workload's live snapshots).
    snapshots: HashMap<u64, Vec<Vec<Candidate>>>,
}

/// The largest disk the model accepts, in sectors (256 MiB): the model
/// holds a list per sector.
pub const MODEL_SECTORS_MAX: u64 = (256 << 20) / SECTOR_BYTES;

impl GuestModel {
    /// A freshly created disk of `size_bytes` (rounded down to sectors)
    /// over a backing file of `backing_bytes` (0: none). Write ids start at
    /// `first_write_id` (at least 1).
    pub fn new(
        size_bytes: u64,
        backing_bytes: u64,
        first_write_id: u64,
    ) -> Result<Self, ModelError> {
        let sectors = size_bytes / SECTOR_BYTES;
        let backing_sectors = backing_bytes / SECTOR_BYTES;
        let initial = if backing_sectors > 0 {
            Content::Backing
        } else {
            Content::Zero
        };
        Self::check_limit(sectors)?;
        let contents = vec![initial; usize::try_from(sectors).unwrap_or(0)];
        Ok(Self::with_contents(
            &contents,
            backing_sectors,
            first_write_id,
        ))
    }

    /// The model of a disk that showed `observed` after recovery: each
    /// sector's durable content is what it showed. Write ids continue at
    /// `first_write_id`.
    pub fn from_observed(
        observed: &Observed,
        backing_bytes: u64,
        first_write_id: u64,
    ) -> Result<Self, ModelError> {
        Self::check_limit(observed.contents.len() as u64)?;
        Ok(Self::with_contents(
            &observed.contents,
            backing_bytes / SECTOR_BYTES,
            first_write_id,
        ))
    }

    fn check_limit(sectors: u64) -> Result<(), ModelError> {
        if sectors > MODEL_SECTORS_MAX {
            return Err(ModelError::TooLarge {
                new_sectors: sectors,
                limit: MODEL_SECTORS_MAX,
            });
        }
        Ok(())
    }

    fn with_contents(contents: &[Content], backing_sectors: u64, first_write_id: u64) -> Self {
        let sectors = contents.len() as u64;
        Self {
            sectors: contents
                .iter()
                .map(|&content| vec![Self::durable_entry(content)])
                .collect(),
            sizes: vec![SizeEntry {
                op: 0,
                sectors,
                begin: 0,
                end: 0,
            }],
            backing_sectors,
            sectors_limit: MODEL_SECTORS_MAX,
            seq: 1,
            next_op: first_write_id.max(1),
            dirty: Vec::new(),
            is_dirty: vec![false; contents.len()],
            in_flight: HashMap::new(),
            snapshots: HashMap::new(),
        }
    }

    fn durable_entry(content: Content) -> Entry {
        Entry {
            op: 0,
            candidate: Candidate::Exactly(content),
            begin: 0,
            end: 0,
            supersedes: true,
        }
    }

    /// The next write id the model will hand out: continuation models must
    /// start there so ids never repeat.
    #[must_use]
    pub fn next_write_id(&self) -> u64 {
        self.next_op
    }

    /// The size in sectors as of the latest begun grow.
    #[must_use]
    pub fn sectors(&self) -> u64 {
        self.sectors.len() as u64
    }

    /// The size of the backing file in sectors (0: none).
    #[must_use]
    pub fn backing_sectors(&self) -> u64 {
        self.backing_sectors
    }

    /// Number of guest operations in flight.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn new_op(&mut self) -> u64 {
        let op = self.next_op;
        self.next_op += 1;
        op
    }

    fn check_range(
        &self,
        operation: &'static str,
        first: u64,
        count: u64,
    ) -> Result<(), ModelError> {
        let sectors = self.sectors();
        let fits = match first.checked_add(count) {
            Some(end) => count > 0 && end <= sectors,
            None => false,
        };
        if !fits {
            return Err(ModelError::OutOfRange {
                operation,
                first,
                count,
                sectors,
            });
        }
        Ok(())
    }

    fn begin_sectors(
        &mut self,
        operation: &'static str,
        first: u64,
        count: u64,
        candidate: Option<Candidate>,
        supersedes: bool,
    ) -> Result<OpToken, ModelError> {
        self.check_range(operation, first, count)?;
        let op = self.new_op();
        let begin = self.tick();
        let candidate = candidate.unwrap_or(Candidate::Exactly(Content::Write(op)));
        for sector in first..first + count {
            let index = sector as usize;
            self.sectors[index].push(Entry {
                op,
                candidate,
                begin,
                end: IN_FLIGHT,
                supersedes,
            });
            if !self.is_dirty[index] {
                self.is_dirty[index] = true;
                self.dirty.push(sector);
            }
        }
        self.in_flight
            .insert(op, InFlight::Sectors { first, count });
        Ok(OpToken(op))
    }

    /// Begins a data write of `count` sectors at `first`; its sectors must
    /// be filled with the pattern of [`OpToken::write_id`].
    pub fn begin_write(&mut self, first: u64, count: u64) -> Result<OpToken, ModelError> {
        self.begin_sectors("write", first, count, None, true)
    }

    /// Begins a write of zeroes.
    pub fn begin_write_zeroes(&mut self, first: u64, count: u64) -> Result<OpToken, ModelError> {
        self.begin_sectors(
            "write-zeroes",
            first,
            count,
            Some(Candidate::Exactly(Content::Zero)),
            true,
        )
    }

    /// Begins a discard.
    pub fn begin_discard(&mut self, first: u64, count: u64) -> Result<OpToken, ModelError> {
        self.begin_sectors("discard", first, count, Some(Candidate::Discarded), false)
    }

    /// Begins a flush (or a clean close, which implies one).
    pub fn begin_flush(&mut self) -> OpToken {
        let op = self.new_op();
        let begin = self.tick();
        self.in_flight.insert(op, InFlight::Flush { begin });
        OpToken(op)
    }

    /// Begins creating snapshot `id`.
    pub fn begin_snapshot_create(&mut self, id: u64) -> Result<OpToken, ModelError> {
        if self.snapshots.contains_key(&id) {
            return Err(ModelError::Snapshot {
                operation: "snapshot create",
                id,
                reason: "it exists already",
            });
        }
        let op = self.new_op();
        let begin = self.tick();
        self.in_flight
            .insert(op, InFlight::SnapshotCreate { begin, id });
        Ok(OpToken(op))
    }

    /// Begins deleting snapshot `id`.
    pub fn begin_snapshot_delete(&mut self, id: u64) -> Result<OpToken, ModelError> {
        self.known_snapshot("snapshot delete", id)?;
        let op = self.new_op();
        let begin = self.tick();
        self.in_flight
            .insert(op, InFlight::SnapshotDelete { begin, id });
        Ok(OpToken(op))
    }

    /// Begins applying snapshot `id`: from now on, each sector may also
    /// read as the snapshot recorded it.
    pub fn begin_snapshot_apply(&mut self, id: u64) -> Result<OpToken, ModelError> {
        self.known_snapshot("snapshot apply", id)?;
        let recorded = &self.snapshots[&id];
        if recorded.len() != self.sectors.len() {
            return Err(ModelError::Snapshot {
                operation: "snapshot apply",
                id,
                reason: "the disk changed size since the snapshot",
            });
        }
        let recorded = recorded.clone();
        let op = self.new_op();
        let begin = self.tick();
        for (sector, candidates) in recorded.into_iter().enumerate() {
            for candidate in candidates {
                self.sectors[sector].push(Entry {
                    op,
                    candidate,
                    begin,
                    end: IN_FLIGHT,
                    supersedes: true,
                });
            }
            if !self.is_dirty[sector] {
                self.is_dirty[sector] = true;
                self.dirty.push(sector as u64);
            }
        }
        self.in_flight.insert(op, InFlight::SnapshotApply { begin });
        Ok(OpToken(op))
    }

    fn known_snapshot(&self, operation: &'static str, id: u64) -> Result<(), ModelError> {
        if self.snapshots.contains_key(&id) {
            Ok(())
        } else {
            Err(ModelError::Snapshot {
                operation,
                id,
                reason: "no such snapshot",
            })
        }
    }

    /// Begins a grow to `new_sectors`.
    pub fn begin_grow(&mut self, new_sectors: u64) -> Result<OpToken, ModelError> {
        let sectors = self.sectors();
        if new_sectors <= sectors {
            return Err(ModelError::NotAGrow {
                new_sectors,
                sectors,
            });
        }
        if new_sectors > self.sectors_limit {
            return Err(ModelError::TooLarge {
                new_sectors,
                limit: self.sectors_limit,
            });
        }
        let op = self.new_op();
        let begin = self.tick();
        // New sectors read zeros: the backing file (if any) ends at the
        // original size, and past the end of a backing file QEMU reads zeros.
        self.sectors.resize_with(new_sectors as usize, || {
            vec![Self::durable_entry(Content::Zero)]
        });
        self.is_dirty.resize(new_sectors as usize, false);
        self.sizes.push(SizeEntry {
            op,
            sectors: new_sectors,
            begin,
            end: IN_FLIGHT,
        });
        self.in_flight.insert(op, InFlight::Grow);
        Ok(OpToken(op))
    }

    /// Ends an operation begun with one of the `begin_` methods.
    pub fn end(&mut self, token: OpToken) {
        let Some(kind) = self.in_flight.remove(&token.0) else {
            return;
        };
        let end = self.tick();
        match kind {
            InFlight::Sectors { first, count } => {
                for sector in first..first + count {
                    if let Some(entry) = self.sectors[sector as usize]
                        .iter_mut()
                        .rev()
                        .find(|e| e.op == token.0)
                    {
                        entry.end = end;
                    }
                }
            }
            InFlight::Grow => {
                if let Some(size) = self.sizes.iter_mut().find(|s| s.op == token.0) {
                    size.end = end;
                }
            }
            InFlight::Flush { begin } => self.complete_flush(begin),
            InFlight::SnapshotCreate { begin, id } => {
                self.complete_flush(begin);
                let recorded = self
                    .sectors
                    .iter()
                    .map(|entries| entries.iter().map(|e| e.candidate).collect())
                    .collect();
                self.snapshots.insert(id, recorded);
            }
            InFlight::SnapshotDelete { begin, id } => {
                self.complete_flush(begin);
                self.snapshots.remove(&id);
            }
            InFlight::SnapshotApply { begin } => {
                // Everything before the apply was made durable by it, and
                // the apply itself is durable when it returns: a flush that
                // began after it ended.
                self.complete_flush(begin);
                for entries in &mut self.sectors {
                    for entry in entries.iter_mut().filter(|e| e.op == token.0) {
                        entry.end = end;
                    }
                }
                let after = self.tick();
                self.complete_flush(after);
            }
        }
    }

    fn complete_flush(&mut self, flush_begin: u64) {
        // A candidate is gone for good when a superseding candidate began
        // after it ended and completed before the flush began: that later
        // content is durable and was written over it.
        let prune = |entries: &mut Vec<Entry>| {
            let threshold = entries
                .iter()
                .filter(|e| e.end < flush_begin && e.supersedes)
                .map(|e| e.begin)
                .max();
            if let Some(threshold) = threshold {
                entries.retain(|e| !(e.end < flush_begin && e.end < threshold));
            }
        };
        let dirty = std::mem::take(&mut self.dirty);
        for sector in dirty {
            let index = sector as usize;
            let Some(entries) = self.sectors.get_mut(index) else {
                continue;
            };
            prune(entries);
            if entries.len() > 1 {
                self.dirty.push(sector);
            } else {
                self.is_dirty[index] = false;
            }
        }
        let threshold = self
            .sizes
            .iter()
            .filter(|s| s.end < flush_begin)
            .map(|s| s.begin)
            .max();
        if let Some(threshold) = threshold {
            self.sizes
                .retain(|s| !(s.end < flush_begin && s.end < threshold));
        }
    }

    /// Whether a recovered disk may have `size_bytes`.
    #[must_use]
    pub fn size_allowed(&self, size_bytes: u64) -> bool {
        size_bytes.is_multiple_of(SECTOR_BYTES)
            && self
                .sizes
                .iter()
                .any(|s| s.sectors * SECTOR_BYTES == size_bytes)
    }

    /// The sizes a recovered disk may have, in bytes.
    #[must_use]
    pub fn allowed_sizes(&self) -> Vec<u64> {
        self.sizes
            .iter()
            .map(|s| s.sectors * SECTOR_BYTES)
            .collect()
    }

    fn matches(&self, sector: u64, candidate: Candidate, content: Content) -> bool {
        let beyond_backing = sector >= self.backing_sectors;
        match (candidate, content) {
            (Candidate::Exactly(want), got) if want == got => true,
            // Past the backing file's end, "backing data" is zeros.
            (Candidate::Exactly(Content::Backing), Content::Zero) => beyond_backing,
            (Candidate::Discarded, Content::Zero) => true,
            (Candidate::Discarded, Content::Backing) => !beyond_backing,
            _ => false,
        }
    }

    /// Judges what `sector` read after a crash.
    #[must_use]
    pub fn check_sector(&self, sector: u64, decoded: Decoded) -> SectorVerdict {
        let Some(entries) = usize::try_from(sector)
            .ok()
            .and_then(|i| self.sectors.get(i))
        else {
            return SectorVerdict::NotAllowed;
        };
        let Decoded::Content(content) = decoded else {
            return SectorVerdict::NotAllowed;
        };
        // Fast path: most sectors have one candidate, matched exactly.
        if let [only] = entries.as_slice() {
            if only.candidate == Candidate::Exactly(content) {
                return SectorVerdict::Allowed;
            }
        }
        if entries
            .iter()
            .any(|e| self.matches(sector, e.candidate, content))
        {
            return SectorVerdict::Allowed;
        }
        match content {
            // Data this sector really held once (the pattern names the
            // sector) or its initial content: old data came back.
            Content::Write(id) if id < self.next_op => SectorVerdict::FlushedDataLost,
            Content::Zero => SectorVerdict::FlushedDataLost,
            Content::Backing if sector < self.backing_sectors => SectorVerdict::FlushedDataLost,
            Content::Backing | Content::Write(_) => SectorVerdict::NotAllowed,
        }
    }

    /// The allowed contents of `sector`, for violation messages.
    #[must_use]
    pub fn describe_allowed(&self, sector: u64) -> String {
        let Some(entries) = usize::try_from(sector)
            .ok()
            .and_then(|i| self.sectors.get(i))
        else {
            return "nothing (beyond the disk)".to_string();
        };
        let names: Vec<String> = entries
            .iter()
            .map(|e| match e.candidate {
                Candidate::Exactly(content) => content.to_string(),
                Candidate::Discarded => "zeros or backing data (discarded)".to_string(),
            })
            .collect();
        names.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_ok(m: &GuestModel, sector: u64, id: u64) -> SectorVerdict {
        m.check_sector(sector, Decoded::Content(Content::Write(id)))
    }

    #[test]
    fn unflushed_writes_are_optional_flushed_ones_required() {
        let mut m = GuestModel::new(8 * 512, 0, 1).unwrap();
        let w1 = m.begin_write(0, 2).unwrap();
        let id1 = w1.write_id();
        m.end(w1);
        let w2 = m.begin_write(1, 1).unwrap();
        let id2 = w2.write_id();
        m.end(w2);
        let zero = Decoded::Content(Content::Zero);
        assert_eq!(m.check_sector(1, zero), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 1, id1), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 1, id2), SectorVerdict::Allowed);
        let f = m.begin_flush();
        m.end(f);
        assert_eq!(m.check_sector(1, zero), SectorVerdict::FlushedDataLost);
        assert_eq!(write_ok(&m, 1, id1), SectorVerdict::FlushedDataLost);
        assert_eq!(write_ok(&m, 1, id2), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 0, id1), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 0, 999), SectorVerdict::NotAllowed);
        assert_eq!(
            m.check_sector(0, Decoded::Garbage),
            SectorVerdict::NotAllowed
        );
    }

    #[test]
    fn an_applied_snapshot_brings_back_what_it_recorded() {
        let mut m = GuestModel::new(4 * 512, 0, 1).unwrap();
        let w1 = m.begin_write(0, 2).unwrap();
        let id1 = w1.write_id();
        m.end(w1);
        let c = m.begin_snapshot_create(7).unwrap();
        m.end(c);
        assert!(m.begin_snapshot_create(7).is_err(), "created twice");
        // The create flushed: the write is required now.
        assert_eq!(
            m.check_sector(0, Decoded::Content(Content::Zero)),
            SectorVerdict::FlushedDataLost
        );
        let w2 = m.begin_write(0, 1).unwrap();
        let id2 = w2.write_id();
        m.end(w2);
        let a = m.begin_snapshot_apply(7).unwrap();
        // During the apply: the old side (w2 or w1) or the snapshot's.
        assert_eq!(write_ok(&m, 0, id2), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 0, id1), SectorVerdict::Allowed);
        m.end(a);
        // After it: only the snapshot's content.
        assert_eq!(write_ok(&m, 0, id1), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 0, id2), SectorVerdict::FlushedDataLost);
        assert_eq!(
            m.check_sector(2, Decoded::Content(Content::Zero)),
            SectorVerdict::Allowed
        );
        let d = m.begin_snapshot_delete(7).unwrap();
        m.end(d);
        assert!(m.begin_snapshot_apply(7).is_err(), "deleted");
        assert!(m.begin_snapshot_delete(7).is_err(), "deleted");
    }

    #[test]
    fn a_write_in_flight_at_flush_begin_is_not_required() {
        let mut m = GuestModel::new(4 * 512, 0, 1).unwrap();
        let w = m.begin_write(0, 1).unwrap();
        let id = w.write_id();
        let f = m.begin_flush();
        m.end(w);
        m.end(f);
        assert_eq!(
            m.check_sector(0, Decoded::Content(Content::Zero)),
            SectorVerdict::Allowed
        );
        assert_eq!(write_ok(&m, 0, id), SectorVerdict::Allowed);
    }

    #[test]
    fn overlapping_concurrent_writes_both_stay_allowed() {
        let mut m = GuestModel::new(4 * 512, 0, 1).unwrap();
        let a = m.begin_write(0, 1).unwrap();
        let b = m.begin_write(0, 1).unwrap();
        let (ia, ib) = (a.write_id(), b.write_id());
        m.end(b);
        m.end(a);
        let f = m.begin_flush();
        m.end(f);
        assert_eq!(write_ok(&m, 0, ia), SectorVerdict::Allowed);
        assert_eq!(write_ok(&m, 0, ib), SectorVerdict::Allowed);
        assert_eq!(
            m.check_sector(0, Decoded::Content(Content::Zero)),
            SectorVerdict::FlushedDataLost
        );
    }

    #[test]
    fn discard_allows_old_zero_or_backing_and_write_zeroes_only_zero() {
        let mut m = GuestModel::new(4 * 512, 4 * 512, 1).unwrap();
        let d = m.begin_discard(0, 1).unwrap();
        m.end(d);
        let z = m.begin_write_zeroes(1, 1).unwrap();
        m.end(z);
        let f = m.begin_flush();
        m.end(f);
        for content in [Content::Zero, Content::Backing] {
            assert_eq!(
                m.check_sector(0, Decoded::Content(content)),
                SectorVerdict::Allowed
            );
        }
        assert_eq!(
            m.check_sector(1, Decoded::Content(Content::Zero)),
            SectorVerdict::Allowed
        );
        assert_eq!(
            m.check_sector(1, Decoded::Content(Content::Backing)),
            SectorVerdict::FlushedDataLost
        );
    }

    #[test]
    fn grow_allows_old_size_until_flushed_and_new_sectors_read_zero() {
        let mut m = GuestModel::new(4 * 512, 4 * 512, 1).unwrap();
        let g = m.begin_grow(8).unwrap();
        m.end(g);
        assert!(m.size_allowed(4 * 512) && m.size_allowed(8 * 512));
        assert_eq!(
            m.check_sector(6, Decoded::Content(Content::Zero)),
            SectorVerdict::Allowed
        );
        assert_eq!(
            m.check_sector(6, Decoded::Content(Content::Backing)),
            SectorVerdict::NotAllowed
        );
        let f = m.begin_flush();
        m.end(f);
        assert!(!m.size_allowed(4 * 512) && m.size_allowed(8 * 512));
        assert_eq!(
            m.begin_grow(8).unwrap_err(),
            ModelError::NotAGrow {
                new_sectors: 8,
                sectors: 8
            }
        );
        assert!(matches!(
            m.begin_write(7, 2),
            Err(ModelError::OutOfRange { .. })
        ));
    }

    #[test]
    fn model_from_observed_requires_what_was_seen() {
        let observed = Observed {
            size_bytes: 1024,
            contents: vec![Content::Write(3), Content::Zero],
        };
        let m = GuestModel::from_observed(&observed, 0, 10).unwrap();
        assert_eq!(write_ok(&m, 0, 3), SectorVerdict::Allowed);
        assert_eq!(
            m.check_sector(0, Decoded::Content(Content::Zero)),
            SectorVerdict::FlushedDataLost
        );
        assert_eq!(m.next_write_id(), 10);
        assert!(m.size_allowed(1024));
    }
}
