//! Server functions: the pages' way to the server. Reads go to the views only; writes go through
//! the same command path as the REST API. Each is a public endpoint, validated like any route,
//! and each asks first who is calling and whether they may (`access::authorize`, the same table
//! the REST routes use).
//!
//! The server's services arrive through the [`Portal`] and [`Identity`] traits in Leptos context
//! (the server implements them), so this crate never depends on the server crate.

// `staff_action` takes one argument per form field; the code `#[server]` generates for it does not
// carry a function-level allow, so this one is module-wide.
#![allow(clippy::too_many_arguments)]

use crate::error::AppError;
use crate::views::{CommandAck, ConsumerStatus, HistoryEntry, MemberPage, MemberQuery, MembershipView};
use leptos::prelude::*;

mod identity;
#[cfg(feature = "ssr")]
mod port;
pub use identity::*;
#[cfg(feature = "ssr")]
pub use port::{Identity, Portal, PortalCommand};

#[cfg(feature = "ssr")]
fn portal() -> Result<std::sync::Arc<dyn Portal>, AppError> {
    use_context::<std::sync::Arc<dyn Portal>>()
        .ok_or_else(|| AppError::new("internal", "the server is not wired up (no Portal in context)"))
}

/// The caller, if they may do `action`; else the error API.md gives (401, 403, or for a member
/// asking about another member, the same "not found" an unknown id gets).
#[cfg(feature = "ssr")]
fn authorized(action: crate::domain::access::Action) -> Result<crate::domain::access::Caller, AppError> {
    use crate::domain::access::{authorize, Denied};
    let caller = crate::request::caller();
    let denied = match authorize(&caller, action) {
        Ok(()) => return Ok(caller),
        Err(Denied::Unauthenticated) => AppError::unauthenticated(),
        Err(Denied::Forbidden) => AppError::new("forbidden", "you may not do this"),
        Err(Denied::NotFound) => AppError::new("member_not_found", "no such member"),
    };
    Err(denied.answered())
}

/// The member's view; with `min_position`, first wait (up to 2 s) until the projector has applied
/// that position, so a page opened right after a command shows it (read-your-writes). Another
/// member's view is `None`, as an unknown member's is.
#[server(prefix = "/_fn")]
pub async fn get_member(member_id: String, min_position: Option<u64>) -> Result<Option<MembershipView>, AppError> {
    use crate::domain::access::{authorize, Action, Denied};
    if authorize(&crate::request::caller(), Action::ReadMember(&member_id)) == Err(Denied::NotFound) {
        return Ok(None);
    }
    authorized(Action::ReadMember(&member_id))?;
    let portal = portal()?;
    if let Some(position) = min_position {
        portal.wait_for_position(position).await;
    }
    portal.member(&member_id).await.map_err(AppError::answered)
}

/// Staff: every stream a consumer holds back or skipped (the operations page).
#[server(prefix = "/_fn")]
pub async fn get_parked() -> Result<Vec<crate::views::ParkedRow>, AppError> {
    authorized(crate::domain::access::Action::Operations)?;
    portal()?.parked().await.map_err(AppError::answered)
}

/// Admin: apply a parked stream's events again (after a fix). Back to the page with the outcome.
#[server(prefix = "/_fn")]
pub async fn retry_parked(consumer: String, stream_id: String) -> Result<(), AppError> {
    let run = async {
        authorized(crate::domain::access::Action::OperateViews)?;
        let outcome = portal()?.parked_action(&crate::request::caller(), &consumer, &stream_id, None).await?;
        identity::flash_done("parked", format!("{stream_id} ({consumer}): {outcome}."));
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("parked"))
}

/// Admin: leave a parked stream's events out for good, with a reason that is kept.
#[server(prefix = "/_fn")]
pub async fn skip_parked(consumer: String, stream_id: String, reason: String) -> Result<(), AppError> {
    let run = async {
        authorized(crate::domain::access::Action::OperateViews)?;
        let caller = crate::request::caller();
        let outcome = portal()?.parked_action(&caller, &consumer, &stream_id, Some(&reason)).await?;
        identity::flash_done("parked", format!("{stream_id} ({consumer}): {outcome}."));
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("parked"))
}

/// Admin: build a projection again from the log, online (blue/green). Back to the page, where
/// its progress shows.
#[server(prefix = "/_fn")]
pub async fn rebuild_projection(projection: String) -> Result<(), AppError> {
    let run = async {
        authorized(crate::domain::access::Action::OperateViews)?;
        let build = portal()?.rebuild(&crate::request::caller(), &projection).await?;
        identity::flash_done("rebuild", format!("{projection}: rebuild #{} asked for.", build.id));
        Ok(())
    };
    run.await.map_err(|err: AppError| err.on_form("rebuild"))
}

/// Staff: the card as it was after `position` (the console's history).
#[server(prefix = "/_fn")]
pub async fn get_member_at(member_id: String, position: u64) -> Result<Option<MembershipView>, AppError> {
    authorized(crate::domain::access::Action::ManageMembers)?;
    portal()?.member_at(&member_id, position).await.map_err(AppError::answered)
}

#[server(prefix = "/_fn")]
pub async fn search_members(query: MemberQuery) -> Result<MemberPage, AppError> {
    authorized(crate::domain::access::Action::ManageMembers)?;
    portal()?.search(query).await.map_err(AppError::answered)
}

#[server(prefix = "/_fn")]
pub async fn get_consumers() -> Result<Vec<ConsumerStatus>, AppError> {
    authorized(crate::domain::access::Action::Operations)?;
    portal()?.consumers().await.map_err(AppError::answered)
}

/// Staff: the change data capture sources (the operations page).
#[server(prefix = "/_fn")]
pub async fn get_cdc_sources() -> Result<Vec<crate::views::CdcSource>, AppError> {
    authorized(crate::domain::access::Action::Operations)?;
    portal()?.cdc_sources().await.map_err(AppError::answered)
}

/// A member's history with who caused each event (staff: the audit trail).
#[server(prefix = "/_fn")]
pub async fn member_history(member_id: String) -> Result<Vec<HistoryEntry>, AppError> {
    authorized(crate::domain::access::Action::ManageMembers)?;
    portal()?.history(&member_id).await.map_err(AppError::answered)
}

/// Every staff console form posts here; its hidden `kind` field says which action it is: `enroll`,
/// `earn`, `redeem`, `suspend`, `reactivate` or `purchase`. The fields are those of the form (text,
/// as typed); a field the action needs but the form lacks counts as empty. One server function
/// rather than one per action keeps the console's WASM small: each server function brings its
/// own request encoder, response decoder and form parser into the bundle (BENCHMARKS.md, P7).
#[server(prefix = "/_fn")]
pub async fn staff_action(
    kind: String,
    member_id: Option<String>,
    name: Option<String>,
    email: Option<String>,
    points: Option<String>,
    reason: Option<String>,
    reward: Option<String>,
    amount: Option<String>,
    currency: Option<String>,
    channel: Option<String>,
) -> Result<CommandAck, AppError> {
    use crate::domain::access::Action;
    let text = |field: Option<String>| field.unwrap_or_default();
    let run = async {
        let caller = authorized(if kind == "purchase" { Action::RecordPurchase } else { Action::ManageMembers })?;
        let command = match kind.as_str() {
            "enroll" => PortalCommand::Enroll { name: text(name), email: text(email) },
            "earn" => PortalCommand::Earn {
                member_id: text(member_id),
                points: parse_points(&text(points))?,
                reason: text(reason),
            },
            "redeem" => PortalCommand::Redeem {
                member_id: text(member_id),
                points: parse_points(&text(points))?,
                reward: text(reward),
            },
            "suspend" => PortalCommand::Suspend { member_id: text(member_id), reason: text(reason) },
            "reactivate" => PortalCommand::Reactivate { member_id: text(member_id) },
            "purchase" => PortalCommand::RecordPurchase {
                member_id: text(member_id),
                amount_cents: parse_amount(&text(amount))?,
                currency: text(currency),
                channel: text(channel),
            },
            other => return Err(AppError::invalid(format!("unknown staff action '{other}'"))),
        };
        portal()?.execute(&caller, command).await
    };
    run.await.map_err(|err| err.on_form(&kind))
}

/// The member bound to the caller's account: unauthenticated for no one, forbidden for people
/// and keys (the member forms are a member's own).
#[cfg(feature = "ssr")]
fn own_member(caller: &crate::domain::access::Caller) -> Result<String, AppError> {
    match caller.member_id() {
        Some(id) => Ok(id.to_string()),
        None if caller.is_signed_in() => {
            Err(AppError::new("forbidden", "only a member can do this, on their own account"))
        }
        None => Err(AppError::unauthenticated()),
    }
}

/// A member redeems points on their own account (the portal page's form).
#[server(prefix = "/_fn")]
pub async fn redeem_reward(points: String, reward: Option<String>) -> Result<CommandAck, AppError> {
    let run = async {
        let caller = crate::request::caller();
        let member_id = own_member(&caller)?;
        authorized(crate::domain::access::Action::Redeem(&member_id))?;
        let points = parse_points(&points)?;
        let command = PortalCommand::Redeem { member_id, points, reward: reward.unwrap_or_default() };
        let ack = portal()?.execute(&caller, command).await?;
        identity::flash_done("redeem", format!("Redeemed {points} points."));
        identity::back_to_member(&ack);
        Ok(ack)
    };
    run.await.map_err(|err: AppError| err.on_form("redeem"))
}

/// A member changes their own name or email (the portal page's form).
#[server(prefix = "/_fn")]
pub async fn update_my_profile(name: String, email: String) -> Result<CommandAck, AppError> {
    let run = async {
        let caller = crate::request::caller();
        let member_id = own_member(&caller)?;
        authorized(crate::domain::access::Action::UpdateProfile(&member_id))?;
        let ack = portal()?.execute(&caller, PortalCommand::UpdateProfile { member_id, name, email }).await?;
        identity::flash_done("profile", "Your profile is saved.".to_string());
        identity::back_to_member(&ack);
        Ok(ack)
    };
    run.await.map_err(|err: AppError| err.on_form("profile"))
}

/// Form fields arrive as text; a person typing "12.5" deserves a clear message, not a decode error.
pub fn parse_points(raw: &str) -> Result<i64, AppError> {
    raw.trim()
        .parse::<i64>()
        .map_err(|_| AppError::invalid(format!("points must be a whole number, got '{}'", raw.trim())))
}

/// "12.34" (currency units) → 1234 cents.
pub fn parse_amount(raw: &str) -> Result<i64, AppError> {
    let raw = raw.trim();
    let bad = || AppError::invalid(format!("amount must be a number like 12.34, got '{raw}'"));
    let (units, cents) = raw.split_once('.').unwrap_or((raw, ""));
    if units.is_empty() || cents.len() > 2 || !units.chars().chain(cents.chars()).all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let units: i64 = units.parse().map_err(|_| bad())?;
    let cents: i64 = if cents.is_empty() { 0 } else { format!("{cents:0<2}").parse().map_err(|_| bad())? };
    units.checked_mul(100).and_then(|u| u.checked_add(cents)).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_read_as_currency_units() {
        assert_eq!(parse_amount("12.34"), Ok(1234));
        assert_eq!(parse_amount("12.5"), Ok(1250));
        assert_eq!(parse_amount(" 7 "), Ok(700));
        assert!(parse_amount("-1").is_err());
        assert!(parse_amount("1.234").is_err());
        assert!(parse_amount("abc").is_err());
        assert!(parse_amount("").is_err());
    }

    #[test]
    fn points_must_be_whole_numbers() {
        assert_eq!(parse_points(" 250 "), Ok(250));
        assert!(parse_points("12.5").is_err());
    }
}
