//! What `/healthz` reports, and what keeps the background tasks running.
//!
//! Two kinds of trouble:
//! - **Writes stopped** (fail-stop). After the disk failed to sync the event log, or a commit
//!   failed in a way that leaves its outcome unknown, the kernel may already have dropped pages
//!   the process believes written (PostgreSQL's "fsyncgate"): any later acknowledgement could be
//!   a lie. So the node stops acknowledging writes for good; `/healthz` says why, and only a
//!   restart, which re-reads the log from the file, clears it.
//! - **A part failing**: a background task (the command writer, a consumer, the notice
//!   listener…) that errs or panics. [`supervise`] restarts it with backoff and counts the
//!   restarts; a part that has been failing for longer than the grace period makes `/healthz`
//!   answer 503, so a load balancer or orchestrator can act.

use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long a part may fail before the node reports itself unhealthy, unless configured.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

pub struct Health {
    stopped: OnceLock<String>,
    parts: Mutex<BTreeMap<&'static str, Part>>,
    grace_ms: AtomicU64,
}

#[derive(Default)]
struct Part {
    failing_since: Option<Instant>,
    reason: Option<String>,
    restarts: u64,
    /// A consumer's parked streams (see `projector::parking`).
    parked: u64,
    /// A limit passed that does not stop the part (a CDC slot holding back too much WAL).
    warning: Option<String>,
}

/// One part as `/healthz?verbose` shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PartReport {
    pub name: &'static str,
    /// `ok`, `degraded` (a consumer with parked streams: it serves, every other stream goes
    /// on; or a warning, see `warning`), or `failing` (since `failing_for_secs`).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failing_for_secs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub restarts: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub parked: u64,
    /// A limit passed that needs someone's attention but does not make the node unavailable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The node's health as a whole.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `ok` or `unavailable`.
    pub status: &'static str,
    /// Why the node is unavailable, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every part's warning (the node still answers 200).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub parts: Vec<PartReport>,
}

/// The error every write through a stopped store returns (see [`Health::stop_writes`]).
#[derive(Debug, thiserror::Error)]
#[error("this node has stopped accepting writes ({0}); restart it")]
pub struct WritesStopped(pub String);

impl WritesStopped {
    /// The same error inside a database error, for code that speaks `sqlx::Error`.
    pub fn into_sqlx(self) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::other(self))
    }

    /// The reason, if `err` is this error (see [`into_sqlx`](Self::into_sqlx)).
    pub fn within(err: &sqlx::Error) -> Option<&WritesStopped> {
        match err {
            sqlx::Error::Io(io) => io.get_ref().and_then(|inner| inner.downcast_ref::<WritesStopped>()),
            _ => None,
        }
    }
}

impl Default for Health {
    fn default() -> Self {
        Health {
            stopped: OnceLock::new(),
            parts: Mutex::default(),
            grace_ms: AtomicU64::new(DEFAULT_GRACE.as_millis() as u64),
        }
    }
}

impl Health {
    pub fn set_grace(&self, grace: Duration) {
        self.grace_ms.store(grace.as_millis() as u64, Ordering::Relaxed);
    }

    fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(Ordering::Relaxed))
    }

    /// Stop acknowledging writes until the process restarts. The first reason is kept.
    pub fn stop_writes(&self, reason: String) {
        if self.stopped.set(reason.clone()).is_ok() {
            tracing::error!(%reason, "writes stopped: the durability of the event log is unknown; restart this node");
            metrics::gauge!("tally_writes_stopped").set(1.0);
        }
    }

    /// Why writes are stopped, if they are.
    pub fn writes_stopped(&self) -> Option<WritesStopped> {
        self.stopped.get().map(|reason| WritesStopped(reason.clone()))
    }

    /// `part` failed (an error it will retry, or a crash it is restarted from).
    pub fn failing(&self, part: &'static str, reason: impl Into<String>) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = parts.entry(part).or_default();
        entry.failing_since.get_or_insert_with(Instant::now);
        entry.reason = Some(reason.into());
    }

    /// `part` works (again).
    pub fn ok(&self, part: &'static str) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = parts.entry(part).or_default();
        entry.failing_since = None;
        entry.reason = None;
    }

    /// The consumer `part` holds back this many parked streams.
    pub fn parked(&self, part: &'static str, streams: usize) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.entry(part).or_default().parked = streams as u64;
    }

    /// `part` passed a limit (`Some`), or is back within it (`None`).
    pub fn warn(&self, part: &'static str, warning: Option<String>) {
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = parts.entry(part).or_default();
        if entry.warning != warning {
            if let Some(warning) = &warning {
                tracing::warn!(part, %warning, "limit passed");
            }
            entry.warning = warning;
        }
    }

    /// `part` crashed or ended and is started again.
    pub fn restarted(&self, part: &'static str, reason: &str) {
        self.failing(part, reason);
        let mut parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
        parts.entry(part).or_default().restarts += 1;
        metrics::counter!("tally_task_restarts_total", "task" => part).increment(1);
    }

    pub fn report(&self) -> Report {
        let grace = self.grace();
        let parts: Vec<PartReport> = {
            let parts = self.parts.lock().unwrap_or_else(PoisonError::into_inner);
            parts
                .iter()
                .map(|(name, part)| PartReport {
                    name,
                    state: match (part.failing_since, part.parked, &part.warning) {
                        (Some(_), _, _) => "failing",
                        (None, 0, None) => "ok",
                        (None, _, _) => "degraded",
                    },
                    failing_for_secs: part.failing_since.map(|since| since.elapsed().as_secs_f64()),
                    reason: part.reason.clone(),
                    restarts: part.restarts,
                    parked: part.parked,
                    warning: part.warning.clone(),
                })
                .collect()
        };
        let reason = match self.stopped.get() {
            Some(reason) => Some(format!("writes stopped: {reason}")),
            None => parts
                .iter()
                .find(|p| p.failing_for_secs.is_some_and(|s| s >= grace.as_secs_f64()))
                .map(|p| format!("{} failing: {}", p.name, p.reason.as_deref().unwrap_or("unknown error"))),
        };
        let status = if reason.is_some() { "unavailable" } else { "ok" };
        let warnings = parts.iter().filter_map(|p| p.warning.as_ref().map(|w| format!("{}: {w}", p.name))).collect();
        Report { status, reason, warnings, parts }
    }
}

/// Run the task `start` makes until `stop` is cancelled; when it errs, panics or ends on its
/// own, record it on `part` and start a new one after a backoff (100 ms, doubling to 30 s; back
/// to 100 ms once a run has lasted a minute). Each run is a task of its own, so a panic ends
/// only that run.
pub async fn supervise<F, Fut>(
    health: std::sync::Arc<Health>,
    part: &'static str,
    stop: CancellationToken,
    mut start: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    const FIRST: Duration = Duration::from_millis(100);
    let mut backoff = FIRST;
    loop {
        let started = Instant::now();
        let mut run = tokio::spawn(start());
        let outcome = tokio::select! {
            outcome = &mut run => outcome,
            // A restarted run that lasts a second is working again.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                health.ok(part);
                run.await
            }
        };
        if stop.is_cancelled() {
            return;
        }
        let reason = match outcome {
            Ok(Ok(())) => "ended unexpectedly".to_string(),
            Ok(Err(err)) => format!("{err:#}"),
            Err(join) => match join.try_into_panic() {
                Ok(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
                Err(join) => format!("was cancelled: {join}"),
            },
        };
        tracing::error!(task = part, %reason, retry_in_ms = backoff.as_millis() as u64, "background task stopped; restarting");
        health.restarted(part, &reason);
        if started.elapsed() > Duration::from_secs(60) {
            backoff = FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// [`supervise`], spawned, for a task that deals with its own errors and returns only once `stop`
/// is cancelled (so any other return, or a panic, is a crash).
pub fn spawn_supervised<F, Fut>(
    health: std::sync::Arc<Health>,
    part: &'static str,
    stop: CancellationToken,
    start: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(supervise(health, part, stop, move || {
        let run = start();
        async move {
            run.await;
            Ok(())
        }
    }))
}

/// What a panic said, when it said it as text.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    #[test]
    fn a_part_fails_the_node_only_after_the_grace_period() {
        let health = Health::default();
        health.set_grace(Duration::from_secs(3600));
        health.failing("projector", "disk on fire");
        assert_eq!(health.report().status, "ok");
        assert_eq!(health.report().parts[0].state, "failing");
        health.set_grace(Duration::ZERO);
        let report = health.report();
        assert_eq!(report.status, "unavailable");
        assert!(report.reason.as_deref().is_some_and(|r| r.contains("projector") && r.contains("disk on fire")));
        health.ok("projector");
        assert_eq!(health.report().status, "ok");
    }

    #[test]
    fn stopped_writes_stay_stopped_with_the_first_reason() {
        let health = Health::default();
        assert!(health.writes_stopped().is_none());
        health.stop_writes("fsync failed".into());
        health.stop_writes("something later".into());
        assert_eq!(health.writes_stopped().map(|w| w.0), Some("fsync failed".to_string()));
        let report = health.report();
        assert_eq!(report.status, "unavailable");
        assert!(report.reason.as_deref().is_some_and(|r| r.contains("fsync failed")));
        let err = health.writes_stopped().map(WritesStopped::into_sqlx).expect("stopped");
        assert!(WritesStopped::within(&err).is_some(), "the reason survives inside a database error");
    }

    #[tokio::test]
    async fn a_panicking_task_is_restarted_and_counted() {
        let health = Arc::new(Health::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(health.clone(), "worker", stop.clone(), {
            let (runs, stop) = (runs.clone(), stop.clone());
            move || {
                let (runs, stop) = (runs.clone(), stop.clone());
                async move {
                    if runs.fetch_add(1, Ordering::SeqCst) < 2 {
                        panic!("boom");
                    }
                    stop.cancelled().await;
                    Ok(())
                }
            }
        }));
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let report = health.report();
        assert_eq!(report.parts[0].restarts, 2);
        assert!(report.parts[0].reason.as_deref().is_some_and(|r| r.contains("boom")));
        stop.cancel();
        supervisor.await.expect("the supervisor ends when stopped");
    }
}
