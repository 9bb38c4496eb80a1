//! Loading streams and appending to them through sqlx, inside a caller's transaction.
//!
//! On PostgreSQL both work on many streams at once: every stream a batch needs with one query,
//! the whole batch with one multi-row `INSERT`, since a statement costs a round trip. On SQLite
//! streams are read along their chains and events appended one by one, each checked against its
//! stream's head (see `heads`): there a statement costs a hand-off to sqlx's thread, not a round
//! trip, and the command writer does not come this way at all (see `native`).

use super::sqlite::heads::{self, Chain, Head, Heads};
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

/// A write transaction's reads and appends of streams through sqlx. On SQLite the log has no
/// index by stream: each event names its stream's previous one, and the stream heads say where
/// each stream ends (see `heads`); on PostgreSQL an index and a unique constraint do.
pub struct Streams<'c> {
    pub conn: &'c mut AnyConnection,
    /// SQLite: this transaction's appends, checked and chained against the heads.
    chain: Option<Chain<'c>>,
}

impl<'c> Streams<'c> {
    /// Inside the caller's write transaction; `heads`: SQLite's (`Store::heads`). First reads
    /// back what was appended without reaching the heads.
    pub async fn begin(conn: &'c mut AnyConnection, heads: Option<&'c Heads>) -> Result<Streams<'c>, sqlx::Error> {
        if let Some(heads) = heads {
            heads::sync(conn, heads).await?;
        }
        Ok(Streams { conn, chain: heads.map(Chain::new) })
    }

    /// Where `stream_id` ends, as this transaction sees it (SQLite).
    async fn head(&mut self, stream_id: &str) -> Result<Option<Head>, sqlx::Error> {
        let Some(chain) = &self.chain else { return Ok(None) };
        match chain.get(stream_id) {
            Some(head) => Ok(Some(head)),
            None => heads::table_head(self.conn, stream_id).await,
        }
    }

    pub async fn load_stream(&mut self, stream_id: &str) -> Result<LoadedStream, sqlx::Error> {
        let events = self.load_streams(&[stream_id]).await?.remove(stream_id).unwrap_or_default();
        let (version, last_position) = events.last().map(|e| (e.stream_version, e.position)).unwrap_or((0, 0));
        Ok(LoadedStream { events, version, last_position })
    }

    /// Every event of each of these streams, oldest first; a stream with no events is absent.
    pub async fn load_streams(
        &mut self,
        stream_ids: &[&str],
    ) -> Result<HashMap<String, Vec<StoredEvent>>, sqlx::Error> {
        let mut out: HashMap<String, Vec<StoredEvent>> = HashMap::new();
        if self.chain.is_some() {
            for stream_id in stream_ids {
                if let Some(head) = self.head(stream_id).await? {
                    out.insert(stream_id.to_string(), heads::read_chain(self.conn, stream_id, head).await?);
                }
            }
            return Ok(out);
        }
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id IN ({{}}) ORDER BY position");
        for row in select_in(self.conn, &sql, &[], stream_ids).await? {
            let event = StoredEvent::from_row(&row)?;
            out.entry(event.stream_id.clone()).or_default().push(event);
        }
        Ok(out)
    }

    /// Append the events, in order; returns them as stored, each with its position. A stream
    /// version that is taken (on SQLite: not the stream's next) fails with a unique violation,
    /// and the caller's transaction must then be rolled back: never a partial append.
    pub async fn append(&mut self, events: Vec<NewEvent>, recorded_at: &str) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let Some(chain) = self.chain.as_mut() else {
            return append_indexed(self.conn, events, recorded_at).await;
        };
        let sql = "INSERT INTO events (stream_id, stream_version, previous_position, event_type, schema_version, \
                   data, metadata, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING position";
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            let head = match chain.get(&event.stream_id) {
                Some(head) => Some(head),
                None => heads::table_head(self.conn, &event.stream_id).await?,
            };
            let previous = chain.next(&event.stream_id, event.stream_version, head)?;
            let row = sqlx::query(sql)
                .bind(&event.stream_id)
                .bind(event.stream_version)
                .bind(previous)
                .bind(event.event_type)
                .bind(i64::from(event.schema_version))
                .bind(event.data.to_string())
                .bind(event.metadata.to_string())
                .bind(recorded_at)
                .fetch_one(&mut *self.conn)
                .await?;
            let position: i64 = row.try_get(0)?;
            chain.appended(&event.stream_id, event.stream_version, position);
            stored.push(event.stored(position, recorded_at));
        }
        Ok(stored)
    }
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

/// PostgreSQL: one multi-row `INSERT` per chunk; the unique constraint refuses a taken version.
async fn append_indexed(
    conn: &mut AnyConnection,
    events: Vec<NewEvent>,
    recorded_at: &str,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let mut positions = Vec::with_capacity(events.len());
    for chunk in events.chunks(MAX_PARAMS / 7) {
        let values = (0..chunk.len()).map(|i| format!("({})", params(conn, i * 7 + 1, 7))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
             VALUES {} RETURNING position, stream_id, stream_version",
            values.join(", ")
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
