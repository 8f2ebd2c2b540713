//! Backing files: where unallocated clusters read from.

use std::sync::Arc;

use qj_journal::Storage;

use crate::error::{IoContext, Result};
use crate::image::Image;

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
