//! The engine's error type: every failure names what went wrong and where.

use std::io;

use qj_spec::error::FormatError;

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device failed; `context` says what the engine was doing.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The device's error.
        #[source]
        source: io::Error,
    },
    /// Malformed on-disk bytes.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The image uses a feature this engine does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// Metadata found at run time that violates the format (the image is
    /// left untouched; run `qj check -r`).
    #[error("image is corrupt: {0}; run `qj check -r all` to repair")]
    Corrupt(String),
    /// A guest request outside the virtual disk.
    #[error("request out of range: offset {offset} length {len} exceeds virtual size {size}")]
    OutOfRange {
        /// Guest offset of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Virtual disk size in bytes.
        size: u64,
    },
    /// A write to an image opened read-only.
    #[error("image is opened read-only")]
    ReadOnly,
    /// A bad option or argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backing file could not be used.
    #[error("backing file {name:?}: {reason}")]
    Backing {
        /// The backing file name from the header.
        name: String,
        /// Why it could not be used.
        reason: String,
    },
    /// An earlier failure left in-memory metadata out of step with the disk;
    /// the image refuses further writes until reopened.
    #[error("image is unusable after an earlier failure: {0}")]
    Poisoned(String),
    /// A guest write, an allocation or a release would have touched
    /// metadata (a corrupt table entry or refcount). Nothing was written;
    /// the image is marked corrupt (incompatible bit 1) and refuses writes
    /// until `qj check -r all` repairs it. QEMU words it the same way.
    #[error("Preventing invalid write on metadata (overlaps with {kind}) at host offset {offset:#x} ({what}); the image is marked corrupt: run `qj check -r all` to repair it")]
    MetadataOverlap {
        /// The structure that would have been overwritten.
        kind: crate::metadata_map::MetadataKind,
        /// Host offset of the first byte that overlaps.
        offset: u64,
        /// What the engine was doing.
        what: String,
    },
    /// Another process holds the image in a way that excludes this open
    /// (QEMU's lock bytes, `lock.rs`).
    #[error("Failed to get {lock}: {path} is in use by another process (is QEMU or another qj using it?)")]
    Locked {
        /// The image file.
        path: String,
        /// The lock that could not be had, as QEMU names it.
        lock: String,
    },
    /// The journal failed.
    #[error("journal: {0}")]
    Journal(String),
}

/// Attaches context to an `io::Result`.
pub(crate) trait IoContext<T> {
    /// Maps an I/O error to [`Error::Io`] with the given context.
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}
