//! `member_search`: what staff search and filter members by (name, email, tier, status).
//!
//! The row changes only with those columns: earning and redeeming points (most events) do not
//! touch it, and a page of results takes balances from `membership_view` (`queries::search_members`).
//! Per batch: read the rows of the members whose search columns the batch changes and that are
//! not kept in memory (one query), fold the events in memory with the pure [`evolve`], write the
//! changed rows back (one multi-row upsert).

use super::parking::EventFailed;
use super::row_cache::RowCache;
use super::{Consumer, Effects};
use crate::store::{self, StoredEvent};
use anyhow::Context;
use app::domain::member::{MemberAggregate, MemberEvent, Status};
use app::domain::tier::Tier;
use app::domain::Aggregate;
use app::views::MembershipView;
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;
use std::sync::Arc;

pub const NAME: &str = "member_search";

/// The version of what `evolve` writes (see `membership_view::VERSION`).
pub const VERSION: i64 = 1;

/// The table and its indexes as the migrations leave them, under another name (a blue/green
/// build's shadow): `tag` keeps the index and constraint names apart from the current table's.
pub fn create_table(table: &str, tag: &str) -> Vec<String> {
    let mut ddl = vec![format!(
        "CREATE TABLE {table} (member_id TEXT NOT NULL, name TEXT NOT NULL, email TEXT NOT NULL, \
         search_text TEXT NOT NULL, sort_key TEXT NOT NULL, tier TEXT NOT NULL, status TEXT NOT NULL, \
         member_since TEXT NOT NULL, position BIGINT NOT NULL, CONSTRAINT {NAME}_pk_{tag} PRIMARY KEY (member_id))"
    )];
    for (index, columns) in [
        ("sort", "sort_key, member_id"),
        ("tier", "tier, sort_key, member_id"),
        ("status", "status, sort_key, member_id"),
    ] {
        ddl.push(format!("CREATE INDEX {NAME}_{index}_{tag} ON {table} ({columns})"));
    }
    ddl
}

pub struct MemberSearchProjection {
    /// The rows as last written, so a batch reads only members it has not seen lately.
    kept: RowCache<SearchRow>,
}

/// One member's row: the searched columns, and the last event that changed them.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRow {
    pub member_id: String,
    pub name: String,
    pub email: String,
    pub tier: Tier,
    pub status: Status,
    pub member_since: String,
    pub position: u64,
}

/// Rows kept in memory (a few hundred bytes each).
const KEPT_ROWS: usize = 100_000;

impl Default for MemberSearchProjection {
    fn default() -> Self {
        MemberSearchProjection { kept: RowCache::new(KEPT_ROWS) }
    }
}

/// The row from a finished view and the position of the member's last event that changes the
/// row (`tally rebuild`).
pub fn from_view(view: &MembershipView, position: u64) -> SearchRow {
    SearchRow {
        member_id: view.member_id.clone(),
        name: view.name.clone(),
        email: view.email.clone(),
        tier: view.tier,
        status: view.status,
        member_since: view.member_since.clone(),
        position,
    }
}

/// False for events that change no column of the row (points earned or redeemed).
pub fn changes_row(event_type: &str) -> bool {
    !matches!(event_type, "PointsEarned" | "PointsRedeemed")
}

#[async_trait]
impl Consumer for MemberSearchProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forget(&self) {
        self.kept.forget();
    }

    fn handles(&self, event_type: &str) -> bool {
        changes_row(event_type)
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
        _effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let events: Vec<&Arc<StoredEvent>> = events.iter().filter(|e| changes_row(&e.event_type)).collect();
        let ids = super::member_ids(events.iter().copied());
        if ids.is_empty() {
            return Ok(());
        }
        let (mut rows, missing) = self.kept.take(&ids);
        rows.extend(load_many(conn, &missing).await?);
        let mut changed: Vec<String> = Vec::new();
        for event in events {
            let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            if rows.get(member_id).is_some_and(|row| row.position >= event.position as u64) {
                continue; // applied before: a replay changes nothing
            }
            let current = rows.remove(member_id);
            let decoded: MemberEvent = event.decode().map_err(|err| EventFailed::error(event, err))?;
            if let Some(row) = evolve(current, member_id, event.position as u64, &decoded) {
                changed.push(member_id.to_string());
                rows.insert(member_id.to_string(), row);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        let changed: Vec<&SearchRow> = changed.iter().filter_map(|id| rows.get(id)).collect();
        save_many(conn, &changed).await?;
        self.kept.keep(rows);
        Ok(())
    }
}

/// The row after one more event; `None` when the event cannot start a row (before enrolment).
pub fn evolve(row: Option<SearchRow>, member_id: &str, position: u64, event: &MemberEvent) -> Option<SearchRow> {
    let mut row = match (row, event) {
        (None, MemberEvent::MemberEnrolled { name, email, enrolled_at, .. }) => SearchRow {
            member_id: member_id.to_string(),
            name: name.clone(),
            email: email.clone(),
            tier: Tier::Bronze,
            status: Status::Active,
            member_since: enrolled_at.clone(),
            position,
        },
        (None, _) => return None,
        (Some(row), _) => row,
    };
    match event {
        MemberEvent::MemberEnrolled { .. } => {}
        MemberEvent::ProfileUpdated { name, email } => {
            if let Some(name) = name {
                row.name = name.clone();
            }
            if let Some(email) = email {
                row.email = email.clone();
            }
        }
        // Not searched: the figures are read from the view (`changes_row` keeps these out).
        MemberEvent::PointsEarned { .. } | MemberEvent::PointsRedeemed { .. } => return Some(row),
        MemberEvent::TierChanged { to, .. } => row.tier = *to,
        MemberEvent::AccountSuspended { .. } => row.status = Status::Suspended,
        MemberEvent::AccountReactivated {} => row.status = Status::Active,
    }
    row.position = position;
    Some(row)
}

const COLUMNS: &str = "member_id, name, email, tier, status, member_since, position";

pub async fn load_many(conn: &mut AnyConnection, ids: &[&str]) -> anyhow::Result<HashMap<String, SearchRow>> {
    let mut out = HashMap::with_capacity(ids.len());
    let sql = format!("SELECT {COLUMNS} FROM member_search WHERE member_id IN ({{}})");
    for r in store::select_in(conn, &sql, &[], ids).await? {
        let tier: String = r.try_get("tier")?;
        let status: String = r.try_get("status")?;
        let row = SearchRow {
            member_id: r.try_get("member_id")?,
            name: r.try_get("name")?,
            email: r.try_get("email")?,
            tier: Tier::parse(&tier).with_context(|| format!("unknown tier {tier:?} in member_search"))?,
            status: Status::parse(&status).with_context(|| format!("unknown status {status:?} in member_search"))?,
            member_since: r.try_get("member_since")?,
            position: r.try_get::<i64, _>("position")?.max(0) as u64,
        };
        out.insert(row.member_id.clone(), row);
    }
    Ok(out)
}

/// Insert or update the rows (never over a row that has seen a later event).
pub async fn save_many(conn: &mut AnyConnection, rows: &[&SearchRow]) -> anyhow::Result<()> {
    save_into(conn, NAME, rows).await
}

/// [`save_many`] into `table`: this one, or a blue/green build's shadow of it.
pub async fn save_into(conn: &mut AnyConnection, table: &str, rows: &[&SearchRow]) -> anyhow::Result<()> {
    for chunk in rows.chunks(store::MAX_PARAMS / 9) {
        let values = (0..chunk.len()).map(|i| format!("({})", store::params(conn, i * 9 + 1, 9))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO {table} ({COLUMNS}, search_text, sort_key) VALUES {} \
             ON CONFLICT (member_id) DO UPDATE SET name = excluded.name, email = excluded.email, \
             tier = excluded.tier, status = excluded.status, member_since = excluded.member_since, \
             position = excluded.position, search_text = excluded.search_text, sort_key = excluded.sort_key \
             WHERE {table}.position < excluded.position",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = query
                .bind(&row.member_id)
                .bind(&row.name)
                .bind(&row.email)
                .bind(row.tier.as_str())
                .bind(row.status.as_str())
                .bind(&row.member_since)
                .bind(row.position as i64)
                .bind(search_text(&row.name, &row.email))
                .bind(row.name.to_lowercase());
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// Lower-cased name and email: `q` matches either (SQLite's LOWER is ASCII-only, so do it here).
fn search_text(name: &str, email: &str) -> String {
    format!("{} {}", name.to_lowercase(), email.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_point_events_leave_the_search_row_alone() {
        let earned = MemberEvent::PointsEarned {
            points: 10,
            reason: "r".into(),
            transaction_id: None,
            balance_after: 10,
            lifetime_after: 10,
            source: app::domain::member::EarnSource::Staff,
        };
        let redeemed = MemberEvent::PointsRedeemed { points: 5, reward: "x".into(), balance_after: 5 };
        let tier = MemberEvent::TierChanged { from: Tier::Bronze, to: Tier::Silver };
        let suspended = MemberEvent::AccountSuspended { reason: "r".into() };
        // The names come from the domain, so a renamed event cannot slip past the filter.
        for (event, changes) in [(&earned, false), (&redeemed, false), (&tier, true), (&suspended, true)] {
            assert_eq!(changes_row(MemberAggregate::event_type(event).0), changes, "{event:?}");
        }
        let enrolled = MemberEvent::MemberEnrolled {
            member_id: "m".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            enrolled_at: "2026-11-29T00:00:00Z".into(),
        };
        let row = evolve(None, "m", 1, &enrolled).expect("enrolled");
        let row = evolve(Some(row), "m", 2, &tier).expect("still there");
        assert_eq!((row.tier, row.position), (Tier::Silver, 2));
    }
}
