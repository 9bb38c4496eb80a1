//! The server's side of the server functions (ssr only): the server crate implements [`Portal`]
//! and provides it as `Arc<dyn Portal>` in Leptos context for every request.

use crate::error::AppError;
use crate::views::{CommandAck, ConsumerStatus, MemberPage, MemberQuery, MembershipView};

/// A command from a staff console form, as typed (the server validates it like a REST body).
#[derive(Debug, Clone)]
pub enum PortalCommand {
    Enroll { name: String, email: String },
    Earn { member_id: String, points: i64, reason: String },
    Redeem { member_id: String, points: i64, reward: String },
    Suspend { member_id: String, reason: String },
    Reactivate { member_id: String },
    RecordPurchase { member_id: String, amount_cents: i64, currency: String, channel: String },
}

#[async_trait::async_trait]
pub trait Portal: Send + Sync + 'static {
    /// The membership view, or None for an unknown member.
    async fn member(&self, member_id: &str) -> Result<Option<MembershipView>, AppError>;
    /// Wait (bounded) until the views have applied `position`.
    async fn wait_for_position(&self, position: u64);
    async fn search(&self, query: MemberQuery) -> Result<MemberPage, AppError>;
    async fn consumers(&self) -> Result<Vec<ConsumerStatus>, AppError>;
    async fn execute(&self, command: PortalCommand) -> Result<CommandAck, AppError>;
}
