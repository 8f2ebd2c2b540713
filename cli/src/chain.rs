//! An image with its backing chain, opened read-only layer by layer, and
//! the guest disk described the way `qemu-img map` describes it: for every
//! extent, which layer (`depth`) provides it, whether that layer has it
//! allocated (`present`), and whether it reads as zeros or is stored data.
//!
//! Each qcow2 layer is opened with its backing ignored so that the engine's
//! map of it says what that layer alone holds; this module walks down the
//! chain for the ranges a layer leaves to its backing file.

use std::path::{Path, PathBuf};

use qj_engine::lock::ImageLock;
use qj_engine::{BackingSource, FileStorage, Image, LockMode, OpenOptions, Storage};
use qj_spec::qcow2::{try_read_table_entry, Header, L1Entry, L2Entry, QCOW2_MAGIC};
use qj_spec::units::{Geometry, GuestCluster};

use crate::error::{engine, io, quoted, CliError, CliResult};

/// Longest backing chain followed: the engine's bound, in every command.
pub const CHAIN_DEPTH_MAX: usize = qj_engine::image::BACKING_CHAIN_DEPTH_MAX;

/// One extent in `qemu-img map`'s terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Index of the layer that provides the extent (0: the image itself).
    pub depth: usize,
    /// Whether that layer has the extent allocated (false: no layer has).
    pub present: bool,
    /// Whether the extent reads as zeros.
    pub zero: bool,
    /// Whether the extent is stored data.
    pub data: bool,
    /// Whether the data is compressed.
    pub compressed: bool,
    /// Host offset of the data in the layer's file, when stored plainly.
    pub offset: Option<u64>,
}

/// What a layer holds for one of its extents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// Stored data (at `offset` when not compressed).
    Data {
        offset: Option<u64>,
        compressed: bool,
    },
    /// Allocated as zeros (a zero-flagged entry).
    Zero,
    /// Not allocated: the backing file (or zeros) shows through.
    Absent,
}

/// One file of the chain.
#[derive(Debug)]
pub enum LayerKind {
    /// A qcow2 image (its own backing ignored) and its header.
    Qcow2 {
        /// The open image.
        image: Box<Image>,
        /// The header as read at open.
        header: Box<Header>,
    },
    /// A raw file.
    Raw {
        /// Its length, which is its virtual size.
        size: u64,
        /// Held while the chain is open.
        _lock: Option<ImageLock>,
    },
}

/// One file of the chain with the name qemu-img would show for it.
#[derive(Debug)]
pub struct Layer {
    /// The path: as given for the top image, the backing name joined to
    /// the directory of the image naming it for the others (as QEMU does).
    pub path: PathBuf,
    /// What the layer is.
    pub kind: LayerKind,
}

impl Layer {
    /// Guest-visible size of this layer.
    #[must_use]
    pub fn virtual_size(&self) -> u64 {
        match &self.kind {
            LayerKind::Qcow2 { image, .. } => image.virtual_size(),
            LayerKind::Raw { size, .. } => *size,
        }
    }

    /// The layer's file name for messages and `map` output.
    #[must_use]
    pub fn file_name(&self) -> String {
        self.path.display().to_string()
    }
}

/// An image and its backing files, top first.
#[derive(Debug)]
pub struct Chain {
    /// The layers; at least one (the image), at most [`CHAIN_DEPTH_MAX`].
    pub layers: Vec<Layer>,
}

/// The path QEMU opens for backing name `name` of the image at `image`.
#[must_use]
pub fn backing_path(image: &Path, name: &str) -> PathBuf {
    let name_path = Path::new(name);
    if name_path.is_absolute() {
        return name_path.to_path_buf();
    }
    match image.parent() {
        Some(dir) => dir.join(name_path),
        None => name_path.to_path_buf(),
    }
}

/// Whether the file at `storage` starts with the qcow2 magic.
pub fn probe_is_qcow2(storage: &dyn Storage) -> std::io::Result<bool> {
    let mut magic = [0u8; 4];
    storage.read_at(&mut magic, 0)?;
    Ok(u32::from_be_bytes(magic) == QCOW2_MAGIC)
}

/// A file's device and inode, which name it whatever path leads to it.
pub fn file_id(path: &Path) -> CliResult<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(io(format!("opening {}", quoted(path))))?;
    Ok((meta.dev(), meta.ino()))
}

/// The files of a backing chain as its headers name them, and what is
/// wrong with it, if anything.
#[derive(Debug)]
pub struct ChainFiles {
    /// Top first: each path with its device and inode.
    pub files: Vec<(PathBuf, (u64, u64))>,
    /// A loop, or a chain deeper than [`CHAIN_DEPTH_MAX`]: what QEMU (and
    /// every `qj` command that opens the chain) refuses.
    pub problem: Option<String>,
}

/// Walks the backing chain of the qcow2 image at `path` by its headers
/// only (a missing or unreadable backing file ends the walk quietly: the
/// commands that need it say so when they open it). Bounded by
/// [`CHAIN_DEPTH_MAX`]; a loop ends the walk where it closes.
pub fn chain_files(path: &Path) -> CliResult<ChainFiles> {
    let mut files = vec![(path.to_path_buf(), file_id(path)?)];
    loop {
        let (above, _) = files.last().expect("the top is always there");
        let Ok(storage) = FileStorage::open(above, false) else {
            break;
        };
        if !probe_is_qcow2(&storage).unwrap_or(false) {
            break;
        }
        let Ok(Some(name)) = Image::read_header(&storage).map(|h| h.backing_file) else {
            break;
        };
        let below = backing_path(above, &name);
        let Ok(id) = file_id(&below) else {
            break;
        };
        if files.iter().any(|(_, seen)| *seen == id) {
            let problem = format!("backing file {} creates an infinite loop", quoted(&below));
            return Ok(ChainFiles {
                files,
                problem: Some(problem),
            });
        }
        if files.len() >= CHAIN_DEPTH_MAX {
            let problem = format!("the backing chain is deeper than {CHAIN_DEPTH_MAX} layers");
            return Ok(ChainFiles {
                files,
                problem: Some(problem),
            });
        }
        files.push((below, id));
    }
    Ok(ChainFiles {
        files,
        problem: None,
    })
}

/// Opens a qcow2 file read-only without its backing file.
pub fn open_layer(path: &Path, lock: LockMode) -> CliResult<(Image, Header)> {
    let opts = OpenOptions {
        backing: BackingSource::Ignore,
        lock,
        ..OpenOptions::read_only()
    };
    let image =
        Image::open_path(path, &opts).map_err(engine(format!("opening {}", quoted(path))))?;
    crate::cmd::warn_about_replay(&image, path);
    let header = Image::read_header(&**image.storage())
        .map_err(engine(format!("reading the header of {}", quoted(path))))?;
    Ok((image, header))
}

impl Chain {
    /// Opens the qcow2 image at `path` and every backing file below it.
    pub fn open(path: &Path, lock: LockMode) -> CliResult<Chain> {
        let (image, header) = open_layer(path, lock)?;
        let mut layers = vec![Layer {
            path: path.to_path_buf(),
            kind: LayerKind::Qcow2 {
                image: Box::new(image),
                header: Box::new(header),
            },
        }];
        // Each file by device and inode: a file met twice is a loop
        // (through symlinks and hard links too).
        let mut seen = vec![file_id(path)?];
        // Bounded: one layer per round, at most CHAIN_DEPTH_MAX rounds.
        while let Some(Layer {
            path: above_path,
            kind: LayerKind::Qcow2 { header, .. },
        }) = layers.last()
        {
            let Some(name) = header.backing_file.clone() else {
                break;
            };
            if layers.len() >= CHAIN_DEPTH_MAX {
                return Err(CliError::failed(
                    format!("opening the backing chain of {}", quoted(path)),
                    format!("the backing chain is deeper than {CHAIN_DEPTH_MAX} layers"),
                ));
            }
            let below = backing_path(above_path, &name);
            let id = file_id(&below)?;
            if seen.contains(&id) {
                return Err(CliError::failed(
                    format!("opening the backing chain of {}", quoted(path)),
                    format!("backing file {} creates an infinite loop", quoted(&below)),
                ));
            }
            seen.push(id);
            let format = header.backing_format().map(str::to_string);
            layers.push(Self::open_backing(&below, format.as_deref(), lock)?);
        }
        Ok(Chain { layers })
    }

    fn open_backing(path: &Path, format: Option<&str>, lock: LockMode) -> CliResult<Layer> {
        let what = || format!("opening backing file {}", quoted(path));
        let is_qcow2 = match format {
            Some("qcow2") => true,
            Some("raw") => false,
            Some(other) => {
                return Err(CliError::failed(
                    what(),
                    format!("unsupported backing format '{other}' (qcow2 or raw)"),
                ))
            }
            None => {
                let storage = FileStorage::open(path, false).map_err(io(what()))?;
                probe_is_qcow2(&storage).map_err(io(what()))?
            }
        };
        let kind = if is_qcow2 {
            let (image, header) = open_layer(path, lock)?;
            LayerKind::Qcow2 {
                image: Box::new(image),
                header: Box::new(header),
            }
        } else {
            let storage = FileStorage::open(path, false).map_err(io(what()))?;
            let size = storage.len().map_err(io(what()))?;
            let lock = ImageLock::acquire(path, false, lock).map_err(engine(what()))?;
            LayerKind::Raw { size, _lock: lock }
        };
        Ok(Layer {
            path: path.to_path_buf(),
            kind,
        })
    }

    /// The top image.
    #[must_use]
    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The guest disk as `qemu-img map` reports it, merged like qemu-img
    /// merges adjacent entries.
    pub fn map(&self) -> CliResult<Vec<MapEntry>> {
        // Each layer is mapped once; the walk down the chain then only
        // looks ranges up in these lists.
        let layer_maps = self
            .layers
            .iter()
            .map(layer_extents)
            .collect::<CliResult<Vec<_>>>()?;
        let mut out = Vec::new();
        let size = self.top().virtual_size();
        self.resolve(&layer_maps, 0, size, 0, &mut out);
        Ok(out)
    }

    /// Appends the entries for guest range `[start, end)` as seen from
    /// layer `depth` down. Recursion depth is bounded by the chain length.
    fn resolve(
        &self,
        layer_maps: &[Vec<(u64, u64, Held)>],
        start: u64,
        end: u64,
        depth: usize,
        out: &mut Vec<MapEntry>,
    ) {
        let extents = &layer_maps[depth];
        let first = extents.partition_point(|(s, len, _)| s + len <= start);
        for &(ext_start, ext_len, held) in &extents[first..] {
            if ext_start >= end {
                break;
            }
            let (s, e) = (ext_start.max(start), (ext_start + ext_len).min(end));
            let entry = |present, zero, data, compressed, offset| MapEntry {
                start: s,
                length: e - s,
                depth,
                present,
                zero,
                data,
                compressed,
                offset,
            };
            match held {
                Held::Data { offset, compressed } => {
                    let offset = offset.map(|o| o + (s - ext_start));
                    push_merged(out, entry(true, false, true, compressed, offset));
                }
                Held::Zero => push_merged(out, entry(true, true, false, false, None)),
                Held::Absent => {
                    let below_end = match self.layers.get(depth + 1) {
                        Some(below) => below.virtual_size().clamp(s, e),
                        None => s,
                    };
                    if below_end > s {
                        self.resolve(layer_maps, s, below_end, depth + 1, out);
                    }
                    if e > below_end {
                        // Past the end of the backing file (or with none):
                        // zeros, allocated nowhere.
                        push_merged(
                            out,
                            MapEntry {
                                start: below_end,
                                length: e - below_end,
                                ..entry(false, true, false, false, None)
                            },
                        );
                    }
                }
            }
        }
    }
}

/// qemu-img's entry_mergeable plus the append.
fn push_merged(out: &mut Vec<MapEntry>, next: MapEntry) {
    if next.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let offsets_follow = match (last.offset, next.offset) {
            (Some(a), Some(b)) => a.checked_add(last.length) == Some(b),
            (None, None) => true,
            _ => false,
        };
        if last.zero == next.zero
            && last.data == next.data
            && last.compressed == next.compressed
            && last.depth == next.depth
            && last.present == next.present
            && last.start + last.length == next.start
            && offsets_follow
        {
            last.length += next.length;
            return;
        }
    }
    out.push(next);
}

/// What `layer` alone holds over its whole guest range, in order.
fn layer_extents(layer: &Layer) -> CliResult<Vec<(u64, u64, Held)>> {
    match &layer.kind {
        LayerKind::Raw { size, .. } => Ok(vec![(
            0,
            *size,
            Held::Data {
                offset: Some(0),
                compressed: false,
            },
        )]),
        LayerKind::Qcow2 { image, header } => {
            let what = format!("mapping {}", quoted(&layer.path));
            let mut walker = PresenceWalker::new(image, header, &what)?;
            let mut out = Vec::new();
            for ext in image.map().map_err(engine(what.clone()))? {
                if ext.data {
                    out.push((
                        ext.start,
                        ext.length,
                        Held::Data {
                            offset: ext.offset,
                            compressed: ext.compressed,
                        },
                    ));
                } else {
                    // The engine (backing ignored) reports both unallocated
                    // and zero-flagged clusters as zeros: tell them apart.
                    walker.split_zero_extent(ext.start, ext.start + ext.length, &mut out)?;
                }
            }
            Ok(out)
        }
    }
}

/// Runs of `image`'s guest bytes, each allocated in this image (true) or
/// left to the backing file or zeros (false), merged like qemu-io's `map`.
///
/// Exact for an image opened read-only, whose tables on disk are what the
/// engine sees. A writable image may hold newer tables in memory only, so
/// there the engine's map alone decides, and a zero-flagged cluster of an
/// image without backing file (which reads like an unallocated one) counts
/// as not allocated.
pub fn top_allocation(image: &Image) -> CliResult<Vec<(u64, u64, bool)>> {
    let what = "mapping the image".to_string();
    let has_backing = image
        .info()
        .map_err(engine(what.clone()))?
        .backing_file
        .is_some();
    let header = if image.is_writable() {
        None
    } else {
        Some(Image::read_header(&**image.storage()).map_err(engine(what.clone()))?)
    };
    let mut walker = header
        .as_ref()
        .map(|h| PresenceWalker::new(image, h, &what))
        .transpose()?;
    let mut runs: Vec<(u64, u64, bool)> = Vec::new();
    let mut push = |start: u64, len: u64, allocated: bool| match runs.last_mut() {
        Some((s, l, a)) if *a == allocated && *s + *l == start => *l += len,
        _ => runs.push((start, len, allocated)),
    };
    for ext in image.map().map_err(engine(what.clone()))? {
        if ext.data {
            push(ext.start, ext.length, true);
            continue;
        }
        match walker.as_mut() {
            Some(w) => {
                let mut pieces = Vec::new();
                w.split_zero_extent(ext.start, ext.start + ext.length, &mut pieces)?;
                for (s, l, held) in pieces {
                    push(s, l, held != Held::Absent);
                }
            }
            // Over a backing file only a zero flag makes an extent read
            // as zeros; without one the two cannot be told apart here.
            None => push(ext.start, ext.length, ext.zero && has_backing),
        }
    }
    Ok(runs)
}

/// Reads L1/L2 entries straight from a read-only image file to learn
/// whether a cluster is allocated in this layer. Valid because the image
/// was opened read-only just now: what is on disk is what the engine sees.
struct PresenceWalker<'a> {
    storage: &'a dyn Storage,
    geometry: Geometry,
    l1: Vec<u8>,
    /// The last L2 table read: (host offset, bytes).
    l2: Option<(u64, Vec<u8>)>,
    what: &'a str,
}

impl<'a> PresenceWalker<'a> {
    fn new(image: &'a Image, header: &Header, what: &'a str) -> CliResult<Self> {
        let storage = &**image.storage();
        // The engine validated l1_size at open; the bound is kept here too
        // so that this allocation never depends on unchecked disk bytes.
        let l1_bytes = (u64::from(header.l1_size) * 8).min(qj_engine::create::L1_BYTES_MAX);
        let mut l1 = vec![0u8; l1_bytes as usize];
        storage
            .read_at(&mut l1, header.l1_table_offset)
            .map_err(io(format!("{what}: reading the L1 table")))?;
        Ok(Self {
            storage,
            geometry: image.geometry(),
            l1,
            l2: None,
            what,
        })
    }

    /// Whether guest cluster `cluster` has an L2 entry other than
    /// unallocated; for clusters without an L2 table, also returns the
    /// first cluster of the next L2 table, so callers can skip ahead.
    fn present(&mut self, cluster: u64) -> CliResult<(bool, Option<u64>)> {
        let g = self.geometry;
        let l1_index = g.l1_index(GuestCluster(cluster));
        let next_table = (l1_index + 1).checked_mul(g.l2_entries());
        let raw_l1 = usize::try_from(l1_index)
            .ok()
            .and_then(|i| try_read_table_entry(&self.l1, i))
            .unwrap_or(0);
        let Some(l2_offset) = L1Entry(raw_l1).l2_offset() else {
            return Ok((false, next_table));
        };
        if self.l2.as_ref().map(|(o, _)| *o) != Some(l2_offset.0) {
            let mut table = vec![0u8; g.cluster_size() as usize];
            self.storage
                .read_at(&mut table, l2_offset.0)
                .map_err(io(format!(
                    "{}: reading L2 table at {l2_offset}",
                    self.what
                )))?;
            self.l2 = Some((l2_offset.0, table));
        }
        let raw = self
            .l2
            .as_ref()
            .and_then(|(_, t)| try_read_table_entry(t, g.l2_index(GuestCluster(cluster)) as usize))
            .unwrap_or(0);
        Ok((
            L2Entry::decode(raw, g.cluster_bits) != L2Entry::Unallocated,
            None,
        ))
    }

    /// Splits a zero extent `[start, end)` into zero-flagged and absent runs.
    fn split_zero_extent(
        &mut self,
        start: u64,
        end: u64,
        out: &mut Vec<(u64, u64, Held)>,
    ) -> CliResult<()> {
        let g = self.geometry;
        let mut pos = start;
        // Bounded: `pos` strictly increases each round (by at least one
        // cluster, or to the end).
        while pos < end {
            let cluster = g.guest_cluster(qj_spec::units::GuestOffset(pos)).0;
            let (present, skip_to) = self.present(cluster)?;
            let cluster_end = match skip_to {
                Some(next) => next.saturating_mul(g.cluster_size()),
                None => (cluster + 1) * g.cluster_size(),
            };
            let piece_end = cluster_end.min(end);
            debug_assert!(piece_end > pos, "map walk made no progress");
            let held = if present { Held::Zero } else { Held::Absent };
            match out.last_mut() {
                Some((s, len, h)) if *h == held && *s + *len == pos => *len += piece_end - pos,
                _ => out.push((pos, piece_end - pos, held)),
            }
            pos = piece_end;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero: false,
            data: true,
            compressed: false,
            offset,
        }
    }

    #[test]
    fn merges_only_contiguous_alike_entries() {
        let mut out = Vec::new();
        push_merged(&mut out, entry(0, 10, Some(100)));
        push_merged(&mut out, entry(10, 10, Some(110)));
        assert_eq!(out, vec![entry(0, 20, Some(100))]);
        push_merged(&mut out, entry(20, 10, Some(500)));
        assert_eq!(out.len(), 2);
        push_merged(
            &mut out,
            MapEntry {
                depth: 1,
                ..entry(30, 10, Some(510))
            },
        );
        assert_eq!(out.len(), 3);
        push_merged(&mut out, entry(40, 0, None));
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn backing_paths_resolve_like_qemu() {
        assert_eq!(
            backing_path(Path::new("top.qcow2"), "base.qcow2"),
            PathBuf::from("base.qcow2")
        );
        assert_eq!(
            backing_path(Path::new("sub/c.qcow2"), "../base.qcow2"),
            PathBuf::from("sub/../base.qcow2")
        );
        assert_eq!(
            backing_path(Path::new("sub/c.qcow2"), "/abs/b.raw"),
            PathBuf::from("/abs/b.raw")
        );
    }
}
