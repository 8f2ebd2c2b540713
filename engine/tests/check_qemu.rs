//! `check` against `qemu-img check` (QEMU 10) on images made by qemu-img and
//! damaged by patching bytes: the counts must agree, and after our repair
//! qemu-img must agree with what we report. These tests need qemu-img and
//! qemu-io on PATH and fail (not skip) without them.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qj_engine::check::{check, CheckReport, RepairMode};
use qj_engine::FileStorage;
use qj_spec::qcow2::features::AUTOCLEAR_JOURNAL_VALID_MASK;
use qj_spec::qcow2::{decode_snapshot_table, encode_snapshot_table, JournalExtension};
use qj_spec::qcow2::{get_refcount, set_refcount, Header, L1Entry, L2_COPIED, L2_OFFSET_MASK};
use qj_spec::units::HostOffset;
use serde_json::Value;

mod common;

use common::{qemu_img, run};

fn qemu_io(path: &Path, command: &str) {
    common::qemu_io(path, false, &[command.to_string()]);
}

/// qemu-img check's verdict: exit status and (when printed) its JSON.
#[derive(Debug)]
struct QemuCheck {
    exit: i32,
    json: Option<Value>,
    stderr: String,
}

impl QemuCheck {
    fn count(&self, key: &str) -> u64 {
        // qemu-img omits zero counts (except check-errors).
        self.json
            .as_ref()
            .and_then(|j| j.get(key))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
}

fn qemu_check(path: &Path, repair: Option<&str>) -> QemuCheck {
    let mut args = vec!["check", "-f", "qcow2", "--output=json"];
    if let Some(r) = repair {
        args.extend(["-r", r]);
    }
    args.push(path.to_str().unwrap());
    let out = run("qemu-img", &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    QemuCheck {
        exit: out.status.code().expect("qemu-img exited"),
        json: serde_json::from_str(&stdout).ok(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn ours(path: &Path, mode: RepairMode) -> CheckReport {
    let storage = FileStorage::open(path, mode != RepairMode::None).unwrap();
    check(&storage, mode, &[]).unwrap()
}

/// Our read-only check and qemu-img's give the same numbers.
fn assert_same_verdict(path: &Path) -> CheckReport {
    let q = qemu_check(path, None);
    let r = ours(path, RepairMode::None);
    let context = format!("ours: {r:#?}\nqemu-img: {q:#?}");
    assert_eq!(r.exit_code(), q.exit, "exit code\n{context}");
    assert_eq!(
        r.corruptions,
        q.count("corruptions"),
        "corruptions\n{context}"
    );
    assert_eq!(r.leaks, q.count("leaks"), "leaks\n{context}");
    assert_eq!(
        r.check_errors,
        q.count("check-errors"),
        "check errors\n{context}"
    );
    if q.json.is_some() {
        assert_eq!(
            r.image_end_offset,
            q.count("image-end-offset"),
            "image end\n{context}"
        );
        assert_eq!(
            r.total_clusters,
            q.count("total-clusters"),
            "total clusters\n{context}"
        );
        assert_eq!(
            r.allocated_clusters,
            q.count("allocated-clusters"),
            "allocated\n{context}"
        );
        assert_eq!(
            r.fragmented_clusters,
            q.count("fragmented-clusters"),
            "fragmented\n{context}"
        );
    }
    // Every problem line we print, qemu-img printed too, word for word.
    let qemu_lines: Vec<&str> = q.stderr.lines().collect();
    for line in &r.messages {
        assert!(
            qemu_lines.contains(&line.as_str()),
            "{line:?} not printed by qemu-img\n{context}"
        );
    }
    r
}

/// Repairs a copy with qemu-img and the original with us. Where QEMU's
/// repair completes, ours reaches the same verdict with the same counts;
/// where it fails (exit 1) ours may do better. Either way qemu-img's own
/// read-only check of our result must agree with what we report.
fn assert_repair_agrees(path: &Path, mode: RepairMode) -> CheckReport {
    let flag = match mode {
        RepairMode::Leaks => "leaks",
        RepairMode::All => "all",
        RepairMode::None => unreachable!("not a repair"),
    };
    let copy = path.with_extension("qemu-repaired");
    std::fs::copy(path, &copy).unwrap();
    let q = qemu_check(&copy, Some(flag));
    let r = ours(path, mode);
    let context = format!("ours: {r:#?}\nqemu-img -r {flag}: {q:#?}");
    if q.exit != 1 {
        assert_eq!(r.exit_code(), q.exit, "exit code after repair\n{context}");
        assert_eq!(
            r.corruptions,
            q.count("corruptions"),
            "corruptions left\n{context}"
        );
        assert_eq!(r.leaks, q.count("leaks"), "leaks left\n{context}");
        assert_eq!(
            r.leaks_fixed,
            q.count("leaks-fixed"),
            "leaks fixed\n{context}"
        );
        assert_eq!(
            r.corruptions_fixed,
            q.count("corruptions-fixed"),
            "corruptions fixed\n{context}"
        );
    }
    if r.exit_code() == 1 {
        // Our repair gave up: the image must still check as before.
        assert_same_verdict(path);
    } else {
        let after = qemu_check(path, None);
        let context = format!("ours: {r:#?}\nqemu-img on our repaired image: {after:#?}");
        assert_eq!(after.exit, r.exit_code(), "{context}");
        assert_eq!(after.count("corruptions"), r.corruptions, "{context}");
        assert_eq!(after.count("leaks"), r.leaks, "{context}");
    }
    r
}

/// An image and helpers to read and patch its metadata.
struct Img {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Img {
    fn create(opts: &str, size: &str) -> Img {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([path.to_str().unwrap(), size]);
        qemu_img(&args);
        Img { _dir: dir, path }
    }

    /// 64 MiB, 64 KiB clusters, three data clusters written at guest 0.
    fn with_data() -> Img {
        let img = Img::create("", "64M");
        qemu_io(&img.path, "write -P 0x11 0 192k");
        img
    }

    fn file(&self) -> std::fs::File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .unwrap()
    }

    fn read(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let n = self.file().read_at(&mut buf, offset).unwrap();
        buf.truncate(n);
        buf.resize(len, 0);
        buf
    }

    fn u64_at(&self, offset: u64) -> u64 {
        u64::from_be_bytes(self.read(offset, 8).try_into().unwrap())
    }

    fn set_u64(&self, offset: u64, value: u64) {
        self.file()
            .write_all_at(&value.to_be_bytes(), offset)
            .unwrap();
    }

    fn header(&self) -> Header {
        Header::decode(&self.read(0, 1 << 21)).unwrap()
    }

    fn cluster_size(&self) -> u64 {
        self.header().geometry().cluster_size()
    }

    /// Offset of the L2 table of guest L1 index 0.
    fn l2(&self) -> u64 {
        self.u64_at(self.header().l1_table_offset) & L1Entry::OFFSET_MASK
    }

    fn l2_entry_offset(&self, index: u64) -> u64 {
        self.l2() + 8 * index
    }

    fn data_cluster(&self, index: u64) -> u64 {
        self.u64_at(self.l2_entry_offset(index)) & L2_OFFSET_MASK
    }

    /// (refcount block offset, index in it, order) of host cluster `cluster`.
    fn refcount_slot(&self, cluster: u64) -> (u64, u64, u32) {
        let h = self.header();
        let g = h.geometry();
        let table_index = cluster / g.refcounts_per_block();
        let block = self.u64_at(h.refcount_table_offset + 8 * table_index);
        assert_ne!(block, 0, "cluster {cluster} has a refcount block");
        (block, cluster % g.refcounts_per_block(), g.refcount_order)
    }

    fn refcount(&self, cluster: u64) -> u64 {
        let (block, index, order) = self.refcount_slot(cluster);
        get_refcount(
            &self.read(block, self.cluster_size() as usize),
            index,
            order,
        )
    }

    fn set_refcount(&self, cluster: u64, value: u64) {
        let (block, index, order) = self.refcount_slot(cluster);
        let mut bytes = self.read(block, self.cluster_size() as usize);
        set_refcount(&mut bytes, index, order, value);
        self.file().write_all_at(&bytes, block).unwrap();
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
}

#[test]
fn clean_images_of_many_shapes_agree() {
    let shapes: &[(&str, &str)] = &[
        ("", "64M"),
        ("compat=0.10", "64M"),
        ("cluster_size=4096,refcount_bits=1", "16M"),
        ("cluster_size=4096,refcount_bits=2", "16M"),
        ("cluster_size=4096,refcount_bits=8", "16M"),
        ("cluster_size=512,refcount_bits=64", "4M"),
        ("cluster_size=2M", "1G"),
    ];
    for (opts, size) in shapes {
        let img = Img::create(opts, size);
        qemu_io(&img.path, "write -P 0x22 0 100k");
        qemu_io(&img.path, "write -P 0x33 1M 8k");
        let r = assert_same_verdict(&img.path);
        assert!(r.is_clean(), "{opts}: {r:#?}");
        assert!(r.allocated_clusters > 0, "{opts}");
    }
}

#[test]
fn compressed_clusters_are_counted_by_their_sectors() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("raw.img");
    let bytes: Vec<u8> = (0..4 * 65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 29) as u8 % 3)
        .collect();
    std::fs::write(&raw, bytes).unwrap();
    let path = dir.path().join("c.qcow2");
    qemu_img(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let r = assert_same_verdict(&path);
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(
        r.fragmented_clusters, r.allocated_clusters,
        "compressed clusters always count as fragmented"
    );
}

#[test]
fn bumped_refcount_is_a_leak_plus_copied_error_and_leak_repair_fixes_both() {
    let img = Img::with_data();
    let cs = img.cluster_size();
    let data = img.data_cluster(1) / cs;
    img.set_refcount(data, 2);
    let r = assert_same_verdict(&img.path);
    assert_eq!((r.leaks, r.corruptions), (1, 1));
    assert!(
        r.messages
            .contains(&format!("Leaked cluster {data} refcount=2 reference=1")),
        "{:?}",
        r.messages
    );
    let r = assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(img.refcount(data), 1);
}

#[test]
fn refcount_on_an_unused_cluster_is_a_leak() {
    let img = Img::with_data();
    let cs = img.cluster_size();
    let end = img.len().next_multiple_of(cs);
    img.file().set_len(end + cs).unwrap();
    img.set_refcount(end / cs, 1);
    let r = assert_same_verdict(&img.path);
    assert_eq!((r.leaks, r.corruptions, r.exit_code()), (1, 0, 3));
    let r = assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert_eq!(r.leaks_fixed, 1);
}

#[test]
fn zero_refcount_under_a_live_l2_entry_needs_all() {
    let img = Img::with_data();
    let cs = img.cluster_size();
    let data = img.data_cluster(2) / cs;
    img.set_refcount(data, 0);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .contains(&format!("ERROR cluster {data} refcount=0 reference=1")),
        "{:?}",
        r.messages
    );

    let before = std::fs::read(&img.path).unwrap();
    let r = assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert_eq!(
        r.exit_code(),
        1,
        "-r leaks cannot fix a refcount that is too low"
    );
    assert_eq!(
        std::fs::read(&img.path).unwrap(),
        before,
        "and changes nothing"
    );

    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
    qemu_io(&img.path, "read -P 0x11 0 192k");
}

#[test]
fn lowered_but_nonzero_refcount_is_fixed_in_place_by_all() {
    let img = Img::create("", "64M");
    qemu_io(&img.path, "write -P 0x11 0 128k");
    qemu_img(&["snapshot", "-c", "s1", img.path.to_str().unwrap()]);
    let cs = img.cluster_size();
    let data = img.data_cluster(0) / cs;
    assert_eq!(img.refcount(data), 2, "shared with the snapshot");
    img.set_refcount(data, 1);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .contains(&format!("ERROR cluster {data} refcount=1 reference=2")),
        "{:?}",
        r.messages
    );
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(img.refcount(data), 2);
}

#[test]
fn misaligned_l2_entry_is_a_corruption_repair_cannot_fix() {
    let img = Img::with_data();
    let at = img.l2_entry_offset(1);
    img.set_u64(at, img.u64_at(at) + 0x200);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.ends_with(": Data cluster is not properly aligned; L2 entry corrupted.")),
        "{:?}",
        r.messages
    );
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert_eq!(r.exit_code(), 2);
}

#[test]
fn misaligned_preallocated_zero_entry_is_zeroed_by_all() {
    let img = Img::with_data();
    qemu_io(&img.path, "write -z 64k 64k");
    let at = img.l2_entry_offset(1);
    // A zero entry that keeps its (now misaligned) cluster.
    img.set_u64(at, (img.data_cluster(2) + 0x400) | 1);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("Preallocated cluster is not properly aligned")),
        "{:?}",
        r.messages
    );
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
    qemu_io(&img.path, "read -P 0 64k 64k");
}

#[test]
fn reserved_bits_in_l1_and_l2_entries() {
    let img = Img::with_data();
    let at = img.l2_entry_offset(0);
    img.set_u64(at, img.u64_at(at) | 1 << 56);
    let r = assert_same_verdict(&img.path);
    assert_eq!(r.corruptions, 1);
    assert_repair_agrees(&img.path, RepairMode::All);

    let img = Img::with_data();
    let l1 = img.header().l1_table_offset;
    img.set_u64(l1, img.u64_at(l1) | 1 << 60);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.starts_with("ERROR found L1 entry with reserved bits set")),
        "{:?}",
        r.messages
    );
}

#[test]
fn l2_entry_past_the_end_of_the_file() {
    let img = Img::with_data();
    let at = img.l2_entry_offset(2);
    img.set_u64(at, 0x1000_0000 | L2_COPIED);
    let r = assert_same_verdict(&img.path);
    assert!(r.messages.iter().any(|m| m.contains(
        "exceeding the end of the file by one cluster or more: offset 0x10000000 size 0x10000"
    )));
    assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert_repair_agrees(&img.path, RepairMode::All);
}

#[test]
fn cleared_copied_flag_is_repaired_by_leaks() {
    let img = Img::with_data();
    let at = img.l2_entry_offset(0);
    img.set_u64(at, img.u64_at(at) & !L2_COPIED);
    let r = assert_same_verdict(&img.path);
    assert_eq!((r.corruptions, r.leaks), (1, 0));
    let r = assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert!(r.is_clean(), "{r:#?}");
    assert_ne!(img.u64_at(at) & L2_COPIED, 0);
}

#[test]
fn misaligned_l1_entry() {
    let img = Img::with_data();
    let l1 = img.header().l1_table_offset;
    img.set_u64(l1, img.u64_at(l1) + 0x200);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.ends_with("Table is not cluster aligned; L1 entry corrupted")),
        "{:?}",
        r.messages
    );
}

#[test]
fn internal_snapshots_are_counted_and_a_damaged_snapshot_image_agrees() {
    let img = Img::with_data();
    let p = img.path.to_str().unwrap().to_owned();
    qemu_img(&["snapshot", "-c", "one", &p]);
    qemu_io(&img.path, "write -P 0x44 64k 64k");
    qemu_img(&["snapshot", "-c", "two", &p]);
    qemu_io(&img.path, "write -P 0x55 1M 64k");
    let r = assert_same_verdict(&img.path);
    assert!(r.is_clean(), "{r:#?}");

    // Leak a cluster shared by both snapshots and the active image.
    let cs = img.cluster_size();
    let shared = img.data_cluster(0) / cs;
    let refcount = img.refcount(shared);
    assert_eq!(refcount, 3);
    img.set_refcount(shared, 5);
    let r = assert_same_verdict(&img.path);
    assert_eq!(r.leaks, 1);
    assert_repair_agrees(&img.path, RepairMode::Leaks);
    // And one that is now too low.
    img.set_refcount(shared, 2);
    assert_same_verdict(&img.path);
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
}

#[test]
fn one_bit_refcounts_overflow_with_a_snapshot() {
    let img = Img::create("cluster_size=4096,refcount_bits=1", "16M");
    qemu_io(&img.path, "write -P 0x11 0 8k");
    // qemu-img refuses to snapshot with 1-bit refcounts; share a cluster by
    // hand: guest cluster 5 maps the same host cluster as guest cluster 0.
    let entry = img.u64_at(img.l2_entry_offset(0));
    img.set_u64(img.l2_entry_offset(5), entry);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.starts_with("ERROR: overflow cluster offset=")),
        "{:?}",
        r.messages
    );
}

#[test]
fn bitmaps_are_counted_and_a_damaged_bitmap_image_agrees() {
    let img = Img::create("", "64M");
    let p = img.path.to_str().unwrap().to_owned();
    qemu_img(&["bitmap", "--add", &p, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "128k", &p, "b1"]);
    qemu_io(&img.path, "write -P 0x11 0 1M");
    let r = assert_same_verdict(&img.path);
    assert!(r.is_clean(), "{r:#?}");
    let ext = img.header().bitmaps().expect("bitmaps extension");
    assert_eq!(ext.nb_bitmaps, 2);

    let cs = img.cluster_size();
    let directory = ext.bitmap_directory_offset / cs;
    img.set_refcount(directory, 3);
    let r = assert_same_verdict(&img.path);
    assert_eq!(r.leaks, 1, "{r:#?}");
    assert_repair_agrees(&img.path, RepairMode::Leaks);
    img.set_refcount(directory, 0);
    assert_same_verdict(&img.path);
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
}

#[test]
fn dirty_bit_is_kept_by_check_and_cleared_by_repair() {
    let img = Img::with_data();
    let features = img.u64_at(72);
    img.set_u64(72, features | 1);
    assert!(assert_same_verdict(&img.path).is_clean());
    assert!(img.header().is_dirty());
    let r = assert_repair_agrees(&img.path, RepairMode::Leaks);
    assert!(r.is_clean());
    assert!(!img.header().is_dirty());
}

#[test]
fn broken_refcount_table_entry_is_rebuilt() {
    let img = Img::with_data();
    let h = img.header();
    let entry = img.u64_at(h.refcount_table_offset);
    img.set_u64(h.refcount_table_offset, entry + 0x200);
    let r = assert_same_verdict(&img.path);
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("refcount block 0 is not cluster aligned")),
        "{:?}",
        r.messages
    );
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
    qemu_io(&img.path, "read -P 0x11 0 192k");
}

#[test]
fn journal_clusters_are_ours_and_leaks_to_qemu() {
    let img = Img::with_data();
    let cs = img.cluster_size();
    let journal = img.len().next_multiple_of(cs);
    img.file().set_len(journal + 2 * cs).unwrap();
    img.set_refcount(journal / cs, 1);
    img.set_refcount(journal / cs + 1, 1);

    // Without the extension the caller can name the range.
    let storage = FileStorage::open(&img.path, false).unwrap();
    let extra = [(HostOffset(journal), 2 * cs)];
    assert!(check(&storage, RepairMode::None, &extra)
        .unwrap()
        .is_clean());
    assert_eq!(ours(&img.path, RepairMode::None).leaks, 2);

    let mut h = img.header();
    h.set_journal(Some(JournalExtension {
        offset: journal,
        size: 2 * cs,
        flags: 0,
    }));
    h.autoclear_features |= AUTOCLEAR_JOURNAL_VALID_MASK;
    img.file().write_all_at(&h.encode().unwrap(), 0).unwrap();
    assert!(ours(&img.path, RepairMode::None).is_clean());
    let q = qemu_check(&img.path, None);
    assert_eq!(
        (q.exit, q.count("leaks")),
        (3, 2),
        "qemu-img does not know the journal: {q:#?}"
    );
}

#[test]
fn incomplete_snapshot_entries_are_rewritten_by_all() {
    let img = Img::with_data();
    let p = img.path.to_str().unwrap().to_owned();
    qemu_img(&["snapshot", "-c", "one", &p]);
    qemu_img(&["snapshot", "-c", "two", &p]);
    let h = img.header();
    let table = img.read(h.snapshots_offset, img.cluster_size() as usize);
    let mut entries = decode_snapshot_table(&table, h.nb_snapshots).unwrap();
    // An entry without vm_state_size_large/disk_size, as old writers left it.
    entries[0].extra_data.clear();
    let mut shorter = encode_snapshot_table(&entries).unwrap();
    shorter.resize(table.len(), 0);
    img.file()
        .write_all_at(&shorter, h.snapshots_offset)
        .unwrap();

    let r = assert_same_verdict(&img.path);
    assert!(r
        .messages
        .contains(&"ERROR snapshot table entry 0 is incomplete".to_string()));
    let r = assert_repair_agrees(&img.path, RepairMode::All);
    assert!(r.is_clean(), "{r:#?}");
    let h = img.header();
    let back = decode_snapshot_table(&img.read(h.snapshots_offset, 4096), h.nb_snapshots).unwrap();
    assert_eq!(back.len(), 2);
    assert_eq!(
        back[0].disk_size(),
        Some(64 << 20),
        "completed with the virtual size"
    );
    assert_eq!(
        back[0].icount(),
        Some(u64::MAX),
        "unknown instruction count"
    );
    assert_eq!(
        back[1].extra_data, entries[1].extra_data,
        "complete entries keep theirs"
    );
    qemu_img(&["snapshot", "-a", "one", &p]);
    qemu_io(&img.path, "read -P 0x11 0 192k");
}
