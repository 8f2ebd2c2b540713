//! QEMU's cache modes on both backends: `none` and `directsync` open the
//! image with O_DIRECT (unaligned requests take a bounce buffer), the
//! writethrough modes make each write durable before it returns. Images
//! written in every mode pass `qemu-img check` and read back in QEMU.

mod common;

use std::sync::Arc;

use common::{assert_qemu_io_sees, qemu_check_json};
use qj_engine::{CacheMode, CreateOptions, Image, JournalConfig, OpenOptions};

const MODES: [CacheMode; 4] = [
    CacheMode::Writeback,
    CacheMode::Writethrough,
    CacheMode::None,
    CacheMode::Directsync,
];

/// An image of `virtual_size` bytes, with a 1 MiB journal if `journal`.
fn create_options(virtual_size: u64, journal: bool) -> CreateOptions {
    CreateOptions {
        virtual_size,
        journal: journal.then(|| JournalConfig {
            size_bytes: 1 << 20,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    }
}

#[test]
fn every_cache_mode_writes_images_qemu_reads_back() {
    // On the project's disk: /tmp may be tmpfs, which has no O_DIRECT.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for journal in [false, true] {
        for mode in MODES {
            let path = dir.path().join(format!("{mode:?}-{journal}.qcow2"));
            Image::create_path(&path, &create_options(8 << 20, journal)).unwrap();
            let open = OpenOptions {
                cache: mode,
                ..OpenOptions::read_write()
            };
            let image = Arc::new(Image::open_path(&path, &open).unwrap());
            let mut model = vec![0u8; 8 << 20];
            // Unaligned, sub-sector, whole-cluster and cross-cluster writes.
            for (byte, offset, len) in [
                (0x11u8, 100u64, 3000usize),
                (0x22, 65536, 65536),
                (0x33, 130_000, 200_000),
                (0x44, 7, 1),
            ] {
                image.write(&vec![byte; len], offset).unwrap();
                model[offset as usize..offset as usize + len].fill(byte);
            }
            // Threads writing neighbouring sectors of the same blocks: an
            // unaligned write's read-modify-write must not lose another's.
            let threads: Vec<_> = (0..4u8)
                .map(|t| {
                    let image = image.clone();
                    std::thread::spawn(move || {
                        for i in 0..32u64 {
                            let offset = (1 << 20) + i * 4096 + u64::from(t) * 1000;
                            image.write(&[0x80 + t; 1000], offset).unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            for t in 0..4u8 {
                for i in 0..32usize {
                    let offset = (1 << 20) + i * 4096 + usize::from(t) * 1000;
                    model[offset..offset + 1000].fill(0x80 + t);
                }
            }
            let mut back = vec![0u8; 8 << 20];
            image.read(&mut back, 0).unwrap();
            assert!(
                back == model,
                "{mode:?}, journal {journal}: read back differs"
            );
            Arc::try_unwrap(image).unwrap().close().unwrap();
            let check = qemu_check_json(&path);
            let expected = if journal { Some(3) } else { Some(0) };
            assert_eq!(
                check.exit, expected,
                "{mode:?}, journal {journal}: {check:?}"
            );
            assert_qemu_io_sees(&path, &model);
        }
    }
}

#[test]
fn writethrough_makes_each_write_durable_before_it_returns() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for mode in MODES {
        let path = dir.path().join(format!("{mode:?}.qcow2"));
        let opts = CreateOptions {
            virtual_size: 8 << 20,
            ..CreateOptions::default()
        };
        Image::create_path(&path, &opts).unwrap();
        let open = OpenOptions {
            cache: mode,
            ..OpenOptions::read_write()
        };
        let image = Image::open_path(&path, &open).unwrap();
        let before = image.stats().flushes;
        image.write(&[1; 4096], 0).unwrap();
        image.write_zeroes(65536, 65536).unwrap();
        image.discard(0, 65536).unwrap();
        let flushed = image.stats().flushes - before;
        if mode.writethrough() {
            assert!(flushed >= 3, "{mode:?}: {flushed} flushes for 3 operations");
        } else {
            assert_eq!(flushed, 0, "{mode:?}: writeback flushes only when asked");
        }
        image.close().unwrap();
    }
}

#[test]
fn an_open_that_waited_for_the_lock_sees_what_the_last_holder_wrote() {
    // The second open reads the file before the lock is free (to name a
    // missing file or a file system without O_DIRECT), then waits for the
    // holder. The holder grows the file and closes; had the second open
    // kept the length it saw first, its O_DIRECT file would write its zeros
    // ahead of that length, over the holder's last clusters.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for journal in [false, true] {
        // A slow machine may close the holder after the second open gave
        // up waiting (200 ms): that attempt shows nothing; try again.
        let got = (0..5)
            .find_map(|attempt| holder_then_waiter(dir.path(), journal, attempt))
            .expect("the second open got the lock in one of 5 attempts");
        assert!(
            got.iter().all(|&b| b == 0x55),
            "journal {journal}: the holder's flushed write was lost to the next open"
        );
    }
}

/// One try of the scenario above: what the second open reads of the
/// holder's write, or `None` if it gave up waiting for the lock.
fn holder_then_waiter(dir: &std::path::Path, journal: bool, attempt: u32) -> Option<Vec<u8>> {
    let path = dir.join(format!("waited-{journal}-{attempt}.qcow2"));
    Image::create_path(&path, &create_options(64 << 20, journal)).unwrap();
    let direct = OpenOptions {
        cache: CacheMode::None,
        ..OpenOptions::read_write()
    };
    let holder = Image::open_path(&path, &direct).unwrap();
    let (path2, direct2) = (path.clone(), direct.clone());
    let second = std::thread::spawn(move || {
        let image = match Image::open_path(&path2, &direct2) {
            Ok(image) => image,
            Err(qj_engine::Error::Locked { .. }) => return None,
            Err(e) => panic!("second open: {e}"),
        };
        image.write(&[0x77; 4096], 40 << 20).unwrap();
        image.flush().unwrap();
        let mut got = vec![0u8; 4096];
        image.read(&mut got, (20 << 20) + 7 * 65536).unwrap();
        image.close().unwrap();
        Some(got)
    });
    // The second open is waiting for the lock by now; the holder's writes
    // grow the file past the length it read.
    std::thread::sleep(std::time::Duration::from_millis(20));
    for i in 0..8u64 {
        holder.write(&[0x55; 4096], (20 << 20) + i * 65536).unwrap();
    }
    holder.close().unwrap();
    let got = second.join().unwrap()?;
    let check = qemu_check_json(&path);
    assert!(
        matches!(check.exit, Some(0 | 3)),
        "journal {journal}: qemu-img check found corruption: {}",
        check.json
    );
    Some(got)
}
