//! Rebuilding the refcount structure from the counted references (QEMU's
//! rebuild_refcount_structure): new refcount blocks and a new refcount
//! table are written into clusters nothing references, then the header is
//! switched to them. The old structure is leaked and freed by the leak pass
//! that follows.

use super::checker::Checker;
use super::error::CheckError;
use super::image::Image;
use super::imrt::Imrt;

/// Bound on the allocate-reftable/rewrite-refblocks rounds: every round that
/// grows the table multiplies what it can describe, so a handful suffices.
const REBUILD_ROUNDS_MAX: u32 = 64;

impl Checker<'_> {
    /// Whether a new structure may be placed in `cluster`: nothing counted
    /// references it and no corrupt entry points at it past the old end of
    /// the file (that entry would then map guest data onto our metadata).
    fn is_free(&self, imrt: &Imrt, cluster: u64) -> bool {
        imrt.get(cluster) == 0
            && !self.beyond_eof.contains(&cluster)
            && !self.holds_live_metadata(cluster)
    }

    /// Whether `cluster` holds the header or the active L1 table: a damaged
    /// image may leave them uncounted (a walk that stopped early), and a
    /// rebuild that wrote its new refcount structure there would destroy
    /// what it is repairing (found by the whole-image fuzz target; QEMU's
    /// repair stops at its overlap check in the same case). The old
    /// refcount structure is not protected: the rebuild replaces it.
    fn holds_live_metadata(&self, cluster: u64) -> bool {
        let header = &self.image.header;
        let g = self.image.geometry;
        let cs = g.cluster_size();
        let within = |offset: u64, bytes: u64| {
            let first = offset / cs;
            let end = offset.saturating_add(bytes.max(1)).div_ceil(cs);
            (first..end).contains(&cluster)
        };
        cluster == 0 || within(header.l1_table_offset, u64::from(header.l1_size) * 8)
    }

    /// Finds `count` contiguous free clusters at or after `*first_free`,
    /// growing the table past the end of the image if needed, and marks them
    /// used (QEMU's alloc_clusters_imrt). Returns the first cluster.
    fn alloc_clusters_imrt(
        &self,
        imrt: &mut Imrt,
        count: u64,
        first_free: &mut u64,
    ) -> Result<u64, CheckError> {
        assert!(count > 0);
        let mut cluster = *first_free;
        let mut run = 0u64;
        let mut first_gap = true;
        while cluster < imrt.clusters() && run < count {
            if self.is_free(imrt, cluster) {
                run += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                run = 0;
            }
            cluster += 1;
        }
        // Past the end of the table, clusters are free unless a corrupt
        // entry points there: skip over those.
        while run < count {
            if self.beyond_eof.contains(&cluster) {
                run = 0;
            } else {
                run += 1;
            }
            cluster += 1;
        }
        let start = cluster - run;
        imrt.grow(start + count).ok_or(CheckError::TooLarge {
            clusters: start + count,
        })?;
        for c in start..start + count {
            debug_assert!(self.is_free(imrt, c));
            imrt.set(c, 1);
        }
        Ok(start)
    }

    /// Writes the refcount blocks covering the in-use clusters of
    /// `[first, end)`, allocating blocks the table lacks. Returns whether
    /// the refcount table had to grow.
    fn write_refblocks(
        &self,
        imrt: &mut Imrt,
        first: u64,
        mut end: u64,
        reftable: &mut Vec<u64>,
    ) -> Result<bool, CheckError> {
        let g = self.image.geometry;
        let block_bits = g.cluster_bits + 3 - g.refcount_order;
        let cluster_size = g.cluster_size();
        let mut grown = false;
        let mut first_free = 0u64;
        let mut cluster = first;
        while cluster < end {
            if imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> block_bits;
            let block_start = index << block_bits;
            let slot =
                usize::try_from(index).map_err(|_| CheckError::TooLarge { clusters: cluster })?;
            let block_offset = match reftable.get(slot) {
                Some(&offset) if offset != 0 => offset,
                _ => {
                    // Never place a block inside a range whose block is
                    // already on disk: that block would miss the refcount.
                    first_free = first_free.max(block_start);
                    let new_cluster = self.alloc_clusters_imrt(imrt, 1, &mut first_free)?;
                    if new_cluster >= end {
                        end = new_cluster + 1;
                    }
                    if reftable.len() <= slot {
                        let entries_per_cluster = (cluster_size / 8) as usize;
                        reftable.resize((slot + 1).next_multiple_of(entries_per_cluster), 0);
                        grown = true;
                    }
                    let offset = new_cluster << g.cluster_bits;
                    reftable[slot] = offset;
                    offset
                }
            };
            self.write(imrt.block(index), block_offset, "a rebuilt refcount block")?;
            cluster = block_start + g.refcounts_per_block();
        }
        Ok(grown)
    }

    /// Replaces the refcount structure with one describing `imrt` exactly
    /// and reloads the image layout.
    pub fn rebuild_refcount_structure(&mut self, imrt: &mut Imrt) -> Result<(), CheckError> {
        let g = self.image.geometry;
        let cluster_size = g.cluster_size();
        let mut reftable: Vec<u64> = Vec::new();
        let grown = self.write_refblocks(imrt, 0, imrt.clusters(), &mut reftable)?;
        assert!(
            grown,
            "the header cluster is always in use, so a table was created"
        );

        let mut placed = None;
        for _ in 0..REBUILD_ROUNDS_MAX {
            let table_clusters = g.clusters_for(reftable.len() as u64 * 8);
            let mut first_free = 0;
            let start = self.alloc_clusters_imrt(imrt, table_clusters, &mut first_free)?;
            placed = Some((start, table_clusters));
            // The table's own clusters changed refcounts: rewrite the blocks
            // covering them (which may need new blocks, growing the table).
            if !self.write_refblocks(imrt, start, start + table_clusters, &mut reftable)? {
                break;
            }
            placed = None;
        }
        let (start, table_clusters) =
            placed.expect("the refcount table size converges within the round bound");
        let table_offset = start << g.cluster_bits;
        let table_clusters_u32 =
            u32::try_from(table_clusters).map_err(|_| CheckError::TooLarge {
                clusters: table_clusters,
            })?;

        let mut bytes = Vec::with_capacity((table_clusters * cluster_size) as usize);
        for entry in &reftable {
            bytes.extend_from_slice(&entry.to_be_bytes());
        }
        bytes.resize((table_clusters * cluster_size) as usize, 0);
        self.write(&bytes, table_offset, "the rebuilt refcount table")?;
        // Ordering: every new refcount block and the new table are durable
        // before the header points at them; until the header write, the old
        // structure stays authoritative and the new clusters are unused.
        self.flush("the rebuilt refcount structure")?;

        let mut pointer = Vec::with_capacity(12);
        pointer.extend_from_slice(&table_offset.to_be_bytes());
        pointer.extend_from_slice(&table_clusters_u32.to_be_bytes());
        self.write(&pointer, 48, "the refcount table pointer")?;
        // Ordering: the switch is durable before the leak pass frees the old
        // structure's clusters through the new one.
        self.flush("the refcount table pointer")?;

        self.file_len = self
            .storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        let l1_table = std::mem::take(&mut self.image.l1_table);
        self.image = Image::load(self.storage)?;
        debug_assert_eq!(
            self.image.l1_table, l1_table,
            "a rebuild does not touch the L1 table"
        );
        Ok(())
    }
}
