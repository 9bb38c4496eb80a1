//! The typed error of every server function: the same stable code and message as the REST API
//! (API.md), so a form can show the person what went wrong in words.

use leptos::server_fn::codec::JsonEncoding;
use leptos::server_fn::error::{FromServerFnError, ServerFnErrorErr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AppError {
    pub code: String,
    pub message: String,
    /// Which staff console form the error answers (`kind` of [`crate::api::staff_action`]), so
    /// that without JavaScript, when the page comes back with the error, it shows next to that
    /// form only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub form: Option<String>,
}

impl AppError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        AppError { code: code.into(), message: message.into(), form: None }
    }

    /// The same error, marked as the answer to the form `kind` (and answered with its status).
    pub fn on_form(self, kind: &str) -> Self {
        AppError { form: Some(kind.to_string()), ..self }.answered()
    }

    /// The HTTP status of this error's code, as API.md's table gives it.
    pub fn status(&self) -> u16 {
        match self.code.as_str() {
            "invalid_request" => 400,
            "unauthenticated" | "invalid_credentials" => 401,
            "forbidden" | "cross_origin" => 403,
            "member_not_found" | "not_found" => 404,
            "version_conflict"
            | "email_taken"
            | "member_exists"
            | "transaction_conflict"
            | "not_rebuildable"
            | "rebuild_in_progress" => 409,
            "payload_too_large" => 413,
            "insufficient_points" | "account_suspended" | "account_not_suspended" | "idempotency_key_reused" => 422,
            "rate_limited" => 429,
            "unavailable" => 503,
            _ => 500,
        }
    }

    /// The same error, with the response's status set to [`status`](Self::status) (server side),
    /// instead of the 500 every server function error gets. Not for a plain form post: that is
    /// answered with a redirect back to the page, the error in the address.
    pub fn answered(self) -> Self {
        #[cfg(feature = "ssr")]
        {
            use leptos::prelude::use_context;
            let html = use_context::<http::request::Parts>().is_some_and(|parts| {
                parts
                    .headers
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|a| a.contains("text/html"))
            });
            if let (false, Some(response), Ok(status)) =
                (html, use_context::<leptos_axum::ResponseOptions>(), http::StatusCode::from_u16(self.status()))
            {
                response.set_status(status);
            }
        }
        self
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        AppError::new("invalid_request", message)
    }

    pub fn unauthenticated() -> Self {
        AppError::new("unauthenticated", "sign in first")
    }
}

impl FromServerFnError for AppError {
    type Encoder = JsonEncoding;

    fn from_server_fn_error(value: ServerFnErrorErr) -> Self {
        match value {
            ServerFnErrorErr::Args(m) | ServerFnErrorErr::Deserialization(m) => {
                AppError::invalid(format!("the form is incomplete or malformed: {m}"))
            }
            ServerFnErrorErr::Request(_) | ServerFnErrorErr::Response(_) => {
                AppError::new("unavailable", "the server could not be reached; try again")
            }
            other => AppError::new("internal", format!("something went wrong ({other})")),
        }
    }
}
