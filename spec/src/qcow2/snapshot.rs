//! The internal snapshot table: one variable-length entry per snapshot,
//! each starting on an 8-byte boundary.

use super::bytes::{be_u16, be_u32, be_u64, pad8, slice};
use super::header::SNAPSHOTS_MAX;
use crate::error::FormatError;

const STRUCTURE: &str = "qcow2 snapshot table";

/// Size of the fixed part of an entry.
pub const SNAPSHOT_HEADER_LEN: usize = 40;
/// QEMU's limit on an entry's extra data (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const SNAPSHOT_EXTRA_DATA_LEN_MAX: usize = 1024;
/// QEMU's limit on the whole table (QCOW_MAX_SNAPSHOTS_SIZE): 64 MiB.
pub const SNAPSHOT_TABLE_LEN_MAX: usize = 1024 * SNAPSHOTS_MAX as usize;

/// One snapshot table entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id string (QEMU uses decimal numbers).
    pub id: String,
    /// User-visible name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of saved VM state (32-bit; see [`SnapshotHeader::vm_state_size_large`]).
    pub vm_state_size: u32,
    /// Extra data, kept verbatim: u64 vm_state_size_large, u64 disk_size,
    /// u64 icount (each present only if the data is long enough).
    pub extra_data: Vec<u8>,
}

impl SnapshotHeader {
    fn extra_u64(&self, at: usize) -> Option<u64> {
        let bytes = self.extra_data.get(at..at + 8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(bytes);
        Some(u64::from_be_bytes(raw))
    }

    /// The 64-bit VM state size from the extra data, if stored.
    #[must_use]
    pub fn vm_state_size_large(&self) -> Option<u64> {
        self.extra_u64(0)
    }

    /// The virtual disk size at snapshot time, if stored.
    #[must_use]
    pub fn disk_size(&self) -> Option<u64> {
        self.extra_u64(8)
    }

    /// The instruction count at snapshot time, if stored.
    #[must_use]
    pub fn icount(&self) -> Option<u64> {
        self.extra_u64(16)
    }

    /// Bytes of this entry without trailing alignment padding.
    #[must_use]
    pub fn encoded_len(&self) -> usize {
        SNAPSHOT_HEADER_LEN + self.extra_data.len() + self.id.len() + self.name.len()
    }

    /// Decodes one entry at the start of `bytes`; returns it and its length
    /// without padding. `table_offset` is where `bytes` starts in the table,
    /// for error messages.
    pub fn decode(bytes: &[u8], table_offset: u64) -> Result<(SnapshotHeader, usize), FormatError> {
        let fixed = slice(bytes, 0, SNAPSHOT_HEADER_LEN, STRUCTURE)?;
        let id_len = usize::from(be_u16(fixed, 12, STRUCTURE)?);
        let name_len = usize::from(be_u16(fixed, 14, STRUCTURE)?);
        let extra_len = be_u32(fixed, 36, STRUCTURE)?;
        if extra_len as usize > SNAPSHOT_EXTRA_DATA_LEN_MAX {
            return Err(FormatError::field(
                STRUCTURE,
                "extra_data_size",
                table_offset + 36,
                format!("{extra_len} bytes, QEMU allows at most {SNAPSHOT_EXTRA_DATA_LEN_MAX}"),
            ));
        }
        let extra_len = extra_len as usize;
        let extra_at = SNAPSHOT_HEADER_LEN;
        let id_at = extra_at + extra_len;
        let name_at = id_at + id_len;
        let end = name_at + name_len;
        let text = |at: usize, len: usize, field: &'static str| -> Result<String, FormatError> {
            let raw = slice(bytes, at, len, STRUCTURE)?;
            String::from_utf8(raw.to_vec()).map_err(|e| {
                FormatError::field(
                    STRUCTURE,
                    field,
                    table_offset + at as u64,
                    format!("not UTF-8: {e}"),
                )
            })
        };
        let entry = SnapshotHeader {
            l1_table_offset: be_u64(fixed, 0, STRUCTURE)?,
            l1_size: be_u32(fixed, 8, STRUCTURE)?,
            date_sec: be_u32(fixed, 16, STRUCTURE)?,
            date_nsec: be_u32(fixed, 20, STRUCTURE)?,
            vm_clock_nsec: be_u64(fixed, 24, STRUCTURE)?,
            vm_state_size: be_u32(fixed, 32, STRUCTURE)?,
            extra_data: slice(bytes, extra_at, extra_len, STRUCTURE)?.to_vec(),
            id: text(id_at, id_len, "id_str")?,
            name: text(name_at, name_len, "name")?,
        };
        debug_assert_eq!(entry.encoded_len(), end);
        Ok((entry, end))
    }

    /// Appends the encoded entry (without trailing padding) to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let too_long = |field: &'static str, len: usize, max: usize| {
            FormatError::field(STRUCTURE, field, 0, format!("{len} bytes, at most {max}"))
        };
        let id_len = u16::try_from(self.id.len())
            .map_err(|_| too_long("id_str_size", self.id.len(), 65535))?;
        let name_len = u16::try_from(self.name.len())
            .map_err(|_| too_long("name_size", self.name.len(), 65535))?;
        if self.extra_data.len() > SNAPSHOT_EXTRA_DATA_LEN_MAX {
            return Err(too_long(
                "extra_data_size",
                self.extra_data.len(),
                SNAPSHOT_EXTRA_DATA_LEN_MAX,
            ));
        }
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&(self.extra_data.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra_data);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        Ok(())
    }
}

/// Decodes `nb_snapshots` entries from `bytes` (the table, starting at the
/// header's snapshots_offset). Bounded by QEMU's limits on the number of
/// snapshots and the table size; every error names the field and its offset
/// in the table.
pub fn decode_snapshot_table(
    bytes: &[u8],
    nb_snapshots: u32,
) -> Result<Vec<SnapshotHeader>, FormatError> {
    if nb_snapshots > SNAPSHOTS_MAX {
        return Err(FormatError::field(
            "qcow2 header",
            "nb_snapshots",
            60,
            format!("{nb_snapshots}, QEMU allows at most {SNAPSHOTS_MAX}"),
        ));
    }
    let mut entries = Vec::with_capacity((nb_snapshots as usize).min(1024));
    let mut pos = 0usize;
    for _ in 0..nb_snapshots {
        // Entries start on 8-byte boundaries; the table itself is cluster
        // aligned, so table-relative alignment is file alignment.
        pos = pad8(pos).unwrap_or(usize::MAX);
        if pos > SNAPSHOT_TABLE_LEN_MAX {
            return Err(FormatError::field(
                STRUCTURE,
                "nb_snapshots",
                pos as u64,
                format!("table larger than QEMU's limit of {SNAPSHOT_TABLE_LEN_MAX} bytes"),
            ));
        }
        let rest = bytes.get(pos..).ok_or(FormatError::Truncated {
            structure: STRUCTURE,
            need: pos as u64,
            have: bytes.len() as u64,
        })?;
        let (entry, len) = SnapshotHeader::decode(rest, pos as u64).map_err(|e| match e {
            FormatError::Truncated { need, .. } => FormatError::Truncated {
                structure: STRUCTURE,
                need: pos as u64 + need,
                have: bytes.len() as u64,
            },
            other => other,
        })?;
        entries.push(entry);
        pos += len;
    }
    Ok(entries)
}

/// The table bytes for `entries`, each entry starting on an 8-byte
/// boundary, with no padding after the last one (as QEMU writes it).
pub fn encode_snapshot_table(entries: &[SnapshotHeader]) -> Result<Vec<u8>, FormatError> {
    let mut out = Vec::new();
    for entry in entries {
        let aligned = pad8(out.len()).unwrap_or(usize::MAX);
        out.resize(aligned, 0);
        entry.encode_into(&mut out)?;
    }
    Ok(out)
}

/// Length in bytes of the encoded table (what QEMU allocates clusters for).
#[must_use]
pub fn snapshot_table_len(entries: &[SnapshotHeader]) -> usize {
    entries.iter().fold(0usize, |pos, e| {
        pad8(pos)
            .unwrap_or(usize::MAX)
            .saturating_add(e.encoded_len())
    })
}
