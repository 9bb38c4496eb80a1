//! One file per page.

pub mod admin;
pub mod home;
pub mod member;
pub mod not_found;
