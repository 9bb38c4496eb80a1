//! What each source has done, for `GET /api/cdc`, the operations page, the metrics and `/healthz`.

use super::config::SourceConfig;
use crate::health::Health;
use app::views::{CdcRows, CdcSource};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The window `rows_per_second` is counted over.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// One registry per server (or `tally cdc` process).
pub struct CdcStatus {
    sources: Mutex<BTreeMap<String, Entry>>,
    health: Arc<Health>,
}

struct Entry {
    status: CdcSource,
    /// `/healthz` names parts with static strings; sources are configured once, at start.
    part: &'static str,
    recent: VecDeque<(Instant, u64)>,
}

/// What became of one row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowOutcome {
    Applied,
    Replayed,
    Refused,
    Invalid,
    Ignored,
}

impl RowOutcome {
    pub fn count_in(self, rows: &mut CdcRows) {
        *match self {
            RowOutcome::Applied => &mut rows.applied,
            RowOutcome::Replayed => &mut rows.replayed,
            RowOutcome::Refused => &mut rows.refused,
            RowOutcome::Invalid => &mut rows.invalid,
            RowOutcome::Ignored => &mut rows.ignored,
        } += 1;
    }

    fn label(self) -> &'static str {
        match self {
            RowOutcome::Applied => "applied",
            RowOutcome::Replayed => "replayed",
            RowOutcome::Refused => "refused",
            RowOutcome::Invalid => "invalid",
            RowOutcome::Ignored => "ignored",
        }
    }
}

impl CdcStatus {
    pub fn new(sources: &[SourceConfig], health: Arc<Health>) -> CdcStatus {
        let sources = sources
            .iter()
            .map(|s| {
                let status = CdcSource {
                    name: s.name.clone(),
                    kind: if s.postgres_url.is_some() { "postgres" } else { "debezium" }.into(),
                    state: "idle".into(),
                    slot: s.postgres_url.as_ref().map(|_| s.slot_name()),
                    lag_bytes: None,
                    lag_seconds: 0.0,
                    retained_wal_bytes: None,
                    rows_per_second: 0.0,
                    rows: CdcRows::default(),
                    last_position: None,
                    last_change_at: None,
                    last_error: None,
                    last_error_at: None,
                    warning: None,
                };
                let part: &'static str = Box::leak(format!("cdc source {}", s.name).into_boxed_str());
                (s.name.clone(), Entry { status, part, recent: VecDeque::new() })
            })
            .collect();
        CdcStatus { sources: Mutex::new(sources), health }
    }

    fn with<T>(&self, source: &str, f: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        sources.get_mut(source).map(f)
    }

    /// Every source, as `GET /api/cdc` lists them.
    pub fn list(&self) -> Vec<CdcSource> {
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        sources
            .values_mut()
            .map(|entry| {
                forget_old(&mut entry.recent, now);
                let rows: u64 = entry.recent.iter().map(|(_, n)| n).sum();
                entry.status.rows_per_second = rows as f64 / RATE_WINDOW.as_secs_f64();
                entry.status.clone()
            })
            .collect()
    }

    /// The source's part of `/healthz` (`cdc source <name>`).
    pub fn part(&self, source: &str) -> &'static str {
        self.with(source, |e| e.part).unwrap_or("cdc")
    }

    pub fn state(&self, source: &str, state: &str) {
        self.with(source, |e| e.status.state = state.to_string());
    }

    /// Count row changes; `position` is the newest applied, `committed_at` its commit time.
    pub fn counted(&self, source: &str, outcomes: &[RowOutcome], position: Option<&str>, lag_seconds: Option<f64>) {
        let part = self.with(source, |entry| {
            for outcome in outcomes {
                outcome.count_in(&mut entry.status.rows);
                metrics::counter!("tally_cdc_rows_total", "source" => source.to_string(), "outcome" => outcome.label())
                    .increment(1);
            }
            let now = Instant::now();
            entry.recent.push_back((now, outcomes.len() as u64));
            forget_old(&mut entry.recent, now);
            if let Some(position) = position {
                entry.status.last_position = Some(position.to_string());
                entry.status.last_change_at = Some(crate::clock::now());
            }
            if let Some(lag) = lag_seconds {
                entry.status.lag_seconds = lag;
                metrics::gauge!("tally_cdc_lag_seconds", "source" => source.to_string()).set(lag);
            }
            entry.part
        });
        if let Some(part) = part {
            self.health.ok(part);
        }
    }

    /// A row change that appended nothing for a reason worth telling (refused, invalid).
    pub fn row_error(&self, source: &str, message: &str) {
        tracing::warn!(source, %message, "a source change was not applied");
        self.with(source, |e| {
            e.status.last_error = Some(message.to_string());
            e.status.last_error_at = Some(crate::clock::now());
        });
    }

    /// The reader cannot go on (the source is down, the store refuses writes): it retries.
    pub fn failing(&self, source: &str, message: &str) {
        let part = self.with(source, |e| {
            e.status.state = "failing".into();
            e.status.last_error = Some(message.to_string());
            e.status.last_error_at = Some(crate::clock::now());
            e.part
        });
        if let Some(part) = part {
            self.health.failing(part, message.to_string());
        }
    }

    /// The slot's figures, and the warning when they pass the configured limits.
    pub fn slot(&self, source: &str, lag_bytes: i64, retained_wal_bytes: i64, warning: Option<String>) {
        let part = self.with(source, |e| {
            e.status.lag_bytes = Some(lag_bytes);
            e.status.retained_wal_bytes = Some(retained_wal_bytes);
            e.status.warning = warning.clone();
            e.part
        });
        metrics::gauge!("tally_cdc_lag_bytes", "source" => source.to_string()).set(lag_bytes as f64);
        metrics::gauge!("tally_cdc_retained_wal_bytes", "source" => source.to_string()).set(retained_wal_bytes as f64);
        metrics::gauge!("tally_cdc_warning", "source" => source.to_string())
            .set(f64::from(u8::from(warning.is_some())));
        if let Some(part) = part {
            self.health.warn(part, warning);
        }
    }
}

fn forget_old(recent: &mut VecDeque<(Instant, u64)>, now: Instant) {
    while recent.front().is_some_and(|(at, _)| now.duration_since(*at) > RATE_WINDOW) {
        recent.pop_front();
    }
}
