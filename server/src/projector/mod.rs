//! Consumers (projections and processors) and what runs them: every consumer gets the events in
//! global position order, one batch per transaction, with its checkpoint written in the same
//! transaction as its effects (exactly-once effect from at-least-once delivery). On SQLite the
//! membership views are applied in memory and written behind, still each with the checkpoint
//! (see `runner::Runner`).
//!
//! Here: what a consumer is ([`Consumer`], [`WriteBehind`], [`Role`]) and [`Consumers`], the set a
//! server runs; `runner` runs a group, `checkpoints` keeps their positions, `status` reports them.
//!
//! Each group of consumers (see `consumers::groups`) runs as its own task: it wakes when the head moves (the
//! command writer bumps it after each commit) and polls slowly as a safety net. A failing event is
//! retried with backoff and never skipped: skipping would be data loss; the failure shows in
//! `GET /api/projections`. After a failure the group's consumers run one transaction each, so the
//! healthy ones go on. An event that keeps failing ([`parking::EventFailed`]) is parked with the
//! rest of its stream, and every other stream goes on (see `parking`).

pub mod blue_green;
mod checkpoints;
pub mod fold;
pub mod member_search;
pub mod membership_view;
pub mod parking;
mod row_cache;
mod runner;
mod status;

pub use checkpoints::{load_checkpoint, save_checkpoint};
pub use status::ConsumerHandle;

use crate::fanout::ViewFeed;
use crate::store::{Store, StoredEvent};
use async_trait::async_trait;
use sqlx::AnyConnection;
use std::sync::Arc;
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
    /// Events a processor appended, in position order: after the commit they go to the
    /// in-memory tail and the newest wakes the other consumers.
    pub appended: Vec<StoredEvent>,
}

/// A projection or a processor: what it is called, and how it applies events. The runner does
/// the rest (order, batches, checkpoints, retries).
#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Apply a batch of events (in position order) inside the batch's transaction (or, for a
    /// consumer that writes behind, perhaps outside any: `conn` is then only read). Must ignore
    /// events it already applied (rows remember their position) so a replay is harmless.
    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
        effects: &mut Effects,
    ) -> anyhow::Result<()>;
    /// False for event types this consumer ignores. A batch with none it handles is skipped
    /// without a transaction; its checkpoint catches up later (see `runner::CHECKPOINT_EVERY`).
    fn handles(&self, _event_type: &str) -> bool {
        true
    }
    /// Drop whatever the consumer keeps in memory between batches (see `row_cache`): its table
    /// may have changed elsewhere, or the batch that wrote it did not commit.
    fn forget(&self) {}
    /// A consumer whose `apply` only changes memory, written later (see [`WriteBehind`]).
    fn write_behind(&self) -> Option<&dyn WriteBehind> {
        None
    }
}

/// A consumer that keeps what it applied in memory and lets the runner decide when to write it,
/// with the checkpoint (SQLite; see `runner::Runner`).
#[async_trait]
pub trait WriteBehind: Send + Sync {
    /// Rows applied but not written yet.
    fn unwritten_rows(&self) -> usize;
    /// When the oldest change not written yet was applied.
    fn oldest_unwritten(&self) -> Option<Instant>;
    /// Write the rows `apply` left unwritten that `scope` asks for, in the transaction that moves
    /// the checkpoint. Returns the position of the oldest change still unwritten: the checkpoint
    /// may move only to just before it.
    async fn write(&self, conn: &mut AnyConnection, scope: WriteScope) -> anyhow::Result<Option<i64>>;
}

/// What the runner must know of a consumer besides how it applies events: where it commits, and
/// whether its views go out live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes tables of its own (where the views are).
    Projection,
    /// The projection whose views are pushed to sockets and awaited by `min_position`.
    LiveViews,
    /// Appends events: commits in the event store (under the append lock).
    Processor,
}

impl Role {
    pub fn appends(self) -> bool {
        self == Role::Processor
    }

    pub fn feeds_views(self) -> bool {
        self == Role::LiveViews
    }
}

/// A consumer as the runner holds it.
pub struct Registered {
    pub consumer: Arc<dyn Consumer>,
    pub role: Role,
    pub handle: Arc<ConsumerHandle>,
}

/// Which unwritten rows a transaction writes.
#[derive(Clone, Copy, Debug)]
pub enum WriteScope {
    All,
    /// Those whose oldest change was applied before `before`, and at least `at_least` of the
    /// oldest whatever their age.
    Due {
        before: Instant,
        at_least: usize,
    },
}

/// The members whose streams these events are on, each once, sorted.
pub fn member_ids<'e>(events: impl IntoIterator<Item = &'e Arc<StoredEvent>>) -> Vec<&'e str> {
    use app::domain::{member::MemberAggregate, Aggregate};
    let mut ids: Vec<&str> = events.into_iter().filter_map(|e| e.stream_key(MemberAggregate::STREAM_PREFIX)).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A group's consumers.
type Group = Vec<Registered>;

/// All consumers of this server. Their tasks run while this node is the active one (always on
/// SQLite; on PostgreSQL while it holds the leader lock, see `leader.rs`).
pub struct Consumers {
    store: Store,
    head: Arc<watch::Sender<i64>>,
    feed: Arc<ViewFeed>,
    poll: Duration,
    /// SQLite: how long applied views may wait in memory before they are written (see `Runner`).
    write_behind: Duration,
    /// Per group (see `groups`), each consumer with its handle.
    groups: Vec<Group>,
    /// Attempts at an event before its stream is parked (see `parking`).
    park_after: u32,
    /// Per group: wakes its runner when a retry or skip is asked for here.
    wakes: Vec<Arc<tokio::sync::Notify>>,
    /// Per group: where a blue/green build asks its runner to hold still (see `blue_green`).
    pauses: Vec<Arc<blue_green::PauseSlot>>,
    /// Wakes this node's blue/green builder when a build is asked for here.
    builds: Arc<tokio::sync::Notify>,
}

/// How a server runs its consumers.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Safety-net poll interval (they also wake on every append).
    pub poll: Duration,
    /// SQLite: how long applied views may wait in memory before they are written (see `Runner`).
    pub write_behind: Duration,
    /// Attempts at an event before its stream is parked (see `parking`).
    pub park_after: u32,
}

impl Consumers {
    /// `groups`: the consumers, each group run by a task of its own (see `consumers::groups`).
    pub fn new(
        store: Store,
        groups: Vec<Vec<(Arc<dyn Consumer>, Role)>>,
        head: Arc<watch::Sender<i64>>,
        feed: Arc<ViewFeed>,
        tuning: Tuning,
    ) -> Arc<Consumers> {
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|group| {
                let registered = |(consumer, role): (Arc<dyn Consumer>, Role)| {
                    let handle = Arc::new(ConsumerHandle::new(consumer.name()));
                    Registered { consumer, role, handle }
                };
                group.into_iter().map(registered).collect()
            })
            .collect();
        let wakes = groups.iter().map(|_| Arc::new(tokio::sync::Notify::new())).collect();
        let pauses = groups.iter().map(|_| Arc::default()).collect();
        let Tuning { poll, write_behind, park_after } = tuning;
        let builds = Arc::default();
        Arc::new(Consumers { store, head, feed, poll, write_behind, groups, park_after, wakes, pauses, builds })
    }

    /// Where group `g` commits: a group that appends events in the event store; the projections
    /// where their views are (see `Store::views`).
    fn pool_of(&self, g: usize) -> crate::store::Writes {
        match self.groups[g].iter().any(|registered| registered.role.appends()) {
            true => self.store.write.clone(),
            false => self.store.views.clone(),
        }
    }

    /// The group of the consumer called `name`.
    fn group_of(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|group| group.iter().any(|r| r.handle.name == name))
    }

    /// What the consumer `name` holds back or skipped (`None`: no such consumer).
    pub async fn parked(&self, name: &str) -> Result<Option<Vec<app::views::ParkedStream>>, sqlx::Error> {
        if self.group_of(name).is_none() {
            return Ok(None);
        }
        parking::list(&self.store, name).await.map(Some)
    }

    /// Ask for a retry or a skip of a parked stream; the runner carries it out (here, or on the
    /// node that runs the consumers). False when that stream is not parked.
    pub async fn request(
        &self,
        name: &str,
        stream_id: &str,
        action: parking::Action,
        reason: Option<&str>,
        actor: &str,
    ) -> Result<bool, sqlx::Error> {
        let Some(g) = self.group_of(name) else { return Ok(false) };
        let asked = parking::request(&self.pool_of(g), name, stream_id, action, reason, actor).await?;
        if asked {
            self.wakes[g].notify_one();
        }
        Ok(asked)
    }

    /// Start one task per group; they stop when `stop` is cancelled. Each is supervised (see
    /// `health::supervise`): one that panics starts again from its stored checkpoints.
    pub fn run(self: &Arc<Self>, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = self.run_groups(stop.clone());
        // Blue/green builds run where the consumers do: the swap needs the projector to hold still.
        if let Some(g) = self.group_of(blue_green::REBUILDABLE[0]) {
            let (consumers, supervisor_stop) = (self.clone(), stop.clone());
            let start = move || {
                let builder = blue_green::Builder {
                    store: consumers.store.clone(),
                    feed: consumers.feed.clone(),
                    pause: consumers.pauses[g].clone(),
                    wake_runner: consumers.wakes[g].clone(),
                    wake: consumers.builds.clone(),
                };
                let stop = stop.clone();
                async move { builder.run(stop).await }
            };
            let health = self.store.health.clone();
            tasks.push(tokio::spawn(crate::health::supervise(health, "blue/green builds", supervisor_stop, start)));
        }
        tasks
    }

    /// Ask for an online (blue/green) rebuild of the projection `name` (see `blue_green`).
    pub async fn rebuild(&self, name: &str, actor: &str) -> Result<app::views::RebuildStatus, blue_green::Refused> {
        if self.group_of(name).is_none() {
            return Err(blue_green::Refused::Unknown(name.to_string()));
        }
        let build = blue_green::request(&self.store, name, &format!("asked by {actor}"), actor).await?;
        self.builds.notify_one();
        Ok(build)
    }

    /// The newest online rebuild of the projection `name`, if there was one.
    pub async fn latest_rebuild(&self, name: &str) -> Result<Option<app::views::RebuildStatus>, sqlx::Error> {
        Ok(blue_green::latest(&self.store).await?.into_iter().find(|b| b.projection == name))
    }

    fn run_groups(self: &Arc<Self>, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.groups.len())
            .map(|g| {
                let consumers = self.clone();
                let part = self.groups[g].first().map_or("consumers", |first| first.consumer.name());
                let start = {
                    let stop = stop.clone();
                    move || {
                        let runner = consumers.runner(g, stop.clone());
                        async move {
                            runner.run().await;
                            Ok(())
                        }
                    }
                };
                tokio::spawn(crate::health::supervise(self.store.health.clone(), part, stop.clone(), start))
            })
            .collect()
    }

    /// Every consumer's handle, in group order.
    fn handles(&self) -> impl Iterator<Item = &Arc<ConsumerHandle>> {
        self.groups.iter().flatten().map(|registered| &registered.handle)
    }

    /// Every consumer's name, in group order.
    pub fn names(&self) -> Vec<&'static str> {
        self.handles().map(|h| h.name).collect()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ConsumerHandle>> {
        self.handles().find(|h| h.name == name)
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
                // Running here, a consumer may be past its stored checkpoint (views written
                // behind, batches skipped); its reads see what it applied.
                let at = |h: &ConsumerHandle| checkpoints.get(h.name).map(|c| c.0).unwrap_or(0).max(h.applied());
                let behind = self.handles().find(|h| at(h) < head);
                let Some(behind) = behind else { break };
                if Instant::now() > deadline {
                    anyhow::bail!("{} did not reach position {head} in time", behind.name);
                }
                let mut rx = behind.subscribe();
                // Wake on local progress, or re-check soon when the consumers run elsewhere.
                let _ = tokio::time::timeout(Duration::from_millis(20), rx.wait_for(|p| *p >= head)).await;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.store.head().await? == head && self.feed.wait_for(head, left).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the live views did not reach position {head} in time");
            }
        }
    }
}
