//! The way out for a dirty journal that cannot be replayed (damaged in the
//! middle of its log, an invalid transaction, a refused header, or a dirty
//! bit with no journal to be found): `qj check -r all` applies the valid
//! prefix of the log, says which transactions were lost, and drops the
//! journal, so that the repair that follows checks and fixes the metadata
//! as the salvage left it and QEMU can open the image again (spec 10.2
//! allows this salvage; the user asked for it with `-r all`).
//!
//! Ordering: the replayed prefix is flushed (by the journal's own open)
//! before the header that drops the journal is written, and that header is
//! flushed before the repair relies on it. A crash before the header write
//! leaves the damaged journal in charge, to be salvaged again (replay is
//! idempotent); after it, the journal's clusters are leaks, which the
//! repair frees.

use qj_journal::{JournalError, JournalOptions, ReplayMode, Storage};
use qj_spec::qcow2::features::{
    AUTOCLEAR_JOURNAL_VALID_MASK, INCOMPAT_JOURNAL_DIRTY_BIT, INCOMPAT_JOURNAL_DIRTY_MASK,
};

use super::error::CheckError;
use super::image::Image;
use super::journal::{open_for_check, replay_dirty_journal, JournalState};
use crate::backend::journal::{commit_protocol, DEVICE_LIMIT_BYTES};
use crate::backend::journal_usable::extension_inside_file;

/// Salvages the dirty journal of the image on `storage` if it cannot be
/// replayed, or drops a journal whose region is not inside the file.
/// Returns `None` when there is nothing to salvage (no dirty journal, or
/// one that replays: a read-write open is the way for that), else the
/// lines that say what was replayed and what was lost.
pub fn salvage_journal(storage: &dyn Storage) -> Result<Option<Vec<String>>, CheckError> {
    let header = Image::read_header(storage)?;
    let mut lines = Vec::new();
    if !header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT) {
        // A clean journal loses nothing; it is dropped only if its region
        // is not inside the file, where no open can use it.
        let file_len = storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        let Some(Err(why)) = header
            .journal()
            .map(|ext| extension_inside_file(&ext, file_len))
        else {
            return Ok(None);
        };
        lines.push(format!("ERROR {why}"));
        lines.push("Salvage: the journal was clean: no transaction is lost".into());
    }
    match replay_dirty_journal(storage, &header) {
        _ if !lines.is_empty() => {}
        JournalState::Replayed { .. } => return Ok(None),
        JournalState::Missing(why) => {
            lines.push(format!("ERROR {why}"));
            lines.push(
                "Salvage: the journal's committed transactions are lost; the metadata in place is kept as it is"
                    .into(),
            );
        }
        JournalState::Unreplayable(why) => {
            lines.push(format!("ERROR {why}"));
            lines.push(replay_valid_prefix(storage, &header)?);
        }
    }
    drop_journal(storage)?;
    lines.push(
        "Salvage: removed the journal (qjournal extension and journal feature bits); its clusters are freed by this repair, and `qj amend -o journal=on` gives the image a new one"
            .into(),
    );
    Ok(Some(lines))
}

/// Applies the valid prefix of the damaged log in place and says what was
/// replayed and what was lost.
fn replay_valid_prefix(
    storage: &dyn Storage,
    header: &qj_spec::qcow2::Header,
) -> Result<String, CheckError> {
    let Some(ext) = header.journal() else {
        return Ok("Salvage: no journal to replay; its committed transactions are lost".into());
    };
    let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
    options.commit_protocol = commit_protocol(&ext);
    options.replay_mode = ReplayMode::Apply;
    options.salvage = true;
    match open_for_check(storage, &ext, options) {
        Ok((_, report)) => {
            let first = report.synced_seq_before + 1;
            let replayed = if report.transactions_replayed == 0 {
                "replayed no transaction".to_string()
            } else {
                format!(
                    "replayed transactions {first} to {} ({} transaction(s))",
                    report.last_replayed_seq, report.transactions_replayed
                )
            };
            let proof = report.end.evidence_seq.map_or(String::new(), |seq| {
                format!(" (transaction {seq} proves those up to it were committed)")
            });
            Ok(format!(
                "Salvage: {replayed}; lost transaction {} and every transaction after it{proof}: {}",
                report.end.expected_seq, report.end.reason
            ))
        }
        // The log cannot be found at all (no header in charge): nothing
        // can be replayed.
        Err(e @ (JournalError::NoValidHeader { .. } | JournalError::RefusedHeader { .. })) => {
            Ok(format!(
                "Salvage: replayed no transaction; every committed transaction of the journal is lost: {e}"
            ))
        }
        Err(e) => Err(CheckError::Io {
            context: format!("salvaging the journal at {:#x}", ext.offset),
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// Rewrites the header without the journal: extension gone, "journal
/// dirty" and "journal valid" clear. Read again, since the replayed prefix
/// may have written the header.
fn drop_journal(storage: &dyn Storage) -> Result<(), CheckError> {
    let mut header = Image::read_header(storage)?;
    header.set_journal(None);
    header.incompatible_features &= !INCOMPAT_JOURNAL_DIRTY_MASK;
    header.autoclear_features &= !AUTOCLEAR_JOURNAL_VALID_MASK;
    let bytes = header.encode()?;
    // Ordering: whatever the salvage replayed is durable before the header
    // stops pointing at the journal that holds it.
    storage
        .flush()
        .map_err(CheckError::io("flushing the salvaged journal's writes"))?;
    storage
        .write_at(&bytes, 0)
        .map_err(CheckError::io("writing the header without the journal"))?;
    storage
        .flush()
        .map_err(CheckError::io("flushing the header without the journal"))
}
