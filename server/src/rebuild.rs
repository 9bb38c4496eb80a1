//! `tally rebuild`: rebuild every view from the event log, offline (stop the servers first).
//!
//! Reads the events in position order, folds them in memory with the projections' own `evolve`
//! (so the result is byte for byte what the live projector writes), then replaces the view tables
//! and their checkpoints in one transaction.

use crate::config::DatabaseArgs;
use crate::projector::{member_search, membership_view};
use crate::store::{PoolSizes, Store, StoredEvent};
use app::domain::member::{MemberAggregate, MemberEvent};
use app::domain::Aggregate;
use app::views::MembershipView;
use sqlx::{Acquire, Row};
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RebuildReport {
    pub events: u64,
    pub members: u64,
    pub position: i64,
    pub read_and_fold: Duration,
    pub write: Duration,
    pub events_per_second: f64,
}

pub async fn run(db: &DatabaseArgs) -> anyhow::Result<RebuildReport> {
    let store = Store::open(&db.database_url, &PoolSizes { read: 2, write: 1 }, db.durable).await?;
    rebuild(&store).await
}

/// Events read per query.
const PAGE: i64 = 20_000;

async fn read_page(pool: sqlx::AnyPool, after: i64) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let sql = "SELECT position, stream_id, stream_version, event_type, \
               CASE WHEN stream_id LIKE 'member-%' THEN data END AS data, recorded_at \
               FROM events WHERE position > $1 ORDER BY position LIMIT $2";
    sqlx::query(sql).bind(after).bind(PAGE).fetch_all(&pool).await
}

pub async fn rebuild(store: &Store) -> anyhow::Result<RebuildReport> {
    let started = Instant::now();
    let mut views: HashMap<String, MembershipView> = HashMap::new();
    let (mut position, mut events) = (0i64, 0u64);
    // Pages of events, the next one read (on the driver's thread) while this one is folded. Only
    // what the fold needs, `data` only for member streams, and each event decoded straight from
    // its text (no intermediate JSON tree, no metadata): reading and decoding are most of the
    // rebuild's time.
    let mut next = tokio::spawn(read_page(store.read.clone(), 0));
    let mut wrapped = String::new();
    loop {
        let rows = next.await??;
        let Some(last) = rows.last() else { break };
        position = last.try_get("position")?;
        next = tokio::spawn(read_page(store.read.clone(), position));
        events += rows.len() as u64;
        for row in &rows {
            let Some(data) = row.try_get::<Option<String>, _>("data")? else { continue };
            let stream_id: String = row.try_get("stream_id")?;
            let Some(member_id) = stream_id.strip_prefix(MemberAggregate::STREAM_PREFIX) else { continue };
            let event_type: String = row.try_get("event_type")?;
            wrapped.clear();
            wrapped.push_str(r#"{"event_type":""#);
            wrapped.push_str(&event_type);
            wrapped.push_str(r#"","data":"#);
            wrapped.push_str(&data);
            wrapped.push('}');
            let event: MemberEvent = serde_json::from_str(&wrapped)?;
            let stored = StoredEvent {
                position: row.try_get("position")?,
                stream_id: String::new(),
                stream_version: row.try_get("stream_version")?,
                event_type,
                schema_version: 1,
                data: serde_json::Value::Null,
                metadata: serde_json::Value::Null,
                recorded_at: row.try_get("recorded_at")?,
            };
            let current = views.remove(member_id);
            if let Some(view) = membership_view::evolve(current, &stored, &event) {
                views.insert(member_id.to_string(), view);
            }
        }
    }
    let read_and_fold = started.elapsed();

    let writing = Instant::now();
    let mut conn = store.write.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("DELETE FROM membership_view").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM member_search").execute(&mut *tx).await?;
    let views: Vec<MembershipView> = views.into_values().collect();
    let members = views.len() as u64;
    membership_view::save_many(&mut tx, &views).await?;
    let rows: Vec<member_search::SearchRow> = views.iter().map(Into::into).collect();
    member_search::save_many(&mut tx, &rows.iter().collect::<Vec<_>>()).await?;
    for name in [membership_view::NAME, member_search::NAME] {
        crate::projector::save_checkpoint(&mut tx, name, position).await?;
    }
    tx.commit().await?;
    let write = writing.elapsed();
    let total = started.elapsed().as_secs_f64().max(1e-9);
    Ok(RebuildReport { events, members, position, read_and_fold, write, events_per_second: events as f64 / total })
}
