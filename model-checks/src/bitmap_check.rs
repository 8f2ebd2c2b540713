//! The bitmap check after every crash, for the `*-bitmap` engine targets:
//! the image gets an enabled persistent bitmap at creation (its last clean
//! state: nothing allocated), and after recovery every guest range the
//! image stores data for must lie in set bits. On the journal the bitmap
//! must also still be consistent (never `in_use`); on flush ordering a
//! bitmap `in_use` after the crash is what QEMU promises, and passes.

use std::sync::Arc;

use qj_engine::{BackingSource, Image, OpenOptions};
use qj_journal::Storage;

use crate::engine_target::engine_err;
use crate::target::TargetError;

/// The bitmap the crash targets carry.
pub const CRASH_BITMAP: &str = "crash";

/// Adds the enabled bitmap [`CRASH_BITMAP`], one bit per cluster, to the
/// freshly created image on `dev` and closes it cleanly.
pub(crate) fn add_crash_bitmap(
    dev: Arc<dyn Storage>,
    opts: &OpenOptions,
    cluster_size: u64,
) -> Result<(), TargetError> {
    let image = Image::open(dev, opts).map_err(engine_err)?;
    image
        .bitmap_add(CRASH_BITMAP, cluster_size, false)
        .map_err(engine_err)?;
    image.close().map_err(engine_err)
}

/// Checks the recovered image on `dev` (read-only: nothing is written).
/// `exact`: the journal's guarantee (present, consistent, covering every
/// stored range); otherwise flush ordering's (in use, or covering).
pub(crate) fn check_crash_bitmap(dev: Arc<dyn Storage>, exact: bool) -> Result<(), TargetError> {
    let opts = OpenOptions {
        backing: BackingSource::Ignore,
        ..OpenOptions::read_only()
    };
    let image = Image::open(dev, &opts).map_err(engine_err)?;
    let corrupt = |what: String| TargetError::Corrupt { what, offset: 0 };
    let Some(info) = image.bitmaps().into_iter().find(|b| b.name == CRASH_BITMAP) else {
        if exact {
            return Err(corrupt(format!(
                "bitmap {CRASH_BITMAP:?} is gone after the crash ({})",
                image.bitmap_problem().unwrap_or_default()
            )));
        }
        // Flush ordering: a recovery open found it in use and dropped it
        // (autoclear bit 0 cleared), as QEMU would.
        return Ok(());
    };
    if info.dirty_bytes.is_none() {
        if exact {
            return Err(corrupt(format!(
                "bitmap {CRASH_BITMAP:?} is in use after the crash on the journal"
            )));
        }
        return Ok(());
    }
    let dirty = image
        .bitmap_dirty_ranges(CRASH_BITMAP)
        .map_err(engine_err)?;
    let covered = |start: u64, end: u64| dirty.iter().any(|&(s, len)| s <= start && end <= s + len);
    for extent in image.map().map_err(engine_err)? {
        if extent.data && !covered(extent.start, extent.start + extent.length) {
            return Err(corrupt(format!(
                "guest bytes {}..{} hold data written since the bitmap's clean state, but bitmap {CRASH_BITMAP:?} does not cover them (dirty: {dirty:?})",
                extent.start,
                extent.start + extent.length
            )));
        }
    }
    Ok(())
}
