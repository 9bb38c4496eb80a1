//! given / when / then for aggregates: `given(events).when(command).then(events)`.

use super::Aggregate;
use std::fmt::Debug;

pub struct Given<A: Aggregate> {
    state: A::State,
}

pub fn given<A: Aggregate>(events: Vec<A::Event>) -> Given<A> {
    let state = events.iter().fold(A::State::default(), A::evolve);
    Given { state }
}

pub struct When<A: Aggregate> {
    result: Result<Vec<A::Event>, A::Error>,
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> When<A> {
        When { result: A::decide(&self.state, command) }
    }

    pub fn state(self) -> A::State {
        self.state
    }
}

impl<A: Aggregate> When<A>
where
    A::Event: PartialEq + Debug,
    A::Error: PartialEq + Debug,
{
    #[track_caller]
    pub fn then(self, expected: Vec<A::Event>) {
        assert_eq!(self.result, Ok(expected));
    }

    #[track_caller]
    pub fn then_err(self, expected: A::Error) {
        assert_eq!(self.result, Err(expected));
    }
}
