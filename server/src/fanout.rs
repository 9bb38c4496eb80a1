//! How view changes leave the projector: to this node's live hub and read-your-writes waiters,
//! and on PostgreSQL to every node.
//!
//! - SQLite (one node): after the projector commits, changed views go straight to the hub and the
//!   applied position to the `min_position` waiters.
//! - PostgreSQL (many nodes): the projector sends `NOTIFY tally_views, '<position>|<id>,<id>…'`
//!   inside its transaction, so the notice goes out exactly when the views commit. Every node
//!   (the projector's own included) LISTENs (see `notices`), reads the changed rows once per
//!   change (never per client) and feeds its hub and waiters. A node that lost its listener
//!   connection reconnects, and re-reads the projector's checkpoint so waiters never hang.

use crate::live::Hub;
use crate::store::{Backend, Store};
use crate::view_cache::ViewRow;
use crate::view_cache::{ViewCache, ViewText};
use app::views::member_topic;
use sqlx::{AnyConnection, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const CHANNEL: &str = "tally_views";
pub use crate::store::APPENDS_CHANNEL;
/// The ids of a notice that says the whole table was replaced (`<position>|*`, see `replaced`).
pub const REPLACED: &str = "*";
/// NOTIFY payloads must stay under 8000 bytes: send ids in chunks.
const IDS_PER_NOTICE: usize = 100;
/// Views kept in memory (about 2 KiB each).
const VIEW_CACHE_ENTRIES: usize = 200_000;
/// Changed views pushed again after the listener was down (see `ViewFeed::listening`).
const RESYNC_LIMIT: i64 = 10_000;

pub struct ViewFeed {
    hub: Arc<Hub>,
    pub cache: ViewCache,
    backend: Backend,
    /// Position up to which membership views are current on this node.
    position: watch::Sender<i64>,
    /// The event store head as this node knows it (wakes the consumers).
    head: Arc<watch::Sender<i64>>,
}

impl ViewFeed {
    pub fn new(hub: Arc<Hub>, backend: Backend, start: i64, head: Arc<watch::Sender<i64>>) -> Self {
        // On PostgreSQL the cache is off until the listener is connected.
        let cache = ViewCache::new(VIEW_CACHE_ENTRIES);
        cache.set_enabled(backend != Backend::Postgres);
        if backend == Backend::Sqlite {
            cache.set_written(start);
        }
        ViewFeed { hub, cache, backend, position: watch::Sender::new(start), head }
    }

    pub fn position(&self) -> i64 {
        *self.position.borrow()
    }

    /// Wait until views are current up to `position`, at most `wait`. True if they are.
    pub async fn wait_for(&self, position: i64, wait: Duration) -> bool {
        let mut rx = self.position.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|p| *p >= position)).await.is_ok_and(|r| r.is_ok())
    }

    fn advance(&self, position: i64) {
        crate::store::raise(&self.position, position);
    }

    /// Inside the projector's transaction (PostgreSQL: the notices commit with the views).
    pub async fn in_transaction(
        &self,
        conn: &mut AnyConnection,
        views: &[ViewRow],
        applied: i64,
    ) -> Result<(), sqlx::Error> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let ids: Vec<&str> = views.iter().map(|v| v.member_id.as_str()).collect();
        let mut chunks: Vec<&[&str]> = ids.chunks(IDS_PER_NOTICE).collect();
        if chunks.is_empty() {
            chunks.push(&[]); // still announce the position: read-your-writes waits on it
        }
        for chunk in chunks {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(format!("{applied}|{}", chunk.join(",")))
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// After the projector's commit (SQLite: deliver locally; PostgreSQL: the listener does).
    /// The projection hands over each changed view once, encoded only if something needs it.
    pub fn after_commit(&self, views: Vec<ViewRow>, applied: i64) {
        if self.backend == Backend::Postgres {
            return;
        }
        for view in views {
            self.deliver(&view.member_id, view.position, view.text);
        }
        self.advance(applied);
    }

    /// The projector stored the views up to `position` with its checkpoint (SQLite writes them
    /// behind; until then the cache is where reads find them). On PostgreSQL the cache holds only
    /// what the table holds (the listener reads it from there).
    pub fn written(&self, position: i64) {
        if self.backend == Backend::Sqlite {
            self.cache.set_written(position);
        }
    }

    /// A changed view: into the cache and out to the sockets, if any watch it (then encoded).
    ///
    /// In the cache first: a socket that subscribes after `watched` looked reads the cache, so
    /// it finds this view there.
    fn deliver(&self, member_id: &str, position: i64, text: Arc<ViewText>) {
        self.cache.put_text(member_id, position, text.clone());
        let topic = member_topic(member_id);
        if !self.hub.watched(&topic) {
            return;
        }
        match text.json() {
            Ok(json) => self.hub.publish(&topic, position.max(0) as u64, &json),
            // Cannot happen for a view's plain fields; a subscriber re-reads on reconnect.
            Err(err) => tracing::error!(error = %err, member_id, "cannot encode a changed view"),
        }
    }

    /// PostgreSQL: the notice listener is connected; every later change will arrive, so caching
    /// is safe again. What changed while no one listened (a gap: the notices are gone for good)
    /// is read from the table and pushed like any change, so this node's sockets and waiters
    /// are current again; the gap is logged and counted.
    /// `current`: the membership view's checkpoint, read once the listener was connected.
    pub async fn listening(&self, store: &Store, current: i64) -> anyhow::Result<()> {
        self.cache.set_enabled(true);
        let heard = self.position();
        if current > heard {
            let changed = self.resync(store, heard, current).await?;
            tracing::warn!(
                from = heard,
                to = current,
                views = changed,
                "view changes were announced while the notice listener was down; re-read them from the table"
            );
            metrics::counter!("tally_notice_gaps_total").increment(1);
            metrics::counter!("tally_notice_gap_positions_total").increment((current - heard) as u64);
        }
        self.advance(current);
        Ok(())
    }

    /// Deliver every view that changed after `after` (up to `RESYNC_LIMIT` of them, oldest
    /// first; past that, the sockets of the rest get their changes when they next change or
    /// resubscribe). Returns how many were delivered.
    async fn resync(&self, store: &Store, after: i64, to: i64) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT member_id, view, position FROM membership_view WHERE position > $1 AND position <= $2 \
             ORDER BY position LIMIT $3",
        )
        .bind(after)
        .bind(to)
        .bind(RESYNC_LIMIT)
        .fetch_all(&store.read)
        .await?;
        for row in &rows {
            let member_id: String = row.try_get("member_id")?;
            let json: String = row.try_get("view")?;
            self.deliver(&member_id, row.try_get("position")?, Arc::new(ViewText::ready(json.into())));
        }
        if rows.len() as i64 == RESYNC_LIMIT {
            tracing::warn!(limit = RESYNC_LIMIT, "more views changed during the gap than are pushed again");
        }
        Ok(rows.len())
    }

    /// The table of membership views was replaced by a blue/green build current to `position`
    /// (see `projector::blue_green`; on PostgreSQL every node hears it as a notice): forget every
    /// cached view, push each watched member's view from the new table, and announce the
    /// position. Positions never go back: the new table is current to `position`, at or past
    /// every view this node has pushed.
    pub async fn replaced(&self, store: &Store, position: i64) -> Result<(), sqlx::Error> {
        self.cache.replaced(if self.backend == Backend::Sqlite { position } else { i64::MAX });
        for topic in self.hub.watched_topics(&member_topic("")) {
            let Some(id) = topic.strip_prefix(&member_topic("")) else { continue };
            if let Some((json, view_position)) = crate::queries::member_view(store, id).await? {
                self.cache.put(id, view_position, json.as_str().into());
                // At the position the sockets may have been sent already, from the old table.
                self.hub.republish(&topic, view_position.max(0) as u64, &json);
            }
        }
        self.advance(position);
        Ok(())
    }

    /// PostgreSQL: the notice listener lost its connection; changes may be missed until it is
    /// back, so no cached views meanwhile.
    pub fn not_listening(&self) {
        self.cache.set_enabled(false);
    }

    /// PostgreSQL: a notice on one of this feed's channels (see `notices`).
    pub async fn notice(&self, channel: &str, payload: &str, store: &Store) -> Result<(), sqlx::Error> {
        if channel == APPENDS_CHANNEL {
            if let Ok(position) = payload.parse::<i64>() {
                crate::store::raise(&self.head, position);
            }
            return Ok(());
        }
        let Some((position, ids)) = payload.split_once('|') else { return Ok(()) };
        let Ok(position) = position.parse::<i64>() else { return Ok(()) };
        if ids == REPLACED {
            return self.replaced(store, position).await;
        }
        for id in ids.split(',').filter(|id| !id.is_empty()) {
            if let Some((json, view_position)) = crate::queries::member_view(store, id).await? {
                self.deliver(id, view_position, Arc::new(ViewText::ready(json.into())));
            }
        }
        self.advance(position);
        Ok(())
    }
}
