//! `qj io [-r] FILE -c CMD [-c CMD ...]`: guest I/O on an image, like
//! qemu-io. Commands run in order; one that fails prints why and the rest
//! still run (as in qemu-io); the exit status is 1 if any failed,
//! including a pattern that did not verify.

pub mod exec;
pub mod parse;

use std::io::Write;
use std::path::PathBuf;

use qj_engine::{Image, OpenOptions};

use crate::error::{engine, quoted, CliError, CliResult, EXIT_FAILED};
use exec::{execute, Outcome};
use parse::{parse_command, IoCommand, WriteFill};

/// Most `-c` commands in one run, so the run is bounded.
const COMMANDS_MAX: usize = 100_000;

/// Arguments of `qj io`.
#[derive(Debug, clap::Args)]
pub struct IoArgs {
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (only qcow2; accepted for qemu-io compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// A command to run (repeatable): read, write, discard, flush, abort,
    /// truncate, length, info, map, sleep.
    #[arg(short = 'c', long = "cmd", value_name = "COMMAND")]
    commands: Vec<String>,
    /// Open without taking or honouring image locks (read-only; what is
    /// read may be inconsistent while another process writes), like qemu-img.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Record every write, flush and length change reaching the image file
    /// in this dm-log-writes log (created or truncated), with a MARK entry
    /// after each command (`op N write 0x10000+4096`) and each journal
    /// commit (`txn N commit`). Replay it with `qj crash replay` on a copy
    /// of the image as it was before this run.
    #[arg(long = "log-writes", value_name = "LOG")]
    log_writes: Option<PathBuf>,
    /// Inject a deliberate engine bug (a mutation of `qj crash
    /// --list-mutations`), to prove a crash checker catches it. Never for
    /// real data.
    #[arg(long = "mutate", value_name = "MUTATION")]
    mutate: Option<String>,
    /// Cache mode, as qemu-io's -t: writeback, writethrough, none
    /// (O_DIRECT) or directsync.
    #[arg(short = 't', long = "cache", value_name = "MODE", default_value = "writeback",
          value_parser = crate::cmd::serve::parse_cache)]
    cache: qj_engine::CacheMode,
    /// The image.
    file: PathBuf,
}

/// The write-log label of command number `number`, for commands that can
/// change the image or make it durable (`op 17 write 0x10000+4096`).
fn op_label(number: usize, command: &IoCommand) -> Option<String> {
    let what = match *command {
        IoCommand::Write {
            offset,
            len,
            fill: WriteFill::Zeroes,
            ..
        } => format!("write-zeroes {offset:#x}+{len}"),
        IoCommand::Write { offset, len, .. } => format!("write {offset:#x}+{len}"),
        IoCommand::Discard { offset, len, .. } => format!("discard {offset:#x}+{len}"),
        IoCommand::Flush => "flush".to_string(),
        IoCommand::Truncate { size } => format!("truncate {size}"),
        IoCommand::Read { .. }
        | IoCommand::Abort
        | IoCommand::Length
        | IoCommand::Info
        | IoCommand::Map
        | IoCommand::Sleep { .. } => return None,
    };
    Some(format!("op {number} {what}"))
}

/// Runs `qj io`.
pub fn run(args: IoArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "io")?;
    if args.commands.is_empty() {
        return Err(CliError::Usage(
            "io: no commands given (add -c 'read -P 0 0 64k', for example)".into(),
        ));
    }
    if args.commands.len() > COMMANDS_MAX {
        return Err(CliError::Usage(format!(
            "io: more than {COMMANDS_MAX} commands"
        )));
    }
    if args.force_share && !args.read_only {
        return Err(CliError::Usage(
            "io: -U (force-share) can only be used with -r (read-only)".into(),
        ));
    }
    let mut opts = if args.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    opts.lock = crate::cmd::lock_mode(args.force_share);
    opts.cache = args.cache;
    opts.log_writes = args.log_writes.clone();
    if let Some(name) = &args.mutate {
        let (ordering, journal) = qj_model_checks::open_mutation(name).ok_or_else(|| {
            let valid: Vec<&str> = qj_model_checks::all_mutations()
                .into_iter()
                .map(|(_, m)| m)
                .filter(|m| qj_model_checks::open_mutation(m).is_some())
                .collect();
            CliError::Usage(format!(
                "io: {}",
                qj_model_checks::NameError::new("mutation", name, &valid)
            ))
        })?;
        opts.ordering_mutation = ordering;
        opts.journal_mutation = journal;
    }
    let path = &args.file;
    let image =
        Image::open_path(path, &opts).map_err(engine(format!("opening {}", quoted(path))))?;
    crate::cmd::warn_about_replay(&image, path);
    let mut failed = false;
    for (index, text) in args.commands.iter().enumerate() {
        let outcome = match parse_command(text) {
            Ok(command) => {
                let outcome = execute(&image, &command);
                if let Some(label) = op_label(index + 1, &command) {
                    image.mark(&label);
                }
                outcome
            }
            Err(why) => {
                eprintln!("{}", crate::error::one_line(&format!("qj: io: {why}")));
                Outcome::Failed
            }
        };
        match outcome {
            Outcome::Done => {}
            Outcome::Failed => failed = true,
            Outcome::Abort => {
                // Like a killed process: nothing more reaches the image
                // file, so what is on disk is exactly what the last
                // completed flush made durable (plus any data writes the
                // device happens to keep).
                // The status still reports commands that failed before.
                let _ = std::io::stdout().flush();
                image.abandon();
                std::process::exit(if failed { i32::from(EXIT_FAILED) } else { 0 });
            }
        }
    }
    // close() writes back cached metadata (read-write) so the file is
    // consistent and leak-free for the next user.
    image
        .close()
        .map_err(engine(format!("closing {}", quoted(path))))?;
    Ok(if failed { EXIT_FAILED } else { 0 })
}
