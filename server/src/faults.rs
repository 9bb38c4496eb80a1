//! Faults the fault suite (`server/tests/faults.rs`) switches on in a running server, where no
//! real fault can be made on demand: a disk whose sync fails, a consumer that panics, a writer
//! that stalls, an event no consumer can apply.
//!
//! They are reached only through [`ServeArgs::faults`](crate::config::ServeArgs), which no flag,
//! environment variable or request can set: only Rust code that builds the server itself (the
//! tests) holds the switches, so a deployed server never has one on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Clone, Default)]
pub struct Faults {
    fail_log_sync: Arc<AtomicBool>,
    panic_consumer: Arc<Mutex<Option<String>>>,
    hold_writer: Arc<WriterHold>,
    /// Streams whose events after a position no consumer can apply, until cured.
    poison: Arc<Mutex<Vec<(String, i64)>>>,
    /// Whether `poison` holds any (read before every batch: no lock while none does).
    poisoning: Arc<AtomicBool>,
}

/// A stall of the command writer: while `held`, it waits before committing its next batch.
#[derive(Default)]
struct WriterHold {
    held: AtomicBool,
    /// Told when the writer has stopped at the hold, and when the hold is let go.
    reached: tokio::sync::Notify,
    released: tokio::sync::Notify,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults").finish_non_exhaustive()
    }
}

impl Faults {
    /// From now on every sync of the event log fails, as on a disk that lost the writes.
    pub fn fail_log_sync(&self) {
        self.fail_log_sync.store(true, Ordering::SeqCst);
    }

    /// The SQLite flusher asks before each sync.
    pub fn log_sync_fails(&self) -> bool {
        self.fail_log_sync.load(Ordering::SeqCst)
    }

    /// The next batch the consumer `name` applies panics (once).
    pub fn panic_consumer_once(&self, name: &str) {
        *self.panic_consumer.lock().unwrap_or_else(PoisonError::into_inner) = Some(name.to_string());
    }

    /// The consumer runner asks before each batch; true once after [`panic_consumer_once`].
    pub fn take_consumer_panic(&self, name: &str) -> bool {
        let mut armed = self.panic_consumer.lock().unwrap_or_else(PoisonError::into_inner);
        if armed.as_deref() == Some(name) {
            *armed = None;
            return true;
        }
        false
    }

    /// From now on every event of `stream_id` after `position` fails in every consumer, as an
    /// event a bug in the consumers cannot apply, until [`cure`](Self::cure).
    pub fn poison_stream(&self, stream_id: &str, position: i64) {
        self.poison.lock().unwrap_or_else(PoisonError::into_inner).push((stream_id.to_string(), position));
        self.poisoning.store(true, Ordering::SeqCst);
    }

    /// The bug is fixed: every event applies again.
    pub fn cure(&self) {
        self.poison.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.poisoning.store(false, Ordering::SeqCst);
    }

    /// Whether a consumer must fail on the event at `position` of `stream_id` (the runner asks
    /// before applying a batch).
    pub fn poisoned(&self, stream_id: &str, position: i64) -> bool {
        if !self.poisoning.load(Ordering::Relaxed) {
            return false;
        }
        let poison = self.poison.lock().unwrap_or_else(PoisonError::into_inner);
        poison.iter().any(|(s, after)| s == stream_id && position > *after)
    }

    /// From now on the command writer stops before committing its next batch (with the batch's
    /// commands already taken from the queue) until [`release_writer`](Self::release_writer).
    pub fn hold_writer(&self) {
        self.hold_writer.held.store(true, Ordering::SeqCst);
    }

    /// Resolves once the writer is waiting at the hold.
    pub async fn writer_held(&self) {
        self.hold_writer.reached.notified().await;
    }

    pub fn release_writer(&self) {
        self.hold_writer.held.store(false, Ordering::SeqCst);
        self.hold_writer.released.notify_waiters();
    }

    /// The command writer calls this before each batch: returns at once unless held.
    pub async fn writer_gate(&self) {
        let hold = &self.hold_writer;
        while hold.held.load(Ordering::SeqCst) {
            let released = hold.released.notified();
            tokio::pin!(released);
            // Registered before checking again, so a release in between is not missed.
            released.as_mut().enable();
            if !hold.held.load(Ordering::SeqCst) {
                break;
            }
            hold.reached.notify_one();
            released.await;
        }
    }
}
