//! The `-o key=value,...` list of `qj create` and `qj amend`, as qemu-img
//! reads it: keys separated by commas, a literal comma in a value written
//! `,,`, later keys overriding earlier ones.
//!
//! Every key is one row of [`KEYS`]; a new option is one new row (and a
//! field in [`CreateOptionList`]). `qj amend` accepts only [`AMEND_KEYS`].

use qj_engine::JournalConfig;

use crate::error::CliError;
use crate::size::parse_size;

/// How journal transactions are committed (`commit=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// One flush per commit: the commit block carries a checksum of the
    /// whole transaction, so a torn commit is detected at replay.
    SingleFlush,
    /// The 2013 draft's protocol: flush the transaction, then write and
    /// flush its commit block.
    Draft,
}

/// The `commit=` values, for error messages.
const COMMIT_VALUES: &str = "single-flush, draft";

/// Smallest journal the engine formats: 16 blocks of 512 bytes.
pub const JOURNAL_SIZE_MIN_BYTES: u64 = 16 * 512;
/// Largest journal the engine formats (its offsets are 32-bit).
pub const JOURNAL_SIZE_MAX_BYTES: u64 = 1 << 32;

/// The options given with `-o`, each `None` when not given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateOptionList {
    /// `size`: virtual size in bytes.
    pub size: Option<u64>,
    /// `cluster_size`: cluster size in bytes.
    pub cluster_size: Option<u64>,
    /// `refcount_bits`: refcount width.
    pub refcount_bits: Option<u32>,
    /// `backing_file`: backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// `backing_fmt`: backing file format name.
    pub backing_fmt: Option<String>,
    /// `journal`: on (true) or off (false).
    pub journal: Option<bool>,
    /// `journal_size`: journal region size in bytes.
    pub journal_size: Option<u64>,
    /// `commit`: the journal's commit protocol.
    pub commit: Option<CommitMode>,
    /// `log_data`: carry small writes into fresh clusters in the journal.
    pub log_data: Option<bool>,
    /// `dedup`: deduplicate whole-cluster writes (journal images only).
    pub dedup: Option<bool>,
}

/// An `on`/`off` value.
fn on_off(v: &str) -> Result<bool, String> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{v}' is not valid; valid values are: on, off")),
    }
}

/// One `-o` key: its name, its help line, and how it sets the list.
struct Key {
    name: &'static str,
    help: &'static str,
    apply: fn(&mut CreateOptionList, &str) -> Result<(), String>,
}

/// Values QEMU accepts for a key whose only supported setting here is
/// QEMU's default (we always write that layout, so the key is harmless).
fn only(value: &str, allowed: &[&str], what: &str) -> Result<(), String> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(format!("{what}; '{value}' is not supported"))
    }
}

const KEYS: &[Key] = &[
    Key {
        name: "size",
        help: "virtual disk size (k, M, G, T suffixes)",
        apply: |o, v| {
            o.size = Some(parse_size(v).map_err(|e| e.to_string())?);
            Ok(())
        },
    },
    Key {
        name: "cluster_size",
        help: "qcow2 cluster size, a power of two from 512 to 2M (default 64k)",
        apply: |o, v| {
            o.cluster_size = Some(parse_size(v).map_err(|e| e.to_string())?);
            Ok(())
        },
    },
    Key {
        name: "refcount_bits",
        help: "width of a reference count: 1, 2, 4, 8, 16, 32 or 64 (default 16)",
        apply: |o, v| {
            let bits = v
                .parse()
                .map_err(|_| format!("'{v}' is not a number of bits"))?;
            o.refcount_bits = Some(bits);
            Ok(())
        },
    },
    Key {
        name: "backing_file",
        help: "file name of the backing image (same as -b)",
        apply: |o, v| {
            o.backing_file = Some(v.to_string());
            Ok(())
        },
    },
    Key {
        name: "backing_fmt",
        help: "format of the backing image, qcow2 or raw (same as -F)",
        apply: |o, v| {
            o.backing_fmt = Some(v.to_string());
            Ok(())
        },
    },
    Key {
        name: "compat",
        help: "qcow2 version: 1.1 (v3) only",
        apply: |_, v| only(v, &["1.1", "v3"], "only compat=1.1 (qcow2 v3) is written"),
    },
    Key {
        name: "lazy_refcounts",
        help: "off only",
        apply: |_, v| only(v, &["off"], "lazy refcounts are not implemented"),
    },
    Key {
        name: "extended_l2",
        help: "off only",
        apply: |_, v| only(v, &["off"], "extended L2 entries are not implemented"),
    },
    Key {
        name: "compression_type",
        help: "zlib only",
        apply: |_, v| only(v, &["zlib"], "only zlib compression is implemented"),
    },
    Key {
        name: "preallocation",
        help: "off only",
        apply: |_, v| only(v, &["off"], "preallocation is not implemented"),
    },
    Key {
        name: "journal",
        help: "metadata journal instead of flush ordering: on or off (default off)",
        apply: |o, v| {
            o.journal = Some(on_off(v)?);
            Ok(())
        },
    },
    Key {
        name: "journal_size",
        help: "size of the journal, at least 8 clusters + 64k (576k with 64k clusters) and at most 4G (default 16M; needs journal=on)",
        apply: |o, v| {
            let size = parse_size(v).map_err(|e| e.to_string())?;
            if !(JOURNAL_SIZE_MIN_BYTES..=JOURNAL_SIZE_MAX_BYTES).contains(&size) {
                return Err(format!(
                    "'{v}' is not valid; the journal size must be from 8k to 4G"
                ));
            }
            o.journal_size = Some(size);
            Ok(())
        },
    },
    Key {
        name: "commit",
        help: "journal commit protocol: single-flush or draft (two flushes; needs journal=on)",
        apply: |o, v| {
            o.commit = Some(match v {
                "single-flush" => CommitMode::SingleFlush,
                "draft" => CommitMode::Draft,
                _ => {
                    return Err(format!(
                        "'{v}' is not valid; valid values are: {COMMIT_VALUES}"
                    ))
                }
            });
            Ok(())
        },
    },
    Key {
        name: "log_data",
        help: "carry small writes into fresh clusters in the journal transaction (logged data): on or off (default off; needs journal=on)",
        apply: |o, v| {
            o.log_data = Some(on_off(v)?);
            Ok(())
        },
    },
    Key {
        name: "dedup",
        help: "deduplicate whole-cluster writes (SHA-256 index kept through the journal): on or off (default off; needs journal=on)",
        apply: |o, v| {
            o.dedup = Some(on_off(v)?);
            Ok(())
        },
    },
];

/// The keys `qj amend` can change; the others describe a layout fixed at
/// creation.
pub const AMEND_KEYS: &[&str] = &["journal", "journal_size", "commit", "log_data", "dedup"];

/// Which command reads the list: it decides the valid keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListFor {
    /// `qj create`: every key.
    Create,
    /// `qj amend`: [`AMEND_KEYS`] only.
    Amend,
}

impl ListFor {
    fn allows(self, name: &str) -> bool {
        match self {
            ListFor::Create => true,
            ListFor::Amend => AMEND_KEYS.contains(&name),
        }
    }
}

/// The names of the keys valid for `command`, for error messages.
fn key_names(command: ListFor) -> String {
    KEYS.iter()
        .map(|k| k.name)
        .filter(|n| command.allows(n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether an `-o` list asks for the key list (`-o help` or `-o ?`).
#[must_use]
pub fn wants_help(list: &str) -> bool {
    split_list(list)
        .iter()
        .any(|item| item == "help" || item == "?")
}

/// The `-o help` text: one key per line with its meaning.
#[must_use]
pub fn help_text(command: ListFor) -> String {
    let mut text = String::from("Supported options:\n");
    for key in KEYS.iter().filter(|k| command.allows(k.name)) {
        text.push_str(&format!("  {:<17}- {}\n", key.name, key.help));
    }
    text
}

/// Splits on single commas; `,,` is a literal comma.
fn split_list(list: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                items.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    items.push(current);
    items
}

/// Applies one `-o` list to `options`. Errors are usage errors naming the
/// key and listing the valid ones for `command`.
pub fn apply_list(
    list: &str,
    options: &mut CreateOptionList,
    command: ListFor,
) -> Result<(), CliError> {
    for item in split_list(list) {
        if item.is_empty() {
            continue;
        }
        let (name, value) = item.split_once('=').ok_or_else(|| {
            CliError::Usage(format!("-o option '{item}' needs a value (key=value)"))
        })?;
        let key = KEYS
            .iter()
            .find(|k| k.name == name && command.allows(k.name))
            .ok_or_else(|| {
                CliError::Usage(format!(
                    "invalid -o option '{name}'; valid options are: {}",
                    key_names(command)
                ))
            })?;
        (key.apply)(options, value).map_err(|why| {
            CliError::Usage(format!("invalid value for -o option '{name}': {why}"))
        })?;
    }
    Ok(())
}

impl CreateOptionList {
    /// The journal the options ask for: `None` without `journal=on`.
    /// `journal_size` or `commit` without `journal=on` is an error rather
    /// than silently ignored.
    pub fn journal_config(&self) -> Result<Option<JournalConfig>, CliError> {
        if self.journal != Some(true) {
            for (name, given) in [
                ("journal_size", self.journal_size.is_some()),
                ("commit", self.commit.is_some()),
                ("log_data", self.log_data.is_some()),
                ("dedup", self.dedup == Some(true)),
            ] {
                if given {
                    return Err(CliError::Usage(format!(
                        "-o option '{name}' needs journal=on"
                    )));
                }
            }
            return Ok(None);
        }
        let defaults = JournalConfig::default();
        Ok(Some(JournalConfig {
            size_bytes: self.journal_size.unwrap_or(defaults.size_bytes),
            two_flush: match self.commit {
                Some(CommitMode::Draft) => true,
                Some(CommitMode::SingleFlush) => false,
                None => defaults.two_flush,
            },
            log_data: self.log_data.unwrap_or(defaults.log_data),
            dedup: self.dedup.unwrap_or(defaults.dedup),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &str) -> Result<CreateOptionList, CliError> {
        let mut o = CreateOptionList::default();
        apply_list(list, &mut o, ListFor::Create)?;
        Ok(o)
    }

    #[test]
    fn known_keys_fill_the_struct() {
        let o = parse("cluster_size=4k,refcount_bits=8,backing_file=a,,b.qcow2,backing_fmt=qcow2,size=1M,compat=1.1")
            .unwrap();
        assert_eq!(o.cluster_size, Some(4096));
        assert_eq!(o.refcount_bits, Some(8));
        assert_eq!(o.backing_file.as_deref(), Some("a,b.qcow2"));
        assert_eq!(o.backing_fmt.as_deref(), Some("qcow2"));
        assert_eq!(o.size, Some(1 << 20));
    }

    #[test]
    fn later_keys_override_earlier_ones() {
        let o = parse("cluster_size=4k,cluster_size=8k").unwrap();
        assert_eq!(o.cluster_size, Some(8192));
    }

    #[test]
    fn unknown_key_lists_the_valid_ones() {
        let e = parse("foo=bar").unwrap_err().to_string();
        assert!(e.contains("'foo'"), "{e}");
        assert!(
            e.contains("cluster_size") && e.contains("refcount_bits"),
            "{e}"
        );
    }

    #[test]
    fn journal_keys_make_a_config() {
        assert_eq!(parse("").unwrap().journal_config().unwrap(), None);
        assert_eq!(
            parse("journal=off").unwrap().journal_config().unwrap(),
            None
        );
        assert_eq!(
            parse("journal=on").unwrap().journal_config().unwrap(),
            Some(JournalConfig {
                size_bytes: 16 << 20,
                two_flush: false,
                log_data: false,
                dedup: false
            })
        );
        assert_eq!(
            parse("journal=on,journal_size=1M,commit=draft")
                .unwrap()
                .journal_config()
                .unwrap(),
            Some(JournalConfig {
                size_bytes: 1 << 20,
                two_flush: true,
                log_data: false,
                dedup: false
            })
        );
        assert_eq!(
            parse("journal=on,log_data=on")
                .unwrap()
                .journal_config()
                .unwrap()
                .map(|j| j.log_data),
            Some(true)
        );
        assert_eq!(
            parse("commit=draft,journal=on,commit=single-flush")
                .unwrap()
                .journal_config()
                .unwrap(),
            Some(JournalConfig {
                size_bytes: 16 << 20,
                two_flush: false,
                log_data: false,
                dedup: false
            })
        );
    }

    #[test]
    fn journal_details_need_journal_on() {
        for list in [
            "journal_size=1M",
            "commit=draft",
            "journal=off,commit=draft",
            "log_data=on",
            "dedup=on",
            "journal=off,dedup=on",
        ] {
            let e = parse(list)
                .unwrap()
                .journal_config()
                .unwrap_err()
                .to_string();
            assert!(e.contains("needs journal=on"), "{list}: {e}");
        }
    }

    #[test]
    fn bad_journal_values_list_the_valid_ones() {
        let e = parse("journal=yes").unwrap_err().to_string();
        assert!(e.contains("'yes'") && e.contains("on, off"), "{e}");
        let e = parse("commit=fast").unwrap_err().to_string();
        assert!(
            e.contains("'fast'") && e.contains("single-flush, draft"),
            "{e}"
        );
        let e = parse("journal_size=4k").unwrap_err().to_string();
        assert!(e.contains("journal_size") && e.contains("8k to 4G"), "{e}");
        let e = parse("journal_size=5G").unwrap_err().to_string();
        assert!(e.contains("8k to 4G"), "{e}");
        assert_eq!(parse("journal_size=8k").unwrap().journal_size, Some(8192));
    }

    #[test]
    fn amend_accepts_only_journal_keys() {
        let mut o = CreateOptionList::default();
        apply_list("journal=on,commit=draft", &mut o, ListFor::Amend).unwrap();
        assert_eq!(o.journal, Some(true));
        let e = apply_list("cluster_size=4k", &mut o, ListFor::Amend)
            .unwrap_err()
            .to_string();
        assert!(e.contains("'cluster_size'"), "{e}");
        assert!(e.contains("journal, journal_size, commit"), "{e}");
        assert!(!help_text(ListFor::Amend).contains("cluster_size"));
        assert!(help_text(ListFor::Amend).contains("journal_size"));
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse("cluster_size=12Q").unwrap_err().to_string();
        assert!(e.contains("cluster_size") && e.contains("12Q"), "{e}");
        let e = parse("refcount_bits=x").unwrap_err().to_string();
        assert!(e.contains("refcount_bits"), "{e}");
        let e = parse("lazy_refcounts=on").unwrap_err().to_string();
        assert!(e.contains("lazy refcounts"), "{e}");
        let e = parse("cluster_size").unwrap_err().to_string();
        assert!(e.contains("needs a value"), "{e}");
    }

    #[test]
    fn help_is_recognised() {
        assert!(wants_help("help"));
        assert!(wants_help("cluster_size=4k,?"));
        assert!(!wants_help("cluster_size=4k"));
        assert!(help_text(ListFor::Create).contains("cluster_size"));
        assert!(help_text(ListFor::Create).contains("journal"));
    }
}
