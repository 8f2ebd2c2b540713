//! Self-describing guest sector contents.
//!
//! Every 512-byte guest sector the workload writes says which write put it
//! there and which guest sector it belongs to, so checking a crash image is
//! a decode and a look-up in a small allowed set, not a comparison with
//! stored copies. Layout (little-endian words): word 0 is `MAGIC ^ id`,
//! word 1 is `SALT ^ sector`, words 2..64 are `base + i * STEP` with `base`
//! a hash of (id, sector), so a sector torn, shifted or mixed with another
//! does not decode. The backing file uses the same pattern with id
//! [`BACKING_ID`]; zeros decode as [`Content::Zero`].
//!
//! The guest model works at guest-sector granularity (512 bytes), like a
//! real guest: workload requests are 512-byte aligned but of any size and
//! alignment within that, including partial clusters.

use std::fmt;

use crate::medium::SECTOR_BYTES;
use crate::rng::mix;

const MAGIC: u64 = 0x514a_5345_4354_4f52;
const SALT: u64 = 0x6a09_e667_f3bc_c908;
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

/// The write id that marks backing-file content.
pub const BACKING_ID: u64 = u64::MAX;

/// What a guest sector holds, as far as the model is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Content {
    /// All zeros.
    Zero,
    /// The backing file's pattern for this sector.
    Backing,
    /// The data of guest write `id`.
    Write(u64),
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Zero => f.write_str("zeros"),
            Content::Backing => f.write_str("backing data"),
            Content::Write(id) => write!(f, "write #{id}"),
        }
    }
}

/// The result of decoding one sector read from a guest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A well-formed content belonging to this sector.
    Content(Content),
    /// Well-formed data of write `id`, but for guest sector `sector_found`:
    /// a misdirected mapping.
    Misplaced {
        /// The write the data came from.
        id: u64,
        /// The sector it was written to.
        sector_found: u64,
    },
    /// Nothing the workload or the backing file ever wrote (torn, stale
    /// metadata, foreign bytes).
    Garbage,
}

fn base_of(id: u64, sector: u64) -> u64 {
    mix(id, sector)
}

/// Fills one 512-byte sector with the pattern of write `id` at `sector`.
pub fn fill_sector(buf: &mut [u8], id: u64, sector: u64) {
    debug_assert_eq!(buf.len(), SECTOR_BYTES as usize);
    let base = base_of(id, sector);
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        let value = match i {
            0 => MAGIC ^ id,
            1 => SALT ^ sector,
            _ => base.wrapping_add((i as u64).wrapping_mul(STEP)),
        };
        word.copy_from_slice(&value.to_le_bytes());
    }
}

/// Fills `buf` (a whole number of sectors) with the data of write `id`
/// starting at guest sector `first_sector`.
pub fn fill_write(buf: &mut [u8], id: u64, first_sector: u64) {
    for (i, sector) in buf.chunks_exact_mut(SECTOR_BYTES as usize).enumerate() {
        fill_sector(sector, id, first_sector + i as u64);
    }
}

fn le_word(bytes: &[u8]) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(bytes);
    u64::from_le_bytes(le)
}

/// Decodes one 512-byte sector read at guest sector `sector`.
#[must_use]
pub fn decode(buf: &[u8], sector: u64) -> Decoded {
    if buf.len() != SECTOR_BYTES as usize {
        return Decoded::Garbage;
    }
    // This runs for every sector of every crash state: no scratch array,
    // one pass, words compared as they are read.
    let id = le_word(&buf[0..8]) ^ MAGIC;
    let sector_found = le_word(&buf[8..16]) ^ SALT;
    if id == MAGIC && sector_found == SALT {
        // OR-fold without early exit: the compiler vectorises it.
        let any_bits = buf.chunks_exact(8).fold(0u64, |acc, w| acc | le_word(w));
        return if any_bits == 0 {
            Decoded::Content(Content::Zero)
        } else {
            Decoded::Garbage
        };
    }
    let base = base_of(id, sector_found);
    let mut expected = base.wrapping_add(2u64.wrapping_mul(STEP));
    let mut difference = 0u64;
    for word in buf[16..].chunks_exact(8) {
        difference |= le_word(word) ^ expected;
        expected = expected.wrapping_add(STEP);
    }
    if difference != 0 {
        return Decoded::Garbage;
    }
    if sector_found != sector {
        return Decoded::Misplaced { id, sector_found };
    }
    if id == BACKING_ID {
        Decoded::Content(Content::Backing)
    } else {
        Decoded::Content(Content::Write(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_zero_backing_and_writes() {
        let mut buf = vec![0u8; 1024];
        assert_eq!(decode(&buf[..512], 3), Decoded::Content(Content::Zero));
        fill_write(&mut buf, 42, 7);
        assert_eq!(decode(&buf[..512], 7), Decoded::Content(Content::Write(42)));
        assert_eq!(decode(&buf[512..], 8), Decoded::Content(Content::Write(42)));
        assert_eq!(
            decode(&buf[512..], 9),
            Decoded::Misplaced {
                id: 42,
                sector_found: 8
            }
        );
        fill_sector(&mut buf[..512], BACKING_ID, 1);
        assert_eq!(decode(&buf[..512], 1), Decoded::Content(Content::Backing));
    }

    #[test]
    fn any_damage_is_garbage() {
        let mut buf = vec![0u8; 512];
        fill_sector(&mut buf, 5, 5);
        for position in [16usize, 100, 511] {
            let mut damaged = buf.clone();
            damaged[position] ^= 1;
            assert_eq!(decode(&damaged, 5), Decoded::Garbage, "byte {position}");
        }
        let mut mixed = buf.clone();
        let mut other = vec![0u8; 512];
        fill_sector(&mut other, 6, 5);
        mixed[256..].copy_from_slice(&other[256..]);
        assert_eq!(decode(&mixed, 5), Decoded::Garbage);
        assert_eq!(decode(&buf[..100], 5), Decoded::Garbage);
    }
}
