//! One `-c` command of `qj io`, parsed the way qemu-io parses its commands:
//! words split on white space, getopt-style flags (`-P 0xab`, `-P0xab`,
//! `-zq`), then positional offsets and lengths with k/M/G suffixes.

use crate::size::{parse_pattern, parse_size};

/// The byte qemu-io writes when `write` has no `-P`.
pub const WRITE_PATTERN_DEFAULT: u8 = 0xcd;

/// Words in one command: more is certainly a mistake, and the bound keeps
/// the parser's loops bounded.
const WORDS_MAX: usize = 64;

/// The command names, for the "unknown command" message.
pub const COMMAND_NAMES: &str =
    "read, write, discard (alias trim), flush, abort, truncate, length, info, map, sleep";

/// `read -P`: the pattern and the sub-range it applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verify {
    /// The byte every verified byte must equal.
    pub pattern: u8,
    /// Start of the verified range, relative to the read.
    pub offset: u64,
    /// Length of the verified range.
    pub len: u64,
}

/// What `write` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFill {
    /// Every byte equal to this pattern.
    Pattern(u8),
    /// Zeroes, written as a zero-write request (`-z`).
    Zeroes,
}

/// One parsed command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// `read [-P pat [-s off] [-l len]] [-v] [-q] OFF LEN`.
    Read {
        /// Guest offset.
        offset: u64,
        /// Bytes to read.
        len: u64,
        /// Pattern check, if `-P` was given.
        verify: Option<Verify>,
        /// `-v`: hex dump of what was read.
        dump: bool,
        /// `-q`: no result lines.
        quiet: bool,
    },
    /// `write [-P pat | -z] [-u] [-q] OFF LEN`.
    Write {
        /// Guest offset.
        offset: u64,
        /// Bytes to write.
        len: u64,
        /// What to write.
        fill: WriteFill,
        /// `-q`: no result lines.
        quiet: bool,
    },
    /// `discard [-q] OFF LEN` (alias `trim`).
    Discard {
        /// Guest offset.
        offset: u64,
        /// Bytes to discard.
        len: u64,
        /// `-q`: no result lines.
        quiet: bool,
    },
    /// `flush`.
    Flush,
    /// `abort`: end the process at once, writing nothing back.
    Abort,
    /// `truncate SIZE`: resize the virtual disk.
    Truncate {
        /// The new size in bytes.
        size: u64,
    },
    /// `length`: print the virtual size.
    Length,
    /// `info`: print the format details.
    Info,
    /// `map`: print allocated and unallocated ranges of this image.
    Map,
    /// `sleep MS`: wait, holding the image open (as qemu-io's `sleep`).
    Sleep {
        /// Milliseconds, at most [`SLEEP_MS_MAX`].
        ms: u64,
    },
}

/// The longest `sleep`: keeps a run bounded.
pub const SLEEP_MS_MAX: u64 = 600_000;

/// Flags and their values, in the order given, then the positionals.
struct Words<'a> {
    flags: Vec<(char, Option<&'a str>)>,
    positional: Vec<&'a str>,
}

/// getopt over `args` with the flags that take a value listed in
/// `with_value` and the ones that do not in `plain`.
fn getopt<'a>(
    name: &str,
    args: &[&'a str],
    with_value: &str,
    plain: &str,
) -> Result<Words<'a>, String> {
    let mut flags = Vec::new();
    let mut positional = Vec::new();
    let mut i = 0;
    // Bounded: `i` grows every round, and args has at most WORDS_MAX words.
    while i < args.len() {
        let word = args[i];
        i += 1;
        let Some(cluster) = word.strip_prefix('-').filter(|c| !c.is_empty()) else {
            positional.push(word);
            continue;
        };
        for (at, flag) in cluster.char_indices() {
            if with_value.contains(flag) {
                let attached = &cluster[at + flag.len_utf8()..];
                let value = if !attached.is_empty() {
                    attached
                } else if let Some(next) = args.get(i) {
                    i += 1;
                    next
                } else {
                    return Err(format!("{name}: option -{flag} needs a value"));
                };
                flags.push((flag, Some(value)));
                break;
            } else if plain.contains(flag) {
                flags.push((flag, None));
            } else {
                return Err(format!("{name}: invalid option -- '{flag}'"));
            }
        }
    }
    Ok(Words { flags, positional })
}

fn size_arg(name: &str, what: &str, text: &str) -> Result<u64, String> {
    parse_size(text).map_err(|e| format!("{name}: bad {what}: {e}"))
}

/// `OFF LEN` positionals.
fn offset_len(name: &str, usage: &str, positional: &[&str]) -> Result<(u64, u64), String> {
    match positional {
        [offset, len] => Ok((
            size_arg(name, "offset", offset)?,
            size_arg(name, "length", len)?,
        )),
        _ => Err(format!(
            "{name}: expected 2 arguments, got {} (usage: {usage})",
            positional.len()
        )),
    }
}

fn no_arguments(name: &str, words: &[&str], command: IoCommand) -> Result<IoCommand, String> {
    if words.is_empty() {
        Ok(command)
    } else {
        Err(format!("{name}: takes no arguments"))
    }
}

fn value_of<'a>(words: &Words<'a>, flag: char) -> Option<&'a str> {
    words
        .flags
        .iter()
        .rev()
        .find(|(f, _)| *f == flag)
        .and_then(|(_, v)| *v)
}

fn has(words: &Words<'_>, flag: char) -> bool {
    words.flags.iter().any(|(f, _)| *f == flag)
}

fn parse_read(args: &[&str]) -> Result<IoCommand, String> {
    const USAGE: &str = "read [-P pat [-s off] [-l len]] [-v] [-q] OFF LEN";
    let w = getopt("read", args, "Psl", "vq")?;
    let (offset, len) = offset_len("read", USAGE, &w.positional)?;
    let sub_offset = value_of(&w, 's')
        .map(|s| size_arg("read", "-s offset", s))
        .transpose()?;
    let sub_len = value_of(&w, 'l')
        .map(|s| size_arg("read", "-l length", s))
        .transpose()?;
    let verify = match value_of(&w, 'P') {
        None => {
            if sub_offset.is_some() || sub_len.is_some() {
                return Err("read: -s and -l need -P".into());
            }
            None
        }
        Some(p) => {
            let pattern = parse_pattern(p).map_err(|e| format!("read: {e}"))?;
            let v_offset = sub_offset.unwrap_or(0);
            let v_len = match sub_len {
                Some(l) => l,
                None => len.checked_sub(v_offset).ok_or_else(|| {
                    "read: pattern verification range exceeds end of read data".to_string()
                })?,
            };
            if !matches!(v_offset.checked_add(v_len), Some(end) if end <= len) {
                return Err("read: pattern verification range exceeds end of read data".into());
            }
            Some(Verify {
                pattern,
                offset: v_offset,
                len: v_len,
            })
        }
    };
    Ok(IoCommand::Read {
        offset,
        len,
        verify,
        dump: has(&w, 'v'),
        quiet: has(&w, 'q'),
    })
}

fn parse_write(args: &[&str]) -> Result<IoCommand, String> {
    const USAGE: &str = "write [-P pat | -z] [-u] [-q] OFF LEN";
    let w = getopt("write", args, "P", "zuq")?;
    let (offset, len) = offset_len("write", USAGE, &w.positional)?;
    let fill = match (value_of(&w, 'P'), has(&w, 'z')) {
        (Some(_), true) => return Err("write: -P and -z cannot be given together".into()),
        (Some(p), false) => {
            WriteFill::Pattern(parse_pattern(p).map_err(|e| format!("write: {e}"))?)
        }
        (None, true) => WriteFill::Zeroes,
        (None, false) => WriteFill::Pattern(WRITE_PATTERN_DEFAULT),
    };
    if has(&w, 'u') && fill != WriteFill::Zeroes {
        return Err("write: -u needs -z".into());
    }
    Ok(IoCommand::Write {
        offset,
        len,
        fill,
        quiet: has(&w, 'q'),
    })
}

/// Parses one command line.
pub fn parse_command(line: &str) -> Result<IoCommand, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.len() > WORDS_MAX {
        return Err(format!("command has more than {WORDS_MAX} words"));
    }
    let Some((&name, args)) = words.split_first() else {
        return Err("empty command".into());
    };
    match name {
        "read" | "r" => parse_read(args),
        "write" | "w" => parse_write(args),
        "discard" | "trim" | "d" => {
            let w = getopt(name, args, "", "q")?;
            let (offset, len) = offset_len(name, "discard [-q] OFF LEN", &w.positional)?;
            Ok(IoCommand::Discard {
                offset,
                len,
                quiet: has(&w, 'q'),
            })
        }
        "flush" | "f" => no_arguments(name, args, IoCommand::Flush),
        "abort" => no_arguments(name, args, IoCommand::Abort),
        "truncate" | "t" => match args {
            [size] => Ok(IoCommand::Truncate {
                size: size_arg(name, "size", size)?,
            }),
            _ => Err(format!(
                "{name}: expected 1 argument (usage: truncate SIZE)"
            )),
        },
        "length" | "l" => no_arguments(name, args, IoCommand::Length),
        "info" | "i" => no_arguments(name, args, IoCommand::Info),
        "map" => no_arguments(name, args, IoCommand::Map),
        "sleep" => match args {
            [ms] => match ms.parse::<u64>() {
                Ok(ms) if ms <= SLEEP_MS_MAX => Ok(IoCommand::Sleep { ms }),
                _ => Err(format!(
                    "{name}: '{ms}' is not a number of milliseconds up to {SLEEP_MS_MAX}"
                )),
            },
            _ => Err(format!("{name}: expected 1 argument (usage: sleep MS)")),
        },
        other => Err(format!(
            "unknown command '{other}'; commands are: {COMMAND_NAMES}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_with_pattern_and_subrange() {
        assert_eq!(
            parse_command("read -P 0xab -s 4k -l 4k 64k 64k"),
            Ok(IoCommand::Read {
                offset: 65536,
                len: 65536,
                verify: Some(Verify {
                    pattern: 0xab,
                    offset: 4096,
                    len: 4096
                }),
                dump: false,
                quiet: false,
            })
        );
        assert_eq!(
            parse_command("read -P0xab -vq 0 512"),
            Ok(IoCommand::Read {
                offset: 0,
                len: 512,
                verify: Some(Verify {
                    pattern: 0xab,
                    offset: 0,
                    len: 512
                }),
                dump: true,
                quiet: true,
            })
        );
    }

    #[test]
    fn write_variants() {
        assert_eq!(
            parse_command("write -P 0xab 0 64k"),
            Ok(IoCommand::Write {
                offset: 0,
                len: 65536,
                fill: WriteFill::Pattern(0xab),
                quiet: false
            })
        );
        assert_eq!(
            parse_command("write -z 0 64k"),
            Ok(IoCommand::Write {
                offset: 0,
                len: 65536,
                fill: WriteFill::Zeroes,
                quiet: false
            })
        );
        assert_eq!(
            parse_command("write 1M 4k"),
            Ok(IoCommand::Write {
                offset: 1 << 20,
                len: 4096,
                fill: WriteFill::Pattern(WRITE_PATTERN_DEFAULT),
                quiet: false
            })
        );
        assert!(parse_command("write -z -P 1 0 4k").is_err());
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            parse_command("trim 0 64k"),
            Ok(IoCommand::Discard {
                offset: 0,
                len: 65536,
                quiet: false
            })
        );
        assert_eq!(parse_command("flush"), Ok(IoCommand::Flush));
        assert_eq!(parse_command("  abort  "), Ok(IoCommand::Abort));
        assert_eq!(
            parse_command("truncate 2M"),
            Ok(IoCommand::Truncate { size: 2 << 20 })
        );
        assert_eq!(parse_command("length"), Ok(IoCommand::Length));
        assert_eq!(parse_command("info"), Ok(IoCommand::Info));
        assert_eq!(parse_command("map"), Ok(IoCommand::Map));
    }

    #[test]
    fn errors_are_named() {
        let e = parse_command("frob 1 2").unwrap_err();
        assert!(e.contains("'frob'") && e.contains("read, write"), "{e}");
        assert!(parse_command("read 0").unwrap_err().contains("expected 2"));
        assert!(parse_command("read 0 12Q").unwrap_err().contains("12Q"));
        assert!(parse_command("read -x 0 1").unwrap_err().contains("'x'"));
        assert!(parse_command("read -P")
            .unwrap_err()
            .contains("needs a value"));
        assert!(parse_command("read -P 1 -s 8k 0 4k")
            .unwrap_err()
            .contains("exceeds"));
        assert!(parse_command("read -P 1 -l 8k 0 4k")
            .unwrap_err()
            .contains("exceeds"));
        assert!(parse_command("read -s 1 0 4k").unwrap_err().contains("-P"));
        assert!(parse_command("read -P 256 0 4k").is_err());
        assert!(parse_command("flush now").is_err());
        assert!(parse_command("").is_err());
    }
}
