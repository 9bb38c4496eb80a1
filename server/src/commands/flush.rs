//! SQLite: make command batches durable behind the write connection, not on it.
//!
//! With `synchronous=FULL` every command batch's `COMMIT` waits for the disk (about a millisecond
//! here) while holding the one write connection, so the consumers and the next batch wait too:
//! a fifth of the write path's wall time under load. Instead the batch commits with
//! `synchronous=NORMAL` (its frames are in the write-ahead log, in the OS's cache) and hands its
//! answers to the [`Flusher`], which syncs the log file on a thread of its own and only then
//! answers the callers. Acknowledged still means durable (API.md): the sync covers every frame
//! written before it, and SQLite's recovery keeps the log only up to the first frame that did not
//! reach the disk, so a commit can never survive a power cut without those before it. Batches
//! that commit while a sync runs wait for the next one: many batches per flush.
//!
//! What changes is that readers may see a batch (a view, a pushed change) a moment before it is
//! durable; after a power cut it would be gone together with everything after it, as if the
//! server had stopped just before. PostgreSQL does not use this: it flushes at commit.

use super::{Answer, CommandError};
use crate::faults::Faults;
use crate::health::{Health, WritesStopped};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

pub type Reply = oneshot::Sender<Result<Answer, CommandError>>;

/// Makes everything committed so far durable (in production: `fdatasync` of the `-wal` file).
pub type SyncFn = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// Answers command batches once what they committed is on disk. Cheap to clone.
#[derive(Clone)]
pub struct Flusher {
    batches: mpsc::UnboundedSender<Vec<(Reply, Result<Answer, CommandError>)>>,
    health: Arc<Health>,
}

impl Flusher {
    /// Sync the write-ahead log of the SQLite database at `database`; a failed sync stops
    /// writes on `health`.
    pub fn for_sqlite(database: PathBuf, health: Arc<Health>, faults: Faults) -> Flusher {
        let mut wal = database.into_os_string();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        Flusher::start(
            Arc::new(move || {
                if faults.log_sync_fails() {
                    return Err(std::io::Error::from_raw_os_error(libc::EIO));
                }
                // Opened per sync: SQLite may recreate the file (when the last connection closes).
                std::fs::File::open(&wal)?.sync_data()
            }),
            health,
        )
    }

    pub fn start(sync: SyncFn, health: Arc<Health>) -> Flusher {
        let (batches, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(sync, rx, health.clone()));
        Flusher { batches, health }
    }

    /// Answer a committed batch after the next sync.
    pub fn answer_after_sync(&self, replies: Vec<(Reply, Result<Answer, CommandError>)>) {
        if let Err(mpsc::error::SendError(replies)) = self.batches.send(replies) {
            // The flusher is gone (shutting down, or its task died): these batches are committed
            // but their durability is unknown, so they are not acknowledged, and nothing after
            // them may be either. Restarting the flusher would not do: a sync now proves nothing
            // about pages the kernel may already have dropped.
            self.health.stop_writes("the event log's flusher stopped; durability of recent commands is unknown".into());
            for (reply, _) in replies {
                let _ = reply.send(Err(CommandError::Unavailable));
            }
        }
    }
}

async fn run(
    sync: SyncFn,
    mut rx: mpsc::UnboundedReceiver<Vec<(Reply, Result<Answer, CommandError>)>>,
    health: Arc<Health>,
) {
    let mut waiting = Vec::new();
    while rx.recv_many(&mut waiting, usize::MAX).await > 0 {
        let sync = sync.clone();
        let started = std::time::Instant::now();
        let synced = match tokio::task::spawn_blocking(move || sync()).await {
            Ok(result) => result,
            Err(panicked) => Err(std::io::Error::other(panicked.to_string())),
        };
        if let Err(err) = &synced {
            // Committed, visible, but maybe not on disk, and after a failed fsync the kernel may
            // have dropped the pages for good: a later sync that succeeds proves nothing. These
            // callers are not told their commands are durable, and no one after them will be.
            metrics::counter!("tally_wal_sync_errors_total").increment(1);
            health.stop_writes(format!("syncing the event log to disk failed: {err}"));
        }
        metrics::histogram!("tally_wal_sync_seconds").record(started.elapsed().as_secs_f64());
        for (reply, result) in waiting.drain(..).flatten() {
            let result = match &synced {
                Ok(()) => result,
                Err(err) => Err(CommandError::WritesStopped(WritesStopped(format!(
                    "syncing the event log to disk failed: {err}; this command may or may not stand"
                )))),
            };
            // The caller may have gone away; the command stands regardless.
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn answer(position: i64) -> Result<Answer, CommandError> {
        let outcome = crate::commands::PurchaseOutcome { transaction_id: "t".into(), position };
        Ok(Answer { outcome: crate::commands::Outcome::Purchase(outcome), replayed: false })
    }

    #[tokio::test]
    async fn answers_wait_for_the_sync_and_carry_its_failure() {
        // A sync that says when it starts, waits for the test to let it finish, and fails the
        // second time.
        let (entered_tx, mut entered) = mpsc::unbounded_channel::<()>();
        let (release, release_rx) = std::sync::mpsc::channel::<std::io::Result<()>>();
        let release_rx = Mutex::new(release_rx);
        let sync: SyncFn = Arc::new(move || {
            let _ = entered_tx.send(());
            let rx = release_rx.lock().map_err(|_| std::io::Error::other("poisoned"))?;
            rx.recv().map_err(std::io::Error::other)?
        });
        let health = Arc::new(Health::default());
        let flusher = Flusher::start(sync, health.clone());

        let (tx, mut rx) = oneshot::channel();
        flusher.answer_after_sync(vec![(tx, answer(7))]);
        entered.recv().await.expect("the sync started");
        assert!(rx.try_recv().is_err(), "answered before the sync finished");
        release.send(Ok(())).expect("sync waiting");
        assert_eq!(rx.await.expect("answered").expect("synced").position(), 7);

        let (tx, rx) = oneshot::channel();
        flusher.answer_after_sync(vec![(tx, answer(8))]);
        entered.recv().await.expect("the sync started");
        release.send(Err(std::io::Error::other("disk gone"))).expect("sync waiting");
        let failed = rx.await.expect("answered");
        assert!(matches!(failed, Err(CommandError::WritesStopped(_))), "a failed sync must not acknowledge");
        assert!(health.writes_stopped().is_some(), "a failed sync stops writes");
    }
}
