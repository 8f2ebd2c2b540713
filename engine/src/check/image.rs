//! The checker's own read of an image: header, refcount table and active
//! L1 table straight from storage, with no engine caches, so that images the
//! engine refuses to open can still be checked.

use qj_journal::Storage;
use qj_spec::qcow2::features::{INCOMPAT_DATA_FILE_BIT, INCOMPAT_EXTL2_BIT};
use qj_spec::qcow2::{Header, HEADER_V3_MIN_LEN};
use qj_spec::units::Geometry;
use qj_spec::FormatError;

use super::error::CheckError;

/// Bits 9..=63 of a refcount table entry: the refcount block's offset.
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bits 0..=8 of a refcount table entry: reserved, must be zero.
pub(crate) const REFT_RESERVED_MASK: u64 = 0x1ff;

/// Reads `len` bytes at `offset` (zeros past the end of the device).
pub(crate) fn read_vec(
    storage: &dyn Storage,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<u8>, CheckError> {
    let len = usize::try_from(len).map_err(|_| CheckError::TooLarge { clusters: len })?;
    let mut buf = vec![0u8; len];
    storage
        .read_at(&mut buf, offset)
        .map_err(CheckError::io(format!("reading {what} at {offset:#x}")))?;
    Ok(buf)
}

/// Big-endian u64 entries of a table of `entries` at `offset`.
pub(crate) fn read_table(
    storage: &dyn Storage,
    offset: u64,
    entries: u64,
    what: &str,
) -> Result<Vec<u64>, CheckError> {
    let bytes = read_vec(storage, offset, entries.saturating_mul(8), what)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes(c.try_into().expect("chunks of 8")))
        .collect())
}

/// What the checker knows about the image's layout.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    pub header: Header,
    pub geometry: Geometry,
    /// Raw refcount table entries (refcount_table_clusters clusters' worth).
    pub reftable: Vec<u64>,
    /// Raw active L1 entries; repairs of COPIED flags update it.
    pub l1_table: Vec<u64>,
}

impl Image {
    /// Reads and decodes the header, without validating it against the
    /// file: a dirty journal may have to be replayed first (spec 3.2), and
    /// the replay may change the header or reach past the end of the file.
    pub fn read_header(storage: &dyn Storage) -> Result<Header, CheckError> {
        let file_len = storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        // A file shorter than the fixed header is truncated, said as
        // such (the same words as an open), not a field of zeros.
        if file_len < u64::from(HEADER_V3_MIN_LEN) {
            Header::decode(&read_vec(storage, 0, file_len, "the header")?)?;
            return Err(FormatError::Truncated {
                structure: "qcow2 header",
                need: u64::from(HEADER_V3_MIN_LEN),
                have: file_len,
            }
            .into());
        }
        let fixed = read_vec(storage, 0, u64::from(HEADER_V3_MIN_LEN), "the header")?;
        let cluster_bits = u32::from_be_bytes(fixed[20..24].try_into().expect("4 bytes"));
        if !(Geometry::CLUSTER_BITS_MIN..=Geometry::CLUSTER_BITS_MAX).contains(&cluster_bits) {
            return Err(FormatError::field(
                "qcow2 header",
                "cluster_bits",
                20,
                format!("{cluster_bits}, must be 9..=21"),
            )
            .into());
        }
        // Read the whole header cluster; Header::decode treats missing bytes
        // of a short file as zeros.
        let cluster = read_vec(storage, 0, 1u64 << cluster_bits, "the header cluster")?;
        Ok(Header::decode(&cluster)?)
    }

    /// Reads and validates the header as QEMU's open does, then loads the
    /// refcount table and the active L1 table.
    pub fn load(storage: &dyn Storage) -> Result<Image, CheckError> {
        let file_len = storage
            .len()
            .map_err(CheckError::io("reading the file length"))?;
        let header = Self::read_header(storage)?;
        let cluster_bits = header.cluster_bits;
        // The snapshot table is validated by the check itself (QEMU's open
        // skips it in check mode so that `check -r all` can repair it).
        let mut layout = header.clone();
        layout.nb_snapshots = 0;
        layout.validate_layout(file_len)?;
        if header.has_incompatible(INCOMPAT_EXTL2_BIT) {
            return Err(CheckError::Unsupported("extended L2 entries".into()));
        }
        if header.has_incompatible(INCOMPAT_DATA_FILE_BIT) {
            return Err(CheckError::Unsupported("external data file".into()));
        }
        let geometry = header.geometry();
        let reftable_entries = (u64::from(header.refcount_table_clusters) << cluster_bits) / 8;
        let reftable = read_table(
            storage,
            header.refcount_table_offset,
            reftable_entries,
            "the refcount table",
        )?;
        let l1_table = read_table(
            storage,
            header.l1_table_offset,
            u64::from(header.l1_size),
            "the active L1 table",
        )?;
        Ok(Image {
            header,
            geometry,
            reftable,
            l1_table,
        })
    }
}

/// Why an on-disk refcount could not be read.
#[derive(Debug)]
pub(crate) enum RefcountReadError {
    /// The refcount table points at a misaligned block.
    Misaligned,
    /// The storage failed.
    Io(std::io::Error),
}

impl RefcountReadError {
    /// As a check error, for repair steps that cannot continue without the
    /// refcount.
    pub fn into_check_error(self, context: &str) -> CheckError {
        let source = match self {
            RefcountReadError::Io(e) => e,
            RefcountReadError::Misaligned => std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "refcount block offset is not cluster aligned",
            ),
        };
        CheckError::Io {
            context: context.to_owned(),
            source,
        }
    }
}

impl std::fmt::Display for RefcountReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefcountReadError::Misaligned => write!(f, "Input/output error"),
            RefcountReadError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// The refcounts stored on disk, read (and, for repairs, written) one
/// refcount block at a time through a one-block write-back buffer.
#[derive(Debug)]
pub(crate) struct DiskRefcounts {
    geometry: Geometry,
    reftable: Vec<u64>,
    /// (refcount table index, block offset, block bytes, dirty).
    block: Option<(u64, u64, Vec<u8>, bool)>,
}

impl DiskRefcounts {
    pub fn new(image: &Image) -> DiskRefcounts {
        DiskRefcounts {
            geometry: image.geometry,
            reftable: image.reftable.clone(),
            block: None,
        }
    }

    /// Loads the block covering `cluster`; `Ok(false)` when there is none
    /// (the refcount is then 0, as in QEMU's qcow2_get_refcount).
    fn load(&mut self, storage: &dyn Storage, cluster: u64) -> Result<bool, RefcountReadError> {
        let index = self
            .geometry
            .refcount_table_index(qj_spec::units::HostCluster(cluster));
        if let Some((loaded, ..)) = &self.block {
            if *loaded == index {
                return Ok(true);
            }
        }
        self.write_back(storage).map_err(RefcountReadError::Io)?;
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
        else {
            return Ok(false);
        };
        let offset = entry & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(false);
        }
        if !self.geometry.is_aligned(offset) {
            return Err(RefcountReadError::Misaligned);
        }
        let mut bytes = vec![0u8; self.geometry.cluster_size() as usize];
        storage
            .read_at(&mut bytes, offset)
            .map_err(RefcountReadError::Io)?;
        self.block = Some((index, offset, bytes, false));
        Ok(true)
    }

    /// Whether a refcount block covers `cluster`.
    pub fn has_block(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
    ) -> Result<bool, RefcountReadError> {
        self.load(storage, cluster)
    }

    /// The refcount stored for `cluster`.
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64, RefcountReadError> {
        if !self.load(storage, cluster)? {
            return Ok(0);
        }
        let (_, _, bytes, _) = self.block.as_ref().expect("loaded");
        let i = self
            .geometry
            .refcount_block_index(qj_spec::units::HostCluster(cluster));
        Ok(qj_spec::qcow2::get_refcount(
            bytes,
            i,
            self.geometry.refcount_order,
        ))
    }

    /// Sets the refcount of `cluster` in the buffered block. The block must
    /// exist (callers only change refcounts they could read as non-zero).
    pub fn set(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
    ) -> Result<(), RefcountReadError> {
        let present = self.load(storage, cluster)?;
        assert!(
            present,
            "setting the refcount of cluster {cluster} without a refcount block"
        );
        assert!(value <= self.geometry.refcount_max());
        let i = self
            .geometry
            .refcount_block_index(qj_spec::units::HostCluster(cluster));
        let order = self.geometry.refcount_order;
        let (_, _, bytes, dirty) = self.block.as_mut().expect("loaded");
        qj_spec::qcow2::set_refcount(bytes, i, order, value);
        *dirty = true;
        Ok(())
    }

    /// Writes the buffered block if it was changed (not flushed: the caller
    /// flushes at the end of its repair step).
    pub fn write_back(&mut self, storage: &dyn Storage) -> std::io::Result<()> {
        if let Some((_, offset, bytes, dirty)) = &mut self.block {
            if *dirty {
                storage.write_at(bytes, *offset)?;
                *dirty = false;
            }
        }
        Ok(())
    }
}
