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
use parse::parse_command;

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
    /// truncate, length, info, map.
    #[arg(short = 'c', long = "cmd", value_name = "COMMAND")]
    commands: Vec<String>,
    /// The image.
    file: PathBuf,
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
    let opts = if args.read_only {
        OpenOptions::read_only()
    } else {
        OpenOptions::read_write()
    };
    let path = &args.file;
    let image =
        Image::open_path(path, &opts).map_err(engine(format!("opening {}", quoted(path))))?;
    crate::cmd::warn_about_replay(&image, path);
    let mut failed = false;
    for text in &args.commands {
        let outcome = match parse_command(text) {
            Ok(command) => execute(&image, &command),
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
