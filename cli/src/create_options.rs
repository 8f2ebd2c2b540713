//! The `-o key=value,...` list of `qj create` (and later `qj amend`), as
//! qemu-img reads it: keys separated by commas, a literal comma in a value
//! written `,,`, later keys overriding earlier ones.
//!
//! Every key is one row of [`KEYS`]; a new option is one new row (and a
//! field in [`CreateOptionList`]). Keys of features still to come are listed
//! in [`NOT_YET`] so that users get "not supported yet" rather than "unknown".

use crate::error::CliError;
use crate::size::parse_size;

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
];

/// Keys of features still to be built: recognised, refused clearly.
const NOT_YET: &[(&str, &str)] = &[
    ("journal", "the metadata journal (issue 5)"),
    ("journal_size", "the metadata journal (issue 5)"),
    ("commit", "journal commit modes (issue 5)"),
];

/// The names of the supported keys, for error messages.
fn key_names() -> String {
    KEYS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
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
pub fn help_text() -> String {
    let mut text = String::from("Supported options:\n");
    for key in KEYS {
        text.push_str(&format!("  {:<17}- {}\n", key.name, key.help));
    }
    for (name, what) in NOT_YET {
        text.push_str(&format!("  {name:<17}- not supported yet: {what}\n"));
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
/// key and listing the valid ones.
pub fn apply_list(list: &str, options: &mut CreateOptionList) -> Result<(), CliError> {
    for item in split_list(list) {
        if item.is_empty() {
            continue;
        }
        let (name, value) = item.split_once('=').ok_or_else(|| {
            CliError::Usage(format!("-o option '{item}' needs a value (key=value)"))
        })?;
        if let Some((_, what)) = NOT_YET.iter().find(|(n, _)| *n == name) {
            return Err(CliError::Usage(format!(
                "-o option '{name}' is not supported yet: {what}"
            )));
        }
        let key = KEYS.iter().find(|k| k.name == name).ok_or_else(|| {
            CliError::Usage(format!(
                "invalid -o option '{name}'; valid options are: {}",
                key_names()
            ))
        })?;
        (key.apply)(options, value).map_err(|why| {
            CliError::Usage(format!("invalid value for -o option '{name}': {why}"))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(list: &str) -> Result<CreateOptionList, CliError> {
        let mut o = CreateOptionList::default();
        apply_list(list, &mut o)?;
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
    fn future_keys_are_not_supported_yet() {
        for key in ["journal=on", "journal_size=1M", "commit=draft"] {
            let e = parse(key).unwrap_err().to_string();
            assert!(e.contains("not supported yet"), "{e}");
        }
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
        assert!(help_text().contains("cluster_size"));
    }
}
