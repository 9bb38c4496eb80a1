//! Loading streams and appending to them, inside a caller's transaction.
//!
//! Both work on many streams at once: the command writer loads every stream a batch needs with one
//! query and appends the whole batch with one multi-row `INSERT`. Per-statement cost (a round trip
//! to PostgreSQL, a thread hand-off in the SQLite driver) is what limits command throughput, not
//! the rows, so statements per batch, not per command, is what keeps it fast.

use super::{StoredEvent, EVENT_COLUMNS};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;

/// What a command needs of its stream: every event, the version and the last position.
#[derive(Debug, Default)]
pub struct LoadedStream {
    pub events: Vec<StoredEvent>,
    pub version: i64,
    pub last_position: i64,
}

pub async fn load_stream(conn: &mut AnyConnection, stream_id: &str) -> Result<LoadedStream, sqlx::Error> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version");
    let rows = sqlx::query(&sql).bind(stream_id).fetch_all(&mut *conn).await?;
    let events = rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?;
    let (version, last_position) = events.last().map(|e| (e.stream_version, e.position)).unwrap_or((0, 0));
    Ok(LoadedStream { events, version, last_position })
}

/// Every event of each of these streams, oldest first; a stream with no events is absent.
pub async fn load_streams(
    conn: &mut AnyConnection,
    stream_ids: &[&str],
) -> Result<HashMap<String, Vec<StoredEvent>>, sqlx::Error> {
    let mut out: HashMap<String, Vec<StoredEvent>> = HashMap::new();
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id IN ({{}}) ORDER BY position");
    for row in select_in(conn, &sql, &[], stream_ids).await? {
        let event = StoredEvent::from_row(&row)?;
        out.entry(event.stream_id.clone()).or_default().push(event);
    }
    Ok(out)
}

/// One event to append, its stream version already decided.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: &'static str,
    pub schema_version: u32,
    /// The event's `data`.
    pub data: serde_json::Value,
    /// The command's metadata.
    pub metadata: serde_json::Value,
}

impl NewEvent {
    /// The event as stored, once appended at `position`.
    pub fn stored(self, position: i64, recorded_at: &str) -> StoredEvent {
        StoredEvent {
            position,
            stream_id: self.stream_id,
            stream_version: self.stream_version,
            event_type: self.event_type.to_string(),
            schema_version: self.schema_version.into(),
            data: self.data,
            metadata: self.metadata,
            recorded_at: recorded_at.to_string(),
        }
    }
}

/// Append the events, in order; returns them as stored, each with its position. A stream version
/// that another writer took first makes this fail with a unique violation (and the caller's
/// transaction must then be rolled back: never a partial append).
pub async fn append(
    conn: &mut AnyConnection,
    events: Vec<NewEvent>,
    recorded_at: &str,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let mut positions = Vec::with_capacity(events.len());
    for chunk in events.chunks(MAX_PARAMS / 7) {
        let values = (0..chunk.len()).map(|i| format!("({})", params(conn, i * 7 + 1, 7))).collect::<Vec<_>>();
        let sqlite = conn.backend_name() == SQLITE;
        let sql = format!(
            "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
             VALUES {}{}",
            values.join(", "),
            if sqlite {
                "; SELECT last_insert_rowid() AS last, changes() AS inserted"
            } else {
                " RETURNING position, stream_id, stream_version"
            }
        );
        let texts: Vec<(String, String)> =
            chunk.iter().map(|event| (event.data.to_string(), event.metadata.to_string())).collect();
        let mut query = sqlx::query(&sql);
        for (event, (data, metadata)) in chunk.iter().zip(&texts) {
            query = query
                .bind(&event.stream_id)
                .bind(event.stream_version)
                .bind(event.event_type)
                .bind(event.schema_version as i64)
                .bind(data)
                .bind(metadata)
                .bind(recorded_at);
        }
        if sqlite {
            // One writer holds the lock and the statement inserts its rows in order, each taking
            // the next `AUTOINCREMENT` position: the chunk's positions are the `n` up to the last
            // one. Asking for them with `RETURNING` would cost a hand-off from the driver's thread
            // per row.
            let rows = query.fetch_all(&mut *conn).await?;
            let row = rows.last().ok_or_else(|| sqlx::Error::RowNotFound)?;
            let (last, inserted): (i64, i64) = (row.try_get("last")?, row.try_get("inserted")?);
            if inserted != chunk.len() as i64 {
                return Err(sqlx::Error::Protocol(format!("appended {inserted} of {} events", chunk.len())));
            }
            positions.extend(last + 1 - chunk.len() as i64..=last);
            continue;
        }
        // RETURNING's row order is not promised by SQL: match rows to events by stream and version.
        let mut returned = HashMap::with_capacity(chunk.len());
        for row in query.fetch_all(&mut *conn).await? {
            let key: (String, i64) = (row.try_get("stream_id")?, row.try_get("stream_version")?);
            returned.insert(key, row.try_get::<i64, _>("position")?);
        }
        for event in chunk {
            let position = returned
                .get(&(event.stream_id.clone(), event.stream_version))
                .copied()
                .ok_or_else(|| sqlx::Error::Protocol("an appended event's position was not returned".into()))?;
            positions.push(position);
        }
    }
    Ok(events.into_iter().zip(positions).map(|(event, position)| event.stored(position, recorded_at)).collect())
}

/// Parameters per statement: far below both databases' limits (SQLite 32,766, PostgreSQL 65,535),
/// large enough that a batch of commands or views takes one statement or a few.
pub const MAX_PARAMS: usize = 1024;

/// Placeholders for `count` parameters, the first being the statement's `from`-th: `$from, …` on
/// PostgreSQL, anonymous `?`s (numbered in order by SQLite) on SQLite. The SQLite driver asks
/// SQLite for each parameter's name, which for numbered ones is a linear scan of the statement's
/// names: O(n²) per statement, the top entry in profiles of the write connection. A statement
/// built with `?`s must use no `$n` (the driver counts anonymous parameters apart from numbered).
pub fn params(conn: &AnyConnection, from: usize, count: usize) -> String {
    if conn.backend_name() == SQLITE {
        vec!["?"; count].join(", ")
    } else {
        placeholders(from, count)
    }
}

const SQLITE: &str = "SQLite";

/// The rows of `sql` for every one of `values`: `sql` names the `leading` parameters `$1`…`$k`
/// and holds `{}` where the list of an `IN (…)` goes; it is run once per chunk of at most
/// [`MAX_PARAMS`] parameters, `leading` bound first.
pub async fn select_in(
    conn: &mut AnyConnection,
    sql: &str,
    leading: &[&str],
    values: &[&str],
) -> Result<Vec<AnyRow>, sqlx::Error> {
    let mut sql = sql.to_string();
    if conn.backend_name() == SQLITE {
        // All anonymous (see `params`); from the highest, so `$1` does not eat into `$10`.
        for i in (1..=leading.len()).rev() {
            sql = sql.replace(&format!("${i}"), "?");
        }
    }
    let mut rows = Vec::new();
    for chunk in values.chunks(MAX_PARAMS - leading.len()) {
        let sql = sql.replace("{}", &params(conn, leading.len() + 1, chunk.len()));
        let mut query = sqlx::query(&sql);
        for value in leading.iter().chain(chunk) {
            query = query.bind(*value);
        }
        rows.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(rows)
}

/// `$from, $from+1, …` (`count` of them).
pub fn placeholders(from: usize, count: usize) -> String {
    (from..from + count).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}
