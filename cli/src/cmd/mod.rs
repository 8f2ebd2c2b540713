//! One module per subcommand; each has its clap `Args` struct and a `run`
//! that returns the process exit status.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check;
pub mod convert;
pub mod crash;
pub mod crash_merge;
pub mod crash_output;
pub mod crash_replay;
pub mod create;
pub mod demo;
pub mod info;
pub mod io;
pub mod journal;
pub mod map;
pub mod serve;
pub mod snapshot;

use std::path::Path;

use qj_engine::lock::ImageLock;
use qj_engine::{Image, LockMode};

use crate::error::{engine, quoted, CliError, CliResult};

/// `-U` / `--force-share` as qemu-img has it: a read-only command takes no
/// lock and ignores other users' (what it reads may be inconsistent).
pub fn lock_mode(force_share: bool) -> LockMode {
    if force_share {
        LockMode::ForceShare
    } else {
        LockMode::Qemu
    }
}

/// Locks the image file at `path` as QEMU would for a reader or a writer,
/// for a command that works on the file itself rather than through an
/// opened image. Hold the result until the command is done.
pub fn lock_file(path: &Path, writable: bool, force_share: bool) -> CliResult<Option<ImageLock>> {
    ImageLock::acquire(path, writable, lock_mode(force_share))
        .map_err(engine(format!("opening {}", quoted(path))))
}

/// The subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a qcow2 image (like qemu-img create).
    Create(create::CreateArgs),
    /// Describe an image (like qemu-img info).
    Info(info::InfoArgs),
    /// Check an image for consistency, and repair it with -r (like qemu-img check).
    Check(check::CheckArgs),
    /// Show where guest data is stored (like qemu-img map).
    Map(map::MapArgs),
    /// Run guest I/O commands on an image (like qemu-io).
    Io(io::IoArgs),
    /// Write an image's guest content as a raw file (like qemu-img convert -O raw).
    Convert(convert::ConvertArgs),
    /// Create, fill, verify and check a temporary image, and show engine statistics.
    Demo(demo::DemoArgs),
    /// Explore power-loss crash states of the backends and check every recovered image.
    Crash(Box<crash::CrashArgs>),
    /// Compare the backends, QEMU and a raw file on the same workloads.
    Bench(bench::BenchArgs),
    /// Give an image a metadata journal or remove it (like qemu-img amend).
    Amend(amend::AmendArgs),
    /// Add, remove, clear, enable, disable or merge persistent dirty bitmaps (like qemu-img bitmap).
    Bitmap(bitmap::BitmapArgs),
    /// Inspect a metadata journal.
    Journal(journal::JournalArgs),
    /// Serve an image over NBD (like qemu-nbd).
    Serve(serve::ServeArgs),
    /// Create, list, apply or delete internal snapshots (like qemu-img snapshot).
    Snapshot(snapshot::SnapshotArgs),
}

impl Command {
    /// Runs the subcommand; `Ok` carries the exit status.
    pub fn run(self) -> CliResult<u8> {
        match self {
            Command::Create(a) => create::run(a),
            Command::Info(a) => info::run(a),
            Command::Check(a) => check::run(a),
            Command::Map(a) => map::run(a),
            Command::Io(a) => io::run(a),
            Command::Convert(a) => convert::run(a),
            Command::Demo(a) => demo::run(a),
            Command::Crash(a) => crash::run(*a),
            Command::Bench(a) => bench::run(a),
            Command::Amend(a) => amend::run(a),
            Command::Bitmap(a) => bitmap::run(a),
            Command::Journal(a) => journal::run(a),
            Command::Serve(a) => serve::run(a),
            Command::Snapshot(a) => snapshot::run(a),
        }
    }
}

/// `-f FMT` is accepted for qemu compatibility; only qcow2 is understood.
pub fn require_qcow2(format: Option<&str>, command: &str) -> CliResult<()> {
    match format {
        None | Some("qcow2") => Ok(()),
        Some(other) => Err(CliError::Usage(format!(
            "{command}: format '{other}' is not supported (qcow2 only)"
        ))),
    }
}

/// Tells the user on stderr what opening `image` (at `path`) found in its
/// journal that they must hear about: a dropped last transaction that may
/// have been acknowledged is never passed over in silence.
pub fn warn_about_replay(image: &Image, path: &Path) {
    let warning = image
        .info()
        .ok()
        .and_then(|info| info.journal)
        .and_then(|journal| journal.replay_warning);
    if let Some(warning) = warning {
        eprintln!(
            "{}",
            crate::error::one_line(&format!("qj: warning: {}: {warning}", quoted(path)))
        );
    }
}
