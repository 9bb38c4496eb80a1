//! The server's implementation of the pages' [`Portal`] and [`Identity`]: views for reads, the
//! command bus for writes, `identity` for accounts, with the same validation and error codes as
//! the REST endpoints.

use crate::commands::{Envelope, Meta, Outcome};
use crate::http::commands as rest;
use crate::http::error::ApiError;
use crate::{identity, queries, AppState};
use app::api::{Identity, Portal, PortalCommand};
use app::domain::access::Caller;
use app::error::AppError;
use app::views::{
    AccessLink, CommandAck, ConsumerStatus, HistoryEntry, KeySummary, MemberPage, MemberQuery, MembershipView,
    PersonSummary, SignedIn,
};
use axum::http::request::Parts;
use tower_sessions::Session;

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

    async fn member_at(&self, member_id: &str, position: u64) -> Result<Option<MembershipView>, AppError> {
        if app::domain::validate::id("member id", member_id).is_err() {
            return Ok(None);
        }
        let at = i64::try_from(position).unwrap_or(i64::MAX);
        queries::member_view_at(&self.state.store, member_id, at).await.map_err(|err| app_err(ApiError::internal(err)))
    }

    async fn parked(&self) -> Result<Vec<app::views::ParkedRow>, AppError> {
        let mut rows = Vec::new();
        for name in self.state.consumers.names() {
            for stream in self.state.consumers.parked(name).await.map_err(app_err)?.unwrap_or_default() {
                let events = self.state.store.read_stream(&stream.stream_id).await.map_err(app_err)?;
                let through = stream.skipped_through.unwrap_or(u64::MAX);
                let held = events
                    .iter()
                    .filter(|e| (stream.from_position..=through).contains(&(e.position.max(0) as u64)))
                    .count();
                rows.push(app::views::ParkedRow { consumer: name.to_string(), held: held as u64, stream });
            }
        }
        Ok(rows)
    }

    async fn parked_action(
        &self,
        caller: &Caller,
        consumer: &str,
        stream_id: &str,
        reason: Option<&str>,
    ) -> Result<String, AppError> {
        use crate::projector::parking::Action;
        let action = if reason.is_some() { Action::Skip } else { Action::Retry };
        let done = crate::http::parked::carry_out(&self.state, consumer, stream_id, action, reason, &caller.actor())
            .await
            .map_err(app_err)?;
        Ok(match (done.outcome, done.error) {
            ("parked", Some(error)) => format!("failed again and stays parked ({error})"),
            ("applied", _) => "applied, no longer parked".into(),
            ("skipped", _) => "skipped".into(),
            _ => "asked for; the node that runs the consumers has not carried it out yet".into(),
        })
    }

    async fn rebuild(&self, caller: &Caller, projection: &str) -> Result<app::views::RebuildStatus, AppError> {
        self.state.consumers.rebuild(projection, &caller.actor()).await.map_err(app_err)
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

    async fn cdc_sources(&self) -> Result<Vec<app::views::CdcSource>, AppError> {
        Ok(self.state.cdc.status.list())
    }

    async fn execute(&self, caller: &Caller, command: PortalCommand) -> Result<CommandAck, AppError> {
        let command = match command {
            PortalCommand::Enroll { name, email } => {
                rest::enroll_command(rest::EnrollBody { name, email, member_id: None }, None)
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
            PortalCommand::UpdateProfile { member_id, name, email } => rest::profile_command(
                member_id.trim(),
                rest::ProfileBody { name: optional(name), email: optional(email) },
            ),
        }
        .map_err(app_err)?;
        let envelope = Envelope {
            command,
            expected_version: None,
            idempotency: None,
            meta: Meta { correlation_id: uuid::Uuid::new_v4().to_string(), causation_id: None, actor: caller.actor() },
        };
        let answer = rest::send(&self.state, envelope).await.map_err(|e| e.to_app_error())?;
        let position = answer.position().max(0) as u64;
        Ok(match answer.outcome {
            Outcome::Member(member) => CommandAck {
                member_id: Some(member.member_id),
                transaction_id: None,
                version: Some(member.version.max(0) as u64),
                position,
            },
            Outcome::Purchase(purchase) => {
                CommandAck { member_id: None, transaction_id: Some(purchase.transaction_id), version: None, position }
            }
        })
    }

    async fn history(&self, member_id: &str) -> Result<Vec<HistoryEntry>, AppError> {
        if app::domain::validate::id("member id", member_id).is_err() {
            return Ok(Vec::new());
        }
        let events = queries::member_events(&self.state.store, member_id).await.map_err(app_err)?;
        Ok(events
            .into_iter()
            .map(|event| HistoryEntry {
                position: event.position.max(0) as u64,
                actor: event.metadata["actor"].as_str().unwrap_or("unknown").to_string(),
                event_type: event.event_type,
                recorded_at: event.recorded_at,
                data: event.data.to_string(),
            })
            .collect())
    }

    fn secure_cookies(&self) -> bool {
        self.state.auth.config.https
    }
}

fn session(request: &Parts) -> Result<Session, AppError> {
    request
        .extensions
        .get::<Session>()
        .cloned()
        .ok_or_else(|| app_err(ApiError::internal(anyhow::anyhow!("no session layer"))))
}

fn signed_in(me: identity::Me) -> SignedIn {
    SignedIn { kind: me.kind.to_string(), member_id: me.member_id, name: me.name }
}

fn key_summary(key: crate::auth::keys::KeyInfo) -> KeySummary {
    KeySummary {
        id: key.id,
        name: key.name,
        role: key.role.as_str().to_string(),
        created_at: key.created_at,
        last_used_at: key.last_used_at,
    }
}

fn person_summary(person: crate::auth::accounts::PersonInfo) -> PersonSummary {
    PersonSummary {
        id: person.id,
        email: person.email,
        name: person.name,
        role: person.role.as_str().to_string(),
        disabled: person.disabled,
        created_at: person.created_at,
    }
}

fn access_link(link: crate::auth::links::IssuedLink) -> AccessLink {
    AccessLink { url: link.url, expires_at: link.expires_at }
}

#[async_trait::async_trait]
impl Identity for ServerPortal {
    async fn sign_in(&self, request: &Parts, email: &str, password: &str) -> Result<SignedIn, AppError> {
        let address = crate::http::auth::client_address(request, self.state.client_ip_header.as_deref());
        let me = identity::sign_in(&self.state, &session(request)?, address, email, password).await.map_err(app_err)?;
        Ok(signed_in(me))
    }

    async fn sign_out(&self, request: &Parts) -> Result<(), AppError> {
        identity::sign_out(&self.state, &session(request)?).await.map_err(app_err)
    }

    async fn join(&self, request: &Parts, name: &str, email: &str, password: &str) -> Result<SignedIn, AppError> {
        let answer =
            identity::sign_up(&self.state, &session(request)?, name, email, password).await.map_err(app_err)?;
        let member_id = match answer.outcome {
            Outcome::Member(member) => {
                // The browser is sent on to the member's own page next: wait (bounded) until the
                // projector has their view, so that page shows them rather than "not found".
                self.wait_for_position(member.position.max(0) as u64).await;
                Some(member.member_id)
            }
            Outcome::Purchase(_) => None,
        };
        Ok(SignedIn { kind: "member".into(), member_id, name: name.trim().to_string() })
    }

    async fn link_usable(&self, token: &str) -> Result<bool, AppError> {
        identity::link_usable(&self.state, token).await.map_err(app_err)
    }

    async fn claim(&self, request: &Parts, token: &str, password: &str) -> Result<SignedIn, AppError> {
        let me = identity::claim(&self.state, &session(request)?, token, password).await.map_err(app_err)?;
        Ok(signed_in(me))
    }

    async fn change_password(
        &self,
        request: &Parts,
        caller: &Caller,
        current: &str,
        new: &str,
    ) -> Result<(), AppError> {
        let address = crate::http::auth::client_address(request, self.state.client_ip_header.as_deref());
        identity::change_password(&self.state, &session(request)?, caller, address, current, new).await.map_err(app_err)
    }

    async fn member_link(&self, caller: &Caller, member_id: &str) -> Result<AccessLink, AppError> {
        identity::member_link(&self.state, caller, member_id).await.map(access_link).map_err(app_err)
    }

    async fn keys(&self, caller: &Caller) -> Result<Vec<KeySummary>, AppError> {
        let keys = identity::keys(&self.state, caller).await.map_err(app_err)?;
        Ok(keys.into_iter().map(key_summary).collect())
    }

    async fn create_key(&self, caller: &Caller, name: &str, role: &str) -> Result<(KeySummary, String), AppError> {
        let (key, token) = identity::create_key(&self.state, caller, name, role).await.map_err(app_err)?;
        Ok((key_summary(key), token))
    }

    async fn revoke_key(&self, caller: &Caller, id: &str) -> Result<(), AppError> {
        identity::revoke_key(&self.state, caller, id).await.map_err(app_err)
    }

    async fn people(&self, caller: &Caller) -> Result<Vec<PersonSummary>, AppError> {
        let people = identity::people(&self.state, caller).await.map_err(app_err)?;
        Ok(people.into_iter().map(person_summary).collect())
    }

    async fn create_person(
        &self,
        caller: &Caller,
        email: &str,
        name: &str,
        role: &str,
    ) -> Result<(PersonSummary, AccessLink), AppError> {
        let created = identity::create_person(&self.state, caller, email, name, role).await.map_err(app_err)?;
        Ok((person_summary(created.person), access_link(created.access_link)))
    }

    async fn update_person(
        &self,
        caller: &Caller,
        id: &str,
        role: Option<&str>,
        disabled: Option<bool>,
    ) -> Result<(), AppError> {
        identity::update_person(&self.state, caller, id, role, disabled).await.map_err(app_err)
    }

    async fn person_link(&self, caller: &Caller, id: &str) -> Result<AccessLink, AppError> {
        identity::person_link(&self.state, caller, id).await.map(access_link).map_err(app_err)
    }
}
