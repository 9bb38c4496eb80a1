//! `membership_view`: one row per member, the whole portal page as one JSON document, served as
//! stored by `GET /api/members/{id}`, the portal page and the `member:<id>` live topic.

use super::{Consumer, Effects};
use crate::store::StoredEvent;
use app::domain::member::{MemberAggregate, MemberEvent, Status};
use app::domain::tier::Tier;
use app::domain::Aggregate;
use app::views::{Activity, MembershipView, NextTier, RECENT_ACTIVITY};
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

pub const NAME: &str = "membership_view";

pub struct MembershipViewProjection;

#[async_trait]
impl Consumer for MembershipViewProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    fn feeds_views(&self) -> bool {
        true
    }

    async fn handle(&self, conn: &mut AnyConnection, event: &StoredEvent, effects: &mut Effects) -> anyhow::Result<()> {
        let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else {
            return Ok(());
        };
        let current = load(conn, member_id).await?;
        if current.as_ref().is_some_and(|v| v.position >= event.position as u64) {
            return Ok(()); // applied before: a replay changes nothing
        }
        let domain_event: MemberEvent = event.decode()?;
        let Some(view) = evolve(current, event, &domain_event) else {
            return Ok(());
        };
        save(conn, &view).await?;
        effects.views.push(view);
        Ok(())
    }
}

pub async fn load(conn: &mut AnyConnection, member_id: &str) -> anyhow::Result<Option<MembershipView>> {
    let row = sqlx::query("SELECT view FROM membership_view WHERE member_id = $1")
        .bind(member_id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(row) => Ok(Some(serde_json::from_str(&row.try_get::<String, _>("view")?)?)),
        None => Ok(None),
    }
}

pub async fn save(conn: &mut AnyConnection, view: &MembershipView) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO membership_view (member_id, version, position, view) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (member_id) DO UPDATE SET version = excluded.version, position = excluded.position, view = excluded.view \
         WHERE membership_view.position < excluded.position",
    )
    .bind(&view.member_id)
    .bind(view.version as i64)
    .bind(view.position as i64)
    .bind(serde_json::to_string(view)?)
    .execute(&mut *conn)
    .await?;
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
