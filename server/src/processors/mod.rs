//! Event processors: consumers whose effect is new commands (not view rows).

pub mod loyalty;
