//! The loyalty policy: every purchase that names an active member earns points on that member's
//! stream, and every purchase is closed with `TransactionRewarded` or `TransactionNotRewarded`, so
//! none is silently dropped. The processor (server `processors/loyalty.rs`) runs these two steps;
//! the rules live here.

use super::member::{MemberCommand, MemberError};
use super::transaction::{NotRewardedReason, Purchase, TransactionCommand};

/// What the policy does first for a purchase.
#[derive(Debug, Clone, PartialEq)]
pub enum PolicyStep {
    /// Issue this command on the member's stream (its `decide` applies the tier multiplier and
    /// refuses unknown or suspended members); then close the purchase with [`close`].
    Earn { member_id: String, command: MemberCommand },
    /// Nothing to earn: close the purchase right away.
    Close(TransactionCommand),
}

pub fn react(purchase: &Purchase) -> PolicyStep {
    match &purchase.member_id {
        None => PolicyStep::Close(TransactionCommand::NotReward { reason: NotRewardedReason::NoMember }),
        Some(member_id) => PolicyStep::Earn {
            member_id: member_id.clone(),
            command: MemberCommand::EarnForPurchase {
                transaction_id: purchase.transaction_id.clone(),
                amount_cents: purchase.amount_cents,
            },
        },
    }
}

/// How the earn ended (points earned, or why not) decides how the purchase is closed.
pub fn close(member_id: &str, earned: &Result<u64, MemberError>) -> TransactionCommand {
    let reason = match earned {
        Ok(points) => return TransactionCommand::Reward { member_id: member_id.to_string(), points: *points },
        Err(MemberError::AccountSuspended) => NotRewardedReason::AccountSuspended,
        Err(MemberError::PurchaseTooSmall) => NotRewardedReason::AmountTooSmall,
        Err(_) => NotRewardedReason::UnknownMember,
    };
    TransactionCommand::NotReward { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::member::{decide, points_earned, Member, Status};
    use crate::domain::tier::Tier;
    use crate::domain::transaction::Channel;

    fn purchase(member_id: Option<&str>, amount_cents: u64) -> Purchase {
        Purchase {
            transaction_id: "t1".into(),
            member_id: member_id.map(Into::into),
            amount_cents,
            currency: "EUR".into(),
            channel: Channel::Ecommerce,
            performed_at: "2026-11-23T10:00:00Z".into(),
        }
    }

    fn member(status: Status, tier: Tier) -> Member {
        Member { enrolled: true, member_id: "m1".into(), status, tier, ..Member::default() }
    }

    /// Both steps, with the member aggregate deciding the earn.
    fn run(p: &Purchase, m: &Member) -> TransactionCommand {
        match react(p) {
            PolicyStep::Close(c) => c,
            PolicyStep::Earn { member_id, command } => {
                let earned = decide(m, command).map(|events| points_earned(&events));
                close(&member_id, &earned)
            }
        }
    }

    #[test]
    fn a_purchase_without_a_member_is_not_rewarded() {
        assert_eq!(
            run(&purchase(None, 1_000), &Member::default()),
            TransactionCommand::NotReward { reason: NotRewardedReason::NoMember }
        );
    }

    #[test]
    fn a_purchase_for_an_unknown_member_is_not_rewarded() {
        assert_eq!(
            run(&purchase(Some("m1"), 1_000), &Member::default()),
            TransactionCommand::NotReward { reason: NotRewardedReason::UnknownMember }
        );
    }

    #[test]
    fn a_purchase_by_a_suspended_member_is_not_rewarded() {
        assert_eq!(
            run(&purchase(Some("m1"), 1_000), &member(Status::Suspended, Tier::Bronze)),
            TransactionCommand::NotReward { reason: NotRewardedReason::AccountSuspended }
        );
    }

    #[test]
    fn a_purchase_by_an_active_member_earns_points_by_tier() {
        assert_eq!(
            run(&purchase(Some("m1"), 4_050), &member(Status::Active, Tier::Silver)),
            TransactionCommand::Reward { member_id: "m1".into(), points: 50 } // 40 units * 1.25
        );
    }

    #[test]
    fn a_purchase_under_one_unit_is_closed_as_too_small() {
        assert_eq!(
            run(&purchase(Some("m1"), 50), &member(Status::Active, Tier::Bronze)),
            TransactionCommand::NotReward { reason: NotRewardedReason::AmountTooSmall }
        );
    }
}
