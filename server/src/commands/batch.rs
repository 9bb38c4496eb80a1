//! A batch of commands, decided in memory and written with a handful of statements.
//!
//! Per batch, whatever its size: fold what others appended since the last batch into the cached
//! member states; load the streams, idempotency keys and email reservations the batch needs (one
//! query each, skipped when nothing is needed); run `decide` for every command in order against
//! the states as the earlier commands of the batch left them; append every event with one
//! multi-row `INSERT`; record the idempotency keys with another. So a refused command never wrote
//! anything (no savepoints needed), and statements per batch, not per command, set the cost.
//!
//! The caller owns the transaction (and, on PostgreSQL, holds the append lock, so nothing can be
//! appended between the catch-up and the insert). An `Err` means the transaction must be rolled
//! back and the cache cleared: nothing of the batch stands.

use super::{
    Answer, BatchIo, Command, CommandError, Envelope, MemberAction, MemberOutcome, NewAccount, Outcome, PurchaseOutcome,
};
use crate::store::{NewEvent, StoredEvent};
use app::domain::member::{points_earned, Member, MemberAggregate, MemberCommand, MemberEvent};
use app::domain::transaction::{Transaction, TransactionAggregate, TransactionCommand};
use app::domain::validate::email_key;
use app::domain::Aggregate;
use serde_json::json;
use std::collections::HashMap;
use tokio::sync::watch;

/// A stream's state as of `version`, its last event at `last_position`.
#[derive(Debug, Clone, Default)]
pub struct Folded<S> {
    pub state: S,
    pub version: i64,
    pub last_position: i64,
    pub first_position: i64,
}

impl<S: Default + Clone> Folded<S> {
    /// Fold a whole stream (oldest first).
    pub fn from_events<A: Aggregate<State = S>>(events: &[StoredEvent]) -> Result<Self, serde_json::Error> {
        let mut folded = Folded::default();
        for event in events {
            folded.apply::<A>(event)?;
        }
        Ok(folded)
    }

    /// Fold events just decided (their positions are not known yet).
    fn advance<A: Aggregate<State = S>>(&mut self, events: &[A::Event]) {
        for event in events {
            self.state = A::evolve(std::mem::take(&mut self.state), event);
        }
        self.version += events.len() as i64;
    }

    fn apply<A: Aggregate<State = S>>(&mut self, event: &StoredEvent) -> Result<(), serde_json::Error> {
        let decoded = event.decode::<A::Event>()?;
        self.state = A::evolve(std::mem::take(&mut self.state), &decoded);
        if self.version == 0 {
            self.first_position = event.position;
        }
        self.version = event.stream_version;
        self.last_position = event.position;
        Ok(())
    }
}

/// Member states the writer keeps between batches, so a command on a known member reads nothing.
/// Kept exact by [`StateCache::catch_up`], which folds in what anyone else appended (the loyalty
/// policy, other nodes) before each batch decides.
#[derive(Default)]
pub struct StateCache {
    members: HashMap<String, Folded<Member>>,
    /// Every event up to this position is folded into the cached states; `None` = not started.
    seen: Option<i64>,
    /// On SQLite, the head as this process knows it. Every append to a SQLite file is this
    /// process's, and each appender raises the head before it lets go of the one write
    /// connection, so a head no newer than `seen` means nothing to fold: the catch-up query is
    /// skipped (one statement less per batch). Were the head ever behind, the batch would append
    /// over a taken stream version, fail, and be retried with the cache cleared.
    local_head: Option<watch::Receiver<i64>>,
}

/// Members whose state the writer keeps (a few hundred bytes each).
const STATE_CACHE_ENTRIES: usize = 500_000;
/// Foreign events folded per catch-up; beyond that, starting over is cheaper.
const CATCH_UP_LIMIT: i64 = 10_000;

impl StateCache {
    /// A cache that trusts `head` to include every committed append (SQLite; see `local_head`).
    pub fn with_local_head(head: watch::Receiver<i64>) -> Self {
        StateCache { local_head: Some(head), ..StateCache::default() }
    }

    /// Forget everything (after a failed batch: its states never committed).
    pub fn clear(&mut self) {
        self.members.clear();
        self.seen = None;
    }

    /// Bring every cached state up to the head of the log.
    async fn catch_up(&mut self, conn: &mut (impl BatchIo + ?Sized)) -> Result<(), sqlx::Error> {
        let seen = self.seen.filter(|_| !self.members.is_empty());
        if let (Some(seen), Some(head)) = (seen, &self.local_head) {
            if *head.borrow() <= seen {
                return Ok(());
            }
        }
        if let Some(seen) = seen {
            let events = conn.events_after(seen, CATCH_UP_LIMIT).await?;
            if (events.len() as i64) < CATCH_UP_LIMIT {
                for event in events {
                    self.seen = Some(event.position);
                    let Some(folded) = self.members.get_mut(&event.stream_id) else { continue };
                    // A gap or an unreadable event: drop the entry; the stream is loaded when next
                    // needed.
                    if folded.version + 1 != event.stream_version || folded.apply::<MemberAggregate>(&event).is_err() {
                        self.members.remove(&event.stream_id);
                    }
                }
                return Ok(());
            }
        }
        // Not started, or too far behind to fold: start over at the head.
        self.members.clear();
        self.seen = Some(conn.head().await?);
        Ok(())
    }

    /// After a committed batch: everything up to `position` is folded in.
    pub fn committed(&mut self, position: i64) {
        if self.members.len() > STATE_CACHE_ENTRIES {
            self.clear();
        } else if let Some(seen) = self.seen.as_mut() {
            *seen = (*seen).max(position);
        }
    }
}

pub fn member_stream(member_id: &str) -> String {
    format!("{}{member_id}", MemberAggregate::STREAM_PREFIX)
}

fn purchase_stream(transaction_id: &str) -> String {
    format!("{}{transaction_id}", TransactionAggregate::STREAM_PREFIX)
}

/// How one command of the batch ended, before positions are known.
enum Pending {
    /// Refused, or replayed from a stored idempotency key.
    Done(Result<Answer, CommandError>),
    /// The same idempotency key and request as an earlier command of this batch.
    ReplayOf(usize),
    Member {
        member_id: String,
        version: i64,
        at: At,
        points: Option<u64>,
    },
    Purchase {
        transaction_id: String,
        first: At,
    },
}

/// A position: known, or that of an event appended by this batch (index into its rows).
#[derive(Clone, Copy)]
enum At {
    Known(i64),
    Row(usize),
}

/// What a batch did: one answer per envelope, and the events it appended (for the in-memory
/// tail, see `store::sqlite::recent`, once the caller has committed).
pub struct Executed {
    pub answers: Vec<Result<Answer, CommandError>>,
    pub appended: Vec<StoredEvent>,
}

/// Run `envelopes` in order inside the caller's transaction; one answer per envelope. With a
/// `cache` kept between batches (the command writer's), known members are not read again;
/// without one, every stream is read for this batch only.
pub async fn execute_batch(
    conn: &mut (impl BatchIo + ?Sized),
    envelopes: &[&Envelope],
    now: &str,
    cache: Option<&mut StateCache>,
) -> Result<Executed, sqlx::Error> {
    let mut scratch = StateCache::default();
    let cache = match cache {
        Some(cache) => {
            cache.catch_up(conn).await?;
            cache
        }
        None => &mut scratch,
    };

    // Everything the batch reads, one query per kind.
    let mut wanted: Vec<String> = Vec::new();
    for envelope in envelopes {
        match &envelope.command {
            Command::Member { member_id, .. } => {
                let stream = member_stream(member_id);
                if !cache.members.contains_key(&stream) {
                    wanted.push(stream);
                }
            }
            Command::RecordPurchase(purchase) => wanted.push(purchase_stream(&purchase.transaction_id)),
        }
    }
    wanted.sort();
    wanted.dedup();
    let mut loaded = conn.load_streams(&wanted.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    let mut purchases: HashMap<String, Folded<Transaction>> = HashMap::new();
    let mut unreadable: HashMap<String, serde_json::Error> = HashMap::new();
    for stream in wanted {
        let events = loaded.remove(&stream).unwrap_or_default();
        let folded = if stream.starts_with(MemberAggregate::STREAM_PREFIX) {
            Folded::from_events::<MemberAggregate>(&events).map(|f| {
                cache.members.insert(stream.clone(), f);
            })
        } else {
            Folded::from_events::<TransactionAggregate>(&events).map(|f| {
                purchases.insert(stream.clone(), f);
            })
        };
        if let Err(err) = folded {
            unreadable.insert(stream, err);
        }
    }
    let stored_keys = load_idempotency_keys(conn, envelopes).await?;
    let mut owners = load_email_owners(conn, envelopes).await?;

    // Decide every command, in order, in memory.
    let mut rows: Vec<NewEvent> = Vec::new();
    let mut pending: Vec<Pending> = Vec::with_capacity(envelopes.len());
    let mut keys_in_batch: HashMap<(&str, &str), (&str, usize)> = HashMap::new();
    let mut last_row: HashMap<String, usize> = HashMap::new();
    let mut reservations: Vec<Reservation> = Vec::new();
    let mut accounts: Vec<(String, &NewAccount, &str)> = Vec::new();
    for (index, envelope) in envelopes.iter().enumerate() {
        if let Some(idem) = &envelope.idempotency {
            let earlier = keys_in_batch.get(&(idem.scope.as_str(), idem.key.as_str()));
            let replay = match (earlier, stored_keys.get(&(idem.scope.clone(), idem.key.clone()))) {
                (Some((request, _)), _) if *request != idem.request => {
                    Some(Pending::Done(Err(CommandError::IdempotencyKeyReused)))
                }
                (Some((_, first)), _) => Some(Pending::ReplayOf(*first)),
                (None, Some(stored)) if stored.request != idem.request => {
                    Some(Pending::Done(Err(CommandError::IdempotencyKeyReused)))
                }
                (None, Some(stored)) => Some(Pending::Done(stored.answer())),
                (None, None) => None,
            };
            if let Some(replay) = replay {
                pending.push(replay);
                continue;
            }
        }
        let metadata = json!({
            "correlation_id": envelope.meta.correlation_id,
            "causation_id": envelope.meta.causation_id,
            "idempotency_key": envelope.idempotency.as_ref().map(|i| &i.key),
            "actor": envelope.meta.actor,
        });
        let outcome = match &envelope.command {
            Command::RecordPurchase(purchase) => {
                let stream = purchase_stream(&purchase.transaction_id);
                decide_purchase(&stream, purchase, &mut purchases, &unreadable, &metadata, &mut rows, &last_row)
            }
            Command::Member { member_id, action } => {
                let stream = member_stream(member_id);
                let context = MemberContext { stream: &stream, member_id, now, metadata: &metadata };
                decide_member(
                    &context,
                    action,
                    envelope.expected_version,
                    cache,
                    &unreadable,
                    &mut owners,
                    &mut reservations,
                    &mut rows,
                    &last_row,
                )
            }
        };
        match outcome {
            Ok((result, stream, appended)) => {
                if appended {
                    last_row.insert(stream, rows.len() - 1);
                    if let Command::Member { member_id, action: MemberAction::Enroll { account: Some(account), .. } } =
                        &envelope.command
                    {
                        accounts.push((member_id.clone(), account, envelope.meta.actor.as_str()));
                    }
                }
                if let Some(idem) = &envelope.idempotency {
                    keys_in_batch.insert((idem.scope.as_str(), idem.key.as_str()), (idem.request.as_str(), index));
                }
                pending.push(result);
            }
            Err(err) => pending.push(Pending::Done(Err(err))),
        }
    }

    // Write: events, then email reservations and new members' accounts, then the answers under
    // their keys.
    let appended = conn.append(rows, now).await?;
    for reservation in &reservations {
        conn.write_reservation(reservation).await?;
    }
    for (member_id, account, actor) in &accounts {
        conn.create_member_account(member_id, account, actor, now).await?;
    }
    let position_of = |at: At| match at {
        At::Known(p) => p,
        At::Row(r) => appended[r].position,
    };
    let mut answers: Vec<Result<Answer, CommandError>> = Vec::with_capacity(pending.len());
    for entry in pending {
        let answer = match entry {
            Pending::Done(result) => result,
            Pending::ReplayOf(first) => match &answers[first] {
                Ok(answer) => Ok(Answer { replayed: true, ..answer.clone() }),
                Err(_) => Err(CommandError::Unavailable), // cannot happen: only successes are replayed
            },
            Pending::Member { member_id, version, at, points } => {
                let outcome = MemberOutcome { member_id, version, position: position_of(at), points };
                Ok(Answer { outcome: Outcome::Member(outcome), replayed: false })
            }
            Pending::Purchase { transaction_id, first } => {
                // A purchase seen before answers with the position it was first recorded at.
                let outcome = PurchaseOutcome { transaction_id, position: position_of(first) };
                Ok(Answer { outcome: Outcome::Purchase(outcome), replayed: false })
            }
        };
        answers.push(answer);
    }
    let records: Vec<(&Envelope, &Answer)> = envelopes
        .iter()
        .zip(&answers)
        .filter_map(|(envelope, answer)| match answer {
            Ok(answer) if !answer.replayed && envelope.idempotency.is_some() => Some((*envelope, answer)),
            _ => None,
        })
        .collect();
    conn.save_idempotency_keys(&records, now).await?;

    // The cached states now know where their events landed.
    for (stream, row) in last_row {
        if let Some(folded) = cache.members.get_mut(&stream) {
            folded.last_position = appended[row].position;
            if folded.first_position == 0 {
                folded.first_position = appended[row].position;
            }
        }
    }
    Ok(Executed { answers, appended })
}

/// `(outcome, stream, whether it appended)`.
type Decided = Result<(Pending, String, bool), CommandError>;

/// Queue a stream's new events (versions after `version`) with the command's metadata.
pub(super) fn queue<A: Aggregate>(
    rows: &mut Vec<NewEvent>,
    stream: &str,
    version: i64,
    events: &[A::Event],
    metadata: &serde_json::Value,
) -> Result<(), CommandError> {
    for (i, event) in events.iter().enumerate() {
        let (event_type, schema_version) = A::event_type(event);
        let mut tagged = serde_json::to_value(event)?;
        rows.push(NewEvent {
            stream_id: stream.to_string(),
            stream_version: version + 1 + i as i64,
            event_type,
            schema_version,
            data: tagged["data"].take(),
            metadata: metadata.clone(),
        });
    }
    Ok(())
}

/// A command on a stream whose stored events cannot be decoded is refused (the others go on).
fn readable(stream: &str, unreadable: &HashMap<String, serde_json::Error>) -> Result<(), CommandError> {
    match unreadable.get(stream) {
        Some(err) => Err(CommandError::Corrupt(serde_json::Error::io(std::io::Error::other(err.to_string())))),
        None => Ok(()),
    }
}

/// The position of the stream's last event: appended by this batch, or as folded.
fn last_at(stream: &str, last_row: &HashMap<String, usize>, last_position: i64) -> At {
    last_row.get(stream).map_or(At::Known(last_position), |r| At::Row(*r))
}

fn decide_purchase(
    stream: &str,
    purchase: &app::domain::transaction::Purchase,
    purchases: &mut HashMap<String, Folded<Transaction>>,
    unreadable: &HashMap<String, serde_json::Error>,
    metadata: &serde_json::Value,
    rows: &mut Vec<NewEvent>,
    last_row: &HashMap<String, usize>,
) -> Decided {
    readable(stream, unreadable)?;
    let folded = purchases.entry(stream.to_string()).or_default();
    let events = TransactionAggregate::decide(&folded.state, TransactionCommand::Perform(purchase.clone()))?;
    let first = if folded.version > 0 {
        // Recorded before (possibly earlier in this batch).
        if folded.first_position > 0 {
            At::Known(folded.first_position)
        } else {
            last_at(stream, last_row, 0)
        }
    } else {
        At::Row(rows.len())
    };
    queue::<TransactionAggregate>(rows, stream, folded.version, &events, metadata)?;
    folded.advance::<TransactionAggregate>(&events);
    let pending = Pending::Purchase { transaction_id: purchase.transaction_id.clone(), first };
    Ok((pending, stream.to_string(), !events.is_empty()))
}

struct MemberContext<'a> {
    stream: &'a str,
    member_id: &'a str,
    now: &'a str,
    metadata: &'a serde_json::Value,
}

#[allow(clippy::too_many_arguments)]
fn decide_member(
    cx: &MemberContext,
    action: &MemberAction,
    expected_version: Option<i64>,
    cache: &mut StateCache,
    unreadable: &HashMap<String, serde_json::Error>,
    owners: &mut HashMap<String, Option<String>>,
    reservations: &mut Vec<Reservation>,
    rows: &mut Vec<NewEvent>,
    last_row: &HashMap<String, usize>,
) -> Decided {
    readable(cx.stream, unreadable)?;
    let folded = cache.members.entry(cx.stream.to_string()).or_default();
    if let Some(expected) = expected_version {
        if expected != folded.version {
            return Err(CommandError::VersionConflict { expected, actual: folded.version });
        }
    }
    let requested_email = match action {
        MemberAction::Enroll { email, .. } => Some(email.as_str()),
        MemberAction::UpdateProfile { email, .. } => email.as_deref(),
        _ => None,
    };
    let email_owner = requested_email.and_then(|email| owners.get(&email_key(email)).cloned().flatten());
    let command = member_command(cx.member_id, action, cx.now, email_owner);
    let events = MemberAggregate::decide(&folded.state, command)?;
    queue::<MemberAggregate>(rows, cx.stream, folded.version, &events, cx.metadata)?;
    for event in &events {
        match event {
            MemberEvent::MemberEnrolled { email, .. } => {
                let key = email_key(email);
                owners.insert(key.clone(), Some(cx.member_id.to_string()));
                reservations.push(Reservation::Take { key, member_id: cx.member_id.to_string() });
            }
            MemberEvent::ProfileUpdated { email: Some(email), .. } => {
                let old = email_key(&folded.state.email);
                owners.insert(old.clone(), None);
                reservations.push(Reservation::Release { key: old, member_id: cx.member_id.to_string() });
                let key = email_key(email);
                owners.insert(key.clone(), Some(cx.member_id.to_string()));
                reservations.push(Reservation::Take { key, member_id: cx.member_id.to_string() });
            }
            _ => {}
        }
    }
    folded.advance::<MemberAggregate>(&events);
    let at =
        if events.is_empty() { last_at(cx.stream, last_row, folded.last_position) } else { At::Row(rows.len() - 1) };
    let points = matches!(action, MemberAction::EarnForPurchase { .. }).then(|| points_earned(&events));
    let pending = Pending::Member { member_id: cx.member_id.to_string(), version: folded.version, at, points };
    Ok((pending, cx.stream.to_string(), !events.is_empty()))
}

fn member_command(member_id: &str, action: &MemberAction, now: &str, email_owner: Option<String>) -> MemberCommand {
    match action.clone() {
        MemberAction::Enroll { name, email, .. } => MemberCommand::Enroll {
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

/// A change to the one-member-per-email reservations, written with the events.
pub enum Reservation {
    Take { key: String, member_id: String },
    Release { key: String, member_id: String },
}

async fn load_email_owners(
    conn: &mut (impl BatchIo + ?Sized),
    envelopes: &[&Envelope],
) -> Result<HashMap<String, Option<String>>, sqlx::Error> {
    let mut keys: Vec<String> = envelopes
        .iter()
        .filter_map(|e| match &e.command {
            Command::Member { action: MemberAction::Enroll { email, .. }, .. } => Some(email_key(email)),
            Command::Member { action: MemberAction::UpdateProfile { email: Some(email), .. }, .. } => {
                Some(email_key(email))
            }
            _ => None,
        })
        .collect();
    keys.sort();
    keys.dedup();
    let mut owners: HashMap<String, Option<String>> = keys.iter().map(|k| (k.clone(), None)).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    for (email, member_id) in conn.email_owners(&keys).await? {
        owners.insert(email, Some(member_id));
    }
    Ok(owners)
}

/// A stored idempotency key's first answer.
pub struct StoredKey {
    pub(super) request: String,
    /// The first answer's outcome, as JSON.
    pub(super) response: String,
}

impl StoredKey {
    fn answer(&self) -> Result<Answer, CommandError> {
        Ok(Answer { outcome: serde_json::from_str(&self.response)?, replayed: true })
    }
}

async fn load_idempotency_keys(
    conn: &mut (impl BatchIo + ?Sized),
    envelopes: &[&Envelope],
) -> Result<HashMap<(String, String), StoredKey>, sqlx::Error> {
    let mut by_scope: HashMap<&str, Vec<&str>> = HashMap::new();
    // A key the server made for this one request cannot have been stored before (see
    // `Idempotency::unused`): on PostgreSQL every command has one, and looking them all up was
    // the batch's costliest statement.
    for idem in envelopes.iter().filter_map(|e| e.idempotency.as_ref()).filter(|i| !i.unused) {
        by_scope.entry(idem.scope.as_str()).or_default().push(idem.key.as_str());
    }
    let mut found = HashMap::new();
    for (scope, keys) in by_scope {
        for (key, stored) in conn.idempotency_keys(scope, &keys).await? {
            found.insert((scope.to_string(), key), stored);
        }
    }
    Ok(found)
}
