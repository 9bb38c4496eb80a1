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
}

impl AppError {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        AppError { code: code.into(), message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        AppError::new("invalid_request", message)
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
