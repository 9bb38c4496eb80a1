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
