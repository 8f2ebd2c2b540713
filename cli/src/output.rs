//! `--output human|json`, and JSON printed the way qemu-img prints it
//! (pretty, four-space indent) so that scripts written for one read both.

use serde::Serialize;

use crate::error::{CliError, CliResult};

/// The `--output` choices, as qemu-img names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    #[default]
    Human,
    /// One JSON document on stdout.
    Json,
}

/// `value` as pretty JSON with a four-space indent, without a trailing
/// newline.
pub fn to_json(value: &impl Serialize) -> CliResult<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    value
        .serialize(&mut serializer)
        .map_err(|e| CliError::failed("encoding JSON", e.to_string()))?;
    String::from_utf8(out).map_err(|e| CliError::failed("encoding JSON", e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_uses_qemu_indent() {
        #[derive(Serialize)]
        struct Sample {
            #[serde(rename = "virtual-size")]
            virtual_size: u64,
        }
        let text = to_json(&Sample { virtual_size: 5 }).unwrap();
        assert_eq!(text, "{\n    \"virtual-size\": 5\n}");
    }
}
