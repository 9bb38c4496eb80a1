//! The server's implementation of the pages' [`Portal`]: views for reads, the command bus for
//! writes, with the same validation and error codes as the REST endpoints.

use crate::commands::{Envelope, Meta};
use crate::http::commands as rest;
use crate::http::error::ApiError;
use crate::{queries, AppState};
use app::api::{Portal, PortalCommand};
use app::error::AppError;
use app::views::{CommandAck, ConsumerStatus, MemberPage, MemberQuery, MembershipView};

pub struct ServerPortal {
    state: AppState,
}

impl ServerPortal {
    pub fn new(state: AppState) -> Self {
        ServerPortal { state }
    }
}

fn app_err(err: impl Into<ApiError>) -> AppError {
    err.into().to_app_error()
}

fn optional(text: String) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

#[async_trait::async_trait]
impl Portal for ServerPortal {
    async fn member(&self, member_id: &str) -> Result<Option<MembershipView>, AppError> {
        if app::domain::validate::id("member id", member_id).is_err() {
            return Ok(None);
        }
        match queries::member_view_cached(&self.state.store, &self.state.feed.cache, member_id)
            .await
            .map_err(app_err)?
        {
            Some((json, _)) => serde_json::from_str(&json).map(Some).map_err(|e| app_err(ApiError::internal(e))),
            None => Ok(None),
        }
    }

    async fn wait_for_position(&self, position: u64) {
        let wait = std::time::Duration::from_millis(crate::http::queries::DEFAULT_WAIT_MS);
        self.state.feed.wait_for(position.min(i64::MAX as u64) as i64, wait).await;
    }

    async fn search(&self, query: MemberQuery) -> Result<MemberPage, AppError> {
        queries::search_members(&self.state.store, &self.state.feed.cache, &query).await.map_err(app_err)
    }

    async fn consumers(&self) -> Result<Vec<ConsumerStatus>, AppError> {
        self.state.consumers.statuses().await.map_err(|e| app_err(ApiError::Internal(e)))
    }

    async fn execute(&self, command: PortalCommand) -> Result<CommandAck, AppError> {
        let command = match command {
            PortalCommand::Enroll { name, email } => {
                rest::enroll_command(rest::EnrollBody { name, email, member_id: None })
            }
            PortalCommand::Earn { member_id, points, reason } => {
                rest::earn_command(member_id.trim(), rest::EarnBody { points, reason: optional(reason) })
            }
            PortalCommand::Redeem { member_id, points, reward } => {
                rest::redeem_command(member_id.trim(), rest::RedeemBody { points, reward: optional(reward) })
            }
            PortalCommand::Suspend { member_id, reason } => {
                rest::suspend_command(member_id.trim(), rest::SuspendBody { reason: optional(reason) })
            }
            PortalCommand::Reactivate { member_id } => rest::reactivate_command(member_id.trim()),
            PortalCommand::RecordPurchase { member_id, amount_cents, currency, channel } => rest::purchase_command(
                rest::PurchaseBody {
                    transaction_id: None,
                    member_id: optional(member_id),
                    amount_cents,
                    currency: currency.trim().to_uppercase(),
                    channel,
                },
                crate::clock::now(),
            ),
        }
        .map_err(app_err)?;
        let envelope = Envelope {
            command,
            expected_version: None,
            idempotency: None,
            meta: Meta {
                correlation_id: uuid::Uuid::new_v4().to_string(),
                causation_id: None,
                actor: "staff-console".into(),
            },
        };
        let answer = rest::send(&self.state, envelope).await.map_err(|e| e.to_app_error())?;
        let body: serde_json::Value = serde_json::from_str(&answer.body).map_err(|e| app_err(ApiError::internal(e)))?;
        Ok(CommandAck {
            member_id: body["member_id"].as_str().map(str::to_string),
            transaction_id: body["transaction_id"].as_str().map(str::to_string),
            version: body["version"].as_u64(),
            position: body["position"].as_u64().unwrap_or(0),
        })
    }
}
