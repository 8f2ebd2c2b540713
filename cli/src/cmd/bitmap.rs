//! `qj bitmap (--add [-g GRANULARITY] [--disable] | --remove | --clear |
//! --enable | --disable | --merge SOURCE)... FILE BITMAP`: change the
//! persistent dirty bitmaps of an image, shaped like `qemu-img bitmap`.
//!
//! Several operations may be given at once; they run in a fixed order,
//! the one that makes sense when combined: add, merge, clear, enable,
//! disable, remove. Everything is checked before the first change, and the
//! image is closed cleanly, so QEMU finds the bitmaps consistent.

use std::path::PathBuf;

use qj_engine::{BackingSource, Image, OpenOptions};

use crate::error::{engine, quoted, CliError, CliResult};
use crate::size::parse_size;

/// Arguments of `qj bitmap`.
#[derive(Debug, clap::Args)]
pub struct BitmapArgs {
    /// Add an empty bitmap named BITMAP (enabled unless `--disable` too).
    #[arg(long)]
    add: bool,
    /// Remove BITMAP and free its clusters.
    #[arg(long)]
    remove: bool,
    /// Clear every bit of BITMAP.
    #[arg(long)]
    clear: bool,
    /// Enable BITMAP: guest writes mark it.
    #[arg(long)]
    enable: bool,
    /// Disable BITMAP: guest writes leave it alone.
    #[arg(long)]
    disable: bool,
    /// Set in BITMAP every bit set in bitmap SOURCE of the same image.
    #[arg(long, value_name = "SOURCE")]
    merge: Option<String>,
    /// Bytes of guest disk per bit for `--add` (a power of two, 512 to 2G;
    /// default: the cluster size, at least 4 KiB, as QEMU).
    #[arg(short = 'g', value_name = "GRANULARITY")]
    granularity: Option<String>,
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// The image.
    file: PathBuf,
    /// The bitmap's name.
    bitmap: String,
}

/// Runs `qj bitmap`.
pub fn run(args: BitmapArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "bitmap")?;
    if !(args.add || args.remove || args.clear || args.enable || args.disable)
        && args.merge.is_none()
    {
        return Err(CliError::Usage(
            "bitmap: give at least one of --add, --remove, --clear, --enable, --disable, --merge"
                .into(),
        ));
    }
    if args.granularity.is_some() && !args.add {
        return Err(CliError::Usage("bitmap: -g only applies to --add".into()));
    }
    if args.enable && args.disable {
        return Err(CliError::Usage(
            "bitmap: --enable and --disable contradict each other".into(),
        ));
    }
    let granularity = args
        .granularity
        .as_deref()
        .map(|g| parse_size(g).map_err(|e| CliError::Usage(format!("bitmap: -g {g}: {e}"))))
        .transpose()?;
    let path = &args.file;
    let what = format!("changing bitmap '{}' of {}", args.bitmap, quoted(path));
    let opts = OpenOptions {
        backing: BackingSource::Ignore,
        ..OpenOptions::read_write()
    };
    let image =
        Image::open_path(path, &opts).map_err(engine(format!("opening {}", quoted(path))))?;
    crate::cmd::warn_about_replay(&image, path);
    let name = args.bitmap.as_str();
    let result = (|| {
        if args.add {
            let default = image.geometry().cluster_size().max(4096);
            // `--add --disable` adds a disabled bitmap, as in qemu-img.
            image.bitmap_add(name, granularity.unwrap_or(default), args.disable)?;
        }
        if let Some(source) = &args.merge {
            image.bitmap_merge(source, name)?;
        }
        if args.clear {
            image.bitmap_clear(name)?;
        }
        if args.enable {
            image.bitmap_set_enabled(name, true)?;
        }
        if args.disable && !args.add {
            image.bitmap_set_enabled(name, false)?;
        }
        if args.remove {
            image.bitmap_remove(name)?;
        }
        Ok(())
    })();
    // Closed cleanly either way: what succeeded is stored, and the bitmaps
    // are not left in use.
    let closed = image.close();
    result.map_err(engine(what.clone()))?;
    closed.map_err(engine(what))?;
    Ok(0)
}
