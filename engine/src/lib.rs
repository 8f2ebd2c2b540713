//! qcow2 images on two metadata backends: flush ordering and the qjournal.
//!
//! Start at [`Image`]: create or open an image, then read, write, zero,
//! discard, flush, resize and close it from any number of threads. Every
//! metadata change flows through the cluster-management interface in
//! [`backend`].

pub mod backend;
pub mod cache;
pub mod check;
pub mod compressed;
pub mod create;
pub mod dedup;
pub mod dirty_bitmap;
pub mod error;
pub mod free_index;
pub mod image;
pub mod lock;
pub mod log_writes;
pub mod metadata_map;
pub mod mutation;
pub mod options;
pub mod refcount;
pub mod stats;
pub mod sync;

pub use backend::{BackendKind, MetadataBackend};
pub use error::{Error, Result};
pub use image::{create_in_memory, BitmapInfo, Image, ImageInfo, JournalInfo, MapExtent};
pub use lock::LockMode;
pub use options::{
    BackingFormat, BackingSource, CacheMode, CreateOptions, JournalConfig, OpenOptions,
};
pub use qj_journal::{FileStorage, MemStorage, Storage};
pub use stats::Stats;
