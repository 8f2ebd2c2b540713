//! Workload generation: random guest operations from a seed.
//!
//! A workload is one list of guest operations per thread, in guest sectors
//! (512 bytes; see [`crate::sector_pattern`]). Sizes range from one sector
//! through partial and whole clusters to several clusters, at any sector
//! alignment. Placement mixes uniform offsets, rewrites near recent writes
//! (copy-on-write over a backing file, partial-cluster rewrites), reuse of
//! recently discarded ranges, and a moving frontier that keeps touching
//! fresh guest space (new L2 tables, refcount growth). Thread 0 alone
//! grows the disk; other threads stay inside the initial size, so no
//! operation ever depends on another thread's grow.
//!
//! Operation-list syntax (for reproducers): `w<sector>+<count>` write,
//! `z<sector>+<count>` write zeroes, `d<sector>+<count>` discard, `f` flush,
//! `g<sectors>` grow to `sectors`, `sc<n>`, `sa<n>`, `sd<n>` create, apply
//! and delete internal snapshot `n`; operations separated by `,`, threads
//! by `|`. Example: `w0+8,f,d4+2,g4096|w9+1`.
//!
//! Snapshot operations (the `snapshot` preset) come from thread 0 only,
//! never with grows: a snapshot is applied at the size it was made at.
//! Targets without internal snapshots run them as flushes
//! ([`Workload::without_snapshots`]).

use std::fmt;
use std::str::FromStr;

use crate::error::{NameError, ParseError};
use crate::medium::SECTOR_BYTES;
use crate::rng::{mix, Rng};

/// Most operations one workload thread may hold.
pub const OPS_PER_THREAD_MAX: u32 = 100_000;
/// Most workload threads.
pub const THREADS_MAX: u32 = 16;

/// One guest operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestOp {
    /// Write `count` sectors of fresh data at `sector`.
    Write {
        /// First guest sector.
        sector: u64,
        /// Sector count.
        count: u64,
    },
    /// Write zeroes.
    WriteZeroes {
        /// First guest sector.
        sector: u64,
        /// Sector count.
        count: u64,
    },
    /// Discard.
    Discard {
        /// First guest sector.
        sector: u64,
        /// Sector count.
        count: u64,
    },
    /// Flush.
    Flush,
    /// Grow the disk to `sectors`.
    Grow {
        /// New size in sectors.
        sectors: u64,
    },
    /// Create internal snapshot `id` of the disk as it is (after a flush).
    SnapshotCreate {
        /// The workload's snapshot number.
        id: u64,
    },
    /// Revert the disk to snapshot `id`.
    SnapshotApply {
        /// The workload's snapshot number.
        id: u64,
    },
    /// Delete snapshot `id`.
    SnapshotDelete {
        /// The workload's snapshot number.
        id: u64,
    },
}

impl fmt::Display for GuestOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            GuestOp::Write { sector, count } => write!(f, "w{sector}+{count}"),
            GuestOp::WriteZeroes { sector, count } => write!(f, "z{sector}+{count}"),
            GuestOp::Discard { sector, count } => write!(f, "d{sector}+{count}"),
            GuestOp::Flush => f.write_str("f"),
            GuestOp::Grow { sectors } => write!(f, "g{sectors}"),
            GuestOp::SnapshotCreate { id } => write!(f, "sc{id}"),
            GuestOp::SnapshotApply { id } => write!(f, "sa{id}"),
            GuestOp::SnapshotDelete { id } => write!(f, "sd{id}"),
        }
    }
}

fn parse_error(text: &str, position: usize, reason: &str) -> ParseError {
    ParseError {
        what: "operation list",
        text: text.to_string(),
        position,
        reason: format!(
            "{reason} (valid: w<sector>+<count>, z<sector>+<count>, d<sector>+<count>, f, g<sectors>, sc<n>, sa<n>, sd<n>; ',' between operations, '|' between threads)"
        ),
    }
}

fn parse_op(whole: &str, token: &str, position: usize) -> Result<GuestOp, ParseError> {
    let number = |text: &str, at: usize| -> Result<u64, ParseError> {
        text.parse::<u64>()
            .map_err(|_| parse_error(whole, at, &format!("{text:?} is not a number")))
    };
    let mut chars = token.chars();
    let kind = chars
        .next()
        .ok_or_else(|| parse_error(whole, position, "empty operation"))?;
    let rest = chars.as_str();
    let range = |rest: &str| -> Result<(u64, u64), ParseError> {
        let (sector, count) = rest
            .split_once('+')
            .ok_or_else(|| parse_error(whole, position, "missing '+<count>'"))?;
        let sector = number(sector, position + 1)?;
        let count = number(count, position + 2 + rest.find('+').unwrap_or(0))?;
        if count == 0 {
            return Err(parse_error(whole, position, "count must be at least 1"));
        }
        Ok((sector, count))
    };
    match kind {
        'w' => range(rest).map(|(sector, count)| GuestOp::Write { sector, count }),
        'z' => range(rest).map(|(sector, count)| GuestOp::WriteZeroes { sector, count }),
        'd' => range(rest).map(|(sector, count)| GuestOp::Discard { sector, count }),
        'f' if rest.is_empty() => Ok(GuestOp::Flush),
        'g' => Ok(GuestOp::Grow {
            sectors: number(rest, position + 1)?,
        }),
        's' => {
            let mut chars = rest.chars();
            let which = chars.next();
            let id = number(chars.as_str(), position + 2)?;
            match which {
                Some('c') => Ok(GuestOp::SnapshotCreate { id }),
                Some('a') => Ok(GuestOp::SnapshotApply { id }),
                Some('d') => Ok(GuestOp::SnapshotDelete { id }),
                _ => Err(parse_error(
                    whole,
                    position,
                    &format!("unknown operation {token:?}"),
                )),
            }
        }
        _ => Err(parse_error(
            whole,
            position,
            &format!("unknown operation {token:?}"),
        )),
    }
}

/// The operations of every thread.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Workload {
    /// One operation list per thread.
    pub threads: Vec<Vec<GuestOp>>,
}

impl Workload {
    /// A single-threaded workload.
    #[must_use]
    pub fn single(ops: Vec<GuestOp>) -> Self {
        Self { threads: vec![ops] }
    }

    /// Total operations over all threads.
    #[must_use]
    pub fn len(&self) -> usize {
        self.threads.iter().map(Vec::len).sum()
    }

    /// Whether there is no operation at all.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same workload with every snapshot operation replaced by a
    /// flush (each begins with one): for targets without internal
    /// snapshots, and for continuations, whose recovered image may hold
    /// snapshots the new model does not know.
    #[must_use]
    pub fn without_snapshots(&self) -> Self {
        let threads = self
            .threads
            .iter()
            .map(|ops| {
                ops.iter()
                    .map(|&op| match op {
                        GuestOp::SnapshotCreate { .. }
                        | GuestOp::SnapshotApply { .. }
                        | GuestOp::SnapshotDelete { .. } => GuestOp::Flush,
                        other => other,
                    })
                    .collect()
            })
            .collect();
        Self { threads }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (t, ops) in self.threads.iter().enumerate() {
            if t > 0 {
                f.write_str("|")?;
            }
            for (i, op) in ops.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{op}")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Workload {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let mut threads = Vec::new();
        let mut position = 0usize;
        for thread in text.split('|') {
            if threads.len() >= THREADS_MAX as usize {
                return Err(parse_error(
                    text,
                    position,
                    &format!("more than {THREADS_MAX} threads"),
                ));
            }
            let mut ops = Vec::new();
            for token in thread.split(',') {
                let trimmed = token.trim();
                if !trimmed.is_empty() {
                    if ops.len() >= OPS_PER_THREAD_MAX as usize {
                        return Err(parse_error(text, position, "too many operations"));
                    }
                    ops.push(parse_op(text, trimmed, position)?);
                }
                position += token.len() + 1;
            }
            threads.push(ops);
        }
        Ok(Self { threads })
    }
}

/// Relative frequencies of operation kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpWeights {
    /// Data writes.
    pub write: u32,
    /// Writes of zeroes.
    pub write_zeroes: u32,
    /// Discards.
    pub discard: u32,
    /// Flushes.
    pub flush: u32,
    /// Grows (thread 0 only, while below the maximum size).
    pub grow: u32,
    /// Snapshot create, apply or delete (thread 0 only).
    pub snapshot: u32,
}

/// Relative frequencies of where an operation lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlacementWeights {
    /// Anywhere in the disk.
    pub uniform: u32,
    /// In the cluster of a recent write (rewrite, copy-on-write).
    pub near_recent: u32,
    /// At a recently discarded range (cluster reuse).
    pub discarded: u32,
    /// At the moving frontier of fresh space.
    pub frontier: u32,
}

/// Workload presets by name.
pub const WORKLOAD_NAMES: &[&str] = &["mixed", "alloc", "overwrite", "discard", "grow", "snapshot"];

/// How to generate a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadConfig {
    /// Preset name (reproducer lines carry it).
    pub name: String,
    /// Initial guest disk size.
    pub size_bytes: u64,
    /// Largest size grows may reach.
    pub size_max_bytes: u64,
    /// The image's cluster size: sizes and alignments are drawn around it.
    pub cluster_bytes: u64,
    /// Operations per thread.
    pub ops_per_thread: u32,
    /// Workload threads (1: deterministic).
    pub threads: u32,
    /// Whether the image has a backing file.
    pub backing: bool,
    /// Operation kinds.
    pub weights: OpWeights,
    /// Placements.
    pub placement: PlacementWeights,
    /// Largest write, in clusters.
    pub write_clusters_max: u32,
}

impl WorkloadConfig {
    /// The preset `name` (see [`WORKLOAD_NAMES`]) with default sizes: a
    /// 1 MiB disk growing up to 4 MiB, 4 KiB clusters, 120 operations, one
    /// thread, no backing file.
    pub fn preset(name: &str) -> Result<Self, NameError> {
        let weights = |write, write_zeroes, discard, flush, grow| OpWeights {
            write,
            write_zeroes,
            discard,
            flush,
            grow,
            snapshot: 0,
        };
        let placement = |uniform, near_recent, discarded, frontier| PlacementWeights {
            uniform,
            near_recent,
            discarded,
            frontier,
        };
        let (weights, placement) = match name {
            "mixed" => (weights(60, 5, 8, 20, 2), placement(40, 25, 10, 25)),
            "alloc" => (weights(80, 0, 0, 15, 5), placement(10, 5, 0, 85)),
            "overwrite" => (weights(70, 3, 0, 27, 0), placement(10, 85, 0, 5)),
            "discard" => (weights(50, 10, 25, 15, 0), placement(25, 25, 40, 10)),
            "grow" => (weights(50, 0, 5, 25, 20), placement(20, 10, 5, 65)),
            // Snapshots made, applied and deleted between writes that copy
            // shared clusters; no grow (a snapshot is applied at its size).
            "snapshot" => (
                OpWeights {
                    snapshot: 12,
                    ..weights(60, 4, 6, 10, 0)
                },
                placement(40, 35, 5, 20),
            ),
            _ => return Err(NameError::new("workload", name, WORKLOAD_NAMES)),
        };
        Ok(Self {
            name: name.to_string(),
            size_bytes: 1 << 20,
            size_max_bytes: 4 << 20,
            cluster_bytes: 4096,
            ops_per_thread: 120,
            threads: 1,
            backing: false,
            weights,
            placement,
            write_clusters_max: 4,
        })
    }

    /// Checks the sizes and bounds; the message names the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.size_bytes < SECTOR_BYTES || !self.size_bytes.is_multiple_of(SECTOR_BYTES) {
            return Err(format!(
                "size_bytes {} is not a positive multiple of 512",
                self.size_bytes
            ));
        }
        if self.size_max_bytes < self.size_bytes
            || !self.size_max_bytes.is_multiple_of(SECTOR_BYTES)
        {
            return Err(format!(
                "size_max_bytes {} is below size_bytes or not a multiple of 512",
                self.size_max_bytes
            ));
        }
        if self.size_max_bytes > crate::guest_model::MODEL_SECTORS_MAX * SECTOR_BYTES {
            return Err(format!(
                "size_max_bytes {} exceeds 256 MiB",
                self.size_max_bytes
            ));
        }
        if self.cluster_bytes < SECTOR_BYTES || !self.cluster_bytes.is_power_of_two() {
            return Err(format!(
                "cluster_bytes {} is not a power of two >= 512",
                self.cluster_bytes
            ));
        }
        if self.threads == 0 || self.threads > THREADS_MAX {
            return Err(format!(
                "threads {} is not in 1..={THREADS_MAX}",
                self.threads
            ));
        }
        if self.ops_per_thread > OPS_PER_THREAD_MAX {
            return Err(format!(
                "ops_per_thread {} exceeds {OPS_PER_THREAD_MAX}",
                self.ops_per_thread
            ));
        }
        if self.write_clusters_max == 0 {
            return Err("write_clusters_max must be at least 1".to_string());
        }
        Ok(())
    }

    /// The backing file size: the initial disk size, or 0 without one.
    #[must_use]
    pub fn backing_bytes(&self) -> u64 {
        if self.backing {
            self.size_bytes
        } else {
            0
        }
    }

    /// Generates the workload of `seed`.
    #[must_use]
    pub fn generate(&self, seed: u64) -> Workload {
        Workload {
            threads: (0..self.threads)
                .map(|t| Generator::new(self, mix(seed, u64::from(t)), t == 0).run())
                .collect(),
        }
    }
}

/// Ranges remembered for rewrites and reuse.
const RECENT_MAX: usize = 16;

struct Generator<'a> {
    config: &'a WorkloadConfig,
    rng: Rng,
    may_grow: bool,
    sectors: u64,
    cluster_sectors: u64,
    recent: Vec<u64>,
    discarded: Vec<u64>,
    frontier: u64,
    /// Snapshots that exist at this point of the list (thread 0 only).
    snapshots: Vec<u64>,
    next_snapshot: u64,
}

/// Most snapshots a generated workload keeps at once: each costs the model
/// a copy of the disk's candidates.
const SNAPSHOTS_LIVE_MAX: usize = 3;

impl<'a> Generator<'a> {
    fn new(config: &'a WorkloadConfig, seed: u64, may_grow: bool) -> Self {
        let mut rng = Rng::new(seed);
        let sectors = config.size_bytes / SECTOR_BYTES;
        let frontier = rng.below(sectors);
        Self {
            config,
            rng,
            may_grow,
            sectors,
            cluster_sectors: (config.cluster_bytes / SECTOR_BYTES).max(1),
            recent: Vec::new(),
            discarded: Vec::new(),
            frontier,
            snapshots: Vec::new(),
            next_snapshot: 1,
        }
    }

    /// A snapshot operation: create while there is none (or by chance
    /// while below the limit), else apply or delete one that exists.
    fn snapshot_op(&mut self) -> GuestOp {
        let create = self.snapshots.is_empty()
            || (self.snapshots.len() < SNAPSHOTS_LIVE_MAX && self.rng.chance(1, 2));
        if create {
            let id = self.next_snapshot;
            self.next_snapshot += 1;
            self.snapshots.push(id);
            return GuestOp::SnapshotCreate { id };
        }
        let slot = self.rng.below(self.snapshots.len() as u64) as usize;
        let id = self.snapshots[slot];
        if self.rng.chance(2, 3) {
            GuestOp::SnapshotApply { id }
        } else {
            self.snapshots.swap_remove(slot);
            GuestOp::SnapshotDelete { id }
        }
    }

    fn remember(list: &mut Vec<u64>, sector: u64, rng: &mut Rng) {
        if list.len() < RECENT_MAX {
            list.push(sector);
        } else {
            let slot = rng.below(RECENT_MAX as u64) as usize;
            list[slot] = sector;
        }
    }

    fn count(&mut self) -> u64 {
        let cs = self.cluster_sectors;
        let most = cs * u64::from(self.config.write_clusters_max);
        let count = match self.rng.below(5) {
            0 => 1,
            1 => self.rng.range_inclusive(2, cs.saturating_sub(1).max(2)),
            2 => cs,
            3 => {
                cs * self
                    .rng
                    .range_inclusive(2, u64::from(self.config.write_clusters_max).max(2))
            }
            _ => self.rng.range_inclusive(1, most),
        };
        count.clamp(1, self.sectors)
    }

    fn place(&mut self, count: u64) -> u64 {
        let p = self.config.placement;
        let choice = self
            .rng
            .weighted(&[p.uniform, p.near_recent, p.discarded, p.frontier])
            .unwrap_or(0);
        let cs = self.cluster_sectors;
        let sector = match choice {
            1 if !self.recent.is_empty() => {
                let base = self.recent[self.rng.below(self.recent.len() as u64) as usize];
                base / cs * cs + self.rng.below(cs)
            }
            2 if !self.discarded.is_empty() => {
                self.discarded[self.rng.below(self.discarded.len() as u64) as usize]
            }
            3 => {
                let sector = self.frontier;
                self.frontier = (self.frontier + count) % self.sectors;
                sector
            }
            _ => self.rng.below(self.sectors),
        };
        // One in three lands cluster-aligned, the rest at any sector.
        let sector = if self.rng.chance(1, 3) {
            sector / cs * cs
        } else {
            sector
        };
        sector.min(self.sectors - count)
    }

    fn run(mut self) -> Vec<GuestOp> {
        let w = self.config.weights;
        let max_sectors = self.config.size_max_bytes / SECTOR_BYTES;
        let mut ops = Vec::with_capacity(self.config.ops_per_thread as usize);
        for _ in 0..self.config.ops_per_thread {
            let grow = if self.may_grow && self.sectors < max_sectors {
                w.grow
            } else {
                0
            };
            let snapshot = if self.may_grow { w.snapshot } else { 0 };
            let kind = self
                .rng
                .weighted(&[w.write, w.write_zeroes, w.discard, w.flush, grow, snapshot])
                .unwrap_or(3);
            let op = match kind {
                0..=2 => {
                    let count = self.count();
                    let sector = self.place(count);
                    match kind {
                        0 => {
                            Self::remember(&mut self.recent, sector, &mut self.rng);
                            GuestOp::Write { sector, count }
                        }
                        1 => GuestOp::WriteZeroes { sector, count },
                        _ => {
                            Self::remember(&mut self.discarded, sector, &mut self.rng);
                            GuestOp::Discard { sector, count }
                        }
                    }
                }
                4 => {
                    let step = self.cluster_sectors * self.rng.range_inclusive(1, 64);
                    let step = if self.rng.chance(1, 4) {
                        self.sectors
                    } else {
                        step
                    };
                    self.sectors = (self.sectors + step).min(max_sectors);
                    GuestOp::Grow {
                        sectors: self.sectors,
                    }
                }
                5 => self.snapshot_op(),
                _ => GuestOp::Flush,
            };
            ops.push(op);
        }
        ops
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_generate_valid_varied_deterministic_workloads() {
        for name in WORKLOAD_NAMES {
            let mut config = WorkloadConfig::preset(name).unwrap();
            config.threads = 2;
            config.validate().unwrap();
            let a = config.generate(11);
            assert_eq!(a, config.generate(11), "{name}");
            assert_ne!(a, config.generate(12), "{name}");
            assert_eq!(a.len(), 240);
            let mut sectors = config.size_bytes / 512;
            for (t, ops) in a.threads.iter().enumerate() {
                for op in ops {
                    match *op {
                        GuestOp::Write { sector, count }
                        | GuestOp::WriteZeroes { sector, count }
                        | GuestOp::Discard { sector, count } => {
                            let limit = if t == 0 {
                                sectors
                            } else {
                                config.size_bytes / 512
                            };
                            assert!(count >= 1 && sector + count <= limit, "{name}: {op}");
                        }
                        GuestOp::Grow { sectors: new } => {
                            assert_eq!(t, 0, "only thread 0 grows");
                            assert!(new > sectors && new <= config.size_max_bytes / 512);
                            sectors = new;
                        }
                        GuestOp::Flush => {}
                        GuestOp::SnapshotCreate { .. }
                        | GuestOp::SnapshotApply { .. }
                        | GuestOp::SnapshotDelete { .. } => {
                            assert_eq!(t, 0, "only thread 0 takes snapshots");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn the_snapshot_preset_creates_applies_and_deletes_live_snapshots_only() {
        let mut config = WorkloadConfig::preset("snapshot").unwrap();
        config.threads = 2;
        let workload = config.generate(1);
        let mut live = std::collections::BTreeSet::new();
        let (mut creates, mut applies, mut deletes) = (0, 0, 0);
        for op in &workload.threads[0] {
            match *op {
                GuestOp::SnapshotCreate { id } => {
                    assert!(live.insert(id), "{op}: created twice");
                    assert!(live.len() <= SNAPSHOTS_LIVE_MAX);
                    creates += 1;
                }
                GuestOp::SnapshotApply { id } => {
                    assert!(live.contains(&id), "{op}: no such snapshot");
                    applies += 1;
                }
                GuestOp::SnapshotDelete { id } => {
                    assert!(live.remove(&id), "{op}: no such snapshot");
                    deletes += 1;
                }
                GuestOp::Grow { .. } => panic!("{op}: snapshots are applied at their size"),
                _ => {}
            }
        }
        assert!(creates > 0 && applies > 0 && deletes > 0, "{workload}");
        let flushes_before = workload.threads[0]
            .iter()
            .filter(|op| **op == GuestOp::Flush)
            .count();
        let plain = workload.without_snapshots();
        assert_eq!(
            plain.threads[0]
                .iter()
                .filter(|op| **op == GuestOp::Flush)
                .count(),
            flushes_before + creates + applies + deletes
        );
        assert!(workload.threads[1].iter().all(|op| !matches!(
            op,
            GuestOp::SnapshotCreate { .. }
                | GuestOp::SnapshotApply { .. }
                | GuestOp::SnapshotDelete { .. }
        )));
    }

    #[test]
    fn writes_cover_partial_and_whole_clusters_at_any_alignment() {
        let config = WorkloadConfig::preset("mixed").unwrap();
        let ops = config.generate(5).threads.remove(0);
        let cs = config.cluster_bytes / 512;
        let writes: Vec<(u64, u64)> = ops
            .iter()
            .filter_map(|op| match *op {
                GuestOp::Write { sector, count } => Some((sector, count)),
                _ => None,
            })
            .collect();
        assert!(writes.iter().any(|&(_, c)| c < cs), "partial cluster");
        assert!(writes.iter().any(|&(_, c)| c == cs), "whole cluster");
        assert!(writes.iter().any(|&(_, c)| c > cs), "several clusters");
        assert!(writes.iter().any(|&(s, _)| s % cs != 0), "unaligned");
        assert!(writes.iter().any(|&(s, _)| s % cs == 0), "aligned");
    }

    #[test]
    fn operation_lists_round_trip_and_bad_text_is_a_typed_error() {
        let text = "w0+8,f,z3+1,d4+2,g4096,sc1,w1+1,sa1,sd1|w9+1";
        let workload: Workload = text.parse().unwrap();
        assert_eq!(workload.to_string(), text);
        assert_eq!(workload.threads.len(), 2);
        for bad in ["x1", "w1", "w1+0", "wa+1", "g", "f1", "s1", "sx1", "sc"] {
            let err = bad.parse::<Workload>().unwrap_err();
            assert!(err.to_string().contains("valid:"), "{bad}: {err}");
        }
        assert!(WorkloadConfig::preset("nope")
            .unwrap_err()
            .to_string()
            .contains("mixed"));
    }
}
