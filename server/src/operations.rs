//! The `operations` live topic (staff): once a second, while anyone watches it, this node's view
//! of every consumer (position, lag, throughput, state, parked streams) goes to the sockets that
//! subscribed, for the operations page's charts. Pushed, not polled: the page draws each sample
//! as it arrives.

use crate::live::Hub;
use crate::projector::Consumers;
use app::views::{OperationsSample, OPERATIONS_TOPIC};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a sample is taken (one point of each chart).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The current sample, as the frame's `view`.
pub async fn sample(consumers: &Consumers) -> anyhow::Result<OperationsSample> {
    Ok(OperationsSample { at: crate::clock::now(), items: consumers.statuses().await? })
}

/// Publish a sample every [`SAMPLE_EVERY`] while the topic is watched, until `stop`.
pub async fn publish(hub: Arc<Hub>, consumers: Arc<Consumers>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(SAMPLE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Frames carry a position that only grows (a socket never takes an older frame of a topic).
    let mut sequence: u64 = 0;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.cancelled() => return,
        }
        if !hub.watched(OPERATIONS_TOPIC) {
            continue;
        }
        match sample(&consumers).await.and_then(|s| Ok(serde_json::to_string(&s)?)) {
            Ok(json) => {
                sequence += 1;
                hub.publish_only(OPERATIONS_TOPIC, sequence, &json);
            }
            Err(err) => tracing::warn!(error = %err, "cannot take an operations sample"),
        }
    }
}
