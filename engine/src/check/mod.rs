//! A consistency checker and repairer for qcow2 images, with the semantics
//! of `qemu-img check` (QEMU 10's block/qcow2-refcount.c): it counts every
//! reference to every host cluster, compares the counts with the stored
//! refcounts, checks the COPIED flags, and can fix leaks, fix corruptions
//! and rebuild the refcount structure.
//!
//! It reads the image directly through [`Storage`] with the `spec`
//! formats, without the engine's caches, so that it can check an image the
//! engine refuses to open. Repair is the only code path allowed to write a
//! corrupt image; every repair step is flushed before the next one relies
//! on it (see the ordering comments in each file):
//!
//! 1. snapshot count shortened (forgets snapshots: leaks only), flush;
//! 2. misaligned preallocated L2 entries zeroed, flush after each;
//! 3. refcount blocks past the end of the file: the file is extended, flush;
//! 4. refcounts corrected in place, or a new refcount structure written
//!    and flushed before the header is switched to it (flushed again);
//! 5. COPIED flags corrected from the now durable refcounts, flush;
//! 6. a snapshot table with incomplete entries rewritten into new clusters
//!    (table and refcounts flushed, then the header switch, flushed, then
//!    the old clusters freed);
//! 7. dirty and corrupt bits cleared, flush — only when nothing is left
//!    broken.

mod bitmaps;
mod checker;
mod compare;
mod copied;
mod dedup_index;
mod error;
mod image;
mod imrt;
mod journal;
mod rebuild;
mod refcounts;
mod report;
mod salvage;
mod snapshot_rewrite;
mod snapshots;
mod walk;

use qj_journal::Storage;
use qj_spec::qcow2::features::{
    INCOMPAT_CORRUPT_MASK, INCOMPAT_DIRTY_MASK, INCOMPAT_JOURNAL_DIRTY_BIT,
};
use qj_spec::units::HostOffset;

use crate::backend::journal_usable::SALVAGE_ADVICE;
use checker::Checker;
pub use error::CheckError;
use image::Image;
use journal::{JournalState, ReplayedStorage};
use report::Tally;
pub use report::{CheckReport, MESSAGES_MAX};
pub use salvage::salvage_journal;

/// What `check` may change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RepairMode {
    /// Read-only: count and report.
    #[default]
    None,
    /// `-r leaks`: lower the refcounts of leaked clusters, and fix COPIED
    /// flags when the refcounts are then right.
    Leaks,
    /// `-r all`: also raise refcounts that are too low, rebuild the refcount
    /// structure when needed, zero misaligned preallocated entries, and
    /// always fix COPIED flags.
    All,
}

impl RepairMode {
    /// Whether leaks are fixed (QEMU's BDRV_FIX_LEAKS).
    #[must_use]
    pub fn fixes_leaks(self) -> bool {
        matches!(self, RepairMode::Leaks | RepairMode::All)
    }

    /// Whether corruptions are fixed (QEMU's BDRV_FIX_ERRORS).
    #[must_use]
    pub fn fixes_errors(self) -> bool {
        self == RepairMode::All
    }
}

/// Checks (and with a repair mode, repairs) the qcow2 image on `storage`.
///
/// `extra_refs` are host ranges (offset, length in bytes) that structures
/// unknown to qcow2 keep in use; they count as referenced. The qjournal
/// extension is parsed here and its clusters counted while the journal is
/// valid (autoclear bit 60), so the engine normally passes nothing.
///
/// Like `qemu-img check -r`, when the repair fixed anything the image is
/// checked again read-only and the report gives that second pass's
/// counts, with the fixed counts of the repair.
pub fn check(
    storage: &dyn Storage,
    mode: RepairMode,
    extra_refs: &[(HostOffset, u64)],
) -> Result<CheckReport, CheckError> {
    let first = check_pass(storage, mode, extra_refs)?;
    if mode == RepairMode::None
        || first.aborted
        || (first.report.corruptions_fixed == 0 && first.report.leaks_fixed == 0)
    {
        return Ok(first.report);
    }
    let second = check_pass(storage, RepairMode::None, extra_refs)?;
    let mut report = second.report;
    report.corruptions_fixed = first.report.corruptions_fixed;
    report.leaks_fixed = first.report.leaks_fixed;
    let mut messages = first.report.messages;
    messages.push("Double checking the fixed image now...".into());
    messages.extend(report.messages);
    report.messages = messages;
    Ok(report)
}

/// One pass and whether it gave up early (QEMU's "Check failed").
struct Pass {
    report: CheckReport,
    aborted: bool,
}

fn check_pass(
    storage: &dyn Storage,
    mode: RepairMode,
    extra_refs: &[(HostOffset, u64)],
) -> Result<Pass, CheckError> {
    // Decoded only: the header is validated against the file after a
    // dirty journal's replay, which may change it or write the tables it
    // names past the end of the file (spec 3.2; a crash during a
    // checkpoint leaves exactly that).
    let header = Image::read_header(storage)?;
    if !header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT) {
        let image = Image::load(storage)?;
        return check_image(storage, mode, extra_refs, image, &[], 0, false);
    }
    let state = journal::replay_dirty_journal(storage, &header);
    // A dirty journal holds committed metadata not yet in place: a repair
    // made from the stale metadata would be contradicted by the replay, so
    // only the read-write open that replays it may come first (or, if it
    // cannot be replayed, the salvage of `qj check -r all`).
    if mode != RepairMode::None {
        return Err(match state {
            JournalState::Replayed { .. } => CheckError::JournalDirty,
            JournalState::Unreplayable(why) | JournalState::Missing(why) => {
                CheckError::JournalUnreplayable(why)
            }
        });
    }
    match state {
        JournalState::Replayed {
            overlay,
            transactions,
            warning,
        } => {
            let replayed = ReplayedStorage::new(storage, &overlay);
            // Header fields are journalled too: load the image again.
            let image = Image::load(&replayed)?;
            let counted_end = journal::counted_end(&replayed, &image)?;
            let replayed = replayed.reaching(counted_end);
            let mut notes = vec![format!(
                "The journal is dirty: {transactions} committed transaction(s) replayed in memory; checking the metadata as replayed"
            )];
            notes.extend(warning.map(|w| format!("WARNING {w}")));
            check_image(&replayed, mode, extra_refs, image, &notes, 0, true)
        }
        JournalState::Unreplayable(why) | JournalState::Missing(why) => {
            // Committed metadata the image cannot get back: a corruption,
            // never a silent loss.
            let image = Image::load(storage)?;
            let notes = [
                format!("ERROR {why}"),
                format!(
                    "WARNING the journal's committed transactions cannot be replayed: this is the metadata as it was before them; {SALVAGE_ADVICE}"
                ),
            ];
            check_image(storage, mode, extra_refs, image, &notes, 1, true)
        }
    }
}

/// One pass over `image` as loaded from `storage`; `notes` open the
/// messages and `journal_corruptions` count with the problems found;
/// `journal_was_dirty` when the image's journal had to be replayed.
fn check_image(
    storage: &dyn Storage,
    mode: RepairMode,
    extra_refs: &[(HostOffset, u64)],
    image: Image,
    notes: &[String],
    journal_corruptions: u64,
    journal_was_dirty: bool,
) -> Result<Pass, CheckError> {
    let mut checker = Checker::new(storage, mode, extra_refs, image)?;
    checker.journal_was_dirty = journal_was_dirty;
    for note in notes {
        checker.msg(note.clone());
    }

    let mut snapshot_tally = Tally::default();
    let mut result = Tally::default();
    let mut highest_cluster = None;
    if checker.read_snapshot_table(&mut snapshot_tally)? {
        let mut refcount_tally = Tally::default();
        let summary = checker.check_refcounts(&mut refcount_tally)?;
        result = refcount_tally;
        if let Some(summary) = summary {
            highest_cluster = Some(summary.highest_cluster);
            let refcounts_ok = result.check_errors == 0 && result.corruptions == 0;
            checker.fix_snapshot_table(&mut snapshot_tally, refcounts_ok)?;
            result.add_problems(&snapshot_tally);
            if mode != RepairMode::None && result.check_errors == 0 && result.corruptions == 0 {
                mark_clean(&mut checker)?;
            }
        } else {
            result.add_problems(&snapshot_tally);
        }
    } else {
        result.add_problems(&snapshot_tally);
    }

    if highest_cluster.is_some() {
        checker.check_dedup_index(&mut result)?;
    }

    let g = checker.image.geometry;
    // QEMU counts the virtual size in whole 512-byte sectors.
    let virtual_bytes = checker.image.header.size / 512 * 512;
    let report = CheckReport {
        corruptions: result.corruptions + journal_corruptions,
        leaks: result.leaks,
        check_errors: result.check_errors,
        corruptions_fixed: result.corruptions_fixed,
        leaks_fixed: result.leaks_fixed,
        allocated_clusters: result.allocated_clusters,
        total_clusters: g.clusters_for(virtual_bytes),
        fragmented_clusters: result.fragmented_clusters,
        image_end_offset: highest_cluster.map_or(0, |h| (h + 1) << g.cluster_bits),
        messages: std::mem::take(&mut checker.log).into_lines(),
    };
    Ok(Pass {
        aborted: highest_cluster.is_none(),
        report,
    })
}

/// Clears the dirty and corrupt bits after a repair left nothing broken.
fn mark_clean(checker: &mut Checker<'_>) -> Result<(), CheckError> {
    let header = &checker.image.header;
    let stale = header.incompatible_features & (INCOMPAT_DIRTY_MASK | INCOMPAT_CORRUPT_MASK);
    if header.version < 3 || stale == 0 {
        return Ok(());
    }
    let features = header.incompatible_features & !stale;
    // Ordering: every repair is durable before the image is declared
    // consistent; the bit is what makes a crashed repair get redone.
    checker.flush("repairs before clearing the dirty bit")?;
    checker.write(&features.to_be_bytes(), 72, "the incompatible feature bits")?;
    checker.flush("the incompatible feature bits")?;
    checker.image.header.incompatible_features = features;
    Ok(())
}

#[cfg(test)]
mod tests;
