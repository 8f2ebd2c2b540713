//! The simulated medium: the bytes a device holds, in copy-on-write pages.
//!
//! Exploring crash states means building thousands of slightly different
//! images per second. The pages hang off shared chunks of
//! [`CHUNK_PAGES`] page pointers: cloning a [`Medium`] copies one pointer
//! per chunk, a chunk is copied when one of the clones writes into it, and
//! a page is copied when one of the clones writes to it. A page that was
//! never written is absent and reads as zeros.

use std::fmt;
use std::io;
use std::sync::Arc;

/// Bytes per copy-on-write page: small enough that a sector write copies
/// little, large enough that a chunk covers much.
pub const PAGE_BYTES: usize = 4096;

/// Pages per shared chunk: a device flush or a new crash image clones the
/// whole medium, so cloning costs one reference count per chunk (not per
/// page), and a write into a shared chunk copies this many pointers.
pub const CHUNK_PAGES: usize = 64;

/// The device sector: the unit a power loss can tear writes into.
pub const SECTOR_BYTES: u64 = 512;

type Page = [u8; PAGE_BYTES];

type Chunk = [Option<Arc<Page>>; CHUNK_PAGES];

/// A page full of zeros: what an absent page reads as.
static ZERO_PAGE: Page = [0u8; PAGE_BYTES];

/// A byte array of a given length held in shared copy-on-write pages.
#[derive(Clone, Default)]
pub struct Medium {
    chunks: Vec<Option<Arc<Chunk>>>,
    len_bytes: u64,
}

impl fmt::Debug for Medium {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Medium")
            .field("len_bytes", &self.len_bytes)
            .field("chunks", &self.chunks.len())
            .finish()
    }
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{what} too large"))
}

fn page_index(offset: u64) -> io::Result<usize> {
    usize::try_from(offset / PAGE_BYTES as u64).map_err(|_| too_large("offset"))
}

/// Whether two optional shared values are the same allocation (or both
/// absent).
fn same_pointer<T>(a: Option<&Arc<T>>, b: Option<&Arc<T>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
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

    /// Page `index`, if it was ever written.
    fn page(&self, index: usize) -> Option<&Arc<Page>> {
        self.chunks
            .get(index / CHUNK_PAGES)?
            .as_ref()?
            .get(index % CHUNK_PAGES)?
            .as_ref()
    }

    fn page_at(&self, offset: u64) -> Option<&Arc<Page>> {
        usize::try_from(offset / PAGE_BYTES as u64)
            .ok()
            .and_then(|index| self.page(index))
    }

    /// Page `index` for writing: created (zeroed) if absent, and copied
    /// first (with its chunk) if another clone shares it.
    fn page_mut(&mut self, index: usize) -> &mut Page {
        let chunk_index = index / CHUNK_PAGES;
        if self.chunks.len() <= chunk_index {
            self.chunks.resize(chunk_index + 1, None);
        }
        let chunk =
            self.chunks[chunk_index].get_or_insert_with(|| Arc::new(std::array::from_fn(|_| None)));
        let page = Arc::make_mut(chunk)[index % CHUNK_PAGES]
            .get_or_insert_with(|| Arc::new([0u8; PAGE_BYTES]));
        Arc::make_mut(page)
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
            match self.page_at(position) {
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
        page_index(end - 1)?;
        let mut done = 0usize;
        while done < data.len() {
            let position = offset + done as u64;
            let in_page = (position % PAGE_BYTES as u64) as usize;
            let chunk = (PAGE_BYTES - in_page).min(data.len() - done);
            self.page_mut(page_index(position)?)[in_page..in_page + chunk]
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
            self.chunks.truncate(pages_kept.div_ceil(CHUNK_PAGES));
            let slots_kept = pages_kept % CHUNK_PAGES;
            if slots_kept != 0 {
                let last_chunk = (pages_kept - 1) / CHUNK_PAGES;
                if let Some(Some(chunk)) = self.chunks.get_mut(last_chunk) {
                    if chunk[slots_kept..].iter().any(Option::is_some) {
                        Arc::make_mut(chunk)[slots_kept..].fill(None);
                    }
                }
            }
            // Bytes past the new end must read as zeros if the medium grows
            // again, as on a file that was truncated and extended.
            let in_page = (len_bytes % PAGE_BYTES as u64) as usize;
            if in_page != 0 && self.page(pages_kept - 1).is_some() {
                self.page_mut(pages_kept - 1)[in_page..].fill(0);
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
        let page = match self.page_at(position) {
            Some(page) if position < self.len_bytes => &**page,
            _ => &ZERO_PAGE,
        };
        &page[in_page..in_page + chunk]
    }

    /// Calls `differs(index, mine, theirs)` for every page index that either
    /// medium holds, except pages (and whole chunks) both share; stops at
    /// the first `false` and returns whether it never stopped. Absent pages
    /// are given as zeros.
    fn unshared_pages(
        &self,
        other: &Medium,
        mut visit: impl FnMut(usize, &Page, &Page) -> bool,
    ) -> bool {
        let chunks = self.chunks.len().max(other.chunks.len());
        // Bounded by the longer chunk vector, CHUNK_PAGES per chunk.
        for chunk_index in 0..chunks {
            let mine = self.chunks.get(chunk_index).and_then(Option::as_ref);
            let theirs = other.chunks.get(chunk_index).and_then(Option::as_ref);
            if same_pointer(mine, theirs) {
                continue;
            }
            for slot in 0..CHUNK_PAGES {
                let a = mine.and_then(|c| c[slot].as_ref());
                let b = theirs.and_then(|c| c[slot].as_ref());
                // Shared, or absent from both: the same bytes.
                if same_pointer(a, b) {
                    continue;
                }
                let a = a.map_or(&ZERO_PAGE, |p| &**p);
                let b = b.map_or(&ZERO_PAGE, |p| &**p);
                if !visit(chunk_index * CHUNK_PAGES + slot, a, b) {
                    return false;
                }
            }
        }
        true
    }

    /// A checksum of what this medium holds that `base` does not: the
    /// length and every page whose bytes differ from `base`'s. Media with
    /// the same content have the same fingerprint against one base however
    /// their pages are shared; pages shared with `base` cost a pointer
    /// comparison at most, so crash images built from one durable medium
    /// are fingerprinted in time proportional to the pages their writes
    /// touch.
    #[must_use]
    pub fn fingerprint_against(&self, base: &Medium) -> u32 {
        let mut crc = crc32c::crc32c(&self.len_bytes.to_le_bytes());
        self.unshared_pages(base, |index, mine, theirs| {
            if mine != theirs {
                crc = crc32c::crc32c_append(crc, &(index as u64).to_le_bytes());
                crc = crc32c::crc32c_append(crc, mine);
            }
            true
        });
        crc
    }

    /// Whether both media hold the same length and bytes; shared pages are
    /// compared by pointer, so comparing near-identical clones is cheap.
    #[must_use]
    pub fn same_content(&self, other: &Medium) -> bool {
        self.len_bytes == other.len_bytes
            && self.unshared_pages(other, |_, mine, theirs| mine == theirs)
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
    fn truncating_a_sparse_medium_keeps_the_pages_below_the_end() {
        // Only the first chunk written, the length set far past it: a
        // truncation that ends inside a later, absent page must not touch
        // the written ones.
        let written = CHUNK_PAGES * PAGE_BYTES;
        let mut m = Medium::from_bytes(&vec![7u8; written]);
        m.set_len(200 * PAGE_BYTES as u64).unwrap();
        m.set_len(100 * PAGE_BYTES as u64 + 10).unwrap();
        let bytes = m.to_bytes();
        assert!(bytes[..written].iter().all(|&b| b == 7));
        assert!(bytes[written..].iter().all(|&b| b == 0));
        // Across chunks: a truncation inside the second chunk drops the
        // pages past the end and reads zeros after growing again.
        let mut m = Medium::from_bytes(&vec![9u8; (CHUNK_PAGES + 8) * PAGE_BYTES]);
        let shared = m.clone();
        m.set_len((CHUNK_PAGES + 2) as u64 * PAGE_BYTES as u64 + 100)
            .unwrap();
        m.set_len((CHUNK_PAGES + 8) as u64 * PAGE_BYTES as u64)
            .unwrap();
        let bytes = m.to_bytes();
        let end = (CHUNK_PAGES + 2) * PAGE_BYTES + 100;
        assert!(bytes[..end].iter().all(|&b| b == 9));
        assert!(bytes[end..].iter().all(|&b| b == 0));
        assert!(
            shared.to_bytes().iter().all(|&b| b == 9),
            "the clone keeps its pages"
        );
    }

    #[test]
    fn overflowing_write_is_an_error() {
        let mut m = Medium::new();
        assert!(m.write(&[1, 2], u64::MAX).is_err());
    }
}
