//! The HTTP surface: REST commands and queries, `/ws`, operations. Pages are added in `lib.rs`.

pub mod auth;
pub mod cdc;
pub mod commands;
pub mod error;
pub mod guard;
pub mod headers;
pub mod live;
pub mod openapi;
pub mod ops;
pub mod parked;
pub mod queries;
pub mod rebuilds;

use crate::AppState;
use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post};
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
        .route("/api/projections/{name}/parked", get(parked::list))
        .route("/api/projections/{name}/parked/{stream}/retry", post(parked::retry))
        .route("/api/projections/{name}/parked/{stream}/skip", post(parked::skip))
        .route("/api/projections/{name}/rebuild", post(rebuilds::start).get(rebuilds::show))
        .route("/api/cdc", get(cdc::list))
        .route("/api/cdc/{source}", post(cdc::receive))
        .route("/api/signup", post(auth::sign_up))
        .route("/api/session", post(auth::sign_in).delete(auth::sign_out))
        .route("/api/me", get(auth::me))
        .route("/api/me/password", axum::routing::put(auth::change_password))
        .route("/api/claim", post(auth::claim))
        .route("/api/members/{id}/access-link", post(auth::member_link))
        .route("/api/keys", post(auth::create_key).get(auth::keys))
        .route("/api/keys/{id}", delete(auth::revoke_key))
        .route("/api/users", post(auth::create_person).get(auth::people))
        .route("/api/users/{id}", axum::routing::patch(auth::update_person))
        .route("/api/users/{id}/access-link", post(auth::person_link))
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/{*rest}", any(ops::api_not_found))
        .route("/api", any(ops::api_not_found))
        .route("/healthz", get(ops::healthz))
        .route("/livez", get(ops::livez))
        .route("/metrics", get(ops::metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
}
