//! The write side: load stream → `decide` → append, for every command, with group commit.
//!
//! Handlers send an [`Envelope`] to the [`CommandBus`]. One writer task takes whatever commands are
//! waiting, runs each inside its own savepoint of one shared transaction, commits once, and only
//! then answers every caller (API.md: acknowledged means durable). A command that fails rolls back
//! its savepoint only, so one bad command never spoils its batch and never leaves a partial append.

use crate::clock;
use crate::store::{self, is_unique_violation, Store};
use app::domain::member::{Member, MemberAggregate, MemberCommand, MemberError, MemberEvent};
use app::domain::transaction::{Purchase, TransactionAggregate, TransactionCommand, TransactionError};
use app::domain::validate::email_key;
use app::domain::Aggregate;
use serde_json::json;
use sqlx::{Acquire, AnyConnection, Row};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// Largest number of commands committed together.
pub const MAX_BATCH: usize = 512;
/// How often a command that lost a race for its stream version is retried (no `If-Match`).
const RACE_RETRIES: usize = 5;

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

/// Who asked, and why: copied into every event's metadata.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    pub correlation_id: String,
    pub causation_id: Option<String>,
    pub actor: String,
}

#[derive(Debug, Clone)]
pub struct Idempotency {
    /// `api` for the `Idempotency-Key` header; a consumer's name for the commands it issues.
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
    /// Another writer appended to the stream first (only possible with several nodes).
    #[error("lost a race for the stream version")]
    Race,
    #[error("the server is shutting down")]
    Unavailable,
    #[error("stored event cannot be read: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("database error: {0}")]
    Database(sqlx::Error),
}

impl From<sqlx::Error> for CommandError {
    fn from(err: sqlx::Error) -> Self {
        if is_unique_violation(&err) {
            CommandError::Race
        } else {
            CommandError::Database(err)
        }
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
    /// Start the writer task. `head` is bumped after every commit so consumers wake up.
    pub fn start(store: Store, head: std::sync::Arc<watch::Sender<i64>>) -> (CommandBus, tokio::task::JoinHandle<()>) {
        let (jobs, rx) = mpsc::channel(16_384);
        let task = tokio::spawn(writer(store, head, rx));
        (CommandBus { jobs }, task)
    }

    /// Run one command; resolves once its events are committed (or it was refused).
    pub async fn send(&self, envelope: Envelope) -> Result<Answer, CommandError> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Job { envelope, reply }).await.map_err(|_| CommandError::Unavailable)?;
        answer.await.map_err(|_| CommandError::Unavailable)?
    }
}

async fn writer(store: Store, head: std::sync::Arc<watch::Sender<i64>>, mut rx: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut cache = StateCache::default();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = Instant::now();
        let size = batch.len();
        let (replies, newest) = commit_batch(&store, &mut batch, &mut cache).await;
        for (reply, result) in replies {
            // The caller may have gone away (client disconnected); the command stands regardless.
            let _ = reply.send(result);
        }
        store::raise(&head, newest);
        metrics::histogram!("tally_command_batch_size").record(size as f64);
        metrics::histogram!("tally_command_batch_seconds").record(started.elapsed().as_secs_f64());
    }
    tracing::info!("command writer stopped");
}

type Reply = oneshot::Sender<Result<Answer, CommandError>>;

/// Run a batch in one transaction. Failed commands are answered with their error; if the commit
/// itself fails, every command that would have succeeded is answered with that failure instead.
/// Also returns the newest committed position (0 if nothing was committed).
async fn commit_batch(
    store: &Store,
    batch: &mut Vec<Job>,
    cache: &mut StateCache,
) -> (Vec<(Reply, Result<Answer, CommandError>)>, i64) {
    cache.discard();
    let now = clock::now();
    let mut out = Vec::with_capacity(batch.len());
    let mut conn = match store.write.acquire().await {
        Ok(conn) => conn,
        Err(err) => {
            tracing::error!(error = %err, "cannot get a write connection");
            let replies = batch.drain(..).map(|j| (j.reply, Err(CommandError::Database(sqlx::Error::PoolTimedOut))));
            return (replies.collect(), 0);
        }
    };
    let mut tx = match store.begin_commands(&mut conn).await {
        Ok(tx) => tx,
        Err(err) => {
            tracing::error!(error = %err, "cannot begin a write transaction");
            let replies = batch.drain(..).map(|j| (j.reply, Err(CommandError::Database(err_copy(&err)))));
            return (replies.collect(), 0);
        }
    };
    for job in batch.drain(..) {
        let result = execute_isolated(&mut tx, &job.envelope, &now, Some(cache)).await;
        let outcome = match &result {
            Ok(a) if a.replayed => "replayed",
            Ok(_) => "ok",
            Err(_) => "refused",
        };
        metrics::counter!("tally_commands_total", "command" => job.envelope.command.name(), "outcome" => outcome)
            .increment(1);
        out.push((job.reply, result));
    }
    let newest = out.iter().filter_map(|(_, r)| r.as_ref().ok()).map(|a| a.position).max().unwrap_or(0);
    if let Err(err) = crate::fanout::ViewFeed::announce_append(store.backend, &mut tx, newest).await {
        tracing::warn!(error = %err, "could not announce the append to other nodes");
    }
    if let Err(err) = tx.commit().await {
        cache.discard();
        tracing::error!(error = %err, "group commit failed");
        let replies = out
            .into_iter()
            .map(|(reply, result)| (reply, result.and_then(|_| Err(CommandError::Database(err_copy(&err))))));
        return (replies.collect(), 0);
    }
    cache.commit();
    (out, newest)
}

fn err_copy(err: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(err.to_string())
}

/// One command in its own savepoint: on any error nothing of it remains.
pub async fn execute_isolated(
    conn: &mut AnyConnection,
    envelope: &Envelope,
    now: &str,
    mut cache: Option<&mut StateCache>,
) -> Result<Answer, CommandError> {
    let mut attempt = 0;
    loop {
        let mut savepoint = conn.begin().await?;
        let cached = cache.as_deref().and_then(|c| c.get(&envelope.command));
        match execute(&mut savepoint, envelope, now, cached).await {
            Ok((answer, state)) => {
                savepoint.commit().await?;
                if let (Some(cache), Some((stream, state))) = (cache.as_deref_mut(), state) {
                    cache.pending.insert(stream, state);
                }
                return Ok(answer);
            }
            Err(err) => {
                savepoint.rollback().await?;
                if let Some(cache) = cache.as_deref_mut() {
                    cache.forget(&envelope.command);
                }
                let retry = matches!(err, CommandError::Race) && envelope.expected_version.is_none();
                attempt += 1;
                if !retry || attempt > RACE_RETRIES {
                    return Err(match err {
                        CommandError::Race => CommandError::VersionConflict { expected: -1, actual: -1 },
                        other => other,
                    });
                }
            }
        }
    }
}

/// Idempotency check, the command itself, then the key's record: all in the caller's transaction.
async fn execute(
    conn: &mut AnyConnection,
    envelope: &Envelope,
    now: &str,
    cached: Option<Cached>,
) -> Result<(Answer, Option<(String, Cached)>), CommandError> {
    if let Some(idem) = &envelope.idempotency {
        let found = sqlx::query("SELECT request, status, response FROM idempotency_keys WHERE scope = $1 AND key = $2")
            .bind(&idem.scope)
            .bind(&idem.key)
            .fetch_optional(&mut *conn)
            .await?;
        if let Some(row) = found {
            let request: String = row.try_get("request")?;
            if request != idem.request {
                return Err(CommandError::IdempotencyKeyReused);
            }
            let body: String = row.try_get("response")?;
            let position = serde_json::from_str::<serde_json::Value>(&body)?["position"].as_i64().unwrap_or(0);
            let answer = Answer { status: row.try_get::<i64, _>("status")? as u16, body, replayed: true, position };
            return Ok((answer, None));
        }
    }
    let metadata = json!({
        "correlation_id": envelope.meta.correlation_id,
        "causation_id": envelope.meta.causation_id,
        "idempotency_key": envelope.idempotency.as_ref().map(|i| &i.key),
        "actor": envelope.meta.actor,
    });
    let mut new_state = None;
    let answer = match &envelope.command {
        Command::RecordPurchase(purchase) => {
            let stream_id = format!("{}{}", TransactionAggregate::STREAM_PREFIX, purchase.transaction_id);
            let done = run::<TransactionAggregate>(
                conn,
                &stream_id,
                None,
                None,
                |_| Ok(TransactionCommand::Perform(purchase.clone())),
                &metadata,
                now,
            )
            .await?;
            // A purchase seen before answers with the position it was first recorded at.
            let position = done.first_position;
            Answer {
                status: 202,
                body: json!({"transaction_id": purchase.transaction_id, "position": position}).to_string(),
                replayed: false,
                position,
            }
        }
        Command::Member { member_id, action } => {
            let status = if matches!(action, MemberAction::Enroll { .. }) { 201 } else { 200 };
            let done = run_member(conn, member_id, action, envelope.expected_version, &metadata, now, cached).await?;
            new_state = Some((
                member_stream(member_id),
                Cached {
                    state: done.state.clone(),
                    version: done.version,
                    last_position: done.position,
                    first_position: done.first_position,
                },
            ));
            let mut body = json!({"member_id": member_id, "version": done.version, "position": done.position});
            if matches!(action, MemberAction::EarnForPurchase { .. }) {
                body["points"] = json!(points_earned(&done.events));
            }
            Answer { status, body: body.to_string(), replayed: false, position: done.position }
        }
    };
    if let Some(idem) = &envelope.idempotency {
        sqlx::query(
            "INSERT INTO idempotency_keys (scope, key, request, status, response, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&idem.scope)
        .bind(&idem.key)
        .bind(&idem.request)
        .bind(answer.status as i64)
        .bind(&answer.body)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok((answer, new_state))
}

/// What a command did to its stream.
pub struct Done<S, E> {
    pub state: S,
    pub events: Vec<E>,
    pub version: i64,
    /// Position of the stream's last event after the command.
    pub position: i64,
    /// Position of the stream's first event (the purchase, for a transaction stream).
    pub first_position: i64,
}

/// Load the stream (only what follows `cached`, if given), check `If-Match`, fold, decide with the
/// command `build` makes from the state, append. Shared by the HTTP commands and the processors.
pub async fn run<A: Aggregate>(
    conn: &mut AnyConnection,
    stream_id: &str,
    expected_version: Option<i64>,
    cached: Option<Cached<A::State>>,
    build: impl FnOnce(&A::State) -> Result<A::Command, CommandError>,
    metadata: &serde_json::Value,
    now: &str,
) -> Result<Done<A::State, A::Event>, CommandError>
where
    CommandError: From<A::Error>,
{
    let start = cached.unwrap_or_default();
    let loaded = store::load_stream_after(conn, stream_id, start.version).await?;
    let (version, last_position) =
        loaded.events.last().map(|e| (e.stream_version, e.position)).unwrap_or((start.version, start.last_position));
    if let Some(expected) = expected_version {
        if expected != version {
            return Err(CommandError::VersionConflict { expected, actual: version });
        }
    }
    let mut state = start.state;
    for stored in &loaded.events {
        state = A::evolve(state, &stored.decode::<A::Event>()?);
    }
    let first_position =
        if start.version > 0 { Some(start.first_position) } else { loaded.events.first().map(|e| e.position) };
    let command = build(&state)?;
    let events = A::decide(&state, command)?;
    if events.is_empty() {
        return Ok(Done {
            state,
            events,
            version,
            position: last_position,
            first_position: first_position.unwrap_or(0),
        });
    }
    let new_events = events
        .iter()
        .map(|event| {
            let (event_type, schema_version) = A::event_type(event);
            let tagged = serde_json::to_value(event)?;
            Ok(store::NewEvent { event_type, schema_version, data: tagged["data"].clone() })
        })
        .collect::<Result<Vec<_>, serde_json::Error>>()?;
    let (version, position) = store::append(conn, stream_id, version, &new_events, metadata, now).await?;
    let first_position = first_position.unwrap_or(position - new_events.len() as i64 + 1);
    let state = events.iter().fold(state, A::evolve);
    Ok(Done { state, events, version, position, first_position })
}

/// A stream's state as of `version` (its last event at `last_position`).
#[derive(Debug, Clone, Default)]
pub struct Cached<S = Member> {
    pub state: S,
    pub version: i64,
    pub last_position: i64,
    pub first_position: i64,
}

/// Member states the writer has folded, so the next command on a member reads only the events
/// appended since (by anyone: the loyalty policy and other nodes append too, which is why the
/// cache is a starting point, never the answer). Entries from a batch count once it commits.
#[derive(Default)]
pub struct StateCache {
    committed: std::collections::HashMap<String, Cached>,
    pending: std::collections::HashMap<String, Cached>,
}

/// Members whose state the writer keeps (about 200 bytes each).
const STATE_CACHE_ENTRIES: usize = 500_000;

impl StateCache {
    fn get(&self, command: &Command) -> Option<Cached> {
        let Command::Member { member_id, .. } = command else { return None };
        let stream = member_stream(member_id);
        self.pending.get(&stream).or_else(|| self.committed.get(&stream)).cloned()
    }

    fn forget(&mut self, command: &Command) {
        if let Command::Member { member_id, .. } = command {
            self.pending.remove(&member_stream(member_id));
        }
    }

    fn commit(&mut self) {
        if self.committed.len() + self.pending.len() > STATE_CACHE_ENTRIES {
            self.committed.clear();
        }
        self.committed.extend(self.pending.drain());
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}

fn member_stream(member_id: &str) -> String {
    format!("{}{member_id}", MemberAggregate::STREAM_PREFIX)
}

/// Member commands: the email reservation is read before and written after `decide`, in the same
/// transaction, so two members can never hold one email.
pub async fn run_member(
    conn: &mut AnyConnection,
    member_id: &str,
    action: &MemberAction,
    expected_version: Option<i64>,
    metadata: &serde_json::Value,
    now: &str,
    cached: Option<Cached>,
) -> Result<Done<Member, MemberEvent>, CommandError> {
    let stream_id = member_stream(member_id);
    let requested_email = match action {
        MemberAction::Enroll { email, .. } => Some(email.as_str()),
        MemberAction::UpdateProfile { email, .. } => email.as_deref(),
        _ => None,
    };
    let email_owner = match requested_email {
        Some(email) => email_owner(conn, &email_key(email)).await?,
        None => None,
    };
    let mut previous_email = None;
    let done = run::<MemberAggregate>(
        conn,
        &stream_id,
        expected_version,
        cached,
        |state| {
            previous_email = Some(state.email.clone());
            Ok(member_command(member_id, action, now, email_owner))
        },
        metadata,
        now,
    )
    .await?;
    for event in &done.events {
        match event {
            MemberEvent::MemberEnrolled { email, .. } => reserve_email(conn, &email_key(email), member_id).await?,
            MemberEvent::ProfileUpdated { email: Some(email), .. } => {
                if let Some(old) = &previous_email {
                    sqlx::query("DELETE FROM email_reservations WHERE email = $1 AND member_id = $2")
                        .bind(email_key(old))
                        .bind(member_id)
                        .execute(&mut *conn)
                        .await?;
                }
                reserve_email(conn, &email_key(email), member_id).await?;
            }
            _ => {}
        }
    }
    Ok(done)
}

pub fn points_earned(events: &[MemberEvent]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            MemberEvent::PointsEarned { points, .. } => *points,
            _ => 0,
        })
        .sum()
}

fn member_command(member_id: &str, action: &MemberAction, now: &str, email_owner: Option<String>) -> MemberCommand {
    match action.clone() {
        MemberAction::Enroll { name, email } => MemberCommand::Enroll {
            member_id: member_id.to_string(),
            name,
            email,
            enrolled_at: now.to_string(),
            email_owner,
        },
        MemberAction::UpdateProfile { name, email } => MemberCommand::UpdateProfile { name, email, email_owner },
        MemberAction::Earn { points, reason } => MemberCommand::EarnPoints { points, reason },
        MemberAction::Redeem { points, reward } => MemberCommand::RedeemPoints { points, reward },
        MemberAction::Suspend { reason } => MemberCommand::Suspend { reason },
        MemberAction::Reactivate => MemberCommand::Reactivate,
        MemberAction::EarnForPurchase { transaction_id, amount_cents } => {
            MemberCommand::EarnForPurchase { transaction_id, amount_cents }
        }
    }
}

async fn email_owner(conn: &mut AnyConnection, key: &str) -> Result<Option<String>, sqlx::Error> {
    let row = sqlx::query("SELECT member_id FROM email_reservations WHERE email = $1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|r| r.try_get("member_id")).transpose()
}

async fn reserve_email(conn: &mut AnyConnection, key: &str, member_id: &str) -> Result<(), CommandError> {
    // Same member re-reserving (an email's case changed) is a no-op; another member's is a conflict.
    let done =
        sqlx::query("INSERT INTO email_reservations (email, member_id) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING")
            .bind(key)
            .bind(member_id)
            .execute(&mut *conn)
            .await?;
    if done.rows_affected() == 0 {
        let owner = email_owner(conn, key).await?;
        if owner.as_deref() != Some(member_id) {
            return Err(MemberError::EmailTaken.into());
        }
    }
    Ok(())
}
