//! Identity endpoints (API.md "Identity and access"): sign-up, sign-in and out, who am I, access
//! links, keys, people accounts. The work is in `identity`, shared with the server functions.

use super::error::ApiError;
use super::guard::Authed;
use crate::auth::links::IssuedLink;
use crate::commands::MemberOutcome;
use crate::identity;
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use tower_sessions::Session;

/// A JSON body of type `T`: 415 unless it says `application/json`, 413 over 64 KiB, 400 if it
/// does not parse.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(request: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes: Result<Bytes, BytesRejection> = Bytes::from_request(request, state).await;
        let bytes = bytes.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::InvalidRequest(rejection.body_text())
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| ApiError::InvalidRequest(format!("invalid body: {e}")))
    }
}

/// The client's address, for the sign-in limits: the connection's peer, or the last address a
/// trusted proxy put in the configured header (`TALLY_CLIENT_IP_HEADER`).
pub struct ClientAddress(pub IpAddr);

impl FromRequestParts<AppState> for ClientAddress {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        Ok(ClientAddress(client_address(parts, state.client_ip_header.as_deref())))
    }
}

pub fn client_address(parts: &Parts, header_name: Option<&str>) -> IpAddr {
    let forwarded = header_name.and_then(|name| forwarded_address(&parts.headers, name));
    let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
    forwarded.or(peer).unwrap_or(IpAddr::from([0, 0, 0, 0]))
}

fn forwarded_address(headers: &HeaderMap, name: &str) -> Option<IpAddr> {
    let value = headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).next_back()?;
    value.rsplit(',').next()?.trim().parse().ok()
}

fn session_of(parts: &Parts) -> Result<Session, ApiError> {
    parts.extensions.get::<Session>().cloned().ok_or_else(|| ApiError::internal(anyhow::anyhow!("no session layer")))
}

/// The request's session (the session layer is on every route).
pub struct Sessioned(pub Session);

impl<S: Send + Sync> FromRequestParts<S> for Sessioned {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        session_of(parts).map(Sessioned)
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignUpBody {
    name: String,
    email: String,
    password: String,
}

/// `POST /api/signup`: 201 with the enrolment's answer; the response signs the member in.
#[utoipa::path(post, path = "/api/signup", tag = "identity", request_body = SignUpBody, security(()),
    responses((status = 201, description = "Joined and signed in (the session cookie is set)", body = MemberOutcome)))]
pub async fn sign_up(
    State(state): State<AppState>,
    Sessioned(session): Sessioned,
    JsonBody(body): JsonBody<SignUpBody>,
) -> Result<Response, ApiError> {
    let answer = identity::sign_up(&state, &session, &body.name, &body.email, &body.password).await?;
    Ok((StatusCode::CREATED, Json(answer.outcome)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignInBody {
    email: String,
    password: String,
}

/// `POST /api/session`.
#[utoipa::path(post, path = "/api/session", tag = "identity", request_body = SignInBody, security(()),
    responses((status = 200, description = "Signed in (the session cookie is set)", body = identity::Me)))]
pub async fn sign_in(
    State(state): State<AppState>,
    Sessioned(session): Sessioned,
    ClientAddress(address): ClientAddress,
    JsonBody(body): JsonBody<SignInBody>,
) -> Result<Response, ApiError> {
    let me = identity::sign_in(&state, &session, address, &body.email, &body.password).await?;
    Ok(Json(me).into_response())
}

/// `DELETE /api/session`.
#[utoipa::path(delete, path = "/api/session", tag = "identity",
    responses((status = 204, description = "Signed out")))]
pub async fn sign_out(State(state): State<AppState>, Sessioned(session): Sessioned) -> Result<StatusCode, ApiError> {
    identity::sign_out(&state, &session).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/me`.
#[utoipa::path(get, path = "/api/me", tag = "identity",
    responses((status = 200, description = "Who is asking", body = identity::Me)))]
pub async fn me(State(state): State<AppState>, caller: Authed) -> Json<identity::Me> {
    Json(identity::me(&state, &caller.0).await)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// `PUT /api/me/password`: 204; every other session of the account ends.
#[utoipa::path(put, path = "/api/me/password", tag = "identity", request_body = PasswordBody,
    responses((status = 204, description = "Changed; the account's other sessions end")))]
pub async fn change_password(
    State(state): State<AppState>,
    caller: Authed,
    Sessioned(session): Sessioned,
    ClientAddress(address): ClientAddress,
    JsonBody(body): JsonBody<PasswordBody>,
) -> Result<StatusCode, ApiError> {
    identity::change_password(&state, &session, &caller.0, address, &body.current_password, &body.new_password).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    token: String,
    password: String,
}

/// `POST /api/claim`: what the `/claim/<token>` page does, for clients without the page.
#[utoipa::path(post, path = "/api/claim", tag = "identity", request_body = ClaimBody, security(()),
    responses((status = 200, description = "Password set and signed in", body = identity::Me)))]
pub async fn claim(
    State(state): State<AppState>,
    Sessioned(session): Sessioned,
    JsonBody(body): JsonBody<ClaimBody>,
) -> Result<Response, ApiError> {
    let me = identity::claim(&state, &session, &body.token, &body.password).await?;
    Ok(Json(me).into_response())
}

/// `POST /api/members/{id}/access-link` (staff): 201 `{url, expires_at}`.
#[utoipa::path(post, path = "/api/members/{id}/access-link", tag = "identity", params(("id" = String, Path, description = "The member's id")),
    responses((status = 201, description = "A link for the member to set their password", body = IssuedLink)))]
pub async fn member_link(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let link = identity::member_link(&state, &caller.0, &id).await?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: String,
    role: String,
}

/// A new key (`POST /api/keys`): its token is shown this once.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct NewKey {
    id: String,
    name: String,
    role: app::domain::access::Role,
    token: String,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct KeyList {
    items: Vec<crate::auth::keys::KeyInfo>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct PersonList {
    items: Vec<crate::auth::accounts::PersonInfo>,
}

/// `POST /api/keys` (admin): 201 `{id, name, role, token}`.
#[utoipa::path(post, path = "/api/keys", tag = "identity", request_body = KeyBody,
    responses((status = 201, description = "The key; its token is shown this once", body = NewKey)))]
pub async fn create_key(
    State(state): State<AppState>,
    caller: Authed,
    JsonBody(body): JsonBody<KeyBody>,
) -> Result<Response, ApiError> {
    let (key, token) = identity::create_key(&state, &caller.0, &body.name, &body.role).await?;
    Ok((StatusCode::CREATED, Json(NewKey { id: key.id, name: key.name, role: key.role, token })).into_response())
}

/// `GET /api/keys` (admin).
#[utoipa::path(get, path = "/api/keys", tag = "identity",
    responses((status = 200, description = "Every key", body = KeyList)))]
pub async fn keys(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    let items = identity::keys(&state, &caller.0).await?;
    Ok(Json(KeyList { items }).into_response())
}

/// `DELETE /api/keys/{id}` (admin): 204.
#[utoipa::path(delete, path = "/api/keys/{id}", tag = "identity", params(("id" = String, Path, description = "The key's id")),
    responses((status = 204, description = "Revoked; its sockets close")))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    identity::revoke_key(&state, &caller.0, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonBody {
    email: String,
    name: String,
    role: String,
}

/// `POST /api/users` (admin): 201, the account and its first access link.
#[utoipa::path(post, path = "/api/users", tag = "identity", request_body = PersonBody,
    responses((status = 201, description = "The account and its first access link", body = identity::NewPerson)))]
pub async fn create_person(
    State(state): State<AppState>,
    caller: Authed,
    JsonBody(body): JsonBody<PersonBody>,
) -> Result<Response, ApiError> {
    let created = identity::create_person(&state, &caller.0, &body.email, &body.name, &body.role).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /api/users` (admin).
#[utoipa::path(get, path = "/api/users", tag = "identity",
    responses((status = 200, description = "Every person's account", body = PersonList)))]
pub async fn people(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    let items = identity::people(&state, &caller.0).await?;
    Ok(Json(PersonList { items }).into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PersonChange {
    role: Option<String>,
    disabled: Option<bool>,
}

/// `PATCH /api/users/{id}` (admin): 204.
#[utoipa::path(patch, path = "/api/users/{id}", tag = "identity", params(("id" = String, Path, description = "The account's id")),
    request_body = PersonChange, responses((status = 204, description = "Changed")))]
pub async fn update_person(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PersonChange>,
) -> Result<StatusCode, ApiError> {
    if body.role.is_none() && body.disabled.is_none() {
        return Err(ApiError::InvalidRequest("give a new role, disabled, or both".into()));
    }
    identity::update_person(&state, &caller.0, &id, body.role.as_deref(), body.disabled).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/users/{id}/access-link` (admin): 201, a password reset link.
#[utoipa::path(post, path = "/api/users/{id}/access-link", tag = "identity", params(("id" = String, Path, description = "The account's id")),
    responses((status = 201, description = "A password reset link", body = IssuedLink)))]
pub async fn person_link(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let link = identity::person_link(&state, &caller.0, &id).await?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}
