//! A whole transaction as it lies in the ring: descriptor blocks, data
//! blocks, commit block. The first byte picks the block size (512 to 4096
//! bytes); the rest is the blocks. Every block that starts with the block
//! magic is resealed and the commit block gets the transaction checksum,
//! as the writer would, so that the fuzzer reaches the structural checks.
//!
//! A transaction that verifies and parses is encoded again from what was
//! parsed, and that encoding must verify and parse to the same entries
//! (descriptors may split or merge differently; escapes are recomputed)
//! and the same data area.

#![no_main]

use libfuzzer_sys::fuzz_target;
use qj_spec::journal::block::seal_block;
use qj_spec::journal::checksum::{salt, salted_append};
use qj_spec::journal::{
    encode_transaction, parse_transaction, verify_transaction, CopyChunk, DataChecksumChunk,
    DedupEntry, Descriptor, RevokeRange, TargetBounds, TransactionParams, WriteChunk, BLOCK_MAGIC,
};

/// The journal id every transaction of this target is sealed with.
const JOURNAL_ID: u64 = 0x716a_6675_7a7a_0002;
/// Most blocks a transaction of this target has.
const BLOCKS_MAX: usize = 32;
/// The journal region the targets must stay out of (the parser refuses
/// descriptors that write into it).
const JOURNAL_START: u64 = 1 << 20;
const JOURNAL_END: u64 = 2 << 20;

/// One entry of a descriptor, which is what replay acts on: how entries
/// are grouped into descriptors is the encoder's choice.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    NoOp(u16),
    Write(WriteChunk),
    Copy(CopyChunk),
    Revoke(RevokeRange),
    DedupInsert(DedupEntry),
    DedupDelete(DedupEntry),
    Checksum(DataChecksumChunk),
    Private(u16, u32, Vec<u8>),
}

/// The entries of `descriptors` in order, escapes left out (the encoder
/// recomputes them from the data).
fn entries(descriptors: &[Descriptor]) -> Vec<Entry> {
    let mut out = Vec::new();
    for d in descriptors {
        match d {
            Descriptor::NoOp { size_bytes } => out.push(Entry::NoOp(*size_bytes)),
            Descriptor::WriteData(v) => out.extend(v.iter().copied().map(Entry::Write)),
            Descriptor::Copy(v) => out.extend(v.iter().copied().map(Entry::Copy)),
            Descriptor::Revoke(v) => out.extend(v.iter().copied().map(Entry::Revoke)),
            Descriptor::DedupInsert(v) => out.extend(v.iter().cloned().map(Entry::DedupInsert)),
            Descriptor::DedupDelete(v) => out.extend(v.iter().cloned().map(Entry::DedupDelete)),
            Descriptor::DataChecksum(v) => out.extend(v.iter().copied().map(Entry::Checksum)),
            Descriptor::Escape(_) => {}
            Descriptor::Private {
                descriptor_type,
                count,
                payload,
            } => out.push(Entry::Private(*descriptor_type, *count, payload.clone())),
        }
    }
    out
}

fn be_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Seals every block that looks like a log block, then fills in the
/// commit block's transaction checksum and seals it, the way a writer
/// finishes a transaction. Returns the blocks cut to the transaction's
/// length when block 0 announces one that fits.
fn sealed(mut blocks: Vec<u8>, block_size: usize) -> Vec<u8> {
    let magic = BLOCK_MAGIC.to_be_bytes();
    for block in blocks.chunks_exact_mut(block_size) {
        if block[..4] == magic {
            seal_block(block, JOURNAL_ID);
        }
    }
    let total = u64::from(be_u32(&blocks, 32)) + u64::from(be_u32(&blocks, 36)) + 1;
    let Some(len) = usize::try_from(total)
        .ok()
        .and_then(|t| t.checked_mul(block_size))
        .filter(|&len| len <= blocks.len())
    else {
        return blocks;
    };
    blocks.truncate(len);
    let commit_at = len - block_size;
    let seq = be_u64(&blocks, 8);
    let checksum = salted_append(salt(JOURNAL_ID, seq), &blocks[..commit_at]);
    blocks[commit_at + 40..commit_at + 44].copy_from_slice(&checksum.to_be_bytes());
    seal_block(&mut blocks[commit_at..], JOURNAL_ID);
    blocks
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let block_size = 512usize << (selector % 4);
    let blocks = rest.len().min(BLOCKS_MAX * block_size) / block_size;
    if blocks < 2 {
        return;
    }
    let blocks = sealed(rest[..blocks * block_size].to_vec(), block_size);
    let seq = be_u64(&blocks, 8);
    let Ok(header) = verify_transaction(&blocks, JOURNAL_ID, block_size, seq) else {
        return;
    };
    assert_eq!(header.seq, seq);
    assert_eq!(
        header.total_blocks() * block_size as u64,
        blocks.len() as u64
    );
    let bounds = TargetBounds::outside_journal(JOURNAL_START, JOURNAL_END);
    let Ok(parsed) = parse_transaction(&blocks, &header, block_size, &bounds) else {
        return;
    };
    assert_eq!(parsed.data.len(), header.data_blocks as usize * block_size);
    assert_eq!(parsed.descriptors.len(), parsed.descriptor_offsets.len());

    let without_escapes: Vec<Descriptor> = parsed
        .descriptors
        .iter()
        .filter(|d| !matches!(d, Descriptor::Escape(_)))
        .cloned()
        .collect();
    let params = TransactionParams {
        journal_id: JOURNAL_ID,
        seq,
        durable_seq: header.durable_seq,
        block_size,
    };
    let first_block_room = block_size - 48;
    let encoded = match encode_transaction(&params, &without_escapes, &parsed.data) {
        Ok(encoded) => encoded,
        Err(e) => {
            // Only a no-op or private descriptor (never split) that filled a
            // continuation block can be too large for block 0.
            assert!(
                without_escapes.iter().any(|d| matches!(
                    d,
                    Descriptor::NoOp { .. } | Descriptor::Private { .. }
                ) && d.encoded_len() > first_block_room),
                "a parsed transaction does not encode again: {e}"
            );
            return;
        }
    };
    let again = verify_transaction(&encoded.bytes, JOURNAL_ID, block_size, seq)
        .expect("our own encoding verifies");
    assert_eq!(again, encoded.header);
    let reparsed = parse_transaction(&encoded.bytes, &again, block_size, &bounds)
        .expect("our own encoding parses");
    assert_eq!(entries(&reparsed.descriptors), entries(&parsed.descriptors));
    assert_eq!(reparsed.data, parsed.data);
});
