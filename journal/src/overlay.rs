//! The writes an in-memory replay would have made, for reading a dirty
//! image without writing to it.

use std::collections::BTreeMap;
use std::io;

use crate::Storage;

/// Device ranges with the bytes replay would write there; later writes
/// replace earlier ones. Kept as non-overlapping extents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlay {
    extents: BTreeMap<u64, Vec<u8>>,
}

impl Overlay {
    /// An empty overlay.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether nothing would be written.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// The extents as (offset, bytes), sorted and non-overlapping.
    pub fn extents(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.extents
            .iter()
            .map(|(offset, bytes)| (*offset, bytes.as_slice()))
    }

    /// Records a write, replacing what earlier writes put in its range.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let end = offset.saturating_add(bytes.len() as u64);
        let overlapping: Vec<u64> = self
            .extents
            .range(..end)
            .rev()
            .take_while(|(start, data)| *start + data.len() as u64 > offset)
            .map(|(start, _)| *start)
            .collect();
        for start in overlapping {
            let Some(data) = self.extents.remove(&start) else {
                continue;
            };
            let data_end = start + data.len() as u64;
            if start < offset {
                self.extents
                    .insert(start, data[..(offset - start) as usize].to_vec());
            }
            if data_end > end {
                self.extents
                    .insert(end, data[(end - start) as usize..].to_vec());
            }
        }
        self.extents.insert(offset, bytes.to_vec());
    }

    /// One past the last byte an extent covers; 0 when empty. (Extents do
    /// not overlap, so the last one by offset ends last.)
    #[must_use]
    pub fn end(&self) -> u64 {
        self.extents
            .last_key_value()
            .map_or(0, |(start, data)| start + data.len() as u64)
    }

    /// Whether an extent covers byte `offset`.
    #[must_use]
    pub fn covers(&self, offset: u64) -> bool {
        self.extents
            .range(..=offset)
            .next_back()
            .is_some_and(|(start, data)| offset < start + data.len() as u64)
    }

    /// Whether extents cover every byte of `[start, end)`.
    #[must_use]
    pub fn covers_range(&self, start: u64, end: u64) -> bool {
        let mut next = start;
        // Bounded by the extents from the one covering `start` on: sorted,
        // non-overlapping, so the first gap ends the walk.
        let first = self
            .extents
            .range(..=start)
            .next_back()
            .map_or(start, |(offset, _)| *offset);
        for (offset, data) in self.extents.range(first..) {
            if next >= end {
                break;
            }
            let stop = offset + data.len() as u64;
            if stop <= next {
                continue;
            }
            if *offset > next {
                return false;
            }
            next = stop;
        }
        next >= end
    }

    /// Lays the overlay over bytes already read from the device at
    /// `offset`.
    pub fn patch(&self, buf: &mut [u8], offset: u64) {
        let end = offset.saturating_add(buf.len() as u64);
        for (start, data) in self.extents.range(..end).rev() {
            let data_end = *start + data.len() as u64;
            if data_end <= offset {
                // Extents do not overlap, so none further left reaches in.
                break;
            }
            let from = (*start).max(offset);
            let to = data_end.min(end);
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
    }

    /// Reads `buf.len()` bytes at `offset` from `storage` as replay would
    /// have left it.
    pub fn read_through(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        offset: u64,
    ) -> io::Result<()> {
        storage.read_at(buf, offset)?;
        self.patch(buf, offset);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_writes_replace_earlier_ones() {
        let mut o = Overlay::new();
        o.write(10, &[1; 10]);
        o.write(15, &[2; 10]);
        o.write(0, &[3; 12]);
        o.write(30, &[4; 2]);
        let mut buf = [9u8; 34];
        o.patch(&mut buf, 0);
        let mut want = [9u8; 34];
        want[10..20].fill(1);
        want[15..25].fill(2);
        want[0..12].fill(3);
        want[30..32].fill(4);
        assert_eq!(buf, want);
        let mut part = [0u8; 6];
        o.patch(&mut part, 12);
        assert_eq!(part, [1, 1, 1, 2, 2, 2]);
        o.write(11, &[5; 1]);
        let mut buf = [9u8; 14];
        o.patch(&mut buf, 0);
        assert_eq!(&buf[..], &[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 5, 1, 1]);
        assert_eq!(
            o.extents().count(),
            5,
            "[0,11) [11,12) [12,15) [15,25) [30,32)"
        );
    }
}
