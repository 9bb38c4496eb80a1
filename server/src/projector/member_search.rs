//! `member_search`: what staff search and filter members by (name, email, tier, status).
//!
//! Per batch: read the rows of the members the batch touches (one query), fold the events in
//! memory with the pure [`evolve`], write the changed rows back (one multi-row upsert).

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

pub const NAME: &str = "member_search";

pub struct MemberSearchProjection;

/// One member as staff search finds them.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchRow {
    pub member_id: String,
    pub name: String,
    pub email: String,
    pub tier: Tier,
    pub status: Status,
    pub points_balance: u64,
    pub lifetime_points: u64,
    pub member_since: String,
    /// The last event applied to the row: older events are ignored, so a replay changes nothing.
    pub position: i64,
}

impl From<&MembershipView> for SearchRow {
    /// The same row from a finished view (`tally rebuild`).
    fn from(view: &MembershipView) -> Self {
        SearchRow {
            member_id: view.member_id.clone(),
            name: view.name.clone(),
            email: view.email.clone(),
            tier: view.tier,
            status: view.status,
            points_balance: view.points_balance,
            lifetime_points: view.lifetime_points,
            member_since: view.member_since.clone(),
            position: view.position as i64,
        }
    }
}

#[async_trait]
impl Consumer for MemberSearchProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        _effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let mut ids: Vec<&str> = events.iter().filter_map(|e| e.stream_key(MemberAggregate::STREAM_PREFIX)).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.is_empty() {
            return Ok(());
        }
        let mut rows = load_many(conn, &ids).await?;
        let mut changed: Vec<String> = Vec::new();
        for event in events {
            let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            if rows.get(member_id).is_some_and(|row| row.position >= event.position) {
                continue; // applied before: a replay changes nothing
            }
            let current = rows.remove(member_id);
            let decoded: MemberEvent = event.decode().with_context(|| at(event))?;
            if let Some(row) = evolve(current, member_id, event.position, &decoded) {
                changed.push(member_id.to_string());
                rows.insert(member_id.to_string(), row);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        let changed: Vec<&SearchRow> = changed.iter().filter_map(|id| rows.get(id)).collect();
        save_many(conn, &changed).await
    }
}

fn at(event: &StoredEvent) -> String {
    format!("event {} ({}) at position {}", event.event_type, event.stream_id, event.position)
}

/// The row after one more event; `None` when the event cannot start a row (before enrolment).
pub fn evolve(row: Option<SearchRow>, member_id: &str, position: i64, event: &MemberEvent) -> Option<SearchRow> {
    let mut row = match (row, event) {
        (None, MemberEvent::MemberEnrolled { name, email, enrolled_at, .. }) => SearchRow {
            member_id: member_id.to_string(),
            name: name.clone(),
            email: email.clone(),
            tier: Tier::Bronze,
            status: Status::Active,
            points_balance: 0,
            lifetime_points: 0,
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
        MemberEvent::PointsEarned { balance_after, lifetime_after, .. } => {
            row.points_balance = *balance_after;
            row.lifetime_points = *lifetime_after;
        }
        MemberEvent::TierChanged { to, .. } => row.tier = *to,
        MemberEvent::PointsRedeemed { balance_after, .. } => row.points_balance = *balance_after,
        MemberEvent::AccountSuspended { .. } => row.status = Status::Suspended,
        MemberEvent::AccountReactivated {} => row.status = Status::Active,
    }
    row.position = position;
    Some(row)
}

const COLUMNS: &str = "member_id, name, email, tier, status, points_balance, lifetime_points, member_since, position";

pub async fn load_many(conn: &mut AnyConnection, ids: &[&str]) -> anyhow::Result<HashMap<String, SearchRow>> {
    let mut out = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(store::MAX_PARAMS) {
        let sql =
            format!("SELECT {COLUMNS} FROM member_search WHERE member_id IN ({})", store::placeholders(1, chunk.len()));
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        for r in query.fetch_all(&mut *conn).await? {
            let tier: String = r.try_get("tier")?;
            let status: String = r.try_get("status")?;
            let row = SearchRow {
                member_id: r.try_get("member_id")?,
                name: r.try_get("name")?,
                email: r.try_get("email")?,
                tier: Tier::parse(&tier).with_context(|| format!("unknown tier {tier:?} in member_search"))?,
                status: Status::parse(&status)
                    .with_context(|| format!("unknown status {status:?} in member_search"))?,
                points_balance: r.try_get::<i64, _>("points_balance")?.max(0) as u64,
                lifetime_points: r.try_get::<i64, _>("lifetime_points")?.max(0) as u64,
                member_since: r.try_get("member_since")?,
                position: r.try_get("position")?,
            };
            out.insert(row.member_id.clone(), row);
        }
    }
    Ok(out)
}

/// Insert or update the rows (never over a row that has seen a later event).
pub async fn save_many(conn: &mut AnyConnection, rows: &[&SearchRow]) -> anyhow::Result<()> {
    for chunk in rows.chunks(store::MAX_PARAMS / 11) {
        let values = (0..chunk.len()).map(|i| format!("({})", store::placeholders(i * 11 + 1, 11))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO member_search ({COLUMNS}, search_text, sort_key) VALUES {} \
             ON CONFLICT (member_id) DO UPDATE SET name = excluded.name, email = excluded.email, \
             tier = excluded.tier, status = excluded.status, points_balance = excluded.points_balance, \
             lifetime_points = excluded.lifetime_points, member_since = excluded.member_since, \
             position = excluded.position, search_text = excluded.search_text, sort_key = excluded.sort_key \
             WHERE member_search.position < excluded.position",
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
                .bind(row.points_balance as i64)
                .bind(row.lifetime_points as i64)
                .bind(&row.member_since)
                .bind(row.position)
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
