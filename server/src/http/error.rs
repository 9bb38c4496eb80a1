//! The one error type of the HTTP API: status + stable code (API.md) + a message for a person.
//! Internal failures are logged in full and answered with a generic 500.

use crate::commands::CommandError;
use crate::queries::QueryError;
use app::domain::access::Denied;
use app::domain::member::MemberError;
use app::domain::transaction::TransactionError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("no member with id '{0}'")]
    MemberNotFound(String),
    #[error("{0}")]
    VersionConflict(String),
    #[error("the email address is already used by another member")]
    EmailTaken,
    #[error("member '{0}' already exists")]
    MemberExists(String),
    #[error("{0}")]
    TransactionConflict(String),
    #[error("{0}")]
    NotRebuildable(String),
    #[error("{0}")]
    RebuildInProgress(String),
    #[error("the request body is larger than 64 KiB")]
    PayloadTooLarge,
    #[error("{0}")]
    InsufficientPoints(String),
    #[error("the account is suspended")]
    AccountSuspended,
    #[error("the account is not suspended")]
    AccountNotSuspended,
    #[error("this Idempotency-Key was already used with a different request")]
    IdempotencyKeyReused,
    #[error("no such endpoint: {0}")]
    NotFound(String),
    #[error("sign in first, or send a valid key (Authorization: Bearer <token>)")]
    Unauthenticated,
    #[error("the email address or the password is wrong")]
    InvalidCredentials,
    #[error("{0}")]
    Forbidden(String),
    #[error("a signed-in change must come from this site (Origin or Sec-Fetch-Site)")]
    CrossOrigin,
    #[error("send the body as JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("too many attempts; try again in {} seconds", .0.as_secs().max(1))]
    RateLimited(std::time::Duration),
    #[error("{0}")]
    RateLimitedBy(String),
    #[error("the server is shutting down, try again")]
    Unavailable,
    #[error("{0}")]
    WritesStopped(#[from] crate::health::WritesStopped),
    #[error("the server's disk is full; nothing was recorded, try again later")]
    DiskFull,
    /// The database connection was lost (or none could be had in time).
    #[error(
        "the database cannot be reached just now; try again (a command sent with an Idempotency-Key is then answered as it ended)"
    )]
    StoreUnreachable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::MemberNotFound(_) => (StatusCode::NOT_FOUND, "member_not_found"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ApiError::InvalidCredentials => (StatusCode::UNAUTHORIZED, "invalid_credentials"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::CrossOrigin => (StatusCode::FORBIDDEN, "cross_origin"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::RateLimited(_) | ApiError::RateLimitedBy(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::VersionConflict(_) => (StatusCode::CONFLICT, "version_conflict"),
            ApiError::EmailTaken => (StatusCode::CONFLICT, "email_taken"),
            ApiError::MemberExists(_) => (StatusCode::CONFLICT, "member_exists"),
            ApiError::TransactionConflict(_) => (StatusCode::CONFLICT, "transaction_conflict"),
            ApiError::NotRebuildable(_) => (StatusCode::CONFLICT, "not_rebuildable"),
            ApiError::RebuildInProgress(_) => (StatusCode::CONFLICT, "rebuild_in_progress"),
            ApiError::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::InsufficientPoints(_) => (StatusCode::UNPROCESSABLE_ENTITY, "insufficient_points"),
            ApiError::AccountSuspended => (StatusCode::UNPROCESSABLE_ENTITY, "account_suspended"),
            ApiError::AccountNotSuspended => (StatusCode::UNPROCESSABLE_ENTITY, "account_not_suspended"),
            ApiError::IdempotencyKeyReused => (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused"),
            ApiError::Unavailable | ApiError::WritesStopped(_) | ApiError::DiskFull | ApiError::StoreUnreachable => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(err.into())
    }

    /// The database was out of reach: logged here, since the answer does not say why.
    pub fn unreachable(err: &sqlx::Error) -> Self {
        tracing::warn!(error = %err, "the database cannot be reached; answered 503");
        metrics::counter!("tally_store_unreachable_total").increment(1);
        ApiError::StoreUnreachable
    }

    /// For server functions: the same code and message the REST API gives.
    pub fn to_app_error(&self) -> app::error::AppError {
        if let ApiError::Internal(err) = self {
            tracing::error!(error = ?err, "internal error");
        }
        app::error::AppError::new(self.parts().1, self.to_string())
    }
}

/// Every error's body (API.md): `{"error": {"code", "message"}}`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `invalid_request`, `member_not_found`, `version_conflict`…
    pub code: &'static str,
    /// For people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        if let ApiError::Internal(err) = &self {
            tracing::error!(error = ?err, "internal error");
        }
        let body = ErrorBody { error: ErrorDetail { code, message: self.to_string() } };
        let mut response = (status, Json(body)).into_response();
        match &self {
            ApiError::RateLimited(wait) => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
            }
            // RFC 9110: a 401 names how to authenticate.
            ApiError::Unauthenticated | ApiError::InvalidCredentials => {
                response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        response
    }
}

impl From<CommandError> for ApiError {
    fn from(err: CommandError) -> Self {
        match err {
            CommandError::Member(e) => match e {
                MemberError::MemberExists(id) => ApiError::MemberExists(id),
                MemberError::NotFound => ApiError::MemberNotFound(String::new()),
                MemberError::EmailTaken => ApiError::EmailTaken,
                e @ MemberError::InsufficientPoints { .. } => ApiError::InsufficientPoints(e.to_string()),
                MemberError::AccountSuspended => ApiError::AccountSuspended,
                MemberError::AccountNotSuspended => ApiError::AccountNotSuspended,
                MemberError::PurchaseTooSmall => ApiError::InvalidRequest(e.to_string()),
            },
            CommandError::Transaction(TransactionError::NotFound) => ApiError::NotFound("transaction".into()),
            CommandError::Transaction(e @ TransactionError::Conflict(_)) => {
                ApiError::TransactionConflict(e.to_string())
            }
            CommandError::VersionConflict { expected, actual } if expected >= 0 => {
                ApiError::VersionConflict(format!("the member is at version {actual}, not {expected}"))
            }
            CommandError::VersionConflict { .. } => {
                ApiError::VersionConflict("the member changed concurrently, try again".into())
            }
            CommandError::IdempotencyKeyReused => ApiError::IdempotencyKeyReused,
            CommandError::Unavailable => ApiError::Unavailable,
            CommandError::WritesStopped(stopped) => ApiError::WritesStopped(stopped),
            CommandError::DiskFull => ApiError::DiskFull,
            CommandError::StoreUnreachable(err) => ApiError::unreachable(&err),
            e @ (CommandError::Corrupt(_) | CommandError::Database(_)) => ApiError::internal(e),
        }
    }
}

impl ApiError {
    /// What `access::authorize` refused, for the member `member_id` when the action names one.
    pub fn denied(denied: Denied, member_id: &str) -> Self {
        match denied {
            Denied::Unauthenticated => ApiError::Unauthenticated,
            Denied::Forbidden => ApiError::Forbidden("you may not do this".into()),
            Denied::NotFound => ApiError::MemberNotFound(member_id.to_string()),
        }
    }
}

impl From<QueryError> for ApiError {
    fn from(err: QueryError) -> Self {
        match err {
            QueryError::Invalid(message) => ApiError::InvalidRequest(message),
            QueryError::Database(e) => ApiError::from(e),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(err: sqlx::Error) -> Self {
        match crate::health::WritesStopped::within(&err) {
            Some(stopped) => ApiError::WritesStopped(crate::health::WritesStopped(stopped.0.clone())),
            None if crate::store::is_connection_lost(&err) => ApiError::unreachable(&err),
            None => ApiError::internal(err),
        }
    }
}
