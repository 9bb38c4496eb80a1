//! The pure domain: rules, commands and events. No clock, no database, no randomness: callers pass
//! time and ids in. Both the server (to decide) and the browser (to show tier progress and validate
//! forms early) use this module.

pub mod access;
pub mod loyalty_policy;
pub mod member;
pub mod tier;
pub mod transaction;
pub mod validate;

#[cfg(test)]
pub(crate) mod testing;

/// The schema version an event type is written with now. Only types whose shape changed are
/// listed; the others are at 1. Older versions are upcast when read ([`upcast`]).
pub fn schema_version(event_type: &str) -> u32 {
    match event_type {
        "PointsEarned" => member::POINTS_EARNED_VERSION,
        _ => 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpcastError {
    #[error("{event_type} at schema version {version} is newer than this server reads (up to {current}): upgrade it")]
    Newer { event_type: String, version: i64, current: u32 },
    #[error("{event_type} has no upcaster from schema version {version}")]
    Missing { event_type: String, version: i64 },
}

/// An event's stored data, written at schema version `version`, in the shape of the current
/// version: the event type's upcasters applied one version at a time. Every read of an event
/// goes through here (projections, aggregates, the events API), so old logs and events written
/// by older nodes keep working; a version newer than this code knows is an error (a consumer
/// parks it rather than guess).
pub fn upcast(event_type: &str, version: i64, mut data: serde_json::Value) -> Result<serde_json::Value, UpcastError> {
    let current = schema_version(event_type);
    if version > i64::from(current) {
        return Err(UpcastError::Newer { event_type: event_type.into(), version, current });
    }
    let missing = || UpcastError::Missing { event_type: event_type.into(), version };
    let mut at = u32::try_from(version).map_err(|_| missing())?;
    while at < current {
        let stepped = match event_type {
            "PointsEarned" => member::upcast_points_earned(at, &mut data),
            _ => false,
        };
        if !stepped {
            return Err(missing());
        }
        at += 1;
    }
    Ok(data)
}

/// One aggregate = one event stream. `decide` holds every business rule; `evolve` only folds.
pub trait Aggregate {
    type State: Default + Clone;
    type Command;
    type Event: serde::Serialize + serde::de::DeserializeOwned + Clone;
    type Error;

    /// Stream name prefix, e.g. `member-` (streams are `member-<id>`).
    const STREAM_PREFIX: &'static str;

    fn decide(state: &Self::State, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;
    fn evolve(state: Self::State, event: &Self::Event) -> Self::State;

    /// The event's stored name and schema version.
    fn event_type(event: &Self::Event) -> (&'static str, u32);
}
