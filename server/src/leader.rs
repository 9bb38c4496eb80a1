//! PostgreSQL: exactly one node at a time runs the projector and the loyalty policy.
//!
//! Each node keeps trying `pg_try_advisory_lock` on a dedicated connection. The holder runs the
//! consumers and pings its connection; if the session is lost it stops them at once. When the
//! holder dies (even by `kill -9`), PostgreSQL ends its session and frees the lock, and the next
//! node to try (within `retry`) takes over from the checkpoints. Even a node that wrongly believed
//! it led could not double-apply: every batch moves its consumer's checkpoint only from where the
//! batch started, or rolls back (see `projector::advance_checkpoint`).

use crate::projector::Consumers;
use crate::store::CONSUMER_LEADER_LOCK;
use sqlx::Connection;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn lead(url: String, consumers: Arc<Consumers>, shutdown: CancellationToken, retry: Duration) {
    while !shutdown.is_cancelled() {
        if let Err(err) = hold(&url, &consumers, &shutdown, retry).await {
            tracing::warn!(error = %err, "consumer leadership lost or unavailable; retrying");
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

async fn hold(
    url: &str,
    consumers: &Arc<Consumers>,
    shutdown: &CancellationToken,
    retry: Duration,
) -> anyhow::Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    loop {
        let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(CONSUMER_LEADER_LOCK)
            .fetch_one(&mut conn)
            .await?;
        if got {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    tracing::info!("this node now runs the projector and the loyalty policy");
    metrics::gauge!("tally_consumer_leader").set(1.0);
    let stop = shutdown.child_token();
    let tasks = consumers.run(stop.clone());
    let outcome = loop {
        tokio::select! {
            _ = tokio::time::sleep(retry) => {
                if let Err(err) = sqlx::query("SELECT 1").execute(&mut conn).await {
                    break Err(err.into());
                }
            }
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    metrics::gauge!("tally_consumer_leader").set(0.0);
    // Closing the session releases the lock for the next node.
    let _ = conn.close().await;
    outcome
}
