//! Runs parsed `qj io` commands against an open image and prints qemu-io's
//! result lines.

/// Prints a line to stdout, ignoring a reader that went away (`qj io ... |
/// head -1`): like qemu-io, every command still runs, so that later
/// writes and flushes are not lost with the pipe.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// [`out!`] without the newline.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

use std::time::Instant;

use qj_engine::Image;

use super::parse::{IoCommand, Verify, WriteFill};
use crate::chain::top_allocation;
use crate::human::{cvtstr, size_to_str, timing_line};

/// Bytes moved per engine request: bounds memory for any request length.
const CHUNK_BYTES: u64 = 1 << 20;

/// What the caller must do after a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// The command succeeded; go on.
    Done,
    /// The command failed (message already printed); go on, exit 1 later.
    Failed,
    /// `abort`: end the process now, writing nothing back.
    Abort,
}

/// qemu-io's hex dump (`read -v`): 16 bytes a line, `isalnum` shown.
fn dump(bytes: &[u8], offset: u64) {
    for (i, line) in bytes.chunks(16).enumerate() {
        let mut s = format!("{:08x}:  ", offset + i as u64 * 16);
        for b in line {
            s.push_str(&format!("{b:02x} "));
        }
        s.push(' ');
        for &b in line {
            s.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out!("{s}");
    }
}

fn report(verb: &str, len: u64, offset: u64, started: Instant) {
    out!("{verb} {len}/{len} bytes at offset {offset}");
    out!("{}", timing_line(len, 1, started.elapsed().as_secs_f64()));
}

fn fail(what: &str, why: impl std::fmt::Display) -> Outcome {
    eprintln!(
        "{}",
        crate::error::one_line(&format!("qj: io: {what}: {why}"))
    );
    Outcome::Failed
}

/// Reads `[offset, offset + len)` chunk by chunk; returns whether the
/// pattern (if any) matched over its whole range.
fn read(
    image: &Image,
    offset: u64,
    len: u64,
    verify: Option<Verify>,
    show_dump: bool,
) -> Result<bool, qj_engine::Error> {
    check_range(image, offset, len)?;
    let mut matched = true;
    let mut buf = vec![0u8; len.min(CHUNK_BYTES) as usize];
    let mut done = 0u64;
    // Bounded: `done` advances by a positive chunk each round.
    while done < len {
        let n = (len - done).min(CHUNK_BYTES);
        let chunk = &mut buf[..n as usize];
        image.read(chunk, offset + done)?;
        if let Some(v) = verify {
            let (from, to) = (v.offset.max(done), (v.offset + v.len).min(done + n));
            if from < to {
                let part = &chunk[(from - done) as usize..(to - done) as usize];
                matched &= part.iter().all(|&b| b == v.pattern);
            }
        }
        if show_dump {
            dump(chunk, offset + done);
        }
        done += n;
    }
    Ok(matched)
}

fn write_pattern(
    image: &Image,
    offset: u64,
    len: u64,
    pattern: u8,
) -> Result<(), qj_engine::Error> {
    check_range(image, offset, len)?;
    let buf = vec![pattern; len.min(CHUNK_BYTES) as usize];
    let mut done = 0u64;
    // Bounded: `done` advances by a positive chunk each round.
    while done < len {
        let n = (len - done).min(CHUNK_BYTES);
        image.write(&buf[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

/// qemu-io's `info`: format name, cluster size, VM state offset, and the
/// format-specific block of `qj info`.
fn info(image: &Image) -> Result<(), qj_engine::Error> {
    let i = image.info()?;
    let g = image.geometry();
    out!("format name: qcow2");
    out!("cluster size: {}", size_to_str(i.cluster_size));
    // Where QEMU would put VM state: just past the guest clusters the L1
    // table must cover.
    let vm_state = g
        .l1_entries_for(i.virtual_size)
        .saturating_mul(g.l2_coverage());
    out!("vm state offset: {}", size_to_str(vm_state));
    let data = crate::cmd::info::Qcow2Specific {
        compat: if i.version >= 3 { "1.1" } else { "0.10" },
        compression_type: "zlib".into(),
        lazy_refcounts: (i.version >= 3).then_some(
            i.compatible_features & qj_spec::qcow2::features::COMPAT_LAZY_REFCOUNTS_MASK != 0,
        ),
        refcount_bits: i.refcount_bits,
        corrupt: (i.version >= 3).then_some(i.corrupt),
        extended_l2: (i.version >= 3).then_some(false),
        bitmaps: (!i.bitmaps.is_empty()).then(|| {
            i.bitmaps
                .iter()
                .map(crate::cmd::info::BitmapJson::from)
                .collect()
        }),
    };
    out_raw!("{}", crate::cmd::info::format_specific_lines(&data));
    Ok(())
}

/// qemu-io's `map`: runs of this image's allocation (backing files not
/// consulted).
fn map(image: &Image) -> Result<(), crate::error::CliError> {
    for (start, len, allocated) in top_allocation(image)? {
        out!(
            "{:<6} (0x{len:x}) bytes {} allocated at offset {} (0x{start:x})",
            cvtstr(len as f64),
            if allocated { "   " } else { "not" },
            cvtstr(start as f64),
        );
    }
    Ok(())
}

/// The engine's range error for the whole request, so that a long
/// request (moved in chunks) is reported as the user wrote it.
fn check_range(image: &Image, offset: u64, len: u64) -> Result<(), qj_engine::Error> {
    let size = image.virtual_size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(qj_engine::Error::OutOfRange { offset, len, size }),
    }
}

/// Runs one command.
pub fn execute(image: &Image, command: &IoCommand) -> Outcome {
    let started = Instant::now();
    match *command {
        IoCommand::Read {
            offset,
            len,
            verify,
            dump,
            quiet,
        } => match read(image, offset, len, verify, dump && !quiet) {
            Err(e) => fail("read failed", e),
            Ok(matched) => {
                if !matched {
                    if let Some(v) = verify {
                        out!(
                            "Pattern verification failed at offset {}, {} bytes",
                            offset + v.offset,
                            v.len
                        );
                    }
                }
                if !quiet {
                    report("read", len, offset, started);
                }
                if matched {
                    Outcome::Done
                } else {
                    Outcome::Failed
                }
            }
        },
        IoCommand::Write {
            offset,
            len,
            fill,
            quiet,
        } => {
            let result = match fill {
                WriteFill::Pattern(p) => write_pattern(image, offset, len, p),
                WriteFill::Zeroes => image.write_zeroes(offset, len),
            };
            match result {
                Err(e) => fail("write failed", e),
                Ok(()) => {
                    if !quiet {
                        report("wrote", len, offset, started);
                    }
                    Outcome::Done
                }
            }
        }
        IoCommand::Discard { offset, len, quiet } => match image.discard(offset, len) {
            Err(e) => fail("discard failed", e),
            Ok(()) => {
                if !quiet {
                    report("discard", len, offset, started);
                }
                Outcome::Done
            }
        },
        IoCommand::Flush => match image.flush() {
            Err(e) => fail("flush failed", e),
            Ok(()) => Outcome::Done,
        },
        IoCommand::Abort => Outcome::Abort,
        IoCommand::Truncate { size } => match image.resize(size) {
            Err(e) => fail("truncate failed", e),
            Ok(()) => Outcome::Done,
        },
        IoCommand::Length => {
            out!("{}", size_to_str(image.virtual_size()));
            Outcome::Done
        }
        IoCommand::Info => match info(image) {
            Err(e) => fail("info failed", e),
            Ok(()) => Outcome::Done,
        },
        IoCommand::Map => match map(image) {
            Err(e) => fail("map failed", e),
            Ok(()) => Outcome::Done,
        },
        IoCommand::Sleep { ms } => {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Outcome::Done
        }
    }
}
