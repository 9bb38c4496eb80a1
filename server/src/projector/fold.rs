//! The views as the events leave them: every event of the log folded in memory, in position
//! order, with the projections' own `evolve`, so the result is byte for byte what the live
//! projector writes. The offline rebuild (`rebuild`) and an online one (`blue_green`) start here.

use super::{member_search, membership_view};
use crate::store::{Store, StoredEvent};
use app::domain::member::{MemberAggregate, MemberEvent};
use app::domain::Aggregate;
use app::views::MembershipView;
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The views as the events leave them, folded in position order.
#[derive(Default)]
pub struct Fold {
    pub views: HashMap<String, MembershipView>,
    /// Per member, the last event that changed its search row (see `member_search::changes_row`).
    pub searched_at: HashMap<String, u64>,
    pub position: i64,
    pub events: u64,
    /// `{"event_type": …, "data": …}`, rebuilt for each event (decoded straight from the text).
    wrapped: String,
    /// Events folded so far, for an online build's progress (counted in steps of `PROGRESS_STEP`).
    progress: Option<Arc<AtomicU64>>,
}

/// Events folded between two updates of the progress counter.
const PROGRESS_STEP: u64 = 1024;

impl Fold {
    fn counted(&mut self) {
        self.events += 1;
        if let Some(progress) = self.progress.as_ref().filter(|_| self.events.is_multiple_of(PROGRESS_STEP)) {
            progress.fetch_add(PROGRESS_STEP, Ordering::Relaxed);
        }
    }

    /// One event read through the store (an online build's tail): the member whose view it
    /// changed, if any.
    pub fn apply_stored(&mut self, stored: &StoredEvent) -> anyhow::Result<Option<String>> {
        self.position = stored.position;
        self.counted();
        let Some(member_id) = stored.stream_key(MemberAggregate::STREAM_PREFIX) else { return Ok(None) };
        let event: MemberEvent = stored.decode()?;
        let Some(view) = membership_view::evolve(self.views.remove(member_id), stored, &event) else {
            return Ok(None);
        };
        if member_search::changes_row(&stored.event_type) {
            self.searched_at.insert(member_id.to_string(), stored.position as u64);
        }
        self.views.insert(member_id.to_string(), view);
        Ok(Some(member_id.to_string()))
    }

    /// A member's search row as the folded events leave it.
    pub fn search_row(&self, view: &MembershipView) -> member_search::SearchRow {
        member_search::from_view(view, self.searched_at.get(&view.member_id).copied().unwrap_or(view.position))
    }

    /// One event; `data` is `None` for streams that are not a member's (nothing to fold).
    fn apply(
        &mut self,
        position: i64,
        stream_id: &str,
        stream_version: i64,
        (event_type, schema_version): (&str, i64),
        data: Option<&str>,
        recorded_at: &str,
    ) -> anyhow::Result<()> {
        self.position = position;
        self.counted();
        let (Some(data), Some(member_id)) = (data, stream_id.strip_prefix(MemberAggregate::STREAM_PREFIX)) else {
            return Ok(());
        };
        self.wrapped.clear();
        self.wrapped.push_str(r#"{"event_type":""#);
        self.wrapped.push_str(event_type);
        self.wrapped.push_str(r#"","data":"#);
        if schema_version == i64::from(app::domain::schema_version(event_type)) {
            self.wrapped.push_str(data);
        } else {
            // Written at an older version: through the upcasters (rare, so not the fast path).
            let upcast = app::domain::upcast(event_type, schema_version, serde_json::from_str(data)?)?;
            self.wrapped.push_str(&upcast.to_string());
        }
        self.wrapped.push('}');
        let event: MemberEvent = serde_json::from_str(&self.wrapped)?;
        let stored = StoredEvent {
            position,
            stream_id: String::new(),
            stream_version,
            event_type: String::new(),
            schema_version: 1,
            data: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
            recorded_at: recorded_at.to_string(),
        };
        let current = self.views.remove(member_id);
        if let Some(view) = membership_view::evolve(current, &stored, &event) {
            self.views.insert(member_id.to_string(), view);
            if member_search::changes_row(event_type) {
                self.searched_at.insert(member_id.to_string(), position as u64);
            }
        }
        Ok(())
    }
}

/// Only what the fold needs, no metadata: reading and decoding are most of the rebuild's time.
const READ: &str =
    "SELECT position, stream_id, stream_version, event_type, data, recorded_at, schema_version FROM events";

/// SQLite: one pass over the table with the native driver on a blocking thread, reading each
/// value in place. (sqlx hands every row from its driver thread to the async side and converts
/// each value for the `Any` driver; here that was two thirds of the time.)
fn fold_sqlite(path: &std::path::Path, progress: Option<Arc<AtomicU64>>) -> anyhow::Result<Fold> {
    use rusqlite::OpenFlags;
    // One thread uses this connection: no need for SQLite's per-call mutex.
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = rusqlite::Connection::open_with_flags(path, flags)?;
    let mut statement = conn.prepare(&format!("{READ} ORDER BY position"))?;
    let mut rows = statement.query([])?;
    let mut fold = Fold { progress, ..Fold::default() };
    while let Some(row) = rows.next()? {
        fold.apply(
            row.get(0)?,
            row.get_ref(1)?.as_str()?,
            row.get(2)?,
            (row.get_ref(3)?.as_str()?, row.get(6)?),
            row.get_ref(4)?.as_str_or_null()?,
            row.get_ref(5)?.as_str()?,
        )?;
    }
    Ok(fold)
}

/// Events read per query (PostgreSQL).
const PAGE: i64 = 20_000;

async fn read_page(pool: sqlx::AnyPool, after: i64) -> Result<Vec<sqlx::any::AnyRow>, sqlx::Error> {
    let sql = "SELECT position, stream_id, stream_version, event_type, schema_version, \
               CASE WHEN stream_id LIKE 'member-%' THEN data END AS data, recorded_at \
               FROM events WHERE position > $1 ORDER BY position LIMIT $2";
    sqlx::query(sql).bind(after).bind(PAGE).fetch_all(&pool).await
}

/// PostgreSQL: pages through sqlx, the next page read while this one is folded; `data` only for
/// member streams (the others are skipped anyway).
async fn fold_pages(store: &Store, progress: Option<Arc<AtomicU64>>) -> anyhow::Result<Fold> {
    let mut fold = Fold { progress, ..Fold::default() };
    let mut next = tokio::spawn(read_page(store.read.clone(), 0));
    loop {
        let rows = next.await??;
        let Some(last) = rows.last() else { break };
        next = tokio::spawn(read_page(store.read.clone(), last.try_get("position")?));
        for row in &rows {
            let stream_id: String = row.try_get("stream_id")?;
            let event_type: String = row.try_get("event_type")?;
            let data: Option<String> = row.try_get("data")?;
            let recorded_at: String = row.try_get("recorded_at")?;
            fold.apply(
                row.try_get("position")?,
                &stream_id,
                row.try_get("stream_version")?,
                (&event_type, row.try_get("schema_version")?),
                data.as_deref(),
                &recorded_at,
            )?;
        }
    }
    Ok(fold)
}

/// Every event in the log, folded in position order (`progress` counts them as they go).
pub async fn fold_log(store: &Store, progress: Option<Arc<AtomicU64>>) -> anyhow::Result<Fold> {
    match store.sqlite_path.clone() {
        Some(path) => tokio::task::spawn_blocking(move || fold_sqlite(&path, progress)).await?,
        None => fold_pages(store, progress).await,
    }
}
