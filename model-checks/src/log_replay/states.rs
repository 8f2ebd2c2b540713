//! The crash states of a log, CrashMonkey's way: the log splits into
//! epochs at its flushes; a crash in epoch `k` keeps everything before its
//! opening flush and any subset of its writes.
//!
//! Per epoch, in this order (the order is the state number, so a state is
//! reproducible by number):
//! - its flush prefix (nothing of the epoch kept);
//! - subsets of its writes, whole writes applied in log order (a later
//!   write to the same bytes wins): every non-empty subset when the epoch
//!   has at most the exhaustive bound of writes (the same bound, and the
//!   same [`StateSpace`] rule, as `qj crash`), seeded samples beyond;
//! - torn writes: for a write of several sectors, the writes before it in
//!   the epoch kept and a seeded part of its sectors (at least one kept and
//!   one lost; alternately independent sectors and an in-order prefix),
//!   `torn_states_max` per epoch, round-robin over its multi-sector writes
//!   (fewer when a write cannot tear in that many ways).

use std::io;
use std::sync::Arc;

use crate::crash_states::StateSpace;
use crate::medium::{Medium, SECTOR_BYTES};
use crate::rng::{mix, Rng};

/// A write of an epoch (discards are writes of zeros).
#[derive(Clone, Debug)]
pub struct EpochWrite {
    /// The log entry it came from.
    pub entry: u64,
    /// Device byte offset.
    pub offset: u64,
    /// The bytes.
    pub data: Arc<[u8]>,
}

/// The writes between two flushes and what was durable before them.
#[derive(Clone, Debug)]
pub struct Epoch {
    /// The entry of the flush that opened the epoch (`None`: the base).
    pub flush_entry: Option<u64>,
    /// The guest view at that flush.
    pub flushed_view: u32,
    /// The device after every entry before the flush.
    pub prefix: Medium,
    /// The writes of the epoch, in log order.
    pub writes: Vec<EpochWrite>,
}

/// Which writes of its epoch a state keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateKind {
    /// None: the device as the flush left it.
    FlushPrefix,
    /// Whole writes, by position in the epoch.
    Subset(Vec<bool>),
    /// Every write before `write` whole, and the sectors of `write` marked.
    Torn {
        /// Position of the torn write in the epoch.
        write: usize,
        /// Which of its sectors persisted.
        sectors: Vec<bool>,
    },
}

/// One crash state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateSpec {
    /// Its epoch.
    pub epoch: usize,
    /// What it keeps.
    pub kind: StateKind,
}

/// How many states to make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateBudget {
    /// Up to this many writes in an epoch, every subset is a state.
    pub exhaustive_writes: u32,
    /// Samples per epoch beyond the bound.
    pub sampled_states: u64,
    /// Torn-write states per epoch.
    pub torn_states_max: u64,
    /// Seeds samples and torn sectors.
    pub seed: u64,
}

fn sectors_of(data: &[u8]) -> usize {
    data.len().div_ceil(SECTOR_BYTES as usize)
}

/// Every state of `epochs`, numbered by position.
#[must_use]
pub fn enumerate(epochs: &[Epoch], budget: &StateBudget) -> Vec<StateSpec> {
    let mut states = Vec::new();
    for (index, epoch) in epochs.iter().enumerate() {
        let state = |kind| StateSpec { epoch: index, kind };
        states.push(state(StateKind::FlushPrefix));
        let n = epoch.writes.len();
        if n == 0 {
            continue;
        }
        let space =
            StateSpace::for_units(n as u64, budget.exhaustive_writes, budget.sampled_states);
        match space {
            StateSpace::Exhaustive { units } => {
                for mask in 1u64..(1u64 << units) {
                    let kept = (0..n).map(|bit| (mask >> bit) & 1 == 1).collect();
                    states.push(state(StateKind::Subset(kept)));
                }
            }
            StateSpace::Sampled { states: count } => {
                for sample in 0..count {
                    let mut rng = Rng::new(mix(budget.seed, mix(index as u64, sample)));
                    // Alternate independent writes with in-order prefixes
                    // (an ordered write-back cache).
                    let kept = if sample.is_multiple_of(2) {
                        (0..n).map(|_| rng.chance(1, 2)).collect()
                    } else {
                        let cut = rng.range_inclusive(1, n as u64) as usize;
                        (0..n).map(|i| i < cut).collect()
                    };
                    states.push(state(StateKind::Subset(kept)));
                }
            }
        }
        let multi: Vec<usize> = (0..n)
            .filter(|&i| sectors_of(&epoch.writes[i].data) > 1)
            .collect();
        if multi.is_empty() {
            continue;
        }
        for variant in 0..budget.torn_states_max {
            // Round-robin over the epoch's multi-sector writes.
            let write = multi[(variant % multi.len() as u64) as usize];
            let round = variant / multi.len() as u64;
            let count = sectors_of(&epoch.writes[write].data);
            // A write of n sectors tears in 2^n - 2 ways; no more rounds.
            let ways = 1u64
                .checked_shl(u32::try_from(count).unwrap_or(u32::MAX))
                .map_or(u64::MAX, |w| w - 2);
            if round >= ways {
                continue;
            }
            let mut rng = Rng::new(mix(budget.seed ^ 0x7e57, mix(index as u64, variant)));
            // Alternate independent sectors with an in-order prefix (a disk
            // that writes a request front to back).
            let mut sectors: Vec<bool> = if round.is_multiple_of(2) {
                (0..count).map(|_| rng.chance(1, 2)).collect()
            } else {
                let cut = rng.range_inclusive(1, count as u64 - 1) as usize;
                (0..count).map(|i| i < cut).collect()
            };
            if sectors.iter().all(|&k| k) || sectors.iter().all(|&k| !k) {
                sectors[0] = !sectors[0];
            }
            states.push(state(StateKind::Torn { write, sectors }));
        }
    }
    states
}

impl StateSpec {
    /// The device of this state.
    pub fn image(&self, epochs: &[Epoch]) -> io::Result<Medium> {
        let epoch = &epochs[self.epoch];
        let mut medium = epoch.prefix.clone();
        match &self.kind {
            StateKind::FlushPrefix => {}
            StateKind::Subset(kept) => {
                for (write, _) in epoch.writes.iter().zip(kept).filter(|(_, &k)| k) {
                    medium.write(&write.data, write.offset)?;
                }
            }
            StateKind::Torn { write, sectors } => {
                for earlier in &epoch.writes[..*write] {
                    medium.write(&earlier.data, earlier.offset)?;
                }
                let torn = &epoch.writes[*write];
                let sector = SECTOR_BYTES as usize;
                for (i, _) in sectors.iter().enumerate().filter(|(_, &k)| k) {
                    let end = ((i + 1) * sector).min(torn.data.len());
                    medium.write(
                        &torn.data[i * sector..end],
                        torn.offset + (i * sector) as u64,
                    )?;
                }
            }
        }
        Ok(medium)
    }

    /// One line: which epoch and which of its log entries persisted.
    #[must_use]
    pub fn describe(&self, epochs: &[Epoch]) -> String {
        let epoch = &epochs[self.epoch];
        let opened = match epoch.flush_entry {
            None => "the base image".to_string(),
            Some(entry) => format!("the flush at entry {entry}"),
        };
        let entries = |kept: &mut dyn Iterator<Item = &EpochWrite>| {
            let list: Vec<String> = kept.map(|w| w.entry.to_string()).collect();
            if list.is_empty() {
                "none".to_string()
            } else {
                list.join(", ")
            }
        };
        let what = match &self.kind {
            StateKind::FlushPrefix => "no later write persisted".to_string(),
            StateKind::Subset(kept) => format!(
                "of its {} writes, entries {} persisted",
                epoch.writes.len(),
                entries(
                    &mut epoch
                        .writes
                        .iter()
                        .zip(kept)
                        .filter(|(_, &k)| k)
                        .map(|(w, _)| w)
                )
            ),
            StateKind::Torn { write, sectors } => format!(
                "entries {} persisted and entry {} was torn: {} of its {} sectors persisted",
                entries(&mut epoch.writes[..*write].iter()),
                epoch.writes[*write].entry,
                sectors.iter().filter(|&&k| k).count(),
                sectors.len()
            ),
        };
        format!("epoch {} after {opened}: {what}", self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(writes: &[(u64, u8, usize)]) -> Epoch {
        Epoch {
            flush_entry: Some(3),
            flushed_view: 0,
            prefix: Medium::from_bytes(&[0u8; 4096]),
            writes: writes
                .iter()
                .enumerate()
                .map(|(i, &(offset, byte, len))| EpochWrite {
                    entry: 4 + i as u64,
                    offset,
                    data: Arc::from(vec![byte; len]),
                })
                .collect(),
        }
    }

    fn budget() -> StateBudget {
        StateBudget {
            exhaustive_writes: 10,
            sampled_states: 8,
            torn_states_max: 4,
            seed: 1,
        }
    }

    #[test]
    fn small_epochs_get_every_subset_and_torn_writes() {
        let epochs = [epoch(&[(0, 1, 1024), (0, 2, 512)])];
        let states = enumerate(&epochs, &budget());
        // Prefix, 3 non-empty subsets, 2 torn (only the first write has
        // several sectors, and two sectors tear in two ways).
        assert_eq!(states.len(), 6);
        let images: Vec<(u8, u8)> = states
            .iter()
            .map(|s| {
                let bytes = s.image(&epochs).unwrap().to_bytes();
                (bytes[0], bytes[512])
            })
            .collect();
        assert_eq!(images[..4], [(0, 0), (1, 1), (2, 0), (2, 1)]);
        for &(first, second) in &images[4..] {
            assert!((first == 1) != (second == 1), "one sector torn: {images:?}");
        }
        // The in-order variant keeps the front sector.
        assert_eq!(images[5], (1, 0));
        assert!(states[4].describe(&epochs).contains("entry 4 was torn"));
        assert!(states[2].describe(&epochs).contains("entries 5 persisted"));
    }

    #[test]
    fn large_epochs_are_sampled_deterministically() {
        let writes: Vec<(u64, u8, usize)> = (0..12).map(|i| (i * 512, i as u8 + 1, 512)).collect();
        let epochs = [epoch(&writes)];
        let states = enumerate(&epochs, &budget());
        assert_eq!(states.len(), 1 + 8);
        assert_eq!(states, enumerate(&epochs, &budget()));
    }
}
