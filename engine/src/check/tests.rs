//! Unit tests of the counting and repair logic on small images built in
//! memory (512-byte clusters, 16-bit refcounts unless a test says so).

use qj_journal::{MemStorage, Storage};
use qj_spec::qcow2::features::{
    AUTOCLEAR_JOURNAL_VALID_MASK, INCOMPAT_DIRTY_MASK, INCOMPAT_JOURNAL_DIRTY_MASK,
};
use qj_spec::qcow2::{get_refcount, set_refcount, Header, JournalExtension, L1Entry, L2_COPIED};
use qj_spec::units::{Geometry, HostOffset};

use super::{check, CheckError, RepairMode};

const CLUSTER: u64 = 512;
const REFTABLE: u64 = CLUSTER;
const REFBLOCK: u64 = 2 * CLUSTER;
const L1: u64 = 3 * CLUSTER;
const L2: u64 = 4 * CLUSTER;
const DATA: u64 = 5 * CLUSTER;

/// A consistent image: header, reftable, refblock, L1, L2, then two data
/// clusters mapped at guest clusters 0 and 1, every refcount 1.
struct Built {
    storage: MemStorage,
    order: u32,
}

impl Built {
    fn new(order: u32) -> Built {
        let g = Geometry {
            cluster_bits: 9,
            refcount_order: order,
        };
        let mut h = Header::new_v3(g, 32 * 1024);
        h.l1_size = 1;
        h.l1_table_offset = L1;
        h.refcount_table_offset = REFTABLE;
        h.refcount_table_clusters = 1;
        let storage = MemStorage::from_bytes(h.encode().unwrap());
        storage.write_at(&REFBLOCK.to_be_bytes(), REFTABLE).unwrap();
        storage
            .write_at(&L1Entry::new(HostOffset(L2), true).0.to_be_bytes(), L1)
            .unwrap();
        for (i, data) in [DATA, DATA + CLUSTER].into_iter().enumerate() {
            storage
                .write_at(&(data | L2_COPIED).to_be_bytes(), L2 + 8 * i as u64)
                .unwrap();
            storage.write_at(&[0xab; CLUSTER as usize], data).unwrap();
        }
        let built = Built { storage, order };
        for cluster in 0..7 {
            built.set_refcount(cluster, 1);
        }
        built
    }

    fn set_refcount(&self, cluster: u64, value: u64) {
        let mut block = vec![0u8; CLUSTER as usize];
        self.storage.read_at(&mut block, REFBLOCK).unwrap();
        set_refcount(&mut block, cluster, self.order, value);
        self.storage.write_at(&block, REFBLOCK).unwrap();
    }

    fn refcount(&self, cluster: u64) -> u64 {
        let mut block = vec![0u8; CLUSTER as usize];
        self.storage.read_at(&mut block, REFBLOCK).unwrap();
        get_refcount(&block, cluster, self.order)
    }

    fn l2_entry(&self, index: u64) -> u64 {
        let mut raw = [0u8; 8];
        self.storage.read_at(&mut raw, L2 + 8 * index).unwrap();
        u64::from_be_bytes(raw)
    }

    fn set_l2_entry(&self, index: u64, value: u64) {
        self.storage
            .write_at(&value.to_be_bytes(), L2 + 8 * index)
            .unwrap();
    }

    fn header(&self) -> Header {
        Header::decode(&self.storage.to_bytes()).unwrap()
    }

    fn set_header(&self, h: &Header) {
        self.storage.write_at(&h.encode().unwrap(), 0).unwrap();
    }
}

#[test]
fn consistent_image_is_clean_and_counts_allocation() {
    let img = Built::new(4);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.allocated_clusters, 2);
    assert_eq!(r.fragmented_clusters, 0);
    assert_eq!(r.total_clusters, 64);
    assert_eq!(r.image_end_offset, 7 * CLUSTER);
    assert!(r.messages.is_empty());
}

#[test]
fn leaked_cluster_is_reported_and_freed_by_leak_repair() {
    let img = Built::new(4);
    img.storage.set_len(8 * CLUSTER).unwrap();
    img.set_refcount(7, 1);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!((r.leaks, r.corruptions, r.exit_code()), (1, 0, 3));
    assert_eq!(r.messages, vec!["Leaked cluster 7 refcount=1 reference=0"]);
    assert_eq!(img.refcount(7), 1, "a read-only check writes nothing");

    let r = check(&img.storage, RepairMode::Leaks, &[]).unwrap();
    assert_eq!((r.leaks, r.leaks_fixed, r.exit_code()), (0, 1, 0), "{r:?}");
    assert_eq!(img.refcount(7), 0);
}

#[test]
fn extra_refs_and_a_valid_journal_count_as_references() {
    let img = Built::new(4);
    img.storage.set_len(10 * CLUSTER).unwrap();
    for c in 7..10 {
        img.set_refcount(c, 1);
    }
    assert_eq!(check(&img.storage, RepairMode::None, &[]).unwrap().leaks, 3);
    let extra = [(HostOffset(7 * CLUSTER), 2 * CLUSTER)];
    let r = check(&img.storage, RepairMode::None, &extra).unwrap();
    assert_eq!(r.leaks, 1, "cluster 9 is still unreferenced: {r:?}");

    let mut h = img.header();
    h.set_journal(Some(JournalExtension {
        offset: 7 * CLUSTER,
        size: 3 * CLUSTER,
        flags: 0,
    }));
    img.set_header(&h);
    assert_eq!(
        check(&img.storage, RepairMode::None, &[]).unwrap().leaks,
        3,
        "journal not valid: not counted"
    );
    h.autoclear_features |= AUTOCLEAR_JOURNAL_VALID_MASK;
    img.set_header(&h);
    assert!(check(&img.storage, RepairMode::None, &[])
        .unwrap()
        .is_clean());
}

#[test]
fn refcount_too_high_is_a_leak_plus_a_copied_error() {
    let img = Built::new(4);
    img.set_refcount(5, 2);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 1), "{r:?}");
    assert!(r
        .messages
        .contains(&"Leaked cluster 5 refcount=2 reference=1".to_string()));
    assert!(r.messages.contains(&format!(
        "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount=2",
        DATA | L2_COPIED
    )));

    let r = check(&img.storage, RepairMode::Leaks, &[]).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.leaks_fixed, 1);
    assert_eq!(img.refcount(5), 1);
    assert_eq!(
        img.l2_entry(0),
        DATA | L2_COPIED,
        "flag was right once the refcount was"
    );
}

#[test]
fn cleared_copied_flag_is_fixed_by_leak_repair_when_refcounts_are_right() {
    let img = Built::new(4);
    img.set_l2_entry(1, DATA + CLUSTER);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!((r.corruptions, r.leaks), (1, 0));
    assert_eq!(
        r.messages,
        vec![format!(
            "ERROR OFLAG_COPIED data cluster: l2_entry={:x} refcount=1",
            DATA + CLUSTER
        )]
    );
    let r = check(&img.storage, RepairMode::Leaks, &[]).unwrap();
    assert_eq!((r.corruptions, r.corruptions_fixed), (0, 1), "{r:?}");
    assert_eq!(img.l2_entry(1), (DATA + CLUSTER) | L2_COPIED);
}

#[test]
fn zero_refcount_under_a_reference_needs_a_rebuild() {
    let img = Built::new(4);
    img.set_refcount(6, 0);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!(
        (r.corruptions, r.leaks),
        (2, 0),
        "refcount and COPIED: {r:?}"
    );
    assert!(r
        .messages
        .contains(&"ERROR cluster 6 refcount=0 reference=1".to_string()));

    let before = img.storage.to_bytes();
    let r = check(&img.storage, RepairMode::Leaks, &[]).unwrap();
    assert_eq!(r.exit_code(), 1, "{r:?}");
    assert!(r
        .messages
        .contains(&"ERROR need to rebuild refcount structures".to_string()));
    assert_eq!(
        img.storage.to_bytes(),
        before,
        "a failed leak repair changes nothing"
    );

    let r = check(&img.storage, RepairMode::All, &[]).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert!(r.corruptions_fixed >= 1);
    let h = img.header();
    assert_ne!(h.refcount_table_offset, REFTABLE, "a new table was written");
    assert!(check(&img.storage, RepairMode::None, &[])
        .unwrap()
        .is_clean());
}

#[test]
fn rebuild_works_for_every_refcount_width() {
    for order in 0..=6 {
        let img = Built::new(order);
        img.set_refcount(2, 0); // the refcount block's own entry
        img.set_refcount(5, 0);
        let r = check(&img.storage, RepairMode::All, &[]).unwrap();
        assert!(r.is_clean(), "order {order}: {r:?}");
        let again = check(&img.storage, RepairMode::None, &[]).unwrap();
        assert!(again.is_clean(), "order {order}: {again:?}");
        assert_eq!(again.allocated_clusters, 2);
    }
}

#[test]
fn reserved_l2_bits_are_corruptions_that_repair_leaves() {
    // (Misaligned offsets need clusters above 512 bytes: check_qemu.rs.)
    let img = Built::new(4);
    img.set_l2_entry(0, DATA | L2_COPIED | 1 << 56);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!(r.corruptions, 1);
    assert_eq!(
        r.messages,
        vec![format!(
            "ERROR found l2 entry with reserved bits set: {:x}",
            DATA | L2_COPIED | 1 << 56
        )]
    );
    let r = check(&img.storage, RepairMode::All, &[]).unwrap();
    assert_eq!(r.corruptions, 1, "reserved bits are not repaired");
}

#[test]
fn entry_past_the_end_of_the_file_is_not_counted() {
    let img = Built::new(4);
    img.set_l2_entry(1, (100 * CLUSTER) | L2_COPIED);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert!(r.messages.contains(&format!(
        "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset {:#x} size {:#x}",
        100 * CLUSTER,
        CLUSTER
    )));
    // The old data cluster lost its reference: a leak. The entry's COPIED
    // flag cannot be checked against a refcount past the table: refcount 0.
    assert_eq!(r.leaks, 1);
    assert!(r.corruptions >= 1);
}

#[test]
fn shared_clusters_overflow_one_bit_refcounts() {
    let img = Built::new(0);
    // A second L2 entry maps the same data cluster: two references.
    img.set_l2_entry(1, DATA);
    let r = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert!(
        r.messages
            .contains(&format!("ERROR: overflow cluster offset={DATA:#x}")),
        "{r:?}"
    );
}

#[test]
fn repair_clears_the_dirty_bit_and_refuses_a_dirty_journal() {
    let img = Built::new(4);
    let mut h = img.header();
    h.incompatible_features |= INCOMPAT_DIRTY_MASK;
    img.set_header(&h);
    assert!(check(&img.storage, RepairMode::None, &[])
        .unwrap()
        .is_clean());
    assert!(img.header().is_dirty(), "read-only check keeps the bit");
    check(&img.storage, RepairMode::Leaks, &[]).unwrap();
    assert!(!img.header().is_dirty());

    // The journal dirty bit without a journal: its committed transactions
    // cannot be found. A corruption, with what to do; a repair is refused
    // until the salvage has dropped the bit.
    let mut h = img.header();
    h.incompatible_features |= INCOMPAT_JOURNAL_DIRTY_MASK;
    img.set_header(&h);
    let err = check(&img.storage, RepairMode::All, &[]).unwrap_err();
    assert!(matches!(err, CheckError::JournalUnreplayable(_)), "{err}");
    assert!(err.to_string().contains("qj check -r all"), "{err}");
    let report = check(&img.storage, RepairMode::None, &[]).unwrap();
    assert_eq!(report.corruptions, 1, "{report:?}");
    assert!(
        report.messages[0].contains("no qjournal extension"),
        "{report:?}"
    );
    let salvaged = crate::check::salvage_journal(&img.storage)
        .unwrap()
        .expect("salvaged");
    assert!(
        salvaged.iter().any(|l| l.contains("transactions are lost")),
        "{salvaged:?}"
    );
    assert!(!img.header().has_incompatible(60));
    assert!(check(&img.storage, RepairMode::All, &[])
        .unwrap()
        .is_clean());
}

#[test]
fn undecodable_header_is_an_error_not_a_panic() {
    let img = Built::new(4);
    img.storage.write_at(&[0u8; 4], 0).unwrap();
    assert!(matches!(
        check(&img.storage, RepairMode::None, &[]),
        Err(CheckError::Format(_))
    ));
    assert!(matches!(
        check(&MemStorage::new(), RepairMode::None, &[]),
        Err(CheckError::Format(_))
    ));
}

/// A device that cannot grow past 1 MiB, as a full disk.
#[derive(Debug)]
struct CannotGrow(MemStorage);

impl CannotGrow {
    const BYTES_MAX: u64 = 1 << 20;

    fn refuse_past(end: u64) -> std::io::Result<()> {
        if end > Self::BYTES_MAX {
            return Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "device full",
            ));
        }
        Ok(())
    }
}

impl Storage for CannotGrow {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        Self::refuse_past(offset + buf.len() as u64)?;
        self.0.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.0.flush()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        Self::refuse_past(len)?;
        self.0.set_len(len)
    }
}

/// Found by the whole-image fuzz target (a timeout): a refcount table
/// entry pointing 4 GiB past the end of the file, on a device that cannot
/// grow that far. The failed resize used to widen the check to the
/// unreachable block anyway: 8 million clusters compared, among them
/// clusters past the end of the file whose refcounts QEMU never looks at
/// (here a stray refcount for cluster 512, in a block inside the file,
/// reported and "repaired" as a leak). As in QEMU, only a file that did
/// grow widens the check.
#[test]
fn failed_resize_for_a_refcount_block_past_the_device_does_not_widen_the_check() {
    let img = Built::new(4);
    let unreachable = 4u64 << 30;
    img.storage
        .write_at(&unreachable.to_be_bytes(), REFTABLE + 8)
        .unwrap();
    // Refcount block 2 (clusters 512..767) lives in cluster 7, inside the
    // file, and claims cluster 512, far past the end of the file.
    let block2 = 7 * CLUSTER;
    img.storage
        .write_at(&block2.to_be_bytes(), REFTABLE + 16)
        .unwrap();
    let mut block = vec![0u8; CLUSTER as usize];
    set_refcount(&mut block, 0, 4, 1);
    img.storage.write_at(&block, block2).unwrap();
    img.set_refcount(7, 1);
    let device = CannotGrow(MemStorage::from_bytes(img.storage.to_bytes()));

    let r = check(&device, RepairMode::All, &[]).unwrap();
    assert!(
        r.messages
            .contains(&"Repairing refcount block 1 is outside image".to_string()),
        "{:?}",
        r.messages
    );
    assert!(
        !r.messages.iter().any(|m| m.contains("cluster 512")),
        "a refcount past the end of the file was compared: {:?}",
        r.messages
    );
    let again = check(&device, RepairMode::None, &[]).unwrap();
    assert!(again.is_clean(), "{again:?}");
}
