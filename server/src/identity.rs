//! What people do with their identity: join, sign in and out, claim an access link, change a
//! password; and what staff and admins do with others' (access links, people accounts, keys).
//! The REST routes (`http::auth`) and the server functions (`portal`) both call these, so the two
//! surfaces cannot drift apart.

use crate::auth::accounts::{self, Account, AccountError, PersonInfo};
use crate::auth::keys::{KeyError, KeyInfo};
use crate::auth::links::{self, IssuedLink, LinkFor};
use crate::auth::sessions::{id_hash, SessionAuth, AUTH_KEY};
use crate::auth::Revoked;
use crate::commands::{Answer, Envelope, Meta, NewAccount};
use crate::http::commands as rest;
use crate::http::error::ApiError;
use crate::{queries, AppState};
use app::domain::access::{authorize, Action, Caller, Role};
use app::domain::validate;
use serde::Serialize;
use sqlx::Acquire;
use std::net::IpAddr;
use tower_sessions::Session;

/// `GET /api/me`, and what signing in answers.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Me {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member_id: Option<String>,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
}

/// A person's new account and the link that lets them set their password.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct NewPerson {
    #[serde(flatten)]
    pub person: PersonInfo,
    pub access_link: IssuedLink,
}

fn allow(caller: &Caller, action: Action) -> Result<(), ApiError> {
    authorize(caller, action).map_err(|denied| ApiError::denied(denied, ""))
}

/// A member's name, from their view (empty until the projector has it).
async fn member_name(state: &AppState, member_id: &str) -> String {
    match queries::member_view_cached(&state.store, &state.feed.cache, member_id).await {
        Ok(Some((json, _))) => serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v["name"].as_str().map(str::to_string))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

pub async fn me(state: &AppState, caller: &Caller) -> Me {
    match caller {
        Caller::Member { member_id, .. } => Me {
            kind: "member",
            member_id: Some(member_id.clone()),
            name: member_name(state, member_id).await,
            role: None,
        },
        Caller::Person { name, .. } => Me { kind: caller.kind(), member_id: None, name: name.clone(), role: None },
        Caller::Key { name, role, .. } => Me { kind: "key", member_id: None, name: name.clone(), role: Some(*role) },
        Caller::Anonymous => Me { kind: "anonymous", member_id: None, name: String::new(), role: None },
    }
}

/// Sign `session` in to `account`: a new session id (so one planted before sign-in is worth
/// nothing), the session that was there before ended (its sockets closed).
async fn start_session(state: &AppState, session: &Session, account: &str) -> Result<(), ApiError> {
    let before = session.id().map(|id| id_hash(&id));
    session.cycle_id().await.map_err(ApiError::internal)?;
    session.insert(AUTH_KEY, SessionAuth::new(account.to_string())).await.map_err(ApiError::internal)?;
    // Saved now rather than after the response: the caller may be a server function whose page
    // reads the session next, and a store error must not pass for a sign-in.
    session.save().await.map_err(ApiError::internal)?;
    if let Some(before) = before {
        state.auth.revoke(Revoked::Session(before)).await;
    }
    Ok(())
}

/// `POST /api/session`: an email and a password, checked against the accounts that email signs
/// in to (a person's, a member's, or both). Limited per address and per account.
pub async fn sign_in(
    state: &AppState,
    session: &Session,
    address: IpAddr,
    email: &str,
    password: &str,
) -> Result<Me, ApiError> {
    let account_key = validate::email_key(email);
    state.auth.limits.check(address, &account_key).map_err(ApiError::RateLimited)?;
    let too_long = password.chars().count() > validate::MAX_PASSWORD_CHARS;
    let candidates = if too_long || account_key.is_empty() {
        Vec::new()
    } else {
        state.auth.accounts.for_sign_in(&account_key).await?
    };
    let mut signed_in: Option<Account> = None;
    for account in candidates.iter().filter(|a| a.password_hash.is_some()) {
        if state.auth.passwords.verify(password, account.password_hash.as_deref()).await.map_err(ApiError::internal)? {
            signed_in = Some(account.clone());
            break;
        }
    }
    if candidates.iter().all(|a| a.password_hash.is_none()) && !too_long {
        // No account to check: take as long as a wrong password does.
        state.auth.passwords.verify(password, None).await.map_err(ApiError::internal)?;
    }
    let Some(account) = signed_in.filter(|a| !a.disabled) else {
        metrics::counter!("tally_sign_ins_total", "outcome" => "refused").increment(1);
        state.auth.limits.failed(address, &account_key).map_err(ApiError::RateLimited)?;
        return Err(ApiError::InvalidCredentials);
    };
    let caller = account.caller().ok_or(ApiError::InvalidCredentials)?;
    start_session(state, session, &account.id).await?;
    metrics::counter!("tally_sign_ins_total", "outcome" => "ok").increment(1);
    tracing::info!(actor = %caller.actor(), "signed in");
    Ok(me(state, &caller).await)
}

/// `DELETE /api/session`: end this session here and everywhere, and close its sockets.
pub async fn sign_out(state: &AppState, session: &Session) -> Result<(), ApiError> {
    let Some(id) = session.id() else { return Err(ApiError::Unauthenticated) };
    session.flush().await.map_err(ApiError::internal)?;
    state.auth.revoke(Revoked::Session(id_hash(&id))).await;
    Ok(())
}

/// `POST /api/signup`: a member joins. The enrolment goes through the command path with their
/// account in the same transaction; then the response signs them in. Returns the command's
/// answer.
pub async fn sign_up(
    state: &AppState,
    session: &Session,
    name: &str,
    email: &str,
    password: &str,
) -> Result<Answer, ApiError> {
    validate::password(password).map_err(ApiError::InvalidRequest)?;
    let body = rest::EnrollBody { name: name.to_string(), email: email.to_string(), member_id: None };
    // Validate before spending a hash on it.
    rest::enroll_command(body, None)?;
    let password_hash = state.auth.passwords.hash(password).await.map_err(ApiError::internal)?;
    let account = NewAccount { id: crate::auth::secret::random_id(), password_hash };
    let account_id = account.id.clone();
    let body = rest::EnrollBody { name: name.to_string(), email: email.to_string(), member_id: None };
    let command = rest::enroll_command(body, Some(account))?;
    let crate::commands::Command::Member { member_id, .. } = &command else {
        return Err(ApiError::internal(anyhow::anyhow!("an enrolment that is not a member command")));
    };
    let actor = format!("member:{member_id}");
    let envelope = Envelope {
        command,
        expected_version: None,
        idempotency: None,
        meta: Meta { correlation_id: uuid::Uuid::new_v4().to_string(), causation_id: None, actor },
    };
    let answer = rest::send(state, envelope).await?;
    start_session(state, session, &account_id).await?;
    metrics::counter!("tally_sign_ups_total").increment(1);
    Ok(answer)
}

/// Whether an access link can still be used (the claim page shows its form only then).
pub async fn link_usable(state: &AppState, token: &str) -> Result<bool, ApiError> {
    Ok(links::usable(&state.store, token).await?)
}

/// `/claim/<token>`: set the password of the account the link opens (making a member's account
/// if they have none yet), end that account's other sessions, and sign in. The link is used up
/// in the same transaction as the password is set.
pub async fn claim(state: &AppState, session: &Session, token: &str, password: &str) -> Result<Me, ApiError> {
    validate::password(password).map_err(ApiError::InvalidRequest)?;
    let hash = state.auth.passwords.hash(password).await.map_err(ApiError::internal)?;
    let gone = || ApiError::NotFound("this access link is unknown, already used, or expired".into());
    let mut conn = state.store.write.acquire().await?;
    let mut tx = conn.begin().await?;
    let account = match links::take(&mut tx, token).await?.ok_or_else(gone)? {
        LinkFor::Account(id) => {
            let done = sqlx::query("UPDATE accounts SET password_hash = $1 WHERE id = $2 AND disabled = 0")
                .bind(&hash)
                .bind(&id)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(gone());
            }
            id
        }
        LinkFor::Member(member_id) => {
            accounts::set_member_password(&mut tx, &member_id, &hash, &format!("member:{member_id}")).await?
        }
    };
    tx.commit().await?;
    drop(conn);
    // A reset: whoever was signed in to this account before is not any more.
    end_sessions(state, &account, None).await?;
    let caller = state.auth.accounts.caller(&account).await?.ok_or_else(gone)?;
    start_session(state, session, &account).await?;
    tracing::info!(actor = %caller.actor(), "access link used");
    Ok(me(state, &caller).await)
}

/// End every session of `account` but `except` (a session id's hash) on every node.
async fn end_sessions(state: &AppState, account: &str, except: Option<String>) -> Result<(), ApiError> {
    state.auth.sessions.end_account(account, except.as_deref()).await?;
    state.auth.revoke(Revoked::Account { account: account.to_string(), except }).await;
    Ok(())
}

/// The account a signed-in session belongs to (members and people; not keys).
fn account_of(caller: &Caller) -> Result<&str, ApiError> {
    match caller {
        Caller::Member { account_id, .. } | Caller::Person { account_id, .. } => Ok(account_id),
        Caller::Key { .. } => Err(ApiError::Forbidden("a key has no password".into())),
        Caller::Anonymous => Err(ApiError::Unauthenticated),
    }
}

/// Change the signed-in account's password; every other session of it ends.
pub async fn change_password(
    state: &AppState,
    session: &Session,
    caller: &Caller,
    address: IpAddr,
    current: &str,
    new: &str,
) -> Result<(), ApiError> {
    let account_id = account_of(caller)?.to_string();
    validate::password(new).map_err(ApiError::InvalidRequest)?;
    state.auth.limits.check(address, &account_id).map_err(ApiError::RateLimited)?;
    let account = state.auth.accounts.get(&account_id).await?.ok_or(ApiError::Unauthenticated)?;
    let ok = account.password_hash.is_some()
        && state.auth.passwords.verify(current, account.password_hash.as_deref()).await.map_err(ApiError::internal)?;
    if !ok {
        state.auth.limits.failed(address, &account_id).map_err(ApiError::RateLimited)?;
        return Err(ApiError::InvalidCredentials);
    }
    let hash = state.auth.passwords.hash(new).await.map_err(ApiError::internal)?;
    state.auth.accounts.set_password(&account_id, &hash).await?;
    end_sessions(state, &account_id, session.id().map(|id| id_hash(&id))).await?;
    tracing::info!(actor = %caller.actor(), "password changed");
    Ok(())
}

/// `POST /api/members/{id}/access-link` (staff): a link for the member to set their password.
pub async fn member_link(state: &AppState, caller: &Caller, member_id: &str) -> Result<IssuedLink, ApiError> {
    allow(caller, Action::ManageMembers)?;
    let member_id = validate::id("member id", member_id).map_err(ApiError::InvalidRequest)?;
    // Enrolled (the reservation of their email commits with the enrolment)?
    let known = sqlx::query("SELECT 1 AS known FROM email_reservations WHERE member_id = $1")
        .bind(&member_id)
        .fetch_optional(&state.store.read)
        .await?;
    if known.is_none() {
        return Err(ApiError::MemberNotFound(member_id));
    }
    let link = links::issue(&state.store, &LinkFor::Member(member_id.clone()), &caller.actor()).await?;
    tracing::info!(actor = %caller.actor(), member_id, "access link issued");
    Ok(link)
}

fn account_error(err: AccountError) -> ApiError {
    match err {
        AccountError::Invalid(message) => ApiError::InvalidRequest(message),
        AccountError::EmailTaken => ApiError::EmailTaken,
        AccountError::NotFound => ApiError::NotFound("no such account".into()),
        AccountError::Database(err) => ApiError::from(err),
    }
}

/// A person's account (admin), and the link that lets them set their password.
pub async fn create_person(
    state: &AppState,
    caller: &Caller,
    email: &str,
    name: &str,
    role: &str,
) -> Result<NewPerson, ApiError> {
    allow(caller, Action::Administer)?;
    let person = state.auth.accounts.create_person(email, name, role, &caller.actor()).await.map_err(account_error)?;
    let access_link = links::issue(&state.store, &LinkFor::Account(person.id.clone()), &caller.actor()).await?;
    tracing::info!(actor = %caller.actor(), account = person.id, role = person.role.as_str(), "person account created");
    Ok(NewPerson { person, access_link })
}

pub async fn people(state: &AppState, caller: &Caller) -> Result<Vec<PersonInfo>, ApiError> {
    allow(caller, Action::Administer)?;
    Ok(state.auth.accounts.people().await?)
}

/// Change a person's role, or disable or enable them (admin). Their sessions end either way, so
/// they act under the new rules from their next sign-in.
pub async fn update_person(
    state: &AppState,
    caller: &Caller,
    account_id: &str,
    role: Option<&str>,
    disabled: Option<bool>,
) -> Result<(), ApiError> {
    allow(caller, Action::Administer)?;
    if matches!(caller, Caller::Person { account_id: own, .. } if own == account_id) {
        return Err(ApiError::InvalidRequest("you cannot change your own role or disable yourself".into()));
    }
    state.auth.accounts.update_person(account_id, role, disabled).await.map_err(account_error)?;
    end_sessions(state, account_id, None).await?;
    tracing::info!(actor = %caller.actor(), account = account_id, ?role, ?disabled, "person account changed");
    Ok(())
}

/// A new access link for a person (admin): a password reset.
pub async fn person_link(state: &AppState, caller: &Caller, account_id: &str) -> Result<IssuedLink, ApiError> {
    allow(caller, Action::Administer)?;
    let person = state.auth.accounts.get(account_id).await?.filter(|a| a.member_id.is_none());
    if person.is_none() {
        return Err(ApiError::NotFound("no such account".into()));
    }
    Ok(links::issue(&state.store, &LinkFor::Account(account_id.to_string()), &caller.actor()).await?)
}

fn key_error(err: KeyError) -> ApiError {
    match err {
        KeyError::Invalid(message) => ApiError::InvalidRequest(message),
        KeyError::Database(err) => ApiError::from(err),
    }
}

/// `POST /api/keys` (admin): the key, and its token (shown here only).
pub async fn create_key(
    state: &AppState,
    caller: &Caller,
    name: &str,
    role: &str,
) -> Result<(KeyInfo, String), ApiError> {
    allow(caller, Action::Administer)?;
    let (key, token) = state.auth.keys.create(name, role, &caller.actor()).await.map_err(key_error)?;
    tracing::info!(actor = %caller.actor(), key = key.id, role = key.role.as_str(), "key created");
    Ok((key, token))
}

pub async fn keys(state: &AppState, caller: &Caller) -> Result<Vec<KeyInfo>, ApiError> {
    allow(caller, Action::Administer)?;
    Ok(state.auth.keys.list().await?)
}

/// `DELETE /api/keys/{id}` (admin): the next request with it is 401; its sockets close.
pub async fn revoke_key(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    allow(caller, Action::Administer)?;
    if !state.auth.keys.revoke(id).await? {
        return Err(ApiError::NotFound(format!("no key '{id}'")));
    }
    state.auth.revoke(Revoked::Key(id.to_string())).await;
    tracing::info!(actor = %caller.actor(), key = id, "key revoked");
    Ok(())
}
