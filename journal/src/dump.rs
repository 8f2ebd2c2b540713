//! `qj journal dump`: everything in a journal region, as data (for
//! `--output json`) and as text, including where a torn or damaged log
//! ends and why. Reads only.

use std::fmt;

use qj_spec::journal::{
    Descriptor, JournalFormatError, JournalGeometry, JournalHeader, TargetBounds,
};

use crate::error::JournalError;
use crate::options::Mutation;
use crate::region::Region;
use crate::replay::LogEndReport;
use crate::scan::scan;
use crate::Storage;

/// One header slot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SlotDump {
    /// 0 or 1.
    pub slot: usize,
    /// Its generation, if it decodes.
    pub generation: Option<u64>,
    /// Why it does not decode.
    pub error: Option<String>,
}

/// The header in charge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeaderDump {
    /// The slot it was read from.
    pub slot: usize,
    /// Its generation.
    pub generation: u64,
    /// The journal id, in hex.
    pub journal_id: String,
    /// Last synced sequence number.
    pub synced_seq: u64,
    /// Ring index where the log starts.
    pub tail_block: u32,
}

/// A write chunk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WriteChunkDump {
    /// Device offset written.
    pub target: u64,
    /// Bytes.
    pub length: u32,
    /// Offset in the data area.
    pub data_offset: u32,
}

/// A copy chunk.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CopyChunkDump {
    /// Device offset written.
    pub target: u64,
    /// Device offset read.
    pub source: u64,
    /// Bytes.
    pub length: u32,
}

/// A revoked range.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RangeDump {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub length: u64,
}

/// A dedup entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DedupEntryDump {
    /// Host offset of the cluster.
    pub host_offset: u64,
    /// Hash function code.
    pub hash_algorithm: u8,
    /// The hash, in hex.
    pub hash: String,
}

/// A data checksum entry.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DataChecksumDump {
    /// First byte covered.
    pub target: u64,
    /// Bytes covered.
    pub length: u32,
    /// The CRC32C.
    pub crc32c: u32,
}

/// One descriptor.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DescriptorDump {
    /// No-op.
    NoOp {
        /// Its size.
        size_bytes: u16,
    },
    /// Write data.
    WriteData {
        /// The chunks.
        chunks: Vec<WriteChunkDump>,
    },
    /// Copy data.
    Copy {
        /// The chunks.
        chunks: Vec<CopyChunkDump>,
    },
    /// Revoke.
    Revoke {
        /// The ranges.
        ranges: Vec<RangeDump>,
    },
    /// Dedup hash insertion.
    DedupInsert {
        /// The entries.
        entries: Vec<DedupEntryDump>,
    },
    /// Dedup hash deletion.
    DedupDelete {
        /// The entries.
        entries: Vec<DedupEntryDump>,
    },
    /// Data checksums.
    DataChecksum {
        /// The entries.
        chunks: Vec<DataChecksumDump>,
    },
    /// Escaped data blocks.
    Escape {
        /// Their indices in the data area.
        data_blocks: Vec<u32>,
    },
    /// A private-range descriptor.
    Private {
        /// Its type.
        descriptor_type: u16,
        /// Its count field.
        count: u32,
        /// Payload size.
        payload_bytes: usize,
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<&Descriptor> for DescriptorDump {
    fn from(d: &Descriptor) -> Self {
        let dedup = |entries: &[qj_spec::journal::DedupEntry]| {
            entries
                .iter()
                .map(|e| DedupEntryDump {
                    host_offset: e.host_offset,
                    hash_algorithm: e.hash_algorithm,
                    hash: hex(&e.hash),
                })
                .collect()
        };
        match d {
            Descriptor::NoOp { size_bytes } => Self::NoOp {
                size_bytes: *size_bytes,
            },
            Descriptor::WriteData(chunks) => Self::WriteData {
                chunks: chunks
                    .iter()
                    .map(|c| WriteChunkDump {
                        target: c.target,
                        length: c.length,
                        data_offset: c.data_offset,
                    })
                    .collect(),
            },
            Descriptor::Copy(chunks) => Self::Copy {
                chunks: chunks
                    .iter()
                    .map(|c| CopyChunkDump {
                        target: c.target,
                        source: c.source,
                        length: c.length,
                    })
                    .collect(),
            },
            Descriptor::Revoke(ranges) => Self::Revoke {
                ranges: ranges
                    .iter()
                    .map(|r| RangeDump {
                        offset: r.offset,
                        length: r.length,
                    })
                    .collect(),
            },
            Descriptor::DedupInsert(entries) => Self::DedupInsert {
                entries: dedup(entries),
            },
            Descriptor::DedupDelete(entries) => Self::DedupDelete {
                entries: dedup(entries),
            },
            Descriptor::DataChecksum(chunks) => Self::DataChecksum {
                chunks: chunks
                    .iter()
                    .map(|c| DataChecksumDump {
                        target: c.target,
                        length: c.length,
                        crc32c: c.crc32c,
                    })
                    .collect(),
            },
            Descriptor::Escape(blocks) => Self::Escape {
                data_blocks: blocks.clone(),
            },
            Descriptor::Private {
                descriptor_type,
                count,
                payload,
            } => Self::Private {
                descriptor_type: *descriptor_type,
                count: *count,
                payload_bytes: payload.len(),
            },
        }
    }
}

/// One transaction of the log.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TransactionDump {
    /// Sequence number.
    pub seq: u64,
    /// Ring index of its block 0.
    pub ring_block: u32,
    /// Device offset of its block 0.
    pub device_offset: u64,
    /// Padding blocks before it.
    pub padding_blocks: u32,
    /// Descriptor blocks.
    pub descriptor_blocks: u32,
    /// Data blocks.
    pub data_blocks: u32,
    /// All its blocks, commit block included.
    pub total_blocks: u32,
    /// Its durable_seq.
    pub durable_seq: u64,
    /// Descriptors in order.
    pub descriptors: Vec<DescriptorDump>,
}

/// The whole journal.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct JournalDump {
    /// Device offset of the region.
    pub base_offset: u64,
    /// Region size.
    pub size_bytes: u64,
    /// Block size.
    pub block_size: u64,
    /// Ring blocks.
    pub ring_blocks: u32,
    /// Both header slots.
    pub slots: Vec<SlotDump>,
    /// The header in charge.
    pub header: HeaderDump,
    /// The valid log, in order (what replay would apply).
    pub transactions: Vec<TransactionDump>,
    /// Where the valid log ends, and why.
    pub log_end: LogEndReport,
    /// Largest durable_seq seen anywhere in the ring.
    pub anchor_seq: u64,
    /// Whether replay has anything to do.
    pub dirty: bool,
}

/// Reads the journal region at `base_offset` (`size_bytes` long) and
/// describes it; works on a dirty, torn or damaged log (the damage is in
/// `log_end`). Fails only on a device error, when neither header slot is
/// valid, or when the header's size disagrees with `size_bytes`.
pub fn dump(
    storage: &dyn Storage,
    base_offset: u64,
    size_bytes: u64,
) -> Result<JournalDump, JournalError> {
    let slots_read = Region::read_slots(storage, base_offset)?;
    let slots: Vec<SlotDump> = slots_read
        .chunks_exact(512)
        .map(JournalHeader::decode)
        .enumerate()
        .map(|(slot, r)| SlotDump {
            slot,
            generation: r.as_ref().ok().map(|h| h.generation),
            error: r.as_ref().err().map(ToString::to_string),
        })
        .collect();
    let header = Region::current_header(storage, base_offset)?;
    if header.geometry.size_bytes() != size_bytes {
        return Err(JournalError::format(
            base_offset + JournalGeometry::header_slot_offset(header.slot()),
            JournalFormatError::field(
                "journal header",
                "journal_size",
                16,
                header.geometry.size_bytes(),
                "does not match the region size the caller gave",
            ),
        ));
    }
    let region = Region {
        storage,
        base: base_offset,
        geometry: header.geometry,
    };
    let end_offset = base_offset
        .checked_add(size_bytes)
        .ok_or(JournalError::Parameter {
            field: "size_bytes",
            value: size_bytes,
            reason: "region end overflows",
        })?;
    let scanned = scan(
        &region,
        &header,
        &TargetBounds::outside_journal(base_offset, end_offset),
        Mutation::None,
    )?;
    let transactions: Vec<TransactionDump> = scanned
        .transactions
        .iter()
        .map(|tx| TransactionDump {
            seq: tx.seq(),
            ring_block: tx.tx_start,
            device_offset: region.block_offset(tx.tx_start),
            padding_blocks: tx.pad_blocks,
            descriptor_blocks: tx.parsed.header.descriptor_blocks,
            data_blocks: tx.parsed.header.data_blocks,
            total_blocks: tx.tx_blocks,
            durable_seq: tx.parsed.header.durable_seq,
            descriptors: tx
                .parsed
                .descriptors
                .iter()
                .map(DescriptorDump::from)
                .collect(),
        })
        .collect();
    let end = &scanned.end;
    Ok(JournalDump {
        base_offset,
        size_bytes,
        block_size: header.geometry.block_size(),
        ring_blocks: header.geometry.ring_blocks(),
        slots,
        header: HeaderDump {
            slot: header.slot(),
            generation: header.generation,
            journal_id: format!("{:016x}", header.journal_id),
            synced_seq: header.synced_seq,
            tail_block: header.tail_block,
        },
        dirty: !transactions.is_empty(),
        transactions,
        log_end: LogEndReport {
            kind: end.kind,
            ring_block: end.ring_block,
            failed_block: end.failed_block,
            expected_seq: end.expected_seq,
            reason: end.reason.clone(),
            evidence_seq: end.evidence_seq,
        },
        anchor_seq: scanned.anchor_seq,
    })
}

impl fmt::Display for DescriptorDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoOp { size_bytes } => write!(f, "no-op ({size_bytes} bytes)"),
            Self::WriteData { chunks } => {
                write!(f, "write data:")?;
                for c in chunks {
                    write!(
                        f,
                        " {:#x}+{:#x}<-data[{:#x}]",
                        c.target, c.length, c.data_offset
                    )?;
                }
                Ok(())
            }
            Self::Copy { chunks } => {
                write!(f, "copy:")?;
                for c in chunks {
                    write!(f, " {:#x}+{:#x}<-{:#x}", c.target, c.length, c.source)?;
                }
                Ok(())
            }
            Self::Revoke { ranges } => {
                write!(f, "revoke:")?;
                for r in ranges {
                    write!(f, " {:#x}+{:#x}", r.offset, r.length)?;
                }
                Ok(())
            }
            Self::DedupInsert { entries } | Self::DedupDelete { entries } => {
                let verb = if matches!(self, Self::DedupInsert { .. }) {
                    "insert"
                } else {
                    "delete"
                };
                write!(f, "dedup {verb}:")?;
                for e in entries {
                    write!(
                        f,
                        " {}(alg {})->{:#x}",
                        e.hash, e.hash_algorithm, e.host_offset
                    )?;
                }
                Ok(())
            }
            Self::DataChecksum { chunks } => {
                write!(f, "data checksum:")?;
                for c in chunks {
                    write!(
                        f,
                        " {:#x}+{:#x}=crc32c {:08x}",
                        c.target, c.length, c.crc32c
                    )?;
                }
                Ok(())
            }
            Self::Escape { data_blocks } => write!(f, "escaped data blocks: {data_blocks:?}"),
            Self::Private {
                descriptor_type,
                count,
                payload_bytes,
            } => write!(
                f,
                "private type {descriptor_type:#06x}: count {count}, {payload_bytes} bytes"
            ),
        }
    }
}

impl fmt::Display for JournalDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "journal at {:#x}: {} bytes, {}-byte blocks, {} ring blocks",
            self.base_offset, self.size_bytes, self.block_size, self.ring_blocks
        )?;
        for s in &self.slots {
            match (&s.generation, &s.error) {
                (Some(g), _) => writeln!(f, "  header slot {}: generation {g}", s.slot)?,
                (None, Some(e)) => writeln!(f, "  header slot {}: invalid: {e}", s.slot)?,
                (None, None) => writeln!(f, "  header slot {}: invalid", s.slot)?,
            }
        }
        let h = &self.header;
        writeln!(
            f,
            "header (slot {}, generation {}): id {}, synced seq {}, tail block {}",
            h.slot, h.generation, h.journal_id, h.synced_seq, h.tail_block
        )?;
        writeln!(
            f,
            "{} transaction(s) to replay{}",
            self.transactions.len(),
            if self.dirty { " (dirty)" } else { " (clean)" }
        )?;
        for tx in &self.transactions {
            writeln!(
                f,
                "transaction {} at block {} (offset {:#x}): {} descriptor + {} data blocks{}, durable_seq {}",
                tx.seq,
                tx.ring_block,
                tx.device_offset,
                tx.descriptor_blocks,
                tx.data_blocks,
                if tx.padding_blocks > 0 { format!(", after {} padding blocks", tx.padding_blocks) } else { String::new() },
                tx.durable_seq
            )?;
            for d in &tx.descriptors {
                writeln!(f, "  {d}")?;
            }
        }
        let end = &self.log_end;
        write!(
            f,
            "log ends at block {} ({:?}): expected transaction {}: {}",
            end.ring_block, end.kind, end.expected_seq, end.reason
        )?;
        if let Some(evidence) = end.evidence_seq {
            write!(f, "; transaction {evidence} proves it was committed")?;
        }
        writeln!(f)
    }
}
