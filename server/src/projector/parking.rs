//! Poison events. An event a consumer cannot apply (it cannot be decoded, or breaks a rule the
//! consumer relies on) would otherwise be retried forever and freeze every view behind it. So the
//! runner retries it a few times with backoff (`TALLY_PARK_AFTER`), then parks it and every later
//! event of the same stream for that consumer (one member's events keep their order) and goes on
//! with every other stream. An admin then retries the stream (its parked events are applied again,
//! in order: after a fix) or skips them with a reason that is kept.
//!
//! Parked events are not copied anywhere: they stay in the log, and a `parked_streams` row says
//! which stretch of which stream a consumer holds back. The row lives where the consumer commits
//! (`Consumers::pool_of`), so a retry applies the events and removes the row in one transaction.
//! Retries and skips are asked for by writing `action` on the row (any node), and carried out by
//! the runner of the consumer (the node that runs the consumers), which alone changes what is held
//! back while it runs.

use crate::clock;
use crate::store::{Store, StoredEvent, Writes};
use app::views::ParkedStream;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;

/// What a consumer returns when one event, not the database, is what failed: the runner parks
/// that event's stream after `park_after` attempts. Any other error is retried without end (a
/// database that does not answer is not the event's fault).
#[derive(Debug, thiserror::Error)]
#[error("{event_type} ({stream_id}) at position {position}: {message}")]
pub struct EventFailed {
    pub position: i64,
    pub stream_id: String,
    pub event_type: String,
    pub message: String,
}

impl EventFailed {
    /// The error a consumer returns for `event`, which failed with `error`.
    pub fn error(event: &StoredEvent, error: impl std::fmt::Display) -> anyhow::Error {
        anyhow::Error::new(EventFailed {
            position: event.position,
            stream_id: event.stream_id.clone(),
            event_type: event.event_type.clone(),
            message: error.to_string(),
        })
    }
}

/// The stretches of streams a consumer holds back, as its runner keeps them: per stream, from
/// which position, and through which (`None` while parked; a skipped stretch stays held back
/// until the consumer's stored checkpoint has passed it, so that a replay from an older
/// checkpoint does not apply what was skipped).
#[derive(Debug, Default)]
pub struct HeldBack {
    streams: HashMap<String, Vec<(i64, Option<i64>)>>,
}

impl HeldBack {
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// True when the consumer must not apply this event.
    pub fn holds(&self, event: &StoredEvent) -> bool {
        self.streams.get(&event.stream_id).is_some_and(|stretches| {
            stretches
                .iter()
                .any(|(from, through)| event.position >= *from && through.is_none_or(|t| event.position <= t))
        })
    }

    /// Where the stream's open (parked) stretch starts.
    pub fn parked_from(&self, stream_id: &str) -> Option<i64> {
        self.streams.get(stream_id)?.iter().find(|(_, through)| through.is_none()).map(|(from, _)| *from)
    }

    /// How many streams are parked (not skipped).
    pub fn parked(&self) -> usize {
        self.streams.values().filter(|s| s.iter().any(|(_, through)| through.is_none())).count()
    }

    pub fn park(&mut self, stream_id: &str, from: i64) {
        let stretches = self.streams.entry(stream_id.to_string()).or_default();
        if !stretches.iter().any(|(_, through)| through.is_none()) {
            stretches.push((from, None));
        }
    }

    /// The open stretch is applied again: it is no longer held back.
    pub fn release(&mut self, stream_id: &str) {
        if let Some(stretches) = self.streams.get_mut(stream_id) {
            stretches.retain(|(_, through)| through.is_some());
            if stretches.is_empty() {
                self.streams.remove(stream_id);
            }
        }
    }

    /// The consumer's checkpoint is stored at `stored`: no replay reaches the skipped stretches
    /// that end there or before, so they need no holding back (nor filtering every batch).
    pub fn forget_through(&mut self, stored: i64) {
        if self.streams.is_empty() {
            return;
        }
        self.streams.retain(|_, stretches| {
            stretches.retain(|(_, through)| through.is_none_or(|t| t > stored));
            !stretches.is_empty()
        });
    }

    /// The open stretch is skipped through `through`.
    pub fn close(&mut self, stream_id: &str, through: i64) {
        if let Some(stretches) = self.streams.get_mut(stream_id) {
            for stretch in stretches.iter_mut().filter(|(_, t)| t.is_none()) {
                stretch.1 = Some(through);
            }
        }
    }
}

/// What a consumer holds back, from its rows.
pub(super) async fn load(pool: &Writes, consumer: &str) -> Result<HeldBack, sqlx::Error> {
    let rows = sqlx::query("SELECT stream_id, from_position, skipped_through FROM parked_streams WHERE consumer = $1")
        .bind(consumer)
        .fetch_all(&mut *pool.acquire().await?)
        .await?;
    let mut held = HeldBack::default();
    for row in rows {
        let stretch = (row.try_get::<i64, _>("from_position")?, row.try_get::<Option<i64>, _>("skipped_through")?);
        held.streams.entry(row.try_get("stream_id")?).or_default().push(stretch);
    }
    Ok(held)
}

/// Park the stream of `failed` for `consumer` (or, parked already, record the new failure);
/// a pending action is done with either way.
pub(super) async fn park(
    pool: &Writes,
    consumer: &str,
    failed: &EventFailed,
    attempts: u32,
) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let updated = sqlx::query(
        "UPDATE parked_streams SET error = $3, attempts = attempts + 1, action = NULL, reason = NULL, actor = NULL \
         WHERE consumer = $1 AND stream_id = $2 AND skipped_through IS NULL",
    )
    .bind(consumer)
    .bind(&failed.stream_id)
    .bind(&failed.message)
    .execute(&mut *conn)
    .await?;
    if updated.rows_affected() > 0 {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO parked_streams (consumer, stream_id, from_position, event_type, error, attempts, parked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(consumer)
    .bind(&failed.stream_id)
    .bind(failed.position)
    .bind(&failed.event_type)
    .bind(&failed.message)
    .bind(attempts as i32)
    .bind(clock::now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// A retry or skip asked for and not carried out yet.
#[derive(Debug, Clone)]
pub(super) struct Requested {
    pub consumer: String,
    pub stream_id: String,
    pub action: Action,
    pub reason: String,
    pub actor: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Retry,
    Skip,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Skip => "skip",
        }
    }
}

/// The actions asked for on these consumers' parked streams.
pub(super) async fn requested(pool: &Writes, consumers: &[&str]) -> Result<Vec<Requested>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT consumer, stream_id, action, reason, actor FROM parked_streams \
         WHERE action IS NOT NULL AND skipped_through IS NULL ORDER BY parked_at",
    )
    .fetch_all(&mut *pool.acquire().await?)
    .await?;
    let mut asked = Vec::new();
    for row in rows {
        let consumer: String = row.try_get("consumer")?;
        if !consumers.contains(&consumer.as_str()) {
            continue;
        }
        let action = match row.try_get::<String, _>("action")?.as_str() {
            "skip" => Action::Skip,
            _ => Action::Retry,
        };
        asked.push(Requested {
            consumer,
            stream_id: row.try_get("stream_id")?,
            action,
            reason: row.try_get::<Option<String>, _>("reason")?.unwrap_or_default(),
            actor: row.try_get::<Option<String>, _>("actor")?.unwrap_or_default(),
        });
    }
    Ok(asked)
}

/// In the transaction that applied the stream's parked events again: it is no longer parked.
pub(super) async fn release_in(conn: &mut AnyConnection, consumer: &str, stream_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM parked_streams WHERE consumer = $1 AND stream_id = $2 AND skipped_through IS NULL")
        .bind(consumer)
        .bind(stream_id)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Skip the parked stretch through `through` (the consumer's position): its events are never
/// applied by this consumer; the row stays, with the reason.
pub(super) async fn skip(pool: &Writes, asked: &Requested, through: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE parked_streams SET skipped_through = $3, skipped_at = $4, action = NULL \
         WHERE consumer = $1 AND stream_id = $2 AND skipped_through IS NULL",
    )
    .bind(&asked.consumer)
    .bind(&asked.stream_id)
    .bind(through)
    .bind(clock::now())
    .execute(&mut *pool.acquire().await?)
    .await?;
    Ok(())
}

/// Ask for `action` on a parked stream (any node). False when the stream is not parked.
pub async fn request(
    pool: &Writes,
    consumer: &str,
    stream_id: &str,
    action: Action,
    reason: Option<&str>,
    actor: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE parked_streams SET action = $3, reason = $4, actor = $5 \
         WHERE consumer = $1 AND stream_id = $2 AND skipped_through IS NULL",
    )
    .bind(consumer)
    .bind(stream_id)
    .bind(action.as_str())
    .bind(reason)
    .bind(actor)
    .execute(&mut *pool.acquire().await?)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// Every stretch a consumer holds back or skipped, oldest first. Read on the read pool: a page
/// or an API call never waits for a consumer's write connection.
pub async fn list(store: &Store, consumer: &str) -> Result<Vec<ParkedStream>, sqlx::Error> {
    let sql = format!(
        "SELECT stream_id, from_position, event_type, error, attempts, parked_at, action, skipped_through, \
         skipped_at, reason, actor FROM {} AS p WHERE consumer = $1 ORDER BY from_position",
        store.parked_table()
    );
    let rows = sqlx::query(&sql).bind(consumer).fetch_all(&store.read).await?;
    rows.iter()
        .map(|r| {
            let count = |n: i64| n.max(0) as u64;
            let attempts =
                r.try_get::<i64, _>("attempts").or_else(|_| r.try_get::<i32, _>("attempts").map(i64::from))?;
            Ok(ParkedStream {
                stream_id: r.try_get("stream_id")?,
                from_position: count(r.try_get("from_position")?),
                event_type: r.try_get("event_type")?,
                error: r.try_get("error")?,
                attempts: count(attempts),
                parked_at: r.try_get("parked_at")?,
                action: r.try_get("action")?,
                skipped_through: r.try_get::<Option<i64>, _>("skipped_through")?.map(count),
                skipped_at: r.try_get("skipped_at")?,
                reason: r.try_get("reason")?,
                actor: r.try_get("actor")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, position: i64) -> StoredEvent {
        StoredEvent {
            position,
            stream_id: stream.into(),
            stream_version: 1,
            event_type: "PointsEarned".into(),
            schema_version: 1,
            data: serde_json::json!({}),
            metadata: serde_json::json!({}),
            recorded_at: String::new(),
        }
    }

    #[test]
    fn a_parked_stream_holds_back_its_later_events_and_a_skipped_one_only_its_stretch() {
        let mut held = HeldBack::default();
        held.park("member-b", 10);
        assert!(!held.holds(&event("member-b", 9)), "before the failure");
        assert!(held.holds(&event("member-b", 10)) && held.holds(&event("member-b", 99)));
        assert!(!held.holds(&event("member-a", 10)), "other streams go on");
        assert_eq!((held.parked(), held.parked_from("member-b")), (1, Some(10)));

        held.close("member-b", 20);
        assert_eq!(held.parked(), 0);
        assert!(held.holds(&event("member-b", 20)) && !held.holds(&event("member-b", 21)));

        held.park("member-b", 30);
        held.release("member-b");
        assert!(!held.holds(&event("member-b", 30)), "released");
        assert!(held.holds(&event("member-b", 15)), "the skipped stretch stays skipped");

        held.forget_through(19);
        assert!(held.holds(&event("member-b", 15)), "a replay from 19 would still reach it");
        held.forget_through(20);
        assert!(held.is_empty(), "the checkpoint is past it: nothing left to hold back");
    }
}
