//! `check` on a crashed journal image replays before it validates the
//! header against the file (spec 3.2; issue 12, item 10). A power cut
//! during a checkpoint can leave the new header in place while the L1 table
//! it names, past the old end of the file, is only in the journal: legal,
//! since replay puts it there. The check must not call that corrupt.

mod common;

use std::sync::Arc;

use qj_engine::check::{check, RepairMode};
use qj_engine::{Image, MemStorage, OpenOptions, Storage};

fn bytes_of(storage: &dyn Storage) -> Vec<u8> {
    let mut bytes = vec![0u8; storage.len().unwrap() as usize];
    storage.read_at(&mut bytes, 0).unwrap();
    bytes
}

#[test]
fn a_header_in_place_naming_an_l1_only_in_the_journal_checks_clean() {
    let (storage, image) = common::journal_image_in_memory(1 << 20);
    image.write(&[0x5a; 4096], 0).unwrap();
    // Growing the disk moves the L1 table to a new cluster at the end.
    image.resize(64 << 30).unwrap();
    image.flush().unwrap();
    image.abandon();
    let crashed = bytes_of(&*storage);

    // The header as the checkpoint writes it: what replay makes of the
    // in-place header (taken from a copy that replays and stops there).
    let replayed: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(crashed.clone()));
    Image::open(replayed.clone(), &OpenOptions::read_write())
        .unwrap()
        .abandon();
    let new_header = Image::read_header(&*replayed).unwrap();
    let old_header = Image::read_header(&*storage).unwrap();
    assert_ne!(new_header.l1_table_offset, old_header.l1_table_offset);
    assert!(
        new_header.l1_table_offset >= crashed.len() as u64,
        "the new L1 table ({:#x}) lies past the end of the crashed file ({:#x})",
        new_header.l1_table_offset,
        crashed.len()
    );
    assert!(
        new_header.has_incompatible(60),
        "a journalled header says dirty"
    );

    // The crash state: the new header reached the disk, its L1 did not.
    let mut state = crashed.clone();
    let cluster = replayed_header_cluster(&*replayed);
    state[..cluster.len()].copy_from_slice(&cluster);
    let crash_state = MemStorage::from_bytes(state.clone());
    let report = check(&crash_state, RepairMode::None, &[]).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.allocated_clusters, 1, "{report:?}");
    assert_eq!(bytes_of(&crash_state), state, "a check writes nothing");

    // And a read-write open replays it and finds the write and the size.
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(state));
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    let mut buf = vec![0u8; 4096];
    image.read(&mut buf, 0).unwrap();
    assert_eq!(buf, vec![0x5a; 4096]);
    assert_eq!(image.info().unwrap().virtual_size, 64 << 30);
    image.close().unwrap();
    assert!(check(&*storage, RepairMode::None, &[]).unwrap().is_clean());
}

fn replayed_header_cluster(storage: &dyn Storage) -> Vec<u8> {
    let mut cluster = vec![0u8; 4096];
    storage.read_at(&mut cluster, 0).unwrap();
    cluster
}
