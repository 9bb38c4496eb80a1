//! Command endpoints (API.md "Commands"): who may ask first, then parse and validate at the
//! edge, then hand the command to the bus with its `Idempotency-Key` and `If-Match`.

use super::error::ApiError;
use super::guard::Authed;
use crate::commands::{
    Command, Envelope, Idempotency, MemberAction, MemberOutcome, Meta, NewAccount, PurchaseOutcome, API_SCOPE,
};
use crate::AppState;
use app::domain::access::{Action, Caller};
use app::domain::transaction::{Channel, Purchase, MAX_AMOUNT_CENTS};
use app::domain::validate;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Deserialize;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    pub name: String,
    pub email: String,
    pub member_id: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProfileBody {
    pub name: Option<String>,
    pub email: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EarnBody {
    pub points: i64,
    pub reason: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RedeemBody {
    pub points: i64,
    pub reward: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SuspendBody {
    pub reason: Option<String>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReactivateBody {}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseBody {
    pub transaction_id: Option<String>,
    pub member_id: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
    pub channel: String,
}

/// A command request: the caller (signed in, or 401 before anything else is read), its headers
/// and its body, not yet parsed. Handlers first ask whether the caller may do this
/// ([`CommandRequest::may`]), then parse, then [`run`](CommandRequest::run).
pub struct CommandRequest {
    pub caller: Authed,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
}

impl<S: Send + Sync> FromRequest<S> for CommandRequest {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let (mut parts, body) = request.into_parts();
        let caller = Authed::from_request_parts(&mut parts, state).await?;
        // Reading the body needs the request's extensions (its size limit), not its headers.
        let (method, uri, headers) = (parts.method.clone(), parts.uri.clone(), std::mem::take(&mut parts.headers));
        let body = Bytes::from_request(Request::from_parts(parts, body), state).await;
        Ok(CommandRequest { caller, method, uri, headers, body })
    }
}

impl CommandRequest {
    pub fn may(&self, action: Action) -> Result<(), ApiError> {
        self.caller.may(action)
    }

    /// The body as JSON of type `T`, or a 400/413/415 that says what is wrong. An empty body
    /// counts as `{}` so `POST .../reactivate` works without one. Parsed once, straight into `T`.
    pub fn body<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        let bytes = match &self.body {
            Ok(bytes) => bytes.clone(),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::PayloadTooLarge)
            }
            Err(rejection) => return Err(ApiError::InvalidRequest(rejection.body_text())),
        };
        let empty = bytes.iter().all(u8::is_ascii_whitespace);
        if !empty && !is_json(&self.headers) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = if empty { Bytes::from_static(b"{}") } else { bytes };
        let typed = serde_json::from_slice(&bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ApiError::InvalidRequest(format!("invalid body: {e}")),
            _ => ApiError::InvalidRequest(format!("the body is not valid JSON: {e}")),
        })?;
        self.body = Ok(bytes);
        Ok(typed)
    }

    /// Hand the command to the bus with the caller as its actor, its `Idempotency-Key` (scoped to
    /// the caller) and `If-Match`; answer with what the bus answers (the stored answer, on a
    /// replay).
    pub async fn run(self, state: &AppState, command: Command) -> Result<Response, ApiError> {
        let body = self.body.as_ref().map(Bytes::as_ref).unwrap_or_default();
        let envelope = envelope(&self.method, &self.uri, &self.headers, body, command, &self.caller.0)?;
        dispatch(state, envelope).await
    }
}

/// `Content-Type: application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

fn invalid(message: String) -> ApiError {
    ApiError::InvalidRequest(message)
}

fn member_id(raw: &str) -> Result<String, ApiError> {
    validate::id("member id", raw).map_err(invalid)
}

/// Build the envelope from headers: idempotency key (scoped to the caller, with the canonical
/// request), If-Match, ids.
fn envelope(
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    command: Command,
    caller: &Caller,
) -> Result<Envelope, ApiError> {
    let header = |name: &str| headers.get(name).map(|v| v.to_str().map(str::trim));
    let expected_version = match header("if-match") {
        None => None,
        Some(Ok(v)) => Some(
            v.trim_matches('"')
                .parse::<i64>()
                .ok()
                .filter(|v| *v >= 0)
                .ok_or_else(|| invalid(format!("If-Match must be a stream version (a whole number), got '{v}'")))?,
        ),
        Some(Err(_)) => return Err(invalid("If-Match must be a stream version".into())),
    };
    let actor = caller.actor();
    let idempotency = match header("idempotency-key") {
        None => None,
        Some(Ok(key)) if !key.is_empty() && key.chars().count() <= 200 => {
            // serde_json sorts object keys, so the same body in another layout is the same request.
            let body: serde_json::Value =
                serde_json::from_slice(body).map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
            Some(Idempotency {
                // API.md: the same key sent by two principals names two different commands.
                scope: format!("{API_SCOPE}{actor}"),
                key: key.to_string(),
                request: format!("{} {} if-match={:?} {}", method, uri.path(), expected_version, body),
                unused: false,
            })
        }
        Some(_) => return Err(invalid("Idempotency-Key must be 1 to 200 visible characters".into())),
    };
    let correlation_id = match header("x-request-id") {
        Some(Ok(id)) if !id.is_empty() && id.len() <= 200 => id.to_string(),
        _ => uuid::Uuid::new_v4().to_string(),
    };
    Ok(Envelope { command, expected_version, idempotency, meta: Meta { correlation_id, causation_id: None, actor } })
}

/// Run a command on the bus; a refusal becomes the API error (naming the member, when unknown).
pub async fn send(state: &AppState, envelope: Envelope) -> Result<crate::commands::Answer, ApiError> {
    let member = match &envelope.command {
        Command::Member { member_id, .. } => Some(member_id.clone()),
        Command::RecordPurchase(_) => None,
    };
    state.bus.send(envelope).await.map_err(|e| match ApiError::from(e) {
        ApiError::MemberNotFound(_) => ApiError::MemberNotFound(member.unwrap_or_default()),
        other => other,
    })
}

/// API.md: an enrolment answers 201, a purchase 202 (recorded; its points follow), the rest 200.
pub fn status_of(command: &Command) -> StatusCode {
    match command {
        Command::Member { action: MemberAction::Enroll { .. }, .. } => StatusCode::CREATED,
        Command::RecordPurchase(_) => StatusCode::ACCEPTED,
        Command::Member { .. } => StatusCode::OK,
    }
}

/// Send to the bus and turn the outcome into the HTTP response (the stored one, on a replay).
pub async fn dispatch(state: &AppState, envelope: Envelope) -> Result<Response, ApiError> {
    let status = status_of(&envelope.command);
    let answer = send(state, envelope).await?;
    let mut response = (status, axum::Json(&answer.outcome)).into_response();
    if answer.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

#[utoipa::path(post, path = "/api/members", tag = "commands", request_body = EnrollBody,
    responses((status = 201, description = "Enrolled", body = MemberOutcome)))]
pub async fn enroll(State(state): State<AppState>, mut req: CommandRequest) -> Result<Response, ApiError> {
    req.may(Action::ManageMembers)?;
    let command = enroll_command(req.body()?, None)?;
    req.run(&state, command).await
}

/// An enrolment; with `account`, the member's credentials are stored with it (sign-up).
pub fn enroll_command(req: EnrollBody, account: Option<NewAccount>) -> Result<Command, ApiError> {
    let id = match req.member_id.as_deref() {
        Some(id) => member_id(id)?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    let name = validate::name(&req.name).map_err(invalid)?;
    let email = validate::email(&req.email).map_err(invalid)?;
    Ok(Command::Member { member_id: id, action: MemberAction::Enroll { name, email, account } })
}

#[utoipa::path(patch, path = "/api/members/{id}", tag = "commands", params(("id" = String, Path, description = "The member's id")), request_body = ProfileBody,
    responses((status = 200, description = "Profile changed", body = MemberOutcome)))]
pub async fn update_profile(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut req: CommandRequest,
) -> Result<Response, ApiError> {
    req.may(Action::UpdateProfile(&id))?;
    let command = profile_command(&id, req.body()?)?;
    req.run(&state, command).await
}

pub fn profile_command(id: &str, req: ProfileBody) -> Result<Command, ApiError> {
    if req.name.is_none() && req.email.is_none() {
        return Err(invalid("give a new name, a new email, or both".into()));
    }
    let name = req.name.as_deref().map(validate::name).transpose().map_err(invalid)?;
    let email = req.email.as_deref().map(validate::email).transpose().map_err(invalid)?;
    Ok(Command::Member { member_id: member_id(id)?, action: MemberAction::UpdateProfile { name, email } })
}

pub fn earn_command(id: &str, req: EarnBody) -> Result<Command, ApiError> {
    let points = validate::points(req.points).map_err(invalid)?;
    let reason = validate::text("reason", req.reason.as_deref()).map_err(invalid)?;
    Ok(Command::Member { member_id: member_id(id)?, action: MemberAction::Earn { points, reason } })
}

pub fn redeem_command(id: &str, req: RedeemBody) -> Result<Command, ApiError> {
    let points = validate::points(req.points).map_err(invalid)?;
    let reward = validate::text("reward", req.reward.as_deref()).map_err(invalid)?;
    Ok(Command::Member { member_id: member_id(id)?, action: MemberAction::Redeem { points, reward } })
}

pub fn suspend_command(id: &str, req: SuspendBody) -> Result<Command, ApiError> {
    let reason = validate::text("reason", req.reason.as_deref()).map_err(invalid)?;
    Ok(Command::Member { member_id: member_id(id)?, action: MemberAction::Suspend { reason } })
}

pub fn reactivate_command(id: &str) -> Result<Command, ApiError> {
    Ok(Command::Member { member_id: member_id(id)?, action: MemberAction::Reactivate })
}

#[utoipa::path(post, path = "/api/members/{id}/points/earn", tag = "commands", params(("id" = String, Path, description = "The member's id")), request_body = EarnBody,
    responses((status = 200, description = "Points earned", body = MemberOutcome)))]
pub async fn earn(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut req: CommandRequest,
) -> Result<Response, ApiError> {
    req.may(Action::ManageMembers)?;
    let command = earn_command(&id, req.body()?)?;
    req.run(&state, command).await
}

#[utoipa::path(post, path = "/api/members/{id}/points/redeem", tag = "commands", params(("id" = String, Path, description = "The member's id")), request_body = RedeemBody,
    responses((status = 200, description = "Points redeemed", body = MemberOutcome)))]
pub async fn redeem(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut req: CommandRequest,
) -> Result<Response, ApiError> {
    req.may(Action::Redeem(&id))?;
    let command = redeem_command(&id, req.body()?)?;
    req.run(&state, command).await
}

#[utoipa::path(post, path = "/api/members/{id}/suspend", tag = "commands", params(("id" = String, Path, description = "The member's id")), request_body = SuspendBody,
    responses((status = 200, description = "Suspended", body = MemberOutcome)))]
pub async fn suspend(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut req: CommandRequest,
) -> Result<Response, ApiError> {
    req.may(Action::ManageMembers)?;
    let command = suspend_command(&id, req.body()?)?;
    req.run(&state, command).await
}

#[utoipa::path(post, path = "/api/members/{id}/reactivate", tag = "commands", params(("id" = String, Path, description = "The member's id")), request_body(content = Option<ReactivateBody>),
    responses((status = 200, description = "Reactivated", body = MemberOutcome)))]
pub async fn reactivate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    mut req: CommandRequest,
) -> Result<Response, ApiError> {
    req.may(Action::ManageMembers)?;
    let ReactivateBody {} = req.body()?;
    let command = reactivate_command(&id)?;
    req.run(&state, command).await
}

pub fn purchase_command(req: PurchaseBody, performed_at: String) -> Result<Command, ApiError> {
    let transaction_id = match req.transaction_id.as_deref() {
        Some(id) => validate::id("transaction_id", id).map_err(invalid)?,
        None => uuid::Uuid::new_v4().to_string(),
    };
    let member_id = req.member_id.as_deref().map(member_id).transpose()?;
    if req.amount_cents < 1 || req.amount_cents as u64 > MAX_AMOUNT_CENTS {
        return Err(invalid(format!("amount_cents must be between 1 and {MAX_AMOUNT_CENTS}")));
    }
    let currency = validate::currency(&req.currency).map_err(invalid)?;
    let channel = Channel::parse(&req.channel)
        .ok_or_else(|| invalid(format!("channel must be \"pos\" or \"ecommerce\", got \"{}\"", req.channel)))?;
    Ok(Command::RecordPurchase(Purchase {
        transaction_id,
        member_id,
        amount_cents: req.amount_cents as u64,
        currency,
        channel,
        performed_at,
    }))
}

#[utoipa::path(post, path = "/api/transactions", tag = "commands", request_body = PurchaseBody,
    responses((status = 202, description = "Recorded; the loyalty policy turns it into points", body = PurchaseOutcome)))]
pub async fn record_purchase(State(state): State<AppState>, mut req: CommandRequest) -> Result<Response, ApiError> {
    req.may(Action::RecordPurchase)?;
    let command = purchase_command(req.body()?, crate::clock::now())?;
    req.run(&state, command).await
}
