//! The length of an image file this process writes, and the space reserved
//! past it.
//!
//! A writable handle keeps two ends in memory:
//!
//! - the *length*, the end of the furthest byte written (or the length
//!   set). The engine asks for it on every cluster allocation (is the new
//!   cluster past the end, so that its padding reads as zeros without being
//!   written?), and asking the file system is a system call (`statx`, about
//!   10 us) each time. Writable handles hold the image lock, so no one else
//!   changes the file under them; a read-only handle may share the file
//!   with a writer and asks the file system every time.
//! - the *reserved end*, the file's real size, at or past the length. Only
//!   an `O_DIRECT` handle reserves (calls [`FileLength::reserve`]). A
//!   buffered write past the end costs no more than any other (the page
//!   cache allocates blocks in bulk at writeback); and when the steps were
//!   written zeros, they were dirty pages that the next `fdatasync` had to
//!   write out: measured, they halved 8 fio jobs' flushed writes in
//!   writeback mode.
//!
//! Why reserve: on the file systems images live on, writing a block the
//! file has never held is the expensive kind of direct write. ext4 runs an
//! `O_DIRECT` write past the end of the file with the inode lock held
//! exclusively and waits for the device under it, so concurrent writers
//! (8 NBD connections, each allocating clusters) queue behind one another.
//! A block-aligned write inside the file's size into blocks already
//! allocated takes the lock shared; into unwritten (`fallocate`d) blocks
//! only since Linux 6.3 (this project's machine runs 6.18; on older
//! kernels those writes take it exclusively, and written zeros would
//! serialise less).
//!
//! How: the reservation is allocated with `fallocate(2)`, a step at a time
//! (an eighth of the file, from 1 MiB to 8 MiB). Its blocks are
//! *unwritten* extents: they read as zeros, and no byte goes to the
//! device. The first write into such a block has the file system mark it
//! written, a metadata change that the next `fdatasync` carries; with group
//! commit that is one per batch of flushes, not one per write. Writing the
//! zeros instead (what this module did first, and still does where the file
//! system has no `fallocate`) avoids that metadata but puts a whole cluster
//! of zeros on the device for every cluster allocated: with 4 KiB guest
//! writes into fresh 64 KiB clusters, about 200 MB/s written for 17 MB/s
//! of guest data, and every flush waited for its share. Measured through
//! `qj serve --cache none` on this project's machine (fio, 4 KiB random
//! writes each flushed, fresh image, `benches/nbd-bench.sh -J
//! randwrite-sync,randwrite-sync-8jobs -c none`): with zeros 0.71-0.73x the
//! preallocated raw file at 8 jobs and 0.88-0.92x at one; allocated,
//! 0.84-0.88x and 0.90-1.13x. fio on a plain file there, 4 KiB random
//! `O_DIRECT` writes each followed by `fdatasync`: 7,400 a second into
//! blocks already written, 3,900 into a sparse file, 4,000 into a
//! `fallocate`d one; 15,100, 4,900 and 8,600 with 8 jobs. That machine's
//! ext4 has no journal of its own, so a conversion costs metadata block
//! writes inside `fdatasync`; with a file-system journal it costs a
//! journal commit per batch instead, and zeros might win there (RFC §6.2,
//! *the reservation allocated, not written*).
//!
//! The bytes between the length and the reserved end read as zeros, and
//! nothing refers to them, as the engine assumes of bytes past the length.
//! Dropping the handle truncates them away; after a crash they stay as
//! unreferenced clusters of zeros at the end of the file, which `qemu-img
//! check` and `qj check` accept (they count referenced clusters) and the
//! allocator reuses. No ordering rule depends on them: a write into them is
//! made durable by the next flush like any other (`fdatasync` also commits
//! the allocation of the block it went to, and the file's size), and a
//! crash that loses the reservation loses only unreferenced bytes.

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

/// The smallest step the reservation grows by, and the unit its end is
/// rounded to (a multiple of every qcow2 cluster size up to 1 MiB).
const GROW_STEP_BYTES_MIN: u64 = 1 << 20;

/// The largest step: it bounds what a crash may leave at the end of the
/// file, and how long a writer that needs the next step waits for it
/// where the zeros must be written (8 MiB of sequential writing, a few
/// milliseconds; an allocation writes no data).
const GROW_STEP_BYTES_MAX: u64 = 8 << 20;

/// The length of a file (see the module documentation).
#[derive(Debug)]
pub(crate) struct FileLength(Option<Reserved>);

/// What a writable handle keeps.
#[derive(Debug)]
struct Reserved {
    /// The end of the furthest byte written or set: [`FileLength::get`].
    length: AtomicU64,
    /// At or past `length`; the bytes between read as zeros. Raised only
    /// with `grow` held.
    reserved_end: AtomicU64,
    /// Held while a step is reserved past the reserved end, and by a write
    /// that goes past it: a step (of zeros, where they are written) must
    /// never land on bytes a concurrent write is putting there. False once
    /// growing failed.
    grow: Mutex<bool>,
}

/// Held by a write that goes past the reserved end (the reservation could
/// not grow): no step is reserved until it is done.
#[must_use = "hold it until the write that passes the reserved end is done"]
pub(crate) struct Extending<'a> {
    _held: Option<MutexGuard<'a, bool>>,
}

impl Extending<'_> {
    /// For a write that did not ask [`FileLength::reserve`] (a buffered
    /// handle, which never reserves).
    pub(crate) const NOT: Self = Self { _held: None };
}

impl FileLength {
    /// Starts from the file's length now if `writable`.
    pub(crate) fn of(file: &File, writable: bool) -> io::Result<Self> {
        if !writable {
            return Ok(Self(None));
        }
        let len = file.metadata()?.len();
        Ok(Self(Some(Reserved {
            length: AtomicU64::new(len),
            reserved_end: AtomicU64::new(len),
            grow: Mutex::new(true),
        })))
    }

    /// The length: every completed write and `set_len` counted (a
    /// read-only handle asks the file, which may include a writer's
    /// reservation; it reads as zeros).
    pub(crate) fn get(&self, file: &File) -> io::Result<u64> {
        match &self.0 {
            Some(r) => Ok(r.length.load(Ordering::Acquire)),
            None => Ok(file.metadata()?.len()),
        }
    }

    /// Called before a write ending at `end`: if it would pass the reserved
    /// end, first reserves a step from there with `reserve_step(offset,
    /// len)`, which must leave those bytes reading as zeros. Growing the
    /// reservation is an optimization only: if it fails (no space for a
    /// whole step, or any other error), the write extends the file itself,
    /// as without one, holding the returned guard until [`Self::wrote`],
    /// and reports its own error if there is one.
    pub(crate) fn reserve(
        &self,
        end: u64,
        reserve_step: impl FnOnce(u64, u64) -> io::Result<()>,
    ) -> Extending<'_> {
        let Some(r) = &self.0 else {
            return Extending::NOT;
        };
        if end <= r.reserved_end.load(Ordering::Acquire) {
            return Extending::NOT;
        }
        let mut grow = r.grow.lock();
        let reserved = r.reserved_end.load(Ordering::Acquire);
        if end <= reserved {
            // Another writer grew it while this one waited.
            return Extending::NOT;
        }
        if *grow {
            let step = (reserved / 8).clamp(GROW_STEP_BYTES_MIN, GROW_STEP_BYTES_MAX);
            // Ends on a step boundary: at least `end`, at most a step past
            // the old reserved end.
            let target = end
                .next_multiple_of(GROW_STEP_BYTES_MIN)
                .max((reserved + step) / GROW_STEP_BYTES_MIN * GROW_STEP_BYTES_MIN);
            match reserve_step(reserved, target - reserved) {
                Ok(()) => {
                    r.reserved_end.store(target, Ordering::Release);
                    return Extending::NOT;
                }
                // Out of space for a whole step, or the file system
                // refused: later extensions write only what they need (and
                // report ENOSPC themselves).
                Err(_) => *grow = false,
            }
        }
        Extending { _held: Some(grow) }
    }

    /// A write ending at `end` completed; its guard (if any) may go now.
    pub(crate) fn wrote(&self, end: u64, extending: Extending<'_>) {
        if let Some(r) = &self.0 {
            r.length.fetch_max(end, Ordering::AcqRel);
            // A no-op unless the write went past the reserved end, which a
            // reserving handle does only holding `extending`'s guard.
            r.reserved_end.fetch_max(end, Ordering::AcqRel);
        }
        drop(extending);
    }

    /// Truncates or extends the file to `new_len` with `set_len` (the
    /// file's own, or one that also takes the caller's locks: always after
    /// this one's, the order an extending write takes them in): no
    /// reservation remains.
    pub(crate) fn set_len(
        &self,
        new_len: u64,
        set_len: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(r) = &self.0 else {
            return set_len();
        };
        let _no_growing = r.grow.lock();
        set_len()?;
        r.length.store(new_len, Ordering::Release);
        r.reserved_end.store(new_len, Ordering::Release);
        Ok(())
    }

    /// Gives the reservation back: truncates the file to its length. For
    /// the handle's last moment (nothing writes concurrently). A failure
    /// leaves zeros at the end, which nothing refers to.
    pub(crate) fn release(&self, file: &File) {
        let Some(r) = &self.0 else { return };
        let length = r.length.load(Ordering::Acquire);
        if r.reserved_end.load(Ordering::Acquire) > length && file.set_len(length).is_ok() {
            r.reserved_end.store(length, Ordering::Release);
        }
    }
}

/// Makes a step of the reservation read as zeros: `allocate`s it
/// (`fallocate`), or, where the file system cannot (`EOPNOTSUPP`), calls
/// `write_zeros`. Any other failure (no space, say) is the caller's.
pub(crate) fn allocate_or_write_zeros(
    allocate: impl FnOnce() -> io::Result<()>,
    write_zeros: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    match allocate() {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(),
        allocated => allocated,
    }
}

/// Writes `len` zero bytes at `offset` through `write_at`, from one buffer
/// of at most `chunk` bytes (`zeros`), reused.
pub(crate) fn write_zeros_with(
    zeros: &[u8],
    mut offset: u64,
    len: u64,
    mut write_at: impl FnMut(&[u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let end = offset + len;
    // Bounded: every round writes at least one byte (zeros is not empty).
    debug_assert!(!zeros.is_empty());
    while offset < end {
        let n = (end - offset).min(zeros.len() as u64) as usize;
        write_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_error(code: i32) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(code))
    }

    #[test]
    fn a_step_is_allocated_and_zeros_are_written_only_where_the_file_system_cannot_allocate() {
        let zeros_written = std::cell::Cell::new(0);
        let write_zeros = || {
            zeros_written.set(zeros_written.get() + 1);
            Ok(())
        };
        allocate_or_write_zeros(|| Ok(()), write_zeros).unwrap();
        assert_eq!(zeros_written.get(), 0, "allocated: no zeros written");
        allocate_or_write_zeros(|| os_error(libc::EOPNOTSUPP), write_zeros).unwrap();
        assert_eq!(
            zeros_written.get(),
            1,
            "no fallocate: the zeros are written"
        );
        let full = allocate_or_write_zeros(|| os_error(libc::ENOSPC), write_zeros);
        assert_eq!(full.unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(
            zeros_written.get(),
            1,
            "out of space: no zeros either, the reservation stops growing"
        );
    }
}
