//! SQLite: the command writer's own connection to the event store, through SQLite's C API
//! (rusqlite, over the same libsqlite3 that sqlx links).
//!
//! sqlx runs each SQLite connection on a thread of its own and hands every statement to it and
//! every row back: for a command batch that is three hand-offs (`BEGIN`, the `INSERT`, `COMMIT`),
//! each a wake-up of another thread that waits for a core while the load generator and the
//! server share two. The writer's fixed cost per batch was mostly those (BENCHMARKS.md). This
//! connection lives on a thread of its own too, and the command writer runs there (see
//! [`Native::serve`]): it takes the waiting commands, runs the whole batch, `BEGIN` to `COMMIT`,
//! on the connection with prepared statements kept between batches, and hands the answers on,
//! with no hand-off per batch at all.
//!
//! The connection is used only while holding the event store's [`Writes`](crate::store::Writes) lock,
//! so it never writes beside sqlx's write connection (which the loyalty policy and the
//! maintenance tasks use) and positions still commit in order.

use super::error::error;
use super::heads::{self, Chain, Head, Heads};
use crate::health::Health;
use crate::store::{NewEvent, StoredEvent};
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use std::path::Path;
use std::sync::{mpsc, Arc};

/// Something to run on the connection's thread.
type Work = Box<dyn FnOnce(&mut NativeConn) + Send>;

/// The connection, on its thread; cheap to clone. The thread ends, and closes the connection,
/// when the last clone is dropped and its work is done.
#[derive(Clone)]
pub struct Native {
    work: mpsc::Sender<Work>,
}

/// The connection itself, and the stream heads every append is checked against (see `heads`).
pub struct NativeConn {
    conn: Connection,
    heads: Arc<Heads>,
    /// Told when a commit fails with its outcome unknown (see [`NativeConn::transact`]).
    health: Arc<Health>,
}

impl Native {
    /// Open the event store's file (already created and migrated by sqlx). `synchronous`: as the
    /// command batches' transactions need it (see `Store::begin_commands`).
    pub fn open(path: &Path, synchronous: &str, heads: Arc<Heads>, health: Arc<Health>) -> anyhow::Result<Native> {
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
            let mut conn = NativeConn { conn, heads, health };
            for work in queue {
                work(&mut conn);
            }
        })?;
        Ok(Native { work })
    }

    /// Hand the connection to `work`, on its thread. The command writer runs its whole loop
    /// this way, so a batch is not handed to another thread and back: on two cores shared with
    /// the load, each hand-off is a wake-up that waits for a core. (Running batches on tokio's
    /// own threads with `block_in_place` spared the hand-off too, but every batch then moved a
    /// worker's role to another thread, and the runtime grew to 16 worker threads and 50 MiB
    /// more memory under load.)
    pub fn serve(&self, work: impl FnOnce(&mut NativeConn) + Send + 'static) -> Result<(), sqlx::Error> {
        self.work.send(Box::new(work)).map_err(|_| sqlx::Error::PoolClosed)
    }
}

impl NativeConn {
    /// Run `work` in one transaction (`BEGIN IMMEDIATE` … `COMMIT`; rolled back on `Err`).
    ///
    /// A `COMMIT` that fails for want of space or of the lock is rolled back, and says so. Any
    /// other failure there (an I/O error writing the log) leaves unknown what reached the disk
    /// and what the kernel still holds: writes are stopped (see `health`).
    pub fn transact<T>(
        &mut self,
        work: impl FnOnce(&mut NativeTx) -> Result<T, sqlx::Error>,
    ) -> Result<T, sqlx::Error> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(error)?;
        let out = {
            let mut native = NativeTx { tx: &tx, chain: Chain::new(&self.heads) };
            native.sync()?;
            work(&mut native)?
        };
        if let Err(err) = tx.commit() {
            if !rolled_back(&err) {
                self.health.stop_writes(format!("committing to the event log failed: {err}"));
            }
            return Err(error(err));
        }
        Ok(out)
    }
}

/// A batch's transaction on the native connection.
pub struct NativeTx<'c> {
    tx: &'c rusqlite::Transaction<'c>,
    /// This transaction's appends, checked and chained against the heads.
    chain: Chain<'c>,
}

impl NativeTx<'_> {
    /// Read back what was appended without reaching the heads (as `heads::sync`).
    fn sync(&self) -> Result<(), sqlx::Error> {
        let heads = self.chain.heads();
        let log = self.read_head()?;
        while heads.known() < log {
            let mut statement = self.tx.prepare_cached(heads::sql::EVENTS_BETWEEN).map_err(error)?;
            let rows = statement
                .query_map([heads.known(), log], |row| {
                    Ok((row.get(0)?, Head { version: row.get(1)?, position: row.get(2)? }))
                })
                .map_err(error)?;
            let read = rows.collect::<Result<Vec<(String, Head)>, _>>().map_err(error)?;
            if heads.absorb_read(&read, log) {
                break;
            }
        }
        Ok(())
    }

    /// Where `stream_id` ends, as this transaction sees it.
    fn head(&self, stream_id: &str) -> Result<Option<Head>, sqlx::Error> {
        if let Some(head) = self.chain.get(stream_id) {
            return Ok(Some(head));
        }
        self.query_one(heads::sql::TABLE_HEAD, &[&stream_id], |row| {
            Ok(Head { version: row.get(0)?, position: row.get(1)? })
        })
    }

    /// The newest position (0 when the log is empty).
    pub fn read_head(&self) -> Result<i64, sqlx::Error> {
        self.tx.query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |row| row.get(0)).map_err(error)
    }

    /// Events after `after`, oldest first, at most `limit`.
    pub fn read_after(&self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!(
            "SELECT {} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2",
            crate::store::EVENT_COLUMNS
        );
        let mut statement = self.tx.prepare_cached(&sql).map_err(error)?;
        let rows = statement.query_map([after, limit], raw_event).map_err(error)?;
        rows.map(event).collect()
    }

    /// Every event of each of these streams, oldest first, back along each one's chain.
    pub fn read_streams(&self, stream_ids: &[&str]) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let mut statement = self.tx.prepare_cached(&heads::sql::chain(crate::store::EVENT_COLUMNS)).map_err(error)?;
        let mut out = Vec::new();
        for stream_id in stream_ids {
            let Some(head) = self.head(stream_id)? else { continue };
            let events = statement.query_map([head.position], raw_event).map_err(error)?;
            let events = events.map(event).collect::<Result<Vec<_>, _>>()?;
            heads::check_chain(stream_id, head, &events)?;
            out.extend(events);
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

    /// Append one event, if its version is its stream's next (else a unique violation), chained
    /// to the stream's previous event; returns its position.
    pub fn append_event(
        &mut self,
        event: &NewEvent,
        data: &str,
        metadata: &str,
        recorded_at: &str,
    ) -> Result<i64, sqlx::Error> {
        let previous = self.chain.next(&event.stream_id, event.stream_version, self.head(&event.stream_id)?)?;
        let mut statement = self
            .tx
            .prepare_cached(
                "INSERT INTO events (stream_id, stream_version, previous_position, event_type, schema_version, \
                 data, metadata, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(error)?;
        let schema_version = i64::from(event.schema_version);
        statement
            .execute(rusqlite::params![
                event.stream_id,
                event.stream_version,
                previous,
                event.event_type,
                schema_version,
                data,
                metadata,
                recorded_at
            ])
            .map_err(error)?;
        let position = self.tx.last_insert_rowid();
        self.chain.appended(&event.stream_id, event.stream_version, position);
        Ok(position)
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

/// Whether a failed `COMMIT` is known not to have happened: SQLite rolls back a transaction it
/// could not commit for want of space or of the lock, before any of it is visible.
fn rolled_back(err: &rusqlite::Error) -> bool {
    matches!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}
