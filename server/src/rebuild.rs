//! `tally rebuild`: rebuild every view from the event log, offline (stop the servers first).
//!
//! Reads the events in position order, folds them in memory with the projections' own `evolve`
//! (so the result is byte for byte what the live projector writes), then replaces the view tables
//! and their checkpoints in one transaction.

use crate::clock;
use crate::config::DatabaseArgs;
use crate::projector::{member_search, membership_view};
use crate::store::{PoolSizes, Store};
use app::domain::member::{MemberAggregate, MemberEvent};
use app::domain::Aggregate;
use app::views::MembershipView;
use sqlx::Acquire;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Events read per query.
const PAGE: i64 = 20_000;

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

pub async fn rebuild(store: &Store) -> anyhow::Result<RebuildReport> {
    let started = Instant::now();
    let mut views: HashMap<String, MembershipView> = HashMap::new();
    let (mut position, mut events) = (0i64, 0u64);
    loop {
        let page = store.read_all(position, PAGE).await?;
        let Some(last) = page.last() else { break };
        position = last.position;
        events += page.len() as u64;
        for stored in &page {
            let Some(member_id) = stored.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            let event: MemberEvent = stored.decode()?;
            let current = views.remove(member_id);
            if let Some(view) = membership_view::evolve(current, stored, &event) {
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
    for view in views.values() {
        membership_view::save(&mut tx, view).await?;
        member_search::insert_row(&mut tx, view).await?;
    }
    for name in [membership_view::NAME, member_search::NAME] {
        sqlx::query(
            "INSERT INTO checkpoints (name, position, updated_at, last_error) VALUES ($1, $2, $3, NULL) \
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at, last_error = NULL",
        )
        .bind(name)
        .bind(position)
        .bind(clock::now())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    let write = writing.elapsed();
    let total = started.elapsed().as_secs_f64().max(1e-9);
    Ok(RebuildReport {
        events,
        members: views.len() as u64,
        position,
        read_and_fold,
        write,
        events_per_second: events as f64 / total,
    })
}
