//! The HTTP surface: REST commands and queries, `/ws`, operations. Pages are added in `lib.rs`.

pub mod commands;
pub mod error;
pub mod live;
pub mod ops;
pub mod queries;

use crate::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, get, post};
use axum::Router;

/// API.md: bodies over 64 KiB are refused with 413 `payload_too_large`.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub fn api_routes() -> Router<AppState> {
    Router::new()
        .route("/api/members", post(commands::enroll).get(queries::list_members))
        .route("/api/members/{id}", get(queries::get_member).patch(commands::update_profile))
        .route("/api/members/{id}/points/earn", post(commands::earn))
        .route("/api/members/{id}/points/redeem", post(commands::redeem))
        .route("/api/members/{id}/suspend", post(commands::suspend))
        .route("/api/members/{id}/reactivate", post(commands::reactivate))
        .route("/api/members/{id}/events", get(queries::member_events))
        .route("/api/transactions", post(commands::record_purchase))
        .route("/api/projections", get(ops::projections))
        .route("/api/{*rest}", any(ops::api_not_found))
        .route("/api", any(ops::api_not_found))
        .route("/healthz", get(ops::healthz))
        .route("/livez", get(ops::livez))
        .route("/metrics", get(ops::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}
