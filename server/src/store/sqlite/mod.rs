//! SQLite's fast path: what Tally does on a SQLite file that PostgreSQL needs no help with, and the
//! single-writer lock it all rests on.
//!
//! - [`lock`]: one Tally process per file, taken before anything touches it. Everything below
//!   assumes every append to the file is this process's.
//! - [`native`](Native): the command writer's own connection, through SQLite's C API, running a
//!   whole batch on its thread.
//! - [`heads`]: where each stream ends, kept in memory and written behind the log (the log has no
//!   index by stream), checked against on every append.
//! - [`recent`]: the newest events in memory, for the consumers.
//! - [`checkpointer`]: copies each file's write-ahead log into it on a thread of its own.
//! - [`error`]: rusqlite's errors as sqlx's.

pub mod checkpointer;
pub mod error;
pub mod heads;
pub mod lock;
mod native;
pub mod recent;

pub use native::{Native, NativeConn, NativeTx};
