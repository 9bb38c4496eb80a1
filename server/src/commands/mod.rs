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
use crate::store::{self, NativeConn, Store};
use app::domain::member::MemberError;
use app::domain::transaction::{Purchase, TransactionError};
use app::domain::Aggregate;
use flush::Reply;
use futures::FutureExt;
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
}

#[derive(Debug, Clone)]
pub struct Envelope {
    pub command: Command,
    pub expected_version: Option<i64>,
    pub idempotency: Option<Idempotency>,
    pub meta: Meta,
}

/// A command's answer: HTTP status and JSON body, exactly what is replayed for its idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub replayed: bool,
    /// The position in `body` (of the stream's last event), kept to wake consumers.
    pub position: i64,
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
    #[error("stored event cannot be read: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CommandError {
    fn from(err: sqlx::Error) -> Self {
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
}

impl CommandBus {
    /// Start the writer. `head` is bumped after every commit so consumers wake up. On SQLite
    /// with a file the writer runs on the native connection's thread (see `store::native`);
    /// otherwise it is a task. The handle resolves when it has stopped.
    pub fn start(store: Store, head: std::sync::Arc<watch::Sender<i64>>) -> (CommandBus, tokio::task::JoinHandle<()>) {
        let (jobs, mut rx) = mpsc::channel::<Job>(16_384);
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
        (CommandBus { jobs }, task)
    }

    /// Run one command; resolves once its events are committed (or it was refused).
    pub async fn send(&self, envelope: Envelope) -> Result<Answer, CommandError> {
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
        let flusher = store.sqlite_path.clone().filter(|_| store.flush_behind()).map(Flusher::for_sqlite);
        Writer { store, head, cache, flusher }
    }

    /// Commit `batch` (emptying it) and answer its callers, now or after the log's sync.
    async fn commit(&mut self, batch: &mut Vec<Job>, native: Option<&mut NativeConn>) {
        let started = Instant::now();
        let size = batch.len();
        let (replies, newest) = commit_batch(&self.store, batch, &mut self.cache, native).await;
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
/// nothing of it stands; each command is then retried alone, so a command that breaks a
/// constraint (a race with a writer outside this process) fails by itself. Also returns the
/// newest committed position (0 if nothing was committed).
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
            tracing::warn!(error = %err, size = jobs.len(), "group commit failed; retrying its commands one by one");
            let mut results = Vec::with_capacity(jobs.len());
            for envelope in &envelopes {
                let result = match try_commit(store, &[*envelope], &now, cache, native.as_deref_mut()).await {
                    Ok(mut alone) => alone.pop().unwrap_or(Err(CommandError::Unavailable)),
                    Err(err) => {
                        cache.clear();
                        store.write.reset().await;
                        // Another writer took the stream version first: the client may retry.
                        if store::is_unique_violation(&err) {
                            Err(CommandError::VersionConflict { expected: -1, actual: -1 })
                        } else {
                            Err(CommandError::Database(err))
                        }
                    }
                };
                if let Ok(answer) = &result {
                    cache.committed(answer.position);
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
    results.iter().filter_map(|r| r.as_ref().ok()).map(|a| a.position).max().unwrap_or(0)
}

/// One transaction: the batch, the announcement to other nodes, the commit. With `native` (SQLite
/// with a file, on that connection's thread) the whole batch runs there, in one go, while the
/// lock on the write connection is held (see `store::native`).
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
    crate::fanout::ViewFeed::announce_append(store.backend, &mut tx, newest(&executed.answers)).await?;
    tx.commit().await?;
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
