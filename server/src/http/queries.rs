//! Query endpoints (API.md "Queries"): views only, with the view position in `X-View-Position`.

use super::error::ApiError;
use super::guard::Authed;
use crate::queries;
use crate::AppState;
use app::domain::access::Action;
use app::domain::validate;
use app::views::MemberQuery;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::time::Duration;

pub const DEFAULT_WAIT_MS: u64 = 2_000;
pub const MAX_WAIT_MS: u64 = 10_000;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ViewParams {
    /// Read-your-writes: wait until the views are current to this position (a command's answer).
    min_position: Option<i64>,
    /// How long to wait for `min_position`, in milliseconds (default 2,000, at most 10,000).
    wait_ms: Option<u64>,
    /// Staff: the view as it was right after this position (from the log; an audit), instead of
    /// the current one. At most the head.
    at_position: Option<i64>,
}

fn query_params<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t).map_err(|e| ApiError::InvalidRequest(e.body_text()))
}

fn with_view_headers(mut response: Response, position: i64, stale: bool) -> Response {
    let headers = response.headers_mut();
    headers.insert("x-view-position", HeaderValue::from(position));
    if stale {
        headers.insert("x-view-stale", HeaderValue::from_static("true"));
    }
    response
}

/// `GET /api/members/{id}`: the stored view, as stored; with `min_position`, read-your-writes;
/// with `at_position` (staff), as it was after that position.
#[utoipa::path(get, path = "/api/members/{id}", tag = "queries", params(("id" = String, Path, description = "The member's id"), ViewParams),
    responses((status = 200, description = "The member's view, as stored", body = app::views::MembershipView,
        headers(("x-view-position" = i64, description = "The position the views are current to"),
                ("x-view-stale" = bool, description = "Present when `min_position` was not reached in time")))))]
pub async fn get_member(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
    params: Result<Query<ViewParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.may(Action::ReadMember(&id))?;
    let params = query_params(params)?;
    let id = validate::id("member id", &id).map_err(ApiError::InvalidRequest)?;
    if let Some(at) = params.at_position {
        return member_at(&state, &caller, &id, at).await;
    }
    let mut stale = false;
    if let Some(min) = params.min_position {
        let wait = params.wait_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS);
        stale = !state.feed.wait_for(min, Duration::from_millis(wait)).await;
    }
    // Read the applied position before the row: the row is then at least that fresh.
    let position = state.feed.position();
    let response = match queries::member_view_cached(&state.store, &state.feed.cache, &id).await? {
        Some((json, _)) => {
            let body = axum::body::Body::from(axum::body::Bytes::copy_from_slice(json.as_bytes()));
            ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
        }
        None => ApiError::MemberNotFound(id).into_response(),
    };
    Ok(with_view_headers(response, position, stale))
}

/// `GET /api/members/{id}?at_position=P` (staff): the view after position P, from the log.
async fn member_at(state: &AppState, caller: &Authed, id: &str, at: i64) -> Result<Response, ApiError> {
    caller.may(Action::ManageMembers)?;
    let head = state.store.head().await?;
    if !(0..=head).contains(&at) {
        return Err(ApiError::InvalidRequest(format!("at_position must be between 0 and the head ({head})")));
    }
    match queries::member_view_at(&state.store, id, at).await {
        Ok(Some(view)) => Ok(with_view_headers(Json(view).into_response(), at, false)),
        Ok(None) => Err(ApiError::MemberNotFound(id.to_string())),
        Err(err) => match err.downcast::<sqlx::Error>() {
            Ok(err) => Err(err.into()),
            Err(err) => Err(ApiError::Internal(err)),
        },
    }
}

/// `GET /api/members?q=&tier=&status=&limit=&after=`
#[utoipa::path(get, path = "/api/members", tag = "queries", params(MemberQuery),
    responses((status = 200, description = "A page of members, by name", body = app::views::MemberPage)))]
pub async fn list_members(
    State(state): State<AppState>,
    caller: Authed,
    params: Result<Query<MemberQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.may(Action::ManageMembers)?;
    let query = query_params(params)?;
    let position = state.feed.position();
    let page = queries::search_members(&state.store, &state.feed.cache, &query).await?;
    Ok(with_view_headers(Json(page).into_response(), position, false))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Events after this position (a page's `next`).
    after: Option<i64>,
    /// Events per page, 1 to 1,000 (the default).
    limit: Option<usize>,
}

/// A page of a member's history.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct EventPage {
    items: Vec<crate::store::StoredEvent>,
    /// The `after` of the next page; null on the last.
    next: Option<i64>,
}

/// Events per page of a member's history, at most and by default.
pub const MAX_EVENTS: usize = 1_000;

/// `GET /api/members/{id}/events?after=&limit=`: the audit trail, oldest first, a page at a
/// time; `next` is the `after` of the next page (null on the last).
#[utoipa::path(get, path = "/api/members/{id}/events", tag = "queries", params(("id" = String, Path, description = "The member's id"), EventParams),
    responses((status = 200, description = "The member's history, oldest first, a page at a time", body = EventPage)))]
pub async fn member_events(
    State(state): State<AppState>,
    caller: Authed,
    Path(id): Path<String>,
    params: Result<Query<EventParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    caller.may(Action::ReadMember(&id))?;
    let params = query_params(params)?;
    let limit = params.limit.unwrap_or(MAX_EVENTS);
    if limit == 0 || limit > MAX_EVENTS {
        return Err(ApiError::InvalidRequest(format!("limit must be between 1 and {MAX_EVENTS}")));
    }
    let id = validate::id("member id", &id).map_err(ApiError::InvalidRequest)?;
    let events = queries::member_events(&state.store, &id).await?;
    if events.is_empty() {
        return Err(ApiError::MemberNotFound(id));
    }
    let after = params.after.unwrap_or(0);
    let mut items: Vec<_> = events.into_iter().filter(|e| e.position > after).take(limit + 1).collect();
    let next = (items.len() > limit).then(|| {
        items.truncate(limit);
        items.last().map(|e| e.position)
    });
    Ok(Json(EventPage { items, next: next.flatten() }).into_response())
}
