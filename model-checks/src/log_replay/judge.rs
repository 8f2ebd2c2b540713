//! The checks of one crash state of a log: recovery (replaying a qjournal
//! on a copy), `qj check` (library call), guest content against the log's
//! views, and on a sample `qemu-img check` and `info`.

use std::sync::Arc;

use qj_engine::check::{check, RepairMode};
use qj_engine::{BackingSource, Image, MemStorage, OpenOptions, Storage};

use super::views::{engine_guest, GuestViews, SectorJudgement};
use crate::engine_target::check_dirty_bit;
use crate::qemu::qemu_img_check;
use crate::target::LeakExpectation;
use crate::violation::CheckKind;

/// What the checks said about one state.
#[derive(Clone, Debug, Default)]
pub struct Verdict {
    /// Every failed check, with what exactly.
    pub findings: Vec<(CheckKind, String)>,
    /// Clusters `qj check` found leaked.
    pub leaked_clusters: u64,
    /// The image's cluster size (0 if the header could not be read).
    pub cluster_bytes: u64,
    /// Whether `qemu-img` checked it.
    pub qemu_checked: bool,
}

fn bytes_of(storage: &dyn Storage) -> Result<Vec<u8>, String> {
    let len = storage.len().map_err(|e| e.to_string())?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
    storage.read_at(&mut bytes, 0).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Judges the crash image `image`, whose last completed flush is view
/// `flushed` of `views`; `qemu` also runs `qemu-img`. Never writes
/// anywhere but to copies in memory and temporary files.
#[must_use]
pub fn judge_state(image: Vec<u8>, views: &GuestViews, flushed: u32, qemu: bool) -> Verdict {
    let mut verdict = Verdict::default();
    let storage = Arc::new(MemStorage::from_bytes(image));
    let header = match Image::read_header(&*storage) {
        Ok(header) => header,
        Err(e) => {
            verdict.findings.push((
                CheckKind::RecoveryFailed,
                format!("reading the header: {e}"),
            ));
            return verdict;
        }
    };
    verdict.cluster_bytes = header.geometry().cluster_size();
    let journal_clusters = header
        .journal()
        .map(|ext| ext.size.div_ceil(verdict.cluster_bytes));
    if journal_clusters.is_some() {
        // Rule 1 of the journalled backend, before recovery: a journal
        // with anything to replay is flagged dirty in the header.
        if let Err(e) = check_dirty_bit(&*storage) {
            verdict
                .findings
                .push((CheckKind::Corruption, e.to_string()));
        }
        // Recovery: a read-write open replays the journal; closing writes
        // the replayed metadata in place, as the next user would see it.
        let mut opts = OpenOptions::read_write();
        opts.backing = BackingSource::Ignore;
        if let Err(e) = Image::open(storage.clone(), &opts).and_then(Image::close) {
            verdict.findings.push((
                CheckKind::RecoveryFailed,
                format!("replaying the journal: {e}"),
            ));
            return verdict;
        }
    }
    let mut repaired_leaks = 0;
    if header.is_dirty() {
        // Lazy refcounts (QEMU's lazy_refcounts=on) let refcounts lag
        // behind the tables while the dirty bit is set; the next read-write
        // open repairs them (QEMU runs check -r all) before any use, so
        // that repair is this image's recovery. What it frees was leaked.
        match check(&*storage, RepairMode::All, &[]) {
            Ok(report) => repaired_leaks = report.leaks_fixed,
            Err(e) => {
                verdict.findings.push((
                    CheckKind::RecoveryFailed,
                    format!("repairing the lazy refcounts (dirty bit): {e}"),
                ));
                return verdict;
            }
        }
    }
    match check(&*storage, RepairMode::None, &[]) {
        Ok(report) => {
            verdict.leaked_clusters = report.leaks + repaired_leaks;
            if report.corruptions > 0 || report.check_errors > 0 {
                let first = report.messages.first().cloned().unwrap_or_default();
                verdict.findings.push((
                    CheckKind::Corruption,
                    format!(
                        "qj check: {} corruptions, {} check errors; first: {first}",
                        report.corruptions, report.check_errors
                    ),
                ));
            }
        }
        Err(e) => verdict
            .findings
            .push((CheckKind::CheckFailed, format!("qj check: {e}"))),
    }
    let bytes = match bytes_of(&*storage) {
        Ok(bytes) => bytes,
        Err(e) => {
            verdict
                .findings
                .push((CheckKind::CheckFailed, format!("reading the image: {e}")));
            return verdict;
        }
    };
    match engine_guest(&bytes) {
        Ok(guest) => {
            if let Some((judgement, detail)) = views.judge_disk(&guest, flushed) {
                let kind = match judgement {
                    SectorJudgement::FlushedDataLost => CheckKind::FlushedDataLost,
                    _ => CheckKind::NotAllowed,
                };
                verdict.findings.push((kind, detail));
            }
        }
        Err(e) => verdict.findings.push((
            CheckKind::RecoveryFailed,
            format!("reading the guest disk: {e}"),
        )),
    }
    if qemu {
        verdict.qemu_checked = true;
        // QEMU does not know the journal: its clusters are exactly the
        // leaks it must find; any number is fine for flush ordering.
        let leaks = journal_clusters.map_or(LeakExpectation::Any, LeakExpectation::Exactly);
        match qemu_img_check(&bytes) {
            Ok(qemu_verdict) => {
                let problems = qemu_verdict.problems(leaks);
                if !problems.is_empty() {
                    verdict
                        .findings
                        .push((CheckKind::Qemu, problems.join("; ")));
                }
            }
            Err(e) => verdict.findings.push((CheckKind::Qemu, e.to_string())),
        }
    }
    verdict
}
