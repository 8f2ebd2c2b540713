//! The guest data of the dedup workloads: which writes repeat content
//! written before, decided deterministically so that every target and
//! every round sees the same stream, and buffers that cost next to nothing
//! to make (the measured time must be the engine's, not the generator's).

/// Bytes of the content id stamped at the start of each buffer.
const ID_BYTES: usize = 8;

/// A stream of whole-cluster buffers in which exactly `duplicate_percent`
/// of every hundred writes (rounded down, counted from the first) repeat
/// the content of an earlier write, and the others are new.
///
/// Every content is one random cluster with its content id in the first
/// eight bytes: distinct ids give distinct SHA-256 hashes, equal ids equal
/// bytes, and no content is all zeros (zero clusters are never indexed).
#[derive(Debug)]
pub struct DuplicateStream {
    duplicate_percent: u64,
    buf: Vec<u8>,
    /// Writes made so far.
    writes: u64,
    /// Distinct contents made so far (ids `0..distinct`).
    distinct: u64,
}

/// SplitMix64's finaliser: a well-mixed 64-bit value from a counter.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl DuplicateStream {
    /// A stream of `cluster_bytes`-sized buffers (at least 16 bytes) with
    /// `duplicate_percent` (at most 100) repeats.
    pub fn new(cluster_bytes: usize, duplicate_percent: u64) -> DuplicateStream {
        let mut buf = vec![0u8; cluster_bytes.max(2 * ID_BYTES)];
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&mix(i as u64).to_le_bytes());
        }
        DuplicateStream {
            duplicate_percent: duplicate_percent.min(100),
            buf,
            writes: 0,
            distinct: 0,
        }
    }

    /// The next write's content, and whether it repeats an earlier one.
    /// Repeats are spread over every earlier content, so lookups hit the
    /// whole index rather than a few hot entries.
    pub fn next_write(&mut self) -> (&[u8], bool) {
        let i = self.writes;
        let p = self.duplicate_percent;
        // Write i repeats when the running count of repeats, i * p / 100
        // rounded down, steps up at i + 1: exactly p in every 100.
        let repeats = self.distinct > 0 && (i + 1) * p / 100 > i * p / 100;
        let id = if repeats {
            mix(i ^ 0x5eed) % self.distinct
        } else {
            self.distinct += 1;
            self.distinct - 1
        };
        self.writes += 1;
        self.buf[..ID_BYTES].copy_from_slice(&id.to_le_bytes());
        (&self.buf, repeats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Runs `writes` writes; returns how many repeated a content seen
    /// before (judged from the bytes) and how many the stream said did.
    fn count_repeats(percent: u64, writes: u64) -> (u64, u64) {
        let mut stream = DuplicateStream::new(4096, percent);
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let (mut by_bytes, mut claimed) = (0, 0);
        for _ in 0..writes {
            let (buf, repeats) = stream.next_write();
            assert!(buf.iter().any(|&b| b != 0), "an all-zero cluster");
            if !seen.insert(buf.to_vec()) {
                by_bytes += 1;
            }
            claimed += u64::from(repeats);
        }
        (by_bytes, claimed)
    }

    #[test]
    fn exactly_the_asked_share_of_writes_repeats_earlier_content() {
        assert_eq!(count_repeats(90, 1000), (900, 900));
        assert_eq!(count_repeats(50, 1000), (500, 500));
        assert_eq!(count_repeats(0, 300), (0, 0));
        // The first write has nothing to repeat.
        assert_eq!(count_repeats(100, 10), (9, 9));
    }

    #[test]
    fn repeats_are_spread_over_earlier_contents() {
        let mut stream = DuplicateStream::new(64, 90);
        let mut ids = HashSet::new();
        for _ in 0..2000 {
            let (buf, repeats) = stream.next_write();
            if repeats {
                ids.insert(buf[..ID_BYTES].to_vec());
            }
        }
        // 200 distinct contents; the repeats must reach most of them.
        assert!(ids.len() > 150, "{} contents repeated", ids.len());
    }

    #[test]
    fn every_stream_is_the_same_stream() {
        let mut a = DuplicateStream::new(256, 50);
        let mut b = DuplicateStream::new(256, 50);
        for _ in 0..100 {
            assert_eq!(a.next_write().0.to_vec(), b.next_write().0.to_vec());
        }
    }
}
