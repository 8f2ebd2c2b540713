//! `qj convert [-f qcow2] -O raw SRC DST`: the guest-visible content of an
//! image (backing chain included) as a raw file, written sparse.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use qj_engine::{Image, OpenOptions};

use crate::error::{engine, io, quoted, CliError, CliResult};

/// Bytes copied per request: bounds memory whatever the image size.
const CHUNK_BYTES: u64 = 1 << 20;

/// Arguments of `qj convert`.
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Output format: raw.
    #[arg(short = 'O', value_name = "FMT")]
    output_format: String,
    /// The source image.
    source: PathBuf,
    /// The raw file to write (replaced if it exists).
    target: PathBuf,
}

/// Runs `qj convert`.
pub fn run(args: ConvertArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "convert")?;
    if args.output_format != "raw" {
        return Err(CliError::Usage(format!(
            "convert: output format '{}' is not supported (only -O raw)",
            args.output_format
        )));
    }
    let src = &args.source;
    let image = Image::open_path(src, &OpenOptions::read_only())
        .map_err(engine(format!("opening {}", quoted(src))))?;
    let dst = &args.target;
    let out_what = || format!("writing {}", quoted(dst));
    let out = File::create(dst).map_err(io(out_what()))?;
    let size = image.virtual_size();
    out.set_len(size).map_err(io(out_what()))?;
    let extents = image
        .map()
        .map_err(engine(format!("mapping {}", quoted(src))))?;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    for ext in extents.iter().filter(|e| !e.zero) {
        let end = ext.start + ext.length;
        let mut pos = ext.start;
        // Bounded: `pos` advances by a positive chunk each round.
        while pos < end {
            let n = (end - pos).min(CHUNK_BYTES) as usize;
            let chunk = &mut buf[..n];
            image
                .read(chunk, pos)
                .map_err(engine(format!("reading {} at {pos}", quoted(src))))?;
            // The file is already all zeros there: leave it sparse.
            if chunk.iter().any(|&b| b != 0) {
                out.write_all_at(chunk, pos).map_err(io(out_what()))?;
            }
            pos += n as u64;
        }
    }
    out.sync_all().map_err(io(out_what()))?;
    Ok(0)
}
