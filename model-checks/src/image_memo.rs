//! What recovering and checking a crash image found, remembered by the
//! image's content for the other states of the same crash point.
//!
//! States of one point that keep different subsets of the pending writes
//! often leave byte-identical images: a lost write of the bytes already
//! there, torn halves of a rewrite, a header rewritten unchanged. Recovery
//! and the checks are a pure function of the image's bytes, the backing
//! device and the point's guest model, which all states of a point share,
//! so an image judged once need not be recovered again.

use std::collections::HashMap;

use crate::medium::Medium;

/// Most images remembered per crash point: bounds the memory an entry
/// takes (the pages its writes touched and what the guest read).
pub(crate) const ENTRIES_MAX: usize = 64;

/// Images of one crash point and a value for each, found by content.
pub(crate) struct ImageMemo<T> {
    /// The point's durable medium, which every image of the point was
    /// built from: fingerprints cover only what differs from it.
    base: Medium,
    entries: HashMap<u32, Vec<(Medium, T)>>,
    len: usize,
}

impl<T> ImageMemo<T> {
    /// An empty memo for the images built from `base`.
    pub(crate) fn new(base: Medium) -> Self {
        Self {
            base,
            entries: HashMap::new(),
            len: 0,
        }
    }

    /// The key of `image` for [`Self::get`] and [`Self::insert`].
    pub(crate) fn fingerprint(&self, image: &Medium) -> u32 {
        image.fingerprint_against(&self.base)
    }

    /// The value remembered for an image with exactly `image`'s content
    /// (a fingerprint match is confirmed byte for byte).
    pub(crate) fn get(&self, fingerprint: u32, image: &Medium) -> Option<&T> {
        self.entries
            .get(&fingerprint)?
            .iter()
            .find(|(known, _)| known.same_content(image))
            .map(|(_, value)| value)
    }

    /// Remembers `value` for `image`, unless the memo is full.
    pub(crate) fn insert(&mut self, fingerprint: u32, image: Medium, value: T) {
        if self.len >= ENTRIES_MAX {
            return;
        }
        self.entries
            .entry(fingerprint)
            .or_default()
            .push((image, value));
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(base: &Medium, byte: u8, offset: u64) -> Medium {
        let mut image = base.clone();
        image.write(&[byte; 512], offset).unwrap();
        image
    }

    #[test]
    fn finds_an_identical_image_and_only_that() {
        let base = Medium::from_bytes(&[1u8; 64 << 10]);
        let mut memo = ImageMemo::new(base.clone());
        let first = written(&base, 2, 4096);
        memo.insert(memo.fingerprint(&first), first, "first");
        // Built separately (its own page copies), the same bytes.
        let again = written(&base, 2, 4096);
        assert_eq!(memo.get(memo.fingerprint(&again), &again), Some(&"first"));
        let other = written(&base, 3, 4096);
        assert_eq!(memo.get(memo.fingerprint(&other), &other), None);
        // A matching key with other content is not a match.
        assert_eq!(memo.get(memo.fingerprint(&again), &other), None);
    }

    #[test]
    fn stops_remembering_when_full() {
        let base = Medium::from_bytes(&[0u8; 4096]);
        let mut memo = ImageMemo::new(base.clone());
        let images: Vec<Medium> = (0..=ENTRIES_MAX as u64)
            .map(|i| written(&base, 7, i * 512 + 8192))
            .collect();
        for (i, image) in images.iter().enumerate() {
            memo.insert(memo.fingerprint(image), image.clone(), i);
        }
        let last = &images[ENTRIES_MAX];
        assert_eq!(memo.get(memo.fingerprint(last), last), None);
        let first = &images[0];
        assert_eq!(memo.get(memo.fingerprint(first), first), Some(&0));
    }
}
