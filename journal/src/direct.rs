//! A regular file opened with `O_DIRECT` (QEMU's `cache=none` and
//! `cache=directsync`): reads and writes bypass the host page cache, as
//! production guests run. Flush is still `fdatasync`: the device's own
//! volatile cache needs it.
//!
//! `O_DIRECT` wants the file offset, the length and the buffer address
//! aligned to the device's logical block. Requests that are aligned go
//! straight to the file from an aligned copy of the caller's buffer; the
//! rest (a header field, an unaligned guest write) go through a bounce
//! buffer covering the blocks they touch, a write by read-modify-write.
//! Two writes that touch one block must not interleave their
//! read-modify-write with each other or with a plain write of that block,
//! or one would be lost: a read-modify-write holds `rmw` exclusively, every
//! other write holds it shared.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use parking_lot::RwLock;

use crate::file_length::{allocate_or_write_zeros, write_zeros_with, FileLength};
use crate::storage::Storage;

/// The largest buffer of zeros the reservation is written from, where the
/// file system cannot allocate it (`file_length.rs`).
const ZERO_CHUNK_BYTES: u64 = 1 << 20;

/// Writes of one checkpoint in flight at once ([`Storage::concurrent_writes`]).
/// Each `O_DIRECT` write waits for the device, so a checkpoint writing one
/// at a time (about 5,000 4 KiB writes a second here) fell behind eight
/// flushing fio jobs on a fresh image with logged data: the logged bytes
/// it had not synced filled their bound, and 2,398-2,776 of about 13,000
/// fresh clusters in 4 seconds were refused and written in place. Two in
/// flight refused 540-779, four 0-13, eight no fewer than four and ran
/// no faster (RFC.md 6.2).
const CONCURRENT_WRITES: usize = 4;

/// Memory alignment of every buffer handed to the kernel: a page, which
/// satisfies any logical block size up to it.
const MEMORY_ALIGN_BYTES: usize = 4096;

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), MEMORY_ALIGN_BYTES)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(io::ErrorKind::OutOfMemory, "aligned buffer"));
        }
        Ok(Self { ptr, layout })
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `layout.size()` bytes owned
        // by `self`, borrowed mutably here.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// A file opened with `O_DIRECT`; flush is `fdatasync`.
#[derive(Debug)]
pub struct DirectFileStorage {
    file: File,
    writable: bool,
    /// The device's logical block: the alignment of offsets and lengths.
    block_bytes: u64,
    /// Shared by aligned writes, exclusive for a read-modify-write.
    rmw: RwLock<()>,
    len: FileLength,
}

impl DirectFileStorage {
    /// Opens an existing file with `O_DIRECT`, read-only or read-write.
    /// Fails where the file system does not support direct I/O (tmpfs).
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        // The smallest alignment the device takes: 512 on most, 4096 on
        // 4Kn devices, where a 512-byte direct read fails with EINVAL.
        let mut probe = AlignedBuf::zeroed(512)?;
        let block_bytes = match file.read_at(probe.as_mut_slice(), 0) {
            Ok(_) => 512,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => 4096,
            Err(e) => return Err(e),
        };
        let len = FileLength::of(&file, writable)?;
        Ok(Self {
            file,
            writable,
            block_bytes,
            rmw: RwLock::new(()),
            len,
        })
    }

    /// The blocks `[offset, offset + len)` touches, as a byte range.
    fn covering(&self, offset: u64, len: usize) -> (u64, usize) {
        let start = offset - offset % self.block_bytes;
        let end = (offset + len as u64).next_multiple_of(self.block_bytes);
        (start, (end - start) as usize)
    }

    fn is_aligned(&self, offset: u64, buf: &[u8]) -> bool {
        offset.is_multiple_of(self.block_bytes)
            && (buf.len() as u64).is_multiple_of(self.block_bytes)
            && (buf.as_ptr() as usize).is_multiple_of(MEMORY_ALIGN_BYTES)
    }

    /// Reads `[start, start + buf.len())` into an aligned buffer; bytes
    /// past the end of the file read as zeros.
    fn read_blocks(&self, buf: &mut [u8], start: u64) -> io::Result<()> {
        let mut done = 0;
        // Bounded: every round reads at least one byte or ends.
        while done < buf.len() {
            let n = self.file.read_at(&mut buf[done..], start + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
            if !done.is_multiple_of(self.block_bytes as usize) {
                // A short read ends at the end of the file.
                buf[done..].fill(0);
                break;
            }
        }
        Ok(())
    }
}

/// Allocates `[offset, offset + len)` of `file` with `fallocate(2)` (mode
/// 0: the file grows to cover it; the blocks read as zeros until written).
fn fallocate(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_far = || io::Error::new(io::ErrorKind::InvalidInput, "range past the largest file");
    let offset = libc::off_t::try_from(offset).map_err(|_| too_far())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_far())?;
    // Bounded: a signal interrupts it at most once per signal sent.
    loop {
        // SAFETY: the descriptor is `file`'s, open for as long as the call.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Storage for DirectFileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (start, len) = self.covering(offset, buf.len());
        let mut bounce = AlignedBuf::zeroed(len)?;
        let blocks = bounce.as_mut_slice();
        self.read_blocks(blocks, start)?;
        let at = (offset - start) as usize;
        buf.copy_from_slice(&blocks[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "storage opened read-only",
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let (start, len) = self.covering(offset, buf.len());
        let extending = self.len.reserve(start + len as u64, |at, len| {
            // From the next block on: the rest of the block the file ends
            // in reads as zeros once the file is longer.
            let at_block = at.next_multiple_of(self.block_bytes);
            let end = at + len;
            if at_block >= end {
                // The step ends in the block the file ends in: nothing to
                // reserve (`fallocate` of zero bytes is EINVAL, which would
                // stop the reservation for good).
                return Ok(());
            }
            allocate_or_write_zeros(
                || fallocate(&self.file, at_block, end - at_block),
                || {
                    let mut zeros = AlignedBuf::zeroed(
                        (end - at_block).clamp(self.block_bytes, ZERO_CHUNK_BYTES) as usize,
                    )?;
                    write_zeros_with(zeros.as_mut_slice(), at_block, end - at_block, |z, at| {
                        self.file.write_all_at(z, at)
                    })
                },
            )
        });
        if self.is_aligned(offset, buf) {
            let _shared = self.rmw.read();
            self.file.write_all_at(buf, offset)?;
            self.len.wrote(offset + buf.len() as u64, extending);
            return Ok(());
        }
        let mut bounce = AlignedBuf::zeroed(len)?;
        let blocks = bounce.as_mut_slice();
        let at = (offset - start) as usize;
        let whole = at == 0 && buf.len() == len;
        // Only partial blocks need their old bytes, and only those must
        // not interleave with another write of the same block.
        let _guard = if whole {
            blocks.copy_from_slice(buf);
            Err(self.rmw.read())
        } else {
            let exclusive = self.rmw.write();
            self.read_blocks(blocks, start)?;
            blocks[at..at + buf.len()].copy_from_slice(buf);
            Ok(exclusive)
        };
        self.file.write_all_at(blocks, start)?;
        // Whole blocks were written: the file may now end past `buf`.
        self.len.wrote(start + len as u64, extending);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        self.len.get(&self.file)
    }

    fn concurrent_writes(&self) -> usize {
        CONCURRENT_WRITES
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "storage opened read-only",
            ));
        }
        self.len.set_len(len, || {
            let _exclusive = self.rmw.write();
            self.file.set_len(len)
        })
    }
}

impl Drop for DirectFileStorage {
    fn drop(&mut self) {
        self.len.release(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_and_aligned_io_round_trips_like_a_plain_file() {
        // Beside the sources, on the machine's disk (/tmp may be tmpfs,
        // which has no O_DIRECT).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let storage = DirectFileStorage::open(&path, true).expect("O_DIRECT on the project's disk");
        storage.write_at(&[1, 2, 3], 72).unwrap();
        storage.write_at(&vec![9u8; 4096], 4096).unwrap();
        storage.write_at(&[5u8; 700], 9_900).unwrap();
        let mut buf = vec![0u8; 3];
        storage.read_at(&mut buf, 72).unwrap();
        assert_eq!(buf, [1, 2, 3]);
        let mut all = vec![0u8; 10_600];
        storage.read_at(&mut all, 0).unwrap();
        assert_eq!(all[71], 7);
        assert_eq!(all[75], 7);
        assert!(all[4096..8192].iter().all(|&b| b == 9));
        assert!(all[8192..9_900].iter().all(|&b| b == 7));
        assert!(all[9_900..10_600].iter().all(|&b| b == 5));
        storage.flush().unwrap();
        // The unaligned write past the end wrote whole blocks: the length
        // kept in memory counts them (the file may hold more, reserved).
        let whole_blocks = 10_600u64.next_multiple_of(storage.block_bytes);
        assert_eq!(storage.len().unwrap(), whole_blocks);
        assert!(std::fs::metadata(&path).unwrap().len() >= whole_blocks);
        storage.set_len(6_000).unwrap();
        assert_eq!(storage.len().unwrap(), 6_000);
        storage.write_at(&vec![3u8; 4096], 8192).unwrap();
        drop(storage);
        let plain = std::fs::read(&path).unwrap();
        assert_eq!(plain.len(), 12_288, "the reservation was given back");
        assert_eq!(&plain[..6_000], &all[..6_000]);
        assert!(plain[6_000..8192].iter().all(|&b| b == 0));
        assert!(plain[8192..].iter().all(|&b| b == 3));
    }

    #[test]
    fn a_step_ending_in_the_block_the_file_ends_in_does_not_stop_the_reservation() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        let mib = 1u64 << 20;
        // Ends 100 bytes short of 1 MiB: a write up to 1 MiB asks for a
        // step from there to 1 MiB, inside the file's last block.
        std::fs::write(&path, vec![7u8; mib as usize - 100]).unwrap();
        let on_disk = || std::fs::metadata(&path).unwrap().len();
        let storage = DirectFileStorage::open(&path, true).expect("O_DIRECT on the project's disk");
        storage.write_at(&vec![1u8; 4096], mib - 4096).unwrap();
        assert_eq!(on_disk(), mib);
        storage.write_at(&vec![2u8; 4096], mib + 65_536).unwrap();
        assert_eq!(
            on_disk(),
            2 * mib,
            "the next write past the end still reserves a whole step"
        );
        drop(storage);
        let plain = std::fs::read(&path).unwrap();
        assert_eq!(plain.len() as u64, mib + 65_536 + 4096);
        assert!(plain[..mib as usize - 4096].iter().all(|&b| b == 7));
        assert!(plain[mib as usize - 4096..mib as usize]
            .iter()
            .all(|&b| b == 1));
        assert!(plain[mib as usize..mib as usize + 65_536]
            .iter()
            .all(|&b| b == 0));
    }

    #[test]
    fn a_write_past_the_end_reserves_zeros_that_later_writes_fill_and_drop_gives_back() {
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let on_disk = || std::fs::metadata(&path).unwrap().len();
        let storage = DirectFileStorage::open(&path, true).expect("O_DIRECT on the project's disk");
        let reader = crate::storage::FileStorage::open(&path, false).unwrap();
        storage.write_at(&vec![1u8; 4096], 16_384).unwrap();
        assert_eq!(
            storage.len().unwrap(),
            20_480,
            "the length is what was written"
        );
        let reserved = on_disk();
        assert_eq!(reserved, 1 << 20, "one step of the smallest size, rounded");
        let mut all = vec![0xffu8; reserved as usize];
        reader.read_at(&mut all, 0).unwrap();
        assert!(
            all[..10_000].iter().all(|&b| b == 7),
            "nothing stored is overwritten"
        );
        assert!(all[10_000..16_384].iter().all(|&b| b == 0));
        assert!(all[16_384..20_480].iter().all(|&b| b == 1));
        assert!(
            all[20_480..].iter().all(|&b| b == 0),
            "the reservation reads as zeros"
        );
        storage
            .write_at(&vec![2u8; 4096], 900_000 - 900_000 % 4096)
            .unwrap();
        assert_eq!(
            on_disk(),
            reserved,
            "a write inside the reservation does not grow it"
        );
        storage.write_at(&[3u8; 100], reserved + 50).unwrap();
        assert!(on_disk() > reserved + 150, "the next step is reserved");
        assert_eq!(
            storage.len().unwrap(),
            (reserved + 150).next_multiple_of(storage.block_bytes)
        );
        storage.set_len(30_000).unwrap();
        assert_eq!(
            (storage.len().unwrap(), on_disk()),
            (30_000, 30_000),
            "set_len drops it"
        );
        storage.write_at(&vec![4u8; 4096], 40_960).unwrap();
        assert!(on_disk() > 45_056);
        drop(storage);
        assert_eq!(
            on_disk(),
            45_056,
            "dropping the writer gives the reservation back"
        );
    }
}
