//! The event store and the database behind the views, on SQLite (default) or PostgreSQL.
//!
//! One code path serves both through sqlx's `Any` driver: the SQL below runs unchanged on each
//! (`$1` placeholders, `RETURNING`, `ON CONFLICT`), except that statements with many parameters
//! take theirs from [`params`]. The backend is chosen once, from the URL.
//!
//! Three pools: `write` for what changes the event store (commands, the loyalty policy), `views`
//! for the projections' views and checkpoints, `read` for queries. On SQLite the views are in a
//! file of their own (see `views_file`), and each write pool has one connection: SQLite has one
//! writer per file anyway, and queueing for that connection instead of on the file lock means no
//! `SQLITE_BUSY`, and positions commit in order. That connection is kept out of its pool and lent
//! in turn (see `writes`). On PostgreSQL `views` is `write`.
//!
//! The command writer does not write through sqlx on a SQLite file: while it holds `write`'s
//! lock it runs its whole batch on a native connection of its own (see `native`), so the file
//! still has one writer at a time.

mod append;
pub mod sqlite;
mod writes;

pub use append::{params, select_in, LoadedStream, NewEvent, Streams, MAX_PARAMS};
use sqlite::heads::{self, Heads};
use sqlite::recent::RecentEvents;
use sqlite::{checkpointer, lock};
pub use sqlite::{Native, NativeConn, NativeTx};
pub use writes::{WriteConn, Writes};

use crate::health::Health;
use anyhow::Context;
use serde::Serialize;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Executor, Row};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    pub write: Writes,
    /// Where the projections write their views and checkpoints: on SQLite a file (and a write
    /// connection) of their own, on PostgreSQL the same pool as `write`.
    pub views: Writes,
    pub read: AnyPool,
    pub backend: Backend,
    /// Commands are on disk before they are answered (on SQLite the command writer's flusher
    /// syncs the log, see `flush_behind`); see `begin_consumer`.
    pub durable: bool,
    /// The database file, on SQLite (for `tally rebuild`'s native reader).
    pub sqlite_path: Option<std::path::PathBuf>,
    /// SQLite: the file is in WAL mode (set on every connection; a file system can refuse it).
    wal: bool,
    /// SQLite: the newest appended events, for the consumers (see `recent`). PostgreSQL has
    /// other nodes appending, so its consumers always read the table.
    recent: Option<Arc<RecentEvents>>,
    /// SQLite with a file: the command writer's own connection to the event store, used only
    /// while holding `write` (see `native`).
    pub native: Option<Native>,
    /// SQLite: where each stream ends (the log has no index by stream; see `heads`).
    pub(crate) heads: Option<Arc<Heads>>,
    /// Whether writes are still acknowledged, and how the background parts fare (see `health`).
    pub health: Arc<Health>,
    /// Test hooks, all off unless the fault suite switches them on (see `faults`).
    pub faults: crate::faults::Faults,
    /// SQLite: stops the files' checkpointer threads and the heads' writer, and lets go of the
    /// file's lock (see `lock`), once the last clone of the store is gone.
    _background: Arc<(tokio_util::sync::DropGuard, Option<lock::FileLock>)>,
}

/// A stored event exactly as API.md describes it (`GET /api/members/{id}/events`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct StoredEvent {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i64,
    pub data: serde_json::Value,
    pub metadata: serde_json::Value,
    pub recorded_at: String,
}

pub const EVENT_COLUMNS: &str =
    "position, stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at";

impl StoredEvent {
    pub fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        let json = |col: &str| -> Result<serde_json::Value, sqlx::Error> {
            let text: String = row.try_get(col)?;
            serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        };
        Ok(StoredEvent {
            position: row.try_get("position")?,
            stream_id: row.try_get("stream_id")?,
            stream_version: row.try_get("stream_version")?,
            event_type: row.try_get("event_type")?,
            schema_version: row.try_get("schema_version")?,
            data: json("data")?,
            metadata: json("metadata")?,
            recorded_at: row.try_get("recorded_at")?,
        })
    }

    /// Decode into a domain event enum tagged `{event_type, data}` (see `app::domain`), upcast
    /// from the schema version it was written with to the current one (`app::domain::upcast`).
    pub fn decode<E: serde::de::DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        let data = self.current_data().map_err(<serde_json::Error as serde::de::Error>::custom)?;
        // Moved into the tagged form, not copied again.
        let mut tagged = serde_json::Map::with_capacity(2);
        tagged.insert("event_type".into(), serde_json::Value::String(self.event_type.clone()));
        tagged.insert("data".into(), data);
        serde_json::from_value(serde_json::Value::Object(tagged))
    }

    /// The event's data in the shape of its type's current schema version.
    pub fn current_data(&self) -> Result<serde_json::Value, app::domain::UpcastError> {
        app::domain::upcast(&self.event_type, self.schema_version, self.data.clone())
    }

    /// The event as a reader of the current schema sees it: data upcast, `schema_version` the
    /// current one. An event newer than this server knows stays as stored (its version says so).
    pub fn upcast(mut self) -> StoredEvent {
        if let Ok(data) = self.current_data() {
            self.data = data;
            self.schema_version = i64::from(app::domain::schema_version(&self.event_type));
        }
        self
    }

    /// The id inside a stream name, when the stream has this prefix (`member-42` → `42`).
    pub fn stream_key(&self, prefix: &str) -> Option<&str> {
        self.stream_id.strip_prefix(prefix)
    }
}

/// `DATABASE_URL` as given, or a bare file path, turned into a URL sqlx understands.
pub fn normalize_url(raw: &str) -> String {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        raw.to_string()
    } else if let Some(rest) = raw.strip_prefix("sqlite:") {
        let rest = rest.trim_start_matches("//");
        if rest.contains("mode=") {
            format!("sqlite://{rest}")
        } else if rest.contains('?') {
            format!("sqlite://{rest}&mode=rwc")
        } else {
            format!("sqlite://{rest}?mode=rwc")
        }
    } else {
        format!("sqlite://{raw}?mode=rwc")
    }
}

#[derive(Debug, Clone)]
pub struct PoolSizes {
    pub read: u32,
    pub write: u32,
}

impl Store {
    /// Connect, apply pragmas, run migrations.
    pub async fn open(raw_url: &str, sizes: &PoolSizes, durable: bool) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let url = normalize_url(raw_url);
        let backend = if url.starts_with("postgres") { Backend::Postgres } else { Backend::Sqlite };
        let sqlite_path = match backend {
            Backend::Sqlite => sqlite_file(&url),
            Backend::Postgres => None,
        };
        // Before anything touches the file: one process at a time.
        let file_lock = sqlite_path.as_deref().map(lock::acquire).transpose()?;
        let views_path = sqlite_path.as_deref().map(views_file);
        let synchronous = if durable { "FULL" } else { "NORMAL" };
        // `attach`: the views' file, for connections that read both (see `views_file`).
        let options = |max: u32, attach: Option<String>| {
            AnyPoolOptions::new().max_connections(max).acquire_timeout(Duration::from_secs(30)).after_connect(
                move |conn, _meta| {
                    let attach = attach.clone();
                    Box::pin(async move {
                        if conn.backend_name().eq_ignore_ascii_case("sqlite") {
                            // WAL: readers never block the writer. synchronous=FULL (the default for
                            // statements outside a batch; batches set their own): a commit is on
                            // disk before we acknowledge it (API.md: acknowledged means durable).
                            conn.execute("PRAGMA journal_mode = WAL").await?;
                            conn.execute(format!("PRAGMA synchronous = {synchronous}").as_str()).await?;
                            conn.execute("PRAGMA busy_timeout = 10000").await?;
                            // Statement journals (a multi-row statement's undo, in case it fails
                            // half-way) in memory, not in temporary files: one temp-file write
                            // per page a statement changed was a fifth of the write connection's
                            // system calls.
                            conn.execute("PRAGMA temp_store = MEMORY").await?;
                            // No commit copies its log into the file: threads of their own do
                            // (see `checkpointer`).
                            conn.execute("PRAGMA wal_autocheckpoint = 0").await?;
                            if let Some(path) = attach {
                                sqlx::query("ATTACH DATABASE $1 AS views").bind(path).execute(&mut *conn).await?;
                            }
                        }
                        Ok(())
                    })
                },
            )
        };
        let connect = |options: AnyPoolOptions, url: String| async move {
            options.connect(&url).await.with_context(|| format!("cannot open the database at {}", redact(&url)))
        };
        let write_size = match backend {
            Backend::Sqlite => 1,
            Backend::Postgres => sizes.write.max(2),
        };
        let write = connect(options(write_size, None), url.clone()).await?;
        migrate(&write, backend).await?;
        let views = match &views_path {
            Some(path) => {
                let url = format!("sqlite://{}?mode=rwc", path.display());
                let views = connect(options(1, None), url).await?;
                sqlx::migrate!("./migrations/sqlite-views").run(&views).await.context("running view migrations")?;
                Some(views)
            }
            None => None,
        };
        let attach = views_path.as_ref().map(|p| p.display().to_string());
        let read = connect(options(sizes.read.max(1), attach), url.clone()).await?;
        // A file system may refuse WAL mode (SQLite then keeps a rollback journal); only a
        // write-ahead log can be made durable after the commit (see `flush_behind`).
        let wal = match backend {
            Backend::Sqlite => {
                let row = sqlx::query("PRAGMA journal_mode").fetch_one(&write).await?;
                row.try_get::<String, _>(0)?.eq_ignore_ascii_case("wal")
            }
            Backend::Postgres => false,
        };
        let recent = (backend == Backend::Sqlite).then(Default::default);
        let heads = match backend {
            Backend::Sqlite => {
                let mut conn = write.acquire().await?;
                Some(Arc::new(heads::load(&mut conn).await.context("reading the stream heads")?))
            }
            Backend::Postgres => None,
        };
        let health = Arc::new(Health::default());
        let native = match (&sqlite_path, &heads) {
            (Some(path), Some(heads)) => {
                // As `begin_commands` sets it: with the log synced by the flusher, NORMAL.
                let synchronous = if durable && !wal { "FULL" } else { "NORMAL" };
                let native = Native::open(path, synchronous, heads.clone(), health.clone())
                    .with_context(|| format!("cannot open {} for the command writer", path.display()))?;
                Some(native)
            }
            _ => None,
        };
        // Each SQLite file's one write connection is lent rather than pooled (see `writes`).
        // Without a views file the views are written through the very same `Writes`, so there is
        // still one lender for the one connection.
        let lent = backend == Backend::Sqlite;
        let write = Writes::new(write, lent).guarded(health.clone());
        let views = match views {
            Some(pool) => Writes::new(pool, lent),
            None => write.clone(),
        };
        // Both files are copied out of their logs by threads of their own, not inside commits;
        // the stream heads are written behind the log by a task of their own.
        let stop = tokio_util::sync::CancellationToken::new();
        if let (Some(events), Some(views)) = (&sqlite_path, &views_path) {
            checkpointer::start(events.clone(), "events", stop.clone(), health.clone());
            checkpointer::start(views.clone(), "views", stop.clone(), health.clone());
        }
        if let Some(heads) = &heads {
            let (write, heads, stop) = (write.clone(), heads.clone(), stop.clone());
            crate::health::spawn_supervised(health.clone(), "stream heads writer", stop.clone(), move || {
                heads::flush_behind(write.clone(), heads.clone(), stop.clone())
            });
        }
        let background = Arc::new((stop.drop_guard(), file_lock));
        Ok(Store {
            write,
            views,
            read,
            backend,
            durable,
            sqlite_path,
            wal,
            recent,
            native,
            heads,
            health,
            faults: Default::default(),
            _background: background,
        })
    }

    /// SQLite: the views' own file, next to the database (see `views_file`).
    pub fn views_path(&self) -> Option<std::path::PathBuf> {
        self.sqlite_path.as_deref().map(views_file)
    }

    /// The consumers' checkpoint rows, as a table expression for the read pool: on SQLite with
    /// the views in their own file, the projections' rows are there and the loyalty policy's in
    /// the event store (each commits with what it writes).
    pub fn checkpoints_table(&self) -> &'static str {
        if self.views_path().is_some() {
            "(SELECT name, position, last_error FROM main.checkpoints \
             UNION ALL SELECT name, position, last_error FROM views.checkpoints)"
        } else {
            "checkpoints"
        }
    }

    /// Every consumer's parked streams, for queries on the read pool: on SQLite with the views in
    /// their own file, the event store's (the loyalty policy's) and the views' (the projections').
    pub fn parked_table(&self) -> &'static str {
        if self.views_path().is_some() {
            "(SELECT * FROM main.parked_streams UNION ALL SELECT * FROM views.parked_streams)"
        } else {
            "parked_streams"
        }
    }

    /// The position of the newest committed event (0 when empty).
    pub async fn head(&self) -> Result<i64, sqlx::Error> {
        let row = sqlx::query("SELECT COALESCE(MAX(position), 0) AS head FROM events").fetch_one(&self.read).await?;
        row.try_get::<i64, _>("head")
    }

    /// Events after `after`, in global order.
    pub async fn read_all(&self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2");
        let rows = sqlx::query(&sql).bind(after).bind(limit).fetch_all(&self.read).await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    /// Events after `after`, in global order, from the in-memory tail when it holds all of them
    /// through `head` (see `recent`), else from the table.
    pub async fn read_after(&self, after: i64, limit: i64, head: i64) -> Result<Vec<Arc<StoredEvent>>, sqlx::Error> {
        let limit_events = usize::try_from(limit).unwrap_or(0);
        if let Some(events) = self.recent.as_ref().and_then(|r| r.after(after, limit_events, head)) {
            return Ok(events);
        }
        Ok(self.read_all(after, limit).await?.into_iter().map(Arc::new).collect())
    }

    /// Hand events just committed (in position order) to the stream heads and the in-memory
    /// tail; call after the commit, before giving back the write connection and raising the head.
    pub fn committed(&self, events: Vec<StoredEvent>) {
        if let Some(heads) = &self.heads {
            heads.committed(&events);
        }
        if let Some(recent) = &self.recent {
            recent.push(events);
        }
    }

    /// SQLite: the stream heads, for a write transaction's [`Streams`].
    pub fn heads(&self) -> Option<&Heads> {
        self.heads.as_deref()
    }

    /// SQLite: write every stream head not yet in the table now (it happens about once a
    /// second anyway); returns how many were written.
    pub async fn flush_heads(&self) -> Result<usize, sqlx::Error> {
        match &self.heads {
            Some(heads) => heads::flush(&self.write, heads).await,
            None => Ok(0),
        }
    }

    /// One stream, oldest first.
    pub async fn read_stream(&self, stream_id: &str) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let mut conn = self.read.acquire().await?;
        if let Some(heads) = &self.heads {
            return match heads::read_head(&mut conn, heads, stream_id).await? {
                Some(head) => heads::read_chain(&mut conn, stream_id, head).await,
                None => Ok(Vec::new()),
            };
        }
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version");
        let rows = sqlx::query(&sql).bind(stream_id).fetch_all(&mut *conn).await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").fetch_one(&self.read).await.map(|_| ())
    }

    /// Drop idempotency keys older than `keep` (API.md promises at least 24 hours), at most
    /// `batch` per statement, giving the write connection back between statements: the command
    /// writer waits for at most one small batch, however many keys are due.
    ///
    /// Every scope goes: the clients' (`api:<actor>`) and the loyalty policy's. A policy key is
    /// written in the transaction that also closes its purchase, and a closed purchase is never
    /// handled again, so once the window has passed nothing can ask for it.
    pub async fn prune_idempotency_keys(&self, keep: chrono::Duration, batch: i64) -> Result<u64, sqlx::Error> {
        self.prune_keys_in(None, keep, batch).await
    }

    /// The same, for the keys of one scope only.
    pub async fn prune_keys_in(
        &self,
        scope: Option<&str>,
        keep: chrono::Duration,
        batch: i64,
    ) -> Result<u64, sqlx::Error> {
        let cutoff = crate::clock::rfc3339(chrono::Utc::now() - keep);
        let in_scope = if scope.is_some() { "AND scope = $3" } else { "" };
        let sql = format!(
            "DELETE FROM idempotency_keys WHERE (scope, key) IN \
             (SELECT scope, key FROM idempotency_keys WHERE created_at < $1 {in_scope} LIMIT $2)"
        );
        let mut removed = 0;
        loop {
            let started = std::time::Instant::now();
            let mut conn = self.write.acquire().await?;
            let mut query = sqlx::query(&sql).bind(&cutoff).bind(batch);
            if let Some(scope) = scope {
                query = query.bind(scope);
            }
            let done = query.execute(&mut *conn).await?;
            drop(conn);
            metrics::histogram!("tally_idempotency_prune_batch_seconds").record(started.elapsed().as_secs_f64());
            removed += done.rows_affected();
            if done.rows_affected() < batch.max(1) as u64 {
                return Ok(removed);
            }
            // Let whoever waits for the write connection (the command writer) go first.
            tokio::task::yield_now().await;
        }
    }
}

async fn migrate(pool: &AnyPool, backend: Backend) -> anyhow::Result<()> {
    let migrator = match backend {
        Backend::Sqlite => sqlx::migrate!("./migrations/sqlite"),
        Backend::Postgres => sqlx::migrate!("./migrations/postgres"),
    };
    migrator.run(pool).await.context("running database migrations")?;
    Ok(())
}

/// The file behind a normalized `sqlite://` URL; `None` for in-memory databases.
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.contains("mode=memory") {
        return None;
    }
    Some(path.into())
}

/// SQLite: the file the views live in, next to the database (`tally.db` → `tally.db-views`).
///
/// SQLite lets one connection write a file at a time. With the views in the event store's file,
/// every projection batch held the one write connection the commands need, and command batches
/// waited for it: a command's latency was a command batch plus a projection batch. In a file of
/// their own the projections write beside the commands. Each projection still commits its
/// checkpoint with its views (one file, one transaction). Query connections attach this file as
/// `views`, so SQL names its tables as usual.
///
/// What the split costs: SQLite cannot commit two files atomically in WAL mode, so after a power
/// cut the views' file could hold views of events the log lost with its unsynced tail (the log is
/// synced before commands are answered; the views' file is not synced at commit). `tally serve`
/// checks for that at start (a projection's checkpoint beyond the log's head) and rebuilds the
/// views from the log (`rebuild::repair_views_ahead_of_log`).
pub fn views_file(database: &std::path::Path) -> std::path::PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push("-views");
    name.into()
}

/// A URL fit for logs and error messages: no password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***{}", &url[..scheme_end], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Advisory lock keys (PostgreSQL). Arbitrary constants, unique to Tally.
pub const APPEND_LOCK: i64 = 0x7a11_0001;
pub const CONSUMER_LEADER_LOCK: i64 = 0x7a11_0002;

impl Store {
    /// PostgreSQL: the statement that takes the append lock for the rest of the transaction.
    ///
    /// PostgreSQL hands out sequence values at insert time but makes them visible at commit, so
    /// with concurrent writers position 11 can become visible after 12, and a consumer that had
    /// read up to 12 would skip 11 forever. Holding one transaction-level advisory lock from
    /// before the first insert until commit makes appends commit in position order (cost: appends
    /// from all nodes are serialized, one lock per group-committed batch). SQLite needs nothing:
    /// it has one writer, and our write pool has one connection.
    fn lock_appends_sql() -> String {
        format!("SELECT pg_advisory_xact_lock({APPEND_LOCK})")
    }

    // Whether commits wait for the disk. Commands always do (API.md:
    // acknowledged means durable). Consumers need not: their effects are derived from events and
    // committed with their checkpoint, and the write-ahead log is durable as a prefix of commit
    // order, so the next command's flush makes them durable too, and a crash can only lose a
    // suffix of consumer commits, which they then replay from their checkpoint. (A process crash
    // loses nothing either way; this matters only for power loss.) Saves one flush per consumer
    // batch, which is most of the flushes.
    //
    // Each transaction starts with one round trip: the durability setting, `BEGIN` and the append
    // lock go as one script. Every statement is a hand-off to sqlx's SQLite thread (or a round
    // trip to PostgreSQL), and the write path's cost is counted in those, not in rows.

    /// True when command batches are made durable after their commit, off the write connection,
    /// by the command writer's `Flusher` (a durable SQLite file), not by the commit itself.
    pub fn flush_behind(&self) -> bool {
        self.durable && self.backend == Backend::Sqlite && self.wal && self.sqlite_path.is_some()
    }

    /// A command batch's transaction: flushed on commit (or by the flusher, see `flush_behind`),
    /// append lock held.
    pub async fn begin_commands<'c>(
        &self,
        conn: &'c mut AnyConnection,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, sqlx::Error> {
        let script = match self.backend {
            // SQLite sets this per connection, before the transaction. IMMEDIATE: take the write
            // lock now rather than on the first write.
            Backend::Sqlite => {
                let sync = if self.durable && !self.flush_behind() { "FULL" } else { "NORMAL" };
                format!("PRAGMA synchronous = {sync}; BEGIN IMMEDIATE")
            }
            Backend::Postgres => format!("BEGIN; {}", Self::lock_appends_sql()),
        };
        conn.begin_with(script).await
    }

    /// A consumer batch's transaction: not flushed on commit (see above); with the append lock
    /// when the consumer appends events.
    pub async fn begin_consumer<'c>(
        &self,
        conn: &'c mut AnyConnection,
        appends: bool,
    ) -> Result<sqlx::Transaction<'c, sqlx::Any>, sqlx::Error> {
        let script = match self.backend {
            Backend::Sqlite => "PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE".to_string(),
            Backend::Postgres => {
                let lock = if appends { Self::lock_appends_sql() } else { String::new() };
                format!("BEGIN; SET LOCAL synchronous_commit = off; {lock}")
            }
        };
        conn.begin_with(script).await
    }
}

/// Raise a position watch (head, applied position) to `position` if that is higher, waking its
/// waiters only when it moved.
pub fn raise(watch: &tokio::sync::watch::Sender<i64>, position: i64) {
    watch.send_if_modified(|p| {
        let moved = position > *p;
        *p = (*p).max(position);
        moved
    });
}

/// True when a database error is a unique-constraint violation (a lost race on a stream version or
/// a reservation).
/// PostgreSQL: writers announce their commits on this channel, so the leader's consumers wake for
/// appends made on any node, not only its own (see `notices`).
pub const APPENDS_CHANNEL: &str = "tally_appends";

/// Inside a writer's transaction (PostgreSQL): tell every node the head moved to `position`.
pub async fn announce_append(backend: Backend, conn: &mut AnyConnection, position: i64) -> Result<(), sqlx::Error> {
    if backend == Backend::Postgres && position > 0 {
        sqlx::query("SELECT pg_notify($1, $2)").bind(APPENDS_CHANNEL).bind(position.to_string()).execute(conn).await?;
    }
    Ok(())
}

/// SQLite: a failed `COMMIT` known to have been rolled back (no space, or the lock was busy);
/// any other failure there leaves its outcome unknown.
pub fn is_rollback(err: &sqlx::Error) -> bool {
    const BUSY: i64 = 5;
    const LOCKED: i64 = 6;
    [BUSY, LOCKED, SQLITE_FULL].contains(&sqlite_code(err).unwrap_or(0))
}

/// SQLite: the disk (or the file system's quota) is full; nothing of the statement was written.
pub fn is_disk_full(err: &sqlx::Error) -> bool {
    sqlite_code(err) == Some(SQLITE_FULL)
}

const SQLITE_FULL: i64 = 13;

/// An SQLite error's primary result code (its extended code's low byte).
fn sqlite_code(err: &sqlx::Error) -> Option<i64> {
    match err {
        sqlx::Error::Database(db) => db.code().and_then(|code| code.parse::<i64>().ok()).map(|code| code & 0xff),
        _ => None,
    }
}

/// Whether `err` says the database could not be reached or dropped the connection (a restart, a
/// terminated backend, a pool that found no connection in time), rather than refusing what was
/// asked: worth trying again, so answered 503, not 500.
pub fn is_connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => true,
        // PostgreSQL's SQLSTATE classes 08 (connection exception) and 57P (operator
        // intervention: admin_shutdown, crash_shutdown, cannot_connect_now).
        sqlx::Error::Database(db) => db.code().is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
        _ => false,
    }
}

pub fn is_unique_violation(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => db.is_unique_violation() || db.message().contains("UNIQUE constraint failed"),
        _ => false,
    }
}
