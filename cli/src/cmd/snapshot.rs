//! `qj snapshot -c|-l|-a|-d NAME FILE`: internal snapshots, like
//! `qemu-img snapshot`. `-l` opens read-only (with `-U`, without locks);
//! the others open read-write and run as one journal transaction on a
//! journalled image. Exit 0 on success, 1 when the operation fails (an
//! unknown snapshot, a damaged table), 2 for bad usage.

use std::path::PathBuf;

use qj_engine::{Image, OpenOptions};
use qj_spec::qcow2::SnapshotHeader;

use crate::chain::open_layer;
use crate::error::{engine, quoted, CliError, CliResult};
use crate::human::size_to_str;

/// Arguments of `qj snapshot`.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("op").required(true).args(["create", "list", "apply", "delete"])))]
pub struct SnapshotArgs {
    /// Create snapshot NAME of the image as it is.
    #[arg(short = 'c', value_name = "NAME")]
    create: Option<String>,
    /// List the snapshots.
    #[arg(short = 'l')]
    list: bool,
    /// Revert the image to snapshot NAME (an id, or a name).
    #[arg(short = 'a', value_name = "NAME")]
    apply: Option<String>,
    /// Delete snapshot NAME (an id, or a name).
    #[arg(short = 'd', value_name = "NAME")]
    delete: Option<String>,
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Open without taking or honouring image locks (only with -l), like
    /// qemu-img.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print nothing on success (accepted for qemu-img compatibility).
    #[arg(short = 'q')]
    quiet: bool,
    /// The image.
    file: PathBuf,
}

/// The `qemu-img snapshot -l` table (also under `qemu-img info`).
#[must_use]
pub fn snapshot_table_text(snapshots: &[SnapshotHeader]) -> String {
    let mut s = String::from("Snapshot list:\n");
    s.push_str(&row("ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"));
    for sn in snapshots {
        let vm_state = sn
            .vm_state_size_large()
            .unwrap_or(u64::from(sn.vm_state_size));
        let clock_ms = sn.vm_clock_nsec / 1_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            clock_ms / 3_600_000,
            clock_ms / 60_000 % 60,
            clock_ms / 1000 % 60,
            clock_ms % 1000
        );
        // QEMU stores -1 when the instruction count is unknown.
        let icount = match sn.icount() {
            Some(n) if n != u64::MAX => n.to_string(),
            _ => String::new(),
        };
        s.push_str(&row(
            &sn.id,
            &sn.name,
            &size_to_str(vm_state),
            &utc_date(u64::from(sn.date_sec)),
            &clock,
            &icount,
        ));
    }
    s
}

/// One line of the table, with QEMU's column widths.
fn row(id: &str, tag: &str, size: &str, date: &str, clock: &str, icount: &str) -> String {
    format!("{id:<7} {tag:<16} {size:>8} {date:>19} {clock:>15} {icount:>10}\n")
}

/// `YYYY-MM-DD HH:MM:SS` of `secs` since the epoch, in UTC (QEMU prints
/// local time; our machines run in UTC).
fn utc_date(secs: u64) -> String {
    let days = secs / 86_400;
    let rest = secs % 86_400;
    // Howard Hinnant's civil-from-days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// Runs `qj snapshot`.
pub fn run(args: SnapshotArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "snapshot")?;
    let path = &args.file;
    if args.list {
        let (image, _) = open_layer(path, crate::cmd::lock_mode(args.force_share))?;
        let snapshots = image
            .snapshots()
            .map_err(engine(format!("listing the snapshots of {}", quoted(path))))?;
        print!("{}", snapshot_table_text(&snapshots));
        return Ok(0);
    }
    if args.force_share {
        return Err(CliError::Usage(
            "snapshot: -U (force-share) can only be used with -l".into(),
        ));
    }
    let image = Image::open_path(path, &OpenOptions::read_write())
        .map_err(engine(format!("opening {}", quoted(path))))?;
    crate::cmd::warn_about_replay(&image, path);
    let (what, result) = if let Some(name) = &args.create {
        (
            format!("creating snapshot {name:?}"),
            image.snapshot_create(name).map(|_| ()),
        )
    } else if let Some(name) = &args.apply {
        (
            format!("applying snapshot {name:?}"),
            image.snapshot_apply(name),
        )
    } else if let Some(name) = &args.delete {
        (
            format!("deleting snapshot {name:?}"),
            image.snapshot_delete(name),
        )
    } else {
        return Err(CliError::Usage(
            "snapshot: one of -c, -l, -a, -d is required".into(),
        ));
    };
    let what = format!("{what} in {}", quoted(path));
    result.map_err(engine(what.clone()))?;
    image.close().map_err(engine(what))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_civil_utc() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc_date(1_796_224_229), "2026-12-02 15:10:29");
    }

    #[test]
    fn the_table_has_qemu_img_columns() {
        let mut extra = Vec::new();
        for word in [0u64, 1 << 20, 0] {
            extra.extend_from_slice(&word.to_be_bytes());
        }
        let sn = SnapshotHeader {
            l1_table_offset: 0x40000,
            l1_size: 1,
            id: "1".into(),
            name: "a".into(),
            date_sec: 1_796_224_229,
            date_nsec: 0,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra_data: extra,
        };
        // What qemu-img 10.0.2 printed for the same entry.
        assert_eq!(
            snapshot_table_text(&[sn]),
            "Snapshot list:\n\
             ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT\n\
             1       a                     0 B 2026-12-02 15:10:29  0000:00:00.000          0\n"
        );
    }
}
