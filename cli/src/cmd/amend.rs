//! `qj amend [-f qcow2] -o journal=on|off[,journal_size=SIZE][,commit=MODE] FILE`:
//! give an existing image a metadata journal or take it away, shaped like
//! `qemu-img amend`; `-o dedup=on|off` switches deduplication on an image
//! with a journal.

use std::path::PathBuf;
use std::sync::Arc;

use qj_engine::{FileStorage, Image};

use crate::create_options::{apply_list, help_text, wants_help, CreateOptionList, ListFor};
use crate::error::{engine, io, quoted, CliError, CliResult};

/// Arguments of `qj amend`.
#[derive(Debug, clap::Args)]
pub struct AmendArgs {
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Options as key=value,... (`-o help` lists them); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    options: Vec<String>,
    /// The image to change in place (optional with `-o help`).
    file: Option<PathBuf>,
}

/// Runs `qj amend`.
pub fn run(args: AmendArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "amend")?;
    if args.options.iter().any(|o| wants_help(o)) {
        print!("{}", help_text(ListFor::Amend));
        return Ok(0);
    }
    let mut list = CreateOptionList::default();
    for o in &args.options {
        apply_list(o, &mut list, ListFor::Amend)?;
    }
    // `dedup` alone switches deduplication on an image that has a journal;
    // with `journal=on` it is part of the new journal's configuration.
    let dedup_only = list.journal.is_none() && list.dedup.is_some();
    let dedup = if dedup_only { list.dedup.take() } else { None };
    // Validated before the file is opened for writing, so that bad options
    // leave the image untouched.
    let config = list.journal_config()?;
    if list.journal.is_none() && dedup.is_none() {
        return Err(CliError::Usage(
            "amend: nothing to change (give -o journal=on, -o journal=off or -o dedup=on|off)"
                .into(),
        ));
    }
    let Some(path) = args.file.as_deref() else {
        return Err(CliError::Usage(
            "amend: the image FILE is required (only -o help works without one)".into(),
        ));
    };
    let what = format!("amending {}", quoted(path));
    let _lock = crate::cmd::lock_file(path, true, false)?;
    let storage = FileStorage::open(path, true).map_err(io(what.clone()))?;
    let header = Image::read_header(&storage).map_err(engine(what.clone()))?;
    let storage = Arc::new(storage);
    if let Some(on) = dedup {
        if header.journal().is_none() {
            return Err(CliError::failed(
                what,
                "dedup needs a journal and this image has none: there is no flush order that keeps a dedup index and the L2 tables together (amend -o journal=on,dedup=on)",
            ));
        }
        // The engine replays and checkpoints the journal first, so that no
        // dedup descriptor outlives the flag.
        Image::set_dedup(storage, on).map_err(engine(what))?;
        return Ok(0);
    }
    match config {
        Some(config) => {
            if let Some(ext) = header.journal() {
                return Err(CliError::failed(
                    what,
                    format!(
                        "the image already has a journal ({} bytes at {:#x}); amend -o journal=off first to change it",
                        ext.size, ext.offset
                    ),
                ));
            }
            // The engine orders the steps: the journal's clusters are
            // counted durably, then the region is formatted and flushed,
            // and only then does the header point to it.
            Image::enable_journal(storage, &config).map_err(engine(what))?;
        }
        None => {
            // Without a journal there is nothing to remove: like qemu-img
            // amend setting an option to the value it has, a no-op.
            if header.journal().is_none() {
                return Ok(0);
            }
            // The engine replays and checkpoints the journal before the
            // header stops naming it, and frees its clusters only after
            // that header is durable.
            Image::disable_journal(storage).map_err(engine(what))?;
        }
    }
    Ok(0)
}
