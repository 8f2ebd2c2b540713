//! A check of an image whose journal is dirty: the metadata in place is
//! stale until the journal's committed transactions are applied, so the
//! check replays them in memory first and checks the metadata as replay
//! leaves it, writing nothing. A journal that cannot be replayed (damaged in
//! the middle of its log: a committed transaction is lost) is itself a
//! corruption, reported with what the journal found, and the metadata in
//! place is checked as it stands.

use std::io;

use qj_journal::{Journal, JournalOptions, NoDedup, Overlay, ReplayMode, Storage};
use qj_spec::qcow2::features::{AUTOCLEAR_JOURNAL_VALID_BIT, INCOMPAT_JOURNAL_DIRTY_BIT};
use qj_spec::qcow2::Header;

use crate::backend::journal::{commit_protocol, DEVICE_LIMIT_BYTES};

/// What the check does with the image's journal.
pub(crate) enum JournalState {
    /// No journal, a clean one, or one a program that does not know it
    /// invalidated: the metadata in place is the image's.
    InPlace,
    /// A dirty journal replayed in memory: `overlay` holds the metadata
    /// writes of `transactions` committed transactions.
    Replayed {
        /// The replayed writes.
        overlay: Overlay,
        /// How many transactions they came from.
        transactions: u64,
    },
    /// A dirty journal whose replay failed: why.
    Unreplayable(String),
}

/// Replays the dirty journal of the image on `storage` in memory, if it has
/// one that counts (valid, autoclear bit 60).
pub(crate) fn replay_dirty_journal(storage: &dyn Storage, header: &Header) -> JournalState {
    let Some(ext) = header.journal() else {
        return JournalState::InPlace;
    };
    if !header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT)
        || !header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT)
    {
        return JournalState::InPlace;
    }
    let mut options = JournalOptions::new(DEVICE_LIMIT_BYTES);
    options.commit_protocol = commit_protocol(&ext);
    options.replay_mode = ReplayMode::InMemory;
    match Journal::open(storage, ext.offset, ext.size, options, &mut NoDedup) {
        Ok((journal, report)) => JournalState::Replayed {
            overlay: journal.overlay().clone(),
            transactions: report.transactions_replayed,
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
}

impl<'a> ReplayedStorage<'a> {
    /// `overlay` laid over `inner`.
    pub(crate) fn new(inner: &'a dyn Storage, overlay: &'a Overlay) -> Self {
        Self { inner, overlay }
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
        Ok(self.inner.len()?.max(self.overlay.end()))
    }

    fn set_len(&self, _: u64) -> io::Result<()> {
        Err(Self::refuse())
    }
}
