//! SQLite: where each stream ends, kept in memory and written behind the log in bulk.
//!
//! Why: with an index on `(stream_id, stream_version)` every command's commit carried a leaf of
//! that index, a random 4 KiB page (commands hit random members, so no two in a batch share a
//! leaf), checksummed, written to the log and synced before the command is answered. That page,
//! with the member's view in the views' file, was what held command throughput back
//! (docs/benchmark-history.md, 2026-11-30). Instead each event names its
//! stream's previous event (`previous_position`), so a stream is read by following that chain
//! back from its head, and a commit adds nothing but rows at the end of the log.
//!
//! The heads themselves are what this module keeps: the newest `(version, position)` of every
//! stream appended to lately, in memory, and of every stream in the `stream_heads` table, written
//! behind the log about once a second (see [`flush`]) with its checkpoint. The table holds every
//! stream's head as of its checkpoint, except streams appended to after it, which the log itself
//! names: at start the events after the checkpoint are read back into memory ([`load`]).
//!
//! How the heads stay exact, and a stream version is never taken twice (what the unique index
//! guaranteed): every append to the file happens inside a write transaction, which on SQLite is
//! one at a time. Each such transaction first compares the log's head with the heads' own
//! ([`Heads::known`]); if someone else appended meanwhile (a hand edit, another process), the
//! events in between are read back first ([`Heads::absorb`]). Then each event to append is checked
//! against its stream's head (memory, else the table) and refused, as a unique violation, unless
//! it is the next version ([`Chain`]). The appender hands its events here after its commit and
//! before it lets go of the write connection (`Store::committed`), so the next transaction usually
//! finds nothing to read back. PostgreSQL keeps its unique constraint and needs none of this.

use crate::store::{StoredEvent, Writes};
use sqlx::{AnyConnection, Connection, Row};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The end of a stream: its newest version and that event's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub version: i64,
    pub position: i64,
}

/// The name of the heads' row in `checkpoints`: every stream's head as of that position is in
/// `stream_heads`, or the stream was appended to after it.
pub const CHECKPOINT: &str = "stream_heads";

/// Heads kept in memory once written to the table; beyond this many, the written ones are
/// dropped and read from the table when next needed (one lookup by key). Every purchase is a
/// stream of its own, so the heads grow with the purchases: after the benchmark's 200,000 the
/// server held 8 MB more anonymous memory with 200,000 kept than with this bound.
const KEPT: usize = 50_000;

struct Entry {
    head: Head,
    /// Not in the table yet.
    dirty: bool,
}

#[derive(Default)]
struct State {
    streams: HashMap<String, Entry>,
    /// Every committed append up to this position is in `streams` or in the table.
    known: i64,
    /// The table's checkpoint, as this process last read or wrote it.
    checkpoint: i64,
}

#[derive(Default)]
pub struct Heads {
    state: Mutex<State>,
}

impl Heads {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves at worst a head missing or not yet raised; the
        // next transaction's comparison with the log reads back what is missing.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every committed append up to here is known.
    pub fn known(&self) -> i64 {
        self.lock().known
    }

    /// The head of `stream` if it is in memory; `None`: look in the table (and if it is not there
    /// either, the stream has no events).
    pub fn get(&self, stream: &str) -> Option<Head> {
        self.lock().streams.get(stream).map(|entry| entry.head)
    }

    /// Committed events `(stream, head)`, in position order, that are every event after
    /// [`known`](Self::known) up to `through`: raise each stream's head, then `known`.
    pub fn absorb<'a>(&self, events: impl IntoIterator<Item = (&'a str, Head)>, through: i64) {
        let mut state = self.lock();
        for (stream, head) in events {
            raise(&mut state.streams, stream, head);
        }
        state.known = state.known.max(through);
    }

    /// Events this process just committed (in position order). They raise `known` only if they
    /// follow it without a gap; a gap is read back from the log by the next write transaction.
    pub fn committed(&self, events: &[StoredEvent]) {
        let mut state = self.lock();
        let mut next = state.known + 1;
        let mut follows = true;
        for event in events {
            follows &= event.position == next;
            next = event.position + 1;
            raise(
                &mut state.streams,
                &event.stream_id,
                Head { version: event.stream_version, position: event.position },
            );
        }
        if follows {
            state.known = state.known.max(next - 1);
        }
    }

    /// Rows of `sql::EVENTS_BETWEEN` for `(known, log]`, read back: true once `known` is `log`.
    pub fn absorb_read(&self, read: &[(String, Head)], log: i64) -> bool {
        let through = if read.len() < READ_BACK { log } else { read.last().map_or(log, |(_, head)| head.position) };
        self.absorb(read.iter().map(|(stream, head)| (stream.as_str(), *head)), through);
        through >= log
    }

    /// The heads not yet in the table, as of position `upto` at most.
    pub fn dirty(&self, upto: i64) -> Vec<(String, Head)> {
        let state = self.lock();
        state
            .streams
            .iter()
            .filter(|(_, entry)| entry.dirty && entry.head.position <= upto)
            .map(|(stream, entry)| (stream.clone(), entry.head))
            .collect()
    }

    /// These heads are in the table now: mark them so, unless they moved on meanwhile.
    pub fn written(&self, heads: &[(String, Head)]) {
        let mut state = self.lock();
        for (stream, head) in heads {
            if let Some(entry) = state.streams.get_mut(stream) {
                if entry.head == *head {
                    entry.dirty = false;
                }
            }
        }
        if state.streams.len() > KEPT {
            state.streams.retain(|_, entry| entry.dirty);
        }
    }
}

fn raise(streams: &mut HashMap<String, Entry>, stream: &str, head: Head) {
    match streams.get_mut(stream) {
        Some(entry) if entry.head.position >= head.position => {}
        Some(entry) => *entry = Entry { head, dirty: true },
        None => {
            streams.insert(stream.to_string(), Entry { head, dirty: true });
        }
    }
}

/// One write transaction's appends, checked against the heads and chained to them; what this
/// transaction appended counts only for itself until its commit reaches [`Heads::committed`].
pub struct Chain<'h> {
    heads: &'h Heads,
    own: HashMap<String, Head>,
}

impl<'h> Chain<'h> {
    pub fn new(heads: &'h Heads) -> Self {
        Chain { heads, own: HashMap::new() }
    }

    pub fn heads(&self) -> &'h Heads {
        self.heads
    }

    /// The head of `stream` if this transaction or memory knows it; `None`: look in the table.
    pub fn get(&self, stream: &str) -> Option<Head> {
        self.own.get(stream).copied().or_else(|| self.heads.get(stream))
    }

    /// Check that `version` is the next of `stream`, whose head (from [`get`](Self::get) or the
    /// table) is `head`; returns the position of the stream's previous event, to chain to.
    pub fn next(&self, stream: &str, version: i64, head: Option<Head>) -> Result<Option<i64>, sqlx::Error> {
        let at = head.map_or(0, |h| h.version);
        if version != at + 1 {
            return Err(super::error::version_taken(format!(
                "stream {stream} is at version {at}: version {version} cannot be appended"
            )));
        }
        Ok(head.map(|h| h.position))
    }

    /// This transaction appended `version` of `stream` at `position`.
    pub fn appended(&mut self, stream: &str, version: i64, position: i64) {
        self.own.insert(stream.to_string(), Head { version, position });
    }
}

/// Events read back per query (as `sql::EVENTS_BETWEEN` says).
pub const READ_BACK: usize = 10_000;

/// SQL the heads need (the native connection runs the same statements, but for the log's head,
/// which it reads with `NativeTx::read_head`).
pub mod sql {
    /// The log's head.
    pub const LOG_HEAD: &str = "SELECT COALESCE(MAX(position), 0) FROM events";
    /// The heads of the events in `($1, $2]`, in order, at most [`READ_BACK`](super::READ_BACK).
    pub const EVENTS_BETWEEN: &str = "SELECT stream_id, stream_version, position FROM events \
         WHERE position > $1 AND position <= $2 ORDER BY position LIMIT 10000";
    /// One stream's head in the table.
    pub const TABLE_HEAD: &str = "SELECT version, position FROM stream_heads WHERE stream_id = $1";
    /// A stream's events after `$1` (the heads' `known`), newest first: an append by someone
    /// else that no write transaction has read back yet (for readers outside one).
    pub const STREAM_AFTER: &str =
        "SELECT stream_version, position FROM events WHERE position > $1 AND stream_id = $2 ORDER BY position DESC LIMIT 1";
    /// The heads' checkpoint.
    pub const CHECKPOINT: &str = "SELECT position FROM checkpoints WHERE name = 'stream_heads'";

    /// A stream's events (`EVENT_COLUMNS`), oldest first, following the chain back from the
    /// head's position `$1`: one lookup by position per event.
    pub fn chain(columns: &str) -> String {
        format!(
            "WITH RECURSIVE chain(position) AS (\
               SELECT $1 \
               UNION ALL \
               SELECT e.previous_position FROM events AS e JOIN chain AS c ON e.position = c.position \
               WHERE e.previous_position IS NOT NULL) \
             SELECT {columns} FROM events WHERE position IN (SELECT position FROM chain) ORDER BY position"
        )
    }
}

/// At start: the heads as of the table's checkpoint, and what the log holds after it.
pub async fn load(conn: &mut AnyConnection) -> Result<Heads, sqlx::Error> {
    let checkpoint = sqlx::query(sql::CHECKPOINT).fetch_optional(&mut *conn).await?;
    let known = checkpoint.map(|row| row.try_get::<i64, _>(0)).transpose()?.unwrap_or(0);
    let heads = Heads { state: Mutex::new(State { streams: HashMap::new(), known, checkpoint: known }) };
    sync(conn, &heads).await?;
    Ok(heads)
}

/// Compare the log's head with the heads' and read back what was appended without reaching
/// them. Inside a write transaction (or before any), so nothing is appended meanwhile.
pub async fn sync(conn: &mut AnyConnection, heads: &Heads) -> Result<(), sqlx::Error> {
    let log: i64 = sqlx::query(sql::LOG_HEAD).fetch_one(&mut *conn).await?.try_get(0)?;
    while heads.known() < log {
        let rows = sqlx::query(sql::EVENTS_BETWEEN).bind(heads.known()).bind(log).fetch_all(&mut *conn).await?;
        let read = rows
            .iter()
            .map(|row| Ok((row.try_get(0)?, Head { version: row.try_get(1)?, position: row.try_get(2)? })))
            .collect::<Result<Vec<(String, Head)>, sqlx::Error>>()?;
        if heads.absorb_read(&read, log) {
            break;
        }
    }
    Ok(())
}

/// The head of `stream` as the table has it.
pub async fn table_head(conn: &mut AnyConnection, stream: &str) -> Result<Option<Head>, sqlx::Error> {
    let row = sqlx::query(sql::TABLE_HEAD).bind(stream).fetch_optional(&mut *conn).await?;
    row.map(|row| Ok(Head { version: row.try_get(0)?, position: row.try_get(1)? })).transpose()
}

/// For a reader outside a write transaction: the head of `stream` as memory or the table has it,
/// or as the log has it past what the heads know (someone else's append, not yet read back).
pub async fn read_head(conn: &mut AnyConnection, heads: &Heads, stream: &str) -> Result<Option<Head>, sqlx::Error> {
    let known = heads.known();
    let later = sqlx::query(sql::STREAM_AFTER).bind(known).bind(stream).fetch_optional(&mut *conn).await?;
    if let Some(row) = later {
        return Ok(Some(Head { version: row.try_get(0)?, position: row.try_get(1)? }));
    }
    match heads.get(stream) {
        Some(head) => Ok(Some(head)),
        None => table_head(conn, stream).await,
    }
}

/// Every event of `stream`, oldest first, back along the chain from `head`.
pub async fn read_chain(conn: &mut AnyConnection, stream: &str, head: Head) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let rows = sqlx::query(&sql::chain(crate::store::EVENT_COLUMNS)).bind(head.position).fetch_all(&mut *conn).await?;
    let events = rows.iter().map(StoredEvent::from_row).collect::<Result<Vec<_>, _>>()?;
    check_chain(stream, head, &events)?;
    Ok(events)
}

/// Heads written per transaction: each holds the event store's write connection, which the
/// command writer waits for, so many short ones rather than one long one.
const FLUSH_CHUNK: usize = 256;
/// Between two rounds of writing the heads.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Write the heads behind the log until `stop`, then once more.
pub async fn flush_behind(writes: Writes, heads: Arc<Heads>, stop: CancellationToken) {
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(FLUSH_EVERY) => false,
            _ = stop.cancelled() => true,
        };
        if let Err(err) = flush(&writes, &heads).await {
            writes.reset().await;
            metrics::counter!("tally_stream_heads_flush_errors_total").increment(1);
            tracing::warn!(error = %err, "could not write the stream heads; retrying");
        }
        if stopping {
            return;
        }
    }
}

/// One round: every head not in the table as of what is known now, then the checkpoint.
/// Returns how many heads were written.
pub async fn flush(writes: &Writes, heads: &Heads) -> Result<usize, sqlx::Error> {
    let upto = heads.known();
    let mut dirty = heads.dirty(upto);
    if dirty.is_empty() && upto <= heads.lock().checkpoint {
        return Ok(0);
    }
    let started = std::time::Instant::now();
    // In key order, so each transaction changes a few neighbouring pages of the table, not one
    // page per head.
    dirty.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    for chunk in dirty.chunks(FLUSH_CHUNK) {
        let mut conn = writes.acquire().await?;
        let mut tx = conn.begin_with("PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE").await?;
        let values =
            (0..chunk.len()).map(|i| format!("({})", crate::store::params(&tx, i * 3 + 1, 3))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO stream_heads (stream_id, version, position) VALUES {} ON CONFLICT (stream_id) DO UPDATE \
             SET version = excluded.version, position = excluded.position WHERE stream_heads.position < excluded.position",
            values.join(", ")
        );
        // Not kept prepared: the last chunk of each round has a length of its own, and sqlx
        // would keep a prepared statement for each length it saw.
        let mut query = sqlx::query(&sql).persistent(false);
        for (stream, head) in chunk {
            query = query.bind(stream).bind(head.version).bind(head.position);
        }
        query.execute(&mut *tx).await?;
        tx.commit().await?;
        heads.written(chunk);
    }
    // Every head as of `upto` is in the table now (or moved on, which the log after `upto` names).
    let mut conn = writes.acquire().await?;
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE \
         SET position = excluded.position, updated_at = excluded.updated_at WHERE checkpoints.position < excluded.position",
    )
    .bind(CHECKPOINT)
    .bind(upto)
    .bind(crate::clock::now())
    .execute(&mut *conn)
    .await?;
    let mut state = heads.lock();
    state.checkpoint = state.checkpoint.max(upto);
    drop(state);
    metrics::histogram!("tally_stream_heads_flush_seconds").record(started.elapsed().as_secs_f64());
    Ok(dirty.len())
}

/// A stream read back along its chain must be exactly versions 1 to n of that stream: anything
/// else means a broken chain in the file (a hand edit), which must not be decided upon.
pub fn check_chain(stream: &str, head: Head, events: &[StoredEvent]) -> Result<(), sqlx::Error> {
    let whole = events.len() as i64 == head.version
        && events.iter().zip(1..).all(|(event, version)| event.stream_id == stream && event.stream_version == version)
        && events.last().is_some_and(|event| event.position == head.position);
    if whole {
        Ok(())
    } else {
        Err(sqlx::Error::Protocol(format!(
            "stream {stream}: its events do not chain back from version {} at position {} to version 1",
            head.version, head.position
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(stream: &str, version: i64, position: i64) -> StoredEvent {
        StoredEvent {
            position,
            stream_id: stream.into(),
            stream_version: version,
            event_type: "E".into(),
            schema_version: 1,
            data: serde_json::json!({}),
            metadata: serde_json::json!({}),
            recorded_at: String::new(),
        }
    }

    #[test]
    fn commits_that_follow_raise_known_and_a_gap_leaves_it_for_the_log() {
        let heads = Heads::default();
        heads.committed(&[event("a", 1, 1), event("b", 1, 2)]);
        assert_eq!(heads.known(), 2);
        // Position 3 was someone else's: known stays, the heads still move.
        heads.committed(&[event("a", 2, 4)]);
        assert_eq!(heads.known(), 2);
        assert_eq!(heads.get("a"), Some(Head { version: 2, position: 4 }));
        heads.absorb([("c", Head { version: 1, position: 3 }), ("a", Head { version: 2, position: 4 })], 4);
        assert_eq!(heads.known(), 4);
        assert_eq!(heads.get("c"), Some(Head { version: 1, position: 3 }));
        // An older head never replaces a newer one.
        heads.absorb([("a", Head { version: 1, position: 1 })], 4);
        assert_eq!(heads.get("a"), Some(Head { version: 2, position: 4 }));
    }

    #[test]
    fn written_heads_are_clean_unless_they_moved_on() {
        let heads = Heads::default();
        heads.committed(&[event("a", 1, 1), event("b", 1, 2)]);
        let dirty = heads.dirty(2);
        assert_eq!(dirty.len(), 2);
        heads.committed(&[event("a", 2, 3)]);
        heads.written(&dirty);
        assert_eq!(heads.dirty(3), vec![("a".to_string(), Head { version: 2, position: 3 })]);
        assert!(heads.dirty(2).is_empty(), "a head moved past `upto` waits for the next round");
    }

    #[test]
    fn beyond_the_bound_written_heads_are_dropped_and_unwritten_ones_kept() {
        let heads = Heads::default();
        let events: Vec<StoredEvent> = (1..=KEPT as i64 + 10).map(|p| event(&format!("s{p}"), 1, p)).collect();
        heads.committed(&events);
        let mut dirty = heads.dirty(i64::MAX);
        let unwritten = dirty.pop().expect("a head");
        heads.written(&dirty);
        assert_eq!(heads.lock().streams.len(), 1, "only the head not in the table is left");
        assert_eq!(heads.get(&unwritten.0), Some(unwritten.1));
        assert_eq!(heads.get(&dirty[0].0), None, "a dropped head is looked up in the table");
    }

    #[test]
    fn only_the_next_version_can_be_appended() {
        let heads = Heads::default();
        heads.committed(&[event("a", 1, 1)]);
        let mut chain = Chain::new(&heads);
        let head = chain.get("a");
        assert_eq!(chain.next("a", 2, head).expect("next"), Some(1));
        chain.appended("a", 2, 5);
        let err = chain.next("a", 2, chain.get("a")).expect_err("taken");
        assert!(crate::store::is_unique_violation(&err), "{err}");
        assert_eq!(chain.next("new", 1, None).expect("first"), None);
        assert!(chain.next("new", 2, None).is_err(), "a stream starts at version 1");
        // Not committed: the shared heads do not have it.
        assert_eq!(heads.get("a"), Some(Head { version: 1, position: 1 }));
    }

    #[test]
    fn a_chain_must_be_the_whole_stream() {
        let head = Head { version: 2, position: 7 };
        assert!(check_chain("a", head, &[event("a", 1, 3), event("a", 2, 7)]).is_ok());
        assert!(check_chain("a", head, &[event("a", 2, 7)]).is_err());
        assert!(check_chain("a", head, &[event("b", 1, 3), event("a", 2, 7)]).is_err());
    }
}
