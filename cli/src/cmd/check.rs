//! `qj check [--output human|json] [-r leaks|all] FILE`: consistency check
//! and repair with qemu-img's output and exit statuses (0 clean, 1 the
//! check could not complete, 2 corruptions, 3 leaks only).

use std::path::{Path, PathBuf};

use qj_engine::check::{check, salvage_journal, CheckReport, RepairMode};
use qj_engine::{FileStorage, Image};
use qj_spec::FormatError;
use serde::Serialize;

use crate::error::{io, quoted, CliError, CliResult};
use crate::output::{to_json, OutputFormat};

/// `-r` choices, as qemu-img names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairArg {
    /// Fix leaked clusters only.
    Leaks,
    /// Fix leaks and corruptions.
    All,
}

/// Arguments of `qj check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Repair: leaks, or all.
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    repair: Option<RepairArg>,
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

/// `qemu-img check --output=json`'s object. Zero counts are left out, as
/// QEMU leaves them out, except `check-errors`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckJson {
    /// One past the last byte in use.
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    /// Clusters of the virtual disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    /// Problems that stopped part of the check; always present.
    pub check_errors: u64,
    /// Inconsistencies that can lose data.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Clusters referenced by nothing.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Corruptions repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// Guest clusters mapped.
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    /// Mapped clusters not following the previous one on disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    /// The file name as given.
    pub filename: String,
    /// Always "qcow2".
    pub format: &'static str,
}

// serde's skip_serializing_if passes a reference.
#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl CheckJson {
    /// The JSON view of a report.
    #[must_use]
    pub fn new(report: &CheckReport, filename: String) -> Self {
        CheckJson {
            image_end_offset: report.image_end_offset,
            total_clusters: report.total_clusters,
            check_errors: report.check_errors,
            corruptions: report.corruptions,
            leaks: report.leaks,
            corruptions_fixed: report.corruptions_fixed,
            leaks_fixed: report.leaks_fixed,
            allocated_clusters: report.allocated_clusters,
            fragmented_clusters: report.fragmented_clusters,
            filename,
            format: "qcow2",
        }
    }
}

/// The line qemu-img prints on stdout between a repair and the second
/// pass. The checker puts it among its messages; it is shown here instead.
const DOUBLE_CHECK: &str = "Double checking the fixed image now...";

/// The stdout summary of qemu-img check (human output).
#[must_use]
pub fn human_summary(report: &CheckReport) -> String {
    let mut s = String::new();
    if report.corruptions_fixed > 0 || report.leaks_fixed > 0 {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\n",
            report.leaks_fixed, report.corruptions_fixed
        ));
        s.push_str(DOUBLE_CHECK);
        s.push('\n');
    }
    if report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if report.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                report.corruptions
            ));
        }
        if report.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                report.leaks
            ));
        }
        if report.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                report.check_errors
            ));
        }
    }
    if report.total_clusters != 0 && report.allocated_clusters != 0 {
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented\n",
            report.allocated_clusters,
            report.total_clusters,
            report.allocated_clusters as f64 * 100.0 / report.total_clusters as f64,
            report.fragmented_clusters as f64 * 100.0 / report.allocated_clusters as f64,
        ));
    }
    if report.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", report.image_end_offset));
    }
    s
}

/// Like qemu-img, refuses an image with a feature we do not know: its
/// metadata may mean something our checker would misread (and a repair
/// would then destroy). A marked-corrupt image is checked: that is what
/// the check is for. Header decoding errors are left to the checker, which
/// reports them itself.
fn refuse_unsupported(storage: &FileStorage, path: &Path) -> CliResult<()> {
    let Ok(header) = Image::read_header(storage) else {
        return Ok(());
    };
    match header.unsupported_features() {
        Err(e @ FormatError::Unsupported(_)) => Err(CliError::failed(
            format!("checking {}", quoted(path)),
            e.to_string(),
        )),
        _ => Ok(()),
    }
}

/// Runs `qj check`; the exit status is qemu-img's.
pub fn run(args: CheckArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "check")?;
    let mode = match args.repair {
        None => RepairMode::None,
        Some(RepairArg::Leaks) => RepairMode::Leaks,
        Some(RepairArg::All) => RepairMode::All,
    };
    let path = &args.file;
    if args.force_share && mode != RepairMode::None {
        return Err(CliError::Usage(
            "check: -U (force-share) is for read-only checks; a repair needs the write lock".into(),
        ));
    }
    // Locked as QEMU's check locks: a repair excludes every other user, a
    // plain check excludes writers.
    let _lock = crate::cmd::lock_file(path, mode != RepairMode::None, args.force_share)?;
    // Opened for writing only to repair: a plain check never changes a byte.
    let storage = FileStorage::open(path, mode != RepairMode::None)
        .map_err(io(format!("opening {}", quoted(path))))?;
    refuse_unsupported(&storage, path)?;
    crate::cmd::info::warn_about_chain(path)?;
    let check_error = |source| CliError::Check {
        what: format!("checking {}", quoted(path)),
        source,
    };
    if mode == RepairMode::All {
        // A dirty journal that cannot be replayed is salvaged first: the
        // repair below then works on the metadata the salvage left.
        for line in salvage_journal(&storage)
            .map_err(check_error)?
            .unwrap_or_default()
        {
            eprintln!("{line}");
        }
    }
    let report = check(&storage, mode, &[]).map_err(check_error)?;
    for message in report.messages.iter().filter(|m| *m != DOUBLE_CHECK) {
        eprintln!("{message}");
    }
    match args.output {
        OutputFormat::Human => print!("{}", human_summary(&report)),
        OutputFormat::Json => println!(
            "{}",
            to_json(&CheckJson::new(&report, path.display().to_string()))?
        ),
    }
    let code = report.exit_code();
    debug_assert!((0..=3).contains(&code), "qemu-img check status {code}");
    Ok(u8::try_from(code).unwrap_or(crate::error::EXIT_FAILED))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> CheckReport {
        CheckReport {
            total_clusters: 256,
            allocated_clusters: 16,
            image_end_offset: 86016,
            ..CheckReport::default()
        }
    }

    #[test]
    fn clean_summary_matches_qemu_img_minus_compressed() {
        assert_eq!(
            human_summary(&report()),
            "No errors were found on the image.\n16/256 = 6.25% allocated, 0.00% fragmented\nImage end offset: 86016\n"
        );
    }

    #[test]
    fn leak_and_corruption_summaries() {
        let r = CheckReport {
            leaks: 2,
            corruptions: 1,
            ..report()
        };
        let s = human_summary(&r);
        assert!(s.contains("\n1 errors were found on the image.\n"), "{s}");
        assert!(
            s.contains("\n2 leaked clusters were found on the image.\n"),
            "{s}"
        );
    }

    #[test]
    fn repair_summary_matches_qemu_img() {
        let r = CheckReport {
            corruptions_fixed: 1,
            ..report()
        };
        assert!(human_summary(&r).starts_with(
            "The following inconsistencies were found and repaired:\n\n    0 leaked clusters\n    1 corruptions\n\nDouble checking the fixed image now...\nNo errors were found on the image.\n"
        ));
    }

    #[test]
    fn json_omits_zero_counts_but_not_check_errors() {
        let text = to_json(&CheckJson::new(&report(), "a.qcow2".into())).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["check-errors"], 0);
        assert_eq!(v["total-clusters"], 256);
        assert_eq!(v["image-end-offset"], 86016);
        assert!(v.get("leaks").is_none() && v.get("corruptions").is_none());
        assert_eq!(v["format"], "qcow2");
    }
}
