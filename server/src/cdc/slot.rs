//! A PostgreSQL source read through a logical replication slot, with the SQL slot functions.
//!
//! Why SQL and `test_decoding` rather than the streaming replication protocol: sqlx (already the
//! store's driver) runs them, with no second PostgreSQL client, no TLS stack of its own and no
//! binary protocol to decode; `test_decoding` ships with PostgreSQL and is allowed by default
//! (`output_plugin_libraries`). The price is a poll: an idle reader asks every `poll_ms` (10 ms by
//! default), and each ask decodes the WAL from the slot's restart point, which PostgreSQL moves on
//! every few seconds. BENCHMARKS.md (P10) measures what that costs in freshness.
//!
//! One round: peek up to `batch_rows` changes (whole transactions) → apply them through the
//! command bus (each command's idempotency key is `<commit LSN>:<order in the transaction>#<n>`,
//! stored with its events) → advance the slot past the last transaction. A crash between the
//! commit and the advance reads the same changes again, and their keys make them no-ops.
//!
//! Only one process reads a slot: the reader holds a session advisory lock on the source for the
//! slot while it reads; any other (another node, a `tally cdc` next to a server) waits on standby,
//! still reporting the slot's lag.

use super::config::{qualified, SourceConfig};
use super::decoding::{self, Line};
use super::mapping::Change;
use super::status::CdcStatus;
use crate::commands::CommandBus;
use anyhow::Context;
use sqlx::{Connection, PgConnection, Row};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The output plugin the slot is made with.
pub const PLUGIN: &str = "test_decoding";

/// How often the slot's lag and retained WAL are looked at.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// An idle reader writes a heartbeat into the source's WAL this often (a logical decoding message,
/// not a row: nothing in the source's tables changes) and moves the slot on to it when it reads it
/// back. Without it a slot whose tables see no change never moves, and the source keeps every WAL
/// segment written since by its other databases; and each peek decodes the WAL from the slot's
/// restart point, which PostgreSQL only moves when the slot does.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_PREFIX: &str = "tally_heartbeat";

/// Read `source` until `stop`; every failure (the source down, a check failing, the store refusing
/// writes) is reported on the source's status and `/healthz` and tried again with backoff.
pub async fn read(bus: CommandBus, status: Arc<CdcStatus>, source: SourceConfig, stop: CancellationToken) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let outcome = tokio::select! {
            outcome = session(&bus, &status, &source, &stop) => outcome,
            _ = stop.cancelled() => return,
        };
        match outcome {
            Ok(()) => return,
            Err(err) => {
                let message = format!("{err:#}");
                tracing::error!(source = %source.name, error = %message, "the CDC reader stopped; trying again");
                status.failing(&source.name, &message);
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_millis(200);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// A source another process reads (`serve = false`): watch its slot's lag and retained WAL from
/// here all the same, so the warnings and metrics of this node cover it. A failure to look is the
/// source's last error, not a failing part of this node, which does not read it.
pub async fn watch_only(status: Arc<CdcStatus>, source: SourceConfig, stop: CancellationToken) {
    let mut watch = Watch::new(&source);
    loop {
        let looked = async {
            let url = source.postgres_url.as_deref().context("the source has no postgres_url")?;
            let mut conn = connect(url).await?;
            loop {
                status.state(&source.name, "elsewhere");
                watch.look(&mut conn, &status, true).await?;
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                    _ = stop.cancelled() => return anyhow::Ok(()),
                }
            }
        };
        if let Err(err) = looked.await {
            status.row_error(&source.name, &format!("cannot watch the slot: {err:#}"));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Connect, check, take the slot, and read until `stop` or an error.
async fn session(
    bus: &CommandBus,
    status: &CdcStatus,
    source: &SourceConfig,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let url = source.postgres_url.as_deref().context("the source has no postgres_url")?;
    let mut conn = connect(url).await?;
    check(&mut conn, source).await?;
    let slot = source.slot_name();
    // The lock is the session's: it goes when this connection does (a crash included).
    let lock_key = format!("tally-cdc:{slot}");
    let mut watch = Watch::new(source);
    loop {
        let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(&lock_key)
            .fetch_one(&mut conn)
            .await?;
        if held {
            break;
        }
        status.state(&source.name, "standby");
        watch.look(&mut conn, status, true).await?;
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.cancelled() => return Ok(()),
        }
    }
    ensure_slot(&mut conn, &slot).await?;
    status.state(&source.name, "reading");
    tracing::info!(source = %source.name, %slot, "reading changes");
    let poll = Duration::from_millis(source.poll_ms.max(1));
    let mut last_heartbeat = Instant::now();
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        watch.look(&mut conn, status, false).await?;
        let Peeked { changes, last_commit, rows, heartbeat } = peek(&mut conn, &slot, source.batch_rows).await?;
        let Some(last_commit) = last_commit else {
            if watch.lag_seconds > 0.0 {
                watch.lag_seconds = 0.0;
                status.counted(&source.name, &[], None, Some(0.0));
            }
            match heartbeat {
                // Nothing of the source's own before it: the slot may move on to it.
                Some(lsn) => advance(&mut conn, &slot, &lsn).await?,
                None if last_heartbeat.elapsed() >= HEARTBEAT_EVERY => {
                    sqlx::query("SELECT pg_logical_emit_message(false, $1, '')")
                        .bind(HEARTBEAT_PREFIX)
                        .execute(&mut conn)
                        .await
                        .context("writing a heartbeat to the source's WAL")?;
                    last_heartbeat = Instant::now();
                }
                None => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(poll) => {}
                _ = stop.cancelled() => return Ok(()),
            }
            continue;
        };
        let applied = super::apply(bus, status, source, &changes).await.context("applying the source's changes")?;
        // Only now, with their events committed, may the slot forget them.
        advance(&mut conn, &slot, &last_commit).await?;
        last_heartbeat = Instant::now();
        let full = rows >= source.batch_rows as usize;
        let lag = match (full, changes.last().and_then(|c| c.committed_at)) {
            (true, Some(at)) => (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        watch.lag_seconds = lag;
        status.counted(&source.name, &applied.outcomes, applied.last_position.as_deref(), Some(lag));
    }
}

async fn advance(conn: &mut PgConnection, slot: &str, lsn: &str) -> anyhow::Result<()> {
    sqlx::query("SELECT 1 FROM pg_replication_slot_advance($1, $2::pg_lsn)")
        .bind(slot)
        .bind(lsn)
        .fetch_one(conn)
        .await
        .context("advancing the slot")?;
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    PgConnection::connect(url).await.with_context(|| format!("connecting to the source {}", crate::store::redact(url)))
}

/// What the source must allow, all told in one message when it does not.
async fn check(conn: &mut PgConnection, source: &SourceConfig) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    let wal_level: String = sqlx::query_scalar("SELECT current_setting('wal_level')").fetch_one(&mut *conn).await?;
    if wal_level != "logical" {
        problems.push(format!(
            "wal_level is '{wal_level}', logical decoding needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart PostgreSQL"
        ));
    }
    let tables = [
        source.customers.as_ref().map(|c| (qualified(&c.table), true)),
        source.orders.as_ref().map(|o| (qualified(&o.table), false)),
    ];
    for (table, needs_old_row) in tables.into_iter().flatten() {
        let identity: Option<String> =
            sqlx::query_scalar("SELECT relreplident::text FROM pg_class WHERE oid = to_regclass($1)")
                .bind(&table)
                .fetch_optional(&mut *conn)
                .await?;
        match identity.as_deref() {
            None => problems.push(format!("table {table} does not exist in the source")),
            Some("f") => {}
            Some(_) if needs_old_row => problems.push(format!(
                "table {table} must send whole old rows, to tell what an update changed: run ALTER TABLE {table} REPLICA IDENTITY FULL;"
            )),
            Some(_) => {}
        }
    }
    anyhow::ensure!(problems.is_empty(), "source '{}' cannot be read: {}", source.name, problems.join("; "));
    Ok(())
}

/// Make the slot if it is not there; refuse one made with another plugin.
async fn ensure_slot(conn: &mut PgConnection, slot: &str) -> anyhow::Result<()> {
    let plugin: Option<String> =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(&mut *conn)
            .await?;
    match plugin.as_deref() {
        Some(PLUGIN) => Ok(()),
        Some(other) => anyhow::bail!(
            "slot {slot} uses the plugin {other}, not {PLUGIN}: drop it (tally cdc drop-slot) or name another slot"
        ),
        None => {
            sqlx::query("SELECT 1 FROM pg_create_logical_replication_slot($1, $2)")
                .bind(slot)
                .bind(PLUGIN)
                .fetch_one(&mut *conn)
                .await
                .with_context(|| {
                    format!("creating the replication slot {slot} (the user needs the REPLICATION attribute)")
                })?;
            tracing::info!(%slot, "created the replication slot: changes from now on are read");
            Ok(())
        }
    }
}

/// What one peek at the slot found.
struct Peeked {
    /// Whole transactions' changes, in commit order.
    changes: Vec<Change>,
    /// The LSN to advance the slot to once they are applied.
    last_commit: Option<String>,
    /// Rows read (changes, transaction lines, messages).
    rows: usize,
    /// The LSN of a heartbeat read after every transaction (see [`HEARTBEAT_EVERY`]).
    heartbeat: Option<String>,
}

async fn peek(conn: &mut PgConnection, slot: &str, batch_rows: u32) -> anyhow::Result<Peeked> {
    let rows = sqlx::query(
        "SELECT lsn::text, data FROM pg_logical_slot_peek_changes($1, NULL, $2, \
         'include-xids', '0', 'include-timestamp', '1', 'skip-empty-xacts', '1')",
    )
    .bind(slot)
    .bind(batch_rows as i32)
    .fetch_all(&mut *conn)
    .await
    .with_context(|| format!("reading the slot {slot}"))?;
    let count = rows.len();
    let mut peeked = Peeked { changes: Vec::new(), last_commit: None, rows: count, heartbeat: None };
    let mut open: Vec<Change> = Vec::new();
    for row in rows {
        let (lsn, data): (String, String) = (row.try_get(0)?, row.try_get(1)?);
        match decoding::parse(&data).map_err(|e| anyhow::anyhow!("cannot read the change at {lsn} ({e}): {data}"))? {
            Line::Begin => open.clear(),
            Line::Change { table, op, before, after } => {
                open.push(Change { table, op, before, after, position: String::new(), committed_at: None })
            }
            Line::Other(text) => {
                if text.contains(&format!("prefix: {HEARTBEAT_PREFIX},")) {
                    peeked.heartbeat = Some(lsn);
                }
            }
            Line::Commit { committed_at } => {
                for (n, mut change) in open.drain(..).enumerate() {
                    change.position = format!("{lsn}:{n}");
                    change.committed_at = committed_at;
                    peeked.changes.push(change);
                }
                peeked.last_commit = Some(lsn);
                peeked.heartbeat = None;
            }
        }
    }
    Ok(peeked)
}

/// The slot's lag and the WAL it holds back, against the configured limits.
struct Watch {
    source: String,
    slot: String,
    max_retained: i64,
    max_lag: f64,
    last: Option<Instant>,
    lag_seconds: f64,
}

impl Watch {
    fn new(source: &SourceConfig) -> Watch {
        Watch {
            source: source.name.clone(),
            slot: source.slot_name(),
            max_retained: (source.max_retained_wal_mb.saturating_mul(1 << 20)).min(i64::MAX as u64) as i64,
            max_lag: source.max_lag_secs as f64,
            last: None,
            lag_seconds: 0.0,
        }
    }

    /// At most once a second (`force`: now).
    async fn look(&mut self, conn: &mut PgConnection, status: &CdcStatus, force: bool) -> anyhow::Result<()> {
        if !force && self.last.is_some_and(|at| at.elapsed() < WATCH_EVERY) {
            return Ok(());
        }
        self.last = Some(Instant::now());
        let slot = &self.slot;
        let row = sqlx::query(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8, \
             pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8, wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
        )
        .bind(slot)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else {
            return Ok(()); // not made yet
        };
        let (lag, retained, wal_status): (Option<f64>, Option<f64>, Option<String>) =
            (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let (lag, retained) = (lag.unwrap_or(0.0) as i64, retained.unwrap_or(0.0) as i64);
        anyhow::ensure!(
            wal_status.as_deref() != Some("lost"),
            "the slot {slot} has lost WAL it needed (the source's max_slot_wal_keep_size): changes were missed; \
             drop it with `tally cdc drop-slot` and load the tables again"
        );
        let mut warnings = Vec::new();
        if retained > self.max_retained {
            warnings.push(format!(
                "the slot {slot} holds back {} MB of the source's WAL (limit {} MB)",
                retained >> 20,
                self.max_retained >> 20
            ));
        }
        if self.lag_seconds > self.max_lag {
            warnings.push(format!("{:.0} s behind the source (limit {:.0} s)", self.lag_seconds, self.max_lag));
        }
        if wal_status.as_deref() == Some("unreserved") {
            warnings.push(format!("the slot {slot} is about to lose WAL it needs (wal_status unreserved)"));
        }
        status.slot(&self.source, lag, retained, (!warnings.is_empty()).then(|| warnings.join("; ")));
        Ok(())
    }
}

/// `tally cdc drop-slot`: remove the source's slot, so the source keeps no WAL for Tally.
pub async fn drop_slot(source: &SourceConfig) -> anyhow::Result<bool> {
    let url = source.postgres_url.as_deref().context("the source has no postgres_url: it has no slot")?;
    let mut conn = connect(url).await?;
    let slot = source.slot_name();
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)")
        .bind(&slot)
        .fetch_one(&mut conn)
        .await?;
    if !exists {
        return Ok(false);
    }
    sqlx::query("SELECT pg_drop_replication_slot($1)")
        .bind(&slot)
        .execute(&mut conn)
        .await
        .with_context(|| format!("dropping the slot {slot} (stop the reader that holds it first)"))?;
    Ok(true)
}
