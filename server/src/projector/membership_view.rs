//! `membership_view`: one row per member, the whole portal page as one JSON document, served as
//! stored by `GET /api/members/{id}`, the portal page and the `member:<id>` live topic.

use super::row_cache::RowCache;
use super::{Consumer, Effects};
use crate::store::{self, StoredEvent};
use anyhow::Context;
use app::domain::member::{MemberAggregate, MemberEvent, Status};
use app::domain::tier::Tier;
use app::domain::Aggregate;
use app::views::{Activity, MembershipView, NextTier, RECENT_ACTIVITY};
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;
use std::sync::Arc;

pub const NAME: &str = "membership_view";

pub struct MembershipViewProjection {
    /// The views as last written, so a batch reads only members it has not seen lately.
    kept: RowCache<MembershipView>,
}

/// Views kept in memory (about 2.5 KiB each there, so up to ~50 MiB).
const KEPT_VIEWS: usize = 20_000;

impl Default for MembershipViewProjection {
    fn default() -> Self {
        MembershipViewProjection { kept: RowCache::new(KEPT_VIEWS) }
    }
}

#[async_trait]
impl Consumer for MembershipViewProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn feeds_views(&self) -> bool {
        true
    }

    fn forget(&self) {
        self.kept.forget();
    }

    /// Per batch: read the views of the members it touches and does not keep (one query), fold
    /// in memory, write the changed views back (one multi-row upsert), and hand them to the live
    /// feed.
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
        for event in events {
            let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else { continue };
            if views.get(member_id).is_some_and(|v| v.position >= event.position as u64) {
                continue; // applied before: a replay changes nothing
            }
            let decoded: MemberEvent = event.decode().with_context(|| {
                format!("event {} ({}) at position {}", event.event_type, event.stream_id, event.position)
            })?;
            if let Some(view) = evolve(views.remove(member_id), event, &decoded) {
                changed.push(member_id.to_string());
                views.insert(member_id.to_string(), view);
            }
        }
        changed.sort_unstable();
        changed.dedup();
        effects.views = changed.iter().filter_map(|id| views.get(id)).map(ViewRow::new).collect::<Result<_, _>>()?;
        save_many(conn, &effects.views).await?;
        self.kept.keep(views);
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

/// A view as stored: serialized once, for the table, the view cache and the sockets alike.
pub struct ViewRow {
    pub member_id: String,
    pub version: i64,
    pub position: i64,
    pub json: Arc<str>,
}

impl ViewRow {
    pub fn new(view: &MembershipView) -> Result<ViewRow, serde_json::Error> {
        Ok(ViewRow {
            member_id: view.member_id.clone(),
            version: view.version as i64,
            position: view.position as i64,
            json: serde_json::to_string(view)?.into(),
        })
    }
}

/// Insert or update the views (never over a row that has seen a later event).
pub async fn save_many(conn: &mut AnyConnection, views: &[ViewRow]) -> anyhow::Result<()> {
    for chunk in views.chunks(store::MAX_PARAMS / 4) {
        let values = (0..chunk.len()).map(|i| format!("({})", store::params(conn, i * 4 + 1, 4))).collect::<Vec<_>>();
        let sql = format!(
            "INSERT INTO membership_view (member_id, version, position, view) VALUES {} \
             ON CONFLICT (member_id) DO UPDATE SET version = excluded.version, position = excluded.position, \
             view = excluded.view WHERE membership_view.position < excluded.position",
            values.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for view in chunk {
            query = query.bind(&view.member_id).bind(view.version).bind(view.position).bind(&*view.json);
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
        MemberEvent::PointsEarned { points, reason, transaction_id, balance_after, lifetime_after } => {
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
