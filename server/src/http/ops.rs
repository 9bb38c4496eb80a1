//! Operations: health, metrics, consumer status.

use super::error::ApiError;
use super::guard::Authed;
use crate::AppState;
use app::domain::access::Action;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HealthQuery {
    /// Present (any value, or none: `?verbose`): every part and why it fails (staff).
    verbose: Option<String>,
}

/// What `/healthz` answers.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct HealthBody {
    /// `ok` or `unavailable`.
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    /// Limits passed that need attention but leave the node serving (a CDC slot holding back too
    /// much of its source's WAL): the status stays `ok`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
    /// With `?verbose`: every background part, and why it fails.
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<Vec<crate::health::PartReport>>,
}

/// 200 `{"status": "ok"}` when this node can serve and accept writes; 503 `{"status":
/// "unavailable", "reason"}` when the store does not answer, writes are stopped, the command
/// writer is gone, or a background part has been failing longer than allowed (see `health`).
/// With `?verbose` (staff) it also lists every part, with its restarts.
#[utoipa::path(get, path = "/healthz", tag = "operations", params(HealthQuery), security((), ("bearer" = [])),
    responses((status = 200, description = "Serving and taking writes", body = HealthBody),
              (status = 503, description = "Not fit to serve, and why", body = HealthBody)))]
pub async fn healthz(
    State(state): State<AppState>,
    Query(query): Query<HealthQuery>,
    caller: Result<Authed, ApiError>,
) -> Result<Response, ApiError> {
    if query.verbose.is_some() {
        caller?.may(Action::Operations)?;
    }
    let mut report = state.store.health.report();
    if report.reason.is_none() {
        if !state.bus.is_running() {
            report.reason = Some("the command writer has stopped".into());
        } else if let Err(err) = state.store.ping().await {
            report.reason = Some(format!("the store does not answer: {err}"));
        }
    }
    let status = match &report.reason {
        Some(reason) => {
            tracing::warn!(%reason, "health check failed");
            report.status = "unavailable";
            StatusCode::SERVICE_UNAVAILABLE
        }
        None => StatusCode::OK,
    };
    let parts = query.verbose.is_some().then_some(report.parts);
    Ok((status, Json(HealthBody { status: report.status, reason: report.reason, warnings: report.warnings, parts }))
        .into_response())
}

/// Liveness: the process answers HTTP. Touches nothing else (also the benchmark's ceiling).
#[utoipa::path(get, path = "/livez", tag = "operations", security(()),
    responses((status = 200, description = "The process answers", body = String, content_type = "text/plain")))]
pub async fn livez() -> &'static str {
    "ok"
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ProjectionList {
    items: Vec<app::views::ConsumerStatus>,
}

#[utoipa::path(get, path = "/api/projections", tag = "operations",
    responses((status = 200, description = "Every consumer's position and state", body = ProjectionList)))]
pub async fn projections(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    caller.may(Action::Operations)?;
    let items = state.consumers.statuses().await.map_err(ApiError::Internal)?;
    Ok(Json(ProjectionList { items }).into_response())
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    caller.may(Action::ReadMetrics)?;
    // Gauges that are cheapest to read at scrape time.
    if let Ok(items) = state.consumers.statuses().await {
        for item in items {
            metrics::gauge!("tally_consumer_lag", "consumer" => item.name.clone()).set(item.lag as f64);
            metrics::gauge!("tally_consumer_position", "consumer" => item.name).set(item.position as f64);
            metrics::gauge!("tally_event_store_head").set(item.head as f64);
        }
    }
    metrics::gauge!("tally_ws_subscriptions").set(state.hub.subscriber_count() as f64);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response())
}

pub async fn api_not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(uri.path().to_string())
}
