//! A dm-log-writes log, as `qj crash replay` reads it: the spec's decoder,
//! then the replay reader's checks against a base image. Asserted beyond
//! "no panic":
//!
//! - a decoded log is canonical: its super block and entries, encoded
//!   again (with each MARK's raw label bytes and each entry's data),
//!   give back the log's bytes up to the end of its last counted entry;
//! - every entry lies inside the log and after the one before it;
//! - the reader accepts only what the decoder accepts, turns each entry
//!   into operations in log order (a pre-flush before its write, a FUA
//!   flush after it), and never starts a write or discard past the base
//!   image's end by more than the growth it allows.
//!
//! The first two input bytes choose the base image's length in sectors,
//! so the fuzzer reaches both the accepted and the "not of this image"
//! paths; the rest is the log.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_model_checks::log_replay::reader::{parse_log, LogOp, GROWTH_SLACK_BYTES};
use qj_spec::log_writes::{decode_log, EntryKind, LogEntry, ENTRY_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((length, log)) = data.split_first_chunk::<2>() else {
        return;
    };
    let base_len = u64::from(u16::from_le_bytes(*length)) * 512;

    let decoded = decode_log(log);
    let parsed = parse_log(log, base_len);
    if decoded.is_err() {
        assert!(
            parsed.is_err(),
            "the reader accepted a log the decoder refused"
        );
        return;
    }
    let decoded = decoded.unwrap();
    let sector_bytes = decoded.super_block.sector_bytes;
    let sector = sector_bytes as usize;

    let mut encoded = decoded.super_block.encode();
    let mut previous_end = sector;
    for entry in &decoded.entries {
        let start = entry.log_offset as usize;
        assert_eq!(
            start, previous_end,
            "entry {} does not follow the one before",
            entry.index
        );
        assert!(entry.data.start == start + sector && entry.data.end <= log.len());
        let label_len = if entry.kind == EntryKind::Mark {
            entry.header.data_len as usize
        } else {
            0
        };
        let label = &log[start + ENTRY_BYTES..start + ENTRY_BYTES + label_len];
        let header: &LogEntry = &entry.header;
        encoded.extend(
            header
                .encode(label, sector_bytes)
                .expect("a decoded entry encodes"),
        );
        encoded.extend_from_slice(&log[entry.data.clone()]);
        previous_end = entry.data.end;
    }
    assert!(
        encoded == log[..previous_end],
        "a decoded log does not encode to its own bytes"
    );

    let Ok(replay) = parsed else {
        return;
    };
    assert_eq!(replay.entries, decoded.entries.len() as u64);
    assert_eq!(replay.sector_bytes, sector_bytes);
    let mut device_end = base_len;
    let mut ops = replay.ops.iter().peekable();
    for entry in &decoded.entries {
        let mut mine = Vec::new();
        while let Some(op) = ops.next_if(|op| op.entry == entry.index) {
            assert_eq!(op.log_offset, entry.log_offset);
            mine.push(&op.op);
        }
        let offset = entry.device_offset(sector_bytes);
        let len = entry.device_len(sector_bytes);
        match (entry.kind, mine.as_slice()) {
            (EntryKind::Flush, [LogOp::Flush]) => {}
            (EntryKind::Mark, [LogOp::Mark(label)]) => assert_eq!(label, &entry.label),
            (EntryKind::Discard, [LogOp::Discard { offset: o, len: l }]) => {
                assert!(*o == offset && *l == len);
            }
            (EntryKind::Write { preflush, fua }, ops) => {
                let write_at = usize::from(preflush);
                assert_eq!(ops.len(), 1 + usize::from(preflush) + usize::from(fua));
                assert!(!preflush || *ops[0] == LogOp::Flush);
                assert!(!fua || *ops[ops.len() - 1] == LogOp::Flush);
                let LogOp::Write { offset: o, data } = ops[write_at] else {
                    panic!("entry {} is a write, its operation is not", entry.index);
                };
                assert!(*o == offset && data[..] == log[entry.data.clone()]);
            }
            (kind, ops) => panic!("entry {} ({kind:?}) became {ops:?}", entry.index),
        }
        if matches!(entry.kind, EntryKind::Write { .. } | EntryKind::Discard) {
            assert!(
                offset <= device_end.saturating_add(GROWTH_SLACK_BYTES),
                "entry {} starts past the device's end and its allowed growth",
                entry.index
            );
            device_end = device_end.max(offset + len);
        }
    }
    assert!(ops.next().is_none(), "operations from no entry");
});
