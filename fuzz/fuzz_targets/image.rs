//! A whole image: the input is written into an in-memory device (16 MiB at
//! most, see `BoundedStorage`) as a small qcow2 file, then checked, opened read-only and read-write, read,
//! written, and repaired with `check -r all`. Asserted beyond "no panic":
//!
//! - `check` without repair and a read-only open never change a byte;
//! - a refused read-write open leaves the bytes identical;
//! - guest writes read back, and never land on a cluster that held
//!   metadata when the image was opened;
//! - an image `check` calls clean, and whose metadata clusters are not
//!   also guest data, stays consistent through the engine's writes (no corruption; leaks only from persistent bitmaps, which the
//!   engine drops as QEMU requires of a program without bitmap support,
//!   and from refcounts past the end of the file, which check, like
//!   qemu-img check, does not look at until the file grows over them);
//! - when `check -r all` reports a clean image, `check` calls it clean,
//!   and it stays consistent through the engine's writes.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use qj_engine::check::{check, CheckReport, RepairMode};
use qj_engine::{BackingSource, Image, OpenOptions};
use qj_fuzz::bounded::BoundedStorage;
use qj_fuzz::metadata::{layout, Layout};
use qj_fuzz::refcounts::refcounts_past_end;
use qj_spec::qcow2::Header;

/// Guest bytes the target writes: a pattern that no metadata structure
/// contains, so that a cluster holding it afterwards received guest data.
const MARKER: &[u8; 32] = b"qj-fuzz guest data, never tables";
/// Most guest bytes read back from a read-only open.
const READ_BYTES_MAX: u64 = 256 << 10;

fn opts(writable: bool) -> OpenOptions {
    let mut opts = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    // A name in the input must never make the target open a host file.
    opts.backing = BackingSource::Ignore;
    opts
}

fn guest_data(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn holds_marker(bytes: &[u8]) -> bool {
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

/// What `check` (no repair) says of the image; asserts it wrote nothing.
fn check_read_only(storage: &BoundedStorage) -> Option<CheckReport> {
    let before = storage.to_bytes();
    let report = check(storage, RepairMode::None, &[]);
    assert!(
        storage.to_bytes() == before,
        "check without repair changed the image"
    );
    report.ok()
}

/// Whether `check` calls the image clean.
fn checks_clean(storage: &BoundedStorage) -> bool {
    check_read_only(storage).is_some_and(|r| r.is_clean())
}

/// Whether the image has persistent bitmaps: the engine does not maintain
/// them, so its first write clears autoclear bit 0 as QEMU requires, and
/// their clusters become leaks (QEMU's check reports the same leaks).
fn has_bitmaps(image: &[u8]) -> bool {
    Header::decode(image).is_ok_and(|h| h.bitmaps().is_some())
}

/// Whether leaks may appear after the engine's writes to `image` without
/// the engine having leaked anything: persistent bitmaps it drops, or
/// refcounts past the end of the file that `check` saw no reason to report
/// before the file grew over them.
fn leaks_expected(image: &[u8]) -> bool {
    has_bitmaps(image) || refcounts_past_end(image)
}

/// Whether no cluster of `image` is both metadata and guest data. One
/// that is (an L2 table that maps itself, say) has a refcount of 2 that
/// `check` and qemu-img check call right, but the first copy-on-write of
/// the table leaves the remaining reference with refcount 1 and no COPIED
/// flag, in QEMU as in the engine: such images are not held to staying
/// consistent.
fn metadata_apart_from_data(image: &[u8]) -> bool {
    !layout(image).is_some_and(|l| l.metadata_is_data() || l.active_data_is_shared())
}

/// Asserts that the engine's writes left the image consistent: no
/// corruption, nothing check could not read, and leaks only where
/// `leaks_expected` said so.
fn assert_still_consistent(storage: &BoundedStorage, leaks_expected: bool, what: &str) {
    let report = check_read_only(storage)
        .unwrap_or_else(|| panic!("the engine's writes made {what} impossible to check"));
    assert!(
        report.corruptions == 0
            && report.check_errors == 0
            && (report.leaks == 0 || leaks_expected),
        "the engine's writes broke {what}: {report:?}"
    );
}

/// Writes guest data through the engine and reads it back, on any image
/// the engine opens read-write, corrupt or not: the overlap guard
/// (`engine/src/image/guard.rs`, QEMU's qcow2_pre_write_overlap_check) is
/// what keeps guest data off metadata whose refcounts say it is free.
/// Asserts that the data reads back and that no guest byte lands on a
/// cluster that held metadata once the image was open. Returns `None` when the open is refused (asserting that it left
/// the bytes identical), else whether every operation succeeded (the image
/// stays consistent only then).
fn exercise_writable(storage: &Arc<BoundedStorage>) -> Option<bool> {
    let before = storage.to_bytes();
    let Ok(image) = Image::open(storage.clone(), &opts(true)) else {
        assert!(
            storage.to_bytes() == before,
            "a refused read-write open changed the image"
        );
        return None;
    };
    // The open may replay a journal: the metadata is the one it left.
    let opened = storage.to_bytes();
    let size = image.virtual_size();
    let mut ok = true;
    let mut writes = Vec::new();
    if size >= 8192 {
        writes.push((100u64, 3000usize));
        writes.push((size - 1500, 1500));
    } else if size > 0 {
        writes.push((0, size.min(100) as usize));
    }
    for &(offset, len) in &writes {
        let data = guest_data(len);
        if image.write(&data, offset).is_err() {
            ok = false;
            continue;
        }
        let mut back = vec![0u8; len];
        if image.read(&mut back, offset).is_ok() {
            assert!(back == data, "guest data at {offset} did not read back");
        }
    }
    if size >= 8192 {
        let zeroed = image.write_zeroes(512, 1024).is_ok();
        ok &= zeroed;
        let mut back = vec![0xffu8; 1024];
        if zeroed && image.read(&mut back, 512).is_ok() {
            assert!(
                back.iter().all(|&b| b == 0),
                "zeroed range does not read zeros"
            );
        }
        ok &= image.discard(size / 2 / 4096 * 4096, 4096).is_ok();
    }
    ok &= image.flush().is_ok();
    ok &= image.close().is_ok();

    let after = storage.to_bytes();
    if let Some(Layout {
        cluster_bits,
        metadata,
        ..
    }) = layout(&opened)
    {
        let cluster = |bytes: &'_ [u8], index: u64| -> Vec<u8> {
            let start = (index << cluster_bits) as usize;
            let end = ((index + 1) << cluster_bits) as usize;
            bytes[start.min(bytes.len())..end.min(bytes.len())].to_vec()
        };
        for (&index, what) in &metadata {
            let was = cluster(&opened, index);
            let now = cluster(&after, index);
            assert!(
                holds_marker(&was) || !holds_marker(&now),
                "a guest write landed on host cluster {index}, which held the {what}"
            );
        }
    }
    Some(ok)
}

fuzz_target!(|data: &[u8]| {
    let original = data.to_vec();

    let storage = BoundedStorage::from_bytes(original.clone());
    let report = check_read_only(&storage);
    let clean = report.as_ref().is_some_and(CheckReport::is_clean);

    let storage = Arc::new(BoundedStorage::from_bytes(original.clone()));
    if let Ok(image) = Image::open(storage.clone(), &opts(false)) {
        let mut buf = vec![0u8; image.virtual_size().min(READ_BYTES_MAX) as usize];
        let _ = image.read(&mut buf, 0);
        let _ = image.map();
        let _ = image.info();
        let _ = image.close();
    }
    assert!(
        storage.to_bytes() == original,
        "a read-only open changed the image"
    );

    let leaks_expected_original = leaks_expected(&original);
    let storage = Arc::new(BoundedStorage::from_bytes(original.clone()));
    let separate = metadata_apart_from_data(&original);
    if exercise_writable(&storage) == Some(true) && clean && separate {
        assert_still_consistent(
            &storage,
            leaks_expected_original,
            "an image check called clean",
        );
    }

    let storage = Arc::new(BoundedStorage::from_bytes(original));
    if let Ok(report) = check(&*storage, RepairMode::All, &[]) {
        if report.is_clean() {
            assert!(
                checks_clean(&storage),
                "check -r all reported a clean image that check does not call clean"
            );
            let repaired = storage.to_bytes();
            let leaks = leaks_expected(&repaired);
            let separate = metadata_apart_from_data(&repaired);
            if exercise_writable(&storage) == Some(true) && separate {
                assert_still_consistent(&storage, leaks, "an image check -r all repaired");
            }
        }
    }
});
