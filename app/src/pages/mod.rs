//! One file per page.

pub mod account;
pub mod admin;
pub mod claim;
pub mod home;
pub mod keys;
pub mod member;
pub mod not_found;
pub mod operations;
pub mod people;
