//! One damaged byte anywhere in the journal's header area never loses a
//! committed transaction (issue 12, item 7): both slots describe the same
//! journal, so whichever slot a flipped byte breaks, the other one finds
//! the log. Every flip must open with every flushed write replayed, or be
//! refused with an error naming the problem and the file untouched.

mod common;

use common::storage_bytes;

use std::sync::Arc;

use qj_engine::check::{check, RepairMode};
use qj_engine::{Image, MemStorage, OpenOptions, Storage};

/// Bytes of the header area: two 512-byte slots (journal blocks of 512
/// bytes, so no padding after them).
const HEADER_AREA_BYTES: u64 = 1024;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
}

/// Three writes, each flushed, then the process dies: the writes are only
/// in the journal. With `checkpointed`, enough flushed writes come first
/// to make the journal checkpoint (header updates by a running session,
/// not only by the open). Returns the image bytes and the journal's offset.
fn abandoned_image_with_three_flushed_writes(checkpointed: bool) -> (Vec<u8>, u64) {
    let (storage, image) = common::journal_image_in_memory(4 << 20);
    if checkpointed {
        // Bounded: a checkpoint comes once the ring is half full.
        for round in 0..256u64 {
            let synced = image.info().unwrap().journal.unwrap().synced_seq;
            if synced > 0 && round > 8 {
                break;
            }
            // Allocate and free in turn: every round changes metadata.
            let at = (1 << 20) + (round / 2 % 32) * 65536;
            if round % 2 == 0 {
                image.write(&pattern(round as u8, 65536), at).unwrap();
            } else {
                image.discard(at, 65536).unwrap();
            }
            image.flush().unwrap();
        }
        assert!(image.info().unwrap().journal.unwrap().synced_seq > 0);
    }
    for (i, seed) in [0x11u8, 0x22, 0x33].into_iter().enumerate() {
        image.write(&pattern(seed, 8192), i as u64 * 65536).unwrap();
        image.flush().unwrap();
    }
    image.abandon();
    let offset = Image::read_header(&*storage)
        .unwrap()
        .journal()
        .expect("a journal")
        .offset;
    (storage_bytes(&*storage), offset)
}

fn reads_back_all_three(image: &Image) -> bool {
    [0x11u8, 0x22, 0x33]
        .into_iter()
        .enumerate()
        .all(|(i, seed)| {
            let mut buf = vec![0u8; 8192];
            image.read(&mut buf, i as u64 * 65536).unwrap();
            buf == pattern(seed, 8192)
        })
}

#[test]
fn every_flipped_header_byte_keeps_every_flushed_write() {
    for checkpointed in [false, true] {
        flip_every_header_byte(checkpointed);
    }
}

fn flip_every_header_byte(checkpointed: bool) {
    let (pristine, journal_offset) = abandoned_image_with_three_flushed_writes(checkpointed);
    let pristine_clusters = check(
        &MemStorage::from_bytes(pristine.clone()),
        RepairMode::None,
        &[],
    )
    .unwrap()
    .allocated_clusters;
    assert!(pristine_clusters >= 6);
    let mut opened = 0;
    for at in journal_offset..journal_offset + HEADER_AREA_BYTES {
        let mut bytes = pristine.clone();
        bytes[at as usize] ^= 0xff;

        // A plain check replays in memory: it either sees the three
        // writes' clusters, or reports the journal as a corruption.
        let storage = MemStorage::from_bytes(bytes.clone());
        let report = check(&storage, RepairMode::None, &[]).unwrap();
        assert!(
            report.corruptions > 0 || report.allocated_clusters == pristine_clusters,
            "flip at {at:#x}: check lost writes: {report:?}"
        );

        let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(bytes.clone()));
        match Image::open(storage.clone(), &OpenOptions::read_write()) {
            Ok(image) => {
                assert!(
                    reads_back_all_three(&image),
                    "flip at {at:#x} (checkpointed {checkpointed}): opened, but a flushed write is lost"
                );
                image.close().unwrap();
                opened += 1;
            }
            Err(e) => {
                let message = e.to_string();
                assert!(message.contains("journal"), "flip at {at:#x}: {message}");
                assert!(
                    storage_bytes(&*storage) == bytes,
                    "flip at {at:#x}: refused, but the file changed"
                );
            }
        }
    }
    // Both slots carry the same journal, so no single flip needs a refusal.
    assert_eq!(opened, HEADER_AREA_BYTES, "every flip opens");
}
