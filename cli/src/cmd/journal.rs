//! `qj journal dump [--output human|json] FILE`: what a qjournal region
//! holds, block by block. FILE is a qcow2 image with a qjournal header
//! extension (the region it names is dumped) or, when it is not qcow2 at
//! all, a bare journal region that fills the whole file.

use std::path::{Path, PathBuf};

use qj_engine::{FileStorage, Image, Storage};
use qj_spec::qcow2::QCOW2_MAGIC;

use crate::error::{engine, io, quoted, CliError, CliResult};
use crate::output::{to_json, OutputFormat};

/// Arguments of `qj journal`.
#[derive(Debug, clap::Args)]
pub struct JournalArgs {
    #[command(subcommand)]
    command: JournalCommand,
}

/// The `qj journal` subcommands.
#[derive(Debug, clap::Subcommand)]
enum JournalCommand {
    /// Print the journal's header slots, its state and its transactions.
    Dump(DumpArgs),
}

/// Arguments of `qj journal dump`.
#[derive(Debug, clap::Args)]
struct DumpArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Look without taking or honouring image locks (what is read may be
    /// inconsistent while another process writes), like qemu-img's -U.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// A qcow2 image with a journal, or a raw journal region.
    file: PathBuf,
}

/// Where the journal region lies in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    base_offset: u64,
    size_bytes: u64,
}

/// Runs `qj journal`.
pub fn run(args: JournalArgs) -> CliResult<u8> {
    match args.command {
        JournalCommand::Dump(a) => dump(a),
    }
}

/// Finds the region: the qcow2 extension's, or the whole file.
fn locate(path: &Path, storage: &FileStorage) -> CliResult<Region> {
    let what = format!("reading {}", quoted(path));
    let file_len = storage.len().map_err(io(what.clone()))?;
    let mut magic = [0u8; 4];
    // Reads past the end give zeros, so a file shorter than 4 bytes is
    // simply not qcow2.
    storage.read_at(&mut magic, 0).map_err(io(what.clone()))?;
    if u32::from_be_bytes(magic) != QCOW2_MAGIC {
        if file_len == 0 {
            return Err(CliError::failed(
                what,
                "the file is empty (neither a qcow2 image nor a journal region)",
            ));
        }
        return Ok(Region {
            base_offset: 0,
            size_bytes: file_len,
        });
    }
    let header = Image::read_header(storage).map_err(engine(what.clone()))?;
    let ext = header.journal().ok_or_else(|| {
        CliError::failed(
            what.clone(),
            "the qcow2 image has no qjournal header extension (it uses flush ordering)",
        )
    })?;
    let inside = ext
        .offset
        .checked_add(ext.size)
        .is_some_and(|end| end <= file_len);
    if ext.size == 0 || !inside {
        return Err(CliError::failed(
            what,
            format!(
                "the qjournal extension's region ({} bytes at {:#x}) is not inside the file ({file_len} bytes)",
                ext.size, ext.offset
            ),
        ));
    }
    Ok(Region {
        base_offset: ext.offset,
        size_bytes: ext.size,
    })
}

fn dump(args: DumpArgs) -> CliResult<u8> {
    let path = &args.file;
    let storage =
        FileStorage::open(path, false).map_err(io(format!("opening {}", quoted(path))))?;
    // A journal changes under a writer: read it as a consistent reader.
    let _lock = crate::cmd::lock_file(path, false, args.force_share)?;
    let region = locate(path, &storage)?;
    let dumped =
        qj_journal::dump(&storage, region.base_offset, region.size_bytes).map_err(|e| {
            CliError::failed(
                format!(
                    "dumping the journal of {} at {:#x}",
                    quoted(path),
                    region.base_offset
                ),
                e.to_string(),
            )
        })?;
    match args.output {
        OutputFormat::Human => {
            let text = dumped.to_string();
            // The dump's last line may come without its newline.
            if text.ends_with('\n') {
                print!("{text}");
            } else {
                println!("{text}");
            }
        }
        OutputFormat::Json => println!("{}", to_json(&dumped)?),
    }
    Ok(0)
}
