//! Background checkpoints ([`OpenOptions::background_checkpoint`]): one
//! thread of the image's own applies committed journal transactions in
//! place, so that no guest flush waits for it.
//!
//! Why: a checkpoint writes every committed transaction in place and
//! flushes. With logged data under `O_DIRECT` that is hundreds of writes
//! into fresh clusters, about 100 ms on this project's test guest. Made by
//! the flusher whose commit found the ring (or the logged bytes) past its
//! threshold, that guest's flush waited for all of it; with 8 flushing NBD
//! connections one of them was nearly always inside a checkpoint (an
//! off-CPU profile of `qj serve` put 37% of its waiting there).
//!
//! Ordering: none of its own. A checkpoint already runs beside commits
//! whichever thread makes it (the journal serialises checkpoints with one
//! lock, and a commit that finds the ring full checkpoints inline, as
//! before), so which thread runs it changes no rule. A checkpoint that
//! fails poisons the journal (its own rule), so every later commit fails;
//! the failure is also kept here and refused by every later flush.
//!
//! [`OpenOptions::background_checkpoint`]: crate::OpenOptions::background_checkpoint

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// What the thread is asked to do.
#[derive(Debug, Default)]
struct Requests {
    /// A checkpoint is wanted (set by a commit, cleared when one starts).
    wanted: bool,
    /// The image is closing: the thread ends after any checkpoint it is
    /// making.
    stopping: bool,
    /// The first failed background checkpoint's error.
    failure: Option<String>,
}

/// What [`Checkpointer::next`] tells the thread.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Make a checkpoint.
    Checkpoint,
    /// End.
    Stop,
}

/// The request queue of the checkpoint thread and its handle. std's locks,
/// not the engine's: the thread runs only outside the loom models, and a
/// condition variable is all it needs.
#[derive(Debug, Default)]
pub(crate) struct Checkpointer {
    requests: Mutex<Requests>,
    /// Whether `requests.failure` is set: every flush asks
    /// ([`Self::failure`]), and this spares it the lock.
    failed: AtomicBool,
    wake: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Checkpointer {
    /// Remembers the thread that serves the requests.
    pub(crate) fn started(&self, thread: JoinHandle<()>) {
        let previous = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(thread);
        assert!(previous.is_none(), "one checkpoint thread per image");
    }

    /// Whether a thread serves the requests: started, and not ended by a
    /// failure (its flushers then checkpoint themselves again, and the
    /// failure is refused by [`Self::failure`]).
    pub(crate) fn is_running(&self) -> bool {
        self.thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|thread| !thread.is_finished())
    }

    /// Asks for a checkpoint; returns at once. Requests made while one is
    /// wanted already are the same request.
    pub(crate) fn request(&self) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests.wanted = true;
        self.wake.notify_one();
    }

    /// For the thread: waits until a checkpoint is wanted or the image
    /// closes.
    pub(crate) fn next(&self) -> Next {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded: each wakeup either returns or finds neither flag set
        // (a spurious wakeup), and the flags are only ever set.
        loop {
            if requests.stopping {
                return Next::Stop;
            }
            if requests.wanted {
                requests.wanted = false;
                return Next::Checkpoint;
            }
            requests = self
                .wake
                .wait(requests)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// For the thread: keeps the first failure for [`Self::failure`].
    pub(crate) fn failed(&self, why: String) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        requests.failure.get_or_insert(why);
        self.failed.store(true, Ordering::Release);
    }

    /// The first failed background checkpoint's error, if any.
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .failure
            .clone()
    }

    /// Ends the thread, after any checkpoint it is making, and waits for
    /// it. Idempotent; a no-op without a thread.
    pub(crate) fn stop(&self) {
        let Some(thread) = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stopping = true;
        self.wake.notify_one();
        if thread.join().is_err() {
            self.failed("the checkpoint thread panicked".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn requests_made_before_the_thread_looks_are_one_checkpoint_and_stop_ends_it() {
        let checkpointer = Arc::new(Checkpointer::default());
        checkpointer.request();
        checkpointer.request();
        let served = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let checkpointer = Arc::clone(&checkpointer);
            let served = Arc::clone(&served);
            std::thread::spawn(move || loop {
                let next = checkpointer.next();
                let stop = next == Next::Stop;
                served.lock().unwrap().push(next);
                if stop {
                    return;
                }
            })
        };
        checkpointer.started(thread);
        assert!(checkpointer.is_running());
        checkpointer.stop();
        assert!(!checkpointer.is_running());
        let served = served.lock().unwrap();
        assert_eq!(served.last(), Some(&Next::Stop));
        // Both requests came before the thread ran: at most one checkpoint
        // (none if the stop was seen first).
        assert!(served.len() <= 2, "{served:?}");
        checkpointer.stop();
    }

    #[test]
    fn the_first_failure_is_kept() {
        let checkpointer = Checkpointer::default();
        assert_eq!(checkpointer.failure(), None);
        checkpointer.failed("first".into());
        checkpointer.failed("second".into());
        assert_eq!(checkpointer.failure().as_deref(), Some("first"));
    }
}
