//! The server's side of the server functions (ssr only): the server crate implements these
//! traits and provides them as `Arc<dyn Portal>` and `Arc<dyn Identity>` in Leptos context for
//! every request.
//!
//! Server functions check who is asking before they call in (`access::authorize`); the
//! implementations act as that caller (the events' actor, the sessions it changes).

use crate::domain::access::Caller;
use crate::error::AppError;
use crate::views::{
    AccessLink, CommandAck, ConsumerStatus, HistoryEntry, KeySummary, MemberPage, MemberQuery, MembershipView,
    PersonSummary, SignedIn,
};

/// A command from a form, as typed (the server validates it like a REST body).
#[derive(Debug, Clone)]
pub enum PortalCommand {
    Enroll { name: String, email: String },
    Earn { member_id: String, points: i64, reason: String },
    Redeem { member_id: String, points: i64, reward: String },
    Suspend { member_id: String, reason: String },
    Reactivate { member_id: String },
    RecordPurchase { member_id: String, amount_cents: i64, currency: String, channel: String },
    UpdateProfile { member_id: String, name: String, email: String },
}

/// Memberships: the views, and commands on them.
#[async_trait::async_trait]
pub trait Portal: Send + Sync + 'static {
    /// The membership view, or None for an unknown member.
    async fn member(&self, member_id: &str) -> Result<Option<MembershipView>, AppError>;
    /// The view as it was right after `position` (staff: an audit), from the log; None when the
    /// member had not enrolled by then.
    async fn member_at(&self, member_id: &str, position: u64) -> Result<Option<MembershipView>, AppError>;
    /// Every stream a consumer holds back or skipped.
    async fn parked(&self) -> Result<Vec<crate::views::ParkedRow>, AppError>;
    /// Retry (no `reason`) or skip (with one) a parked stream as `caller`; what it came to, in
    /// words.
    async fn parked_action(
        &self,
        caller: &Caller,
        consumer: &str,
        stream_id: &str,
        reason: Option<&str>,
    ) -> Result<String, AppError>;
    /// Ask, as `caller`, for an online (blue/green) rebuild of a projection.
    async fn rebuild(&self, caller: &Caller, projection: &str) -> Result<crate::views::RebuildStatus, AppError>;
    /// Wait (bounded) until the views have applied `position`.
    async fn wait_for_position(&self, position: u64);
    async fn search(&self, query: MemberQuery) -> Result<MemberPage, AppError>;
    async fn consumers(&self) -> Result<Vec<ConsumerStatus>, AppError>;
    /// The change data capture sources, as `GET /api/cdc` lists them.
    async fn cdc_sources(&self) -> Result<Vec<crate::views::CdcSource>, AppError>;
    /// Run a command as `caller` (its actor in the events).
    async fn execute(&self, caller: &Caller, command: PortalCommand) -> Result<CommandAck, AppError>;
    /// A member's events, oldest first, with who caused each.
    async fn history(&self, member_id: &str) -> Result<Vec<HistoryEntry>, AppError>;
    /// Whether cookies this site sets must be `Secure` (its public URL is https).
    fn secure_cookies(&self) -> bool;
}

/// Identity: signing in and out, accounts, access links, keys. `request` is the request being
/// answered (its session, its client's address).
#[async_trait::async_trait]
pub trait Identity: Send + Sync + 'static {
    async fn sign_in(&self, request: &http::request::Parts, email: &str, password: &str) -> Result<SignedIn, AppError>;
    async fn sign_out(&self, request: &http::request::Parts) -> Result<(), AppError>;
    /// A member joins: enrolled and signed in, in one step.
    async fn join(
        &self,
        request: &http::request::Parts,
        name: &str,
        email: &str,
        password: &str,
    ) -> Result<SignedIn, AppError>;
    async fn link_usable(&self, token: &str) -> Result<bool, AppError>;
    async fn claim(&self, request: &http::request::Parts, token: &str, password: &str) -> Result<SignedIn, AppError>;
    async fn change_password(
        &self,
        request: &http::request::Parts,
        caller: &Caller,
        current: &str,
        new: &str,
    ) -> Result<(), AppError>;
    async fn member_link(&self, caller: &Caller, member_id: &str) -> Result<AccessLink, AppError>;
    async fn keys(&self, caller: &Caller) -> Result<Vec<KeySummary>, AppError>;
    /// A new key and its token (shown once).
    async fn create_key(&self, caller: &Caller, name: &str, role: &str) -> Result<(KeySummary, String), AppError>;
    async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<(), AppError>;
    async fn people(&self, caller: &Caller) -> Result<Vec<PersonSummary>, AppError>;
    /// A person's account and the link to set its password.
    async fn create_person(
        &self,
        caller: &Caller,
        email: &str,
        name: &str,
        role: &str,
    ) -> Result<(PersonSummary, AccessLink), AppError>;
    async fn update_person(
        &self,
        caller: &Caller,
        id: &str,
        role: Option<&str>,
        disabled: Option<bool>,
    ) -> Result<(), AppError>;
    async fn person_link(&self, caller: &Caller, id: &str) -> Result<AccessLink, AppError>;
}
