//! Identity endpoints (API.md "Identity and access"): sign-up, sign-in and out, who am I, access
//! links, keys, people accounts. The work is in `identity`, shared with the server functions.

use super::error::ApiError;
use super::guard::Authed;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignUpBody {
    name: String,
    email: String,
    password: String,
}

/// `POST /api/signup`: 201 with the enrolment's answer; the response signs the member in.
pub async fn sign_up(
    State(state): State<AppState>,
    Sessioned(session): Sessioned,
    JsonBody(body): JsonBody<SignUpBody>,
) -> Result<Response, ApiError> {
    let answer = identity::sign_up(&state, &session, &body.name, &body.email, &body.password).await?;
    let status = StatusCode::from_u16(answer.status).map_err(ApiError::internal)?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], answer.body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignInBody {
    email: String,
    password: String,
}

/// `POST /api/session`.
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
pub async fn sign_out(State(state): State<AppState>, Sessioned(session): Sessioned) -> Result<StatusCode, ApiError> {
    identity::sign_out(&state, &session).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /api/me`.
pub async fn me(State(state): State<AppState>, caller: Authed) -> Json<identity::Me> {
    Json(identity::me(&state, &caller.0).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordBody {
    current_password: String,
    new_password: String,
}

/// `PUT /api/me/password`: 204; every other session of the account ends.
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimBody {
    token: String,
    password: String,
}

/// `POST /api/claim`: what the `/claim/<token>` page does, for clients without the page.
pub async fn claim(
    State(state): State<AppState>,
    Sessioned(session): Sessioned,
    JsonBody(body): JsonBody<ClaimBody>,
) -> Result<Response, ApiError> {
    let me = identity::claim(&state, &session, &body.token, &body.password).await?;
    Ok(Json(me).into_response())
}

/// `POST /api/members/{id}/access-link` (staff): 201 `{url, expires_at}`.
pub async fn member_link(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let link = identity::member_link(&state, &caller.0, &id).await?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    name: String,
    role: String,
}

/// `POST /api/keys` (admin): 201 `{id, name, role, token}`.
pub async fn create_key(
    State(state): State<AppState>,
    caller: Authed,
    JsonBody(body): JsonBody<KeyBody>,
) -> Result<Response, ApiError> {
    let (key, token) = identity::create_key(&state, &caller.0, &body.name, &body.role).await?;
    let body = serde_json::json!({"id": key.id, "name": key.name, "role": key.role, "token": token});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /api/keys` (admin).
pub async fn keys(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    let items = identity::keys(&state, &caller.0).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// `DELETE /api/keys/{id}` (admin): 204.
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    identity::revoke_key(&state, &caller.0, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonBody {
    email: String,
    name: String,
    role: String,
}

/// `POST /api/users` (admin): 201, the account and its first access link.
pub async fn create_person(
    State(state): State<AppState>,
    caller: Authed,
    JsonBody(body): JsonBody<PersonBody>,
) -> Result<Response, ApiError> {
    let created = identity::create_person(&state, &caller.0, &body.email, &body.name, &body.role).await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// `GET /api/users` (admin).
pub async fn people(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    let items = identity::people(&state, &caller.0).await?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersonChange {
    role: Option<String>,
    disabled: Option<bool>,
}

/// `PATCH /api/users/{id}` (admin): 204.
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
pub async fn person_link(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let link = identity::person_link(&state, &caller.0, &id).await?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}
