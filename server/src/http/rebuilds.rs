//! Online (blue/green) rebuilds of a projection (see `projector::blue_green`): admins ask for one;
//! staff follow its progress. The node that runs the consumers carries it out.

use super::error::ApiError;
use super::guard::Authed;
use crate::projector::blue_green::Refused;
use crate::AppState;
use app::domain::access::Action;
use app::views::RebuildStatus;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::Unknown(_) => ApiError::NotFound(refused.to_string()),
            Refused::NotRebuildable(_) => ApiError::NotRebuildable(refused.to_string()),
            Refused::InProgress(_) => ApiError::RebuildInProgress(refused.to_string()),
            Refused::Database(err) => err.into(),
        }
    }
}

/// `POST /api/projections/{name}/rebuild` (admin): build the projection again from the log in
/// shadow tables while the current ones serve, then swap it in.
#[utoipa::path(post, path = "/api/projections/{name}/rebuild", tag = "operations",
    params(("name" = String, Path, description = "A projection: membership_view or member_search")),
    responses((status = 202, description = "Asked for; follow it with GET on the same path", body = RebuildStatus),
              (status = 404, description = "No such consumer", body = super::error::ErrorBody),
              (status = 409, description = "`not_rebuildable` (the loyalty policy appends events) or `rebuild_in_progress`", body = super::error::ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    caller: Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.may(Action::OperateViews)?;
    let build = state.consumers.rebuild(&name, &caller.0.actor()).await?;
    Ok((StatusCode::ACCEPTED, Json(build)).into_response())
}

/// `GET /api/projections/{name}/rebuild` (staff): the projection's newest online rebuild, under
/// way or finished.
#[utoipa::path(get, path = "/api/projections/{name}/rebuild", tag = "operations",
    params(("name" = String, Path, description = "A projection: membership_view or member_search")),
    responses((status = 200, description = "The newest rebuild, with its progress", body = RebuildStatus),
              (status = 404, description = "No such consumer, or it was never rebuilt online", body = super::error::ErrorBody)))]
pub async fn show(
    State(state): State<AppState>,
    caller: Authed,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    caller.may(Action::Operations)?;
    if state.consumers.get(&name).is_none() {
        return Err(ApiError::NotFound(format!("no consumer called '{name}'")));
    }
    match state.consumers.latest_rebuild(&name).await? {
        Some(build) => Ok(Json(build).into_response()),
        None => Err(ApiError::NotFound(format!("'{name}' was never rebuilt online"))),
    }
}
