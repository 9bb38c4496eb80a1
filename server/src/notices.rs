//! PostgreSQL: one LISTEN connection per node for everything the nodes tell each other, each
//! notice handed to the part it is for: view changes and appends (`fanout::ViewFeed`),
//! revocations (`auth::Auth`).
//!
//! Whoever relies on hearing every notice is told when the connection is up and when it is
//! lost: while it is lost, notices are missed, so the view cache and the identity caches are
//! switched off; once it is back, each catches up from the tables.

use crate::auth::Auth;
use crate::fanout::{ViewFeed, APPENDS_CHANNEL, CHANNEL as VIEWS_CHANNEL};
use crate::store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How `/healthz?verbose` names this part.
const PART: &str = "notice listener";

/// Receive every node's notices until shut down; `auth` is None for tools that serve no
/// requests (`tally seed`).
pub async fn listen(
    url: String,
    store: Store,
    feed: Arc<ViewFeed>,
    auth: Option<Arc<Auth>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        let result = listen_once(&url, &store, &feed, auth.as_deref(), &shutdown, &mut backoff).await;
        feed.not_listening();
        if let Some(auth) = &auth {
            auth.not_listening();
        }
        match result {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(error = %err, "the notice listener lost its connection; reconnecting");
                metrics::counter!("tally_notice_listener_reconnects_total").increment(1);
                store.health.failing(PART, format!("{err:#}"));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn listen_once(
    url: &str,
    store: &Store,
    feed: &ViewFeed,
    auth: Option<&Auth>,
    shutdown: &CancellationToken,
    backoff: &mut Duration,
) -> anyhow::Result<()> {
    let mut listener = sqlx::postgres::PgListener::connect(url).await?;
    // `recv` would reconnect by itself and drop the notices of the gap without a word; with
    // `try_recv` a lost connection is seen here, so the caches are switched off and resynced.
    let mut channels = vec![VIEWS_CHANNEL, APPENDS_CHANNEL];
    if auth.is_some() {
        channels.push(crate::auth::CHANNEL);
    }
    listener.listen_all(channels).await?;
    // Listening from here on: every later notice will arrive.
    let views_at = crate::projector::load_checkpoint(store, crate::projector::membership_view::NAME).await?;
    feed.listening(store, views_at).await?;
    if let Some(auth) = auth {
        auth.listening().await;
    }
    store.health.ok(PART);
    *backoff = Duration::from_millis(100);
    loop {
        let notice = tokio::select! {
            n = listener.try_recv() => match n? {
                Some(notice) => notice,
                None => anyhow::bail!("the connection was closed"),
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        match (notice.channel(), auth) {
            (crate::auth::CHANNEL, Some(auth)) => auth.notice(notice.payload()),
            (channel, _) => feed.notice(channel, notice.payload(), store).await?,
        }
    }
}
