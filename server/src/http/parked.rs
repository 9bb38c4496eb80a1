//! Parked events (see `projector::parking`): staff list what a consumer holds back; admins retry
//! or skip a parked stream. The runner that holds the stream (on this node or the one that runs
//! the consumers) carries the action out; the answer waits a little for it.

use super::auth::JsonBody;
use super::error::ApiError;
use super::guard::Authed;
use crate::projector::parking::Action as ParkAction;
use crate::AppState;
use app::domain::access::Action;
use app::views::ParkedStream;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::time::{Duration, Instant};

/// How long a retry or skip answer waits for the runner before it answers 202.
const WAIT_FOR_RUNNER: Duration = Duration::from_secs(10);

/// Events listed per parked stream.
const EVENTS_LISTED: usize = 100;

/// One event a consumer holds back.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HeldEvent {
    position: i64,
    event_type: String,
    schema_version: i64,
    recorded_at: String,
}

/// A parked (or skipped) stretch of a stream, with its events while parked.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ParkedItem {
    #[serde(flatten)]
    parked: ParkedStream,
    /// Parked: the events held back, oldest first (at most 100).
    events: Vec<HeldEvent>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ParkedList {
    /// Streams parked now.
    items: Vec<ParkedItem>,
    /// Stretches skipped, with who skipped them and why.
    skipped: Vec<ParkedStream>,
}

/// `GET /api/projections/{name}/parked` (staff).
#[utoipa::path(get, path = "/api/projections/{name}/parked", tag = "operations",
    params(("name" = String, Path, description = "A consumer's name, as `GET /api/projections` lists it")),
    responses((status = 200, description = "What the consumer holds back, and what was skipped", body = ParkedList),
              (status = 404, description = "No such consumer", body = super::error::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    caller: Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.may(Action::Operations)?;
    let Some(all) = state.consumers.parked(&name).await? else {
        return Err(ApiError::NotFound(format!("no consumer called '{name}'")));
    };
    let (open, skipped): (Vec<_>, Vec<_>) = all.into_iter().partition(|p| p.skipped_through.is_none());
    let mut items = Vec::with_capacity(open.len());
    for parked in open {
        let events = state.store.read_stream(&parked.stream_id).await?;
        let from = i64::try_from(parked.from_position).unwrap_or(i64::MAX);
        let events = (events.into_iter().filter(|e| e.position >= from).take(EVENTS_LISTED))
            .map(|e| HeldEvent {
                position: e.position,
                event_type: e.event_type,
                schema_version: e.schema_version,
                recorded_at: e.recorded_at,
            })
            .collect();
        items.push(ParkedItem { parked, events });
    }
    Ok(Json(ParkedList { items, skipped }).into_response())
}

/// What a retry or skip came to.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ActionOutcome {
    pub stream_id: String,
    /// `applied` (retried: the stream is no longer parked), `parked` (retried and failed again;
    /// `error` says why), `skipped`, or `pending` (asked for; the runner has not carried it out
    /// within 10 s).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `POST /api/projections/{name}/parked/{stream}/retry` (admin).
#[utoipa::path(post, path = "/api/projections/{name}/parked/{stream}/retry", tag = "operations",
    params(("name" = String, Path, description = "The consumer"), ("stream" = String, Path, description = "The parked stream, e.g. member-42")),
    responses((status = 200, description = "Retried: applied, or parked again with the error", body = ActionOutcome),
              (status = 202, description = "Asked for; not carried out yet", body = ActionOutcome),
              (status = 404, description = "That stream is not parked for that consumer", body = super::error::ErrorBody)))]
pub async fn retry(
    State(state): State<AppState>,
    caller: Authed,
    Path((name, stream)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    act(&state, &caller, &name, &stream, ParkAction::Retry, None).await
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipBody {
    /// Why the events are skipped (kept with the record): 1 to 500 characters.
    reason: String,
}

/// `POST /api/projections/{name}/parked/{stream}/skip` (admin): the parked events are never
/// applied by this consumer; the reason is recorded.
#[utoipa::path(post, path = "/api/projections/{name}/parked/{stream}/skip", tag = "operations", request_body = SkipBody,
    params(("name" = String, Path, description = "The consumer"), ("stream" = String, Path, description = "The parked stream, e.g. member-42")),
    responses((status = 200, description = "Skipped", body = ActionOutcome),
              (status = 202, description = "Asked for; not carried out yet", body = ActionOutcome),
              (status = 400, description = "No reason given", body = super::error::ErrorBody),
              (status = 404, description = "That stream is not parked for that consumer", body = super::error::ErrorBody)))]
pub async fn skip(
    State(state): State<AppState>,
    caller: Authed,
    Path((name, stream)): Path<(String, String)>,
    JsonBody(body): JsonBody<SkipBody>,
) -> Result<Response, ApiError> {
    act(&state, &caller, &name, &stream, ParkAction::Skip, Some(&body.reason)).await
}

async fn act(
    state: &AppState,
    caller: &Authed,
    name: &str,
    stream: &str,
    action: ParkAction,
    reason: Option<&str>,
) -> Result<Response, ApiError> {
    caller.may(Action::OperateViews)?;
    let outcome = carry_out(state, name, stream, action, reason, &caller.0.actor()).await?;
    let status = if outcome.outcome == "pending" { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(outcome)).into_response())
}

/// Ask for `action` on a parked stream and wait (at most 10 s) for the runner to carry it out.
/// A skip needs a reason (1 to 500 characters).
pub async fn carry_out(
    state: &AppState,
    name: &str,
    stream: &str,
    action: ParkAction,
    reason: Option<&str>,
    actor: &str,
) -> Result<ActionOutcome, ApiError> {
    let reason = reason.map(str::trim);
    if action == ParkAction::Skip && !reason.is_some_and(|r| (1..=500).contains(&r.chars().count())) {
        return Err(ApiError::InvalidRequest("reason must be 1 to 500 characters".into()));
    }
    if !state.consumers.request(name, stream, action, reason, actor).await? {
        return Err(ApiError::NotFound(format!("'{stream}' is not parked for '{name}'")));
    }
    let deadline = Instant::now() + WAIT_FOR_RUNNER;
    loop {
        let all = state.consumers.parked(name).await?.unwrap_or_default();
        let open = all.iter().find(|p| p.stream_id == stream && p.skipped_through.is_none());
        let answer = |outcome, error| ActionOutcome { stream_id: stream.to_string(), outcome, error };
        match (action, open) {
            (_, Some(p)) if p.action.is_none() => return Ok(answer("parked", Some(p.error.clone()))),
            (ParkAction::Retry, None) => return Ok(answer("applied", None)),
            (ParkAction::Skip, None) => return Ok(answer("skipped", None)),
            _ if Instant::now() >= deadline => return Ok(answer("pending", None)),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
