//! The crash states of one crash point: which pending sectors survived.
//!
//! A crash point's pending operations split into units: one per device
//! sector each write touches (a power cut tears writes at sector
//! granularity) and one per length change. A crash state is a subset of
//! units, applied in operation order on top of the durable medium (a later
//! write to the same sector wins when both are kept, as on a real device).
//!
//! When the units are few (at most the exhaustive bound, default
//! [`EXHAUSTIVE_UNITS_DEFAULT`]) every subset is a state and state `S` is
//! the bit mask `S`. Beyond, states are sampled: state 0 keeps nothing,
//! state 1 keeps everything, and state `S >= 2` is drawn from a generator
//! seeded with the crash point's seed and `S`, rotating through four
//! strategies that find different bugs: independent sectors, an in-order
//! prefix (an ordered write-back cache), whole writes only (no tearing), and
//! whole writes with one write torn.

use std::collections::HashMap;
use std::io;

use crate::medium::{Medium, SECTOR_BYTES};
use crate::rng::{mix, Rng};
use crate::sim_device::{CrashSnapshot, PendingOp};

/// Default exhaustive bound: up to this many units, every subset (1,024
/// states) is explored.
pub const EXHAUSTIVE_UNITS_DEFAULT: u32 = 10;

/// Largest exhaustive bound accepted (2^20 states per crash point).
pub const EXHAUSTIVE_UNITS_LIMIT: u32 = 20;

#[derive(Clone, Copy, Debug)]
enum UnitKind {
    Sector {
        offset: u64,
        data_start: usize,
        data_end: usize,
    },
    SetLen {
        len_bytes: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct Unit {
    op: usize,
    kind: UnitKind,
}

/// How the states of a crash point are enumerated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSpace {
    /// Every subset of `units` units: state `S` is the bit mask `S`.
    Exhaustive {
        /// Number of units.
        units: u32,
    },
    /// `states` seeded samples.
    Sampled {
        /// Number of states.
        states: u64,
    },
}

impl StateSpace {
    /// The space for `units` units: exhaustive up to `exhaustive_units_max`,
    /// otherwise `sampled_states` samples.
    #[must_use]
    pub fn for_units(units: u64, exhaustive_units_max: u32, sampled_states: u64) -> Self {
        let bound = exhaustive_units_max.min(EXHAUSTIVE_UNITS_LIMIT);
        match u32::try_from(units) {
            Ok(units) if units <= bound => StateSpace::Exhaustive { units },
            _ => StateSpace::Sampled {
                states: sampled_states.max(2),
            },
        }
    }

    /// The number of states.
    #[must_use]
    pub fn state_count(&self) -> u64 {
        match *self {
            StateSpace::Exhaustive { units } => 1u64 << units,
            StateSpace::Sampled { states } => states,
        }
    }
}

/// The units of one crash point, ready to build crash images.
#[derive(Clone, Debug)]
pub struct CrashUnits {
    durable: Medium,
    ops: Vec<PendingOp>,
    units: Vec<Unit>,
}

impl CrashUnits {
    /// Splits the pending operations of `snapshot` into units. A sector unit
    /// that rewrites the durable bytes and is the only unit touching its
    /// sector is dropped: keeping it or not gives the same image.
    #[must_use]
    pub fn new(snapshot: &CrashSnapshot) -> Self {
        let mut units = Vec::new();
        for (op_index, op) in snapshot.pending.iter().enumerate() {
            match op {
                PendingOp::Write { offset, data } => {
                    let mut start = 0usize;
                    while start < data.len() {
                        let position = offset.saturating_add(start as u64);
                        let to_sector_end = SECTOR_BYTES - position % SECTOR_BYTES;
                        let end = start
                            .saturating_add(usize::try_from(to_sector_end).unwrap_or(usize::MAX))
                            .min(data.len());
                        units.push(Unit {
                            op: op_index,
                            kind: UnitKind::Sector {
                                offset: position,
                                data_start: start,
                                data_end: end,
                            },
                        });
                        start = end;
                    }
                }
                PendingOp::SetLen { len_bytes } => units.push(Unit {
                    op: op_index,
                    kind: UnitKind::SetLen {
                        len_bytes: *len_bytes,
                    },
                }),
            }
        }
        let mut touches: HashMap<u64, u32> = HashMap::new();
        for unit in &units {
            if let UnitKind::Sector { offset, .. } = unit.kind {
                *touches.entry(offset / SECTOR_BYTES).or_default() += 1;
            }
        }
        let mut scratch = [0u8; SECTOR_BYTES as usize];
        let durable = &snapshot.durable;
        units.retain(|unit| match unit.kind {
            UnitKind::Sector {
                offset,
                data_start,
                data_end,
            } => {
                let alone = touches.get(&(offset / SECTOR_BYTES)) == Some(&1);
                let within =
                    offset.saturating_add((data_end - data_start) as u64) <= durable.len_bytes();
                if !(alone && within) {
                    return true;
                }
                let PendingOp::Write { data, .. } = &snapshot.pending[unit.op] else {
                    return true;
                };
                let bytes = &data[data_start..data_end];
                let current = &mut scratch[..bytes.len()];
                durable.read(current, offset);
                current != bytes
            }
            UnitKind::SetLen { .. } => true,
        });
        Self {
            durable: snapshot.durable.clone(),
            ops: snapshot.pending.clone(),
            units,
        }
    }

    /// Number of units.
    #[must_use]
    pub fn len(&self) -> usize {
        self.units.len()
    }

    /// Whether nothing is pending (a single crash state).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.units.is_empty()
    }

    /// The state space of this crash point.
    #[must_use]
    pub fn space(&self, exhaustive_units_max: u32, sampled_states: u64) -> StateSpace {
        StateSpace::for_units(
            self.units.len() as u64,
            exhaustive_units_max,
            sampled_states,
        )
    }

    /// Which units state `state` keeps; `None` if the space has no such
    /// state. `seed` seeds sampled states.
    #[must_use]
    pub fn selection(&self, space: StateSpace, state: u64, seed: u64) -> Option<Vec<bool>> {
        if state >= space.state_count() {
            return None;
        }
        let n = self.units.len();
        match space {
            StateSpace::Exhaustive { units } => {
                if units as usize != n {
                    return None;
                }
                Some((0..n).map(|bit| (state >> bit) & 1 == 1).collect())
            }
            StateSpace::Sampled { .. } => Some(self.sample(state, seed)),
        }
    }

    fn sample(&self, state: u64, seed: u64) -> Vec<bool> {
        let n = self.units.len();
        match state {
            0 => return vec![false; n],
            1 => return vec![true; n],
            _ => {}
        }
        let mut rng = Rng::new(mix(seed, state));
        let ops = self.ops.len() as u64;
        match state % 4 {
            0 => (0..n).map(|_| rng.chance(1, 2)).collect(),
            1 => {
                let cut = rng.below(n as u64 + 1) as usize;
                (0..n).map(|i| i < cut).collect()
            }
            2 => {
                let kept: Vec<bool> = (0..ops).map(|_| rng.chance(1, 2)).collect();
                self.units.iter().map(|u| kept[u.op]).collect()
            }
            _ => {
                let kept: Vec<bool> = (0..ops).map(|_| rng.chance(1, 2)).collect();
                let torn = rng.below(ops) as usize;
                self.units
                    .iter()
                    .map(|u| {
                        if u.op == torn {
                            rng.chance(1, 2)
                        } else {
                            kept[u.op]
                        }
                    })
                    .collect()
            }
        }
    }

    /// The medium after a crash that kept exactly the selected units.
    pub fn image(&self, selection: &[bool]) -> io::Result<Medium> {
        let mut medium = self.durable.clone();
        for (unit, &keep) in self.units.iter().zip(selection) {
            if !keep {
                continue;
            }
            match (unit.kind, &self.ops[unit.op]) {
                (
                    UnitKind::Sector {
                        offset,
                        data_start,
                        data_end,
                    },
                    PendingOp::Write { data, .. },
                ) => medium.write(&data[data_start..data_end], offset)?,
                (UnitKind::SetLen { len_bytes }, _) => medium.set_len(len_bytes)?,
                (UnitKind::Sector { .. }, PendingOp::SetLen { .. }) => {
                    return Err(io::Error::other("sector unit of a length change"));
                }
            }
        }
        Ok(medium)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim_device::{DeviceConfig, SimDevice};
    use qj_journal::Storage;
    use std::collections::HashSet;

    fn snapshot_of(ops: impl FnOnce(&SimDevice)) -> CrashSnapshot {
        let dev = SimDevice::new(DeviceConfig::default());
        ops(&dev);
        dev.snapshot()
    }

    #[test]
    fn exhaustive_states_are_every_torn_combination() {
        // Two sectors written by one write, one sector by a later write
        // over the first: images must be exactly the in-order subsets.
        let snap = snapshot_of(|d| {
            d.write_at(&[1u8; 1024], 0).unwrap();
            d.write_at(&[2u8; 512], 0).unwrap();
        });
        let units = CrashUnits::new(&snap);
        assert_eq!(units.len(), 3);
        let space = units.space(EXHAUSTIVE_UNITS_DEFAULT, 16);
        assert_eq!(space, StateSpace::Exhaustive { units: 3 });
        let mut images = HashSet::new();
        for state in 0..space.state_count() {
            let sel = units.selection(space, state, 0).unwrap();
            let bytes = units.image(&sel).unwrap().to_bytes();
            let first = bytes.first().copied().unwrap_or(0);
            let second = bytes.get(512).copied().unwrap_or(0);
            images.insert((first, second));
        }
        let want: HashSet<(u8, u8)> = [(0, 0), (1, 0), (0, 1), (1, 1), (2, 0), (2, 1)]
            .into_iter()
            .collect();
        assert_eq!(images, want);
        assert!(units.selection(space, 8, 0).is_none());
    }

    #[test]
    fn unchanged_lonely_sector_is_not_a_unit() {
        let snap = snapshot_of(|d| {
            d.write_at(&[5u8; 512], 0).unwrap();
            d.flush().unwrap();
            d.write_at(&[5u8; 512], 0).unwrap();
            d.write_at(&[6u8; 512], 512).unwrap();
        });
        assert_eq!(CrashUnits::new(&snap).len(), 1);
    }

    #[test]
    fn sampled_states_are_deterministic_and_varied() {
        let snap = snapshot_of(|d| {
            for i in 0..8u64 {
                d.write_at(&[i as u8 + 1; 2048], i * 2048).unwrap();
            }
        });
        let units = CrashUnits::new(&snap);
        assert_eq!(units.len(), 32);
        let space = units.space(10, 64);
        assert_eq!(space, StateSpace::Sampled { states: 64 });
        assert_eq!(units.selection(space, 0, 9).unwrap(), vec![false; 32]);
        assert_eq!(units.selection(space, 1, 9).unwrap(), vec![true; 32]);
        let distinct: HashSet<Vec<bool>> = (0..64)
            .map(|s| units.selection(space, s, 9).unwrap())
            .collect();
        assert!(
            distinct.len() > 40,
            "only {} distinct samples",
            distinct.len()
        );
        for s in 0..64 {
            assert_eq!(units.selection(space, s, 9), units.selection(space, s, 9));
        }
    }

    #[test]
    fn length_changes_are_units_applied_in_order() {
        let snap = snapshot_of(|d| {
            d.write_at(&[1u8; 512], 0).unwrap();
            d.flush().unwrap();
            d.set_len(0).unwrap();
            d.write_at(&[3u8; 512], 1024).unwrap();
        });
        let units = CrashUnits::new(&snap);
        assert_eq!(units.len(), 2);
        let image = units.image(&[true, true]).unwrap();
        assert_eq!(image.len_bytes(), 1536);
        assert_eq!(image.to_bytes()[0], 0, "truncation dropped the old sector");
        assert_eq!(units.image(&[false, true]).unwrap().to_bytes()[0], 1);
    }
}
