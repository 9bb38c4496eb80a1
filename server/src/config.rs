//! Configuration: command line flags, each with an environment variable and a default
//! (documented in `.env.example` and the README).

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;

/// `TALLY_WRITE_BEHIND_MS` when not set (see `ServeArgs::write_behind_ms`).
pub const WRITE_BEHIND_MS: u64 = 5000;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Tally: a live, event-sourced loyalty membership portal")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Commands>,
    /// Options of `serve`, which runs when no subcommand is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum Commands {
    /// Run the web server, the projector and the loyalty policy (the default).
    Serve(ServeArgs),
    /// Create or upgrade the database schema, then exit.
    Migrate(DatabaseArgs),
    /// Rebuild every view from the event log (offline: stop the servers first).
    Rebuild(DatabaseArgs),
    /// Enroll demo members and record demo purchases through the real command path.
    Seed(SeedArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// SQLite file (or sqlite:// URL) or postgres:// URL.
    #[arg(long, env = "DATABASE_URL", default_value = "tally.db")]
    pub database_url: String,
    /// Acknowledge a command only once it is on disk (SQLite: its write-ahead log is synced).
    /// Turn off only for throw-away data: a power cut could then lose acknowledged commands.
    #[arg(long, env = "TALLY_DURABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub durable: bool,
    /// Connections for queries.
    #[arg(long, env = "TALLY_READ_POOL", default_value_t = 8)]
    pub read_pool: u32,
    /// Connections for commands and consumers (always 1 on SQLite, which has one writer).
    #[arg(long, env = "TALLY_WRITE_POOL", default_value_t = 4)]
    pub write_pool: u32,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "TALLY_ADDR", default_value = "127.0.0.1:3000")]
    pub addr: SocketAddr,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Seed a few demo members when the database is empty.
    #[arg(long, env = "TALLY_DEMO", default_value_t = false)]
    pub demo: bool,
    /// Safety-net poll interval of the consumers, in milliseconds (they also wake on every append).
    #[arg(long, env = "TALLY_POLL_MS", default_value_t = 1000)]
    pub poll_ms: u64,
    /// SQLite: how long the projector may hold changed membership views in memory before it
    /// writes them with its checkpoint, in milliseconds. Reads and live pushes see a change at
    /// once either way; after a crash the events since the checkpoint are applied again (at 25,000
    /// commands/s, 5 s is about 125,000 events). Longer writes a busy member less often: under
    /// load these writes compete with the event log's syncs for the disk (BENCHMARKS.md). 0
    /// writes them in every batch's transaction.
    #[arg(long, env = "TALLY_WRITE_BEHIND_MS", default_value_t = WRITE_BEHIND_MS)]
    pub write_behind_ms: u64,
    /// PostgreSQL: how often a standby node tries to take over the consumers (ms). A dead
    /// leader's lock is free as soon as PostgreSQL notices its session is gone.
    #[arg(long, env = "TALLY_LEADER_RETRY_MS", default_value_t = 500)]
    pub leader_retry_ms: u64,
    /// Time limit for one HTTP request, in seconds (WebSockets excepted).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Members to enroll.
    #[arg(long, default_value_t = 100)]
    pub members: u64,
    /// Purchases to record, spread over the members (some anonymous).
    #[arg(long, default_value_t = 1_000)]
    pub purchases: u64,
}
