//! The guest's view of the logged image at chosen points of the log, as a
//! history per 512-byte guest sector, and the content rule every crash
//! state must keep: each guest sector reads as its value at the last
//! completed flush, or as a value a later point of the log gave it.
//!
//! A view is read with qj's engine (for logs qj wrote: its MARK entries
//! give a view after every guest operation and journal commit) or with
//! `qemu-img convert` (for QEMU's logs, at every flush, so the oracle for
//! QEMU's images is QEMU itself). Sectors are compared by a 64-bit hash.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::sync::Arc;

use qj_engine::{BackingSource, Image, MemStorage, OpenOptions};

use crate::medium::SECTOR_BYTES;
use crate::qemu::qemu_img_convert_raw;

/// Hash of an all-zero sector (and of a sector past a view's disk end
/// that reads as zeros).
const ZERO_HASH: u64 = 0;
/// Stands for "no such sector" in a view whose disk was smaller.
const ABSENT_HASH: u64 = u64::MAX;
/// Bytes read per guest request.
const READ_CHUNK_BYTES: usize = 1 << 20;

/// Who reads a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewReader {
    /// qj's engine, read-only (a dirty journal is replayed in memory).
    Engine,
    /// `qemu-img convert -O raw`.
    QemuImg,
}

impl ViewReader {
    /// Its name in reports.
    #[must_use]
    pub fn name(&self) -> &'static str {
        match self {
            ViewReader::Engine => "qj engine",
            ViewReader::QemuImg => "qemu-img convert",
        }
    }
}

/// The hash of one sector's bytes.
#[must_use]
pub fn sector_hash(bytes: &[u8]) -> u64 {
    if bytes.iter().all(|&b| b == 0) {
        return ZERO_HASH;
    }
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    // Keep the two reserved values for what they mean.
    match hasher.finish() {
        ZERO_HASH | ABSENT_HASH => 1,
        h => h,
    }
}

fn hashes(guest: &[u8]) -> Vec<u64> {
    guest
        .chunks(SECTOR_BYTES as usize)
        .map(sector_hash)
        .collect()
}

/// Reads the guest disk of a qcow2 image with qj's engine.
pub fn engine_guest(image: &[u8]) -> Result<Vec<u8>, String> {
    let storage = Arc::new(MemStorage::from_bytes(image.to_vec()));
    let mut opts = OpenOptions::read_only();
    opts.backing = BackingSource::Ignore;
    let image = Image::open(storage, &opts).map_err(|e| format!("opening the image: {e}"))?;
    let size = usize::try_from(image.virtual_size()).map_err(|e| e.to_string())?;
    let mut guest = vec![0u8; size];
    for (i, chunk) in guest.chunks_mut(READ_CHUNK_BYTES).enumerate() {
        let offset = (i * READ_CHUNK_BYTES) as u64;
        image
            .read(chunk, offset)
            .map_err(|e| format!("reading guest bytes at {offset}: {e}"))?;
    }
    Ok(guest)
}

/// Reads the sector hashes of the guest disk of `image` with `reader`.
pub fn read_view(reader: ViewReader, image: &[u8]) -> Result<Vec<u64>, String> {
    let guest = match reader {
        ViewReader::Engine => engine_guest(image)?,
        ViewReader::QemuImg => qemu_img_convert_raw(image).map_err(|e| e.to_string())?,
    };
    Ok(hashes(&guest))
}

/// What a sector of a crash state showed, judged against the views.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectorJudgement {
    /// Its value at the last completed flush, or a later one.
    Allowed,
    /// Only a value from before the last completed flush.
    FlushedDataLost,
    /// A value no view ever showed there.
    NotAllowed,
}

/// The views of one log: for each guest sector, its values from view to
/// view (only changes are kept).
#[derive(Clone, Debug, Default)]
pub struct GuestViews {
    /// Per sector: (view index, hash) at each view where it changed.
    history: Vec<Vec<(u32, u64)>>,
    views: u32,
}

impl GuestViews {
    /// An empty history.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the next view; returns its index.
    pub fn push(&mut self, view: &[u64]) -> u32 {
        let index = self.views;
        if view.len() > self.history.len() {
            let absent = if index == 0 {
                Vec::new()
            } else {
                vec![(0, ABSENT_HASH)]
            };
            self.history.resize(view.len(), absent);
        }
        for (sector, changes) in self.history.iter_mut().enumerate() {
            let hash = view.get(sector).copied().unwrap_or(ABSENT_HASH);
            if changes.last().map(|&(_, h)| h) != Some(hash) {
                changes.push((index, hash));
            }
        }
        self.views += 1;
        index
    }

    /// Views pushed so far.
    #[must_use]
    pub fn len(&self) -> u32 {
        self.views
    }

    /// Whether no view was pushed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.views == 0
    }

    /// Judges `hash` read at `sector` of a state whose last completed flush
    /// is view `flushed`.
    #[must_use]
    pub fn judge(&self, sector: usize, hash: u64, flushed: u32) -> SectorJudgement {
        let Some(changes) = self.history.get(sector) else {
            return SectorJudgement::NotAllowed;
        };
        let current = changes.iter().rev().find(|&&(view, _)| view <= flushed);
        let allowed_now = current.is_some_and(|&(_, h)| h == hash);
        let later = changes.iter().any(|&(view, h)| view > flushed && h == hash);
        if allowed_now || later {
            return SectorJudgement::Allowed;
        }
        if changes.iter().any(|&(view, h)| view < flushed && h == hash) {
            SectorJudgement::FlushedDataLost
        } else {
            SectorJudgement::NotAllowed
        }
    }

    /// What `sector` may read in a state whose last completed flush is
    /// view `flushed`, for messages.
    #[must_use]
    pub fn describe(&self, sector: usize, flushed: u32) -> String {
        let Some(changes) = self.history.get(sector) else {
            return "nothing (past every view's disk end)".into();
        };
        let name = |h: u64| match h {
            ZERO_HASH => "zeros".to_string(),
            ABSENT_HASH => "absent".to_string(),
            h => format!("{h:016x}"),
        };
        let mut allowed: Vec<String> = Vec::new();
        if let Some(&(view, h)) = changes.iter().rev().find(|&&(view, _)| view <= flushed) {
            allowed.push(format!("{} (view {view}, flushed)", name(h)));
        }
        for &(view, h) in changes.iter().filter(|&&(view, _)| view > flushed) {
            allowed.push(format!("{} (view {view})", name(h)));
        }
        allowed.join(", ")
    }

    /// Judges every sector of a guest disk read from a crash state; returns
    /// the first problem (with the count of bad sectors), if any.
    #[must_use]
    pub fn judge_disk(&self, guest: &[u8], flushed: u32) -> Option<(SectorJudgement, String)> {
        let mut first = None;
        let mut bad = 0u64;
        for (sector, bytes) in guest.chunks(SECTOR_BYTES as usize).enumerate() {
            let hash = sector_hash(bytes);
            let judgement = self.judge(sector, hash, flushed);
            if judgement == SectorJudgement::Allowed {
                continue;
            }
            bad += 1;
            first.get_or_insert_with(|| {
                (
                    judgement,
                    format!(
                        "guest sector {sector} (byte {}) reads {}; allowed: {}",
                        sector as u64 * SECTOR_BYTES,
                        if hash == ZERO_HASH {
                            "zeros".to_string()
                        } else {
                            format!("{hash:016x}")
                        },
                        self.describe(sector, flushed)
                    ),
                )
            });
        }
        let sectors = guest.len().div_ceil(SECTOR_BYTES as usize);
        if sectors < self.history.len() {
            // A smaller disk than every view from the flush on showed.
            let shrunk = (sectors..self.history.len())
                .find(|&s| self.judge(s, ABSENT_HASH, flushed) != SectorJudgement::Allowed);
            if let Some(sector) = shrunk {
                bad += 1;
                first.get_or_insert_with(|| {
                    (
                        SectorJudgement::NotAllowed,
                        format!("the disk ends at sector {sectors}, before sector {sector}"),
                    )
                });
            }
        }
        first.map(|(j, mut detail)| {
            if bad > 1 {
                detail.push_str(&format!(" ({bad} bad sectors in all)"));
            }
            (j, detail)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_the_flush_or_later_are_allowed_and_older_ones_are_lost_data() {
        let mut views = GuestViews::new();
        views.push(&[ZERO_HASH, ZERO_HASH]); // 0: base
        views.push(&[10, ZERO_HASH]); // 1: flushed
        views.push(&[11, 20]); // 2: later
        assert_eq!(views.judge(0, 10, 1), SectorJudgement::Allowed);
        assert_eq!(views.judge(0, 11, 1), SectorJudgement::Allowed);
        assert_eq!(
            views.judge(0, ZERO_HASH, 1),
            SectorJudgement::FlushedDataLost
        );
        assert_eq!(views.judge(0, 99, 1), SectorJudgement::NotAllowed);
        assert_eq!(views.judge(1, ZERO_HASH, 1), SectorJudgement::Allowed);
        assert_eq!(views.judge(1, 20, 0), SectorJudgement::Allowed);
        assert_eq!(views.judge(0, 10, 2), SectorJudgement::FlushedDataLost);
        let disk: Vec<u8> = vec![0; 1024];
        let (judgement, detail) = views.judge_disk(&disk, 2).unwrap();
        assert_eq!(judgement, SectorJudgement::FlushedDataLost);
        assert!(detail.contains("guest sector 0"), "{detail}");
        assert!(detail.contains("2 bad sectors"), "{detail}");
        assert!(views.judge_disk(&disk, 0).is_none());
    }

    #[test]
    fn a_disk_smaller_than_every_later_view_is_not_allowed() {
        let mut views = GuestViews::new();
        views.push(&[ZERO_HASH]);
        views.push(&[ZERO_HASH, 5]);
        assert!(views.judge_disk(&[0u8; 512], 0).is_none());
        assert!(views.judge_disk(&[0u8; 512], 1).is_some());
    }
}
