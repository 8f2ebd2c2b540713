//! Backing files: where unallocated clusters read from.

use std::path::Path;
use std::sync::Arc;

use qj_journal::Storage;

use qj_journal::FileStorage;
use qj_spec::qcow2::{Header, HeaderExtension};

use super::Image;
use crate::error::{Error, IoContext, Result};
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

impl Image {
    pub(super) fn open_backing(header: &Header, opts: &OpenOptions) -> Result<Option<Backing>> {
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
                Backing::Raw { storage, size }
            }
            BackingFormat::Qcow2 => {
                let mut bopts = OpenOptions::read_only();
                bopts.cache_bytes_max = opts.cache_bytes_max;
                if let BackingSource::FromHeader = opts.backing {
                    let mut path = std::path::PathBuf::from(&name);
                    if path.is_relative() {
                        if let Some(dir) = &opts.base_dir {
                            path = dir.join(path);
                        }
                    }
                    bopts.base_dir = path.parent().map(Path::to_path_buf);
                }
                let image = Image::open(storage, &bopts).map_err(|e| backing_err(e.to_string()))?;
                Backing::Qcow2(Box::new(image))
            }
        }))
    }
}
