//! `member_search`: what staff search and filter members by (name, email, tier, status).

use super::{Consumer, Effects};
use crate::store::StoredEvent;
use app::domain::member::{MemberAggregate, MemberEvent};
use app::domain::Aggregate;
use async_trait::async_trait;
use sqlx::{AnyConnection, Row};

pub const NAME: &str = "member_search";

pub struct MemberSearchProjection;

#[async_trait]
impl Consumer for MemberSearchProjection {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn handle(
        &self,
        conn: &mut AnyConnection,
        event: &StoredEvent,
        _effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let Some(member_id) = event.stream_key(MemberAggregate::STREAM_PREFIX) else {
            return Ok(());
        };
        let position = event.position;
        // Every update is guarded by the row's position, so a replayed event changes nothing.
        let update =
            |set: &str| format!("UPDATE member_search SET {set}, position = $2 WHERE member_id = $1 AND position < $2");
        match event.decode::<MemberEvent>()? {
            MemberEvent::MemberEnrolled { name, email, enrolled_at, .. } => {
                sqlx::query(
                    "INSERT INTO member_search (member_id, name, email, search_text, sort_key, tier, status, \
                     points_balance, lifetime_points, member_since, position) \
                     VALUES ($1, $2, $3, $4, $5, 'bronze', 'active', 0, 0, $6, $7) ON CONFLICT (member_id) DO NOTHING",
                )
                .bind(member_id)
                .bind(&name)
                .bind(&email)
                .bind(search_text(&name, &email))
                .bind(name.to_lowercase())
                .bind(enrolled_at)
                .bind(position)
                .execute(&mut *conn)
                .await?;
            }
            MemberEvent::ProfileUpdated { name, email } => {
                let row = sqlx::query("SELECT name, email FROM member_search WHERE member_id = $1 AND position < $2")
                    .bind(member_id)
                    .bind(position)
                    .fetch_optional(&mut *conn)
                    .await?;
                if let Some(row) = row {
                    let name = name.map_or_else(|| row.try_get::<String, _>("name"), Ok)?;
                    let email = email.map_or_else(|| row.try_get::<String, _>("email"), Ok)?;
                    sqlx::query(&update("name = $3, email = $4, search_text = $5, sort_key = $6"))
                        .bind(member_id)
                        .bind(position)
                        .bind(&name)
                        .bind(&email)
                        .bind(search_text(&name, &email))
                        .bind(name.to_lowercase())
                        .execute(&mut *conn)
                        .await?;
                }
            }
            MemberEvent::PointsEarned { balance_after, lifetime_after, .. } => {
                sqlx::query(&update("points_balance = $3, lifetime_points = $4"))
                    .bind(member_id)
                    .bind(position)
                    .bind(balance_after as i64)
                    .bind(lifetime_after as i64)
                    .execute(&mut *conn)
                    .await?;
            }
            MemberEvent::TierChanged { to, .. } => {
                sqlx::query(&update("tier = $3"))
                    .bind(member_id)
                    .bind(position)
                    .bind(to.as_str())
                    .execute(&mut *conn)
                    .await?;
            }
            MemberEvent::PointsRedeemed { balance_after, .. } => {
                sqlx::query(&update("points_balance = $3"))
                    .bind(member_id)
                    .bind(position)
                    .bind(balance_after as i64)
                    .execute(&mut *conn)
                    .await?;
            }
            MemberEvent::AccountSuspended { .. } => {
                sqlx::query(&update("status = 'suspended'")).bind(member_id).bind(position).execute(&mut *conn).await?;
            }
            MemberEvent::AccountReactivated {} => {
                sqlx::query(&update("status = 'active'")).bind(member_id).bind(position).execute(&mut *conn).await?;
            }
        }
        Ok(())
    }
}

/// Lower-cased name and email: `q` matches either (SQLite's LOWER is ASCII-only, so do it here).
fn search_text(name: &str, email: &str) -> String {
    format!("{} {}", name.to_lowercase(), email.to_lowercase())
}

/// A whole row from a finished view (used by `tally rebuild`): the same columns the incremental
/// updates above maintain.
pub async fn insert_row(conn: &mut AnyConnection, view: &app::views::MembershipView) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO member_search (member_id, name, email, search_text, sort_key, tier, status, \
         points_balance, lifetime_points, member_since, position) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(&view.member_id)
    .bind(&view.name)
    .bind(&view.email)
    .bind(search_text(&view.name, &view.email))
    .bind(view.name.to_lowercase())
    .bind(view.tier.as_str())
    .bind(view.status.as_str())
    .bind(view.points_balance as i64)
    .bind(view.lifetime_points as i64)
    .bind(&view.member_since)
    .bind(view.position as i64)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
