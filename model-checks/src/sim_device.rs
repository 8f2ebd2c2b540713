//! A simulated block device with a volatile write cache and a power switch.
//!
//! The device keeps two media: the durable one (what survives a power cut
//! with nothing else) and the latest one (what reads see). Every mutating
//! operation since the last completed flush is kept, in order, in a pending
//! list: after a power cut any subset of them may have reached the medium,
//! and each 512-byte sector of a write independently (see
//! [`crate::crash_states`]).
//!
//! Mutating operations (write, flush, set_len) are numbered from 1; "crash
//! point K" is the state right after operation K completed (K = 0: before
//! any). Reads are not numbered: they change nothing, so a crash before a
//! read is the crash point of the mutating operation before it. Crashing
//! "during" operation K+1 is crash point K, since an interrupted write is
//! just a write of which some sectors were kept.
//!
//! Two ways to crash: [`SimDevice::crash_after`] arms a power cut so that
//! every operation after K fails with [`PowerLost`], as a real process would
//! see its device vanish; and an observer ([`SimDevice::set_observer`]) is
//! shown the crash state of every point, so a whole run can be explored in
//! one pass. The observer sees point K when operation K+1 is about to
//! start (or when [`SimDevice::observe_now`] is called at the end of a
//! run), not when operation K ends: by then the code above has seen every
//! acknowledgement up to K (a guest flush whose device flush was operation
//! K has returned), exactly as with a power cut armed after K.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;
use qj_journal::Storage;

use crate::medium::{Medium, SECTOR_BYTES};

/// Limits of a simulated device; every queue it keeps is bounded.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Writes or `set_len` past this many bytes fail: a buggy allocation
    /// must surface as an I/O error, not as an exhausted host.
    pub capacity_bytes: u64,
    /// Most operations the volatile cache holds; past it the oldest is
    /// written back to the medium, as a real cache evicts.
    pub pending_ops_max: usize,
    /// Most mutating operations one device accepts before failing.
    pub ops_max: u64,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 1 << 30,
            pending_ops_max: 4096,
            ops_max: 1 << 22,
        }
    }
}

/// A mutating operation still in the volatile cache.
#[derive(Clone, Debug)]
pub enum PendingOp {
    /// A write of `data` at `offset`.
    Write {
        /// Device byte offset.
        offset: u64,
        /// The bytes written.
        data: Arc<[u8]>,
    },
    /// A change of the device length.
    SetLen {
        /// The new length.
        len_bytes: u64,
    },
}

impl PendingOp {
    /// How many independent crash units this operation splits into: one per
    /// device sector a write touches, one for a length change.
    #[must_use]
    pub fn units(&self) -> u64 {
        match self {
            PendingOp::Write { offset, data } => {
                if data.is_empty() {
                    return 0;
                }
                let first = offset / SECTOR_BYTES;
                let last = offset.saturating_add(data.len() as u64 - 1) / SECTOR_BYTES;
                last - first + 1
            }
            PendingOp::SetLen { .. } => 1,
        }
    }

    fn apply(&self, medium: &mut Medium) -> io::Result<()> {
        match self {
            PendingOp::Write { offset, data } => medium.write(data, *offset),
            PendingOp::SetLen { len_bytes } => medium.set_len(*len_bytes),
        }
    }
}

/// What a recorded operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceOpKind {
    /// A write of `len_bytes` at `offset`.
    Write {
        /// Device byte offset.
        offset: u64,
        /// Bytes written.
        len_bytes: u64,
    },
    /// A flush.
    Flush,
    /// A length change.
    SetLen {
        /// The new length.
        len_bytes: u64,
    },
}

/// One mutating operation of a device's trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceEntry {
    /// What the operation did.
    pub kind: TraceOpKind,
    /// Crash units pending right after it: the size of the crash-state
    /// space at this crash point.
    pub pending_units: u64,
}

/// The error every operation returns once the power is cut.
#[derive(Debug, thiserror::Error)]
#[error("simulated power loss after device operation {after_op}")]
pub struct PowerLost {
    /// The crash point: operations up to this one completed.
    pub after_op: u64,
}

/// Whether `error` is (or wraps, as its direct payload) a [`PowerLost`].
#[must_use]
pub fn is_power_loss(error: &io::Error) -> bool {
    error.get_ref().is_some_and(|inner| inner.is::<PowerLost>())
}

/// The crash state at one crash point, borrowed from a live device.
#[derive(Debug)]
pub struct CrashSnapshotView<'a> {
    /// The crash point: mutating operations completed so far.
    pub op_index: u64,
    /// The medium as of the last completed flush (plus evicted writes).
    pub durable: &'a Medium,
    /// Operations since then, oldest first.
    pub pending: &'a VecDeque<PendingOp>,
}

impl CrashSnapshotView<'_> {
    /// An owned copy (cheap: pages and write buffers are shared).
    #[must_use]
    pub fn to_owned(&self) -> CrashSnapshot {
        CrashSnapshot {
            op_index: self.op_index,
            durable: self.durable.clone(),
            pending: self.pending.iter().cloned().collect(),
        }
    }
}

/// The crash state at one crash point: a durable medium and the operations
/// that may or may not have reached it.
#[derive(Clone, Debug)]
pub struct CrashSnapshot {
    /// The crash point: mutating operations completed so far.
    pub op_index: u64,
    /// The medium as of the last completed flush (plus evicted writes).
    pub durable: Medium,
    /// Operations since then, oldest first.
    pub pending: Vec<PendingOp>,
}

/// Called when a mutating operation is about to start, with the crash state
/// of the point just before it. It runs with the device locked: it must not
/// use the same device.
pub type Observer = Box<dyn FnMut(&CrashSnapshotView<'_>) + Send>;

struct State {
    durable: Medium,
    latest: Medium,
    pending: VecDeque<PendingOp>,
    ops_done: u64,
    crash_after: Option<u64>,
    trace: Vec<TraceEntry>,
    pending_units: u64,
    observer: Option<Observer>,
}

/// A simulated device; see the module documentation.
pub struct SimDevice {
    config: DeviceConfig,
    state: Mutex<State>,
}

impl fmt::Debug for SimDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.lock();
        f.debug_struct("SimDevice")
            .field("ops_done", &state.ops_done)
            .field("pending", &state.pending.len())
            .field("len_bytes", &state.latest.len_bytes())
            .finish()
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

impl SimDevice {
    /// An empty device.
    #[must_use]
    pub fn new(config: DeviceConfig) -> Self {
        Self::from_medium(Medium::new(), config)
    }

    /// A device whose durable content is `medium`, nothing pending: a
    /// machine coming back after a power cut.
    #[must_use]
    pub fn from_medium(medium: Medium, config: DeviceConfig) -> Self {
        Self {
            config,
            state: Mutex::new(State {
                durable: medium.clone(),
                latest: medium,
                pending: VecDeque::new(),
                ops_done: 0,
                crash_after: None,
                trace: Vec::new(),
                pending_units: 0,
                observer: None,
            }),
        }
    }

    /// Arms a power cut: operations up to `op_index` complete, every later
    /// operation (reads too) fails with [`PowerLost`]. Fails if the device
    /// is already past that point.
    pub fn crash_after(&self, op_index: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        if state.ops_done > op_index {
            return Err(invalid(format!(
                "cannot crash after operation {op_index}: {} already done",
                state.ops_done
            )));
        }
        state.crash_after = Some(op_index);
        Ok(())
    }

    /// Whether the armed power cut has happened.
    #[must_use]
    pub fn has_crashed(&self) -> bool {
        let state = self.state.lock();
        Self::powered_off(&state)
    }

    /// Mutating operations completed so far (the current crash point).
    #[must_use]
    pub fn ops_done(&self) -> u64 {
        self.state.lock().ops_done
    }

    /// The crash state at the current point (after an armed crash: at the
    /// crash point).
    #[must_use]
    pub fn snapshot(&self) -> CrashSnapshot {
        let state = self.state.lock();
        CrashSnapshot {
            op_index: state.ops_done,
            durable: state.durable.clone(),
            pending: state.pending.iter().cloned().collect(),
        }
    }

    /// What reads currently see (durable plus every pending operation).
    #[must_use]
    pub fn latest(&self) -> Medium {
        self.state.lock().latest.clone()
    }

    /// The recorded mutating operations, in order (entry `i` is operation
    /// `i + 1`).
    #[must_use]
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.state.lock().trace.clone()
    }

    /// Installs (or removes) the observer called before every mutating
    /// operation.
    pub fn set_observer(&self, observer: Option<Observer>) {
        self.state.lock().observer = observer;
    }

    /// Calls the observer now, for the current crash point: at the end of a
    /// run, so that the last point is seen too.
    pub fn observe_now(&self) {
        let mut state = self.state.lock();
        Self::notify(&mut state);
    }

    fn powered_off(state: &State) -> bool {
        state.crash_after.is_some_and(|k| state.ops_done >= k)
    }

    fn check_power(state: &State) -> io::Result<()> {
        if Self::powered_off(state) {
            return Err(io::Error::other(PowerLost {
                after_op: state.ops_done,
            }));
        }
        Ok(())
    }

    fn check_capacity(&self, end: u64) -> io::Result<()> {
        if end > self.config.capacity_bytes {
            return Err(invalid(format!(
                "access to byte {end} beyond the simulated capacity of {} bytes",
                self.config.capacity_bytes
            )));
        }
        Ok(())
    }

    fn begin_op(&self, state: &State) -> io::Result<()> {
        Self::check_power(state)?;
        if state.ops_done >= self.config.ops_max {
            return Err(io::Error::other(format!(
                "simulated device operation limit ({}) reached",
                self.config.ops_max
            )));
        }
        Ok(())
    }

    fn finish_op(&self, state: &mut State, kind: TraceOpKind) -> io::Result<()> {
        // The cache is bounded: a full cache writes its oldest operation
        // back, as real ones do. This only removes states that would need a
        // cache larger than `pending_ops_max`.
        while state.pending.len() > self.config.pending_ops_max {
            if let Some(oldest) = state.pending.pop_front() {
                state.pending_units = state.pending_units.saturating_sub(oldest.units());
                oldest.apply(&mut state.durable)?;
            }
        }
        state.ops_done += 1;
        let pending_units = state.pending_units;
        state.trace.push(TraceEntry {
            kind,
            pending_units,
        });
        Ok(())
    }

    fn notify(state: &mut State) {
        let State {
            durable,
            pending,
            ops_done,
            observer,
            ..
        } = state;
        if let Some(observer) = observer.as_mut() {
            observer(&CrashSnapshotView {
                op_index: *ops_done,
                durable,
                pending,
            });
        }
    }
}

impl Storage for SimDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let state = self.state.lock();
        Self::check_power(&state)?;
        state.latest.read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| invalid(format!("write at {offset} overflows")))?;
        let mut state = self.state.lock();
        self.begin_op(&state)?;
        self.check_capacity(end)?;
        if buf.is_empty() {
            return Ok(());
        }
        Self::notify(&mut state);
        state.latest.write(buf, offset)?;
        let op = PendingOp::Write {
            offset,
            data: Arc::from(buf),
        };
        state.pending_units += op.units();
        state.pending.push_back(op);
        self.finish_op(
            &mut state,
            TraceOpKind::Write {
                offset,
                len_bytes: buf.len() as u64,
            },
        )
    }

    fn flush(&self) -> io::Result<()> {
        let mut state = self.state.lock();
        self.begin_op(&state)?;
        Self::notify(&mut state);
        // Durability point: everything written before this flush is now on
        // the medium; nothing is pending any more.
        state.durable = state.latest.clone();
        state.pending.clear();
        state.pending_units = 0;
        self.finish_op(&mut state, TraceOpKind::Flush)
    }

    fn len(&self) -> io::Result<u64> {
        let state = self.state.lock();
        Self::check_power(&state)?;
        Ok(state.latest.len_bytes())
    }

    fn set_len(&self, len_bytes: u64) -> io::Result<()> {
        let mut state = self.state.lock();
        self.begin_op(&state)?;
        self.check_capacity(len_bytes)?;
        Self::notify(&mut state);
        state.latest.set_len(len_bytes)?;
        state.pending.push_back(PendingOp::SetLen { len_bytes });
        state.pending_units += 1;
        self.finish_op(&mut state, TraceOpKind::SetLen { len_bytes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_until_flush_then_durable() {
        let dev = SimDevice::new(DeviceConfig::default());
        dev.write_at(&[1u8; 1000], 100).unwrap();
        let snap = dev.snapshot();
        assert_eq!(snap.op_index, 1);
        assert_eq!(snap.durable.len_bytes(), 0);
        assert_eq!(snap.pending.len(), 1);
        assert_eq!(
            snap.pending[0].units(),
            3,
            "bytes 100..1100 touch sectors 0, 1, 2"
        );
        dev.flush().unwrap();
        let snap = dev.snapshot();
        assert!(snap.pending.is_empty());
        assert_eq!(snap.durable.len_bytes(), 1100);
        assert_eq!(dev.trace().len(), 2);
        assert_eq!(dev.trace()[0].pending_units, 3);
        assert_eq!(dev.trace()[1].pending_units, 0);
    }

    #[test]
    fn armed_crash_stops_every_later_operation() {
        let dev = SimDevice::new(DeviceConfig::default());
        dev.crash_after(2).unwrap();
        dev.write_at(b"a", 0).unwrap();
        dev.flush().unwrap();
        assert!(dev.has_crashed());
        let err = dev.write_at(b"b", 0).unwrap_err();
        assert!(is_power_loss(&err), "{err}");
        let mut buf = [0u8; 1];
        assert!(is_power_loss(&dev.read_at(&mut buf, 0).unwrap_err()));
        assert!(is_power_loss(&dev.flush().unwrap_err()));
        assert_eq!(dev.snapshot().op_index, 2);
        assert!(dev.crash_after(1).is_err(), "cannot arm a past point");
    }

    #[test]
    fn capacity_and_overflow_are_errors() {
        let dev = SimDevice::new(DeviceConfig {
            capacity_bytes: 4096,
            ..DeviceConfig::default()
        });
        assert!(dev.write_at(&[0u8; 8], 4090).is_err());
        assert!(dev.write_at(&[0u8; 8], u64::MAX - 2).is_err());
        assert!(dev.set_len(5000).is_err());
        assert_eq!(dev.ops_done(), 0);
    }

    #[test]
    fn cache_is_bounded_by_writing_back_the_oldest() {
        let dev = SimDevice::new(DeviceConfig {
            pending_ops_max: 2,
            ..DeviceConfig::default()
        });
        for i in 0..4u8 {
            dev.write_at(&[i + 1], u64::from(i) * 512).unwrap();
        }
        let snap = dev.snapshot();
        assert_eq!(snap.pending.len(), 2);
        let bytes = snap.durable.to_bytes();
        assert_eq!(bytes[0], 1);
        assert_eq!(bytes[512], 2);
    }

    #[test]
    fn observer_sees_every_point() {
        let dev = SimDevice::new(DeviceConfig::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        dev.set_observer(Some(Box::new(move |view: &CrashSnapshotView<'_>| {
            sink.lock().push((view.op_index, view.pending.len()));
        })));
        dev.write_at(b"x", 0).unwrap();
        dev.set_len(10).unwrap();
        dev.flush().unwrap();
        dev.observe_now();
        assert_eq!(*seen.lock(), vec![(0, 0), (1, 1), (2, 2), (3, 0)]);
    }
}
