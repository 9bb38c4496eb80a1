//! The read side's shapes, shared by the server (which stores and serves them) and the browser
//! (which renders them). Field names are the contract in API.md.

use crate::domain::member::Status;
use crate::domain::tier::{self, Tier};
use serde::{Deserialize, Serialize};

/// One member's portal, denormalized: `membership_view`, `GET /api/members/{id}`, `member:<id>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct MembershipView {
    pub member_id: String,
    pub name: String,
    pub email: String,
    pub status: Status,
    pub tier: Tier,
    pub points_balance: u64,
    pub lifetime_points: u64,
    pub next_tier: Option<NextTier>,
    pub recent_activity: Vec<Activity>,
    pub member_since: String,
    pub version: u64,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct NextTier {
    pub tier: Tier,
    pub points_needed: u64,
}

impl NextTier {
    pub fn for_lifetime(lifetime: u64) -> Option<NextTier> {
        tier::progress(lifetime).map(|(tier, points_needed, _)| NextTier { tier, points_needed })
    }
}

/// How many activity entries the view keeps, newest first.
pub const RECENT_ACTIVITY: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct Activity {
    pub position: u64,
    /// enrolled | profile_updated | earned | redeemed | tier_changed | suspended | reactivated
    pub kind: String,
    pub points: u64,
    pub description: String,
    pub at: String,
}

/// A row of `member_search`: what staff find members by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct MemberSummary {
    pub member_id: String,
    pub name: String,
    pub email: String,
    pub tier: Tier,
    pub status: Status,
    pub points_balance: u64,
    pub lifetime_points: u64,
    pub member_since: String,
    pub position: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct MemberPage {
    pub items: Vec<MemberSummary>,
    pub next: Option<String>,
}

/// Filters of `GET /api/members` (and of the staff console's search form).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::IntoParams), into_params(parameter_in = Query))]
pub struct MemberQuery {
    pub q: Option<String>,
    pub tier: Option<String>,
    pub status: Option<String>,
    pub limit: Option<u32>,
    pub after: Option<String>,
}

/// One consumer (projection or processor), as `GET /api/projections` reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct ConsumerStatus {
    pub name: String,
    pub position: u64,
    pub head: u64,
    pub lag: u64,
    /// running (caught up) | catching_up | degraded (has parked streams) | failing | stopped
    pub state: String,
    pub last_error: Option<String>,
    /// Events applied per second over the last few seconds, on this node.
    pub events_per_second: f64,
    /// Streams parked after an event failed (`GET /api/projections/{name}/parked`).
    #[serde(default)]
    pub parked: u64,
    /// Whether it can be rebuilt online (a projection; not the loyalty policy, which appends events).
    #[serde(default)]
    pub rebuildable: bool,
    /// The blue/green rebuild asked for or under way, if any (`POST /api/projections/{name}/rebuild`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
}

/// One change data capture source, as `GET /api/cdc` and the operations page show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct CdcSource {
    pub name: String,
    /// `postgres` (read from a replication slot) or `debezium` (envelopes posted to `/api/cdc/{name}`).
    pub kind: String,
    /// reading | standby (another process reads the slot) | elsewhere (`serve = false`: a `tally
    /// cdc` process reads it; the slot is watched from here) | failing | idle (nothing received yet)
    pub state: String,
    pub slot: Option<String>,
    /// WAL the source has written that the slot has not confirmed, in bytes.
    pub lag_bytes: Option<i64>,
    /// How old the newest change applied was when it was applied, while behind (0 when caught up).
    pub lag_seconds: f64,
    /// WAL the source keeps for the slot, in bytes (its disk at risk if the reader stops).
    pub retained_wal_bytes: Option<i64>,
    /// Source row changes handled per second over the last few seconds, on this node.
    pub rows_per_second: f64,
    pub rows: CdcRows,
    /// The newest source position applied.
    pub last_position: Option<String>,
    pub last_change_at: Option<String>,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    /// A configured limit passed (retained WAL, lag): also on `/healthz`.
    pub warning: Option<String>,
}

/// Source row changes by what became of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct CdcRows {
    /// Appended events.
    pub applied: u64,
    /// Seen before (read again after a restart, an envelope sent twice): nothing appended.
    pub replayed: u64,
    /// Refused by the member's rules (unknown member, email in use…): nothing appended.
    pub refused: u64,
    /// Could not be made a command (a missing column, an invalid email): nothing appended.
    pub invalid: u64,
    /// Changed nothing Tally maps (another table, an unmapped column).
    pub ignored: u64,
}

/// An online (blue/green) rebuild of a projection: built in shadow tables while the current ones
/// serve, then swapped in (see docs/api.md, "Rebuilding a projection online").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct RebuildStatus {
    pub id: u64,
    pub projection: String,
    /// The projection's version the build writes.
    pub version: u64,
    /// requested | building | swapped | failed
    pub state: String,
    /// While building: folding (reading and folding the log) | writing (the shadow tables) |
    /// catching_up (events appended meanwhile) | swapping
    pub phase: Option<String>,
    /// Why: asked by a person, or the projection's version changed.
    pub reason: String,
    pub actor: String,
    /// Events folded, and the log's head they are folded towards.
    pub applied: u64,
    pub total: u64,
    pub events_per_second: f64,
    /// Seconds left at the current rate (while folding).
    pub eta_seconds: Option<f64>,
    /// Times it started again from position 0 (a crash or a new leader cut it short).
    pub restarts: u64,
    /// Swapped: the position the new tables were current to.
    pub position: Option<u64>,
    pub error: Option<String>,
    pub requested_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl RebuildStatus {
    /// Asked for or under way.
    pub fn open(&self) -> bool {
        matches!(self.state.as_str(), "requested" | "building")
    }

    /// How far it is, 0 to 1.
    pub fn fraction(&self) -> f64 {
        match self.state.as_str() {
            "swapped" => 1.0,
            _ if self.total == 0 => 0.0,
            _ => (self.applied as f64 / self.total as f64).min(1.0),
        }
    }
}

/// WebSocket, client to server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientMessage {
    Subscribe(String),
    Unsubscribe(String),
}

/// WebSocket, server to client: only these two kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerMessage {
    View {
        topic: String,
        position: u64,
        view: MembershipView,
    },
    Error {
        code: String,
        /// The topic a refused subscribe named.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        topic: Option<String>,
        message: String,
    },
}

pub const MEMBERS_TOPIC: &str = "members";

/// Staff: a sample of every consumer a second, for the operations page (`OperationsSample`).
pub const OPERATIONS_TOPIC: &str = "operations";

/// Samples of the `operations` topic the operations page keeps (two minutes at one a second).
pub const OPERATIONS_WINDOW: usize = 120;

/// The `view` of an `operations` frame: the consumers as `GET /api/projections` lists them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperationsSample {
    /// When the sample was taken (RFC 3339).
    pub at: String,
    pub items: Vec<ConsumerStatus>,
}

pub fn member_topic(member_id: &str) -> String {
    format!("member:{member_id}")
}

/// The result of a command, as the staff console shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandAck {
    pub member_id: Option<String>,
    pub transaction_id: Option<String>,
    pub version: Option<u64>,
    pub position: u64,
}

/// Who signed in, as `POST /api/session` and `GET /api/me` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedIn {
    /// member, staff, admin or key.
    pub kind: String,
    pub member_id: Option<String>,
    pub name: String,
}

impl SignedIn {
    /// Where this account goes after signing in: a member to their own page, people to the
    /// staff console.
    pub fn home(&self) -> String {
        match &self.member_id {
            Some(id) => format!("/members/{id}"),
            None => "/admin".to_string(),
        }
    }
}

/// An access link, as issued (shown once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct AccessLink {
    /// `/claim/<token>`.
    pub url: String,
    pub expires_at: String,
}

/// A machine client's key, as `GET /api/keys` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct KeySummary {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

/// A person's account (staff, admin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct PersonSummary {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub disabled: bool,
    pub created_at: String,
}

/// A stretch of a stream a consumer holds back (parked) or skipped, as
/// `GET /api/projections/{name}/parked` lists it (see docs/api.md, "Parked events").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "ssr", derive(utoipa::ToSchema))]
pub struct ParkedStream {
    pub stream_id: String,
    /// The event that failed.
    pub from_position: u64,
    pub event_type: String,
    /// The last failure.
    pub error: String,
    pub attempts: u64,
    pub parked_at: String,
    /// `retry` or `skip` while one is asked for and not carried out yet.
    pub action: Option<String>,
    /// Skipped: through which position, when, by whom and why.
    pub skipped_through: Option<u64>,
    pub skipped_at: Option<String>,
    pub reason: Option<String>,
    pub actor: Option<String>,
}

/// A parked or skipped stretch on the operations page: whose it is and how many events it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParkedRow {
    pub consumer: String,
    /// Events held back (or skipped) in the stretch.
    pub held: u64,
    #[serde(flatten)]
    pub stream: ParkedStream,
}

/// One event of a member's history, as staff audit it: what happened and who caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub position: u64,
    pub event_type: String,
    /// `metadata.actor`: member:<id>, user:<id>, key:<id>, policy:loyalty, system…
    pub actor: String,
    pub recorded_at: String,
    /// The event's data, as stored (JSON text).
    pub data: String,
}

/// A message for the next page a form lands on without JavaScript (carried by a short-lived
/// cookie, see `flash`): the outcome of the form `form`, and a secret shown this once (a key's
/// token, an access link).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flash {
    pub form: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}
