//! The subscription runner: feeds every consumer (projection or processor) the events in global
//! position order, one batch per transaction, with the consumer's checkpoint written in the same
//! transaction as its effects (exactly-once effect from at-least-once delivery).
//!
//! Each consumer runs as its own task: it wakes when the head moves (the command writer bumps it
//! after each commit) and polls slowly as a safety net. A failing event is retried with backoff and
//! never skipped: skipping would be data loss; the failure shows in `GET /api/projections`.

pub mod member_search;
pub mod membership_view;

use crate::clock;
use crate::fanout::ViewFeed;
use crate::store::{Store, StoredEvent};
use app::views::ConsumerStatus;
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Events read and applied per transaction.
pub const BATCH: i64 = 500;

/// What applying a batch changed, acted upon after its commit.
#[derive(Default)]
pub struct Effects {
    /// Membership views that changed, to push to live subscribers.
    pub views: Vec<membership_view::ViewRow>,
    /// Newest position a processor appended (0 if none), to wake the other consumers.
    pub appended: i64,
}

#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Apply a batch of events (in position order) inside the batch's transaction. Must ignore
    /// events it already applied (rows remember their position) so a replay is harmless.
    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        effects: &mut Effects,
    ) -> anyhow::Result<()>;
    /// True for processors that append events (they take the append lock).
    fn appends(&self) -> bool {
        false
    }
    /// True for the projection whose views are pushed live and awaited by `min_position`.
    fn feeds_views(&self) -> bool {
        false
    }
}

/// The members whose streams these events are on, each once, sorted.
pub fn member_ids(events: &[StoredEvent]) -> Vec<&str> {
    use app::domain::{member::MemberAggregate, Aggregate};
    let mut ids: Vec<&str> = events.iter().filter_map(|e| e.stream_key(MemberAggregate::STREAM_PREFIX)).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The consumers this server runs, in one list.
pub fn all() -> Vec<Arc<dyn Consumer>> {
    vec![
        Arc::new(membership_view::MembershipViewProjection),
        Arc::new(member_search::MemberSearchProjection),
        Arc::new(crate::processors::loyalty::LoyaltyPolicy),
    ]
}

/// A running consumer as the rest of the server sees it.
pub struct ConsumerHandle {
    pub name: &'static str,
    applied: watch::Sender<i64>,
    state: Mutex<RunState>,
}

struct RunState {
    label: &'static str,
    last_error: Option<String>,
    recent: VecDeque<(Instant, u64)>,
}

impl ConsumerHandle {
    fn new(name: &'static str) -> Self {
        ConsumerHandle {
            name,
            applied: watch::Sender::new(0),
            state: Mutex::new(RunState { label: "starting", last_error: None, recent: VecDeque::new() }),
        }
    }

    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    fn set(&self, label: &'static str, error: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.label = label;
            s.last_error = error;
        }
    }

    fn record(&self, events: u64) {
        if let Ok(mut s) = self.state.lock() {
            let now = Instant::now();
            s.recent.push_back((now, events));
            while s.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
                s.recent.pop_front();
            }
        }
    }

    fn snapshot(&self) -> (&'static str, Option<String>, f64) {
        match self.state.lock() {
            Ok(s) => {
                let now = Instant::now();
                let n: u64 =
                    s.recent.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, n)| n).sum();
                (s.label, s.last_error.clone(), n as f64 / RATE_WINDOW.as_secs_f64())
            }
            Err(_) => ("unknown", None, 0.0),
        }
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

/// All consumers of this server. Their tasks run while this node is the active one (always on
/// SQLite; on PostgreSQL while it holds the leader lock, see `leader.rs`).
pub struct Consumers {
    store: Store,
    head: Arc<watch::Sender<i64>>,
    feed: Arc<ViewFeed>,
    poll: Duration,
    consumers: Vec<Arc<dyn Consumer>>,
    handles: Vec<Arc<ConsumerHandle>>,
}

impl Consumers {
    pub fn new(store: Store, head: Arc<watch::Sender<i64>>, feed: Arc<ViewFeed>, poll: Duration) -> Arc<Consumers> {
        let consumers = all();
        let handles = consumers.iter().map(|c| Arc::new(ConsumerHandle::new(c.name()))).collect();
        Arc::new(Consumers { store, head, feed, poll, consumers, handles })
    }

    /// Start one task per consumer; they stop when `stop` is cancelled.
    pub fn run(&self, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.consumers
            .iter()
            .zip(&self.handles)
            .map(|(consumer, handle)| {
                let runner = Runner {
                    store: self.store.clone(),
                    consumer: consumer.clone(),
                    handle: handle.clone(),
                    head: self.head.clone(),
                    feed: self.feed.clone(),
                    poll: self.poll,
                    shutdown: stop.clone(),
                };
                tokio::spawn(runner.run())
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ConsumerHandle>> {
        self.handles.iter().find(|h| h.name == name)
    }

    /// Drive every consumer to the current head, including events the processors append on the
    /// way. Tests use it to make the read side deterministic. Works on any node: it watches the
    /// checkpoints in the database, wherever the consumers run.
    pub async fn catch_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let head = self.store.head().await?;
            loop {
                let checkpoints = self.checkpoints().await?;
                let behind = self.handles.iter().find(|h| checkpoints.get(h.name).map(|c| c.0).unwrap_or(0) < head);
                let Some(behind) = behind else { break };
                if Instant::now() > deadline {
                    anyhow::bail!("{} did not reach position {head} in time", behind.name);
                }
                let mut rx = behind.subscribe();
                // Wake on local progress, or re-check soon when the consumers run elsewhere.
                let _ = tokio::time::timeout(Duration::from_millis(20), rx.wait_for(|p| *p >= head)).await;
            }
            if self.store.head().await? == head && self.feed.wait_for(head, within).await {
                return Ok(());
            }
        }
    }

    async fn checkpoints(&self) -> Result<std::collections::HashMap<String, (i64, Option<String>)>, sqlx::Error> {
        let rows =
            sqlx::query("SELECT name, position, last_error FROM checkpoints").fetch_all(&self.store.read).await?;
        rows.iter().map(|r| Ok((r.try_get("name")?, (r.try_get("position")?, r.try_get("last_error")?)))).collect()
    }

    /// `GET /api/projections`: positions from the checkpoints (valid on every node); state and
    /// throughput from this node when it runs the consumers.
    pub async fn statuses(&self) -> anyhow::Result<Vec<ConsumerStatus>> {
        let head = self.store.head().await?.max(0) as u64;
        let checkpoints = self.checkpoints().await?;
        Ok(self
            .handles
            .iter()
            .map(|h| {
                let (position, stored_error) = checkpoints.get(h.name).cloned().unwrap_or((0, None));
                let position = position.max(0) as u64;
                let (label, last_error, rate) = h.snapshot();
                let lag = head.saturating_sub(position);
                let state = match (label, &stored_error) {
                    // Not running here: another node is the active one; judge by its checkpoint.
                    ("starting" | "stopped", Some(_)) => "failing",
                    ("starting" | "stopped", None) | ("running", _) if lag > 0 => "catching_up",
                    ("starting" | "stopped", None) => "running",
                    (other, _) => other,
                };
                ConsumerStatus {
                    name: h.name.to_string(),
                    position,
                    head,
                    lag,
                    state: state.to_string(),
                    last_error: last_error.or(stored_error),
                    events_per_second: (rate * 10.0).round() / 10.0,
                }
            })
            .collect())
    }
}

struct Runner {
    store: Store,
    consumer: Arc<dyn Consumer>,
    handle: Arc<ConsumerHandle>,
    head: Arc<watch::Sender<i64>>,
    feed: Arc<ViewFeed>,
    poll: Duration,
    shutdown: CancellationToken,
}

impl Runner {
    async fn run(self) {
        let name = self.consumer.name();
        let mut position = loop {
            match init_checkpoint(&self.store, name).await {
                Ok(p) => break p,
                Err(err) => {
                    tracing::error!(consumer = name, error = %err, "cannot read checkpoint; retrying");
                    if self.sleep(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        };
        self.handle.applied.send_replace(position);
        let mut head_rx = self.head.subscribe();
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            match self.step(position).await {
                Ok(Some(next)) => {
                    position = next;
                    self.handle.applied.send_replace(position);
                    self.handle.set("running", None);
                    backoff = Duration::from_millis(100);
                }
                Ok(None) => {
                    self.handle.set("running", None);
                    head_rx.borrow_and_update();
                    tokio::select! {
                        changed = head_rx.changed() => {
                            if changed.is_err() && self.sleep(self.poll).await { break; }
                        }
                        _ = tokio::time::sleep(self.poll) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                Err(err) => {
                    let message = format!("{err:#}");
                    tracing::error!(consumer = name, position, error = %message, "consumer failed; will retry");
                    metrics::counter!("tally_consumer_errors_total", "consumer" => name).increment(1);
                    self.handle.set("failing", Some(message.clone()));
                    let _ = record_error(&self.store, name, &message).await;
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    // Another node may have moved the checkpoint meanwhile.
                    if let Ok(p) = load_checkpoint(&self.store, name).await {
                        position = p;
                    }
                }
            }
        }
        self.handle.set("stopped", None);
        tracing::info!(consumer = name, position, "consumer stopped");
    }

    /// Sleep unless shut down first; true when shutting down.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// One batch: returns the new position, or None when there was nothing to do.
    #[tracing::instrument(skip(self), fields(consumer = self.consumer.name()), err(Debug))]
    async fn step(&self, position: i64) -> anyhow::Result<Option<i64>> {
        let events = self.store.read_all(position, BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(None);
        };
        let name = self.consumer.name();
        let mut effects = Effects::default();
        let mut conn = self.store.write.acquire().await?;
        let mut tx = self.store.begin_consumer(&mut conn, self.consumer.appends()).await?;
        self.consumer.apply(&mut tx, &events, &mut effects).await?;
        if self.consumer.feeds_views() {
            self.feed.in_transaction(&mut tx, &effects.views, last).await?;
        }
        if !advance_checkpoint(&mut tx, name, position, last).await? {
            // Someone else applied these (a node that briefly believed it led): drop ours, start
            // from theirs.
            tx.rollback().await?;
            drop(conn);
            return Ok(Some(load_checkpoint(&self.store, name).await?));
        }
        tx.commit().await?;
        drop(conn);

        self.handle.record(events.len() as u64);
        metrics::counter!("tally_consumer_events_total", "consumer" => name).increment(events.len() as u64);
        metrics::gauge!("tally_consumer_position", "consumer" => name).set(last as f64);
        crate::store::raise(&self.head, effects.appended);
        if self.consumer.feeds_views() {
            self.feed.after_commit(effects.views, last);
        }
        Ok(Some(last))
    }
}

/// Make sure the consumer's row exists (it is locked for every batch), and read it.
async fn init_checkpoint(store: &Store, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at) VALUES ($1, 0, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(clock::now())
    .execute(&store.write)
    .await?;
    load_checkpoint(store, name).await
}

pub async fn load_checkpoint(store: &Store, name: &str) -> Result<i64, sqlx::Error> {
    let row =
        sqlx::query("SELECT position FROM checkpoints WHERE name = $1").bind(name).fetch_optional(&store.read).await?;
    row.map(|r| r.try_get::<i64, _>("position")).transpose().map(|p| p.unwrap_or(0))
}

/// Move the checkpoint from `from` to `to`, inside the batch's transaction; false (and nothing
/// written) when it is no longer at `from`. On PostgreSQL the row lock this takes is held to the
/// commit, and a second node running the same batch waits on it, then finds the checkpoint moved:
/// so no batch is ever applied twice, whatever two nodes believe about who leads.
async fn advance_checkpoint(conn: &mut AnyConnection, name: &str, from: i64, to: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE checkpoints SET position = $3, updated_at = $4, last_error = NULL WHERE name = $1 AND position = $2",
    )
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(clock::now())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Set a checkpoint outright (`tally rebuild`).
pub async fn save_checkpoint(conn: &mut AnyConnection, name: &str, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at, last_error) VALUES ($1, $2, $3, NULL) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at, last_error = NULL",
    )
    .bind(name)
    .bind(position)
    .bind(clock::now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn record_error(store: &Store, name: &str, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE checkpoints SET updated_at = $2, last_error = $3 WHERE name = $1")
        .bind(name)
        .bind(clock::now())
        .bind(message)
        .execute(&store.write)
        .await?;
    Ok(())
}
