//! `qj info [--output human|json] FILE`: what the image is, like
//! `qemu-img info`. The header is described even when the engine refuses
//! to open the image (unsupported feature, broken layout); the reason is
//! then printed on stderr and the exit status is 1.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use qj_engine::{BackendKind, FileStorage, Image};
use qj_spec::qcow2::features::{COMPAT_LAZY_REFCOUNTS_MASK, INCOMPAT_EXTL2_MASK};
use qj_spec::qcow2::{Header, HeaderExtension, COMPRESSION_ZLIB, COMPRESSION_ZSTD};
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

/// Describes the image from its header (what is on disk) and file.
pub fn describe(
    path: &Path,
    header: &Header,
    file_length: u64,
    actual_size: u64,
    opened: &Result<BackendKind, String>,
) -> InfoJson {
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
            backend: opened.as_ref().ok().map(|k| backend_name(*k).to_string()),
            open_error: opened.as_ref().err().cloned(),
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
    s
}

/// The human text, shaped like `qemu-img info`.
#[must_use]
pub fn human_text(info: &InfoJson) -> String {
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
    s
}

/// Runs `qj info`.
pub fn run(args: InfoArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "info")?;
    let path = &args.file;
    let what = format!("opening {}", quoted(path));
    let storage = FileStorage::open(path, false).map_err(io(what.clone()))?;
    let meta = std::fs::metadata(path).map_err(io(what.clone()))?;
    let header = Image::read_header(&storage).map_err(engine(what.clone()))?;
    // Opened read-only and without the backing file, as qemu-img info does:
    // looking must change nothing, and a missing backing file does not
    // stop the description.
    let opened = open_layer(path)
        .map(|(image, _)| image.backend_kind())
        .map_err(|e| match e {
            crate::error::CliError::Engine { source, .. } => one_line(&source.to_string()),
            other => one_line(&other.to_string()),
        });
    let info = describe(path, &header, meta.len(), meta.blocks() * 512, &opened);
    match args.output {
        OutputFormat::Human => print!("{}", human_text(&info)),
        OutputFormat::Json => println!("{}", to_json(&info)?),
    }
    match opened {
        Ok(_) => Ok(0),
        Err(reason) => {
            eprintln!("qj: {} cannot be opened: {reason}", quoted(path));
            Ok(EXIT_FAILED)
        }
    }
}
