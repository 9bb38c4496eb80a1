//! `member_search`: what staff search and filter members by (name, email, tier, status).
//!
//! Per batch: read the rows of the members the batch touches and does not keep in memory (one
//! query), fold the events in memory with the pure [`evolve`], write the changed rows back (one
//! multi-row upsert; a narrower one for rows whose searched columns did not change).

use super::row_cache::RowCache;
use super::{Consumer, Effects};
use crate::store::{self, StoredEvent};
use anyhow::Context;
use app::domain::member::{MemberAggregate, MemberEvent, Status};
use app::domain::tier::Tier;
use app::domain::Aggregate;
use app::views::{MemberSummary, MembershipView};
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use std::collections::{HashMap, HashSet};

pub const NAME: &str = "member_search";

pub struct MemberSearchProjection {
    /// The rows as last written, so a batch reads only members it has not seen lately.
    kept: RowCache<MemberSummary>,
}

/// Rows kept in memory (a few hundred bytes each).
const KEPT_ROWS: usize = 100_000;

impl Default for MemberSearchProjection {
    fn default() -> Self {
        MemberSearchProjection { kept: RowCache::new(KEPT_ROWS) }
    }
}

/// The row from a finished view (`tally rebuild`).
pub fn from_view(view: &MembershipView) -> MemberSummary {
    MemberSummary {
        member_id: view.member_id.clone(),
        name: view.name.clone(),
        email: view.email.clone(),
        tier: view.tier,
        status: view.status,
        points_balance: view.points_balance,
        lifetime_points: view.lifetime_points,
        member_since: view.member_since.clone(),
        position: view.position,
    }
}

#[async_trait]
impl Consumer for MemberSearchProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn forget(&self) {
        self.kept.forget();
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[StoredEvent],
        _effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let ids = super::member_ids(events);
        if ids.is_empty() {
            return Ok(());
        }
        let (mut rows, missing) = self.kept.take(&ids);
        rows.extend(load_many(conn, &missing).await?);
        let mut changed: Vec<String> = Vec::new();
        // Members with an event that changes more than the figures (see `save_figures`).
        let mut reindexed: HashSet<&str> = HashSet::new();
        for event in events {
            let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            if rows.get(member_id).is_some_and(|row| row.position >= event.position as u64) {
                continue; // applied before: a replay changes nothing
            }
            let current = rows.remove(member_id);
            let decoded: MemberEvent = event.decode().with_context(|| at(event))?;
            if let Some(row) = evolve(current, member_id, event.position as u64, &decoded) {
                changed.push(member_id.to_string());
                if !only_figures(&decoded) {
                    reindexed.insert(member_id);
                }
                rows.insert(member_id.to_string(), row);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        let (all, figures): (Vec<&MemberSummary>, Vec<&MemberSummary>) =
            changed.iter().filter_map(|id| rows.get(id)).partition(|row| reindexed.contains(row.member_id.as_str()));
        save_many(conn, &all).await?;
        save_figures(conn, &figures).await?;
        self.kept.keep(rows);
        Ok(())
    }
}

/// True for events that change only a row's figures (balance, lifetime points), none of the
/// columns searched or indexed (name, email, tier, status). Enrolment is not one of them, so a
/// new row always gets the full upsert.
fn only_figures(event: &MemberEvent) -> bool {
    matches!(event, MemberEvent::PointsEarned { .. } | MemberEvent::PointsRedeemed { .. })
}

fn at(event: &StoredEvent) -> String {
    format!("event {} ({}) at position {}", event.event_type, event.stream_id, event.position)
}

/// The row after one more event; `None` when the event cannot start a row (before enrolment).
pub fn evolve(
    row: Option<MemberSummary>,
    member_id: &str,
    position: u64,
    event: &MemberEvent,
) -> Option<MemberSummary> {
    let mut row = match (row, event) {
        (None, MemberEvent::MemberEnrolled { name, email, enrolled_at, .. }) => MemberSummary {
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

pub async fn load_many(conn: &mut AnyConnection, ids: &[&str]) -> anyhow::Result<HashMap<String, MemberSummary>> {
    let mut out = HashMap::with_capacity(ids.len());
    let sql = format!("SELECT {COLUMNS} FROM member_search WHERE member_id IN ({{}})");
    for r in store::select_in(conn, &sql, &[], ids).await? {
        let tier: String = r.try_get("tier")?;
        let status: String = r.try_get("status")?;
        let row = MemberSummary {
            member_id: r.try_get("member_id")?,
            name: r.try_get("name")?,
            email: r.try_get("email")?,
            tier: Tier::parse(&tier).with_context(|| format!("unknown tier {tier:?} in member_search"))?,
            status: Status::parse(&status).with_context(|| format!("unknown status {status:?} in member_search"))?,
            points_balance: r.try_get::<i64, _>("points_balance")?.max(0) as u64,
            lifetime_points: r.try_get::<i64, _>("lifetime_points")?.max(0) as u64,
            member_since: r.try_get("member_since")?,
            position: r.try_get::<i64, _>("position")?.max(0) as u64,
        };
        out.insert(row.member_id.clone(), row);
    }
    Ok(out)
}

/// Insert or update the rows (never over a row that has seen a later event).
pub async fn save_many(conn: &mut AnyConnection, rows: &[&MemberSummary]) -> anyhow::Result<()> {
    upsert(conn, rows, SET_ALL).await
}

/// Like [`save_many`], for existing rows whose batch only earned or redeemed points (most
/// batches): updating only unindexed columns spares the database rewriting each row's
/// entries in the three indexes.
async fn save_figures(conn: &mut AnyConnection, rows: &[&MemberSummary]) -> anyhow::Result<()> {
    upsert(conn, rows, SET_FIGURES).await
}

const SET_ALL: &str = "name = excluded.name, email = excluded.email, tier = excluded.tier, \
    status = excluded.status, points_balance = excluded.points_balance, \
    lifetime_points = excluded.lifetime_points, member_since = excluded.member_since, \
    position = excluded.position, search_text = excluded.search_text, sort_key = excluded.sort_key";
const SET_FIGURES: &str = "points_balance = excluded.points_balance, \
    lifetime_points = excluded.lifetime_points, position = excluded.position";

async fn upsert(conn: &mut AnyConnection, rows: &[&MemberSummary], set: &str) -> anyhow::Result<()> {
    for chunk in rows.chunks(store::MAX_PARAMS / 11) {
        let values = (0..chunk.len()).map(|i| format!("({})", store::params(conn, i * 11 + 1, 11))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO member_search ({COLUMNS}, search_text, sort_key) VALUES {} \
             ON CONFLICT (member_id) DO UPDATE SET {set} WHERE member_search.position < excluded.position",
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
