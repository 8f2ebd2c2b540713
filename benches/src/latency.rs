//! Latency samples and percentiles.

/// Per-operation latencies in nanoseconds, bounded in memory by the number
/// of operations a run makes.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples_ns: Vec<u64>,
}

impl Latencies {
    /// Records one operation.
    pub fn record(&mut self, ns: u64) {
        self.samples_ns.push(ns);
    }

    /// Adds another run's samples.
    pub fn merge(&mut self, other: Latencies) {
        self.samples_ns.extend(other.samples_ns);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples_ns.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples_ns.is_empty()
    }

    /// The `p`-th percentile (0..=100) in microseconds, nearest rank.
    pub fn percentile_us(&self, p: f64) -> Option<f64> {
        if self.samples_ns.is_empty() {
            return None;
        }
        let mut sorted = self.samples_ns.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize - 1;
        Some(sorted[rank.min(sorted.len() - 1)] as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut l = Latencies::default();
        for i in 1..=100 {
            l.record(i * 1000);
        }
        assert_eq!(l.percentile_us(50.0), Some(50.0));
        assert_eq!(l.percentile_us(99.0), Some(99.0));
        assert_eq!(l.percentile_us(100.0), Some(100.0));
        assert_eq!(Latencies::default().percentile_us(50.0), None);
    }
}
