//! The newest events this process appended, kept in memory so the consumers need not read back
//! what was just written (SQLite).
//!
//! Under a steady command load the projections read every event right after its commit: a query
//! through sqlx's SQLite thread, each row handed over and converted, and its JSON parsed again.
//! That was about a sixth of the server's CPU time under P3 (BENCHMARKS.md). The appenders (the
//! command writer, the loyalty policy) already hold those events, so they hand them here after
//! their commit, and a consumer that is close behind takes them from memory.
//!
//! The log in the database stays the truth: a read is answered from here only when this tail
//! holds every event it asks for, else it goes to the database. That holds because, on SQLite,
//! every append to the file is this process's (as `StateCache` assumes too), made on the one
//! write connection, and each appender pushes its events here after its commit and before it
//! raises the head. So the tail ends at or beyond the head whenever nothing was appended without
//! being pushed; an append that was not pushed (or a gap in positions) shows up as a tail that
//! ends before the head, or starts after what is asked, and the database answers instead.

use crate::store::StoredEvent;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Events kept (about 1.6 KiB each in memory, so ~7 MiB): a third of a second of a full command
/// load, far more than a consumer that keeps up is ever behind.
pub const RECENT_EVENTS: usize = 4_096;

#[derive(Default)]
pub struct RecentEvents {
    /// Consecutive positions, oldest first; shared with the readers, not copied.
    events: Mutex<VecDeque<Arc<StoredEvent>>>,
}

impl RecentEvents {
    /// Add events just committed, in position order. Events that do not follow the newest one
    /// kept start the tail over (what came between was not pushed).
    pub fn push(&self, appended: impl IntoIterator<Item = StoredEvent>) {
        let Ok(mut events) = self.events.lock() else { return };
        for event in appended {
            if events.back().is_some_and(|last| last.position + 1 != event.position) {
                events.clear();
            }
            events.push_back(Arc::new(event));
        }
        let excess = events.len().saturating_sub(RECENT_EVENTS);
        events.drain(..excess);
    }

    /// Up to `limit` events after position `after`, when the tail holds every committed one
    /// (through `head`); `None` when the database must be asked.
    pub fn after(&self, after: i64, limit: usize, head: i64) -> Option<Vec<Arc<StoredEvent>>> {
        let events = self.events.lock().ok()?;
        let (first, last) = (events.front()?.position, events.back()?.position);
        if after + 1 < first || last < head {
            return None;
        }
        let skip = usize::try_from(after + 1 - first).unwrap_or(usize::MAX).min(events.len());
        Some(events.iter().skip(skip).take(limit).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64) -> StoredEvent {
        StoredEvent {
            position,
            stream_id: format!("member-{position}"),
            stream_version: 1,
            event_type: "PointsEarned".into(),
            schema_version: 1,
            data: serde_json::json!({"points": position}),
            metadata: serde_json::json!({}),
            recorded_at: "2026-11-29T12:00:00Z".into(),
        }
    }

    fn positions(events: Option<Vec<Arc<StoredEvent>>>) -> Option<Vec<i64>> {
        events.map(|events| events.iter().map(|e| e.position).collect())
    }

    #[test]
    fn answers_only_what_it_holds_in_full() {
        let tail = RecentEvents::default();
        assert_eq!(positions(tail.after(0, 10, 0)), None, "an empty tail knows nothing");
        tail.push((5..=9).map(event));
        assert_eq!(positions(tail.after(4, 10, 9)), Some(vec![5, 6, 7, 8, 9]));
        assert_eq!(positions(tail.after(6, 2, 9)), Some(vec![7, 8]));
        assert_eq!(positions(tail.after(9, 10, 9)), Some(vec![]), "caught up");
        assert_eq!(positions(tail.after(3, 10, 9)), None, "position 4 is not held");
        assert_eq!(positions(tail.after(4, 10, 10)), None, "position 10 was committed but not pushed");
    }

    #[test]
    fn a_gap_starts_the_tail_over() {
        let tail = RecentEvents::default();
        tail.push((1..=3).map(event));
        tail.push((5..=6).map(event)); // 4 was appended by someone who did not push it
        assert_eq!(positions(tail.after(3, 10, 6)), None, "4 must come from the database");
        assert_eq!(positions(tail.after(4, 10, 6)), Some(vec![5, 6]));
    }

    #[test]
    fn keeps_only_the_newest() {
        let tail = RecentEvents::default();
        let newest = RECENT_EVENTS as i64 + 100;
        tail.push((1..=newest).map(event));
        assert_eq!(positions(tail.after(0, 1, newest)), None);
        assert_eq!(positions(tail.after(newest - 1, 10, newest)), Some(vec![newest]));
    }
}
