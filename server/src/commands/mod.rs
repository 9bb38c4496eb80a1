//! The write side: load stream → `decide` → append, for every command, with group commit.
//!
//! Handlers send an [`Envelope`] to the [`CommandBus`]. One writer (a task; on SQLite with a file,
//! the event store's native connection's thread) takes whatever commands are waiting, decides
//! them all in memory and appends their events in one transaction (see
//! [`batch`]), commits once, and only then answers every caller (API.md: acknowledged means
//! durable). A refused command writes nothing, so it never spoils its batch; if the database
//! fails a batch, each of its commands is retried alone, so one cannot fail the others.

mod batch;
mod flush;
mod io;

pub use batch::{execute_batch, member_stream, Executed, Folded, StateCache};
pub use flush::Flusher;
pub use io::BatchIo;

use crate::clock;
use crate::health::{Health, WritesStopped};
use crate::store::{self, NativeConn, Store};
use app::domain::member::MemberError;
use app::domain::transaction::{Purchase, TransactionError};
use app::domain::Aggregate;
use flush::Reply;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Largest number of commands committed together.
pub const MAX_BATCH: usize = 512;

/// A command as the outside asks for it, already validated at the edge.
#[derive(Debug, Clone)]
pub enum Command {
    Member { member_id: String, action: MemberAction },
    RecordPurchase(Purchase),
}

/// What can be done to a member; the clock and the email owner are added by the writer.
#[derive(Debug, Clone)]
pub enum MemberAction {
    Enroll {
        name: String,
        email: String,
        /// A member joining by themselves: their account, stored with the enrolment.
        account: Option<NewAccount>,
    },
    UpdateProfile {
        name: Option<String>,
        email: Option<String>,
    },
    Earn {
        points: u64,
        reason: Option<String>,
    },
    Redeem {
        points: u64,
        reward: Option<String>,
    },
    Suspend {
        reason: Option<String>,
    },
    Reactivate,
    /// Issued only by the loyalty policy, never over HTTP: points follow the tier at this moment.
    EarnForPurchase {
        transaction_id: String,
        amount_cents: u64,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Member { action, .. } => match action {
                MemberAction::Enroll { .. } => "enroll",
                MemberAction::UpdateProfile { .. } => "update_profile",
                MemberAction::Earn { .. } => "earn",
                MemberAction::Redeem { .. } => "redeem",
                MemberAction::Suspend { .. } => "suspend",
                MemberAction::Reactivate => "reactivate",
                MemberAction::EarnForPurchase { .. } => "earn_for_purchase",
            },
            Command::RecordPurchase(_) => "record_purchase",
        }
    }
}

/// The account a member makes by joining (API.md `POST /api/signup`): written in the same
/// transaction as their enrolment, so there is never a member without the account they asked
/// for, nor an account without its member.
#[derive(Clone)]
pub struct NewAccount {
    pub id: String,
    /// Argon2id, PHC string.
    pub password_hash: String,
}

impl std::fmt::Debug for NewAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewAccount").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Idempotency keys sent by clients are kept in scope `api:<actor>` (API.md: per principal);
/// consumers use their own name.
pub const API_SCOPE: &str = "api:";

/// The scope of the keys the server makes for commands that come without one (see
/// [`CommandBus::send`]).
pub const SERVER_SCOPE: &str = "server";

/// Who asked, and why: copied into every event's metadata.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub actor: String,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    /// `api:<actor>` for the `Idempotency-Key` header; a consumer's name for the commands it issues.
    pub scope: String,
    pub key: String,
    /// The canonical request the key stands for; the same key with another request is refused.
    pub request: String,
    /// Made by the server for this one request, so no earlier command can have used it: the
    /// first run does not look it up (only a batch run again after a failure does).
    pub unused: bool,
}

#[derive(Debug, Clone)]
pub struct Envelope {
    pub command: Command,
    pub expected_version: Option<i64>,
    pub idempotency: Option<Idempotency>,
    pub meta: Meta,
}

/// What a command did, as the write side reports it; `http` (and the portal) make a status and
/// a body of it. It is also what an idempotency key keeps, and answers again.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Outcome {
    Member(MemberOutcome),
    Purchase(PurchaseOutcome),
}

/// A member command's outcome (API.md: the body of a command's 200 or 201).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct MemberOutcome {
    pub member_id: String,
    /// The member's stream version after the command (what `If-Match` names).
    pub version: i64,
    /// The position of the member's last event (what `min_position` waits for).
    pub position: i64,
    /// Points a purchase earned (the loyalty policy's commands only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u64>,
}

/// A recorded purchase (API.md: the body of `POST /api/transactions`' 202). A purchase recorded
/// before answers with the position it was first recorded at.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PurchaseOutcome {
    pub transaction_id: String,
    pub position: i64,
}

impl Outcome {
    /// Where the command's stream ends in the log (what wakes the consumers).
    pub fn position(&self) -> i64 {
        match self {
            Outcome::Member(member) => member.position,
            Outcome::Purchase(purchase) => purchase.position,
        }
    }
}

/// A command's answer: its outcome, and whether it is one stored under its idempotency key
/// (the command ran before).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub outcome: Outcome,
    pub replayed: bool,
}

impl Answer {
    pub fn position(&self) -> i64 {
        self.outcome.position()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Member(#[from] MemberError),
    #[error(transparent)]
    Transaction(#[from] TransactionError),
    #[error("the member is at version {actual}, not {expected}")]
    VersionConflict { expected: i64, actual: i64 },
    #[error("this Idempotency-Key was used with a different request")]
    IdempotencyKeyReused,
    #[error("the server is shutting down")]
    Unavailable,
    #[error(transparent)]
    WritesStopped(#[from] WritesStopped),
    #[error("the server's disk is full; nothing was recorded, try again later")]
    DiskFull,
    #[error("stored event cannot be read: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("the database cannot be reached: {0}")]
    StoreUnreachable(sqlx::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CommandError {
    fn from(err: sqlx::Error) -> Self {
        if let Some(stopped) = WritesStopped::within(&err) {
            return CommandError::WritesStopped(WritesStopped(stopped.0.clone()));
        }
        if store::is_disk_full(&err) {
            return CommandError::DiskFull;
        }
        if store::is_connection_lost(&err) {
            return CommandError::StoreUnreachable(err);
        }
        CommandError::Database(err)
    }
}

struct Job {
    envelope: Envelope,
    reply: oneshot::Sender<Result<Answer, CommandError>>,
}

/// The way into the write side. Cheap to clone.
#[derive(Clone)]
pub struct CommandBus {
    jobs: mpsc::Sender<Job>,
    health: Arc<Health>,
    /// PostgreSQL: a batch may be run again after a `COMMIT` whose outcome is unknown, so every
    /// command needs a key (see `send`).
    keys_for_all: bool,
}

impl CommandBus {
    /// Start the writer. `head` is bumped after every commit so consumers wake up. On SQLite
    /// with a file the writer runs on the native connection's thread (see `store::sqlite`);
    /// otherwise it is a task. The handle resolves when it has stopped.
    pub fn start(store: Store, head: std::sync::Arc<watch::Sender<i64>>) -> (CommandBus, tokio::task::JoinHandle<()>) {
        let (jobs, mut rx) = mpsc::channel::<Job>(16_384);
        let health = store.health.clone();
        let keys_for_all = store.backend == store::Backend::Postgres;
        let mut writer = Writer::new(store, head);
        let task = match writer.store.native.clone() {
            Some(native) => {
                let runtime = tokio::runtime::Handle::current();
                let (stopped, done) = oneshot::channel::<()>();
                let serving = native.serve(move |conn| {
                    // In the runtime's context, so that what the writer drops when it stops (a
                    // pooled connection hands itself back with a task) finds the runtime.
                    let _entered = runtime.enter();
                    let (mut writer, mut rx) = (writer, rx);
                    let mut batch = Vec::with_capacity(MAX_BATCH);
                    while rx.blocking_recv_many(&mut batch, MAX_BATCH) > 0 {
                        runtime.block_on(writer.commit(&mut batch, Some(conn)));
                    }
                    tracing::info!("command writer stopped");
                    let _ = stopped.send(());
                });
                if let Err(err) = serving {
                    // The connection's thread is gone; every command will be answered 503.
                    tracing::error!(error = %err, "the command writer could not start");
                }
                tokio::spawn(async move {
                    let _ = done.await;
                })
            }
            None => tokio::spawn(async move {
                let mut batch = Vec::with_capacity(MAX_BATCH);
                while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    writer.commit(&mut batch, None).await;
                }
                tracing::info!("command writer stopped");
            }),
        };
        (CommandBus { jobs, health, keys_for_all }, task)
    }

    /// Whether the writer still takes commands.
    pub fn is_running(&self) -> bool {
        !self.jobs.is_closed()
    }

    /// Run one command; resolves once its events are committed (or it was refused).
    ///
    /// On PostgreSQL a command that comes without an idempotency key gets one made here, so that a
    /// batch whose commit may or may not have landed (the connection lost during `COMMIT`) can be
    /// run again safely: what did land is found by its key and answered as it was, and nothing is
    /// applied twice. On SQLite no batch is ever run again after an unknown outcome (writes stop
    /// instead, see `health`), so such a key would never be read; storing one per command cost
    /// the command path a third of its throughput (BENCHMARKS.md), so none is made.
    ///
    /// If the caller stops waiting (a timed-out request, a client gone) before the writer reaches
    /// the command, it is dropped unrun; once reached, it completes once.
    pub async fn send(&self, mut envelope: Envelope) -> Result<Answer, CommandError> {
        if let Some(stopped) = self.health.writes_stopped() {
            return Err(stopped.into());
        }
        if envelope.idempotency.is_none() && self.keys_for_all {
            envelope.idempotency = Some(Idempotency {
                scope: SERVER_SCOPE.to_string(),
                key: uuid::Uuid::new_v4().to_string(),
                request: String::new(),
                unused: true,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { envelope, reply }).await.map_err(|_| CommandError::Unavailable)?;
        answer.await.map_err(|_| CommandError::Unavailable)?
    }
}

/// What the writer keeps between batches.
struct Writer {
    store: Store,
    head: std::sync::Arc<watch::Sender<i64>>,
    cache: StateCache,
    /// SQLite: batches commit without waiting for the disk; the flusher answers after it (see
    /// `flush`). PostgreSQL flushes at commit.
    flusher: Option<Flusher>,
}

impl Writer {
    /// Must be called inside the runtime (the flusher is a task).
    fn new(store: Store, head: std::sync::Arc<watch::Sender<i64>>) -> Writer {
        let cache = match store.backend {
            store::Backend::Sqlite => StateCache::with_local_head(head.subscribe()),
            store::Backend::Postgres => StateCache::default(),
        };
        let flusher = (store.sqlite_path.clone().filter(|_| store.flush_behind()))
            .map(|path| Flusher::for_sqlite(path, store.health.clone(), store.faults.clone()));
        Writer { store, head, cache, flusher }
    }

    /// Commit `batch` (emptying it) and answer its callers, now or after the log's sync.
    ///
    /// Commands whose callers stopped waiting are dropped unrun. Once writes are stopped (see
    /// `health`) every command is refused. A panic while committing answers the batch 503
    /// (its callers' replies are dropped), forgets the cached states and the write connection,
    /// and the writer goes on with the next batch.
    async fn commit(&mut self, batch: &mut Vec<Job>, native: Option<&mut NativeConn>) {
        let started = Instant::now();
        batch.retain(|job| {
            let waiting = !job.reply.is_closed();
            if !waiting {
                metrics::counter!("tally_commands_total", "command" => job.envelope.command.name(), "outcome" => "cancelled")
                    .increment(1);
            }
            waiting
        });
        self.store.faults.writer_gate().await;
        if let Some(stopped) = self.store.health.writes_stopped() {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(WritesStopped(stopped.0.clone()).into()));
            }
            return;
        }
        let size = batch.len();
        if size == 0 {
            return;
        }
        let committed = std::panic::AssertUnwindSafe(commit_batch(&self.store, batch, &mut self.cache, native))
            .catch_unwind()
            .await;
        let (replies, newest) = match committed {
            Ok(committed) => committed,
            Err(panic) => {
                let reason = format!("panicked: {}", crate::health::panic_message(panic.as_ref()));
                tracing::error!(%reason, size, "the command writer failed a batch; its commands are answered 503");
                self.store.health.restarted("command writer", &reason);
                self.cache.clear();
                self.store.write.reset().await;
                return;
            }
        };
        self.store.health.ok("command writer");
        match &self.flusher {
            Some(flusher) => flusher.answer_after_sync(replies),
            None => {
                for (reply, result) in replies {
                    // The caller may have gone away (client disconnected); the command stands.
                    let _ = reply.send(result);
                }
            }
        }
        store::raise(&self.head, newest);
        metrics::histogram!("tally_command_batch_size").record(size as f64);
        metrics::histogram!("tally_command_batch_seconds").record(started.elapsed().as_secs_f64());
    }
}

/// Run a batch in one transaction and answer each command. If the database fails the batch,
/// each command is then retried alone, so a command that breaks a constraint (a race with a
/// writer outside this process) fails by itself; and should the batch have committed after all
/// (PostgreSQL, connection lost during `COMMIT`), each is found by its idempotency key and
/// answered as committed, not run twice. Once writes are stopped nothing is retried. Also
/// returns the newest committed position (0 if nothing was committed).
async fn commit_batch(
    store: &Store,
    batch: &mut Vec<Job>,
    cache: &mut StateCache,
    mut native: Option<&mut NativeConn>,
) -> (Vec<(Reply, Result<Answer, CommandError>)>, i64) {
    let now = clock::now();
    let jobs: Vec<Job> = std::mem::take(batch);
    let envelopes: Vec<&Envelope> = jobs.iter().map(|j| &j.envelope).collect();
    let results = match try_commit(store, &envelopes, &now, cache, native.as_deref_mut()).await {
        Ok(results) => results,
        Err(err) => {
            cache.clear();
            store.write.reset().await;
            let mut results = Vec::with_capacity(jobs.len());
            if let Some(stopped) = store.health.writes_stopped() {
                results.extend(envelopes.iter().map(|_| Err(WritesStopped(stopped.0.clone()).into())));
            } else {
                tracing::warn!(error = %err, size = jobs.len(), "group commit failed; retrying its commands one by one");
            }
            for envelope in envelopes.iter().skip(results.len()) {
                // The batch may have committed after all (see `try_commit`): look every key up.
                let mut again = (*envelope).clone();
                if let Some(idempotency) = again.idempotency.as_mut() {
                    idempotency.unused = false;
                }
                let mut result = match try_commit(store, &[&again], &now, cache, native.as_deref_mut()).await {
                    Ok(mut alone) => alone.pop().unwrap_or(Err(CommandError::Unavailable)),
                    Err(err) => {
                        cache.clear();
                        store.write.reset().await;
                        // Another writer took the stream version first: the client may retry.
                        if store::is_unique_violation(&err) {
                            Err(CommandError::VersionConflict { expected: -1, actual: -1 })
                        } else {
                            Err(err.into())
                        }
                    }
                };
                if let Ok(answer) = &mut result {
                    cache.committed(answer.position());
                    // Found by a key the server made: the caller never sent this command before.
                    if again.idempotency.as_ref().is_some_and(|i| i.scope == SERVER_SCOPE) {
                        answer.replayed = false;
                    }
                }
                results.push(result);
            }
            results
        }
    };
    let newest = newest(&results);
    cache.committed(newest);
    let replies = jobs
        .into_iter()
        .zip(results)
        .map(|(job, result)| {
            let outcome = match &result {
                Ok(a) if a.replayed => "replayed",
                Ok(_) => "ok",
                Err(_) => "refused",
            };
            metrics::counter!("tally_commands_total", "command" => job.envelope.command.name(), "outcome" => outcome)
                .increment(1);
            (job.reply, result)
        })
        .collect();
    (replies, newest)
}

/// The newest position the answers report (0 if none succeeded).
fn newest(results: &[Result<Answer, CommandError>]) -> i64 {
    results.iter().filter_map(|r| r.as_ref().ok()).map(Answer::position).max().unwrap_or(0)
}

/// One transaction: the batch, the announcement to other nodes, the commit. With `native` (SQLite
/// with a file, on that connection's thread) the whole batch runs there, in one go, while the
/// lock on the write connection is held (see `store::sqlite`).
async fn try_commit(
    store: &Store,
    envelopes: &[&Envelope],
    now: &str,
    cache: &mut StateCache,
    native: Option<&mut NativeConn>,
) -> Result<Vec<Result<Answer, CommandError>>, sqlx::Error> {
    let mut conn = store.write.acquire().await?;
    if let Some(native) = native {
        let executed = native.transact(|tx| {
            // Nothing in a native batch awaits: every statement runs right here.
            execute_batch(tx, envelopes, now, Some(cache))
                .now_or_never()
                .unwrap_or_else(|| Err(sqlx::Error::Protocol("a native command batch had to wait".into())))
        })?;
        store.committed(executed.appended);
        return Ok(executed.answers);
    }
    let mut tx = store.begin_commands(&mut conn).await?;
    let mut streams = store::Streams::begin(&mut tx, store.heads()).await?;
    let executed = execute_batch(&mut streams, envelopes, now, Some(cache)).await?;
    store::announce_append(store.backend, &mut tx, newest(&executed.answers)).await?;
    if let Err(err) = tx.commit().await {
        // PostgreSQL: the server may have committed before the connection broke; running the
        // batch again finds what landed by the commands' idempotency keys (see `commit_batch`).
        // SQLite: the file's state is unknown to this process; stop (see `health`).
        if store.backend == store::Backend::Sqlite && !store::is_rollback(&err) {
            store.health.stop_writes(format!("committing to the event log failed: {err}"));
        }
        return Err(err);
    }
    // Before the write connection goes back, so the tail gets the events in position order.
    store.committed(executed.appended);
    Ok(executed.answers)
}

/// Load a stream, decide with the command `build` makes from its state, append: one command
/// inside the caller's transaction (the loyalty policy closing a purchase). Returns the position
/// of the stream's last event; the appended events are added to `appended`.
pub async fn run<A: Aggregate>(
    streams: &mut store::Streams<'_>,
    stream_id: &str,
    build: impl FnOnce(&A::State) -> A::Command,
    metadata: &serde_json::Value,
    now: &str,
    appended: &mut Vec<store::StoredEvent>,
) -> Result<i64, CommandError>
where
    CommandError: From<A::Error>,
{
    let loaded = streams.load_stream(stream_id).await?;
    let folded = Folded::<A::State>::from_events::<A>(&loaded.events)?;
    let events = A::decide(&folded.state, build(&folded.state))?;
    let mut rows = Vec::with_capacity(events.len());
    batch::queue::<A>(&mut rows, stream_id, folded.version, &events, metadata)?;
    let stored = streams.append(rows, now).await?;
    let last = stored.last().map_or(folded.last_position, |event| event.position);
    appended.extend(stored);
    Ok(last)
}
