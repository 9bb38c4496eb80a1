//! Pieces of pages.

pub mod membership;
