//! `membership_view`: one row per member, the whole portal page as one JSON document, served as
//! stored by `GET /api/members/{id}`, the portal page and the `member:<id>` live topic.

use super::parking::EventFailed;
use super::row_cache::RowCache;
use super::{Consumer, Effects, WriteBehind, WriteScope};
use crate::store::{self, StoredEvent};
pub use crate::view_cache::ViewRow;
use app::domain::member::{MemberAggregate, MemberEvent, Status};
use app::domain::tier::Tier;
use app::domain::Aggregate;
use app::views::{Activity, MembershipView, NextTier, RECENT_ACTIVITY};
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub const NAME: &str = "membership_view";

/// The version of what `evolve` writes. Raise it when a change to the code changes the views it
/// builds from the same events: the next start builds the table again from the log, online, while
/// the current one serves (see `blue_green`).
pub const VERSION: i64 = 1;

/// The table as the migrations leave it, under another name (a blue/green build's shadow):
/// `tag` keeps its constraint's name apart from the current table's.
pub fn create_table(table: &str, tag: &str) -> Vec<String> {
    vec![format!(
        "CREATE TABLE {table} (member_id TEXT NOT NULL, version BIGINT NOT NULL, position BIGINT NOT NULL, \
         view TEXT NOT NULL, CONSTRAINT {NAME}_pk_{tag} PRIMARY KEY (member_id))"
    )]
}

pub struct MembershipViewProjection {
    /// The views as last applied, so a batch reads only members it has not seen lately.
    kept: RowCache<MembershipView>,
    /// Views applied but not in the table yet. The runner has them written with the checkpoint:
    /// in the same transaction on PostgreSQL, behind on SQLite (see `Runner`).
    unwritten: Mutex<Unwritten>,
}

/// Views not written yet, and the order in which they must be.
#[derive(Default)]
struct Unwritten {
    rows: HashMap<String, ViewRow>,
    /// Each unwritten member once, in the order of its oldest unwritten change: when it was
    /// applied and that event's position. Positions only grow along it, so its front bounds the
    /// checkpoint: every event before it is in the table.
    queue: VecDeque<(Instant, i64, String)>,
}

impl Unwritten {
    /// Views a batch changed, `first` naming the position of each one's first change in it.
    fn add(&mut self, views: &[ViewRow], first: &HashMap<&str, i64>, now: Instant) {
        for row in views {
            if !self.rows.contains_key(&row.member_id) {
                let position = first.get(row.member_id.as_str()).copied().unwrap_or(row.position);
                self.queue.push_back((now, position, row.member_id.clone()));
            }
            // Changed again while unwritten: its place in the queue stays that of its oldest change.
            self.rows.insert(row.member_id.clone(), row.clone());
        }
    }

    /// Take out the views `scope` asks for, in key order, and the position of the oldest change
    /// still unwritten.
    fn take(&mut self, scope: WriteScope) -> (Vec<ViewRow>, Option<i64>) {
        let mut rows = Vec::new();
        while let Some((at, _, _)) = self.queue.front() {
            let take = match scope {
                WriteScope::All => true,
                WriteScope::Due { before, at_least } => *at <= before || rows.len() < at_least,
            };
            let Some((_, _, id)) = take.then(|| self.queue.pop_front()).flatten() else { break };
            rows.extend(self.rows.remove(&id));
        }
        rows.sort_unstable_by(|a, b| a.member_id.cmp(&b.member_id));
        (rows, self.queue.front().map(|(_, position, _)| *position))
    }
}

/// Views kept in memory (about 2.5 KiB each there, so up to ~50 MiB).
const KEPT_VIEWS: usize = 20_000;

impl Default for MembershipViewProjection {
    fn default() -> Self {
        MembershipViewProjection { kept: RowCache::new(KEPT_VIEWS), unwritten: Mutex::new(Unwritten::default()) }
    }
}

impl MembershipViewProjection {
    fn unwritten(&self) -> std::sync::MutexGuard<'_, Unwritten> {
        // A panic while holding the lock leaves whole rows: still usable.
        self.unwritten.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait]
impl WriteBehind for MembershipViewProjection {
    fn unwritten_rows(&self) -> usize {
        self.unwritten().rows.len()
    }

    fn oldest_unwritten(&self) -> Option<Instant> {
        self.unwritten().queue.front().map(|(at, _, _)| *at)
    }

    /// The views whose oldest change is in `scope`, in key order, one multi-row upsert per 64.
    async fn write(&self, conn: &mut AnyConnection, scope: WriteScope) -> anyhow::Result<Option<i64>> {
        // Taken out before the commit: if it fails, the runner forgets all and applies again.
        let (rows, rest) = self.unwritten().take(scope);
        save_many(conn, &rows).await?;
        Ok(rest)
    }
}

#[async_trait]
impl Consumer for MembershipViewProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forget(&self) {
        self.kept.forget();
        // The runner goes back to the stored checkpoint and applies these again.
        *self.unwritten() = Unwritten::default();
    }

    fn write_behind(&self) -> Option<&dyn WriteBehind> {
        Some(self)
    }

    /// Per batch: read the views of the members it touches and does not keep (one query), fold
    /// in memory, hand the changed views to the live feed and keep them to be written (`write`).
    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
        effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let ids = super::member_ids(events);
        if ids.is_empty() {
            return Ok(());
        }
        let (mut views, missing) = self.kept.take(&ids);
        views.extend(load_many(conn, &missing).await?);
        let mut changed: Vec<String> = Vec::new();
        // Per member, the first event of this batch that changed its view.
        let mut first: HashMap<&str, i64> = HashMap::new();
        for event in events {
            let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            if views.get(member_id).is_some_and(|v| v.position >= event.position as u64) {
                continue; // applied before: a replay changes nothing
            }
            let decoded: MemberEvent = event.decode().map_err(|err| EventFailed::error(event, err))?;
            if let Some(view) = evolve(views.remove(member_id), event, &decoded) {
                first.entry(member_id).or_insert(event.position);
                changed.push(member_id.to_string());
                views.insert(member_id.to_string(), view);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        // Encoded only when needed (a read, a socket, the write behind): most are not.
        effects.views = changed.iter().filter_map(|id| views.get(id)).map(|view| ViewRow::new(view.clone())).collect();
        let mut unwritten = self.unwritten();
        unwritten.add(&effects.views, &first, Instant::now());
        // The table does not hold the unwritten views yet: they must stay in memory.
        self.kept.keep_pinned(views, |id| unwritten.rows.contains_key(id));
        Ok(())
    }
}

pub async fn load_many(conn: &mut AnyConnection, ids: &[&str]) -> anyhow::Result<HashMap<String, MembershipView>> {
    let mut out = HashMap::with_capacity(ids.len());
    let sql = "SELECT member_id, view FROM membership_view WHERE member_id IN ({})";
    for row in store::select_in(conn, sql, &[], ids).await? {
        let view: MembershipView = serde_json::from_str(&row.try_get::<String, _>("view")?)?;
        out.insert(row.try_get("member_id")?, view);
    }
    Ok(out)
}

/// Insert or update the views (never over a row that has seen a later event).
pub async fn save_many(conn: &mut AnyConnection, views: &[ViewRow]) -> anyhow::Result<()> {
    save_into(conn, NAME, views).await
}

/// [`save_many`] into `table`: this one, or a blue/green build's shadow of it.
pub async fn save_into(conn: &mut AnyConnection, table: &str, views: &[ViewRow]) -> anyhow::Result<()> {
    for chunk in views.chunks(store::MAX_PARAMS / 4) {
        let values = (0..chunk.len()).map(|i| format!("({})", store::params(conn, i * 4 + 1, 4))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} (member_id, version, position, view) VALUES {} \
             ON CONFLICT (member_id) DO UPDATE SET version = excluded.version, position = excluded.position, \
             view = excluded.view WHERE {table}.position < excluded.position",
            values.join(", ")
        );
        let texts = chunk.iter().map(|view| view.text.json()).collect::<Result<Vec<_>, _>>()?;
        let mut query = sqlx::query(&sql);
        for (view, json) in chunk.iter().zip(&texts) {
            query = query.bind(&view.member_id).bind(view.version).bind(view.position).bind(&**json);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// The view after one more event. Copies what the event carries; computes nothing the domain
/// decides. `None` when the event cannot start a view (anything before `MemberEnrolled`).
pub fn evolve(view: Option<MembershipView>, stored: &StoredEvent, event: &MemberEvent) -> Option<MembershipView> {
    let mut view = match (view, event) {
        (None, MemberEvent::MemberEnrolled { member_id, name, email, enrolled_at }) => MembershipView {
            member_id: member_id.clone(),
            name: name.clone(),
            email: email.clone(),
            status: Status::Active,
            tier: Tier::Bronze,
            points_balance: 0,
            lifetime_points: 0,
            next_tier: NextTier::for_lifetime(0),
            recent_activity: Vec::new(),
            member_since: enrolled_at.clone(),
            version: 0,
            position: 0,
        },
        (None, _) => return None,
        (Some(view), _) => view,
    };
    let (kind, points, description) = match event {
        MemberEvent::MemberEnrolled { .. } => ("enrolled", 0, "Joined the loyalty programme".to_string()),
        MemberEvent::ProfileUpdated { name, email } => {
            if let Some(name) = name {
                view.name = name.clone();
            }
            if let Some(email) = email {
                view.email = email.clone();
            }
            let what = match (name, email) {
                (Some(_), Some(_)) => "name and email",
                (Some(_), None) => "name",
                _ => "email",
            };
            ("profile_updated", 0, format!("Updated {what}"))
        }
        MemberEvent::PointsEarned { points, reason, transaction_id, balance_after, lifetime_after, .. } => {
            view.points_balance = *balance_after;
            view.lifetime_points = *lifetime_after;
            view.next_tier = if view.tier == Tier::Platinum { None } else { NextTier::for_lifetime(*lifetime_after) };
            let description = match transaction_id {
                Some(id) => format!("Purchase {id}"),
                None => reason.clone(),
            };
            ("earned", *points, description)
        }
        MemberEvent::TierChanged { to, .. } => {
            view.tier = *to;
            view.next_tier = NextTier::for_lifetime(view.lifetime_points);
            ("tier_changed", 0, format!("Reached {} tier", to.label()))
        }
        MemberEvent::PointsRedeemed { points, reward, balance_after } => {
            view.points_balance = *balance_after;
            ("redeemed", *points, reward.clone())
        }
        MemberEvent::AccountSuspended { reason } => {
            view.status = Status::Suspended;
            ("suspended", 0, format!("Account suspended: {reason}"))
        }
        MemberEvent::AccountReactivated {} => {
            view.status = Status::Active;
            ("reactivated", 0, "Account reactivated".to_string())
        }
    };
    view.recent_activity.insert(
        0,
        Activity {
            position: stored.position as u64,
            kind: kind.to_string(),
            points,
            description,
            at: stored.recorded_at.clone(),
        },
    );
    view.recent_activity.truncate(RECENT_ACTIVITY);
    view.version = stored.stream_version as u64;
    view.position = stored.position as u64;
    Some(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view_cache::ViewText;
    use std::time::Duration;

    fn row(member_id: &str, position: i64) -> ViewRow {
        let json = format!("{{\"p\":{position}}}").into();
        ViewRow { member_id: member_id.into(), version: 1, position, text: Arc::new(ViewText::ready(json)) }
    }

    fn ids(rows: &[ViewRow]) -> Vec<(&str, i64)> {
        rows.iter().map(|r| (r.member_id.as_str(), r.position)).collect()
    }

    #[test]
    fn due_views_are_taken_in_key_order_and_the_rest_bounds_the_checkpoint() {
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(500), t0 + Duration::from_millis(1000));
        let mut unwritten = Unwritten::default();
        unwritten.add(&[row("b", 11), row("a", 12)], &HashMap::from([("b", 10), ("a", 12)]), t0);
        // `b` changes again later: written once, with its newest view, when its first change is due.
        unwritten.add(&[row("c", 20), row("b", 21)], &HashMap::from([("c", 20), ("b", 21)]), t1);
        unwritten.add(&[row("d", 30)], &HashMap::from([("d", 30)]), t2);

        let (rows, rest) = unwritten.take(WriteScope::Due { before: t0, at_least: 0 });
        assert_eq!(ids(&rows), [("a", 12), ("b", 21)]);
        assert_eq!(rest, Some(20), "the checkpoint may move to just before c's change");

        let (rows, rest) = unwritten.take(WriteScope::Due { before: t0, at_least: 1 });
        assert_eq!(ids(&rows), [("c", 20)], "the oldest, however young, when memory asks");
        assert_eq!(rest, Some(30));

        let (rows, rest) = unwritten.take(WriteScope::All);
        assert_eq!(ids(&rows), [("d", 30)]);
        assert_eq!(rest, None, "nothing unwritten: the checkpoint may reach the batch's end");
        assert!(unwritten.rows.is_empty());
    }
}
