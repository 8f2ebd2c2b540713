//! Backing files: where unallocated clusters read from.

use std::path::Path;
use std::sync::Arc;

use qj_journal::Storage;

use qj_journal::FileStorage;
use qj_spec::qcow2::{Header, HeaderExtension};

use super::Image;
use crate::error::{Error, IoContext, Result};
use crate::lock::ImageLock;
use crate::options::{BackingFormat, BackingSource, OpenOptions};

/// An opened backing file, read-only.
#[derive(Debug)]
pub enum Backing {
    /// A raw disk image of `size` bytes.
    Raw {
        /// The device.
        storage: Arc<dyn Storage>,
        /// Its length in bytes: reads past it return zeros.
        size: u64,
        /// Held while the overlay is open.
        _lock: Option<ImageLock>,
    },
    /// A qcow2 image (which may have a backing file of its own).
    Qcow2(Box<Image>),
}

impl Backing {
    /// The guest-visible size of the backing disk.
    pub fn size(&self) -> u64 {
        match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(image) => image.virtual_size(),
        }
    }

    /// Reads guest bytes at `offset`. The backing disk may be smaller than
    /// the image: bytes past its end read as zeros.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.size();
        let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { storage, .. } => storage
                .read_at(head, offset)
                .ctx(|| format!("reading backing file at {offset:#x}")),
            Backing::Qcow2(image) => image.read(head, offset),
        }
    }
}

/// The longest backing chain any command opens (the image itself and its
/// backing files). Each layer is one nested open, so the bound is also what
/// keeps a deep chain from exhausting the stack.
pub const BACKING_CHAIN_DEPTH_MAX: usize = 64;

/// The files of a backing chain being opened, top first, by device and
/// inode (so symlinks and hard links are the same file): a file met twice
/// is a loop, which QEMU refuses as "creates an infinite loop".
#[derive(Debug, Default)]
pub(super) struct ChainWalk {
    files: Vec<(u64, u64)>,
}

impl ChainWalk {
    /// Records the file at `path` as the next layer, named `name`.
    pub(super) fn enter(&mut self, path: &Path, name: &str) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| Error::Backing {
            name: name.into(),
            reason: format!("cannot open {}: {e}", path.display()),
        })?;
        let id = (meta.dev(), meta.ino());
        if self.files.contains(&id) {
            return Err(Error::Backing {
                name: name.into(),
                reason: format!(
                    "{} creates an infinite loop (it is already in the backing chain)",
                    path.display()
                ),
            });
        }
        if self.files.len() >= BACKING_CHAIN_DEPTH_MAX {
            return Err(Error::Backing {
                name: name.into(),
                reason: format!(
                    "the backing chain is deeper than {BACKING_CHAIN_DEPTH_MAX} layers"
                ),
            });
        }
        self.files.push(id);
        Ok(())
    }
}

impl Image {
    pub(super) fn open_backing(
        header: &Header,
        opts: &OpenOptions,
        chain: &mut ChainWalk,
    ) -> Result<Option<Backing>> {
        let Some(name) = header.backing_file.clone() else {
            return Ok(None);
        };
        let named_format = header.extensions.iter().find_map(|e| match e {
            HeaderExtension::BackingFormat(f) => Some(f.clone()),
            _ => None,
        });
        let backing_err = |reason: String| Error::Backing {
            name: name.clone(),
            reason,
        };
        let mut lock = None;
        let (storage, format): (Arc<dyn Storage>, Option<BackingFormat>) = match &opts.backing {
            BackingSource::Ignore => return Ok(None),
            BackingSource::Given(s, f) => (s.clone(), Some(*f)),
            BackingSource::FromHeader => {
                let mut path = std::path::PathBuf::from(&name);
                if path.is_relative() {
                    if let Some(dir) = &opts.base_dir {
                        path = dir.join(path);
                    }
                }
                chain.enter(&path, &name)?;
                // Locked like a read-only open: a backing file must not
                // change under the overlay (QEMU does the same).
                lock = ImageLock::acquire(&path, false, opts.lock)?;
                let file = FileStorage::open(&path, false)
                    .map_err(|e| backing_err(format!("cannot open {}: {e}", path.display())))?;
                let format = match named_format.as_deref() {
                    None => None,
                    Some(f) => Some(BackingFormat::parse(f).ok_or_else(|| {
                        backing_err(format!("unsupported backing format {f:?} (qcow2 or raw)"))
                    })?),
                };
                (Arc::new(file), format)
            }
        };
        let format = match format {
            Some(f) => f,
            None => {
                // No format named: probe the magic, as QEMU does.
                let mut magic = [0u8; 4];
                storage
                    .read_at(&mut magic, 0)
                    .ctx(|| "probing the backing file".into())?;
                if u32::from_be_bytes(magic) == qj_spec::qcow2::QCOW2_MAGIC {
                    BackingFormat::Qcow2
                } else {
                    BackingFormat::Raw
                }
            }
        };
        Ok(Some(match format {
            BackingFormat::Raw => {
                let size = storage
                    .len()
                    .ctx(|| "reading the backing file length".into())?;
                Backing::Raw {
                    storage,
                    size,
                    _lock: lock,
                }
            }
            BackingFormat::Qcow2 => {
                let mut bopts = OpenOptions::read_only();
                bopts.cache_bytes_max = opts.cache_bytes_max;
                bopts.lock = opts.lock;
                if let BackingSource::FromHeader = opts.backing {
                    let mut path = std::path::PathBuf::from(&name);
                    if path.is_relative() {
                        if let Some(dir) = &opts.base_dir {
                            path = dir.join(path);
                        }
                    }
                    bopts.base_dir = path.parent().map(Path::to_path_buf);
                }
                let mut image =
                    Image::open_in_chain(storage, &bopts, chain).map_err(|e| match e {
                        // The loop or depth is named by the layer that found it.
                        e @ Error::Backing { .. } => e,
                        e => backing_err(e.to_string()),
                    })?;
                image.lock = lock;
                Backing::Qcow2(Box::new(image))
            }
        }))
    }
}
