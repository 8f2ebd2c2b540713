//! The seam between the harness and what it tests.
//!
//! A [`CrashTarget`] makes and opens guest disks on a device the harness
//! provides; a [`GuestDisk`] is one open disk. The engine plugs in by
//! implementing both (one target per backend and commit protocol, with or
//! without an injected mutation); the harness proves itself on the small
//! targets in [`crate::targets`].

use std::io;
use std::sync::Arc;

use qj_journal::Storage;

use crate::content_map::ContentMap;

/// An error from a target. The harness only reports it, so it keeps the
/// message and the source.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The device failed (after a power cut: [`crate::sim_device::PowerLost`]).
    #[error("device error: {0}")]
    Io(#[from] io::Error),
    /// The image is malformed: what is wrong and where.
    #[error("corrupt image: {what} at byte {offset}")]
    Corrupt {
        /// What is wrong (field and value).
        what: String,
        /// Device byte offset of the problem.
        offset: u64,
    },
    /// A request the disk refuses (out of range, unsupported).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Any other error of the target, boxed.
    #[error("{0}")]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

/// What a consistency check found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CheckSummary {
    /// Inconsistencies that lose or endanger data (refcount below
    /// references, entries past the end, overlapping metadata...).
    pub corruptions: u64,
    /// Clusters allocated but not referenced.
    pub leaks: u64,
}

/// What QEMU must say about an exported crash image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeakExpectation {
    /// Any number of leaks (flush ordering may leak), and the COPIED flag
    /// errors that `qemu-img check -r leaks` repairs (a crash inside a
    /// snapshot operation leaves a flag and a count that disagree, in
    /// QEMU's order too).
    Any,
    /// Exactly this many (a journal's own clusters, unknown to QEMU).
    Exactly(u64),
}

/// A crash image in a form `qemu-img` can read (check (f)).
#[derive(Clone, Debug)]
pub struct QemuExport {
    /// The qcow2 image bytes (journal clean-closed first if QEMU must read it).
    pub image: Vec<u8>,
    /// The leaks `qemu-img check` may report.
    pub leaks: LeakExpectation,
}

/// A disk format (and its crash-safety mechanism) under test.
pub trait CrashTarget: Send + Sync {
    /// The backend name used on the command line ("raw", "ordered",
    /// "journal", "journal-draft", ...).
    fn name(&self) -> String;

    /// The injected bug, if this target carries one (for reproducer lines).
    fn mutation(&self) -> Option<String> {
        None
    }

    /// Creates a new image of `virtual_size_bytes` on the empty `dev`. When
    /// it returns, the image must be durable (the harness explores crashes
    /// only after creation).
    fn create(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
        virtual_size_bytes: u64,
    ) -> Result<Box<dyn GuestDisk>, TargetError>;

    /// Opens an existing image, recovering it after a crash (journal
    /// replay happens here). May be interrupted by a power cut itself.
    fn open(
        &self,
        dev: Arc<dyn Storage>,
        backing: Option<Arc<dyn Storage>>,
    ) -> Result<Box<dyn GuestDisk>, TargetError>;

    /// Checks the image's metadata consistency. Must not write to `dev`.
    fn check(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError>;

    /// Whether check (a) judges a recovered image after the harness has
    /// read it and closed it cleanly ([`CrashTarget::check_closed`]),
    /// instead of the image as recovery left it ([`CrashTarget::check`],
    /// the default). A target whose `check` would reopen and close a copy
    /// itself (a journal checkpointed before it is judged) saves a second
    /// recovery per crash state this way.
    fn check_after_close(&self) -> bool {
        false
    }

    /// Checks a recovered image that was closed cleanly (when
    /// [`CrashTarget::check_after_close`] is true). Must not write to
    /// `dev`. The default judges it as [`CrashTarget::check`] does.
    fn check_closed(&self, dev: Arc<dyn Storage>) -> Result<CheckSummary, TargetError> {
        self.check(dev)
    }

    /// Checks the image as the crash left it, before any recovery (a
    /// checker must make sense of a crashed image without writing: a dirty
    /// journal is replayed in memory). Must not write to `dev`. `None` for
    /// targets whose checker needs recovery first (the default).
    fn check_unrecovered(
        &self,
        dev: Arc<dyn Storage>,
    ) -> Result<Option<CheckSummary>, TargetError> {
        let _ = dev;
        Ok(None)
    }

    /// Whether its disks have internal snapshots ([`GuestDisk::snapshot_create`]
    /// and the rest); a target without runs a workload's snapshot
    /// operations as flushes.
    fn supports_snapshots(&self) -> bool {
        false
    }
    /// Whether leaks are acceptable after a crash (flush ordering may leak
    /// clusters; a journal must not).
    fn leaks_allowed(&self) -> bool;

    /// The image as `qemu-img` should see it, or `None` if the format is
    /// not qcow2 (the default).
    fn qemu_export(&self, dev: Arc<dyn Storage>) -> Result<Option<QemuExport>, TargetError> {
        let _ = dev;
        Ok(None)
    }
}

/// One open guest disk. Offsets and lengths are in bytes; the harness only
/// issues 512-byte aligned requests.
pub trait GuestDisk: Send + Sync {
    /// The current virtual size.
    fn size_bytes(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), TargetError>;
    /// Writes `buf` at `offset`.
    fn write(&self, buf: &[u8], offset: u64) -> Result<(), TargetError>;
    /// Makes `len_bytes` at `offset` read as zeros.
    fn write_zeroes(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError>;
    /// Discards `len_bytes` at `offset` (they may then read as their old
    /// content, zeros, or backing data).
    fn discard(&self, offset: u64, len_bytes: u64) -> Result<(), TargetError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), TargetError>;
    /// Grows the virtual size to `new_size_bytes`.
    fn resize(&self, new_size_bytes: u64) -> Result<(), TargetError>;
    /// Closes cleanly: everything durable, image consistent.
    fn close(self: Box<Self>) -> Result<(), TargetError>;
    /// Where each guest cluster's content comes from right now, exactly as
    /// reads would find it; `None` (the default) when the disk cannot say,
    /// and the harness then reads every sector.
    fn content_map(&self) -> Result<Option<ContentMap>, TargetError> {
        Ok(None)
    }
    /// Creates internal snapshot `id` (the workload's number) of the disk
    /// as it is; durable when it returns.
    fn snapshot_create(&self, id: u64) -> Result<(), TargetError> {
        Err(no_snapshots(id))
    }
    /// Reverts the disk to snapshot `id`; durable when it returns.
    fn snapshot_apply(&self, id: u64) -> Result<(), TargetError> {
        Err(no_snapshots(id))
    }
    /// Deletes snapshot `id`; durable when it returns.
    fn snapshot_delete(&self, id: u64) -> Result<(), TargetError> {
        Err(no_snapshots(id))
    }
}

fn no_snapshots(id: u64) -> TargetError {
    TargetError::Invalid(format!(
        "snapshot {id}: this target has no internal snapshots"
    ))
}
