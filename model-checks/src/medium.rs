//! The simulated medium: the bytes a device holds, in copy-on-write pages.
//!
//! Exploring crash states means building thousands of slightly different
//! images per second. Cloning a [`Medium`] copies only a vector of page
//! pointers; a page is copied when one of the clones writes to it. A page
//! that was never written is absent and reads as zeros.

use std::fmt;
use std::io;
use std::sync::Arc;

/// Bytes per copy-on-write page: small enough that a sector write copies
/// little, large enough that cloning the page vector stays cheap.
pub const PAGE_BYTES: usize = 4096;

/// The device sector: the unit a power loss can tear writes into.
pub const SECTOR_BYTES: u64 = 512;

type Page = [u8; PAGE_BYTES];

/// A byte array of a given length held in shared copy-on-write pages.
#[derive(Clone, Default)]
pub struct Medium {
    pages: Vec<Option<Arc<Page>>>,
    len_bytes: u64,
}

impl fmt::Debug for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Medium")
            .field("len_bytes", &self.len_bytes)
            .field("pages", &self.pages.len())
            .finish()
    }
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{what} too large"))
}

fn page_index(offset: u64) -> io::Result<usize> {
    usize::try_from(offset / PAGE_BYTES as u64).map_err(|_| too_large("offset"))
}

impl Medium {
    /// An empty medium (length 0).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A medium holding a copy of `bytes`.
    #[must_use]
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut medium = Self::new();
        // Writing at offset 0 into an empty medium cannot overflow: the
        // length of an in-memory slice fits in u64 and in the page index.
        if medium.write(bytes, 0).is_err() {
            unreachable!("an in-memory slice always fits a medium");
        }
        medium
    }

    /// The length in bytes.
    #[must_use]
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Reads `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) {
        let mut done = 0usize;
        while done < buf.len() {
            let position = offset.saturating_add(done as u64);
            if position >= self.len_bytes {
                buf[done..].fill(0);
                return;
            }
            let in_page = (position % PAGE_BYTES as u64) as usize;
            let chunk = (PAGE_BYTES - in_page)
                .min(buf.len() - done)
                .min(usize::try_from(self.len_bytes - position).unwrap_or(usize::MAX));
            let page = usize::try_from(position / PAGE_BYTES as u64)
                .ok()
                .and_then(|index| self.pages.get(index))
                .and_then(Option::as_ref);
            match page {
                Some(page) => {
                    buf[done..done + chunk].copy_from_slice(&page[in_page..in_page + chunk])
                }
                None => buf[done..done + chunk].fill(0),
            }
            done += chunk;
        }
    }

    /// Writes `data` at `offset`, growing the medium if needed.
    pub fn write(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| too_large("write end"))?;
        if data.is_empty() {
            return Ok(());
        }
        let last_page = page_index(end - 1)?;
        if self.pages.len() <= last_page {
            self.pages.resize(last_page + 1, None);
        }
        let mut done = 0usize;
        while done < data.len() {
            let position = offset + done as u64;
            let in_page = (position % PAGE_BYTES as u64) as usize;
            let chunk = (PAGE_BYTES - in_page).min(data.len() - done);
            let slot = &mut self.pages[page_index(position)?];
            let page = slot.get_or_insert_with(|| Arc::new([0u8; PAGE_BYTES]));
            Arc::make_mut(page)[in_page..in_page + chunk]
                .copy_from_slice(&data[done..done + chunk]);
            done += chunk;
        }
        self.len_bytes = self.len_bytes.max(end);
        Ok(())
    }

    /// Truncates or extends (with zeros) to `len_bytes`.
    pub fn set_len(&mut self, len_bytes: u64) -> io::Result<()> {
        if len_bytes < self.len_bytes {
            let pages_kept = page_index(len_bytes.div_ceil(PAGE_BYTES as u64) * PAGE_BYTES as u64)?;
            self.pages.truncate(pages_kept);
            // Bytes past the new end must read as zeros if the medium grows
            // again, as on a file that was truncated and extended.
            let in_page = (len_bytes % PAGE_BYTES as u64) as usize;
            if in_page != 0 {
                if let Some(Some(page)) = self.pages.last_mut() {
                    Arc::make_mut(page)[in_page..].fill(0);
                }
            }
        } else {
            page_index(len_bytes)?;
        }
        self.len_bytes = len_bytes;
        Ok(())
    }

    /// A flat copy of the whole content.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; usize::try_from(self.len_bytes).unwrap_or(0)];
        self.read(&mut bytes, 0);
        bytes
    }

    /// Whether `[offset, offset + len_bytes)` reads the same in both media
    /// (bytes past an end read as zeros). Shared pages are compared by
    /// pointer, so ranges a copy-on-write clone did not touch compare in
    /// constant time.
    #[must_use]
    pub fn same_range(&self, other: &Medium, offset: u64, len_bytes: u64) -> bool {
        let end = offset.saturating_add(len_bytes);
        let mut position = offset;
        // Bounded by the range: one page (or less) per step.
        while position < end {
            let in_page = (position % PAGE_BYTES as u64) as usize;
            // A step stays within one page and on one side of each end, so
            // that both sides are plain slices (compared in place: this
            // runs for every mapped cluster of every crash state).
            let chunk = [
                (PAGE_BYTES - in_page) as u64,
                end - position,
                self.bytes_left(position),
                other.bytes_left(position),
            ]
            .into_iter()
            .min()
            .unwrap_or(0) as usize;
            let same = match (self.page_at(position), other.page_at(position)) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => true,
                _ => {
                    self.slice_at(position, in_page, chunk)
                        == other.slice_at(position, in_page, chunk)
                }
            };
            if !same {
                return false;
            }
            position += chunk as u64;
        }
        true
    }

    /// Bytes from `position` to the end when inside, or to infinity.
    fn bytes_left(&self, position: u64) -> u64 {
        if position < self.len_bytes {
            self.len_bytes - position
        } else {
            u64::MAX
        }
    }

    /// The `chunk` bytes at `position` (at `in_page` of its page), which
    /// lie in one page and wholly inside or wholly past the end: past the
    /// end, or in a page never written, they read as zeros.
    fn slice_at(&self, position: u64, in_page: usize, chunk: usize) -> &[u8] {
        static ZEROS: Page = [0u8; PAGE_BYTES];
        let page = match self.page_at(position) {
            Some(page) if position < self.len_bytes => &**page,
            _ => &ZEROS,
        };
        &page[in_page..in_page + chunk]
    }

    /// A checksum of what this medium holds that `base` does not: the
    /// length and every page whose bytes differ from `base`'s. Media with
    /// the same content have the same fingerprint against one base however
    /// their pages are shared; pages shared with `base` cost a pointer
    /// comparison, so crash images built from one durable medium are
    /// fingerprinted in time proportional to the pages their writes touch.
    #[must_use]
    pub fn fingerprint_against(&self, base: &Medium) -> u32 {
        let zero: &Page = &[0u8; PAGE_BYTES];
        let mut crc = crc32c::crc32c(&self.len_bytes.to_le_bytes());
        let pages = self.pages.len().max(base.pages.len());
        // Bounded by the longer page vector.
        for index in 0..pages {
            let mine = self.pages.get(index).and_then(Option::as_ref);
            let theirs = base.pages.get(index).and_then(Option::as_ref);
            if let (Some(a), Some(b)) = (mine, theirs) {
                if Arc::ptr_eq(a, b) {
                    continue;
                }
            }
            let mine = mine.map_or(zero, |p| &**p);
            if mine == theirs.map_or(zero, |p| &**p) {
                continue;
            }
            crc = crc32c::crc32c_append(crc, &(index as u64).to_le_bytes());
            crc = crc32c::crc32c_append(crc, mine);
        }
        crc
    }

    fn page_at(&self, offset: u64) -> Option<&Arc<Page>> {
        usize::try_from(offset / PAGE_BYTES as u64)
            .ok()
            .and_then(|index| self.pages.get(index))
            .and_then(Option::as_ref)
    }

    /// Whether both media hold the same length and bytes; shared pages are
    /// compared by pointer, so comparing near-identical clones is cheap.
    #[must_use]
    pub fn same_content(&self, other: &Medium) -> bool {
        if self.len_bytes != other.len_bytes {
            return false;
        }
        let pages = self.pages.len().max(other.pages.len());
        let zero = [0u8; PAGE_BYTES];
        (0..pages).all(|index| {
            let a = self.pages.get(index).and_then(Option::as_ref);
            let b = other.pages.get(index).and_then(Option::as_ref);
            match (a, b) {
                (Some(a), Some(b)) if Arc::ptr_eq(a, b) => true,
                (a, b) => a.map_or(&zero, |p| &**p) == b.map_or(&zero, |p| &**p),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_across_pages_and_zero_fill() {
        let mut m = Medium::new();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        m.write(&data, 1000).unwrap();
        assert_eq!(m.len_bytes(), 11_000);
        let mut buf = vec![0xffu8; 10_100];
        m.read(&mut buf, 1000);
        assert_eq!(&buf[..10_000], &data[..]);
        assert!(buf[10_000..].iter().all(|&b| b == 0));
        let mut head = [0xffu8; 10];
        m.read(&mut head, 0);
        assert_eq!(head, [0u8; 10]);
    }

    #[test]
    fn clones_are_copy_on_write() {
        let mut a = Medium::from_bytes(&[1u8; 8192]);
        let b = a.clone();
        a.write(&[2u8; 4], 10).unwrap();
        let mut buf = [0u8; 4];
        b.read(&mut buf, 10);
        assert_eq!(buf, [1u8; 4], "the clone keeps the old bytes");
        a.read(&mut buf, 10);
        assert_eq!(buf, [2u8; 4]);
        assert!(!a.same_content(&b));
        assert!(b.same_content(&b.clone()));
    }

    #[test]
    fn ranges_compare_by_content_whether_pages_are_shared_or_not() {
        let a = Medium::from_bytes(&[3u8; 3 * PAGE_BYTES]);
        let mut b = a.clone();
        assert!(a.same_range(&b, 0, 3 * PAGE_BYTES as u64));
        b.write(&[4u8; 2], PAGE_BYTES as u64 + 100).unwrap();
        assert!(a.same_range(&b, 0, PAGE_BYTES as u64 + 100));
        assert!(!a.same_range(&b, PAGE_BYTES as u64, PAGE_BYTES as u64));
        assert!(a.same_range(&b, PAGE_BYTES as u64 + 102, 10_000));
        // The same bytes in unshared pages are the same range.
        b.write(&[3u8; 2], PAGE_BYTES as u64 + 100).unwrap();
        assert!(a.same_range(&b, 0, 3 * PAGE_BYTES as u64));
        // Past the end reads as zeros: a shorter medium differs there only
        // if the longer one holds something other than zeros.
        let short = Medium::from_bytes(&[3u8; 10]);
        assert!(!a.same_range(&short, 0, 20));
        assert!(Medium::new().same_range(&Medium::from_bytes(&[0u8; 64]), 0, 64));
    }

    #[test]
    fn equal_content_has_one_fingerprint_however_pages_are_shared() {
        let base = Medium::from_bytes(&[5u8; 4 * PAGE_BYTES]);
        let unchanged = base.clone();
        let mut rewritten = base.clone();
        // The same bytes written again: a fresh page, the same content.
        rewritten.write(&[5u8; 100], PAGE_BYTES as u64).unwrap();
        let mut changed = base.clone();
        changed.write(&[6u8; 1], 2 * PAGE_BYTES as u64).unwrap();
        let mut changed_alike = base.clone();
        changed_alike
            .write(&[6u8; 1], 2 * PAGE_BYTES as u64)
            .unwrap();
        let mut longer = base.clone();
        longer.set_len(5 * PAGE_BYTES as u64).unwrap();
        let print = |m: &Medium| m.fingerprint_against(&base);
        assert_eq!(print(&unchanged), print(&rewritten));
        assert_eq!(print(&changed), print(&changed_alike));
        assert_ne!(print(&changed), print(&unchanged));
        assert_ne!(print(&longer), print(&unchanged), "the length counts");
        // A page the base lacks that holds zeros is no difference.
        let mut grown = Medium::from_bytes(&[5u8; 4 * PAGE_BYTES]);
        grown.set_len(6 * PAGE_BYTES as u64).unwrap();
        let mut grown_written = grown.clone();
        grown_written
            .write(&[0u8; 8], 5 * PAGE_BYTES as u64)
            .unwrap();
        assert_eq!(
            grown.fingerprint_against(&base),
            grown_written.fingerprint_against(&base)
        );
    }

    #[test]
    fn truncate_then_extend_reads_zeros() {
        let mut m = Medium::from_bytes(&[7u8; 9000]);
        m.set_len(5000).unwrap();
        m.set_len(9000).unwrap();
        let bytes = m.to_bytes();
        assert!(bytes[..5000].iter().all(|&b| b == 7));
        assert!(bytes[5000..].iter().all(|&b| b == 0));
    }

    #[test]
    fn overflowing_write_is_an_error() {
        let mut m = Medium::new();
        assert!(m.write(&[1, 2], u64::MAX).is_err());
    }
}
