//! SQLite: copy the views' write-ahead log into their file on a thread of its own.
//!
//! By default SQLite checkpoints inside the commit that grows the log past 1,000 pages: that
//! commit copies about 4 MB into the database file and syncs it. For the views' file that commit
//! is the projector's, and view changes then reached their subscribers tens of milliseconds late
//! (P4's p99 was 21–41 ms with it, 10–15 ms without: BENCHMARKS.md). So the views' connection
//! never checkpoints (`wal_autocheckpoint = 0`, see `Store::open`) and this thread does, every
//! [`EVERY`], with `PASSIVE` checkpoints, which never wait for the writer. Once everything in the
//! log is copied, the next commit starts the log over. Should it still grow past [`RESTART_AT`]
//! (a long read kept it from starting over), a `RESTART` checkpoint waits for the writer and
//! makes sure it does. Under the benchmark's steady load the passive checkpoints kept up, but
//! the log seldom found a moment to start over, so it grew to `RESTART_AT` pages (about 75 MB on
//! disk) between restarts, and stayed there.
//!
//! The event store's file keeps SQLite's own checkpoints: its commits are already off the
//! command path (see `commands::flush`).

use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Between two checkpoints.
pub const EVERY: Duration = Duration::from_millis(100);
/// Log pages (4 KiB each) beyond which a checkpoint waits for the writer.
pub const RESTART_AT: i64 = 16_000;

/// Start the thread; it stops soon after `stop` is cancelled.
pub fn start(views: PathBuf, stop: CancellationToken) {
    let spawned = std::thread::Builder::new().name("views-checkpoint".into()).spawn(move || {
        let conn = match rusqlite::Connection::open(&views) {
            Ok(conn) => conn,
            Err(err) => {
                tracing::error!(error = %err, "the views' checkpointer cannot open their file");
                return;
            }
        };
        // NORMAL: a checkpoint syncs the log before copying it and the file before the log
        // starts over, so a power cut cannot corrupt the file.
        if let Err(err) = conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 5000;") {
            tracing::error!(error = %err, "the views' checkpointer cannot set up its connection");
            return;
        }
        let mut mode = "PASSIVE";
        while !stop.is_cancelled() {
            std::thread::sleep(EVERY);
            let started = Instant::now();
            // (busy, pages in the log, pages copied)
            let result = conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| row.get::<_, i64>(1));
            match result {
                Ok(log) => {
                    metrics::histogram!("tally_views_checkpoint_seconds").record(started.elapsed().as_secs_f64());
                    metrics::gauge!("tally_views_wal_pages").set(log as f64);
                    mode = if log > RESTART_AT { "RESTART" } else { "PASSIVE" };
                }
                Err(err) => {
                    metrics::counter!("tally_views_checkpoint_errors_total").increment(1);
                    tracing::warn!(error = %err, "checkpoint of the views' file failed; retrying");
                }
            }
        }
    });
    if let Err(err) = spawned {
        tracing::error!(error = %err, "cannot start the views' checkpointer");
    }
}
