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
use crate::live::Hub;
use crate::store::{Store, StoredEvent};
use anyhow::Context;
use app::views::{ConsumerStatus, MembershipView};
use async_trait::async_trait;
use sqlx::{Acquire, AnyConnection, Row};
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
    pub views: Vec<MembershipView>,
    /// Newest position a processor appended (0 if none), to wake the other consumers.
    pub appended: i64,
}

#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Apply one event inside the batch's transaction. Must ignore events it already applied
    /// (rows remember their position) so a replay is harmless.
    async fn handle(&self, conn: &mut AnyConnection, event: &StoredEvent, effects: &mut Effects) -> anyhow::Result<()>;
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

/// All consumers of this server, and the tasks that run them.
pub struct Consumers {
    store: Store,
    handles: Vec<Arc<ConsumerHandle>>,
}

impl Consumers {
    pub fn start(
        store: Store,
        head: Arc<watch::Sender<i64>>,
        hub: Arc<Hub>,
        poll: Duration,
        shutdown: CancellationToken,
    ) -> (Arc<Consumers>, Vec<tokio::task::JoinHandle<()>>) {
        let mut handles = Vec::new();
        let mut tasks = Vec::new();
        for consumer in all() {
            let handle = Arc::new(ConsumerHandle::new(consumer.name()));
            handles.push(handle.clone());
            let runner = Runner {
                store: store.clone(),
                consumer,
                handle,
                head: head.clone(),
                hub: hub.clone(),
                poll,
                shutdown: shutdown.clone(),
            };
            tasks.push(tokio::spawn(runner.run()));
        }
        (Arc::new(Consumers { store, handles }), tasks)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ConsumerHandle>> {
        self.handles.iter().find(|h| h.name == name)
    }

    /// The position up to which member views are current (`X-View-Position`).
    pub fn view_position(&self) -> i64 {
        self.get(membership_view::NAME).map(|h| h.applied()).unwrap_or(0)
    }

    /// Wait until the membership view has applied `position`, at most `wait`. True if it has.
    pub async fn wait_for_view(&self, position: i64, wait: Duration) -> bool {
        let Some(handle) = self.get(membership_view::NAME) else { return false };
        let mut rx = handle.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|p| *p >= position)).await.is_ok_and(|r| r.is_ok())
    }

    /// Drive every consumer to the current head, including events the processors append on the
    /// way. Tests use it to make the read side deterministic.
    pub async fn catch_up(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let head = self.store.head().await?;
            for handle in &self.handles {
                let mut rx = handle.subscribe();
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::timeout(left, rx.wait_for(|p| *p >= head))
                    .await
                    .with_context(|| format!("{} did not reach position {head} in time", handle.name))??;
            }
            if self.store.head().await? == head {
                return Ok(());
            }
        }
    }

    pub async fn statuses(&self) -> anyhow::Result<Vec<ConsumerStatus>> {
        let head = self.store.head().await?.max(0) as u64;
        Ok(self
            .handles
            .iter()
            .map(|h| {
                let position = h.applied().max(0) as u64;
                let (label, last_error, rate) = h.snapshot();
                let lag = head.saturating_sub(position);
                let state = match label {
                    "running" if lag > 0 => "catching_up",
                    other => other,
                };
                ConsumerStatus {
                    name: h.name.to_string(),
                    position,
                    head,
                    lag,
                    state: state.to_string(),
                    last_error,
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
    hub: Arc<Hub>,
    poll: Duration,
    shutdown: CancellationToken,
}

impl Runner {
    async fn run(self) {
        let name = self.consumer.name();
        let mut position = loop {
            match load_checkpoint(&self.store, name).await {
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
                    let _ = record_error(&self.store, name, position, &message).await;
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
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

    #[tracing::instrument(skip(self), fields(consumer = self.consumer.name()), err(Debug))]
    async fn step(&self, position: i64) -> anyhow::Result<Option<i64>> {
        let events = self.store.read_all(position, BATCH).await?;
        let Some(last) = events.last().map(|e| e.position) else {
            return Ok(None);
        };
        let mut effects = Effects::default();
        let mut conn = self.store.write.acquire().await?;
        let mut tx = conn.begin().await?;
        for event in &events {
            self.consumer.handle(&mut tx, event, &mut effects).await.with_context(|| {
                format!("applying event {} ({}) at position {}", event.event_type, event.stream_id, event.position)
            })?;
        }
        save_checkpoint(&mut tx, self.consumer.name(), last).await?;
        tx.commit().await?;
        drop(conn);

        let name = self.consumer.name();
        self.handle.record(events.len() as u64);
        metrics::counter!("tally_consumer_events_total", "consumer" => name).increment(events.len() as u64);
        metrics::gauge!("tally_consumer_position", "consumer" => name).set(last as f64);
        if effects.appended > 0 {
            self.head.send_if_modified(|h| {
                let moved = effects.appended > *h;
                *h = (*h).max(effects.appended);
                moved
            });
        }
        self.hub.publish_views(effects.views);
        Ok(Some(last))
    }
}

async fn load_checkpoint(store: &Store, name: &str) -> Result<i64, sqlx::Error> {
    let row =
        sqlx::query("SELECT position FROM checkpoints WHERE name = $1").bind(name).fetch_optional(&store.read).await?;
    row.map(|r| r.try_get::<i64, _>("position")).transpose().map(|p| p.unwrap_or(0))
}

async fn save_checkpoint(conn: &mut AnyConnection, name: &str, position: i64) -> Result<(), sqlx::Error> {
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

async fn record_error(store: &Store, name: &str, position: i64, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at, last_error) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO UPDATE SET updated_at = excluded.updated_at, last_error = excluded.last_error",
    )
    .bind(name)
    .bind(position)
    .bind(clock::now())
    .bind(message)
    .execute(&store.write)
    .await?;
    Ok(())
}
