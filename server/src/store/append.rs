//! Loading a stream and appending to it, inside a caller's transaction.

use super::{StoredEvent, EVENT_COLUMNS};
use sqlx::{AnyConnection, Row};

/// What a command needs of its stream: every event, the version and the last position.
#[derive(Debug, Default)]
pub struct LoadedStream {
    pub events: Vec<StoredEvent>,
    pub version: i64,
    pub last_position: i64,
}

pub async fn load_stream(conn: &mut AnyConnection, stream_id: &str) -> Result<LoadedStream, sqlx::Error> {
    load_stream_after(conn, stream_id, 0).await
}

/// The stream's events after `after_version` (all of them for 0).
pub async fn load_stream_after(
    conn: &mut AnyConnection,
    stream_id: &str,
    after_version: i64,
) -> Result<LoadedStream, sqlx::Error> {
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 AND stream_version > $2 ORDER BY stream_version"
    );
    let rows = sqlx::query(&sql).bind(stream_id).bind(after_version).fetch_all(&mut *conn).await?;
    let events = rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?;
    let (version, last_position) = events.last().map(|e| (e.stream_version, e.position)).unwrap_or((0, 0));
    Ok(LoadedStream { events, version, last_position })
}

pub struct NewEvent {
    pub event_type: &'static str,
    pub schema_version: u32,
    pub data: serde_json::Value,
}

/// Append events after `version`; returns (new version, position of the last event).
/// A concurrent writer that took the same version makes this fail with a unique violation.
pub async fn append(
    conn: &mut AnyConnection,
    stream_id: &str,
    version: i64,
    events: &[NewEvent],
    metadata: &serde_json::Value,
    recorded_at: &str,
) -> Result<(i64, i64), sqlx::Error> {
    let metadata = metadata.to_string();
    let mut v = version;
    let mut position = 0;
    for event in events {
        v += 1;
        let row = sqlx::query(
            "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING position",
        )
        .bind(stream_id)
        .bind(v)
        .bind(event.event_type)
        .bind(event.schema_version as i64)
        .bind(event.data.to_string())
        .bind(&metadata)
        .bind(recorded_at)
        .fetch_one(&mut *conn)
        .await?;
        position = row.try_get::<i64, _>("position")?;
    }
    Ok((v, position))
}
