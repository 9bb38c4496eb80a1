//! `tally rebuild`: rebuild every view from the event log, offline (stop the servers first).
//!
//! Reads the events in position order, folds them in memory with the projections' own `evolve`
//! (so the result is byte for byte what the live projector writes), then replaces the view tables
//! and their checkpoints in one transaction.

use crate::config::DatabaseArgs;
use crate::projector::fold::{fold_log, Fold};
use crate::projector::{member_search, membership_view};
use crate::store::{PoolSizes, Store};
use sqlx::Acquire;
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

/// SQLite, views in their own file: after a power cut that file may hold views of events the log
/// lost with its unsynced tail (see `store::views_file`). A projection's checkpoint beyond the
/// log's head shows it; then every view is rebuilt from the log. `tally serve` runs this before it
/// starts writing. Returns whether it rebuilt.
pub async fn repair_views_ahead_of_log(store: &Store) -> anyhow::Result<bool> {
    if store.views_path().is_none() {
        return Ok(false);
    }
    let head = store.head().await?;
    for name in [membership_view::NAME, member_search::NAME] {
        let checkpoint = crate::projector::load_checkpoint(store, name).await?;
        if checkpoint > head {
            tracing::warn!(
                consumer = name,
                checkpoint,
                head,
                "the views are ahead of the event log, which lost its unsynced end (a power cut?): rebuilding them"
            );
            let report = rebuild(store).await?;
            tracing::info!(events = report.events, members = report.members, "views rebuilt from the event log");
            return Ok(true);
        }
    }
    Ok(false)
}

pub async fn run(db: &DatabaseArgs) -> anyhow::Result<RebuildReport> {
    let store = Store::open(&db.database_url, &PoolSizes { read: 2, write: 1 }, db.durable).await?;
    rebuild(&store).await
}

pub async fn rebuild(store: &Store) -> anyhow::Result<RebuildReport> {
    let started = Instant::now();
    let Fold { views, searched_at, position, events, .. } = fold_log(store, None).await?;
    let read_and_fold = started.elapsed();

    let writing = Instant::now();
    let mut conn = store.views.acquire().await?;
    let mut tx = conn.begin().await?;
    sqlx::query("DELETE FROM membership_view").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM member_search").execute(&mut *tx).await?;
    let members = views.len() as u64;
    // The search rows first, from the views borrowed; then the views themselves, handed over.
    let search: Vec<_> = views
        .values()
        .map(|view| member_search::from_view(view, searched_at.get(&view.member_id).copied().unwrap_or(view.position)))
        .collect();
    let rows: Vec<_> = views.into_values().map(membership_view::ViewRow::new).collect();
    membership_view::save_many(&mut tx, &rows).await?;
    member_search::save_many(&mut tx, &search.iter().collect::<Vec<_>>()).await?;
    for name in [membership_view::NAME, member_search::NAME] {
        crate::projector::save_checkpoint(&mut tx, name, position).await?;
    }
    tx.commit().await?;
    let write = writing.elapsed();
    let total = started.elapsed().as_secs_f64().max(1e-9);
    Ok(RebuildReport { events, members, position, read_and_fold, write, events_per_second: events as f64 / total })
}
