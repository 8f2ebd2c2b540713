//! Image locks compatible with QEMU's: a qj writer and a QEMU writer
//! exclude each other in both directions, two writers of either kind
//! exclude each other, and readers coexist but not with a writer.
//!
//! QEMU's file-posix driver (`raw_apply_lock_bytes`,
//! `raw_check_lock_bytes` in `block/file-posix.c`) expresses permissions as
//! open-file-description (OFD) byte-range read locks on the image file:
//! byte `100 + i` is held by every user that has permission bit `i`, and
//! byte `200 + i` by every user that does not let others have it. The
//! permission bits are CONSISTENT_READ (0), WRITE (1), WRITE_UNCHANGED (2)
//! and RESIZE (3). A user that wants permission `i` tests byte `200 + i`;
//! one that does not share `i` tests byte `100 + i`; a test is an attempt
//! at a write lock (`F_OFD_GETLK`), which any other holder's read lock
//! blocks. The locks are taken first and tested after, as QEMU does, so
//! two users starting together both see each other.
//!
//! OFD locks belong to the open file description, not the process: two
//! opens in one process exclude each other like two processes, and the
//! locks go with the descriptor when it is closed.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// QEMU's first permission byte.
const PERM_BASE: i64 = 100;
/// QEMU's first "not shared" byte.
const SHARED_BASE: i64 = 200;
/// Number of permission bits QEMU 10 locks (`BLK_PERM_ALL` = 0x0f).
const PERM_BITS: u32 = 4;

/// QEMU's permission bits.
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;

/// How an open image is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// As QEMU locks a qcow2 image file: a writer takes every permission
    /// and shares neither writing nor resizing; a reader takes consistent
    /// reads and shares neither writing nor resizing (so it refuses, and is
    /// refused by, any writer).
    #[default]
    Qemu,
    /// `-U` / `--force-share`: read-only, takes no lock and is refused by
    /// none. What is read may be inconsistent while another process writes.
    ForceShare,
}

/// Held locks on one image file; released when dropped (the descriptor
/// closes).
#[derive(Debug)]
pub struct ImageLock {
    _file: File,
}

/// The name QEMU gives a permission bit in its lock errors.
fn perm_name(bit: u32) -> &'static str {
    match bit {
        CONSISTENT_READ => "consistent read",
        WRITE => "write",
        WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    // SAFETY: `flock` is a plain C struct; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Takes a shared lock on one byte (never blocks).
fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: a valid descriptor and a pointer to a live `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn byte_is_held(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: a valid descriptor and a pointer to a live `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// How long a conflict may last before it counts. A process that forks
/// while it holds an image (to run any program) shares the locked
/// descriptor with its child until the child's exec closes it: a lock
/// released just before can look held for that instant. A real holder
/// holds for longer than this.
const TRANSIENT_CONFLICT_MS_MAX: u64 = 200;
/// Pause between attempts while a conflict may be transient.
const RETRY_PAUSE_MS: u64 = 5;

impl ImageLock {
    /// Locks the image file at `path` for a writer or a reader, or returns
    /// [`Error::Locked`] naming the permission another process holds.
    /// `None` for [`LockMode::ForceShare`].
    pub fn acquire(path: &Path, writable: bool, mode: LockMode) -> Result<Option<ImageLock>> {
        let attempts_max = TRANSIENT_CONFLICT_MS_MAX / RETRY_PAUSE_MS;
        let mut attempt = 0;
        loop {
            match Self::try_acquire(path, writable, mode) {
                Err(Error::Locked { .. }) if attempt < attempts_max => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(RETRY_PAUSE_MS));
                }
                other => return other,
            }
        }
    }

    /// One attempt: take the bytes, then test for conflicts. On a conflict
    /// the file (and with it every byte just taken) is closed.
    fn try_acquire(path: &Path, writable: bool, mode: LockMode) -> Result<Option<ImageLock>> {
        if mode == LockMode::ForceShare {
            if writable {
                return Err(Error::InvalidArgument(
                    "force-share (-U) is only for read-only opens".into(),
                ));
            }
            return Ok(None);
        }
        let (perm, unshared) = if writable {
            (
                CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE,
                WRITE | RESIZE,
            )
        } else {
            (CONSISTENT_READ, WRITE | RESIZE)
        };
        let io_err = |e: io::Error| Error::Io {
            context: format!("locking {}", path.display()),
            source: e,
        };
        let file = File::open(path).map_err(io_err)?;
        let bits = (0..PERM_BITS).map(|i| (i64::from(i), 1u32 << i));
        for (i, bit) in bits.clone() {
            if perm & bit != 0 {
                lock_byte(&file, PERM_BASE + i).map_err(io_err)?;
            }
            if unshared & bit != 0 {
                lock_byte(&file, SHARED_BASE + i).map_err(io_err)?;
            }
        }
        for (i, bit) in bits.clone() {
            if perm & bit != 0 && byte_is_held(&file, SHARED_BASE + i).map_err(io_err)? {
                return Err(Error::Locked {
                    path: path.display().to_string(),
                    lock: format!("\"{}\" lock", perm_name(bit)),
                });
            }
        }
        for (i, bit) in bits {
            if unshared & bit != 0 && byte_is_held(&file, PERM_BASE + i).map_err(io_err)? {
                return Err(Error::Locked {
                    path: path.display().to_string(),
                    lock: format!("shared \"{}\" lock", perm_name(bit)),
                });
            }
        }
        Ok(Some(ImageLock { _file: file }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        (dir, path)
    }

    #[test]
    fn writers_exclude_writers_and_readers_both_ways() {
        let (_d, path) = image();
        let w = ImageLock::acquire(&path, true, LockMode::Qemu).unwrap();
        let e = ImageLock::acquire(&path, true, LockMode::Qemu).unwrap_err();
        assert!(e.to_string().contains("\"write\" lock"), "{e}");
        let e = ImageLock::acquire(&path, false, LockMode::Qemu).unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        assert!(ImageLock::acquire(&path, false, LockMode::ForceShare)
            .unwrap()
            .is_none());
        drop(w);
        let r1 = ImageLock::acquire(&path, false, LockMode::Qemu).unwrap();
        let _r2 = ImageLock::acquire(&path, false, LockMode::Qemu).unwrap();
        let e = ImageLock::acquire(&path, true, LockMode::Qemu).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        drop(r1);
    }

    #[test]
    fn force_share_is_read_only() {
        let (_d, path) = image();
        assert!(ImageLock::acquire(&path, true, LockMode::ForceShare).is_err());
    }
}
