//! Replay passes 2 and 3 over the result of the scan (pass 1): settle where
//! the replayed log ends (data checksums of unanchored transactions), collect
//! the revokes of what will be replayed, then apply the transactions in
//! order, skipping revoked bytes and handing dedup entries to the consumer.
//!
//! Nothing is written before the scan has judged the whole log, so a log
//! that must be refused (damaged in the middle, or invalid) is refused
//! with the device untouched.

use qj_spec::journal::Descriptor;

use crate::apply::{
    apply_transaction, merge_ranges, verify_data_checksums, ApplyTarget, DataChecksumMismatch,
};
use crate::dedup::{DedupConsumer, DedupEvent, DedupOp};
use crate::error::JournalError;
use crate::options::{Mutation, ReplayMode};
use crate::revoke::RevokeTable;
use crate::scan::{LogEndKind, Scan};

/// Where the log ended, for the replay report and the dump.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LogEndReport {
    /// Why the scan stopped.
    pub kind: LogEndKind,
    /// Ring index where the next transaction goes.
    pub ring_block: u32,
    /// Ring index of the block that failed.
    pub failed_block: u32,
    /// The sequence number expected there.
    pub expected_seq: u64,
    /// What was found instead.
    pub reason: String,
    /// For a log damaged in the middle: the transaction proving the loss.
    pub evidence_seq: Option<u64>,
}

/// What replay did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReplayReport {
    /// Apply or in memory.
    pub mode: ReplayMode,
    /// The header's synced sequence number before replay.
    pub synced_seq_before: u64,
    /// Sequence number of the last transaction replayed (equal to
    /// `synced_seq_before` if none was).
    pub last_replayed_seq: u64,
    /// Number of transactions replayed.
    pub transactions_replayed: u64,
    /// Bytes written to targets (or to the overlay).
    pub bytes_written: u64,
    /// Bytes skipped because a later transaction revoked them.
    pub bytes_revoked: u64,
    /// Merged target ranges written, as (offset, length).
    pub ranges_written: Vec<(u64, u64)>,
    /// Dedup entries handed to the consumer.
    pub dedup_events: u64,
    /// How the log ended.
    pub end: LogEndReport,
    /// A transaction dropped, with all after it, because data it depends
    /// on is not on the device.
    pub data_checksum_mismatch: Option<(u64, DataChecksumMismatch)>,
    /// Whether committed transactions were knowingly lost (salvage of a
    /// damaged or invalid log).
    pub salvaged: bool,
}

impl ReplayReport {
    /// What an opener must tell its user about the end of the log, if
    /// anything: a last transaction that was begun (its first block has the
    /// magic, the checksum and the expected sequence number) but fails its
    /// checks is dropped as a torn tail. That is the normal trace of a
    /// crash during its commit, but the same bytes result from damage to a
    /// transaction whose commit had returned, and nothing later in the log
    /// can tell the two apart; so it is reported, never passed over as a
    /// clean end. A transaction dropped for a data checksum mismatch is
    /// not reported: the mismatch proves its commit never returned (spec
    /// 8.6).
    #[must_use]
    pub fn torn_tail_warning(&self) -> Option<String> {
        if self.end.kind != LogEndKind::TornTail || self.data_checksum_mismatch.is_some() {
            return None;
        }
        Some(format!(
            "the journal's last transaction (sequence number {seq}, ring block {block}) was begun \
             but fails its checks ({reason}); it was dropped as a torn tail. Nothing in the journal \
             proves that its commit was acknowledged; if it was (a flush that covered it returned), \
             the writes of transaction {seq} are lost",
            seq = self.end.expected_seq,
            block = self.end.failed_block,
            reason = self.end.reason,
        ))
    }
}

/// Replay's result for the journal that opens.
pub(crate) struct Replayed {
    pub report: ReplayReport,
    /// Ring index where the fresh log starts.
    pub next_head: u32,
}

/// Runs passes 2 and 3. `device_offset_of` maps a ring index to its device
/// offset for errors.
pub(crate) fn replay(
    scan: Scan,
    mode: ReplayMode,
    salvage: bool,
    mutation: Mutation,
    target: &mut dyn ApplyTarget,
    dedup: &mut dyn DedupConsumer,
    device_offset_of: &dyn Fn(u32) -> u64,
) -> Result<Replayed, JournalError> {
    let end = &scan.end;
    let damaged = matches!(end.kind, LogEndKind::Corrupt | LogEndKind::Invalid);
    if damaged && !salvage {
        let device_offset = device_offset_of(end.failed_block);
        return Err(match (&end.invalid, end.evidence_seq) {
            (Some(source), _) => JournalError::InvalidTransaction {
                seq: end.expected_seq,
                device_offset,
                source: source.clone(),
            },
            (None, evidence) => JournalError::CorruptLog {
                seq: end.expected_seq,
                device_offset,
                reason: end.reason.clone(),
                evidence_seq: evidence.unwrap_or(end.expected_seq),
            },
        });
    }

    let mut report = ReplayReport {
        mode,
        synced_seq_before: scan.header.synced_seq,
        last_replayed_seq: scan.header.synced_seq,
        transactions_replayed: 0,
        bytes_written: 0,
        bytes_revoked: 0,
        ranges_written: Vec::new(),
        dedup_events: 0,
        end: LogEndReport {
            kind: end.kind,
            ring_block: end.ring_block,
            failed_block: end.failed_block,
            expected_seq: end.expected_seq,
            reason: end.reason.clone(),
            evidence_seq: end.evidence_seq,
        },
        data_checksum_mismatch: None,
        salvaged: damaged,
    };
    let mut next_head = end.ring_block;

    // Pass 2a: where the replayed log ends. A transaction no later one
    // anchors may depend on data that never reached the device; if so it
    // was never acknowledged, and neither was anything after it
    // (acknowledgement is in order). This must be settled before the
    // revokes are collected: a dropped transaction's revokes never
    // happened, and honouring one would skip an earlier, replayed write
    // (the L1 table of a dropped grow, say) and lose committed metadata.
    // Checking before anything is applied gives the same answer as
    // checking in order, because no replayed operation changes a
    // checksummed range (spec 8.6 rule 3).
    let mut replayed_count = scan.transactions.len();
    for (index, tx) in scan.transactions.iter().enumerate() {
        let seq = tx.seq();
        if seq <= scan.anchor_seq {
            continue;
        }
        if let Some(mismatch) = verify_data_checksums(target, &tx.parsed.descriptors)? {
            report.data_checksum_mismatch = Some((seq, mismatch));
            report.end = LogEndReport {
                kind: LogEndKind::TornTail,
                ring_block: tx.extent_start,
                failed_block: tx.tx_start,
                expected_seq: seq,
                reason: format!(
                    "data checksum of {:#x}+{:#x} does not match: the data never reached the device",
                    mismatch.target, mismatch.length
                ),
                evidence_seq: None,
            };
            next_head = tx.extent_start;
            replayed_count = index;
            break;
        }
    }
    let replayed = &scan.transactions[..replayed_count];

    // Pass 2b: every revoke of the replayed log, before anything is
    // applied, so that a transaction is never applied over a range a later
    // one revoked.
    let mut revokes = RevokeTable::new();
    for tx in replayed {
        for descriptor in &tx.parsed.descriptors {
            if let Descriptor::Revoke(ranges) = descriptor {
                for range in ranges {
                    revokes.insert(*range, tx.seq());
                }
            }
        }
    }
    if mutation == Mutation::ReplayIgnoresRevokes {
        // Deliberate bug for the crash harness (never set otherwise): with
        // the table empty, pass 3 writes old metadata over ranges that a
        // later transaction freed and the image may since have reused.
        revokes = RevokeTable::new();
    }

    // Pass 2c: the consumer must be able to take every dedup entry of the
    // replayed log, asked before anything is written, so that a log it
    // cannot take is refused with the device untouched.
    for tx in replayed {
        for event in dedup_events(tx.seq(), &tx.parsed.descriptors) {
            dedup.admits(&event).map_err(|reason| JournalError::Dedup {
                seq: event.seq,
                reason,
            })?;
        }
    }

    // Pass 3: apply in order.
    let mut ranges = Vec::new();
    for tx in replayed {
        let seq = tx.seq();
        let applied = apply_transaction(
            target,
            seq,
            &tx.parsed.descriptors,
            &tx.parsed.data,
            &revokes,
        )?;
        report.bytes_written += applied.bytes_written;
        report.bytes_revoked += applied.bytes_revoked;
        ranges.extend(applied.ranges);
        for event in dedup_events(seq, &tx.parsed.descriptors) {
            dedup
                .consume(&event)
                .map_err(|reason| JournalError::Dedup { seq, reason })?;
            report.dedup_events += 1;
        }
        report.transactions_replayed += 1;
        report.last_replayed_seq = seq;
    }
    report.ranges_written = merge_ranges(ranges);
    Ok(Replayed { report, next_head })
}

/// The dedup entries of transaction `seq`, in log order.
fn dedup_events(seq: u64, descriptors: &[Descriptor]) -> impl Iterator<Item = DedupEvent> + '_ {
    descriptors
        .iter()
        .filter_map(|descriptor| match descriptor {
            Descriptor::DedupInsert(entries) => Some((DedupOp::Insert, entries)),
            Descriptor::DedupDelete(entries) => Some((DedupOp::Delete, entries)),
            _ => None,
        })
        .flat_map(move |(op, entries)| {
            entries.iter().map(move |entry| DedupEvent {
                seq,
                op,
                entry: entry.clone(),
            })
        })
}
