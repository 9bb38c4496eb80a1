//! The loyalty policy as a processor: each `TransactionPerformed` → earn on the member's stream
//! (idempotency key = the transaction id) → close the purchase. All of it, and the checkpoint, in
//! the runner's one transaction; and a closed purchase is never handled again, so a purchase
//! earns exactly once however often the policy sees it. Rules: `app::domain::loyalty_policy`.

use crate::clock;
use crate::commands::{self, Command, CommandError, Envelope, Idempotency, MemberAction, Meta};
use crate::projector::parking::EventFailed;
use crate::projector::{Consumer, Effects};
use crate::store::sqlite::heads::Heads;
use crate::store::{StoredEvent, Streams};
use anyhow::Context;
use app::domain::loyalty_policy::{self, PolicyStep};
use app::domain::member::{MemberCommand, MemberError};
use app::domain::transaction::{TransactionAggregate, TransactionEvent};
use app::domain::Aggregate;
use async_trait::async_trait;
use serde_json::json;
use sqlx::AnyConnection;
use std::sync::Arc;

pub const NAME: &str = "loyalty_policy";
/// `metadata.actor` of what the policy appends (API.md).
pub const ACTOR: &str = "policy:loyalty";

/// The only event the policy acts on.
const TRANSACTION_PERFORMED: &str = "TransactionPerformed";

/// `heads`: the store's stream heads (SQLite), which every append is checked against.
pub struct LoyaltyPolicy {
    pub heads: Option<Arc<Heads>>,
}

#[async_trait]
impl Consumer for LoyaltyPolicy {
    fn name(&self) -> &'static str {
        NAME
    }

    fn handles(&self, event_type: &str) -> bool {
        event_type == TRANSACTION_PERFORMED
    }

    async fn apply(
        &self,
        conn: &mut AnyConnection,
        events: &[Arc<StoredEvent>],
        effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let mut streams = Streams::begin(conn, self.heads.as_deref()).await?;
        for event in events.iter().filter(|e| self.handles(&e.event_type)) {
            self.handle(&mut streams, event, effects).await.with_context(|| {
                format!("applying event {} ({}) at position {}", event.event_type, event.stream_id, event.position)
            })?;
        }
        Ok(())
    }
}

impl LoyaltyPolicy {
    /// One purchase: earn, then close it.
    async fn handle(
        &self,
        streams: &mut Streams<'_>,
        event: &StoredEvent,
        effects: &mut Effects,
    ) -> anyhow::Result<()> {
        let decoded = event.decode::<TransactionEvent>().map_err(|err| EventFailed::error(event, err))?;
        let TransactionEvent::TransactionPerformed(purchase) = decoded else {
            return Ok(());
        };
        let stream_id = format!("{}{}", TransactionAggregate::STREAM_PREFIX, purchase.transaction_id);
        let loaded = streams.load_stream(&stream_id).await?;
        if loaded.version > 1 {
            return Ok(()); // closed already
        }
        let now = clock::now();
        let meta = Meta {
            correlation_id: event.metadata["correlation_id"].as_str().unwrap_or_default().to_string(),
            causation_id: Some(format!("event:{}", event.position)),
            actor: ACTOR.to_string(),
        };
        let close = match loyalty_policy::react(&purchase) {
            PolicyStep::Close(command) => command,
            PolicyStep::Earn { member_id, command } => {
                let earned = earn(streams, &member_id, command, &purchase.transaction_id, &meta, &now, effects).await?;
                loyalty_policy::close(&member_id, &earned)
            }
        };
        let metadata = json!({
            "correlation_id": meta.correlation_id,
            "causation_id": meta.causation_id,
            "idempotency_key": purchase.transaction_id,
            "actor": ACTOR,
        });
        commands::run::<TransactionAggregate>(streams, &stream_id, |_| close, &metadata, &now, &mut effects.appended)
            .await?;
        Ok(())
    }
}

/// Run the earn as a command with the transaction id as idempotency key. A refusal by the member's
/// rules (unknown, suspended, too small) is an answer, not a failure.
async fn earn(
    streams: &mut Streams<'_>,
    member_id: &str,
    command: MemberCommand,
    transaction_id: &str,
    meta: &Meta,
    now: &str,
    effects: &mut Effects,
) -> anyhow::Result<Result<u64, MemberError>> {
    let MemberCommand::EarnForPurchase { transaction_id: tid, amount_cents } = command else {
        anyhow::bail!("the loyalty policy only issues purchase earns");
    };
    let envelope = Envelope {
        command: Command::Member {
            member_id: member_id.to_string(),
            action: MemberAction::EarnForPurchase { transaction_id: tid, amount_cents },
        },
        expected_version: None,
        idempotency: Some(Idempotency {
            scope: NAME.to_string(),
            key: transaction_id.to_string(),
            request: format!("earn_for_purchase {member_id} {amount_cents}"),
            unused: false,
        }),
        meta: meta.clone(),
    };
    // A batch of one, inside the runner's transaction; no cached states (the writer's are its own).
    let mut executed = commands::execute_batch(streams, &[&envelope], now, None).await?;
    effects.appended.append(&mut executed.appended);
    match executed.answers.pop().unwrap_or(Err(CommandError::Unavailable)) {
        Ok(answer) => match answer.outcome {
            commands::Outcome::Member(member) => Ok(Ok(member.points.unwrap_or(0))),
            commands::Outcome::Purchase(_) => Ok(Ok(0)),
        },
        Err(CommandError::Member(refused)) => Ok(Err(refused)),
        Err(other) => Err(other.into()),
    }
}
