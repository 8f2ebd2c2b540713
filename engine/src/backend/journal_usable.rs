//! Whether an image's journal can be used at all, before anything is read
//! from it: the region the qjournal extension names must lie inside the
//! file, and a dirty bit must come with a journal that can be replayed.
//! Opening and checking share these rules and their messages, which say
//! what happened and what to do.

use qj_spec::qcow2::features::{AUTOCLEAR_JOURNAL_VALID_BIT, INCOMPAT_JOURNAL_DIRTY_BIT};
use qj_spec::qcow2::{Header, JournalExtension};

/// What the user can do about a dirty journal that cannot be replayed.
pub(crate) const SALVAGE_ADVICE: &str = "`qj check` shows the metadata as it is; \
     `qj check -r all` applies what can be replayed, drops the rest and repairs the image";

/// If `header` has the journal dirty bit but no journal that may be
/// replayed (the extension is missing, or "journal valid" is clear, which
/// no conforming writer produces: spec 3.3), says so.
pub(crate) fn missing_dirty_journal(header: &Header) -> Option<String> {
    if !header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT) {
        return None;
    }
    let Some(ext) = header.journal() else {
        return Some(
            "the journal dirty bit (incompatible bit 60) is set but the image has no qjournal \
             extension: the journal's committed transactions cannot be found, and the metadata \
             in place may lack them"
                .into(),
        );
    };
    if header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT) {
        return None;
    }
    Some(format!(
        "the journal dirty bit (incompatible bit 60) is set but \"journal valid\" (autoclear \
         bit 60) is clear: the journal at {:#x} cannot be trusted, so its committed transactions \
         cannot be replayed, and the metadata in place may lack them",
        ext.offset
    ))
}

/// Whether the journal region `ext` names lies inside a file of
/// `file_len` bytes; if not, says where it is and how long the file is.
pub(crate) fn extension_inside_file(ext: &JournalExtension, file_len: u64) -> Result<(), String> {
    if ext.offset >= file_len {
        return Err(format!(
            "the qjournal extension's offset {:#x} is past the end of the file ({file_len:#x} bytes)",
            ext.offset
        ));
    }
    if ext
        .offset
        .checked_add(ext.size)
        .is_none_or(|end| end > file_len)
    {
        return Err(format!(
            "the qjournal extension's region ({:#x} bytes at {:#x}) runs past the end of the file ({file_len:#x} bytes)",
            ext.size, ext.offset
        ));
    }
    Ok(())
}
