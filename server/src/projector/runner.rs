//! The runner: one task per group of consumers, applying the events in position order, one
//! batch per transaction with the checkpoints (see `Runner`).

use super::blue_green::{Pause, PauseSlot};
use super::checkpoints::{advance_checkpoint, init_checkpoint, load_checkpoint, record_error};
use super::parking::{self, EventFailed, HeldBack};
use super::{Consumer, ConsumerHandle, Consumers, Effects, Registered, Role, WriteScope, BATCH};
use crate::fanout::ViewFeed;
use crate::store::{Backend, Store, StoredEvent, Writes};
use sqlx::AnyConnection;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

impl Consumers {
    /// The runner of group `g`, from its stored checkpoints.
    pub(super) fn runner(&self, g: usize, stop: CancellationToken) -> Runner {
        let group = &self.groups[g];
        let pool = self.pool_of(g);
        // Only on SQLite: on PostgreSQL other nodes read the views from the table.
        let behind = self.store.backend == Backend::Sqlite && !self.write_behind.is_zero();
        let members = group
            .iter()
            .map(|Registered { consumer, role, handle }| {
                let defers = behind && consumer.write_behind().is_some();
                Member {
                    consumer: consumer.clone(),
                    role: *role,
                    handle: handle.clone(),
                    position: 0,
                    stored: 0,
                    stored_at: Instant::now(),
                    defers,
                    store_every: if defers { self.write_behind } else { CHECKPOINT_EVERY },
                    held: HeldBack::default(),
                    failure: None,
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
            park_after: self.park_after.max(1),
            wake: self.wakes[g].clone(),
            operations_checked: Instant::now(),
            pause: self.pauses[g].clone(),
            flushing: false,
        }
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
    role: Role,
    handle: Arc<ConsumerHandle>,
    /// Everything up to here is applied (or was nothing for this consumer).
    position: i64,
    /// The position in the checkpoint row (≤ `position`).
    stored: i64,
    stored_at: Instant,
    /// Applies its batches in memory and writes each change about `store_every` after it was
    /// applied (SQLite, a consumer that writes behind).
    defers: bool,
    /// How long the stored checkpoint may stay behind `position` (a change, unwritten).
    store_every: Duration,
    /// The streams it holds back (poison events, see `parking`).
    held: HeldBack,
    /// The event it keeps failing on, and how many times it has.
    failure: Option<(i64, u32)>,
}

impl Member {
    /// Its state while it works: degraded while it holds back a parked stream.
    fn label(&self) -> &'static str {
        if self.held.parked() > 0 {
            "degraded"
        } else {
            "running"
        }
    }
    /// Rows applied but not written yet (a consumer that writes behind).
    fn unwritten_rows(&self) -> usize {
        self.consumer.write_behind().map_or(0, |behind| behind.unwritten_rows())
    }

    /// Its checkpoint (and what it holds unwritten) should be stored now.
    fn due(&self, now: Instant) -> bool {
        let since_stored = now.duration_since(self.stored_at);
        match self.consumer.write_behind().and_then(|w| w.oldest_unwritten()) {
            Some(oldest) if self.defers => {
                self.unwritten_rows() >= MAX_UNWRITTEN
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
        let unwritten = self.unwritten_rows();
        let at_least = if unwritten >= MAX_UNWRITTEN { unwritten - MAX_UNWRITTEN / 2 } else { 0 };
        WriteScope::Due { before: now.checked_sub(self.store_every).unwrap_or(now), at_least }
    }
}

/// What one member does in one step.
enum Work<'e> {
    /// Apply these events (and move the checkpoint) in the step's transaction.
    Apply(Cow<'e, [Arc<StoredEvent>]>),
    /// Apply a parked stream's events again (an admin's retry), and release it, in one
    /// transaction.
    Retry { events: Vec<Arc<StoredEvent>>, stream_id: String },
    /// Nothing for this consumer in the batch: move the position, and the checkpoint only with
    /// the step's transaction or once `CHECKPOINT_EVERY` has passed.
    Skip,
    /// Only move the checkpoint to what was skipped before.
    Checkpoint,
}

impl Work<'_> {
    /// The events this work applies.
    fn events(&self) -> Option<&[Arc<StoredEvent>]> {
        match self {
            Work::Apply(events) => Some(events),
            Work::Retry { events, .. } => Some(events),
            Work::Skip | Work::Checkpoint => None,
        }
    }
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
pub(super) struct Runner {
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
    /// Attempts at one event before its stream is parked.
    park_after: u32,
    /// Told when a retry or skip is asked for on this node (see `parking`).
    wake: Arc<tokio::sync::Notify>,
    /// When the runner last looked for actions asked for on its parked streams.
    operations_checked: Instant,
    /// A blue/green build asks here to have the group hold still while it swaps tables.
    pause: Arc<PauseSlot>,
    /// Writing everything applied, whatever is due (before a pause).
    flushing: bool,
}

/// How often a runner with parked streams looks for retries and skips asked for on other nodes.
const OPERATIONS_EVERY: Duration = Duration::from_millis(500);

impl Runner {
    fn names(&self) -> String {
        self.members.iter().map(|m| m.handle.name).collect::<Vec<_>>().join(",")
    }

    pub(super) async fn run(mut self) {
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
            let held = loop {
                match parking::load(&self.pool, name).await {
                    Ok(held) => break held,
                    Err(err) => {
                        tracing::error!(consumer = name, error = %err, "cannot read parked streams; retrying");
                        if self.sleep(Duration::from_secs(1)).await {
                            return;
                        }
                    }
                }
            };
            let member = &mut self.members[i];
            (member.position, member.stored) = (position, position);
            member.handle.applied.send_replace(position);
            member.held = held;
            member.held.forget_through(position);
            self.report_parked(i);
        }
        let mut head_rx = self.head.subscribe();
        let mut backoff = Duration::from_millis(100);
        while !self.shutdown.is_cancelled() {
            if let Some(pause) = self.pause.take() {
                self.hold(pause).await;
                continue;
            }
            match self.step().await {
                Ok(true) => backoff = Duration::from_millis(100),
                Ok(false) => {
                    head_rx.borrow_and_update();
                    let wake = self.wake.clone();
                    tokio::select! {
                        changed = head_rx.changed() => {
                            if changed.is_err() && self.sleep(self.poll).await { break; }
                        }
                        // Asked on this node: look at once.
                        _ = wake.notified() => {
                            let checked = self.operations_checked;
                            self.operations_checked = checked.checked_sub(OPERATIONS_EVERY).unwrap_or(checked);
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

    /// Positions from the checkpoint rows (after a failure, or when another node or a blue/green
    /// swap moved them).
    async fn reload(&mut self) {
        self.forget();
        for m in &mut self.members {
            if let Ok(p) = load_checkpoint(&self.store, m.handle.name).await {
                (m.position, m.stored) = (p, p);
                m.handle.applied.send_replace(p);
                if m.role.feeds_views() {
                    self.feed.written(p);
                }
            }
        }
    }

    /// Hold still for a blue/green swap (see `blue_green`): write everything applied, tell the
    /// build the position the group's tables are current to, wait until it has swapped (or given
    /// up), then start again from the stored checkpoints, which the swap may have moved.
    async fn hold(&mut self, pause: Pause) {
        self.flushing = true;
        let work: Vec<(usize, Work, i64)> = (self.members.iter().enumerate())
            .filter(|(_, m)| m.stored < m.position)
            .map(|(i, m)| (i, Work::Checkpoint, m.position))
            .collect();
        let flushed = work.is_empty() || self.commit(work).await.is_ok();
        self.flushing = false;
        // Not flushed: the build asks again later (it sees the pause dropped).
        if !flushed {
            return;
        }
        let at = self.members.iter().map(|m| m.stored).max().unwrap_or(0);
        let Pause { paused, resume } = pause;
        if paused.send(at).is_err() {
            return;
        }
        tokio::select! {
            _ = resume => {}
            _ = self.shutdown.cancelled() => {}
        }
        self.reload().await;
    }

    /// One batch for every member that is behind: true when anything moved, `Err` after a failure
    /// (already logged and shown on the failing consumer).
    async fn step(&mut self) -> Result<bool, ()> {
        if self.operations_checked.elapsed() >= OPERATIONS_EVERY && self.members.iter().any(|m| m.held.parked() > 0) {
            self.operations_checked = Instant::now();
            if self.operate().await {
                return Ok(true);
            }
        }
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
            let after = &events[events.partition_point(|e| e.position <= m.position)..];
            // What it holds back (parked streams) it passes over like events it does not handle.
            let mine = match m.held.is_empty() {
                true => Cow::Borrowed(after),
                false => Cow::Owned(after.iter().filter(|e| !m.held.holds(e)).cloned().collect()),
            };
            match (last, mine.iter().any(|e| m.consumer.handles(&e.event_type))) {
                (Some(last), true) => work.push((i, Work::Apply(mine), last)),
                (Some(last), false) if !after.is_empty() => work.push((i, Work::Skip, last)),
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
                Work::Apply(_) | Work::Retry { .. } | Work::Checkpoint => true,
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
        let (started, stopping) = (Instant::now(), self.shutdown.is_cancelled() || self.flushing);
        let mut failing = None;
        let outcome: anyhow::Result<bool> = async {
            let appends = work.iter().any(|(i, w, _)| matches!(w, Work::Apply(_)) && self.members[*i].role.appends());
            let mut conn = self.pool.acquire().await?;
            let mut tx = self.store.begin_consumer(&mut conn, appends).await?;
            for (((i, w, to), effects), store_to) in work.iter().zip(&mut effects).zip(&mut store_to) {
                let m = &self.members[*i];
                failing = Some(*i);
                if let Some(events) = w.events() {
                    self.apply(*i, &mut tx, events, effects).await?;
                }
                // Also when it only passed events over (other streams', or held back): read-your-
                // writes on other nodes waits for the position.
                if m.role.feeds_views() {
                    self.feed.in_transaction(&mut tx, &effects.views, *to).await?;
                }
                if let Work::Retry { stream_id, .. } = w {
                    parking::release_in(&mut tx, m.handle.name, stream_id).await?;
                }
                let written = match m.consumer.write_behind() {
                    Some(behind) => behind.write(&mut tx, m.write_scope(started, stopping)).await?,
                    None => None,
                };
                if let Some(oldest) = written {
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
            m.held.forget_through(store_to);
            metrics::gauge!("tally_consumer_position", "consumer" => m.handle.name).set(to as f64);
            if m.role.feeds_views() {
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
        if let Some(events) = work.events() {
            m.handle.record(events.len() as u64);
            metrics::counter!("tally_consumer_events_total", "consumer" => name).increment(events.len() as u64);
        }
        m.failure = None;
        if m.defers {
            let unwritten = m.unwritten_rows() as f64;
            metrics::gauge!("tally_consumer_unwritten_rows", "consumer" => name).set(unwritten);
        }
        m.position = to;
        m.handle.applied.send_replace(to);
        m.handle.set(m.label(), None);
        self.store.health.ok(name);
        if m.role.feeds_views() {
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
        if let (Some(i), Some(event)) = (failing, err.downcast_ref::<EventFailed>()) {
            if self.count_failure(i, event).await {
                return;
            }
        }
        for i in failed {
            self.fail(i, &message).await;
        }
    }

    /// Member `i` failed on `event`: one more attempt at it; after `park_after` of them (or at
    /// once, when its stream is parked already: a retry that failed again), park its stream.
    /// True when parked: the runner goes on with the other streams at once.
    async fn count_failure(&mut self, i: usize, event: &EventFailed) -> bool {
        let m = &mut self.members[i];
        let attempts = match m.failure {
            Some((position, n)) if position == event.position => n + 1,
            _ => 1,
        };
        m.failure = Some((event.position, attempts));
        let parked_already = m.held.parked_from(&event.stream_id).is_some();
        if attempts < self.park_after && !parked_already {
            return false;
        }
        let name = m.handle.name;
        if let Err(err) = parking::park(&self.pool, name, event, attempts).await {
            tracing::error!(consumer = name, error = %err, "cannot park a stream; retrying the event");
            return false;
        }
        let m = &mut self.members[i];
        m.held.park(&event.stream_id, event.position);
        m.failure = None;
        m.handle.set(m.label(), None);
        self.report_parked(i);
        metrics::counter!("tally_parked_total", "consumer" => name).increment(1);
        tracing::warn!(consumer = name, stream = %event.stream_id, position = event.position, attempts,
            error = %event.message, "event parked with the rest of its stream; other streams go on");
        self.isolate = false;
        true
    }

    /// Carry out the retries and skips asked for on this group's parked streams. True when any
    /// was carried out.
    async fn operate(&mut self) -> bool {
        let names: Vec<&str> = self.members.iter().filter(|m| m.held.parked() > 0).map(|m| m.handle.name).collect();
        let asked = match parking::requested(&self.pool, &names).await {
            Ok(asked) => asked,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the actions asked for on parked streams");
                return false;
            }
        };
        let mut done = false;
        for asked in asked {
            let Some(i) = self.members.iter().position(|m| m.handle.name == asked.consumer) else { continue };
            let Some(from) = self.members[i].held.parked_from(&asked.stream_id) else { continue };
            let name = self.members[i].handle.name;
            match asked.action {
                parking::Action::Retry => {
                    let to = self.members[i].position;
                    let events = match self.store.read_stream(&asked.stream_id).await {
                        Ok(events) => events,
                        Err(err) => {
                            tracing::warn!(consumer = name, error = %err, "cannot read a parked stream to retry it");
                            continue;
                        }
                    };
                    let events: Vec<Arc<StoredEvent>> =
                        events.into_iter().filter(|e| e.position >= from && e.position <= to).map(Arc::new).collect();
                    let count = events.len();
                    let work = Work::Retry { events, stream_id: asked.stream_id.clone() };
                    if self.commit(vec![(i, work, to)]).await.is_ok() {
                        let m = &mut self.members[i];
                        m.held.release(&asked.stream_id);
                        m.handle.set(m.label(), None);
                        self.report_parked(i);
                        tracing::info!(consumer = name, stream = %asked.stream_id, events = count, actor = %asked.actor,
                            "parked stream retried and applied");
                    }
                    done = true;
                }
                parking::Action::Skip => {
                    // Through this member's position: what it has not reached yet is applied as
                    // usual when it gets there.
                    let through = self.members[i].position.max(from);
                    if let Err(err) = parking::skip(&self.pool, &asked, through).await {
                        tracing::warn!(consumer = name, error = %err, "cannot skip a parked stream");
                        continue;
                    }
                    let m = &mut self.members[i];
                    m.held.close(&asked.stream_id, through);
                    m.handle.set(m.label(), None);
                    self.report_parked(i);
                    tracing::warn!(consumer = name, stream = %asked.stream_id, from, through, actor = %asked.actor,
                        reason = %asked.reason, "parked stream skipped");
                    done = true;
                }
            }
        }
        done
    }

    /// Member `i`'s parked streams changed (or were loaded): its count in the status, the metric
    /// and `/healthz?verbose`.
    fn report_parked(&self, i: usize) {
        let m = &self.members[i];
        m.handle.set_parked(m.held.parked());
        self.store.health.parked(m.handle.name, m.held.parked());
    }

    /// Apply a batch for member `i` (the fault suite may make an event fail, see `faults`).
    async fn apply(
        &self,
        i: usize,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
        effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let consumer = &self.members[i].consumer;
        let faults = &self.store.faults;
        let handled = events.iter().filter(|e| consumer.handles(&e.event_type));
        if let Some(poison) = handled.into_iter().find(|e| faults.poisoned(&e.stream_id, e.position)) {
            return Err(EventFailed::error(poison, "a poison event (fault suite)"));
        }
        consumer.apply(conn, events, effects).await
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
                    if let Some(events) = w.events() {
                        failing = Some(*i);
                        self.apply(*i, &mut conn, events, effects).await?;
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
