//! The qcow2 on-disk format (docs/interop/qcow2.txt in QEMU): header,
//! extensions, feature bits, L1/L2/refcount tables, snapshot table and
//! bitmap directory, plus the qjournal's header extension and feature bits.

pub mod bitmap;
pub mod bitmap_rules;
mod bytes;
pub mod dedup_index;
pub mod extension;
pub mod features;
pub mod header;
pub mod l1;
pub mod l2;
pub mod refcount;
pub mod snapshot;
pub mod table;

pub use bitmap::*;
pub use bitmap_rules::*;
pub use extension::*;
pub use features::{qjournal_feature_names, FeatureKind, FeatureName};
pub use header::*;
pub use l1::L1Entry;
pub use l2::*;
pub use refcount::{get_refcount, set_refcount, used_entries};
pub use snapshot::*;
pub use table::*;

/// The first four bytes of every qcow2 image ("QFI\xfb").
pub const QCOW2_MAGIC: u32 = 0x5146_49fb;
