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

    /// The same error, marked as the answer to the staff console form `kind`.
    pub fn on_form(self, kind: &str) -> Self {
        AppError { form: Some(kind.to_string()), ..self }
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
