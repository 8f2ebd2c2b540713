//! Persistent dirty bitmaps: kept by qj on both backends, seen exactly by
//! QEMU's own tools, exact after a crash on the journal and `in_use` after
//! one on flush ordering, and bad bitmap metadata refused by field.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{assert_check_clean, in_dir, info_json, path_str, qemu_img, qemu_io, temp_dir};
use qj_engine::check::{check, RepairMode};
use qj_engine::{CreateOptions, Image, JournalConfig, MemStorage, OpenOptions, Storage};
use qj_spec::qcow2::features::AUTOCLEAR_BITMAPS_BIT;

const MIB: u64 = 1 << 20;

fn create_opts(journal: bool) -> CreateOptions {
    CreateOptions {
        virtual_size: 64 * MIB,
        journal: journal.then(|| JournalConfig {
            size_bytes: 4 * MIB,
            ..JournalConfig::default()
        }),
        ..CreateOptions::default()
    }
}

/// A qemu-nbd exporting an image read-only with one bitmap; killed on drop.
struct Nbd(Child);

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The guest ranges QEMU reports dirty in bitmap `name` of `image`, through
/// `qemu-nbd -B NAME` and `qemu-img map` with `x-dirty-bitmap` (where a
/// dirty extent shows as `"data": false`).
fn qemu_dirty_ranges(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let sock = image.with_extension("sock");
    let _ = std::fs::remove_file(&sock);
    let child = Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k", path_str(&sock)])
        .arg(image)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the bitmap interop tests need qemu-nbd on PATH");
    let _nbd = Nbd(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        path_str(&sock)
    );
    let out = qemu_img(&["map", "--output=json", "--image-opts", &opts]);
    let extents: serde_json::Value = serde_json::from_str(&out).expect("map prints JSON");
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for e in extents.as_array().expect("a list of extents") {
        if e["data"] == serde_json::Value::Bool(false) {
            let start = e["start"].as_u64().unwrap();
            let len = e["length"].as_u64().unwrap();
            match ranges.last_mut() {
                Some((s, l)) if *s + *l == start => *l += len,
                _ => ranges.push((start, len)),
            }
        }
    }
    ranges
}

/// The bitmaps `qemu-img info` lists: (name, granularity, flags).
fn qemu_bitmaps(image: &Path) -> Vec<(String, u64, Vec<String>)> {
    let info = info_json(image);
    let Some(list) = info["format-specific"]["data"]["bitmaps"].as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

fn open_rw(path: &Path) -> Image {
    Image::open_path(path, &OpenOptions::read_write()).unwrap()
}

fn qj_ranges(path: &Path, name: &str) -> Vec<(u64, u64)> {
    let image = Image::open_path(path, &OpenOptions::read_only()).unwrap();
    image.bitmap_dirty_ranges(name).unwrap()
}

/// 64 KiB granules touched by the writes below.
fn granules(list: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let g = 65536;
    let mut marks = std::collections::BTreeSet::new();
    for &(off, len) in list {
        for i in off / g..(off + len).div_ceil(g) {
            marks.insert(i);
        }
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    for i in marks {
        match out.last_mut() {
            Some((s, l)) if *s + *l == i * g => *l += g,
            _ => out.push((i * g, g)),
        }
    }
    out
}

#[test]
fn qj_writes_keep_a_qemu_made_bitmap_exact_on_both_backends() {
    for journal in [false, true] {
        let dir = temp_dir();
        let path = in_dir(&dir, "img.qcow2");
        Image::create_path(&path, &create_opts(false)).unwrap();
        qemu_img(&["bitmap", "--add", path_str(&path), "b0"]);
        qemu_io(&path, false, &["write -P 1 1M 4k".into()]);
        if journal {
            let storage = Arc::new(qj_engine::FileStorage::open(&path, true).unwrap());
            Image::enable_journal(storage, &create_opts(true).journal.unwrap()).unwrap();
        }
        let image = open_rw(&path);
        // Allocating writes, an overwrite, zeroes, and a discard.
        image.write(&vec![2u8; 70 << 10], 10 * MIB + 512).unwrap();
        image.write(&[3u8; 512], MIB + 8192).unwrap();
        image.write_zeroes(20 * MIB, 128 << 10).unwrap();
        image.discard(30 * MIB, 64 << 10).unwrap();
        image.flush().unwrap();
        image.close().unwrap();
        assert_eq!(qj_ranges(&path, "b0").len(), 4, "journal={journal}");
        if journal {
            // QEMU counts the journal's clusters as leaks: hand it the
            // image without one (the bitmaps stay).
            let storage = Arc::new(qj_engine::FileStorage::open(&path, true).unwrap());
            Image::disable_journal(storage).unwrap();
        }
        let expected = granules(&[
            (MIB, 4096),
            (10 * MIB + 512, 70 << 10),
            (20 * MIB, 128 << 10),
            (30 * MIB, 64 << 10),
        ]);
        assert_check_clean(&path);
        let header =
            Image::read_header(&qj_engine::FileStorage::open(&path, false).unwrap()).unwrap();
        assert!(
            header.has_autoclear(AUTOCLEAR_BITMAPS_BIT),
            "journal={journal}"
        );
        assert_eq!(qj_ranges(&path, "b0"), expected, "journal={journal}");
        assert_eq!(
            qemu_dirty_ranges(&path, "b0"),
            expected,
            "journal={journal}"
        );
        assert_eq!(
            qemu_bitmaps(&path),
            vec![("b0".to_string(), 65536, vec!["auto".to_string()])]
        );
        // QEMU writes after us and keeps the bitmap going; we read it back.
        qemu_io(&path, false, &["write -P 4 40M 4k".into()]);
        assert_check_clean(&path);
        let mut more = expected.clone();
        more.push((40 * MIB, 65536));
        assert_eq!(qj_ranges(&path, "b0"), more, "journal={journal}");
    }
}

#[test]
fn qj_bitmap_operations_are_seen_by_qemu() {
    let dir = temp_dir();
    let path = in_dir(&dir, "img.qcow2");
    Image::create_path(&path, &create_opts(false)).unwrap();
    let image = open_rw(&path);
    image.bitmap_add("on", 65536, false).unwrap();
    image.bitmap_add("off", 1 << 20, true).unwrap();
    image.write(&[1u8; 4096], 5 * MIB).unwrap();
    image.close().unwrap();
    assert_check_clean(&path);
    assert_eq!(
        qemu_bitmaps(&path),
        vec![
            ("on".to_string(), 65536, vec!["auto".to_string()]),
            ("off".to_string(), 1 << 20, vec![]),
        ]
    );
    assert_eq!(qemu_dirty_ranges(&path, "on"), vec![(5 * MIB, 65536)]);
    assert_eq!(qemu_dirty_ranges(&path, "off"), vec![]);

    let image = open_rw(&path);
    image.bitmap_merge("on", "off").unwrap();
    image.bitmap_set_enabled("off", true).unwrap();
    image.bitmap_clear("on").unwrap();
    image.write(&[1u8; 4096], 9 * MIB).unwrap();
    image.close().unwrap();
    assert_check_clean(&path);
    assert_eq!(qemu_dirty_ranges(&path, "on"), vec![(9 * MIB, 65536)]);
    // The merge set the coarse granule around 5 MiB; once enabled, the
    // write at 9 MiB marked its granule too.
    assert_eq!(
        qemu_dirty_ranges(&path, "off"),
        vec![(5 * MIB, MIB), (9 * MIB, MIB)]
    );

    let image = open_rw(&path);
    image.bitmap_remove("on").unwrap();
    image.bitmap_remove("off").unwrap();
    image.close().unwrap();
    assert_check_clean(&path);
    assert!(qemu_bitmaps(&path).is_empty());
    let header = Image::read_header(&qj_engine::FileStorage::open(&path, false).unwrap()).unwrap();
    assert!(header.bitmaps().is_none());
}

/// A fresh image with one enabled bitmap on an in-memory device.
fn memory_image_with_bitmap(journal: bool) -> Arc<dyn Storage> {
    let storage: Arc<dyn Storage> = Arc::new(MemStorage::new());
    let opts = CreateOptions {
        cluster_size: 4096,
        ..create_opts(journal)
    };
    Image::create_shared(storage.clone(), &opts).unwrap();
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    // Data from before the bitmap: overwriting it sets new bits without
    // changing an L2 entry.
    image.write(&[9u8; 4096], 0).unwrap();
    image.bitmap_add("b", 4096, false).unwrap();
    image.close().unwrap();
    storage
}

#[test]
fn on_the_journal_a_crash_leaves_the_bitmap_exact() {
    let storage = memory_image_with_bitmap(true);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    // Allocating writes, then overwrites of clusters allocated before the
    // last clean close (no L2 change carries those bits).
    image.write(&[1u8; 8192], 3 * MIB).unwrap();
    image.flush().unwrap();
    image.write(&[2u8; 4096], 0).unwrap();
    image.write(&[3u8; 4096], 5 * MIB).unwrap();
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
    let info = image.bitmaps();
    assert_eq!(info[0].flags, vec!["auto".to_string()], "never in use");
    let ranges = image.bitmap_dirty_ranges("b").unwrap();
    // Whatever the crash kept of the unflushed writes is covered: the
    // overwrite at 0 committed its bit before its data.
    let mut buf = vec![0u8; 4096];
    image.read(&mut buf, 0).unwrap();
    // The in-memory device keeps every completed write: the overwrite is
    // on the recovered disk, so its bit must be too.
    assert!(buf.iter().all(|&b| b == 2), "the overwrite survived");
    let covered = |off: u64| ranges.iter().any(|&(s, l)| s <= off && off < s + l);
    assert!(covered(0), "overwrite at 0 not in the bitmap: {ranges:?}");
    assert!(covered(3 * MIB) && covered(3 * MIB + 4096), "{ranges:?}");
    image.read(&mut buf, 5 * MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0) || covered(5 * MIB));
}

#[test]
fn on_flush_ordering_a_crash_leaves_the_bitmap_in_use() {
    let storage = memory_image_with_bitmap(false);
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    image.write(&[1u8; 4096], 3 * MIB).unwrap();
    image.flush().unwrap();
    image.abandon();
    let image = Image::open(storage.clone(), &OpenOptions::read_only()).unwrap();
    let info = image.bitmaps();
    assert_eq!(info.len(), 1);
    assert!(info[0].flags.contains(&"in-use".to_string()), "{info:?}");
    assert_eq!(info[0].dirty_bytes, None);
    assert!(image.bitmap_problem().unwrap().contains("in use"));
    drop(image);
    // A writable open leaves the stale bitmap alone and clears autoclear
    // bit 0, so QEMU knows.
    let image = Image::open(storage.clone(), &OpenOptions::read_write()).unwrap();
    image.close().unwrap();
    let header = Image::read_header(&*storage).unwrap();
    assert!(!header.has_autoclear(AUTOCLEAR_BITMAPS_BIT));
}

/// Directory bytes of the first bitmap of a qemu-made image.
fn directory_offset(path: &Path) -> u64 {
    let header = Image::read_header(&qj_engine::FileStorage::open(path, false).unwrap()).unwrap();
    header.bitmaps().unwrap().bitmap_directory_offset
}

#[test]
fn bad_bitmap_metadata_is_refused_by_field_and_nothing_is_written() {
    // (what to damage: byte offset in the directory entry, bytes) -> field named.
    let cases: &[(&str, u64, &[u8], &str)] = &[
        ("unknown type", 16, &[7], "type"),
        ("granularity too fine", 17, &[8], "granularity_bits"),
        ("granularity too coarse", 17, &[40], "granularity_bits"),
        ("unknown flag", 12, &[0, 0, 0x10, 2], "flags"),
        ("misaligned table", 6, &[0x12], "bitmap_table_offset"),
        (
            "table past the end",
            0,
            &[0, 0, 0, 1],
            "bitmap_table_offset",
        ),
        ("empty table", 8, &[0, 0, 0, 0], "bitmap_table_size"),
    ];
    for &(what, at, bytes, field) in cases {
        let dir = temp_dir();
        let path = in_dir(&dir, "img.qcow2");
        qemu_img(&["create", "-f", "qcow2", path_str(&path), "64M"]);
        qemu_img(&["bitmap", "--add", path_str(&path), "b0"]);
        let dir_at = directory_offset(&path);
        let mut file = std::fs::read(&path).unwrap();
        file[(dir_at + at) as usize..(dir_at + at) as usize + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&path, &file).unwrap();
        let err = Image::open_path(&path, &OpenOptions::read_write())
            .expect_err(what)
            .to_string();
        assert!(err.contains(field), "{what}: {err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            file,
            "{what}: nothing written"
        );
        let image = Image::open_path(&path, &OpenOptions::read_only()).unwrap();
        let problem = image.info().unwrap().bitmaps_problem.expect(what);
        assert!(problem.contains(field), "{what}: {problem}");
        drop(image);
        // `check` reports it too, naming the field where the directory
        // itself is broken.
        let storage = qj_engine::FileStorage::open(&path, false).unwrap();
        let report = check(&storage, RepairMode::None, &[]).unwrap();
        assert!(!report.is_clean(), "{what}: {report:?}");
        let broken: Vec<&String> = report
            .messages
            .iter()
            .filter(|m| m.contains("bitmap directory is broken"))
            .collect();
        assert!(
            broken.iter().all(|m| m.contains(field)),
            "{what}: {broken:?}"
        );
    }
}

#[test]
fn bad_bitmaps_extension_and_table_entries_are_refused() {
    let dir = temp_dir();
    let path = in_dir(&dir, "img.qcow2");
    qemu_img(&["create", "-f", "qcow2", path_str(&path), "64M"]);
    qemu_img(&["bitmap", "--add", path_str(&path), "b0"]);
    qemu_io(&path, false, &["write 0 4k".into()]);
    let dir_at = directory_offset(&path);
    let original = std::fs::read(&path).unwrap();
    let table_at = u64::from_be_bytes(
        original[dir_at as usize..dir_at as usize + 8]
            .try_into()
            .unwrap(),
    );
    // A table entry pointing at the L1 table (metadata), then one with reserved bits.
    let l1 = u64::from_be_bytes(original[40..48].try_into().unwrap());
    for (entry, field) in [(l1, "entry"), (1u64 << 60, "entry")] {
        let mut file = original.clone();
        file[table_at as usize..table_at as usize + 8].copy_from_slice(&entry.to_be_bytes());
        std::fs::write(&path, &file).unwrap();
        let err = Image::open_path(&path, &OpenOptions::read_write())
            .expect_err("bad table entry")
            .to_string();
        assert!(err.contains(field), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), file);
    }
}
