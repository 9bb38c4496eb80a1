//! The purchase stream: one per sales transaction, `transaction-<transaction_id>`. It is opened by a
//! sales channel (`TransactionPerformed`) and closed by the loyalty policy (rewarded or not).

use super::Aggregate;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Pos,
    Ecommerce,
}

impl Channel {
    pub fn parse(s: &str) -> Option<Channel> {
        match s {
            "pos" => Some(Channel::Pos),
            "ecommerce" => Some(Channel::Ecommerce),
            _ => None,
        }
    }
}

/// Largest purchase accepted: keeps even platinum purchase points under the earn limit.
pub const MAX_AMOUNT_CENTS: u64 = 50_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Purchase {
    pub transaction_id: String,
    pub member_id: Option<String>,
    pub amount_cents: u64,
    pub currency: String,
    pub channel: Channel,
    pub performed_at: String,
}

impl Purchase {
    /// Whether `other` is this sale sent again: the same member, amount, currency and channel
    /// (when it was sent again does not matter).
    pub fn same_sale(&self, other: &Purchase) -> bool {
        self.member_id == other.member_id
            && self.amount_cents == other.amount_cents
            && self.currency == other.currency
            && self.channel == other.channel
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotRewardedReason {
    NoMember,
    UnknownMember,
    AccountSuspended,
    AmountTooSmall,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event_type", content = "data")]
pub enum TransactionEvent {
    TransactionPerformed(Purchase),
    TransactionRewarded { member_id: String, points: u64 },
    TransactionNotRewarded { reason: NotRewardedReason },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TransactionCommand {
    Perform(Purchase),
    Reward { member_id: String, points: u64 },
    NotReward { reason: NotRewardedReason },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransactionError {
    #[error("transaction not found")]
    NotFound,
    #[error("transaction '{0}' was recorded with another member, amount, currency or channel")]
    Conflict(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transaction {
    pub purchase: Option<Purchase>,
    pub closed: bool,
}

pub struct TransactionAggregate;

impl Aggregate for TransactionAggregate {
    type State = Transaction;
    type Command = TransactionCommand;
    type Event = TransactionEvent;
    type Error = TransactionError;
    const STREAM_PREFIX: &'static str = "transaction-";

    /// Both opening and closing are idempotent: the same purchase again, or a second closing,
    /// records nothing, so a retried sale or a re-run policy changes nothing. The same
    /// transaction id with another purchase is a conflict: a channel reusing an id by mistake
    /// must hear of it, not be told it was recorded.
    fn decide(state: &Transaction, command: TransactionCommand) -> Result<Vec<TransactionEvent>, TransactionError> {
        match command {
            TransactionCommand::Perform(purchase) => match &state.purchase {
                Some(recorded) if recorded.same_sale(&purchase) => Ok(vec![]),
                Some(recorded) => Err(TransactionError::Conflict(recorded.transaction_id.clone())),
                None => Ok(vec![TransactionEvent::TransactionPerformed(purchase)]),
            },
            TransactionCommand::Reward { member_id, points } => {
                if state.purchase.is_none() {
                    return Err(TransactionError::NotFound);
                }
                if state.closed {
                    return Ok(vec![]);
                }
                Ok(vec![TransactionEvent::TransactionRewarded { member_id, points }])
            }
            TransactionCommand::NotReward { reason } => {
                if state.purchase.is_none() {
                    return Err(TransactionError::NotFound);
                }
                if state.closed {
                    return Ok(vec![]);
                }
                Ok(vec![TransactionEvent::TransactionNotRewarded { reason }])
            }
        }
    }

    fn evolve(mut state: Transaction, event: &TransactionEvent) -> Transaction {
        match event {
            TransactionEvent::TransactionPerformed(p) => state.purchase = Some(p.clone()),
            TransactionEvent::TransactionRewarded { .. } | TransactionEvent::TransactionNotRewarded { .. } => {
                state.closed = true
            }
        }
        state
    }

    fn event_type(event: &TransactionEvent) -> (&'static str, u32) {
        let name = match event {
            TransactionEvent::TransactionPerformed(_) => "TransactionPerformed",
            TransactionEvent::TransactionRewarded { .. } => "TransactionRewarded",
            TransactionEvent::TransactionNotRewarded { .. } => "TransactionNotRewarded",
        };
        (name, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::testing::given;

    pub(crate) fn purchase() -> Purchase {
        Purchase {
            transaction_id: "t1".into(),
            member_id: Some("m1".into()),
            amount_cents: 2_599,
            currency: "EUR".into(),
            channel: Channel::Pos,
            performed_at: "2026-11-23T10:00:00Z".into(),
        }
    }

    #[test]
    fn a_purchase_is_recorded_once() {
        given::<TransactionAggregate>(vec![])
            .when(TransactionCommand::Perform(purchase()))
            .then(vec![TransactionEvent::TransactionPerformed(purchase())]);
    }

    #[test]
    fn the_same_purchase_again_records_nothing() {
        given::<TransactionAggregate>(vec![TransactionEvent::TransactionPerformed(purchase())])
            .when(TransactionCommand::Perform(purchase()))
            .then(vec![]);
    }

    #[test]
    fn the_same_purchase_sent_again_later_records_nothing() {
        let later = Purchase { performed_at: "2026-11-23T10:05:00Z".into(), ..purchase() };
        given::<TransactionAggregate>(vec![TransactionEvent::TransactionPerformed(purchase())])
            .when(TransactionCommand::Perform(later))
            .then(vec![]);
    }

    #[test]
    fn the_same_transaction_id_with_another_purchase_is_a_conflict() {
        let others = [
            Purchase { member_id: Some("m2".into()), ..purchase() },
            Purchase { member_id: None, ..purchase() },
            Purchase { amount_cents: 2_600, ..purchase() },
            Purchase { currency: "USD".into(), ..purchase() },
            Purchase { channel: Channel::Ecommerce, ..purchase() },
        ];
        for other in others {
            given::<TransactionAggregate>(vec![TransactionEvent::TransactionPerformed(purchase())])
                .when(TransactionCommand::Perform(other))
                .then_err(TransactionError::Conflict("t1".into()));
        }
    }

    #[test]
    fn a_purchase_is_closed_only_once() {
        given::<TransactionAggregate>(vec![
            TransactionEvent::TransactionPerformed(purchase()),
            TransactionEvent::TransactionRewarded { member_id: "m1".into(), points: 25 },
        ])
        .when(TransactionCommand::NotReward { reason: NotRewardedReason::UnknownMember })
        .then(vec![]);
    }

    #[test]
    fn closing_an_unknown_purchase_is_rejected() {
        given::<TransactionAggregate>(vec![])
            .when(TransactionCommand::Reward { member_id: "m1".into(), points: 1 })
            .then_err(TransactionError::NotFound);
    }

    #[test]
    fn purchase_events_keep_their_stored_shape() {
        let json = serde_json::to_value(TransactionEvent::TransactionPerformed(purchase())).unwrap();
        assert_eq!(json["event_type"], "TransactionPerformed");
        assert_eq!(json["data"]["channel"], "pos");
        assert_eq!(json["data"]["amount_cents"], 2_599);
    }
}
