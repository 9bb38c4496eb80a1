//! What `GET /api/projections` and the metrics report of each consumer: its position (from the
//! checkpoints, valid on every node), and its state and throughput (from this node, when it runs
//! the consumers).

use super::Consumers;
use app::views::ConsumerStatus;
use sqlx::Row;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A running consumer as the rest of the server sees it.
pub struct ConsumerHandle {
    pub name: &'static str,
    pub(super) applied: watch::Sender<i64>,
    state: Mutex<RunState>,
    /// Streams parked on this node's runner (see `parking`).
    parked: std::sync::atomic::AtomicUsize,
}

struct RunState {
    label: &'static str,
    last_error: Option<String>,
    recent: VecDeque<(Instant, u64)>,
}

impl ConsumerHandle {
    pub(super) fn new(name: &'static str) -> Self {
        ConsumerHandle {
            name,
            applied: watch::Sender::new(0),
            state: Mutex::new(RunState { label: "starting", last_error: None, recent: VecDeque::new() }),
            parked: Default::default(),
        }
    }

    pub(super) fn set_parked(&self, parked: usize) {
        self.parked.store(parked, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("tally_parked_streams", "consumer" => self.name).set(parked as f64);
    }

    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    pub(super) fn set(&self, label: &'static str, error: Option<String>) {
        if let Ok(mut s) = self.state.lock() {
            s.label = label;
            s.last_error = error;
        }
    }

    pub(super) fn record(&self, events: u64) {
        if let Ok(mut s) = self.state.lock() {
            let now = Instant::now();
            s.recent.push_back((now, events));
            while s.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW) {
                s.recent.pop_front();
            }
        }
    }

    fn snapshot(&self) -> (&'static str, Option<String>, f64) {
        match self.state.lock() {
            Ok(s) => {
                let now = Instant::now();
                let n: u64 =
                    s.recent.iter().filter(|(t, _)| now.duration_since(*t) <= RATE_WINDOW).map(|(_, n)| n).sum();
                (s.label, s.last_error.clone(), n as f64 / RATE_WINDOW.as_secs_f64())
            }
            Err(_) => ("unknown", None, 0.0),
        }
    }
}

const RATE_WINDOW: Duration = Duration::from_secs(10);

impl Consumers {
    pub(super) async fn checkpoints(
        &self,
    ) -> Result<std::collections::HashMap<String, (i64, Option<String>)>, sqlx::Error> {
        let sql = format!("SELECT name, position, last_error FROM {} AS c", self.store.checkpoints_table());
        let rows = sqlx::query(&sql).fetch_all(&self.store.read).await?;
        rows.iter().map(|r| Ok((r.try_get("name")?, (r.try_get("position")?, r.try_get("last_error")?)))).collect()
    }

    /// Per consumer, how many streams it has parked, from the tables (valid on every node).
    async fn parked_counts(&self) -> Result<std::collections::HashMap<String, u64>, sqlx::Error> {
        let sql = format!(
            "SELECT consumer, COUNT(*) AS n FROM {} AS p WHERE skipped_through IS NULL GROUP BY consumer",
            self.store.parked_table()
        );
        let rows = sqlx::query(&sql).fetch_all(&self.store.read).await?;
        rows.iter().map(|r| Ok((r.try_get("consumer")?, r.try_get::<i64, _>("n")?.max(0) as u64))).collect()
    }

    /// `GET /api/projections`: positions from the checkpoints (valid on every node); state and
    /// throughput from this node when it runs the consumers.
    pub async fn statuses(&self) -> anyhow::Result<Vec<ConsumerStatus>> {
        let head = self.store.head().await?.max(0) as u64;
        let checkpoints = self.checkpoints().await?;
        // Read from the tables only when this node's runners park something, or do not run here.
        let local_parked = self.handles().any(|h| h.parked.load(std::sync::atomic::Ordering::Relaxed) > 0);
        let running_here = self.handles().any(|h| !matches!(h.snapshot().0, "starting" | "stopped"));
        let parked = match local_parked || !running_here {
            true => self.parked_counts().await?,
            false => Default::default(),
        };
        let rebuilds = super::blue_green::latest(&self.store).await?;
        Ok(self
            .handles()
            .map(|h| {
                let (position, stored_error) = checkpoints.get(h.name).cloned().unwrap_or((0, None));
                // Running here, a consumer may be past its stored checkpoint by events it skipped.
                let position = position.max(*h.applied.borrow()).max(0) as u64;
                let (label, last_error, rate) = h.snapshot();
                let lag = head.saturating_sub(position);
                let parked = parked.get(h.name).copied().unwrap_or(0);
                let state = match (label, &stored_error) {
                    _ if parked > 0 && label != "failing" => "degraded",
                    // Not running here: another node is the active one; judge by its checkpoint.
                    ("starting" | "stopped", Some(_)) => "failing",
                    ("starting" | "stopped", None) | ("running", _) if lag > 0 => "catching_up",
                    ("starting" | "stopped", None) => "running",
                    (other, _) => other,
                };
                ConsumerStatus {
                    name: h.name.to_string(),
                    position,
                    head,
                    lag,
                    state: state.to_string(),
                    last_error: last_error.or(stored_error),
                    events_per_second: (rate * 10.0).round() / 10.0,
                    parked,
                    rebuildable: super::blue_green::REBUILDABLE.contains(&h.name),
                    rebuild: rebuilds.iter().find(|b| b.projection == h.name && b.open()).cloned(),
                }
            })
            .collect())
    }
}
