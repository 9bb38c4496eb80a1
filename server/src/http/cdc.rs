//! Change data capture over HTTP: Debezium change events posted by a `cdc` key, and the sources'
//! status for staff (see `cdc`).

use super::commands::CommandRequest;
use super::error::ApiError;
use super::guard::Authed;
use crate::AppState;
use app::domain::access::Action;
use app::views::{CdcRows, CdcSource};
use axum::extract::{Path, State};
use axum::Json;

/// What became of a posted batch of change events.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct CdcReceipt {
    /// Row changes in the body (tombstones, truncates and messages left out).
    pub changes: usize,
    pub rows: CdcRows,
}

/// `POST /api/cdc/{source}` (a `cdc` key, or an admin): Debezium change events of a configured
/// source, applied exactly once by their position in the source. 200 once every change is
/// committed (or refused by the member's rules, which is counted and not worth sending again);
/// 400 if any event is malformed (then none is applied); 503 when the store cannot take them
/// (send the same events again: what did land is recognised).
#[utoipa::path(post, path = "/api/cdc/{source}", tag = "cdc",
    params(("source" = String, Path, description = "A source named in the CDC configuration")),
    request_body(content = serde_json::Value, description = "A Debezium change event, or an array of them"),
    responses((status = 200, description = "Applied (or recognised as applied before)", body = CdcReceipt),
              (status = 400, description = "`invalid_request`: an event is not a Debezium change event", body = super::error::ErrorBody),
              (status = 404, description = "`not_found`: no such source", body = super::error::ErrorBody)))]
pub async fn receive(
    State(state): State<AppState>,
    Path(source): Path<String>,
    mut req: CommandRequest,
) -> Result<Json<CdcReceipt>, ApiError> {
    req.may(Action::FeedChanges)?;
    let config =
        state.cdc.config.source(&source).ok_or_else(|| ApiError::NotFound(format!("no CDC source '{source}'")))?;
    let body: serde_json::Value = req.body()?;
    let changes = crate::cdc::debezium::parse(config, &body).map_err(ApiError::InvalidRequest)?;
    let applied = match crate::cdc::apply(&state.bus, &state.cdc.status, config, &changes).await {
        Ok(applied) => applied,
        Err(err) => {
            // Told to the sender (503: send again), and shown as the source's last error; not a
            // failing part of the node, since only the sender's next attempt can clear it.
            state.cdc.status.row_error(&source, &format!("not applied, the sender is asked to send again: {err}"));
            return Err(err.into());
        }
    };
    let lag = changes
        .last()
        .and_then(|c| c.committed_at)
        .map(|at| (chrono::Utc::now() - at).num_milliseconds().max(0) as f64 / 1000.0);
    state.cdc.status.state(&source, "reading");
    state.cdc.status.counted(&source, &applied.outcomes, applied.last_position.as_deref(), lag);
    let mut rows = CdcRows::default();
    for outcome in &applied.outcomes {
        outcome.count_in(&mut rows);
    }
    Ok(Json(CdcReceipt { changes: changes.len(), rows }))
}

/// `GET /api/cdc` (staff): every configured source, as this node sees it.
#[utoipa::path(get, path = "/api/cdc", tag = "cdc",
    responses((status = 200, description = "The configured sources", body = [CdcSource])))]
pub async fn list(State(state): State<AppState>, caller: Authed) -> Result<Json<Vec<CdcSource>>, ApiError> {
    caller.may(Action::Operations)?;
    Ok(Json(state.cdc.status.list()))
}
