//! Creating an empty qcow2 v3 image.
//!
//! Layout: header cluster, refcount table, refcount blocks covering every
//! initial cluster, then the L1 table. Sizes are found by iterating to a
//! fixed point (more clusters may need more refcount blocks, which may need
//! a bigger table). Everything but the header is written and flushed first,
//! and the header last, so a crash during creation leaves a file that does
//! not open as qcow2 rather than one that points at garbage.

use qj_journal::Storage;
use qj_spec::qcow2::{
    qjournal_feature_names, set_refcount, write_table_entry, Header, HeaderExtension,
};
use qj_spec::units::Geometry;

use crate::error::{Error, IoContext, Result};
use crate::options::{CreateOptions, JournalConfig};

/// QEMU's limit on the L1 table (QCOW_MAX_L1_SIZE): 32 MiB.
pub const L1_BYTES_MAX: u64 = 32 << 20;

/// Checks creation options and returns the geometry they describe.
pub fn geometry_for(opts: &CreateOptions) -> Result<Geometry> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Error::InvalidArgument(format!(
            "cluster_size {cs} must be a power of two from 512 to 2097152"
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 {
        return Err(Error::InvalidArgument(format!(
            "refcount_bits {rb} must be one of 1, 2, 4, 8, 16, 32, 64"
        )));
    }
    Ok(Geometry {
        cluster_bits: cs.trailing_zeros(),
        refcount_order: rb.trailing_zeros(),
    })
}

/// The size of a journal region for `config` on an image with clusters of
/// `cluster_size` bytes, or why it cannot be.
pub fn journal_bytes(config: &JournalConfig, cluster_size: u64) -> Result<u64> {
    let size = config.size_bytes.next_multiple_of(cluster_size);
    // One operation's epoch may hold two fresh tables (an L2 table and a
    // refcount block) besides its sectors, and epochs are kept to a
    // quarter of the ring (`epoch_bytes_max`): 8 clusters and 64 KiB of
    // room cover that with margin.
    let size_min = 8 * cluster_size + (64 << 10);
    if size < size_min || size > JOURNAL_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "journal_size {} must be at least {size_min} bytes (8 clusters of {cluster_size} bytes + 64 KiB) and at most 4 GiB",
            config.size_bytes
        )));
    }
    Ok(size)
}

/// The largest journal region.
pub const JOURNAL_BYTES_MAX: u64 = 1 << 32;

/// Checks every option of `opts` that can be checked without a device:
/// the geometry, the size, the journal. Callers run it before they touch
/// a file, so that bad options never cost an existing file its content.
pub fn validate(opts: &CreateOptions) -> Result<Geometry> {
    let g = geometry_for(opts)?;
    let virtual_size = opts.virtual_size.next_multiple_of(512);
    let l1_entries = g.l1_entries_for(virtual_size);
    if l1_entries * 8 > L1_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "virtual size {virtual_size} needs an L1 table of {} bytes, over the 32 MiB limit; use a larger cluster_size",
            l1_entries * 8
        )));
    }
    if let Some(journal) = &opts.journal {
        journal_bytes(journal, g.cluster_size())?;
    }
    if opts.backing_file.as_deref().is_some_and(|b| b.len() > 1023) {
        return Err(Error::InvalidArgument(
            "the backing file name is longer than 1023 bytes".into(),
        ));
    }
    Ok(g)
}

/// Writes a new, empty image to `storage` (whose previous content is discarded).
pub fn create(storage: &dyn Storage, opts: &CreateOptions) -> Result<()> {
    let g = validate(opts)?;
    let virtual_size = opts.virtual_size.next_multiple_of(512);
    let l1_entries = g.l1_entries_for(virtual_size);
    let cs = g.cluster_size();
    let l1_clusters = g.clusters_for(l1_entries * 8).max(1);
    let rpb = g.refcounts_per_block();
    let (mut table_clusters, mut blocks) = (1u64, 1u64);
    // Bounded: each round can only grow the counts, and they converge in a
    // couple of rounds for any legal geometry.
    for _ in 0..16 {
        let total = 1 + table_clusters + blocks + l1_clusters;
        let need_blocks = total.div_ceil(rpb);
        let need_table = g.clusters_for(need_blocks * 8);
        if need_blocks == blocks && need_table == table_clusters {
            break;
        }
        blocks = need_blocks.max(blocks);
        table_clusters = need_table.max(table_clusters);
    }
    let table_start = 1;
    let blocks_start = table_start + table_clusters;
    let l1_start = blocks_start + blocks;
    let total = l1_start + l1_clusters;
    assert!(
        blocks * rpb >= total && table_clusters * cs / 8 >= blocks,
        "layout did not converge"
    );

    let mut extensions = Vec::new();
    if let Some(fmt) = opts.backing_format {
        extensions.push(HeaderExtension::BackingFormat(fmt.name().to_string()));
    }
    extensions.push(HeaderExtension::FeatureNameTable(qjournal_feature_names()));
    let mut header = Header::new_v3(g, virtual_size);
    header.l1_size = l1_entries as u32;
    header.l1_table_offset = l1_start * cs;
    header.refcount_table_offset = table_start * cs;
    header.refcount_table_clusters = table_clusters as u32;
    header.extensions = extensions;
    header.backing_file = opts.backing_file.clone();
    // Like QEMU, the feature name table is left out when it does not fit in
    // the header cluster (512-byte clusters); it is informational only.
    let header_bytes = match header.encode() {
        Ok(bytes) => bytes,
        Err(_) => {
            header
                .extensions
                .retain(|e| !matches!(e, HeaderExtension::FeatureNameTable(_)));
            header.encode()?
        }
    };

    let mut metadata = vec![0u8; ((total - 1) * cs) as usize];
    let at = |cluster: u64| ((cluster - 1) * cs) as usize;
    for b in 0..blocks {
        write_table_entry(
            &mut metadata[at(table_start)..],
            b as usize,
            (blocks_start + b) * cs,
        );
    }
    for c in 0..total {
        let block = at(blocks_start + c / rpb);
        set_refcount(
            &mut metadata[block..block + cs as usize],
            c % rpb,
            g.refcount_order,
            1,
        );
    }
    storage
        .set_len(0)
        .ctx(|| "truncating the new image".into())?;
    storage
        .write_at(&metadata, cs)
        .ctx(|| "writing the initial tables".into())?;
    // The tables are durable before the header that makes them an image.
    storage
        .flush()
        .ctx(|| "flushing the initial tables".into())?;
    storage
        .write_at(&header_bytes, 0)
        .ctx(|| "writing the header".into())?;
    storage.flush().ctx(|| "flushing the header".into())?;
    Ok(())
}
