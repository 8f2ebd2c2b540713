//! Choosing crash points: every point if the budget allows, otherwise a
//! seeded random selection that fits the budget.

use std::collections::BTreeMap;

use crate::crash_states::StateSpace;
use crate::rng::Rng;
use crate::sim_device::TraceEntry;
use crate::violation::CrashStep;

/// What to do at a chosen crash point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PointPlan {
    /// One state, or every state of the point.
    pub state: Option<u64>,
    /// What the crash images of this point do next.
    pub next: Plan,
}

/// How a level chooses its crash points and what their images do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Budget-driven random exploration.
    Budget,
    /// Follow these steps exactly (a reproducer); the first is this level's.
    Path(Vec<CrashStep>),
}

/// The pending units at crash point `point` of a trace (entry `i` is
/// operation `i + 1`; point 0 has nothing pending).
pub(crate) fn pending_units_at(trace: &[TraceEntry], point: u64) -> u64 {
    match point.checked_sub(1) {
        None => 0,
        Some(index) => usize::try_from(index)
            .ok()
            .and_then(|i| trace.get(i))
            .map_or(0, |entry| entry.pending_units),
    }
}

/// Chooses crash points in `first..=trace.len()` whose states fit in
/// `budget` (all of them if they fit). Returns the points and the states
/// they are expected to hold.
pub(crate) fn choose_points(
    trace: &[TraceEntry],
    first: u64,
    budget: u64,
    seed: u64,
    exhaustive_units_max: u32,
    sampled_states: u64,
) -> (BTreeMap<u64, PointPlan>, u64) {
    let last = trace.len() as u64;
    let cost = |point: u64| {
        StateSpace::for_units(
            pending_units_at(trace, point),
            exhaustive_units_max,
            sampled_states,
        )
        .state_count()
    };
    let mut points: Vec<u64> = (first..=last).collect();
    let total: u64 = points
        .iter()
        .map(|&p| cost(p))
        .fold(0u64, u64::saturating_add);
    let mut planned = 0u64;
    let mut chosen = BTreeMap::new();
    let plan = PointPlan {
        state: None,
        next: Plan::Budget,
    };
    if total > budget {
        // Fisher-Yates with the seeded generator: a uniform random order.
        let mut rng = Rng::new(seed);
        for i in (1..points.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            points.swap(i, j);
        }
    }
    for point in points {
        let c = cost(point);
        if planned.saturating_add(c) <= budget {
            planned += c;
            chosen.insert(point, plan.clone());
        }
    }
    (chosen, planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim_device::TraceOpKind;

    fn trace(units: &[u64]) -> Vec<TraceEntry> {
        units
            .iter()
            .map(|&pending_units| TraceEntry {
                kind: TraceOpKind::Flush,
                pending_units,
            })
            .collect()
    }

    #[test]
    fn all_points_when_the_budget_allows() {
        let t = trace(&[1, 2, 0, 40]);
        let (points, planned) = choose_points(&t, 1, 1000, 1, 10, 16);
        assert_eq!(points.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(planned, 2 + 4 + 1 + 16);
    }

    #[test]
    fn a_seeded_subset_within_budget_otherwise() {
        let t = trace(&[30; 100]);
        let (points, planned) = choose_points(&t, 0, 160, 7, 10, 16);
        assert_eq!(planned, 160);
        assert_eq!(points.len(), 10);
        let (again, _) = choose_points(&t, 0, 160, 7, 10, 16);
        assert_eq!(points, again);
        let (other, _) = choose_points(&t, 0, 160, 8, 10, 16);
        assert_ne!(points, other);
    }
}
