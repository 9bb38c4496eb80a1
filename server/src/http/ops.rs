//! Operations: health, metrics, consumer status.

use super::error::ApiError;
use super::guard::Authed;
use crate::AppState;
use app::domain::access::Action;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

pub async fn healthz(State(state): State<AppState>) -> Response {
    match state.store.ping().await {
        Ok(()) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"status": "unavailable"}))).into_response()
        }
    }
}

/// Liveness: the process answers HTTP. Touches nothing else (also the benchmark's ceiling).
pub async fn livez() -> &'static str {
    "ok"
}

pub async fn projections(State(state): State<AppState>, caller: Authed) -> Result<Response, ApiError> {
    caller.may(Action::Operations)?;
    let items = state.consumers.statuses().await.map_err(ApiError::Internal)?;
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

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
