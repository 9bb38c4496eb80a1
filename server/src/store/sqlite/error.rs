//! rusqlite's errors as sqlx's, so that callers of the native connection (see `native`) and of
//! sqlx treat both alike (`store::is_unique_violation`, `store::is_rollback`).

use std::borrow::Cow;

/// A rusqlite error as sqlx's, keeping what callers look at: a constraint that failed (see
/// `is_unique_violation`) and the message.
pub fn error(err: rusqlite::Error) -> sqlx::Error {
    sqlx::Error::Database(Box::new(NativeError::Sqlite(err)))
}

/// A stream version that is not the stream's next: reported as a unique violation, as
/// PostgreSQL's constraint reports it, so callers treat both alike (`store::is_unique_violation`).
pub fn version_taken(message: String) -> sqlx::Error {
    sqlx::Error::Database(Box::new(NativeError::VersionTaken(message)))
}

#[derive(Debug, thiserror::Error)]
enum NativeError {
    #[error("{0}")]
    Sqlite(rusqlite::Error),
    #[error("{0}")]
    VersionTaken(String),
}

impl sqlx::error::DatabaseError for NativeError {
    fn message(&self) -> &str {
        match self {
            NativeError::Sqlite(rusqlite::Error::SqliteFailure(_, Some(message))) => message,
            NativeError::Sqlite(_) => "SQLite error",
            NativeError::VersionTaken(message) => message,
        }
    }

    fn code(&self) -> Option<Cow<'_, str>> {
        match self {
            NativeError::Sqlite(err) => err.sqlite_error().map(|e| Cow::Owned(e.extended_code.to_string())),
            NativeError::VersionTaken(_) => None,
        }
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use rusqlite::ffi;
        let err = match self {
            NativeError::Sqlite(err) => err,
            NativeError::VersionTaken(_) => return sqlx::error::ErrorKind::UniqueViolation,
        };
        match err.sqlite_error().map(|e| e.extended_code) {
            Some(ffi::SQLITE_CONSTRAINT_UNIQUE | ffi::SQLITE_CONSTRAINT_PRIMARYKEY) => {
                sqlx::error::ErrorKind::UniqueViolation
            }
            Some(ffi::SQLITE_CONSTRAINT_FOREIGNKEY) => sqlx::error::ErrorKind::ForeignKeyViolation,
            Some(ffi::SQLITE_CONSTRAINT_NOTNULL) => sqlx::error::ErrorKind::NotNullViolation,
            Some(ffi::SQLITE_CONSTRAINT_CHECK) => sqlx::error::ErrorKind::CheckViolation,
            _ => sqlx::error::ErrorKind::Other,
        }
    }
}
