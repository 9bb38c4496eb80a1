//! Configuration: command line flags, each with an environment variable and a default
//! (documented in `.env.example` and the README).

use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;

/// `TALLY_WRITE_BEHIND_MS` when not set (see `ServeArgs::write_behind_ms`).
pub const WRITE_BEHIND_MS: u64 = 5000;

/// Attempts at an event that fails before its stream is parked (see `projector::parking`),
/// about 1.5 s with backoff. Only an event's own failure counts: a database that does not
/// answer is retried without end and parks nothing.
pub const PARK_AFTER: u32 = 5;

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
    /// Rebuild every view from the event log: offline (stop the servers first), or with
    /// `--online` through a running server, which keeps serving (blue/green).
    Rebuild(RebuildArgs),
    /// Enroll demo members and record demo purchases through the real command path.
    Seed(SeedArgs),
    /// Read the PostgreSQL sources of a CDC configuration (docs/cdc.md) into the event store until
    /// stopped, or drop a source's replication slot.
    Cdc(CdcArgs),
    /// Keys of machine clients.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Accounts of people who run the programme (staff, admin).
    #[command(subcommand)]
    Users(UsersCommand),
}

#[derive(Debug, Clone, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// Ask the running server at `--url` to rebuild in shadow tables and swap them in, and show
    /// its progress; the server keeps serving reads and pushes throughout.
    #[arg(long)]
    pub online: bool,
    /// `--online`: the server (plain HTTP: run it where the server is, or behind your proxy's
    /// internal address).
    #[arg(long, env = "TALLY_URL", default_value = "http://127.0.0.1:3000")]
    pub url: String,
    /// `--online`: an admin key's token (`tally keys create --role admin`).
    #[arg(long, env = "TALLY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// `--online`: the projections to rebuild, one after the other (default: both).
    #[arg(long = "projection", value_parser = ["membership_view", "member_search"])]
    pub projections: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CdcArgs {
    #[command(subcommand)]
    pub action: Option<CdcAction>,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The CDC configuration (TOML; docs/cdc.example.toml). Required.
    #[arg(long, env = "TALLY_CDC_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// Only this source (default: every PostgreSQL source in the configuration).
    #[arg(long, global = true)]
    pub source: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CdcAction {
    /// Remove the source's replication slot (`--source`), so its database keeps no WAL for Tally.
    /// Changes made while there is no slot are not read.
    DropSlot,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its token (alone, on the last line). Works on the database
    /// directly: on SQLite while no server holds the file, on PostgreSQL at any time.
    Create(KeyCreateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeyCreateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// What the key is for (a till, a web shop, a scraper).
    #[arg(long)]
    pub name: String,
    /// admin, staff, channel (post purchases only), cdc (post change events only) or metrics (read
    /// /metrics only).
    #[arg(long)]
    pub role: String,
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create a person's account and print a one-time access link to set its password.
    Create(UserCreateArgs),
}

#[derive(Debug, Clone, Args)]
pub struct UserCreateArgs {
    #[command(flatten)]
    pub db: DatabaseArgs,
    #[arg(long)]
    pub email: String,
    #[arg(long)]
    pub name: String,
    /// staff or admin.
    #[arg(long)]
    pub role: String,
    /// Printed in front of the link (`https://loyalty.example.com`).
    #[arg(long, env = "TALLY_PUBLIC_URL", default_value = "")]
    pub public_url: String,
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
    /// Seed a few demo members when the database is empty, and give the demo accounts new
    /// passwords, printed at start-up (never use on real data).
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
    /// How many times a consumer tries an event that fails (with backoff: 0.1 s, 0.2 s, 0.4 s…)
    /// before it parks it with the rest of its stream and goes on with the other streams
    /// (`GET /api/projections/{name}/parked`; docs/operations.md).
    #[arg(long, env = "TALLY_PARK_AFTER", default_value_t = PARK_AFTER, value_parser = clap::value_parser!(u32).range(1..))]
    pub park_after: u32,
    /// PostgreSQL: how often a standby node tries to take over the consumers (ms). A dead
    /// leader's lock is free as soon as PostgreSQL notices its session is gone.
    #[arg(long, env = "TALLY_LEADER_RETRY_MS", default_value_t = 500)]
    pub leader_retry_ms: u64,
    /// Time limit for one HTTP request, in seconds (WebSockets excepted).
    #[arg(long, env = "TALLY_REQUEST_TIMEOUT_SECS", default_value_t = 30)]
    pub request_timeout_secs: u64,
    /// How long a background part (a consumer, the notice listener…) may keep failing before
    /// `/healthz` answers 503, in seconds.
    #[arg(long, env = "TALLY_UNHEALTHY_AFTER_SECS", default_value_t = 30)]
    pub unhealthy_after_secs: u64,
    #[command(flatten)]
    pub access: AccessArgs,
    /// A CDC configuration (TOML, docs/cdc.md): its PostgreSQL sources are read by this server, and
    /// its sources take Debezium change events at `POST /api/cdc/{source}`.
    #[arg(long, env = "TALLY_CDC_CONFIG")]
    pub cdc_config: Option<std::path::PathBuf>,
    /// Test hooks (see `faults`): no flag or variable sets them.
    #[arg(skip)]
    pub faults: crate::faults::Faults,
}

/// Identity and access (docs/security.md).
#[derive(Debug, Clone, Args)]
pub struct AccessArgs {
    /// The URL people reach Tally at (`https://loyalty.example.com`). Its origin is the only one
    /// allowed to make signed-in changes, and with https cookies are `Secure` and HSTS is sent.
    /// Empty: the request's own `Host`, over plain HTTP.
    #[arg(long, env = "TALLY_PUBLIC_URL", default_value = "")]
    pub public_url: String,
    /// A session ends after this long without a request (`12h`, `30m`, `90s`).
    #[arg(long, env = "TALLY_SESSION_IDLE", default_value = "12h")]
    pub session_idle: humantime::Duration,
    /// Open WebSockets allowed per account (all its sessions) or per key.
    #[arg(long, env = "TALLY_MAX_SOCKETS_PER_PRINCIPAL", default_value_t = 32)]
    pub max_sockets_per_principal: usize,
    /// Password hashes (Argon2id) computed at once; by default half the cores, so sign-ins cannot
    /// take the whole machine.
    #[arg(long, env = "TALLY_HASH_CONCURRENCY")]
    pub hash_concurrency: Option<usize>,
    /// Time a client has to send a request's headers, in seconds (slow clients are cut off).
    #[arg(long, env = "TALLY_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// A WebSocket that sends nothing for this long (pongs included) is closed, in seconds; the
    /// server pings at half of it.
    #[arg(long, env = "TALLY_WS_IDLE_SECS", default_value_t = 60)]
    pub ws_idle_secs: u64,
    /// Behind a reverse proxy: the header it puts the client's address in (`X-Forwarded-For`),
    /// for the sign-in limits. Set it only behind a proxy that sets it: clients could forge it.
    #[arg(long, env = "TALLY_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
}

impl Default for AccessArgs {
    fn default() -> Self {
        AccessArgs {
            public_url: String::new(),
            session_idle: std::time::Duration::from_secs(12 * 3600).into(),
            max_sockets_per_principal: 32,
            hash_concurrency: None,
            header_timeout_secs: 10,
            ws_idle_secs: 60,
            client_ip_header: None,
        }
    }
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
