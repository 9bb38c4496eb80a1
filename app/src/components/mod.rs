//! Pieces of pages.

pub mod forms;
pub mod membership;
