//! The one place the engine takes its locks and atomics from, so that the
//! loom models (`model-checks`) run the production code: parking_lot and
//! std normally, loom's under `--cfg loom`, behind the same small API
//! (`lock()`, `read()`, `write()` return guards directly).
//!
//! `Arc` here is for shared state whose reference counts matter to a model
//! (cache entries: eviction reads `strong_count`). Trait objects such as
//! `Arc<dyn Storage>` use `std::sync::Arc`, which loom does not need to see.

#[cfg(not(loom))]
pub use parking_lot::{Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub use std::sync::Arc;

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, MutexGuard, RwLockReadGuard, RwLockWriteGuard};

/// loom's mutex with parking_lot's API (no poisoning in our code paths).
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    /// A new mutex.
    pub fn new(value: T) -> Self {
        Self(loom::sync::Mutex::new(value))
    }

    /// Locks, blocking.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().expect("poisoned")
    }
}

/// loom's reader-writer lock with parking_lot's API.
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct RwLock<T>(loom::sync::RwLock<T>);

#[cfg(loom)]
impl<T> RwLock<T> {
    /// A new lock.
    pub fn new(value: T) -> Self {
        Self(loom::sync::RwLock::new(value))
    }

    /// Shared access, blocking.
    pub fn read(&self) -> RwLockReadGuard<'_, T> {
        self.0.read().expect("poisoned")
    }

    /// Exclusive access, blocking.
    pub fn write(&self) -> RwLockWriteGuard<'_, T> {
        self.0.write().expect("poisoned")
    }
}
