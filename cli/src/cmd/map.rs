//! `qj map [--output human|json] FILE`: where each guest extent lives, in
//! the two shapes of `qemu-img map`.

use std::path::PathBuf;

use crate::chain::{Chain, MapEntry};
use crate::error::{quoted, CliError, CliResult};
use crate::output::OutputFormat;

/// Arguments of `qj map`.
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    output: OutputFormat,
    /// Image format (only qcow2; accepted for qemu-img compatibility).
    #[arg(short = 'f', value_name = "FMT")]
    format: Option<String>,
    /// Open without taking or honouring image locks (read-only; what is
    /// read may be inconsistent while another process writes), like qemu-img.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

/// One entry as qemu-img prints it in JSON (its own fixed layout, one
/// entry per line, not a pretty-printed document).
#[must_use]
pub fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// The whole JSON array, as qemu-img prints it.
#[must_use]
pub fn json_text(entries: &[MapEntry]) -> String {
    let body: Vec<String> = entries.iter().map(json_entry).collect();
    format!("[{}]\n", body.join(",\n"))
}

/// C's `%#-16x`: `0x` prefix except for zero, left-aligned in 16 columns.
fn hex16(v: u64) -> String {
    let s = if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    };
    format!("{s:<16}")
}

/// The human table: only stored data is listed, with the file holding it.
/// Like qemu-img, the table stops at the first data without a plain
/// offset (compressed); the second value says whether that happened.
#[must_use]
pub fn human_text(chain: &Chain, entries: &[MapEntry]) -> (String, bool) {
    let mut s = format!("{:<16}{:<16}{:<16}File\n", "Offset", "Length", "Mapped to");
    for e in entries.iter().filter(|e| e.data && !e.zero) {
        let Some(offset) = e.offset else {
            return (s, true);
        };
        let file = chain
            .layers
            .get(e.depth)
            .map(|l| l.file_name())
            .unwrap_or_default();
        s.push_str(&format!(
            "{}{}{}{file}\n",
            hex16(e.start),
            hex16(e.length),
            hex16(offset)
        ));
    }
    (s, false)
}

/// Runs `qj map`.
pub fn run(args: MapArgs) -> CliResult<u8> {
    crate::cmd::require_qcow2(args.format.as_deref(), "map")?;
    let chain = Chain::open(&args.file, crate::cmd::lock_mode(args.force_share))?;
    let entries = chain.map()?;
    match args.output {
        OutputFormat::Human => {
            let (text, stopped) = human_text(&chain, &entries);
            print!("{text}");
            if stopped {
                return Err(CliError::failed(
                    format!("mapping {}", quoted(&args.file)),
                    "the image contains compressed clusters, which have no offset to show (use --output json)",
                ));
            }
        }
        OutputFormat::Json => print!("{}", json_text(&entries)),
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_entries_match_qemu_img_layout() {
        let data = MapEntry {
            start: 0,
            length: 65536,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset: Some(20480),
        };
        let zero = MapEntry {
            start: 65536,
            length: 65536,
            present: false,
            zero: true,
            data: false,
            offset: None,
            ..data.clone()
        };
        // Copied from `qemu-img map --output=json` (QEMU 10.0.2).
        assert_eq!(
            json_text(&[data, zero]),
            "[{ \"start\": 0, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false, \"offset\": 20480},\n\
             { \"start\": 65536, \"length\": 65536, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false, \"compressed\": false}]\n"
        );
    }

    #[test]
    fn hex_columns_like_printf() {
        assert_eq!(hex16(0), "0               ");
        assert_eq!(hex16(0x10000), "0x10000         ");
    }
}
