//! `qj convert [-f qcow2] -O raw SRC DST`: the guest-visible content of an
//! image (backing chain included) as a raw file, written sparse.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use qj_engine::{Image, OpenOptions};

use crate::chain::{chain_files, file_id};
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
    /// Open the source without taking or honouring image locks (what is
    /// read may be inconsistent while another process writes), like qemu-img.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
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
    let opts = OpenOptions {
        lock: crate::cmd::lock_mode(args.force_share),
        ..OpenOptions::read_only()
    };
    let image = Image::open_path(src, &opts).map_err(engine(format!("opening {}", quoted(src))))?;
    let dst = &args.target;
    let out_what = || format!("writing {}", quoted(dst));
    // Never the input: not the image, not a file of its backing chain,
    // whatever path (symlink, hard link) names it. Checked before the
    // output is touched.
    if dst.exists() {
        let target = file_id(dst)?;
        if let Some(layer) = chain_files(src)?
            .files
            .into_iter()
            .find(|(_, id)| *id == target)
        {
            return Err(CliError::failed(
                out_what(),
                format!(
                    "the output is the same file as {}, the input or a file of its backing chain; refusing to overwrite it",
                    quoted(&layer.0)
                ),
            ));
        }
    }
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(io(out_what()))?;
    // The output is written like an image opened for writing: no other
    // user may have it (QEMU locks its output the same way).
    let _lock = crate::cmd::lock_file(dst, true, false)?;
    let size = image.virtual_size();
    out.set_len(0).map_err(io(out_what()))?;
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
