//! SQLite: the command writer's own connection to the event store, through SQLite's C API
//! (rusqlite, over the same libsqlite3 that sqlx links).
//!
//! sqlx runs each SQLite connection on a thread of its own and hands every statement to it and
//! every row back: for a command batch that is three hand-offs (`BEGIN`, the `INSERT`, `COMMIT`),
//! each a wake-up of another thread that waits for a core while the load generator and the
//! server share two. The writer's fixed cost per batch was mostly those (BENCHMARKS.md). This
//! connection lives on a thread of its own too, but a whole batch, `BEGIN` to `COMMIT`, is one
//! hand-off to it (see [`Native::run`]), with prepared statements kept between batches.
//!
//! The connection is used only while holding the event store's [`Writes`](super::Writes) lock,
//! so it never writes beside sqlx's write connection (which the loyalty policy and the
//! maintenance tasks use) and positions still commit in order.

use super::StoredEvent;
use rusqlite::{params_from_iter, Connection, OpenFlags, OptionalExtension};
use std::borrow::Cow;
use std::path::Path;
use std::sync::mpsc;

/// Something to run on the connection's thread.
type Work = Box<dyn FnOnce(&mut Connection) + Send>;

/// The connection, on its thread; cheap to clone. The thread ends, and closes the connection,
/// when the last clone is dropped.
#[derive(Clone)]
pub struct Native {
    work: mpsc::Sender<Work>,
}

impl Native {
    /// Open the event store's file (already created and migrated by sqlx). `synchronous`: as the
    /// command batches' transactions need it (see `Store::begin_commands`).
    pub fn open(path: &Path, synchronous: &str) -> anyhow::Result<Native> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)?;
        // The same settings as sqlx's connections (see `Store::open`).
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; PRAGMA busy_timeout = 10000; \
             PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 0;"
        ))?;
        conn.set_prepared_statement_cache_capacity(64);
        let (work, queue) = mpsc::channel::<Work>();
        std::thread::Builder::new().name("command-writer".into()).spawn(move || {
            let mut conn = conn;
            for work in queue {
                work(&mut conn);
            }
        })?;
        Ok(Native { work })
    }

    /// Run `work` in one transaction (`BEGIN IMMEDIATE` … `COMMIT`; rolled back on `Err`) on the
    /// connection's thread. (Running it on tokio's own thread with `block_in_place` spared this
    /// hand-off, but every batch then moved a worker's role to another thread, and the runtime
    /// grew to 16 worker threads and 50 MiB more memory under load.)
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut NativeTx) -> Result<T, sqlx::Error> + Send + 'static,
    ) -> Result<T, sqlx::Error> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let job: Work = Box::new(move |conn| {
            let go = || {
                let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(error)?;
                let out = work(&mut NativeTx { tx: &tx })?;
                tx.commit().map_err(error)?;
                Ok(out)
            };
            // The caller may have stopped waiting; the transaction stands or fell regardless.
            let _ = done.send(go());
        });
        self.work.send(job).map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

/// A batch's transaction on the native connection.
pub struct NativeTx<'c> {
    tx: &'c rusqlite::Transaction<'c>,
}

impl NativeTx<'_> {
    /// The newest position (0 when the log is empty).
    pub fn read_head(&self) -> Result<i64, sqlx::Error> {
        self.tx.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |row| row.get(0)).map_err(error)
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub fn read_after(&self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!("SELECT {} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2", super::EVENT_COLUMNS);
        let mut statement = self.tx.prepare_cached(&sql).map_err(error)?;
        let rows = statement.query_map([after, limit], raw_event).map_err(error)?;
        rows.map(event).collect()
    }

    /// Every event of each of these streams, oldest first.
    pub fn read_streams(&self, stream_ids: &[&str]) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let mut statement = self
            .tx
            .prepare_cached(&format!(
                "SELECT {} FROM events WHERE stream_id = ?1 ORDER BY stream_version",
                super::EVENT_COLUMNS
            ))
            .map_err(error)?;
        let mut out = Vec::new();
        for stream_id in stream_ids {
            for row in statement.query_map([stream_id], raw_event).map_err(error)? {
                out.push(event(row)?);
            }
        }
        Ok(out)
    }

    /// Run `sql` (one statement), prepared once per connection.
    pub fn execute(&self, sql: &str, params: &[&dyn rusqlite::ToSql]) -> Result<usize, sqlx::Error> {
        self.tx.prepare_cached(sql).and_then(|mut s| s.execute(params)).map_err(error)
    }

    /// One row of `sql`, if there is one.
    pub fn query_one<T>(
        &self,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
        read: impl FnOnce(&rusqlite::Row) -> rusqlite::Result<T>,
    ) -> Result<Option<T>, sqlx::Error> {
        self.tx.prepare_cached(sql).and_then(|mut s| s.query_row(params, read).optional()).map_err(error)
    }

    /// Append one event; returns its position.
    pub fn insert_event(&self, values: &[&dyn rusqlite::ToSql]) -> Result<i64, sqlx::Error> {
        let mut statement = self
            .tx
            .prepare_cached(
                "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, \
                 recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(error)?;
        statement.execute(params_from_iter(values.iter())).map_err(error)?;
        Ok(self.tx.last_insert_rowid())
    }
}

/// A row of `EVENT_COLUMNS`, its JSON columns still text.
type RawEvent = (i64, String, i64, String, i64, String, String, String);

fn raw_event(row: &rusqlite::Row) -> rusqlite::Result<RawEvent> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?, row.get(6)?, row.get(7)?))
}

fn event(raw: rusqlite::Result<RawEvent>) -> Result<StoredEvent, sqlx::Error> {
    let (position, stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) =
        raw.map_err(error)?;
    let json = |text: &str| serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)));
    Ok(StoredEvent {
        position,
        stream_id,
        stream_version,
        event_type,
        schema_version,
        data: json(&data)?,
        metadata: json(&metadata)?,
        recorded_at,
    })
}

/// A rusqlite error as sqlx's, keeping what callers look at: a constraint that failed (see
/// `is_unique_violation`) and the message.
pub fn error(err: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::Database(Box::new(NativeError(err)))
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct NativeError(rusqlite::Error);

impl sqlx::error::DatabaseError for NativeError {
    fn message(&self) -> &str {
        match &self.0 {
            rusqlite::Error::SqliteFailure(_, Some(message)) => message,
            _ => "SQLite error",
        }
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        self.0.sqlite_error().map(|e| Cow::Owned(e.extended_code.to_string()))
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use rusqlite::ffi;
        match self.0.sqlite_error().map(|e| e.extended_code) {
            Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                sqlx::error::ErrorKind::UniqueViolation
            }
            Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => sqlx::error::ErrorKind::ForeignKeyViolation,
            Some(ffi::SQLITE_CONSTRAINT_NOTNULL) => sqlx::error::ErrorKind::NotNullViolation,
            Some(ffi::SQLITE_CONSTRAINT_CHECK) => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}
