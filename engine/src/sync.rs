//! The one place the engine takes its locks and atomics from, so that the
//! loom models (`model-checks`) can swap in loom's versions and run the
//! production code.

pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
pub use std::sync::Arc;
