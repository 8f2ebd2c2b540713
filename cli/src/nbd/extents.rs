//! `base:allocation` for NBD_CMD_BLOCK_STATUS, from the image's map.
//!
//! Zero-flagged and unallocated clusters (with no backing file under them)
//! are holes that read as zeros; everything else (data here, data in the
//! backing file, compressed data) is reported allocated, which the
//! protocol says is always safe.

use qj_engine::{Image, MapExtent};

use super::proto::{Extent, STATE_HOLE, STATE_ZERO};

/// Most descriptors in one reply: the protocol lets a server answer a
/// part of the range, and the client asks again for the rest.
pub const EXTENTS_MAX: usize = 1024;

/// The status flags of one map extent.
#[must_use]
pub fn state_of(e: &MapExtent) -> u32 {
    if e.zero && !e.data {
        STATE_HOLE | STATE_ZERO
    } else {
        0
    }
}

/// The descriptors for `[offset, offset + length)` clipped from `map`,
/// neighbours with equal flags merged, at most [`EXTENTS_MAX`] (or one).
/// The caller has checked that the range is inside the image and not empty.
#[must_use]
pub fn clip(map: &[MapExtent], offset: u64, length: u32, one: bool) -> Vec<Extent> {
    let end = offset + u64::from(length);
    let limit = if one { 1 } else { EXTENTS_MAX };
    let mut out: Vec<Extent> = Vec::new();
    for e in map {
        let (start, stop) = (e.start.max(offset), (e.start + e.length).min(end));
        if start >= stop {
            continue;
        }
        // Within a u32 request, so the piece fits u32.
        let piece = (stop - start) as u32;
        let flags = state_of(e);
        let full = out.len() == limit;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += piece,
            _ if full => break,
            _ => out.push(Extent {
                length: piece,
                flags,
            }),
        }
    }
    if out.is_empty() {
        // The map covers the whole disk, so this only happens if it did
        // not: report the range allocated, which is always correct.
        out.push(Extent { length, flags: 0 });
    }
    out
}

/// Block status of a range of `image`.
pub fn block_status(
    image: &Image,
    offset: u64,
    length: u32,
    one: bool,
) -> qj_engine::Result<Vec<Extent>> {
    Ok(clip(&image.map()?, offset, length, one))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(start: u64, length: u64, data: bool, zero: bool) -> MapExtent {
        MapExtent {
            start,
            length,
            data,
            zero,
            compressed: false,
            offset: data.then_some(start + 0x10000),
        }
    }

    #[test]
    fn clips_merges_and_limits() {
        let map = [
            ext(0, 65536, true, false),
            ext(65536, 65536, true, false),
            ext(131072, 65536, false, true),
            ext(196608, 65536, false, false),
        ];
        let all = clip(&map, 512, 262144 - 1024, false);
        assert_eq!(
            all,
            vec![
                Extent {
                    length: 131072 - 512,
                    flags: 0
                },
                Extent {
                    length: 65536,
                    flags: STATE_HOLE | STATE_ZERO
                },
                Extent {
                    length: 65536 - 512,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            clip(&map, 131072, 131072, true),
            vec![Extent {
                length: 65536,
                flags: STATE_HOLE | STATE_ZERO
            }]
        );
        let sum: u64 = all.iter().map(|e| u64::from(e.length)).sum();
        assert_eq!(sum, 262144 - 1024);
    }

    #[test]
    fn many_alternating_extents_are_bounded() {
        let map: Vec<MapExtent> = (0..3000u64)
            .map(|i| ext(i * 512, 512, i % 2 == 0, i % 2 == 1))
            .collect();
        let out = clip(&map, 0, 3000 * 512, false);
        assert_eq!(out.len(), EXTENTS_MAX);
        assert!(out.iter().all(|e| e.length == 512));
    }
}
