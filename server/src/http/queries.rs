//! Query endpoints (API.md "Queries"): views only, with the view position in `X-View-Position`.

use super::error::ApiError;
use crate::queries;
use crate::AppState;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ViewParams {
    min_position: Option<i64>,
    wait_ms: Option<u64>,
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

/// `GET /api/members/{id}`: the stored view, as stored; with `min_position`, read-your-writes.
pub async fn get_member(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: Result<Query<ViewParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(params)?;
    let id = validate::id("member id", &id).map_err(ApiError::InvalidRequest)?;
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

/// `GET /api/members?q=&tier=&status=&limit=&after=`
pub async fn list_members(
    State(state): State<AppState>,
    params: Result<Query<MemberQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query_params(params)?;
    let position = state.feed.position();
    let page = queries::search_members(&state.store, &state.feed.cache, &query).await?;
    Ok(with_view_headers(Json(page).into_response(), position, false))
}

/// `GET /api/members/{id}/events`: the audit trail.
pub async fn member_events(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = validate::id("member id", &id).map_err(ApiError::InvalidRequest)?;
    let items = queries::member_events(&state.store, &id).await?;
    if items.is_empty() {
        return Err(ApiError::MemberNotFound(id));
    }
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}
