//! SQLite: copy each file's write-ahead log into the file on a thread of its own.
//!
//! By default SQLite checkpoints inside the commit that grows the log past 1,000 pages: that
//! commit copies about 4 MB into the database file and syncs it, while every writer behind it
//! waits. For the views' file that commit is the projector's, and view changes then reached their
//! subscribers tens of milliseconds late (P4's p99 was 21–41 ms with it, 10–15 ms without). For
//! the event store's file it is the command writer's, which commits one batch at a time, so every
//! command queued behind the batch waited too (P3 gained 1.11 ×, though a rare stall got longer:
//! docs/benchmark-history.md, 2026-11-30).
//! So no connection checkpoints (`wal_autocheckpoint = 0`, see `Store::open`) and a thread per
//! file does, every [`EVERY`], with `PASSIVE` checkpoints, which never wait for the writer. Once
//! everything in the log is copied, the next commit starts the log over. Should it still grow
//! past [`RESTART_AT`] (a long read kept it from starting over), a `RESTART` checkpoint waits for
//! the writer and makes sure it does. Under the benchmark's steady load the passive checkpoints
//! kept up, but the log seldom found a moment to start over, so it grew to `RESTART_AT` pages
//! (about 75 MB on disk) between restarts, and stayed there.

use crate::health::Health;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Between two checkpoints.
pub const EVERY: Duration = Duration::from_millis(100);
/// Log pages (4 KiB each) beyond which a checkpoint waits for the writer.
pub const RESTART_AT: i64 = 16_000;

/// Start the thread for `file` (`which` names it in logs and metrics); it stops soon after `stop`
/// is cancelled. Should checkpointing panic, it starts over after a second (counted on `health`):
/// without it the log would grow without end.
pub fn start(file: PathBuf, which: &'static str, stop: CancellationToken, health: Arc<Health>) {
    let part = if which == "events" { "events checkpointer" } else { "views checkpointer" };
    let spawned = std::thread::Builder::new().name(format!("{which}-checkpoint")).spawn(move || {
        while !stop.is_cancelled() {
            let run = std::panic::AssertUnwindSafe(|| checkpoint_until_stopped(&file, which, &stop));
            let reason = match std::panic::catch_unwind(run) {
                Ok(Ok(())) => continue,
                Ok(Err(err)) => err,
                Err(panic) => format!("panicked: {}", crate::health::panic_message(panic.as_ref())),
            };
            tracing::error!(file = which, %reason, "the checkpointer stopped; restarting");
            health.restarted(part, &reason);
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    if let Err(err) = spawned {
        tracing::error!(file = which, error = %err, "cannot start a checkpointer");
    }
}

/// Checkpoint `file` every [`EVERY`] until `stop`; `Err` when its connection cannot be set up.
fn checkpoint_until_stopped(file: &Path, which: &'static str, stop: &CancellationToken) -> Result<(), String> {
    let conn = rusqlite::Connection::open(file).map_err(|err| format!("cannot open its file: {err}"))?;
    // NORMAL: a checkpoint syncs the log before copying it and the file before the log
    // starts over, so a power cut cannot corrupt the file.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;")
        .map_err(|err| format!("cannot set up its connection: {err}"))?;
    let mut mode = "PASSIVE";
    while !stop.is_cancelled() {
        std::thread::sleep(EVERY);
        let started = Instant::now();
        // (busy, pages in the log, pages copied)
        let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| row.get::<_, i64>(1));
        match result {
            Ok(log) => {
                metrics::histogram!("tally_wal_checkpoint_seconds", "file" => which)
                    .record(started.elapsed().as_secs_f64());
                metrics::gauge!("tally_wal_pages", "file" => which).set(log as f64);
                mode = if log > RESTART_AT { "RESTART" } else { "PASSIVE" };
            }
            Err(err) => {
                metrics::counter!("tally_wal_checkpoint_errors_total", "file" => which).increment(1);
                tracing::warn!(file = which, error = %err, "checkpoint failed; retrying");
            }
        }
    }
    Ok(())
}
