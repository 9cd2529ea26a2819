//! Session wake-ups, one per session per batch of arrivals rather than one per message.
//!
//! The bus hands the hub messages one at a time, on the task that reads them from Redis. When
//! every message woke its session at once, the runtime's other worker stole that session and
//! wrote while the reader was still parsing the rest of the read, and on across reads. A burst
//! of 16 messages to one user then went out in about six writes; each write is a syscall and a
//! wake-up of the client, the largest cost of a delivery.
//!
//! So the hub queues frames without waking and marks the session here. The first mark of a batch
//! rings one bell, for a waker task that notifies every marked session. Rung from the reader's
//! worker, the waker lands in tokio's LIFO slot, which other workers do not steal. It therefore
//! runs right after the reader's poll ends, that is, after everything that arrived together.
//! Nothing waits on a timer: when the reader has nothing more, the waker runs at once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// What can be woken: a session's queue. A trait, so this module does not depend on sessions.
pub trait Wake: Send + Sync + 'static {
    fn wake(&self);
}

pub struct Wakeups<T: Wake> {
    marked: Mutex<Vec<Arc<T>>>,
    bell: Notify,
    closed: AtomicBool,
    /// Without a runtime to run the waker (unit tests of the hub), sessions are woken at once.
    immediate: bool,
}

impl<T: Wake> Wakeups<T> {
    /// Starts the waker task on the current runtime; outside one, wakes immediately.
    pub fn start() -> Arc<Self> {
        let handle = tokio::runtime::Handle::try_current().ok();
        let wakeups = Arc::new(Wakeups {
            marked: Mutex::new(Vec::new()),
            bell: Notify::new(),
            closed: AtomicBool::new(false),
            immediate: handle.is_none(),
        });
        if let Some(handle) = handle {
            handle.spawn(wakeups.clone().run());
        }
        wakeups
    }

    /// Wakes `queue`'s session at the end of the current batch. The caller has just queued a
    /// frame and found the session not yet marked.
    pub fn mark(&self, queue: &Arc<T>) {
        if self.immediate {
            queue.wake();
            return;
        }
        let first = match self.marked.lock() {
            Ok(mut marked) => {
                marked.push(queue.clone());
                marked.len() == 1
            }
            // A poisoned list cannot hold the mark: wake now rather than never.
            Err(_) => {
                queue.wake();
                return;
            }
        };
        if first {
            self.bell.notify_one();
        }
    }

    /// Ends the waker task (the hub is going away).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.bell.notify_one();
    }

    async fn run(self: Arc<Self>) {
        let mut batch = Vec::new();
        loop {
            // The bell keeps a permit when rung between two waits: no batch is missed.
            self.bell.notified().await;
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            match self.marked.lock() {
                Ok(mut marked) => std::mem::swap(&mut *marked, &mut batch),
                Err(_) => return,
            }
            for queue in batch.drain(..) {
                queue.wake();
            }
        }
    }
}
