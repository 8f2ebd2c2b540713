//! Replay pass 1: walk the log from the header's tail and find where it
//! ends, and why.
//!
//! The walk expects transaction `synced_seq + 1` at `tail_block`, then each
//! next sequence number right after the previous transaction (or at block 0
//! after a padding block carrying that number). A block is accepted only
//! with the magic, the salted checksum of this journal id, and exactly the
//! expected sequence number; a data block cannot pass for a log block
//! because the writer escapes data blocks that begin with the magic, and a
//! block of an earlier lap fails the sequence number. The first position
//! that fails ends the log.
//!
//! Then the rest of the ring is searched for evidence: any valid block 0
//! whose `durable_seq` reaches the missing sequence number proves that the
//! missing transaction had been committed, so the log is damaged in the
//! middle rather than torn at its tail.

use qj_spec::journal::{
    parse_transaction, verify_transaction, BlockHeader, BlockType, JournalFormatError,
    JournalHeader, ParsedTransaction, TargetBounds, TransactionHeader, BLOCK_MAGIC,
};

use crate::error::JournalError;
use crate::options::Mutation;
use crate::region::{Region, READ_CHUNK_BYTES};

/// A valid transaction found by the scan.
#[derive(Clone, Debug)]
pub(crate) struct ScannedTransaction {
    /// Header, descriptors and unescaped data.
    pub parsed: ParsedTransaction,
    /// Ring index of its extent (its padding block, if it has one).
    pub extent_start: u32,
    /// Padding blocks before it.
    pub pad_blocks: u32,
    /// Ring index of its block 0.
    pub tx_start: u32,
    /// Its blocks, commit block included.
    pub tx_blocks: u32,
}

impl ScannedTransaction {
    /// Its sequence number.
    pub fn seq(&self) -> u64 {
        self.parsed.header.seq
    }
}

/// How the log ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogEndKind {
    /// Nothing (valid) where the next transaction would be: the normal end.
    Clean,
    /// The next transaction was begun but not completely written; it was
    /// never acknowledged, so dropping it is correct.
    TornTail,
    /// The next transaction is missing or damaged although a later one
    /// proves it was committed: acknowledged data is lost.
    Corrupt,
    /// The next transaction passes its checksums but breaks the format.
    Invalid,
}

/// Where and why the log ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LogEnd {
    pub kind: LogEndKind,
    /// Ring index where the next transaction (or its padding) goes.
    pub ring_block: u32,
    /// Ring index of the block that failed.
    pub failed_block: u32,
    /// The sequence number expected there.
    pub expected_seq: u64,
    /// What failed.
    pub reason: String,
    /// For `Corrupt`: a transaction whose `durable_seq` covers the missing one.
    pub evidence_seq: Option<u64>,
    /// For `Invalid`: the structural error, offset relative to the failed
    /// block's device offset.
    pub invalid: Option<JournalFormatError>,
}

/// The result of pass 1.
#[derive(Clone, Debug)]
pub(crate) struct Scan {
    pub header: JournalHeader,
    pub transactions: Vec<ScannedTransaction>,
    pub end: LogEnd,
    /// The largest `durable_seq` of any valid block 0 anywhere in the ring:
    /// every transaction up to it was acknowledged.
    pub anchor_seq: u64,
}

enum Failure {
    /// Nothing acceptable at the position.
    Missing(String),
    /// A valid block 0 with the expected number, but the rest fails.
    Torn(String),
    /// Checksums fine, format broken.
    Invalid(JournalFormatError),
}

/// Runs pass 1. Only device errors are `Err`; what the log holds, however
/// damaged, is described in the returned [`Scan`].
pub(crate) fn scan(
    region: &Region<'_>,
    header: &JournalHeader,
    bounds: &TargetBounds,
    mutation: Mutation,
) -> Result<Scan, JournalError> {
    let ring = region.geometry.ring_blocks();
    let bs = region.block_size();
    let id = header.journal_id;
    let mut pos = header.tail_block;
    let mut expected = header.synced_seq + 1;
    let mut extent_start = pos;
    let mut pad_blocks = 0u32;
    let mut log_blocks = 0u64;
    let mut anchor = 0u64;
    let mut transactions = Vec::new();
    let mut block0 = vec![0u8; bs];

    // Bounded: every round consumes at least one block of a ring of
    // `ring` blocks, or stops.
    let failure = loop {
        let consumed = log_blocks + u64::from(pad_blocks);
        if consumed >= u64::from(ring) {
            break Failure::Missing("the log fills the whole ring".into());
        }
        region.read_blocks(pos, &mut block0)?;
        let block = match BlockHeader::decode(&block0, id) {
            // Behind a checksum salted with this journal's id, a field the
            // format forbids (non-zero reserved bytes, an unknown type) is
            // a broken writer, never the end of the log: ending the log
            // here would silently retire whatever this block starts.
            Err(e) if !e.is_integrity() => break Failure::Invalid(e),
            Err(e) => break Failure::Missing(format!("ring block {pos}: {e}")),
            Ok(block) => block,
        };
        if block.seq != expected {
            break Failure::Missing(format!(
                "ring block {pos} belongs to transaction {}, expected {expected}",
                block.seq
            ));
        }
        match block.block_type {
            BlockType::Padding => {
                let to_end = ring - pos;
                if pad_blocks > 0 || pos == 0 || consumed + u64::from(to_end) >= u64::from(ring) {
                    break Failure::Invalid(JournalFormatError::field(
                        "journal block header",
                        "block_type",
                        4,
                        u64::from(BlockType::Padding.code()),
                        "padding where none can be (at ring block 0, twice, or over live blocks)",
                    ));
                }
                pad_blocks = to_end;
                pos = 0;
            }
            BlockType::Commit => {
                break Failure::Invalid(JournalFormatError::field(
                    "journal block header",
                    "block_type",
                    4,
                    u64::from(BlockType::Commit.code()),
                    "commit block where a transaction should start",
                ));
            }
            BlockType::Descriptor => {
                let tx_header = match TransactionHeader::decode(&block0, id) {
                    Err(e) => break Failure::Invalid(e),
                    Ok(h) => h,
                };
                anchor = anchor.max(tx_header.durable_seq);
                let total = tx_header.total_blocks();
                if total > u64::from(ring - pos) || consumed + total > u64::from(ring) {
                    break Failure::Invalid(JournalFormatError::field(
                        "journal transaction",
                        "data_blocks",
                        36,
                        u64::from(tx_header.data_blocks),
                        "transaction runs past the end of the ring or over live blocks",
                    ));
                }
                let mut blocks = vec![0u8; total as usize * bs];
                blocks[..bs].copy_from_slice(&block0);
                region.read_blocks(pos + 1, &mut blocks[bs..])?;
                match verify_transaction(&blocks, id, bs, expected) {
                    // Deliberate bug for the crash harness (never set
                    // otherwise): a mismatch of the whole-transaction
                    // checksum is the only evidence that a data block of
                    // an otherwise intact transaction was not written;
                    // ignoring it replays the torn transaction.
                    Err(e)
                        if mutation == Mutation::ReplaySkipsTxChecksum
                            && is_tx_checksum(&e, total, bs) => {}
                    // A complete transaction is one whose every block,
                    // data blocks included, matches the commit block's
                    // checksum: anything less was never acknowledged and
                    // ends the log (spec §5.5, §10.1).
                    Err(e) if e.is_integrity() => {
                        break Failure::Torn(format!(
                            "transaction {expected} at ring block {pos} is torn: {e}"
                        ))
                    }
                    Err(e) => break Failure::Invalid(e),
                    Ok(_) => {}
                }
                let parsed = match parse_transaction(&blocks, &tx_header, bs, bounds) {
                    Err(e) => break Failure::Invalid(e),
                    Ok(parsed) => parsed,
                };
                transactions.push(ScannedTransaction {
                    parsed,
                    extent_start,
                    pad_blocks,
                    tx_start: pos,
                    tx_blocks: total as u32,
                });
                log_blocks = consumed + total;
                pos = ((u64::from(pos) + total) % u64::from(ring)) as u32;
                expected += 1;
                extent_start = pos;
                pad_blocks = 0;
            }
        }
    };

    let (evidence, evidence_anchor) = search_evidence(
        region,
        id,
        extent_start,
        u64::from(ring) - log_blocks,
        expected,
    )?;
    anchor = anchor.max(evidence_anchor);
    let (kind, reason, invalid) = match failure {
        Failure::Invalid(e) => (LogEndKind::Invalid, e.to_string(), Some(e)),
        Failure::Missing(reason) | Failure::Torn(reason) if evidence.is_some() => {
            (LogEndKind::Corrupt, reason, None)
        }
        Failure::Torn(reason) => (LogEndKind::TornTail, reason, None),
        Failure::Missing(reason) => (LogEndKind::Clean, reason, None),
    };
    Ok(Scan {
        header: *header,
        transactions,
        end: LogEnd {
            kind,
            ring_block: extent_start,
            failed_block: pos,
            expected_seq: expected,
            reason,
            evidence_seq: evidence,
            invalid,
        },
        anchor_seq: anchor,
    })
}

/// Whether `error` from [`verify_transaction`] of a transaction of
/// `total_blocks` blocks is the mismatch of its whole-transaction checksum
/// (commit block byte 40), rather than any other integrity failure.
fn is_tx_checksum(error: &JournalFormatError, total_blocks: u64, block_size: usize) -> bool {
    let checksum_offset = total_blocks
        .checked_sub(1)
        .and_then(|commit_index| commit_index.checked_mul(block_size as u64))
        .and_then(|commit_at| commit_at.checked_add(40));
    matches!(error, JournalFormatError::BadChecksum { offset, .. } if Some(*offset) == checksum_offset)
}

/// Reads `count` ring blocks from `start` (wrapping) and looks at every
/// valid block 0. Returns a sequence number proving that `missing` was
/// committed, if any, and the largest `durable_seq` seen.
fn search_evidence(
    region: &Region<'_>,
    id: u64,
    start: u32,
    count: u64,
    missing: u64,
) -> Result<(Option<u64>, u64), JournalError> {
    let ring = region.geometry.ring_blocks();
    let bs = region.block_size();
    let chunk_blocks = (READ_CHUNK_BYTES / bs as u64).max(1) as u32;
    let mut evidence = None;
    let mut anchor = 0u64;
    let mut pos = start;
    let mut left = count;
    let mut buf = Vec::new();
    // Bounded by `count` blocks, at least one per round.
    while left > 0 {
        let run = (u64::from(ring - pos))
            .min(left)
            .min(u64::from(chunk_blocks)) as u32;
        buf.resize(run as usize * bs, 0);
        region.read_blocks(pos, &mut buf)?;
        for block in buf.chunks_exact(bs) {
            if block[..4] != BLOCK_MAGIC.to_be_bytes() {
                continue;
            }
            if let Ok(header) = TransactionHeader::decode(block, id) {
                anchor = anchor.max(header.durable_seq);
                if header.seq > missing && header.durable_seq >= missing && evidence.is_none() {
                    evidence = Some(header.seq);
                }
            }
        }
        left -= u64::from(run);
        pos = (pos + run) % ring;
    }
    Ok((evidence, anchor))
}
