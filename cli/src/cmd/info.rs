//! `qj info [--output human|json] FILE`: what the image is, like
//! `qemu-img info`. The header is described even when the engine refuses
//! to open the image (unsupported feature, broken layout); the reason is
//! then printed on stderr and the exit status is 1.
//!
//! The image is always opened read-only: a dirty journal is replayed in
//! memory to describe the image, and the file is left exactly as it was.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qj_engine::{BackendKind, BitmapInfo, FileStorage, Image, JournalInfo};
use qj_spec::qcow2::features::{
    AUTOCLEAR_JOURNAL_VALID_BIT, COMPAT_LAZY_REFCOUNTS_MASK, INCOMPAT_EXTL2_MASK,
    INCOMPAT_JOURNAL_DIRTY_BIT,
};
use qj_spec::qcow2::{
    Header, HeaderExtension, JournalExtension, SnapshotHeader, COMPRESSION_ZLIB, COMPRESSION_ZSTD,
};
use serde::Serialize;

use crate::chain::{backing_path, open_layer};
use crate::error::{engine, io, one_line, quoted, CliResult, EXIT_FAILED};
use crate::human::size_to_str;
use crate::output::{to_json, OutputFormat};

/// Arguments of `qj info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Open without taking or honouring image locks (read-only; what is
    /// read may be inconsistent while another process writes), like qemu-img.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// `format-specific.data` for qcow2, with QEMU's keys.
#[derive(Debug, Serialize)]
pub struct Qcow2Specific {
    /// "1.1" for v3, "0.10" for v2.
    pub compat: &'static str,
    /// "zlib" or "zstd".
    #[serde(rename = "compression-type")]
    pub compression_type: String,
    /// Compatible bit 0 (v3 only).
    #[serde(rename = "lazy-refcounts", skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Refcount width.
    #[serde(rename = "refcount-bits")]
    pub refcount_bits: u32,
    /// Incompatible bit 1 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Incompatible bit 4 (v3 only).
    #[serde(rename = "extended-l2", skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
    /// The persistent dirty bitmaps, with QEMU's keys (name, granularity,
    /// flags) and our `dirty-bytes`; absent when the image has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapJson>>,
}

/// One bitmap under `format-specific.data.bitmaps`.
#[derive(Debug, Serialize)]
pub struct BitmapJson {
    /// The bitmap's name.
    pub name: String,
    /// Guest bytes one bit covers.
    pub granularity: u64,
    /// `in-use`, `auto`, `extra-data-compatible`, as QEMU names them.
    pub flags: Vec<String>,
    /// Guest bytes covered by set bits (absent for a bitmap in use).
    #[serde(rename = "dirty-bytes", skip_serializing_if = "Option::is_none")]
    pub dirty_bytes: Option<u64>,
}

impl From<&BitmapInfo> for BitmapJson {
    fn from(b: &BitmapInfo) -> Self {
        Self {
            name: b.name.clone(),
            granularity: b.granularity,
            flags: b.flags.clone(),
            dirty_bytes: b.dirty_bytes,
        }
    }
}

/// `format-specific`: `{"type": "qcow2", "data": {...}}`.
#[derive(Debug, Serialize)]
pub struct FormatSpecific {
    /// Always "qcow2".
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The qcow2 details.
    pub data: Qcow2Specific,
}

/// Details qemu-img does not show, under our own key `qj`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct QjDetails {
    /// qcow2 version field.
    pub version: u32,
    /// Image file length in bytes.
    pub file_length: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// Header extensions by name, in file order.
    pub extensions: Vec<String>,
    /// The metadata backend the engine would use, when it can open the image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Why the engine cannot open the image, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_error: Option<String>,
    /// Why the snapshot table cannot be read, when it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_error: Option<String>,
    /// The metadata journal, when the header names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<JournalDetails>,
    /// Why the bitmaps are not maintained or cannot be read, if so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps_problem: Option<String>,
}

/// The journal under `qj.journal`: where it is from the header, its state
/// from the engine when the image could be opened.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct JournalDetails {
    /// Host offset of the region.
    pub offset: u64,
    /// Region size in bytes.
    pub size: u64,
    /// `single-flush` or `two-flush` (the draft's).
    pub commit_protocol: String,
    /// Whether read-write opens carry small writes into fresh clusters in
    /// the journal (logged data; the extension's flag).
    pub log_data: bool,
    /// Autoclear "journal valid" bit: clear when a program that does not
    /// know the journal wrote the image; the next read-write open then
    /// replaces the journal.
    pub valid: bool,
    /// Incompatible "journal dirty" bit: committed transactions may not be
    /// in place yet, and QEMU refuses the image.
    pub dirty_bit: bool,
    /// Whether the description comes from a read-only, in-memory replay of
    /// a dirty journal (the file itself still needs replaying).
    pub replayed_in_memory: bool,
    /// Ring fill in percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_percent: Option<u64>,
    /// Last committed sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub committed_seq: Option<u64>,
    /// Last synced (checkpointed) sequence number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub synced_seq: Option<u64>,
    /// Whether committed transactions wait for a checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unsynced: Option<bool>,
    /// Transactions the open replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replayed_transactions: Option<u64>,
    /// Whether whole-cluster writes are deduplicated (the extension's flag).
    pub dedup: bool,
    /// The persisted dedup index, when the header names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_index: Option<DedupIndexDetails>,
}

/// The persisted dedup index under `qj.journal.dedup-index`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DedupIndexDetails {
    /// Indexed clusters.
    pub entries: u64,
    /// Guest clusters that shared an indexed cluster beyond its first
    /// mapping when the index was written (clusters not stored twice).
    pub clusters_saved: u64,
    /// Bytes the index takes in the file (whole clusters).
    pub bytes: u64,
    /// Host offset of the index.
    pub offset: u64,
    /// Why open will ignore it, when it is damaged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// What the engine's read-only open found.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The backend it chose.
    pub backend: BackendKind,
    /// The journal's state, for the journalled backend.
    pub journal: Option<JournalInfo>,
    /// The persistent bitmaps as the engine read them.
    pub bitmaps: Vec<BitmapInfo>,
    /// Why the bitmaps cannot be maintained or read, if so.
    pub bitmaps_problem: Option<String>,
    /// The internal snapshots, or why the table could not be read.
    pub snapshots: Result<Vec<SnapshotHeader>, String>,
}

/// One internal snapshot, with `qemu-img info`'s keys.
#[derive(Debug, Serialize)]
pub struct SnapshotJson {
    /// Unique id.
    pub id: String,
    /// User-visible name.
    pub name: String,
    /// Saved VM state, bytes.
    #[serde(rename = "vm-state-size")]
    pub vm_state_size: u64,
    /// Creation time, seconds part.
    #[serde(rename = "date-sec")]
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    #[serde(rename = "date-nsec")]
    pub date_nsec: u32,
    /// Guest clock, seconds part.
    #[serde(rename = "vm-clock-sec")]
    pub vm_clock_sec: u64,
    /// Guest clock, nanoseconds part.
    #[serde(rename = "vm-clock-nsec")]
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

impl From<&SnapshotHeader> for SnapshotJson {
    fn from(sn: &SnapshotHeader) -> Self {
        Self {
            id: sn.id.clone(),
            name: sn.name.clone(),
            vm_state_size: sn
                .vm_state_size_large()
                .unwrap_or(u64::from(sn.vm_state_size)),
            date_sec: sn.date_sec,
            date_nsec: sn.date_nsec,
            vm_clock_sec: sn.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: sn.vm_clock_nsec % 1_000_000_000,
            // QEMU stores -1 when unknown.
            icount: sn.icount().filter(|&n| n != u64::MAX),
        }
    }
}

/// The whole `qj info --output json` document: qemu-img's keys first.
#[derive(Debug, Serialize)]
pub struct InfoJson {
    /// Guest-visible size in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The file name as given.
    pub filename: String,
    /// Cluster size in bytes.
    #[serde(rename = "cluster-size")]
    pub cluster_size: u64,
    /// Always "qcow2".
    pub format: &'static str,
    /// Bytes the file occupies on disk.
    #[serde(rename = "actual-size")]
    pub actual_size: u64,
    /// Backing file name as stored.
    #[serde(rename = "backing-filename", skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file name resolved against the image's directory.
    #[serde(
        rename = "full-backing-filename",
        skip_serializing_if = "Option::is_none"
    )]
    pub full_backing_filename: Option<String>,
    /// Backing file format from the header extension.
    #[serde(
        rename = "backing-filename-format",
        skip_serializing_if = "Option::is_none"
    )]
    pub backing_filename_format: Option<String>,
    /// Incompatible bit 0.
    #[serde(rename = "dirty-flag")]
    pub dirty_flag: bool,
    /// Internal snapshots (left out when there are none, as QEMU does).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotJson>,
    /// qcow2 details.
    #[serde(rename = "format-specific")]
    pub format_specific: FormatSpecific,
    /// Our own details.
    pub qj: QjDetails,
}

fn compression_name(kind: u8) -> String {
    match kind {
        COMPRESSION_ZLIB => "zlib".into(),
        COMPRESSION_ZSTD => "zstd".into(),
        other => format!("unknown ({other})"),
    }
}

fn extension_name(e: &HeaderExtension) -> String {
    match e {
        HeaderExtension::BackingFormat(_) => "backing format".into(),
        HeaderExtension::FeatureNameTable(_) => "feature name table".into(),
        HeaderExtension::Bitmaps(_) => "bitmaps".into(),
        HeaderExtension::ExternalDataFile(_) => "external data file".into(),
        HeaderExtension::Journal(_) => "qjournal".into(),
        HeaderExtension::Unknown { kind, .. } => format!("unknown {kind:#010x}"),
    }
}

fn backend_name(kind: BackendKind) -> &'static str {
    match kind {
        BackendKind::FlushOrdering => "flush-ordering",
        BackendKind::Journal => "journal",
    }
}

/// The journal block from the header extension and the engine's state.
fn journal_details(
    header: &Header,
    ext: &JournalExtension,
    live: Option<&JournalInfo>,
) -> JournalDetails {
    let dirty_bit = header.has_incompatible(INCOMPAT_JOURNAL_DIRTY_BIT);
    let commit_protocol = match live {
        Some(j) => j.commit_protocol.clone(),
        None if ext.flags & JournalExtension::FLAG_TWO_FLUSH_COMMIT != 0 => "two-flush".into(),
        None => "single-flush".into(),
    };
    JournalDetails {
        offset: ext.offset,
        size: ext.size,
        commit_protocol,
        // `info` opens read-only, where nothing is logged: the flag says
        // what read-write opens do.
        log_data: ext.flags & JournalExtension::FLAG_LOG_DATA != 0
            || live.is_some_and(|j| j.log_data),
        valid: header.has_autoclear(AUTOCLEAR_JOURNAL_VALID_BIT),
        dirty_bit,
        replayed_in_memory: dirty_bit && live.is_some(),
        used_percent: live.map(|j| j.used_percent),
        committed_seq: live.map(|j| j.committed_seq),
        synced_seq: live.map(|j| j.synced_seq),
        unsynced: live.map(|j| j.unsynced),
        replayed_transactions: live.map(|j| j.replayed_transactions),
        dedup: ext.flags & JournalExtension::FLAG_DEDUP != 0,
        dedup_index: header.dedup_index().and_then(|index| match index {
            Ok(i) if i.is_empty() => None,
            Ok(i) => Some(DedupIndexDetails {
                entries: i.entries,
                clusters_saved: i.clusters_saved,
                bytes: u64::from(i.clusters) << header.cluster_bits,
                offset: i.offset,
                damaged: None,
            }),
            Err(why) => Some(DedupIndexDetails {
                entries: 0,
                clusters_saved: 0,
                bytes: 0,
                offset: 0,
                damaged: Some(why),
            }),
        }),
    }
}

/// Describes the image from its header (what is on disk) and file.
pub fn describe(
    path: &Path,
    header: &Header,
    file_length: u64,
    actual_size: u64,
    opened: &Result<Opened, String>,
) -> InfoJson {
    let live_journal = opened.as_ref().ok().and_then(|o| o.journal.as_ref());
    let v3 = header.version >= 3;
    let backing_filename = header.backing_file.clone();
    InfoJson {
        virtual_size: header.size,
        filename: path.display().to_string(),
        cluster_size: header.geometry().cluster_size(),
        format: "qcow2",
        actual_size,
        full_backing_filename: backing_filename
            .as_deref()
            .map(|b| backing_path(path, b).display().to_string()),
        backing_filename,
        backing_filename_format: header.backing_format().map(str::to_string),
        dirty_flag: header.is_dirty(),
        snapshots: opened
            .as_ref()
            .ok()
            .and_then(|o| o.snapshots.as_ref().ok())
            .map(|list| list.iter().map(SnapshotJson::from).collect())
            .unwrap_or_default(),
        format_specific: FormatSpecific {
            kind: "qcow2",
            data: Qcow2Specific {
                compat: if v3 { "1.1" } else { "0.10" },
                compression_type: compression_name(header.compression_type),
                lazy_refcounts: v3
                    .then_some(header.compatible_features & COMPAT_LAZY_REFCOUNTS_MASK != 0),
                refcount_bits: header.geometry().refcount_bits(),
                corrupt: v3.then_some(header.is_corrupt()),
                extended_l2: v3.then_some(header.incompatible_features & INCOMPAT_EXTL2_MASK != 0),
                bitmaps: opened
                    .as_ref()
                    .ok()
                    .filter(|o| !o.bitmaps.is_empty())
                    .map(|o| o.bitmaps.iter().map(BitmapJson::from).collect()),
            },
        },
        qj: QjDetails {
            version: header.version,
            file_length,
            l1_size: header.l1_size,
            l1_table_offset: header.l1_table_offset,
            refcount_table_offset: header.refcount_table_offset,
            refcount_table_clusters: header.refcount_table_clusters,
            snapshots: header.nb_snapshots,
            incompatible_features: header.incompatible_features,
            compatible_features: header.compatible_features,
            autoclear_features: header.autoclear_features,
            extensions: header.extensions.iter().map(extension_name).collect(),
            backend: opened
                .as_ref()
                .ok()
                .map(|o| backend_name(o.backend).to_string()),
            open_error: opened.as_ref().err().cloned(),
            snapshot_error: opened
                .as_ref()
                .ok()
                .and_then(|o| o.snapshots.as_ref().err().cloned()),
            journal: header
                .journal()
                .map(|ext| journal_details(header, &ext, live_journal)),
            bitmaps_problem: opened.as_ref().ok().and_then(|o| o.bitmaps_problem.clone()),
        },
    }
}

/// The "Format specific information" block, indented like qemu-img.
#[must_use]
pub fn format_specific_lines(data: &Qcow2Specific) -> String {
    let mut s = String::from("Format specific information:\n");
    s.push_str(&format!("    compat: {}\n", data.compat));
    s.push_str(&format!(
        "    compression type: {}\n",
        data.compression_type
    ));
    if let Some(lazy) = data.lazy_refcounts {
        s.push_str(&format!("    lazy refcounts: {lazy}\n"));
    }
    s.push_str(&format!("    refcount bits: {}\n", data.refcount_bits));
    if let Some(corrupt) = data.corrupt {
        s.push_str(&format!("    corrupt: {corrupt}\n"));
    }
    if let Some(extl2) = data.extended_l2 {
        s.push_str(&format!("    extended l2: {extl2}\n"));
    }
    if let Some(bitmaps) = &data.bitmaps {
        s.push_str("    bitmaps:\n");
        for b in bitmaps {
            s.push_str(&format!("        name: {}\n", b.name));
            s.push_str(&format!("            granularity: {}\n", b.granularity));
            s.push_str(&format!("            flags: [{}]\n", b.flags.join(", ")));
            if let Some(d) = b.dirty_bytes {
                s.push_str(&format!("            dirty bytes: {d}\n"));
            }
        }
    }
    s
}

/// The human text, shaped like `qemu-img info`.
#[must_use]
pub fn human_text(
    info: &InfoJson,
    snapshots: Option<&Result<Vec<SnapshotHeader>, String>>,
) -> String {
    let mut s = format!("image: {}\nfile format: qcow2\n", info.filename);
    s.push_str(&format!(
        "virtual size: {} ({} bytes)\n",
        size_to_str(info.virtual_size),
        info.virtual_size
    ));
    s.push_str(&format!("disk size: {}\n", size_to_str(info.actual_size)));
    s.push_str(&format!("cluster_size: {}\n", info.cluster_size));
    if let Some(b) = &info.backing_filename {
        s.push_str(&format!("backing file: {b}"));
        match &info.full_backing_filename {
            Some(full) if full != b => s.push_str(&format!(" (actual path: {full})\n")),
            _ => s.push('\n'),
        }
    }
    if let Some(f) = &info.backing_filename_format {
        s.push_str(&format!("backing file format: {f}\n"));
    }
    if info.dirty_flag {
        s.push_str("cleanly shut down: no\n");
    }
    if let Some(Ok(snapshots)) = snapshots {
        if !snapshots.is_empty() {
            s.push_str(&crate::cmd::snapshot::snapshot_table_text(snapshots));
        }
    }
    s.push_str(&format_specific_lines(&info.format_specific.data));
    let q = &info.qj;
    s.push_str("qj details:\n");
    s.push_str(&format!("    header version: {}\n", q.version));
    s.push_str(&format!(
        "    file length: {} ({} bytes)\n",
        size_to_str(q.file_length),
        q.file_length
    ));
    s.push_str(&format!(
        "    L1 table: {} entries at {:#x}\n",
        q.l1_size, q.l1_table_offset
    ));
    s.push_str(&format!(
        "    refcount table: {} clusters at {:#x}\n",
        q.refcount_table_clusters, q.refcount_table_offset
    ));
    s.push_str(&format!("    snapshots: {}\n", q.snapshots));
    s.push_str(&format!(
        "    feature bits: incompatible {:#x}, compatible {:#x}, autoclear {:#x}\n",
        q.incompatible_features, q.compatible_features, q.autoclear_features
    ));
    let extensions = if q.extensions.is_empty() {
        "none".to_string()
    } else {
        q.extensions.join(", ")
    };
    s.push_str(&format!("    header extensions: {extensions}\n"));
    match (&q.backend, &q.open_error) {
        (Some(b), _) => s.push_str(&format!("    metadata backend: {b}\n")),
        (None, Some(e)) => s.push_str(&format!("    cannot be opened: {e}\n")),
        (None, None) => {}
    }
    if let Some(e) = &q.snapshot_error {
        s.push_str(&format!("    snapshot table: {e}\n"));
    }
    if let Some(j) = &q.journal {
        s.push_str(&journal_lines(j));
    }
    if let Some(p) = &q.bitmaps_problem {
        s.push_str(&format!("    bitmaps not maintained: {p}\n"));
    }
    s
}

/// The journal block of the human text.
#[must_use]
pub fn journal_lines(j: &JournalDetails) -> String {
    let mut s = format!(
        "    journal: {} ({} bytes) at {:#x}\n",
        size_to_str(j.size),
        j.size,
        j.offset
    );
    s.push_str(&format!("        commit protocol: {}\n", j.commit_protocol));
    s.push_str(&format!(
        "        logged data: {}\n",
        if j.log_data { "on" } else { "off" }
    ));
    if let Some(p) = j.used_percent {
        s.push_str(&format!("        fill: {p}%\n"));
    }
    if let (Some(c), Some(y)) = (j.committed_seq, j.synced_seq) {
        s.push_str(&format!(
            "        committed seq: {c}\n        synced seq: {y}\n"
        ));
    }
    if let Some(u) = j.unsynced {
        s.push_str(&format!("        unsynced: {u}\n"));
    }
    s.push_str(&format!("        dirty bit: {}\n", j.dirty_bit));
    if j.dedup {
        s.push_str("        dedup: on\n");
        match &j.dedup_index {
            Some(DedupIndexDetails {
                damaged: Some(why), ..
            }) => s.push_str(&format!(
                "        dedup index: damaged ({why}); the next read-write open drops it\n"
            )),
            Some(i) => s.push_str(&format!(
                "        dedup index: {} entries, {} clusters saved, {} bytes at {:#x}\n",
                i.entries, i.clusters_saved, i.bytes, i.offset
            )),
            None => s.push_str(
                "        dedup index: not persisted (rebuilt from the journal by the next read-write open)\n",
            ),
        }
    }
    if !j.valid {
        s.push_str(
            "        valid: false (written by a program that does not know the journal; replaced on the next read-write open)\n",
        );
    }
    if j.replayed_in_memory {
        s.push_str(&format!(
            "        journal dirty: opened read-only, {} transaction(s) replayed in memory; the file is unchanged until a read-write open\n",
            j.replayed_transactions.unwrap_or(0)
        ));
    }
    s
}

/// Runs `qj info`.
pub fn run(args: InfoArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "info")?;
    let path = &args.file;
    let what = format!("opening {}", quoted(path));
    let storage = FileStorage::open(path, false).map_err(io(what.clone()))?;
    let _lock = crate::cmd::lock_file(path, false, args.force_share)?;
    let meta = std::fs::metadata(path).map_err(io(what.clone()))?;
    let header = Image::read_header(&storage).map_err(engine(what.clone()))?;
    warn_about_chain(path)?;
    // Opened read-only and without the backing file, as qemu-img info does:
    // looking must change nothing, and a missing backing file does not
    // stop the description.
    // Locked above (a second read lock of ours is no conflict).
    let opened = open_layer(path, crate::cmd::lock_mode(args.force_share))
        .and_then(|(image, _)| {
            let info = image
                .info()
                .map_err(engine(format!("describing {}", quoted(path))))?;
            Ok(Opened {
                backend: info.backend,
                journal: info.journal,
                snapshots: image.snapshots().map_err(|e| one_line(&e.to_string())),
                bitmaps: info.bitmaps,
                bitmaps_problem: info.bitmaps_problem,
            })
        })
        .map_err(|e| match e {
            crate::error::CliError::Engine { source, .. } => one_line(&source.to_string()),
            other => one_line(&other.to_string()),
        });
    let info = describe(path, &header, meta.len(), meta.blocks() * 512, &opened);
    match args.output {
        OutputFormat::Human => print!(
            "{}",
            human_text(&info, opened.as_ref().ok().map(|o| &o.snapshots))
        ),
        OutputFormat::Json => println!("{}", to_json(&info)?),
    }
    match opened {
        Ok(Opened {
            snapshots: Err(reason),
            ..
        }) => {
            eprintln!(
                "qj: the snapshot table of {} cannot be read: {reason}",
                quoted(path)
            );
            Ok(EXIT_FAILED)
        }
        Ok(_) => Ok(0),
        Err(reason) => {
            eprintln!("qj: {} cannot be opened: {reason}", quoted(path));
            Ok(EXIT_FAILED)
        }
    }
}

/// Reports a backing chain that every command opening it refuses (a loop,
/// or deeper than the limit): describing the top image still works, but
/// the user must learn why reading it will not.
pub fn warn_about_chain(path: &std::path::Path) -> CliResult<()> {
    if let Some(problem) = crate::chain::chain_files(path)?.problem {
        eprintln!(
            "{}",
            crate::error::one_line(&format!(
                "qj: warning: {}: {problem}; commands that read through the backing chain refuse it",
                quoted(path)
            ))
        );
    }
    Ok(())
}
