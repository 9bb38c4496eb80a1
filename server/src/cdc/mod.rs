//! Change data capture: a system of record's own database feeds Tally (docs/cdc.md).
//!
//! Two ways in, one path after them:
//! - [`slot`]: a PostgreSQL source read through a logical replication slot (`test_decoding`, by
//!   SQL: `pg_logical_slot_peek_changes`, then `pg_replication_slot_advance` once applied);
//! - [`debezium`]: change events posted to `POST /api/cdc/{source}` by Debezium Server or Kafka
//!   Connect, for sources that are not PostgreSQL.
//!
//! Each row change is mapped ([`mapping`]) to commands that go through the command bus like any
//! other, with the actor `cdc:<source>` and an idempotency key made of the change's position in
//! the source (scope `cdc:<source>`), which the writer stores in the transaction that appends the
//! command's events. A change read again (a crash before the slot moved on, an envelope sent
//! twice) finds its key and appends nothing: exactly once.

pub mod config;
pub mod debezium;
pub mod decoding;
pub mod mapping;
pub mod slot;
pub mod status;

use crate::commands::{Command, CommandBus, CommandError, Envelope, Idempotency, Meta};
use config::SourceConfig;
use mapping::{Change, Mapped};
use status::{CdcStatus, RowOutcome};
use std::collections::HashMap;

/// What applying a batch of changes came to.
#[derive(Debug, Default)]
pub struct Applied {
    pub outcomes: Vec<RowOutcome>,
    /// The position of the last change, when the batch had any.
    pub last_position: Option<String>,
}

/// Apply `changes` (in source order) through the bus. Commands of one member (or, for an anonymous
/// sale, one transaction) run one after the other in source order; different members' run side by
/// side, so a batch commits in a few group commits. A refusal by the domain's rules or a change
/// that cannot be mapped is counted and reported, not retried (it would be refused again). Any
/// other error (the store unreachable, writes stopped) returns `Err` after every member's queue has
/// stopped: the caller reads the same changes again later, and what did land is found by its keys.
pub async fn apply(
    bus: &CommandBus,
    status: &CdcStatus,
    source: &SourceConfig,
    changes: &[Change],
) -> Result<Applied, CommandError> {
    let actor = source.actor();
    let mut queues: Vec<Vec<(usize, Envelope)>> = Vec::new();
    let mut queue_of: HashMap<String, usize> = HashMap::new();
    // A change that maps to no command stays `Ignored`.
    let mut outcomes = vec![RowOutcome::Ignored; changes.len()];
    for (i, change) in changes.iter().enumerate() {
        let commands = match mapping::map(source, change) {
            Mapped::Commands(commands) => commands,
            Mapped::Invalid(reason) => {
                outcomes[i] = RowOutcome::Invalid;
                status.row_error(&source.name, &reason);
                continue;
            }
        };
        for (k, command) in commands.into_iter().enumerate() {
            let key = format!("{}#{k}", change.position);
            let stream = match &command {
                Command::Member { member_id, .. } => member_id.clone(),
                Command::RecordPurchase(p) => {
                    p.member_id.clone().unwrap_or_else(|| format!("sale {}", p.transaction_id))
                }
            };
            let envelope = Envelope {
                idempotency: Some(Idempotency {
                    scope: actor.clone(),
                    key: key.clone(),
                    // What the key stands for; a clock (a purchase's time) is left out, so the
                    // same change read again is the same request.
                    request: format!("{} {}", command.name(), stream),
                    unused: false,
                }),
                command,
                expected_version: None,
                meta: Meta {
                    correlation_id: uuid::Uuid::new_v4().to_string(),
                    causation_id: Some(format!("{actor}@{key}")),
                    actor: actor.clone(),
                },
            };
            let queue = *queue_of.entry(stream).or_insert_with(|| {
                queues.push(Vec::new());
                queues.len() - 1
            });
            queues[queue].push((i, envelope));
        }
    }
    let runs = queues.into_iter().map(|queue| async move {
        let mut results = Vec::with_capacity(queue.len());
        for (i, envelope) in queue {
            let result = bus.send(envelope).await;
            let transient = matches!(&result, Err(e) if !is_refusal(e));
            results.push((i, result));
            if transient {
                break; // later commands of this member wait for the retry, in order
            }
        }
        results
    });
    let mut failure = None;
    for (i, result) in futures::future::join_all(runs).await.into_iter().flatten() {
        let outcome = match result {
            Ok(answer) if answer.replayed => RowOutcome::Replayed,
            Ok(_) => RowOutcome::Applied,
            Err(err) if is_refusal(&err) => {
                status.row_error(&source.name, &format!("{} at {}: {err}", changes[i].table, changes[i].position));
                RowOutcome::Refused
            }
            Err(err) => {
                failure.get_or_insert(err);
                continue;
            }
        };
        // A change is applied if any of its commands was; replayed if all were seen before.
        outcomes[i] = match (outcomes[i], outcome) {
            (RowOutcome::Ignored, o) => o,
            (RowOutcome::Applied, _) | (_, RowOutcome::Applied) => RowOutcome::Applied,
            (RowOutcome::Replayed, RowOutcome::Replayed) => RowOutcome::Replayed,
            _ => RowOutcome::Refused,
        };
    }
    if let Some(err) = failure {
        return Err(err);
    }
    Ok(Applied { outcomes, last_position: changes.last().map(|c| c.position.clone()) })
}

/// An answer that running the command again would not change: the member's or the sale's rules
/// refused it, or its key was used for another request (the mapping changed since).
fn is_refusal(err: &CommandError) -> bool {
    matches!(err, CommandError::Member(_) | CommandError::Transaction(_) | CommandError::IdempotencyKeyReused)
}

/// The configured sources and what they have done, shared by the readers and the HTTP routes.
pub struct Cdc {
    pub config: config::CdcConfig,
    pub status: std::sync::Arc<CdcStatus>,
}

impl Cdc {
    /// Load `path` (none: no sources) and start a supervised reader for every PostgreSQL source
    /// the server is to read (`serve = true`, the default), and a watcher of the slot of every
    /// other one.
    pub fn start(
        path: Option<&std::path::Path>,
        bus: &CommandBus,
        health: &std::sync::Arc<crate::health::Health>,
        stop: &tokio_util::sync::CancellationToken,
    ) -> anyhow::Result<(std::sync::Arc<Cdc>, Vec<tokio::task::JoinHandle<()>>)> {
        let config = match path {
            Some(path) => config::CdcConfig::load(path)?,
            None => config::CdcConfig { sources: Vec::new() },
        };
        let status = std::sync::Arc::new(CdcStatus::new(&config.sources, health.clone()));
        let readers = config
            .sources
            .iter()
            .filter(|s| s.postgres_url.is_some() && s.serve)
            .map(|source| {
                let part = status.part(&source.name);
                let (bus, status, source, stop) = (bus.clone(), status.clone(), source.clone(), stop.clone());
                crate::health::spawn_supervised(health.clone(), part, stop.clone(), move || {
                    slot::read(bus.clone(), status.clone(), source.clone(), stop.clone())
                })
            })
            .chain(config.sources.iter().filter(|s| s.postgres_url.is_some() && !s.serve).map(|source| {
                let part = status.part(&source.name);
                let (status, source, stop) = (status.clone(), source.clone(), stop.clone());
                crate::health::spawn_supervised(health.clone(), part, stop.clone(), move || {
                    slot::watch_only(status.clone(), source.clone(), stop.clone())
                })
            }))
            .collect();
        Ok((std::sync::Arc::new(Cdc { config, status }), readers))
    }
}
