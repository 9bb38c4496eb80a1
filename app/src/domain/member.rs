//! The member aggregate: one loyalty membership, stream `member-<member_id>`.

use super::tier::Tier;
use super::validate::email_key;
use super::Aggregate;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub enum Status {
    #[default]
    Active,
    Suspended,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::Suspended => "suspended",
        }
    }
    pub fn parse(s: &str) -> Option<Status> {
        match s {
            "active" => Some(Status::Active),
            "suspended" => Some(Status::Suspended),
            _ => None,
        }
    }
}

/// Commands carry already validated input (see `validate`) plus what the rule needs from outside:
/// the clock and who currently holds the requested email.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberCommand {
    Enroll {
        member_id: String,
        name: String,
        email: String,
        enrolled_at: String,
        /// The member that holds this email's reservation, if any.
        email_owner: Option<String>,
    },
    UpdateProfile {
        name: Option<String>,
        email: Option<String>,
        email_owner: Option<String>,
    },
    EarnPoints {
        points: u64,
        reason: Option<String>,
    },
    /// Issued by the loyalty policy for a purchase; points depend on the tier at this moment.
    EarnForPurchase {
        transaction_id: String,
        amount_cents: u64,
    },
    RedeemPoints {
        points: u64,
        reward: Option<String>,
    },
    Suspend {
        reason: Option<String>,
    },
    Reactivate,
}

/// Events carry results (balance and lifetime after) so projections copy instead of recompute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum MemberEvent {
    MemberEnrolled {
        member_id: String,
        name: String,
        email: String,
        enrolled_at: String,
    },
    ProfileUpdated {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        email: Option<String>,
    },
    /// Schema version 2 (see [`POINTS_EARNED_VERSION`]) added `source`.
    PointsEarned {
        points: u64,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        transaction_id: Option<String>,
        balance_after: u64,
        lifetime_after: u64,
        source: EarnSource,
    },
    TierChanged {
        from: Tier,
        to: Tier,
    },
    PointsRedeemed {
        points: u64,
        reward: String,
        balance_after: u64,
    },
    AccountSuspended {
        reason: String,
    },
    AccountReactivated {},
}

/// Where earned points came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EarnSource {
    /// A purchase, through the loyalty policy.
    Purchase,
    /// Credited by staff (or a staff key): `POST /api/members/{id}/points/earn`.
    Staff,
}

/// `PointsEarned` is at schema version 2: version 1 had no `source`.
pub const POINTS_EARNED_VERSION: u32 = 2;

/// One step of the `PointsEarned` upcaster chain: the data of version `from` made version
/// `from + 1`. False when there is no such step.
pub fn upcast_points_earned(from: u32, data: &mut serde_json::Value) -> bool {
    match (from, data.as_object_mut()) {
        // Version 1 knew only purchases (which carry their transaction id) and staff credits.
        (1, Some(fields)) => {
            let purchase = fields.get("transaction_id").is_some_and(|id| !id.is_null());
            let source = if purchase { "purchase" } else { "staff" };
            fields.insert("source".into(), serde_json::Value::from(source));
            true
        }
        _ => false,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    #[error("member '{0}' already exists")]
    MemberExists(String),
    #[error("member not found")]
    NotFound,
    #[error("the email address is already used by another member")]
    EmailTaken,
    #[error("not enough points: the balance is {balance}, {requested} were asked for")]
    InsufficientPoints { balance: u64, requested: u64 },
    #[error("the account is suspended")]
    AccountSuspended,
    #[error("the account is not suspended")]
    AccountNotSuspended,
    #[error("the purchase is too small to earn a point")]
    PurchaseTooSmall,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Member {
    pub enrolled: bool,
    pub member_id: String,
    pub name: String,
    pub email: String,
    pub status: Status,
    pub balance: u64,
    pub lifetime: u64,
    pub tier: Tier,
}

pub const DEFAULT_EARN_REASON: &str = "Points credited";
pub const DEFAULT_REWARD: &str = "Reward";
pub const DEFAULT_SUSPEND_REASON: &str = "Suspended by staff";

pub struct MemberAggregate;

impl Aggregate for MemberAggregate {
    type State = Member;
    type Command = MemberCommand;
    type Event = MemberEvent;
    type Error = MemberError;
    const STREAM_PREFIX: &'static str = "member-";

    fn decide(state: &Member, command: MemberCommand) -> Result<Vec<MemberEvent>, MemberError> {
        decide(state, command)
    }

    fn evolve(state: Member, event: &MemberEvent) -> Member {
        evolve(state, event)
    }

    fn event_type(event: &MemberEvent) -> (&'static str, u32) {
        let name = match event {
            MemberEvent::MemberEnrolled { .. } => "MemberEnrolled",
            MemberEvent::ProfileUpdated { .. } => "ProfileUpdated",
            MemberEvent::PointsEarned { .. } => "PointsEarned",
            MemberEvent::TierChanged { .. } => "TierChanged",
            MemberEvent::PointsRedeemed { .. } => "PointsRedeemed",
            MemberEvent::AccountSuspended { .. } => "AccountSuspended",
            MemberEvent::AccountReactivated { .. } => "AccountReactivated",
        };
        (name, super::schema_version(name))
    }
}

fn email_is_free(owner: &Option<String>, member_id: &str) -> bool {
    owner.as_deref().is_none_or(|o| o == member_id)
}

fn require_active(state: &Member) -> Result<(), MemberError> {
    if !state.enrolled {
        return Err(MemberError::NotFound);
    }
    if state.status == Status::Suspended {
        return Err(MemberError::AccountSuspended);
    }
    Ok(())
}

/// A `PointsEarned`, plus the `TierChanged` when the new lifetime total crosses a threshold.
fn earn(state: &Member, points: u64, reason: String, transaction_id: Option<String>) -> Vec<MemberEvent> {
    let lifetime_after = state.lifetime + points;
    let source = if transaction_id.is_some() { EarnSource::Purchase } else { EarnSource::Staff };
    let mut events = vec![MemberEvent::PointsEarned {
        points,
        reason,
        transaction_id,
        balance_after: state.balance + points,
        lifetime_after,
        source,
    }];
    let to = Tier::for_lifetime(lifetime_after);
    // Tiers are never lost: only a move up is a change.
    if to > state.tier {
        events.push(MemberEvent::TierChanged { from: state.tier, to });
    }
    events
}

/// Points these events credit (what an earn for a purchase answers with).
pub fn points_earned(events: &[MemberEvent]) -> u64 {
    events
        .iter()
        .map(|e| match e {
            MemberEvent::PointsEarned { points, .. } => *points,
            _ => 0,
        })
        .sum()
}

pub fn decide(state: &Member, command: MemberCommand) -> Result<Vec<MemberEvent>, MemberError> {
    match command {
        MemberCommand::Enroll { member_id, name, email, enrolled_at, email_owner } => {
            if state.enrolled {
                return Err(MemberError::MemberExists(member_id));
            }
            if !email_is_free(&email_owner, &member_id) {
                return Err(MemberError::EmailTaken);
            }
            Ok(vec![MemberEvent::MemberEnrolled { member_id, name, email, enrolled_at }])
        }
        MemberCommand::UpdateProfile { name, email, email_owner } => {
            if !state.enrolled {
                return Err(MemberError::NotFound);
            }
            let name = name.filter(|n| *n != state.name);
            let email = email.filter(|e| *e != state.email);
            if let Some(e) = &email {
                if email_key(e) != email_key(&state.email) && !email_is_free(&email_owner, &state.member_id) {
                    return Err(MemberError::EmailTaken);
                }
            }
            if name.is_none() && email.is_none() {
                return Ok(vec![]);
            }
            Ok(vec![MemberEvent::ProfileUpdated { name, email }])
        }
        MemberCommand::EarnPoints { points, reason } => {
            require_active(state)?;
            Ok(earn(state, points, reason.unwrap_or_else(|| DEFAULT_EARN_REASON.into()), None))
        }
        MemberCommand::EarnForPurchase { transaction_id, amount_cents } => {
            require_active(state)?;
            let points = super::tier::purchase_points(amount_cents, state.tier);
            if points == 0 {
                return Err(MemberError::PurchaseTooSmall);
            }
            Ok(earn(state, points, transaction_id.clone(), Some(transaction_id)))
        }
        MemberCommand::RedeemPoints { points, reward } => {
            require_active(state)?;
            if points > state.balance {
                return Err(MemberError::InsufficientPoints { balance: state.balance, requested: points });
            }
            Ok(vec![MemberEvent::PointsRedeemed {
                points,
                reward: reward.unwrap_or_else(|| DEFAULT_REWARD.into()),
                balance_after: state.balance - points,
            }])
        }
        MemberCommand::Suspend { reason } => {
            require_active(state)?;
            Ok(vec![MemberEvent::AccountSuspended { reason: reason.unwrap_or_else(|| DEFAULT_SUSPEND_REASON.into()) }])
        }
        MemberCommand::Reactivate => {
            if !state.enrolled {
                return Err(MemberError::NotFound);
            }
            if state.status != Status::Suspended {
                return Err(MemberError::AccountNotSuspended);
            }
            Ok(vec![MemberEvent::AccountReactivated {}])
        }
    }
}

pub fn evolve(mut state: Member, event: &MemberEvent) -> Member {
    match event {
        MemberEvent::MemberEnrolled { member_id, name, email, .. } => {
            state.enrolled = true;
            state.member_id = member_id.clone();
            state.name = name.clone();
            state.email = email.clone();
            state.status = Status::Active;
        }
        MemberEvent::ProfileUpdated { name, email } => {
            if let Some(name) = name {
                state.name = name.clone();
            }
            if let Some(email) = email {
                state.email = email.clone();
            }
        }
        MemberEvent::PointsEarned { balance_after, lifetime_after, .. } => {
            state.balance = *balance_after;
            state.lifetime = *lifetime_after;
        }
        MemberEvent::TierChanged { to, .. } => state.tier = *to,
        MemberEvent::PointsRedeemed { balance_after, .. } => state.balance = *balance_after,
        MemberEvent::AccountSuspended { .. } => state.status = Status::Suspended,
        MemberEvent::AccountReactivated {} => state.status = Status::Active,
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::given;

    const AT: &str = "2026-11-23T10:00:00Z";

    fn enrolled() -> MemberEvent {
        MemberEvent::MemberEnrolled {
            member_id: "m1".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            enrolled_at: AT.into(),
        }
    }

    fn earned(points: u64, balance_after: u64, lifetime_after: u64) -> MemberEvent {
        MemberEvent::PointsEarned {
            points,
            reason: "bonus".into(),
            transaction_id: None,
            balance_after,
            lifetime_after,
            source: EarnSource::Staff,
        }
    }

    fn enroll(email_owner: Option<&str>) -> MemberCommand {
        MemberCommand::Enroll {
            member_id: "m1".into(),
            name: "Ada".into(),
            email: "ada@example.com".into(),
            enrolled_at: AT.into(),
            email_owner: email_owner.map(Into::into),
        }
    }

    fn earn(points: u64) -> MemberCommand {
        MemberCommand::EarnPoints { points, reason: Some("bonus".into()) }
    }

    #[test]
    fn enroll_records_the_member() {
        given::<MemberAggregate>(vec![]).when(enroll(None)).then(vec![enrolled()]);
    }

    #[test]
    fn enroll_is_rejected_when_the_member_exists() {
        given::<MemberAggregate>(vec![enrolled()]).when(enroll(None)).then_err(MemberError::MemberExists("m1".into()));
    }

    #[test]
    fn enroll_is_rejected_when_another_member_holds_the_email() {
        given::<MemberAggregate>(vec![]).when(enroll(Some("m2"))).then_err(MemberError::EmailTaken);
    }

    #[test]
    fn profile_update_records_only_what_changed() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::UpdateProfile {
                name: Some("Ada".into()),
                email: Some("ada.l@example.com".into()),
                email_owner: None,
            })
            .then(vec![MemberEvent::ProfileUpdated { name: None, email: Some("ada.l@example.com".into()) }]);
    }

    #[test]
    fn profile_update_with_nothing_new_records_nothing() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::UpdateProfile { name: Some("Ada".into()), email: None, email_owner: None })
            .then(vec![]);
    }

    #[test]
    fn profile_update_may_change_the_case_of_the_own_email() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::UpdateProfile {
                name: None,
                email: Some("ADA@example.com".into()),
                email_owner: Some("m1".into()),
            })
            .then(vec![MemberEvent::ProfileUpdated { name: None, email: Some("ADA@example.com".into()) }]);
    }

    #[test]
    fn profile_update_is_rejected_when_the_new_email_is_taken() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::UpdateProfile {
                name: None,
                email: Some("bob@example.com".into()),
                email_owner: Some("m2".into()),
            })
            .then_err(MemberError::EmailTaken);
    }

    #[test]
    fn profile_update_is_rejected_for_an_unknown_member() {
        given::<MemberAggregate>(vec![])
            .when(MemberCommand::UpdateProfile { name: Some("X".into()), email: None, email_owner: None })
            .then_err(MemberError::NotFound);
    }

    #[test]
    fn earn_adds_to_balance_and_lifetime() {
        given::<MemberAggregate>(vec![enrolled(), earned(100, 100, 100)])
            .when(earn(50))
            .then(vec![earned(50, 150, 150)]);
    }

    #[test]
    fn earn_that_crosses_a_threshold_changes_the_tier_in_the_same_decision() {
        given::<MemberAggregate>(vec![enrolled(), earned(900, 900, 900)])
            .when(earn(4_200))
            .then(vec![earned(4_200, 5_100, 5_100), MemberEvent::TierChanged { from: Tier::Bronze, to: Tier::Gold }]);
    }

    #[test]
    fn tier_is_never_demoted_by_redeeming() {
        let state = given::<MemberAggregate>(vec![
            enrolled(),
            earned(1_000, 1_000, 1_000),
            MemberEvent::TierChanged { from: Tier::Bronze, to: Tier::Silver },
            MemberEvent::PointsRedeemed { points: 1_000, reward: "mug".into(), balance_after: 0 },
        ])
        .state();
        assert_eq!(state.tier, Tier::Silver);
        assert_eq!(state.balance, 0);
        assert_eq!(state.lifetime, 1_000);
    }

    #[test]
    fn earn_is_rejected_when_the_account_is_suspended() {
        given::<MemberAggregate>(vec![enrolled(), MemberEvent::AccountSuspended { reason: "fraud".into() }])
            .when(earn(10))
            .then_err(MemberError::AccountSuspended);
    }

    #[test]
    fn earn_is_rejected_for_an_unknown_member() {
        given::<MemberAggregate>(vec![]).when(earn(10)).then_err(MemberError::NotFound);
    }

    #[test]
    fn redeem_takes_points_off_the_balance() {
        given::<MemberAggregate>(vec![enrolled(), earned(100, 100, 100)])
            .when(MemberCommand::RedeemPoints { points: 40, reward: Some("coffee".into()) })
            .then(vec![MemberEvent::PointsRedeemed { points: 40, reward: "coffee".into(), balance_after: 60 }]);
    }

    #[test]
    fn redeem_of_the_whole_balance_is_allowed() {
        given::<MemberAggregate>(vec![enrolled(), earned(100, 100, 100)])
            .when(MemberCommand::RedeemPoints { points: 100, reward: None })
            .then(vec![MemberEvent::PointsRedeemed { points: 100, reward: DEFAULT_REWARD.into(), balance_after: 0 }]);
    }

    #[test]
    fn redeem_is_rejected_when_balance_is_too_low() {
        given::<MemberAggregate>(vec![enrolled(), earned(100, 100, 100)])
            .when(MemberCommand::RedeemPoints { points: 101, reward: None })
            .then_err(MemberError::InsufficientPoints { balance: 100, requested: 101 });
    }

    #[test]
    fn redeem_is_rejected_when_the_account_is_suspended() {
        given::<MemberAggregate>(vec![
            enrolled(),
            earned(100, 100, 100),
            MemberEvent::AccountSuspended { reason: "fraud".into() },
        ])
        .when(MemberCommand::RedeemPoints { points: 1, reward: None })
        .then_err(MemberError::AccountSuspended);
    }

    #[test]
    fn suspend_an_active_account() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::Suspend { reason: Some("fraud".into()) })
            .then(vec![MemberEvent::AccountSuspended { reason: "fraud".into() }]);
    }

    #[test]
    fn suspend_is_rejected_when_already_suspended() {
        given::<MemberAggregate>(vec![enrolled(), MemberEvent::AccountSuspended { reason: "x".into() }])
            .when(MemberCommand::Suspend { reason: None })
            .then_err(MemberError::AccountSuspended);
    }

    #[test]
    fn reactivate_a_suspended_account() {
        given::<MemberAggregate>(vec![enrolled(), MemberEvent::AccountSuspended { reason: "x".into() }])
            .when(MemberCommand::Reactivate)
            .then(vec![MemberEvent::AccountReactivated {}]);
    }

    #[test]
    fn reactivate_is_rejected_when_not_suspended() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::Reactivate)
            .then_err(MemberError::AccountNotSuspended);
    }

    #[test]
    fn purchase_earns_by_the_tier_multiplier() {
        given::<MemberAggregate>(vec![
            enrolled(),
            earned(5_000, 5_000, 5_000),
            MemberEvent::TierChanged { from: Tier::Bronze, to: Tier::Gold },
        ])
        .when(MemberCommand::EarnForPurchase { transaction_id: "t1".into(), amount_cents: 10_099 })
        .then(vec![MemberEvent::PointsEarned {
            points: 150,
            reason: "t1".into(),
            transaction_id: Some("t1".into()),
            balance_after: 5_150,
            lifetime_after: 5_150,
            source: EarnSource::Purchase,
        }]);
    }

    #[test]
    fn purchase_under_one_currency_unit_earns_nothing() {
        given::<MemberAggregate>(vec![enrolled()])
            .when(MemberCommand::EarnForPurchase { transaction_id: "t1".into(), amount_cents: 99 })
            .then_err(MemberError::PurchaseTooSmall);
    }

    #[test]
    fn events_keep_their_stored_shape() {
        let json = serde_json::to_value(MemberEvent::AccountReactivated {}).unwrap();
        assert_eq!(json, serde_json::json!({"event_type": "AccountReactivated", "data": {}}));
        let json = serde_json::to_value(MemberEvent::TierChanged { from: Tier::Bronze, to: Tier::Silver }).unwrap();
        assert_eq!(json, serde_json::json!({"event_type": "TierChanged", "data": {"from": "bronze", "to": "silver"}}));
    }

    #[test]
    fn a_version_1_earn_reads_as_version_2_with_its_source_derived() {
        use crate::domain::{schema_version, upcast, UpcastError};
        use serde_json::json;
        let staff = json!({"points": 5, "reason": "r", "balance_after": 5, "lifetime_after": 5});
        let purchase =
            json!({"points": 5, "reason": "t1", "transaction_id": "t1", "balance_after": 5, "lifetime_after": 5});
        let decoded = |data: serde_json::Value| -> MemberEvent {
            let data = upcast("PointsEarned", 1, data).unwrap();
            serde_json::from_value(json!({"event_type": "PointsEarned", "data": data})).unwrap()
        };
        assert!(matches!(decoded(staff.clone()), MemberEvent::PointsEarned { source: EarnSource::Staff, .. }));
        assert!(matches!(decoded(purchase), MemberEvent::PointsEarned { source: EarnSource::Purchase, .. }));
        assert_eq!(schema_version("PointsEarned"), 2);
        assert_eq!(MemberAggregate::event_type(&earned(1, 1, 1)), ("PointsEarned", 2));
        assert_eq!(upcast("TierChanged", 1, json!({"a": 1})), Ok(json!({"a": 1})), "current: unchanged");
        assert!(matches!(upcast("PointsEarned", 3, staff.clone()), Err(UpcastError::Newer { current: 2, .. })));
        assert!(matches!(upcast("PointsEarned", 0, staff), Err(UpcastError::Missing { .. })));
    }
}
