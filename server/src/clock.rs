//! Time as the store records it: RFC 3339, UTC, milliseconds.

use chrono::{DateTime, SecondsFormat, Utc};

pub fn now() -> String {
    rfc3339(Utc::now())
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}
