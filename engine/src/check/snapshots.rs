//! Reading the snapshot table for a check (QEMU's
//! qcow2_check_read_snapshot_table): leniently, so that a repair can drop
//! what QEMU drops, and with QEMU's bounds.

use qj_spec::qcow2::{
    SnapshotHeader, SNAPSHOTS_MAX, SNAPSHOT_EXTRA_DATA_LEN_MAX, SNAPSHOT_HEADER_LEN,
    SNAPSHOT_TABLE_LEN_MAX,
};

use super::checker::Checker;
use super::error::CheckError;
use super::image::read_vec;
use super::report::Tally;

/// What the check needs of one snapshot.
#[derive(Clone, Debug)]
pub(crate) struct SnapshotRef {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub extra_data_size: u32,
    /// The whole entry (extra data cut to QEMU's limit) for a rewrite of
    /// the table; `None` when the id or name is not UTF-8.
    pub entry: Option<SnapshotHeader>,
}

/// Extra data every version 3 entry must have: vm_state_size_large and
/// disk_size.
const EXTRA_DATA_V3_MIN: u32 = 16;

impl Checker<'_> {
    /// Reads the snapshot table into `self.snapshots`. Returns false when the
    /// table cannot be read (QEMU then fails the whole check).
    pub fn read_snapshot_table(&mut self, tally: &mut Tally) -> Result<bool, CheckError> {
        let repair = self.mode.fixes_errors();
        let header = &self.image.header;
        let table_offset = header.snapshots_offset;
        let mut nb = header.nb_snapshots;
        let version = header.version;
        let mut nb_reduced = 0u32;
        let mut extra_dropped = 0u32;

        if nb > SNAPSHOTS_MAX && repair {
            self.msg(format!(
                "Discarding {} overhanging snapshots",
                nb - SNAPSHOTS_MAX
            ));
            nb_reduced += nb - SNAPSHOTS_MAX;
            nb = SNAPSHOTS_MAX;
        }
        if nb > SNAPSHOTS_MAX {
            tally.check_errors += 1;
            self.msg("ERROR snapshot table too large".into());
            self.msg(format!(
                "You can force-remove all {} overhanging snapshots with qemu-img check -r all",
                nb - SNAPSHOTS_MAX
            ));
            return Ok(false);
        }
        let table_bytes_min = u64::from(nb) * SNAPSHOT_HEADER_LEN as u64;
        if (i64::MAX as u64 - table_bytes_min) < table_offset
            || !self.image.geometry.is_aligned(table_offset)
        {
            tally.check_errors += 1;
            self.msg("ERROR snapshot table offset invalid".into());
            return Ok(false);
        }

        let mut snapshots = Vec::with_capacity((nb as usize).min(1024));
        let mut offset = table_offset;
        let mut table_len = 0u64;
        let nb_on_disk = nb;
        for i in 0..nb_on_disk {
            let entry_start = offset;
            offset = offset.next_multiple_of(8);
            table_len = table_len.next_multiple_of(8);
            let fixed = read_vec(
                self.storage,
                offset,
                SNAPSHOT_HEADER_LEN as u64,
                "the snapshot table",
            )?;
            let be64 =
                |at: usize| u64::from_be_bytes(fixed[at..at + 8].try_into().expect("8 bytes"));
            let be32 =
                |at: usize| u32::from_be_bytes(fixed[at..at + 4].try_into().expect("4 bytes"));
            let be16 =
                |at: usize| u16::from_be_bytes(fixed[at..at + 2].try_into().expect("2 bytes"));
            let l1_table_offset = be64(0);
            let l1_size = be32(8);
            let id_len = u64::from(be16(12));
            let name_len = u64::from(be16(14));
            let mut extra_data_size = be32(36);
            offset += SNAPSHOT_HEADER_LEN as u64;
            let extra_on_disk = u64::from(extra_data_size);
            if extra_data_size as usize > SNAPSHOT_EXTRA_DATA_LEN_MAX {
                if !repair {
                    tally.check_errors += 1;
                    self.msg(format!(
                        "ERROR failed to read the snapshot table: Too much extra metadata in snapshot table entry {i}"
                    ));
                    self.msg(
                        "You can force-remove this extra metadata with qemu-img check -r all"
                            .into(),
                    );
                    return Ok(false);
                }
                self.msg(format!(
                    "Discarding too much extra metadata in snapshot table entry {i} ({extra_data_size} > {SNAPSHOT_EXTRA_DATA_LEN_MAX})"
                ));
                extra_dropped += 1;
                extra_data_size = SNAPSHOT_EXTRA_DATA_LEN_MAX as u32;
            }
            let extra = read_vec(
                self.storage,
                offset,
                u64::from(extra_data_size),
                "snapshot extra data",
            )?;
            offset += extra_on_disk;
            let id = read_vec(self.storage, offset, id_len, "a snapshot id")?;
            offset += id_len;
            let name = read_vec(self.storage, offset, name_len, "a snapshot name")?;
            offset += name_len;
            table_len +=
                SNAPSHOT_HEADER_LEN as u64 + u64::from(extra_data_size) + id_len + name_len;
            if table_len > SNAPSHOT_TABLE_LEN_MAX as u64 {
                if !repair {
                    tally.check_errors += 1;
                    self.msg(
                        "ERROR failed to read the snapshot table: Snapshot table is too big".into(),
                    );
                    return Ok(false);
                }
                self.msg(format!(
                    "Discarding {} overhanging snapshots (snapshot table is too big)",
                    nb - i
                ));
                nb_reduced += nb - i;
                nb = i;
                offset = entry_start;
                break;
            }
            let entry = match (
                String::from_utf8(id.clone()),
                String::from_utf8(name.clone()),
            ) {
                (Ok(id), Ok(name)) => Some(SnapshotHeader {
                    l1_table_offset,
                    l1_size,
                    id,
                    name,
                    date_sec: be32(16),
                    date_nsec: be32(20),
                    vm_clock_nsec: be64(24),
                    vm_state_size: be32(32),
                    extra_data: extra,
                }),
                _ => None,
            };
            snapshots.push(SnapshotRef {
                l1_table_offset,
                l1_size,
                id: String::from_utf8_lossy(&id).into_owned(),
                name: String::from_utf8_lossy(&name).into_owned(),
                extra_data_size,
                entry,
            });
        }
        debug_assert_eq!(snapshots.len(), nb as usize);
        self.snapshots = snapshots;
        self.snapshots_size = if nb == 0 { 0 } else { offset - table_offset };
        tally.corruptions += u64::from(nb_reduced) + u64::from(extra_dropped);

        if nb_reduced > 0 {
            debug_assert!(repair);
            // Shortening the table only forgets snapshots: their clusters
            // become leaks that the refcount pass frees afterwards, which is
            // why this header write comes first and is flushed on its own.
            self.write(&nb.to_be_bytes(), 60, "nb_snapshots")?;
            self.flush("nb_snapshots")?;
            self.image.header.nb_snapshots = nb;
            tally.corruptions_fixed += u64::from(nb_reduced);
            tally.corruptions -= u64::from(nb_reduced);
        }

        if version >= 3 {
            let verb = if repair { "Repairing" } else { "ERROR" };
            for i in 0..self.snapshots.len() {
                if self.snapshots[i].extra_data_size < EXTRA_DATA_V3_MIN {
                    tally.corruptions += 1;
                    self.msg(format!("{verb} snapshot table entry {i} is incomplete"));
                }
            }
        }
        Ok(true)
    }
}
