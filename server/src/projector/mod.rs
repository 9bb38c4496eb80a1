//! The subscription runner: feeds every consumer (projection or processor) the events in global
//! position order, one batch per transaction, with the consumer's checkpoint written in the same
//! transaction as its effects (exactly-once effect from at-least-once delivery). On SQLite the
//! membership views are applied in memory and written behind, still each with the checkpoint
//! (see `Runner`).
//!
//! Each group of consumers (see `groups`) runs as its own task: it wakes when the head moves (the
//! command writer bumps it after each commit) and polls slowly as a safety net. A failing event is
//! retried with backoff and never skipped: skipping would be data loss; the failure shows in
//! `GET /api/projections`. After a failure the group's consumers run one transaction each, so the
//! healthy ones go on.

pub mod member_search;
pub mod membership_view;
mod row_cache;

use crate::clock;
use crate::fanout::ViewFeed;
use crate::store::{Backend, Store, StoredEvent, Writes};
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
    /// Events a processor appended, in position order: after the commit they go to the
    /// in-memory tail and the newest wakes the other consumers.
    pub appended: Vec<StoredEvent>,
}

#[async_trait]
pub trait Consumer: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Apply a batch of events (in position order) inside the batch's transaction (or, for a
    /// consumer that `writes_behind`, perhaps outside any: `conn` is then only read). Must ignore
    /// events it already applied (rows remember their position) so a replay is harmless.
    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
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
    /// False for event types this consumer ignores. A batch with none it handles is skipped
    /// without a transaction; its checkpoint catches up later (see `CHECKPOINT_EVERY`).
    fn handles(&self, _event_type: &str) -> bool {
        true
    }
    /// Drop whatever the consumer keeps in memory between batches (see `row_cache`): its table
    /// may have changed elsewhere, or the batch that wrote it did not commit.
    fn forget(&self) {}
    /// True when `apply` only changes memory and `write` stores it: the runner then decides when
    /// to write, with the checkpoint (see `Runner`).
    fn writes_behind(&self) -> bool {
        false
    }
    /// Rows applied but not written yet.
    fn unwritten_rows(&self) -> usize {
        0
    }
    /// When the oldest change not written yet was applied.
    fn oldest_unwritten(&self) -> Option<Instant> {
        None
    }
    /// Write the rows `apply` left unwritten that `scope` asks for, in the transaction that moves
    /// the checkpoint. Returns the position of the oldest change still unwritten: the checkpoint
    /// may move only to just before it.
    async fn write(&self, _conn: &mut AnyConnection, _scope: WriteScope) -> anyhow::Result<Option<i64>> {
        Ok(None)
    }
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

/// A group's consumers, each with its handle.
type Group = Vec<(Arc<dyn Consumer>, Arc<ConsumerHandle>)>;

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
}

impl Consumers {
    /// `groups`: the consumers, each group run by a task of its own (see `consumers::groups`).
    pub fn new(
        store: Store,
        groups: Vec<Vec<Arc<dyn Consumer>>>,
        head: Arc<watch::Sender<i64>>,
        feed: Arc<ViewFeed>,
        poll: Duration,
        write_behind: Duration,
    ) -> Arc<Consumers> {
        let groups: Vec<Group> = groups
            .into_iter()
            .map(|group| group.into_iter().map(|c| (c.clone(), Arc::new(ConsumerHandle::new(c.name())))).collect())
            .collect();
        Arc::new(Consumers { store, head, feed, poll, write_behind, groups })
    }

    /// Start one task per group; they stop when `stop` is cancelled. Each is supervised (see
    /// `health::supervise`): one that panics starts again from its stored checkpoints.
    pub fn run(self: &Arc<Self>, stop: CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.groups.len())
            .map(|g| {
                let consumers = self.clone();
                let part = self.groups[g].first().map_or("consumers", |(consumer, _)| consumer.name());
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

    /// The runner of group `g`, from its stored checkpoints.
    fn runner(&self, g: usize, stop: CancellationToken) -> Runner {
        let group = &self.groups[g];
        // A group that appends events commits in the event store; the projections commit where
        // their views are (see `Store::views`).
        let pool = match group.iter().any(|(consumer, _)| consumer.appends()) {
            true => self.store.write.clone(),
            false => self.store.views.clone(),
        };
        // Only on SQLite: on PostgreSQL other nodes read the views from the table.
        let behind = self.store.backend == Backend::Sqlite && !self.write_behind.is_zero();
        let members = group
            .iter()
            .map(|(consumer, handle)| {
                let defers = behind && consumer.writes_behind();
                Member {
                    consumer: consumer.clone(),
                    handle: handle.clone(),
                    position: 0,
                    stored: 0,
                    stored_at: Instant::now(),
                    defers,
                    store_every: if defers { self.write_behind } else { CHECKPOINT_EVERY },
                }
            })
            .collect();
        Runner {
            store: self.store.clone(),
            pool,
            members,
            head: self.head.clone(),
            feed: self.feed.clone(),
            poll: self.poll,
            shutdown: stop,
            isolate: false,
        }
    }

    /// Every consumer's handle, in group order.
    fn handles(&self) -> impl Iterator<Item = &Arc<ConsumerHandle>> {
        self.groups.iter().flatten().map(|(_, handle)| handle)
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
            if self.store.head().await? == head && self.feed.wait_for(head, within).await {
                return Ok(());
            }
        }
    }

    async fn checkpoints(&self) -> Result<std::collections::HashMap<String, (i64, Option<String>)>, sqlx::Error> {
        let sql = format!("SELECT name, position, last_error FROM {} AS c", self.store.checkpoints_table());
        let rows = sqlx::query(&sql).fetch_all(&self.store.read).await?;
        rows.iter().map(|r| Ok((r.try_get("name")?, (r.try_get("position")?, r.try_get("last_error")?)))).collect()
    }

    /// `GET /api/projections`: positions from the checkpoints (valid on every node); state and
    /// throughput from this node when it runs the consumers.
    pub async fn statuses(&self) -> anyhow::Result<Vec<ConsumerStatus>> {
        let head = self.store.head().await?.max(0) as u64;
        let checkpoints = self.checkpoints().await?;
        Ok(self
            .handles()
            .map(|h| {
                let (position, stored_error) = checkpoints.get(h.name).cloned().unwrap_or((0, None));
                // Running here, a consumer may be past its stored checkpoint by events it skipped.
                let position = position.max(*h.applied.borrow()).max(0) as u64;
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

/// How long a consumer may leave its stored checkpoint behind its position while it skips batches
/// it has nothing to do in (see `Runner::step`). Replaying skipped events is harmless; this only
/// bounds how far back a restart starts and how stale `GET /api/projections` can look under load.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// A consumer that writes behind writes its oldest rows once this many wait, whatever their age,
/// down to half of it (memory: a view held is about 2.5 KiB).
const MAX_UNWRITTEN: usize = 20_000;

/// A consumer that writes behind writes what is due at most this many times per `store_every`:
/// often enough that each write is short (it holds up the projector), rarely enough that each
/// is one transaction for many views.
const WRITES_PER_INTERVAL: u32 = 10;

/// One consumer inside a runner.
struct Member {
    consumer: Arc<dyn Consumer>,
    handle: Arc<ConsumerHandle>,
    /// Everything up to here is applied (or was nothing for this consumer).
    position: i64,
    /// The position in the checkpoint row (≤ `position`).
    stored: i64,
    stored_at: Instant,
    /// Applies its batches in memory and writes each change about `store_every` after it was
    /// applied (SQLite, a consumer that `writes_behind`).
    defers: bool,
    /// How long the stored checkpoint may stay behind `position` (a change, unwritten).
    store_every: Duration,
}

impl Member {
    /// Its checkpoint (and what it holds unwritten) should be stored now.
    fn due(&self, now: Instant) -> bool {
        let since_stored = now.duration_since(self.stored_at);
        match self.consumer.oldest_unwritten() {
            Some(oldest) if self.defers => {
                self.consumer.unwritten_rows() >= MAX_UNWRITTEN
                    || (now.duration_since(oldest) >= self.store_every
                        && since_stored >= self.store_every / WRITES_PER_INTERVAL)
            }
            _ => since_stored >= self.store_every,
        }
    }

    /// What of its unwritten rows a transaction at `now` writes.
    fn write_scope(&self, now: Instant, stopping: bool) -> WriteScope {
        if !self.defers || stopping {
            return WriteScope::All;
        }
        let unwritten = self.consumer.unwritten_rows();
        let at_least = if unwritten >= MAX_UNWRITTEN { unwritten - MAX_UNWRITTEN / 2 } else { 0 };
        WriteScope::Due { before: now.checked_sub(self.store_every).unwrap_or(now), at_least }
    }
}

/// What one member does in one step.
enum Work<'e> {
    /// Apply these events (and move the checkpoint) in the step's transaction.
    Apply(&'e [Arc<StoredEvent>]),
    /// Nothing for this consumer in the batch: move the position, and the checkpoint only with
    /// the step's transaction or once `CHECKPOINT_EVERY` has passed.
    Skip,
    /// Only move the checkpoint to what was skipped before.
    Checkpoint,
}

/// Runs one group of consumers.
///
/// Writing behind (SQLite): the membership views change with nearly every command, each in a
/// random page of their table, and writing them in every batch's transaction was most of what
/// the views cost the command path. So the runner applies such a consumer's batches in memory
/// (the changed views go to the view cache and the sockets at once, as after a commit) and has
/// each view written about `write_behind` after its first unwritten change, a member that
/// changed many times meanwhile once: a transaction every tenth of that interval writes the views
/// that are due, and moves the checkpoint to just before the oldest change still unwritten (so
/// the table and the checkpoint always agree). Everything is written at shutdown. Nothing is lost
/// in a crash: the events after the checkpoint are applied again at start. Reads stay current
/// because the view cache keeps every view the table does not hold yet (`ViewCache`).
struct Runner {
    store: Store,
    /// Where this group's effects and checkpoints are written.
    pool: Writes,
    members: Vec<Member>,
    head: Arc<watch::Sender<i64>>,
    feed: Arc<ViewFeed>,
    poll: Duration,
    shutdown: CancellationToken,
    /// After a failure: one transaction per consumer, so one failing consumer cannot hold back
    /// the others of its group.
    isolate: bool,
}

impl Runner {
    fn names(&self) -> String {
        self.members.iter().map(|m| m.handle.name).collect::<Vec<_>>().join(",")
    }

    async fn run(mut self) {
        // Another node may have run these consumers since this one last did.
        self.forget();
        for i in 0..self.members.len() {
            let name = self.members[i].handle.name;
            let position = loop {
                match init_checkpoint(&self.store, &self.pool, name).await {
                    Ok(p) => break p,
                    Err(err) => {
                        tracing::error!(consumer = name, error = %err, "cannot read checkpoint; retrying");
                        if self.sleep(Duration::from_secs(1)).await {
                            return;
                        }
                    }
                }
            };
            let member = &mut self.members[i];
            (member.position, member.stored) = (position, position);
            member.handle.applied.send_replace(position);
        }
        let mut head_rx = self.head.subscribe();
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            match self.step().await {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {
                    head_rx.borrow_and_update();
                    tokio::select! {
                        changed = head_rx.changed() => {
                            if changed.is_err() && self.sleep(self.poll).await { break; }
                        }
                        _ = tokio::time::sleep(self.poll) => {}
                        _ = self.shutdown.cancelled() => break,
                    }
                }
                Err(()) => {
                    if self.sleep(backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    // Another node may have moved the checkpoints meanwhile.
                    self.reload().await;
                }
            }
        }
        // Store what was applied in memory (views written behind), so a restart need not apply
        // it again.
        let work: Vec<(usize, Work, i64)> = (self.members.iter().enumerate())
            .filter(|(_, m)| m.defers && m.stored < m.position)
            .map(|(i, m)| (i, Work::Checkpoint, m.position))
            .collect();
        if !work.is_empty() && self.commit(work).await.is_err() {
            tracing::warn!(consumers = self.names(), "could not store the checkpoints at shutdown");
        }
        for m in &self.members {
            m.handle.set("stopped", None);
            tracing::info!(consumer = m.handle.name, position = m.position, "consumer stopped");
        }
    }

    /// Drop what the consumers keep in memory, and go back to their stored checkpoints: past them,
    /// what a consumer that writes behind applied was only in that memory, so it must be applied
    /// again (for the others, the batches they skipped are skipped again).
    fn forget(&mut self) {
        for m in &mut self.members {
            m.consumer.forget();
            m.position = m.stored;
            m.handle.applied.send_replace(m.stored);
        }
    }

    /// Sleep unless shut down first; true when shutting down.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.shutdown.cancelled() => true,
        }
    }

    /// Positions from the checkpoint rows (after a failure, or when another node moved them).
    async fn reload(&mut self) {
        self.forget();
        for m in &mut self.members {
            if let Ok(p) = load_checkpoint(&self.store, m.handle.name).await {
                (m.position, m.stored) = (p, p);
            }
        }
    }

    /// One batch for every member that is behind: true when anything moved, `Err` after a failure
    /// (already logged and shown on the failing consumer).
    async fn step(&mut self) -> Result<bool, ()> {
        let from = self.members.iter().map(|m| m.position).min().unwrap_or(0);
        let head = *self.head.borrow();
        let events = match self.store.read_after(from, BATCH, head).await {
            Ok(events) => events,
            Err(err) => {
                let message = format!("reading events after {from}: {err}");
                for i in 0..self.members.len() {
                    self.fail(i, &message).await;
                }
                return Err(());
            }
        };
        let last = events.last().map(|e| e.position);
        let now = Instant::now();
        // (member, what to do, the position it moves to)
        let mut work: Vec<(usize, Work, i64)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let mine = &events[events.partition_point(|e| e.position <= m.position)..];
            match (last, mine.iter().any(|e| m.consumer.handles(&e.event_type))) {
                (Some(last), true) => work.push((i, Work::Apply(mine), last)),
                (Some(last), false) if !mine.is_empty() => work.push((i, Work::Skip, last)),
                // Skipping for long, or idle since (the safety-net poll comes back here): store
                // the checkpoint. Not at once when idle: under load a consumer that skips is
                // idle after every batch, and storing then cost a transaction in the event store
                // per command batch, each one waiting for the command writer's lock.
                _ if m.stored < m.position && m.due(now) => work.push((i, Work::Checkpoint, m.position)),
                _ => {}
            }
        }
        if work.is_empty() {
            return Ok(false);
        }
        for (i, w, _) in &work {
            let name = self.members[*i].handle.name;
            if matches!(w, Work::Apply(_)) && self.store.faults.take_consumer_panic(name) {
                panic!("{name}: a panic the fault suite asked for");
            }
        }
        let needs_tx = work.iter().any(|(i, w, _)| {
            let m = &self.members[*i];
            match w {
                Work::Apply(_) if m.defers => m.due(now),
                Work::Apply(_) | Work::Checkpoint => true,
                Work::Skip => m.due(now),
            }
        });
        if !needs_tx {
            return self.apply_in_memory(work).await.map(|()| true);
        }
        // What writes behind is applied in memory first, so its changes go out at once; the
        // transaction then writes what of it is due (the loop below adds those members: they are
        // now behind their position). Applied inside the transaction, a change that came with a
        // due write went out only after that commit, however long it took. Not after a failure:
        // then each consumer runs in a transaction of its own (below), so that every failing one
        // reports its own error.
        if !self.isolate {
            let (early, rest): (Vec<_>, Vec<_>) =
                work.into_iter().partition(|(i, w, _)| self.members[*i].defers && matches!(w, Work::Apply(_)));
            work = rest;
            if !early.is_empty() && self.apply_in_memory(early).await.is_err() {
                self.isolate = true;
                return Err(());
            }
        }
        // A transaction stores every member that is behind its position (what is due of what
        // one writes behind, the skipped batches' checkpoints).
        for (i, m) in self.members.iter().enumerate() {
            if m.stored < m.position && !work.iter().any(|(j, _, _)| *j == i) {
                work.push((i, Work::Checkpoint, m.position));
            }
        }
        if self.isolate && work.len() > 1 {
            // One transaction each: progress for the healthy ones, the error for the failing one.
            let (mut moved, mut failed) = (false, false);
            for one in work {
                match self.commit(vec![one]).await {
                    Ok(()) => moved = true,
                    Err(()) => failed = true,
                }
            }
            self.isolate = failed;
            return if moved || !failed { Ok(true) } else { Err(()) };
        }
        let result = self.commit(work).await;
        self.isolate = result.is_err();
        result.map(|()| true)
    }

    /// Apply and move checkpoints in one transaction; after its commit, publish what changed.
    #[tracing::instrument(skip_all, fields(consumers = self.names()))]
    async fn commit(&mut self, work: Vec<(usize, Work<'_>, i64)>) -> Result<(), ()> {
        let mut effects: Vec<Effects> = work.iter().map(|_| Effects::default()).collect();
        // Where each checkpoint moves: to the batch's end, or for what writes behind to just
        // before its oldest change still unwritten.
        let mut store_to: Vec<i64> = work.iter().map(|(_, _, to)| *to).collect();
        let (started, stopping) = (Instant::now(), self.shutdown.is_cancelled());
        let mut failing = None;
        let outcome: anyhow::Result<bool> = async {
            let appends =
                work.iter().any(|(i, w, _)| matches!(w, Work::Apply(_)) && self.members[*i].consumer.appends());
            let mut conn = self.pool.acquire().await?;
            let mut tx = self.store.begin_consumer(&mut conn, appends).await?;
            for (((i, w, to), effects), store_to) in work.iter().zip(&mut effects).zip(&mut store_to) {
                let m = &self.members[*i];
                failing = Some(*i);
                if let Work::Apply(events) = w {
                    m.consumer.apply(&mut tx, events, effects).await?;
                    if m.consumer.feeds_views() {
                        self.feed.in_transaction(&mut tx, &effects.views, *to).await?;
                    }
                }
                if let Some(oldest) = m.consumer.write(&mut tx, m.write_scope(started, stopping)).await? {
                    *store_to = (oldest - 1).min(*to);
                }
                if !advance_checkpoint(&mut tx, m.handle.name, m.stored, *store_to).await? {
                    // Someone else applied these (a node that briefly believed it led): drop
                    // ours, start from theirs.
                    tx.rollback().await?;
                    return Ok(false);
                }
            }
            failing = None;
            tx.commit().await?;
            // Before the write connection goes back: the command writer trusts the head to
            // include every committed append (see `StateCache`).
            for e in &mut effects {
                let newest = e.appended.last().map_or(0, |event| event.position);
                self.store.committed(std::mem::take(&mut e.appended));
                crate::store::raise(&self.head, newest);
            }
            Ok(true)
        }
        .await;
        match outcome {
            Ok(true) => {}
            Ok(false) => {
                self.reload().await;
                return Ok(());
            }
            Err(err) => {
                // Whatever the batch kept in memory may not have committed.
                self.failed(&err, failing, &work).await;
                return Err(());
            }
        }
        let now = Instant::now();
        for (((i, w, to), effects), store_to) in work.into_iter().zip(effects).zip(store_to) {
            let m = &mut self.members[i];
            (m.stored, m.stored_at) = (store_to, now);
            metrics::gauge!("tally_consumer_position", "consumer" => m.handle.name).set(to as f64);
            if m.consumer.feeds_views() {
                self.feed.written(store_to);
            }
            self.applied(i, &w, to, effects);
        }
        Ok(())
    }

    /// A member's batch is applied (committed, or in memory): count it, move its position and
    /// hand over the views it changed.
    fn applied(&mut self, i: usize, work: &Work<'_>, to: i64, effects: Effects) {
        let m = &mut self.members[i];
        let name = m.handle.name;
        if let Work::Apply(events) = work {
            m.handle.record(events.len() as u64);
            metrics::counter!("tally_consumer_events_total", "consumer" => name).increment(events.len() as u64);
        }
        if m.defers {
            let unwritten = m.consumer.unwritten_rows() as f64;
            metrics::gauge!("tally_consumer_unwritten_rows", "consumer" => name).set(unwritten);
        }
        m.position = to;
        m.handle.applied.send_replace(to);
        m.handle.set("running", None);
        self.store.health.ok(name);
        if m.consumer.feeds_views() {
            self.feed.after_commit(effects.views, to);
        }
    }

    /// A batch failed: what the consumers keep in memory (and the connection) may not match the
    /// tables any more. The failing consumer shows the error, or every one when none was at work.
    async fn failed(&mut self, err: &anyhow::Error, failing: Option<usize>, work: &[(usize, Work<'_>, i64)]) {
        self.forget();
        self.pool.reset().await;
        let message = format!("{err:#}");
        let failed: Vec<usize> = match failing {
            Some(i) => vec![i],
            None => work.iter().map(|(i, _, _)| *i).collect(),
        };
        for i in failed {
            self.fail(i, &message).await;
        }
    }

    /// No transaction: apply the batches of members that write behind (their reads of rows they
    /// do not keep go through the group's connection), and move every member's position. Their
    /// effects go out as after a commit; the next transaction stores them (see `Runner`).
    async fn apply_in_memory(&mut self, work: Vec<(usize, Work<'_>, i64)>) -> Result<(), ()> {
        let mut effects: Vec<Effects> = work.iter().map(|_| Effects::default()).collect();
        let mut failing = None;
        let outcome: anyhow::Result<()> = async {
            if work.iter().any(|(_, w, _)| matches!(w, Work::Apply(_))) {
                let mut conn = self.pool.acquire().await?;
                for ((i, w, _), effects) in work.iter().zip(&mut effects) {
                    if let Work::Apply(events) = w {
                        failing = Some(*i);
                        self.members[*i].consumer.apply(&mut conn, events, effects).await?;
                    }
                }
            }
            Ok(())
        }
        .await;
        if let Err(err) = outcome {
            // What was applied in memory since the checkpoints goes: the runner applies it again.
            self.failed(&err, failing, &work).await;
            return Err(());
        }
        for ((i, w, to), effects) in work.into_iter().zip(effects) {
            self.applied(i, &w, to, effects);
        }
        Ok(())
    }

    async fn fail(&self, i: usize, message: &str) {
        let name = self.members[i].handle.name;
        tracing::error!(consumer = name, position = self.members[i].position, error = %message, "consumer failed; will retry");
        metrics::counter!("tally_consumer_errors_total", "consumer" => name).increment(1);
        self.members[i].handle.set("failing", Some(message.to_string()));
        self.store.health.failing(name, message);
        let _ = record_error(&self.pool, name, message).await;
    }
}

/// Make sure the consumer's row exists in `pool`, where its group commits (it is locked for every
/// batch), and read it.
async fn init_checkpoint(store: &Store, pool: &Writes, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at) VALUES ($1, 0, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(clock::now())
    .execute(&mut *pool.acquire().await?)
    .await?;
    load_checkpoint(store, name).await
}

pub async fn load_checkpoint(store: &Store, name: &str) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT position FROM {} AS c WHERE name = $1", store.checkpoints_table());
    let row = sqlx::query(&sql).bind(name).fetch_optional(&store.read).await?;
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

async fn record_error(pool: &Writes, name: &str, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE checkpoints SET updated_at = $2, last_error = $3 WHERE name = $1")
        .bind(name)
        .bind(clock::now())
        .bind(message)
        .execute(&mut *pool.acquire().await?)
        .await?;
    Ok(())
}
