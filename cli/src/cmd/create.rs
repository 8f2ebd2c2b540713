//! `qj create [-f qcow2] [-o OPTIONS] [-b BACKING -F FMT] [-u] [-q] FILE [SIZE]`:
//! a new, empty qcow2 v3 image, like `qemu-img create -f qcow2`.

use std::path::{Path, PathBuf};

use qj_engine::{BackingFormat, CreateOptions, FileStorage, Image, OpenOptions, Storage};

use crate::chain::{backing_path, chain_files, file_id};
use crate::create_options::{apply_list, help_text, wants_help, CreateOptionList, ListFor};
use crate::error::{engine, io, quoted, CliError, CliResult};
use crate::size::parse_size;

/// Arguments of `qj create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Image format; only qcow2 is written.
    #[arg(short = 'f', value_name = "FMT", default_value = "qcow2")]
    format: String,
    /// Options as key=value,... (`-o help` lists them); may be repeated.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Backing file name, stored in the image as given.
    #[arg(short = 'b', value_name = "BACKING")]
    backing: Option<String>,
    /// Backing file format: qcow2 or raw.
    #[arg(short = 'F', value_name = "FMT")]
    backing_format: Option<String>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Do not print the "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    /// The image file to create (replaced if it exists; optional with
    /// `-o help`).
    file: Option<PathBuf>,
    /// Virtual size (k, M, G, T suffixes); defaults to the backing file's.
    #[arg(value_parser = parse_size)]
    size: Option<u64>,
}

/// Runs `qj create`.
pub fn run(args: CreateArgs) -> CliResult<u8> {
    if args.format != "qcow2" {
        return Err(CliError::Usage(format!(
            "create: format '{}' is not supported (qcow2 only)",
            args.format
        )));
    }
    if args.options.iter().any(|o| wants_help(o)) {
        print!("{}", help_text(ListFor::Create));
        return Ok(0);
    }
    let Some(file) = args.file.as_deref() else {
        return Err(CliError::Usage(
            "create: the image FILE is required (only -o help works without one)".into(),
        ));
    };
    let mut list = CreateOptionList::default();
    for o in &args.options {
        apply_list(o, &mut list, ListFor::Create)?;
    }
    let journal = list.journal_config()?;
    let backing_file = args.backing.clone().or(list.backing_file.clone());
    let backing_fmt = args.backing_format.clone().or(list.backing_fmt.clone());
    let defaults = CreateOptions::default();
    let mut opts = CreateOptions {
        virtual_size: 0,
        cluster_size: list.cluster_size.unwrap_or(defaults.cluster_size),
        refcount_bits: list.refcount_bits.unwrap_or(defaults.refcount_bits),
        backing_file: backing_file.clone(),
        backing_format: None,
        journal,
    };
    if let (Some(_), Some(_)) = (args.size, list.size) {
        return Err(CliError::Usage(
            "create: the size is given twice (-o size= and SIZE); give one".into(),
        ));
    }
    let size = args.size.or(list.size);
    opts.virtual_size = match &backing_file {
        None => size.ok_or_else(|| {
            CliError::Usage("create: SIZE is required (or a backing file to take it from)".into())
        })?,
        Some(name) => {
            let fmt_name = backing_fmt.as_deref().ok_or_else(|| {
                CliError::Usage(format!(
                    "create: backing file '{name}' given without its format (add -F qcow2 or -F raw)"
                ))
            })?;
            let format = BackingFormat::parse(fmt_name).ok_or_else(|| {
                CliError::Usage(format!(
                    "create: backing format '{fmt_name}' is not supported (qcow2 or raw)"
                ))
            })?;
            opts.backing_format = Some(format);
            match (size, args.unsafe_backing) {
                (Some(s), true) => s,
                (None, true) => {
                    return Err(CliError::Usage(
                        "create: SIZE is required with -u (the backing file is not opened)".into(),
                    ))
                }
                (given, false) => {
                    let backing_size = backing_virtual_size(file, name, format)?;
                    given.unwrap_or(backing_size)
                }
            }
        }
    };
    // Checked before the file is created, so that bad options leave any
    // existing file alone.
    qj_engine::create::validate(&opts).map_err(engine(format!("creating {}", quoted(file))))?;
    if let Some(name) = &backing_file {
        refuse_self_backing(file, name)?;
    }
    if !args.quiet {
        println!("{}", formatting_line(file, &opts, size_shown(size, &opts)));
    }
    Image::create_path(file, &opts).map_err(engine(format!("creating {}", quoted(file))))?;
    Ok(0)
}

/// The size qemu-img prints: the one asked for, or the backing file's.
fn size_shown(asked: Option<u64>, opts: &CreateOptions) -> u64 {
    asked.unwrap_or(opts.virtual_size)
}

/// Refuses a backing file that is the image being created, or whose own
/// chain holds it (by device and inode, through symlinks and hard links):
/// creating would destroy the backing data and leave an image that is its
/// own backing file.
fn refuse_self_backing(image: &Path, name: &str) -> CliResult<()> {
    let Ok(target) = file_id(image) else {
        return Ok(()); // A new file cannot be anyone's backing file yet.
    };
    let below = backing_path(image, name);
    if !below.exists() {
        return Ok(()); // `-u` with a missing backing file: nothing to protect.
    }
    let chain = chain_files(&below)?;
    if let Some((path, _)) = chain.files.iter().find(|(_, id)| *id == target) {
        return Err(CliError::failed(
            format!("creating {}", quoted(image)),
            format!(
                "the backing file {} is the image being created, or its chain contains it: that would create an infinite loop and destroy the backing data",
                quoted(path)
            ),
        ));
    }
    Ok(())
}

/// Opens the backing file as QEMU would (relative to the new image's
/// directory) and returns its virtual size.
fn backing_virtual_size(image: &Path, name: &str, format: BackingFormat) -> CliResult<u64> {
    let path = backing_path(image, name);
    let what = format!("opening backing file {}", quoted(&path));
    match format {
        BackingFormat::Qcow2 => {
            let backing =
                Image::open_path(&path, &OpenOptions::read_only()).map_err(engine(what))?;
            Ok(backing.virtual_size())
        }
        BackingFormat::Raw => {
            let storage = FileStorage::open(&path, false).map_err(io(what.clone()))?;
            storage.len().map_err(io(what))
        }
    }
}

/// qemu-img's "Formatting ..." line, with the same keys in the same order.
#[must_use]
pub fn formatting_line(file: &Path, opts: &CreateOptions, size: u64) -> String {
    let mut line = format!(
        "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2=off compression_type=zlib size={size}",
        file.display(),
        opts.cluster_size
    );
    if let Some(b) = &opts.backing_file {
        line.push_str(&format!(" backing_file={b}"));
    }
    if let Some(f) = opts.backing_format {
        line.push_str(&format!(" backing_fmt={}", f.name()));
    }
    line.push_str(&format!(
        " lazy_refcounts=off refcount_bits={}",
        opts.refcount_bits
    ));
    // Our own keys, after QEMU's, only when they differ from a plain image.
    if let Some(j) = &opts.journal {
        line.push_str(&format!(
            " journal=on journal_size={} commit={}",
            j.size_bytes,
            if j.two_flush { "draft" } else { "single-flush" }
        ));
        if j.log_data {
            line.push_str(" log_data=on");
        }
        if j.dedup {
            line.push_str(" dedup=on");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting_line_matches_qemu_img() {
        let opts = CreateOptions {
            virtual_size: 1 << 20,
            cluster_size: 65536,
            refcount_bits: 16,
            backing_file: Some("a.qcow2".into()),
            backing_format: Some(BackingFormat::Qcow2),
            journal: None,
        };
        // Copied from `qemu-img create -f qcow2 -b a.qcow2 -F qcow2 b.qcow2`.
        assert_eq!(
            formatting_line(Path::new("b.qcow2"), &opts, 1 << 20),
            "Formatting 'b.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=1048576 backing_file=a.qcow2 backing_fmt=qcow2 lazy_refcounts=off refcount_bits=16"
        );
    }
}
