//! Why a check could not run at all (as opposed to problems it found, which
//! are counted in the report).

use qj_spec::FormatError;

/// A check or repair that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The storage failed.
    #[error("I/O error while {context}: {source}")]
    Io {
        /// What the checker was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The header (or a table it points at) cannot be decoded: QEMU refuses
    /// to open such an image too, so there is nothing to count.
    #[error("image header is invalid: {0}")]
    Format(#[from] FormatError),
    /// The image uses a feature whose metadata the checker cannot interpret
    /// (extended L2 entries, an external data file).
    #[error("cannot check this image: {0}")]
    Unsupported(String),
    /// The journal holds committed transactions not yet written to the
    /// metadata: the metadata on disk is stale, and a repair made from it
    /// would be overwritten (or worse, contradicted) by the replay.
    #[error(
        "the journal is dirty (incompatible bit 60): it holds committed metadata that is not in \
         place yet, and a repair made without it would be undone by its replay; replay it first \
         by opening the image read-write (for example `qj io -c flush FILE`), then repair"
    )]
    JournalDirty,
    /// The journal is dirty but cannot be replayed (damaged, or not to be
    /// found): only `qj check -r all`, which salvages it first, may repair.
    #[error(
        "the journal is dirty and cannot be replayed: {0}; only `qj check -r all` repairs it: it \
         applies what can be replayed, drops the rest and repairs the image"
    )]
    JournalUnreplayable(String),
    /// The image has more clusters than the checker will hold in memory.
    #[error("image too large to check: {clusters} clusters")]
    TooLarge {
        /// Clusters the file spans.
        clusters: u64,
    },
}

impl CheckError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> CheckError {
        let context = context.into();
        move |source| CheckError::Io { context, source }
    }
}
