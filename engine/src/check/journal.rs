//! A check of an image whose journal is dirty: the metadata in place is
//! stale until the journal's committed transactions are applied, so the
//! check replays them in memory first (before it validates the header
//! against the file: replay may write the header and tables past the end of
//! the file, spec 3.2) and checks the metadata as replay leaves it, writing
//! nothing. A journal that cannot be replayed (damaged in the middle of its
//! log: a committed transaction is lost) or cannot be found is itself a
//! corruption, reported with what the journal found, and the metadata in
//! place is checked as it stands.

use std::io;

use qj_journal::{
    DedupConsumer, Journal, JournalError, JournalOptions, NoDedup, Overlay, ReplayMode,
    ReplayReport, Storage,
};
use qj_spec::qcow2::{used_entries, Header, JournalExtension};

use super::error::CheckError;
use super::image::{Image, REFT_OFFSET_MASK};
use crate::backend::journal::{commit_protocol, DEVICE_LIMIT_BYTES};
use crate::backend::journal_usable::{extension_inside_file, missing_dirty_journal};

/// What the check found in the dirty journal of an image.
pub(crate) enum JournalState {
    /// A dirty journal replayed in memory: `overlay` holds the metadata
    /// writes of `transactions` committed transactions.
    Replayed {
        /// The replayed writes.
        overlay: Overlay,
        /// How many transactions they came from.
        transactions: u64,
        /// What replay found that the user must hear about (a torn last
        /// transaction that may have been acknowledged).
        warning: Option<String>,
    },
    /// A dirty journal whose log is damaged (in the middle, an invalid
    /// transaction, a refused header): why. `qj check -r all` salvages.
    Unreplayable(String),
    /// The dirty bit is set but there is no journal to replay (the
    /// extension is missing, or "journal valid" is clear): what happened.
    Missing(String),
}

/// Replays the dirty journal of the image on `storage` in memory.
/// `header` has the journal-dirty bit set.
pub(crate) fn replay_dirty_journal(storage: &dyn Storage, header: &Header) -> JournalState {
    if let Some(why) = missing_dirty_journal(header) {
        return JournalState::Missing(why);
    }
    let Some(ext) = header.journal() else {
        return JournalState::Missing("the image has no qjournal extension".into());
    };
    let file_len = storage.len().unwrap_or(0);
    if let Err(why) = extension_inside_file(&ext, file_len) {
        return JournalState::Unreplayable(why);
    }
    let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
    options.commit_protocol = commit_protocol(&ext);
    options.replay_mode = ReplayMode::InMemory;
    match open_for_check(storage, &ext, options) {
        Ok((journal, report)) => JournalState::Replayed {
            overlay: journal.overlay().clone(),
            transactions: report.transactions_replayed,
            warning: report.torn_tail_warning(),
        },
        Err(e) => JournalState::Unreplayable(format!(
            "journal at {:#x} ({} bytes): {e}",
            ext.offset, ext.size
        )),
    }
}

/// The image as replay would leave it: reads see the overlay over the
/// device. Read-only: a plain check writes nothing.
#[derive(Debug)]
pub(crate) struct ReplayedStorage<'a> {
    inner: &'a dyn Storage,
    overlay: &'a Overlay,
    /// The image reaches at least this far (see [`Self::reaching`]).
    len_floor: u64,
}

impl<'a> ReplayedStorage<'a> {
    /// `overlay` laid over `inner`.
    pub(crate) fn new(inner: &'a dyn Storage, overlay: &'a Overlay) -> Self {
        Self {
            inner,
            overlay,
            len_floor: 0,
        }
    }

    /// The same view, reaching at least `len_floor` bytes: the read-write
    /// open that replays extends the file over every cluster the replayed
    /// refcounts count (a commit can be durable while the write that
    /// extended the file for its all-zero data is not, and its data
    /// checksum still matches the zeros read past the end), so the image
    /// as replay leaves it reaches that far, reading zeros.
    pub(crate) fn reaching(self, len_floor: u64) -> Self {
        Self { len_floor, ..self }
    }

    fn refuse() -> io::Error {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the image as its journal's replay leaves it is only read",
        )
    }
}

impl Storage for ReplayedStorage<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.overlay.read_through(self.inner, buf, offset)
    }

    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Err(Self::refuse())
    }

    fn flush(&self) -> io::Result<()> {
        Err(Self::refuse())
    }

    fn len(&self) -> io::Result<u64> {
        // Replay may write tables past the end of the file (an L2 table
        // allocated at the end whose in-place write never happened).
        Ok(self
            .inner
            .len()?
            .max(self.overlay.end())
            .max(self.len_floor))
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(Self::refuse())
    }
}

/// One past the last cluster the refcounts of `image` (read through
/// `storage`) count, in bytes: how far the read-write open that replays
/// extends the file. Reads each refcount block once; bounded by the
/// refcount table.
pub(crate) fn counted_end(storage: &dyn Storage, image: &Image) -> Result<u64, CheckError> {
    let g = image.geometry;
    let per_block = g.refcounts_per_block();
    let mut block = vec![0u8; g.cluster_size() as usize];
    for (index, entry) in image.reftable.iter().enumerate().rev() {
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 || !g.is_aligned(offset) {
            // Misaligned blocks are the checker's to report.
            continue;
        }
        storage
            .read_at(&mut block, offset)
            .map_err(CheckError::io(format!(
                "reading the refcount block at {offset:#x}"
            )))?;
        let used = used_entries(&block, g.refcount_order).min(per_block);
        if used > 0 {
            let cluster = index as u64 * per_block + used - 1;
            return Ok((cluster + 1).saturating_mul(g.cluster_size()));
        }
    }
    Ok(0)
}

/// Opens (replays) the journal that `ext` names, for check and salvage.
/// They read the metadata only: a dedup image's index entries are taken
/// and dropped (the engine's open rebuilds its index), any other image
/// refuses them.
pub(super) fn open_for_check<S: Storage>(
    storage: S,
    ext: &JournalExtension,
    options: JournalOptions,
) -> Result<(Journal<S>, ReplayReport), JournalError> {
    let mut dedup_entries = Vec::new();
    let consumer: &mut dyn DedupConsumer = if ext.flags & JournalExtension::FLAG_DEDUP != 0 {
        &mut dedup_entries
    } else {
        &mut NoDedup
    };
    Journal::open(storage, ext.offset, ext.size, options, consumer)
}
