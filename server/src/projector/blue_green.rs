//! Blue/green rebuilds of the view projections, online: the new tables are built while the
//! current ones keep serving reads and pushes, then swapped in at once.
//!
//! A build is asked for by a person (`POST /api/projections/{name}/rebuild`, the operations page,
//! `tally rebuild --online`) or by the projection's code itself: a server whose
//! `membership_view::VERSION` (or `member_search::VERSION`) differs from the version that built
//! the table asks for one at start. Builds are rows of `projection_builds`, in the database the
//! views are in, so any node can ask and the one that runs the consumers carries them out, one
//! at a time.
//!
//! A build, with the current table ("blue") serving throughout:
//! 1. **folding**: every event from position 0 to the head, folded in memory with the
//!    projections' own `evolve` (as `tally rebuild` does, see `fold`);
//! 2. **writing**: the folded rows into a shadow table (`<name>_next`), a chunk per transaction,
//!    so the projector's own writes get their turn between chunks;
//! 3. **catching_up**: the events appended meanwhile, folded and written the same way, until the
//!    shadow is within a batch of the head;
//! 4. **swapping**: the projector's group holds still (see `Runner::hold`: it writes what it
//!    applied and says where it is); the last events are folded in; then one transaction drops
//!    the current table, renames the shadow to its name, moves the checkpoint to the position the
//!    shadow is current to, and records the version. The projector starts again from there.
//!
//! Readers see the old table or the new one, never a half-built one: the swap is one
//! transaction, and nothing reads the shadow. Positions never go back: the new table is current
//! to a position at or past everything pushed before. After the swap every node forgets its
//! cached views and pushes each watched member's view from the new table (`ViewFeed::replaced`;
//! on PostgreSQL through the `<position>|*` notice every node hears). A build cut short (a crash,
//! `kill -9`, a new leader) is found `building` when the consumers start again, and starts again
//! from position 0: the shadow is dropped first, so a half-built one is never used.

use super::fold::Fold;
use super::{member_search, membership_view};
use crate::clock;
use crate::fanout::ViewFeed;
use crate::store::{Backend, Store};
use app::views::RebuildStatus;
use sqlx::{AnyConnection, Connection, Row};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// The projections that can be rebuilt: their tables are derived from the log alone. (The
/// loyalty policy appends events: run again, it would append them again.)
pub const REBUILDABLE: [&str; 2] = [membership_view::NAME, member_search::NAME];

/// The version of a rebuildable projection's code.
pub fn version_of(name: &str) -> Option<i64> {
    match name {
        membership_view::NAME => Some(membership_view::VERSION),
        member_search::NAME => Some(member_search::VERSION),
        _ => None,
    }
}

/// Rows written to the shadow table per transaction.
const WRITE_CHUNK: usize = 2_000;

/// The swap starts once the shadow is this close to the head; the projector holds still while
/// the rest is folded in.
const SWAP_WITHIN: i64 = 2_000;

/// Events read per query while catching up.
const TAIL_PAGE: i64 = 5_000;

/// How long a build waits for the projector to hold still before it tries again.
const PAUSE_WAIT: Duration = Duration::from_secs(30);

/// How often a build's progress is written to its row (where every node reads it).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What a build asks of a runner: hold still, say where you are, wait for `resume`.
pub struct Pause {
    /// The position the group's tables are current to (everything applied is written).
    pub paused: oneshot::Sender<i64>,
    /// Sent (or dropped) once the build has swapped, or given up.
    pub resume: oneshot::Receiver<()>,
}

/// Where a build leaves its [`Pause`] for a runner.
#[derive(Default)]
pub struct PauseSlot(Mutex<Option<Pause>>);

impl PauseSlot {
    fn ask(&self, pause: Pause) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(pause);
    }

    /// The runner takes what was asked for, if anything.
    pub fn take(&self) -> Option<Pause> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Why a build cannot be asked for.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("no consumer called '{0}'")]
    Unknown(String),
    #[error("'{0}' appends events and cannot be rebuilt: run again, it would append them again")]
    NotRebuildable(String),
    #[error("a rebuild of '{0}' is already asked for or under way")]
    InProgress(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "id, projection, version, state, phase, reason, actor, applied, total, rate, restarts, \
                       position, error, requested_at, started_at, finished_at";

fn status_from(row: &sqlx::any::AnyRow) -> Result<RebuildStatus, sqlx::Error> {
    let count = |name: &str| row.try_get::<i64, _>(name).map(|n| n.max(0) as u64);
    let (applied, total) = (count("applied")?, count("total")?);
    let state: String = row.try_get("state")?;
    let rate: f64 = row.try_get("rate")?;
    let eta_seconds = (state == "building" && rate > 0.0 && applied < total)
        .then(|| ((total - applied) as f64 / rate * 10.0).round() / 10.0);
    Ok(RebuildStatus {
        id: count("id")?,
        projection: row.try_get("projection")?,
        version: count("version")?,
        state,
        phase: row.try_get("phase")?,
        reason: row.try_get("reason")?,
        actor: row.try_get("actor")?,
        applied,
        total,
        events_per_second: rate.round(),
        eta_seconds,
        restarts: count("restarts")?,
        position: row.try_get::<Option<i64>, _>("position")?.map(|p| p.max(0) as u64),
        error: row.try_get("error")?,
        requested_at: row.try_get("requested_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

/// The newest build of each projection, asked for, under way or finished (read pool: valid on
/// every node).
pub async fn latest(store: &Store) -> Result<Vec<RebuildStatus>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM projection_builds WHERE id IN (SELECT MAX(id) FROM projection_builds GROUP BY projection)"
    );
    sqlx::query(&sql).fetch_all(&store.read).await?.iter().map(status_from).collect()
}

/// Ask for a build of `name` (any node; the one that runs the consumers carries it out).
pub async fn request(store: &Store, name: &str, reason: &str, actor: &str) -> Result<RebuildStatus, Refused> {
    let Some(version) = version_of(name) else {
        return Err(Refused::NotRebuildable(name.to_string()));
    };
    let mut conn = store.views.acquire().await?;
    let mut tx = begin(store, &mut conn).await?;
    let open =
        sqlx::query("SELECT id FROM projection_builds WHERE projection = $1 AND state IN ('requested', 'building')")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    if open.is_some() {
        return Err(Refused::InProgress(name.to_string()));
    }
    let sql = format!(
        "INSERT INTO projection_builds (projection, version, state, reason, actor, requested_at) \
         VALUES ($1, $2, 'requested', $3, $4, $5) RETURNING {COLUMNS}"
    );
    let row = sqlx::query(&sql)
        .bind(name)
        .bind(version)
        .bind(reason)
        .bind(actor)
        .bind(clock::now())
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(status_from(&row)?)
}

/// A transaction on the views' database that takes its write lock at once (SQLite: `IMMEDIATE`).
async fn begin<'c>(
    store: &Store,
    conn: &'c mut AnyConnection,
) -> Result<sqlx::Transaction<'c, sqlx::Any>, sqlx::Error> {
    match store.backend {
        Backend::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => conn.begin().await,
    }
}

/// Carries out the builds asked for, one at a time, on the node that runs the consumers (see
/// `Consumers::run`).
pub struct Builder {
    pub store: Store,
    pub feed: Arc<ViewFeed>,
    /// The runner of the group the rebuildable projections are in, and what wakes it.
    pub pause: Arc<PauseSlot>,
    pub wake_runner: Arc<Notify>,
    /// Told when a build is asked for on this node.
    pub wake: Arc<Notify>,
}

impl Builder {
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        self.ask_for_changed_versions().await?;
        while !stop.is_cancelled() {
            let next = sqlx::query(&format!(
                "SELECT {COLUMNS} FROM projection_builds WHERE state IN ('requested', 'building') ORDER BY id LIMIT 1"
            ))
            .fetch_optional(&self.store.read)
            .await?;
            let Some(next) = next.as_ref().map(status_from).transpose()? else {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => {}
                }
                continue;
            };
            let outcome = tokio::select! {
                outcome = self.build(&next) => outcome,
                // Left `building`: whoever runs the consumers next starts it again.
                _ = stop.cancelled() => return Ok(()),
            };
            if let Err(err) = outcome {
                tracing::error!(projection = %next.projection, build = next.id, error = %format!("{err:#}"), "online rebuild failed");
                metrics::counter!("tally_rebuilds_total", "projection" => next.projection.clone(), "outcome" => "failed")
                    .increment(1);
                self.finish_failed(&next, &format!("{err:#}")).await?;
            }
        }
        Ok(())
    }

    /// A projection whose table was built by another version of its code is built again.
    async fn ask_for_changed_versions(&self) -> anyhow::Result<()> {
        for name in REBUILDABLE {
            let Some(version) = version_of(name) else { continue };
            let stored: Option<i64> = sqlx::query("SELECT version FROM projection_versions WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.store.read)
                .await?
                .map(|row| row.try_get("version"))
                .transpose()?;
            match stored {
                Some(stored) if stored != version => {
                    let reason = format!("its version changed from {stored} to {version}");
                    match request(&self.store, name, &reason, "system").await {
                        Ok(build) => tracing::info!(projection = name, build = build.id, %reason, "rebuilding online"),
                        Err(Refused::InProgress(_)) => {}
                        Err(err) => return Err(err.into()),
                    }
                }
                Some(_) => {}
                None => {
                    let sql =
                        "INSERT INTO projection_versions (name, version) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";
                    sqlx::query(sql).bind(name).bind(version).execute(&mut *self.store.views.acquire().await?).await?;
                }
            }
        }
        Ok(())
    }

    async fn set(&self, sql: &str, id: u64, text: Option<&str>) -> Result<(), sqlx::Error> {
        let query = sqlx::query(sql).bind(id as i64).bind(clock::now());
        let query = match text {
            Some(text) => query.bind(text.to_string()),
            None => query,
        };
        query.execute(&mut *self.store.views.acquire().await?).await?;
        Ok(())
    }

    async fn finish_failed(&self, build: &RebuildStatus, error: &str) -> anyhow::Result<()> {
        let shadow = shadow_of(&build.projection);
        let mut conn = self.store.views.acquire().await?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}")).execute(&mut *conn).await?;
        drop(conn);
        let sql =
            "UPDATE projection_builds SET state = 'failed', phase = NULL, finished_at = $2, error = $3 WHERE id = $1";
        self.set(sql, build.id, Some(error)).await?;
        Ok(())
    }

    /// One build, from position 0 to the swap.
    async fn build(&self, build: &RebuildStatus) -> anyhow::Result<()> {
        let name = build.projection.as_str();
        let Some(version) = version_of(name) else {
            anyhow::bail!("'{name}' cannot be rebuilt");
        };
        let restarted = build.state == "building";
        if restarted {
            tracing::warn!(
                projection = name,
                build = build.id,
                "an online rebuild was cut short; starting it again from position 0"
            );
        }
        let sql = format!(
            "UPDATE projection_builds SET state = 'building', phase = 'folding', applied = 0, rate = 0, started_at = $2, \
             restarts = restarts + {} WHERE id = $1",
            u8::from(restarted)
        );
        self.set(&sql, build.id, None).await?;
        let progress = Progress::new(self.store.head().await?);
        let reporter = CancellationToken::new();
        tokio::spawn(progress.clone().report(self.store.clone(), build.id, reporter.clone()));
        let _stop_reporting = reporter.drop_guard();

        let started = Instant::now();
        let shadow = shadow_of(name);
        let mut conn = self.store.views.acquire().await?;
        sqlx::query(&format!("DROP TABLE IF EXISTS {shadow}")).execute(&mut *conn).await?;
        for ddl in create_table(name, &shadow, build.id) {
            sqlx::query(&ddl).execute(&mut *conn).await?;
        }
        drop(conn);

        let mut fold = super::fold::fold_log(&self.store, Some(progress.applied.clone())).await?;
        progress.applied.store(fold.events, Ordering::Relaxed);
        progress.set_phase("writing");
        let mut ids: Vec<String> = fold.views.keys().cloned().collect();
        ids.sort_unstable();
        self.write(name, &shadow, &fold, &ids).await?;

        progress.set_phase("catching_up");
        loop {
            let head = self.store.head().await?;
            progress.total.store(head.max(0) as u64, Ordering::Relaxed);
            if head - fold.position <= SWAP_WITHIN {
                break;
            }
            self.tail(name, &shadow, &mut fold, head, &progress).await?;
        }

        progress.set_phase("swapping");
        let (at, resume) = self.pause().await?;
        // Dropped on every way out: the runner goes on (from its stored checkpoints).
        let _resume = resume;
        let head = self.store.head().await?.max(at);
        progress.total.store(head.max(0) as u64, Ordering::Relaxed);
        self.tail(name, &shadow, &mut fold, head, &progress).await?;
        self.swap(name, &shadow, version, build.id, head).await?;
        if name == membership_view::NAME && self.store.backend == Backend::Sqlite {
            // Before the runner goes on: no change of its can be pushed before the swap's.
            self.feed.replaced(&self.store, head).await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        metrics::counter!("tally_rebuilds_total", "projection" => name.to_string(), "outcome" => "swapped")
            .increment(1);
        tracing::info!(
            projection = name,
            build = build.id,
            version,
            position = head,
            events = fold.events,
            members = fold.views.len(),
            seconds,
            "online rebuild swapped in"
        );
        Ok(())
    }

    /// Ask the runner to hold still; the position it is at, and what lets it go on.
    async fn pause(&self) -> anyhow::Result<(i64, oneshot::Sender<()>)> {
        loop {
            let (paused, at) = oneshot::channel();
            let (resume, resumed) = oneshot::channel();
            self.pause.ask(Pause { paused, resume: resumed });
            self.wake_runner.notify_one();
            match tokio::time::timeout(PAUSE_WAIT, at).await {
                Ok(Ok(at)) => return Ok((at, resume)),
                // It could not write what it applied (it says why in its status): ask again.
                Ok(Err(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(_) => {
                    self.pause.take();
                    anyhow::bail!("the projector did not hold still within {PAUSE_WAIT:?}");
                }
            }
        }
    }

    /// Fold the events after the fold's position up to `to`, and write the rows they changed.
    async fn tail(
        &self,
        name: &str,
        shadow: &str,
        fold: &mut Fold,
        to: i64,
        progress: &Progress,
    ) -> anyhow::Result<()> {
        let mut changed = BTreeSet::new();
        'pages: while fold.position < to {
            let events = self.store.read_all(fold.position, TAIL_PAGE).await?;
            if events.is_empty() {
                break;
            }
            for event in events.iter() {
                if event.position > to {
                    break 'pages;
                }
                if let Some(id) = fold.apply_stored(event)? {
                    changed.insert(id);
                }
            }
            progress.applied.store(fold.events, Ordering::Relaxed);
        }
        progress.applied.store(fold.events, Ordering::Relaxed);
        let changed: Vec<String> = changed.into_iter().collect();
        self.write(name, shadow, fold, &changed).await
    }

    /// The rows of the members `ids` into the shadow table, a chunk per transaction.
    async fn write(&self, name: &str, shadow: &str, fold: &Fold, ids: &[String]) -> anyhow::Result<()> {
        for chunk in ids.chunks(WRITE_CHUNK) {
            let views: Vec<_> = chunk.iter().filter_map(|id| fold.views.get(id)).collect();
            let mut conn = self.store.views.acquire().await?;
            let mut tx = begin(&self.store, &mut conn).await?;
            match name {
                membership_view::NAME => {
                    let rows: Vec<_> = views.iter().map(|v| membership_view::ViewRow::new((*v).clone())).collect();
                    membership_view::save_into(&mut tx, shadow, &rows).await?;
                }
                _ => {
                    let rows: Vec<_> = views.iter().map(|v| fold.search_row(v)).collect();
                    member_search::save_into(&mut tx, shadow, &rows.iter().collect::<Vec<_>>()).await?;
                }
            }
            tx.commit().await?;
        }
        Ok(())
    }

    /// One transaction: the shadow becomes the table, current to `position`.
    async fn swap(&self, name: &str, shadow: &str, version: i64, id: u64, position: i64) -> anyhow::Result<()> {
        let mut conn = self.store.views.acquire().await?;
        let mut tx = begin(&self.store, &mut conn).await?;
        sqlx::query(&format!("DROP TABLE {name}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {shadow} RENAME TO {name}")).execute(&mut *tx).await?;
        crate::projector::save_checkpoint(&mut tx, name, position).await?;
        sqlx::query(
            "INSERT INTO projection_versions (name, version) VALUES ($1, $2) \
             ON CONFLICT (name) DO UPDATE SET version = excluded.version",
        )
        .bind(name)
        .bind(version)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE projection_builds SET state = 'swapped', phase = NULL, position = $2, finished_at = $3, \
             applied = total WHERE id = $1",
        )
        .bind(id as i64)
        .bind(position)
        .bind(clock::now())
        .execute(&mut *tx)
        .await?;
        if name == membership_view::NAME && self.store.backend == Backend::Postgres {
            // Every node (this one too) hears it with the swap's commit (see `ViewFeed::replaced`).
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(crate::fanout::CHANNEL)
                .bind(format!("{position}|{}", crate::fanout::REPLACED))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The shadow table a build of `name` writes.
fn shadow_of(name: &str) -> String {
    format!("{name}_next")
}

fn create_table(name: &str, shadow: &str, build: u64) -> Vec<String> {
    let tag = format!("b{build}");
    match name {
        membership_view::NAME => membership_view::create_table(shadow, &tag),
        _ => member_search::create_table(shadow, &tag),
    }
}

/// A build's progress, shared with the task that writes it to the build's row.
#[derive(Clone)]
struct Progress {
    applied: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    phase: Arc<Mutex<&'static str>>,
    started: Instant,
}

impl Progress {
    fn new(head: i64) -> Progress {
        Progress {
            applied: Arc::default(),
            total: Arc::new(AtomicU64::new(head.max(0) as u64)),
            phase: Arc::new(Mutex::new("folding")),
            started: Instant::now(),
        }
    }

    fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }

    /// Write the progress to the build's row every second until `stop`.
    async fn report(self, store: Store, id: u64, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
                _ = stop.cancelled() => return,
            }
            let applied = self.applied.load(Ordering::Relaxed);
            let rate = applied as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
            let phase = *self.phase.lock().unwrap_or_else(PoisonError::into_inner);
            let write = async {
                let sql = "UPDATE projection_builds SET phase = $2, applied = $3, total = $4, rate = $5 \
                           WHERE id = $1 AND state = 'building'";
                sqlx::query(sql)
                    .bind(id as i64)
                    .bind(phase)
                    .bind(applied as i64)
                    .bind(self.total.load(Ordering::Relaxed).max(applied) as i64)
                    .bind(rate)
                    .execute(&mut *store.views.acquire().await?)
                    .await
            };
            if let Err(err) = write.await {
                tracing::warn!(build = id, error = %err, "cannot record an online rebuild's progress");
            }
        }
    }
}
