//! `qj`: the qjournal command line, shaped like qemu-img and qemu-io.
//!
//! Every failure is one line on stderr, `qj: <what>: <why>`, with exit
//! status 2 for bad usage and 1 otherwise (`check` uses qemu-img's 0/1/2/3,
//! `io` exits 1 when a command failed or a pattern did not verify).

#![warn(missing_docs)]

mod chain;
mod cmd;
mod create_options;
mod error;
mod human;
mod listener;
mod output;
mod size;

use std::process::ExitCode;

use clap::Parser;
use qj_cli::nbd;

use crate::error::{one_line, EXIT_USAGE};

/// The allocator of the whole program: crash exploration allocates and
/// frees small buffers at a high rate on every thread (an image opened,
/// replayed, checked and closed per crash state), where mimalloc's
/// thread-local free lists cost less than glibc's malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// qcow2 images with crash-consistent metadata: create, inspect, check,
/// map, do I/O, convert, explore power-loss crashes, benchmark, serve over NBD.
#[derive(Debug, clap::Parser)]
#[command(name = "qj", version)]
struct Cli {
    #[command(subcommand)]
    command: cmd::Command,
}

/// Last resort: a bug must still give one line, not a backtrace. Errors are
/// handled as values everywhere; this only fires on a defect.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        // `qj ... | head`: the reader went away. Not a defect; end as a
        // program killed by SIGPIPE would (128 + 13), without a message.
        if what.starts_with("failed printing to stdout") && what.contains("Broken pipe") {
            std::process::exit(141);
        }
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("{}", one_line(&format!("qj: internal error{at}: {what}")));
    }));
}

/// A clap error as one line: help and version go to stdout untouched.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            ExitCode::SUCCESS
        }
        // `qj` alone: the help is the most useful answer, as a usage error.
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            ExitCode::from(EXIT_USAGE)
        }
        _ => {
            eprintln!("{} (see 'qj --help')", usage_line(&e.render().to_string()));
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Clap's message without its usage block, on one line: "a list:" lines
/// are joined to their items with a space, other lines with "; ".
fn usage_line(rendered: &str) -> String {
    let mut line = String::from("qj:");
    for part in rendered
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
    {
        let part = part.strip_prefix("error: ").unwrap_or(part);
        if !line.ends_with(':') {
            line.push(';');
        }
        line.push(' ');
        line.push_str(part);
    }
    line
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    match cli.command.run() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{}", e.line());
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let rendered = "error: the following required arguments were not provided:\n  <FILE>\n\nUsage: qj create <FILE> [SIZE]\n\nFor more information, try '--help'.\n";
        assert_eq!(
            usage_line(rendered),
            "qj: the following required arguments were not provided: <FILE>"
        );
        let rendered = "error: unrecognized subcommand 'inf'\n\n  tip: a similar subcommand exists: 'info'\n\nUsage: qj <COMMAND>\n";
        assert_eq!(
            usage_line(rendered),
            "qj: unrecognized subcommand 'inf'; tip: a similar subcommand exists: 'info'"
        );
    }

    #[test]
    fn command_line_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
