//! `GET /ws`: subscribe to member views (API.md "Live updates").
//!
//! Subscribe first, then send the current view: with the mailbox keeping only newer frames,
//! nothing is missed between page render and socket connect, or across a reconnect.

use crate::fanout::ViewFeed;
use crate::live::{error_frame, view_frame, Hub, Mailbox};
use crate::queries;
use crate::store::Store;
use crate::AppState;
use app::domain::validate;
use app::views::{ClientMessage, MEMBERS_TOPIC};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::collections::HashSet;
use std::sync::Arc;
use tokio_util::task::AbortOnDropHandle;

/// Per-socket buffers. Clients send only tiny subscribe messages and receive views of a few KiB;
/// the library defaults (128 KiB each way) would cost far more memory per idle socket than the
/// socket's actual traffic needs.
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 8 * 1024;
const MAX_INCOMING: usize = 16 * 1024;

pub async fn ws(upgrade: WebSocketUpgrade, State(state): State<AppState>) -> Response {
    let upgrade = upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING);
    upgrade.on_upgrade(move |socket: WebSocket| {
        let (sink, stream) = socket.split();
        serve(sink, stream, state.hub.clone(), state.store.clone(), state.feed.clone())
    })
}

/// One client: a receive loop (subscriptions) and a send loop (mailbox) until either ends.
///
/// The socket's sending half lives in its mailbox: a change is written there by whoever
/// publishes it, and the send loop only sends what had to wait (a client not reading, errors).
/// The send loop is a task of its own. In one task, every wake-up to send would also poll the
/// socket for reading, and the WebSocket library zero-fills its read buffer on each such poll.
pub async fn serve<W, R>(sink: W, mut stream: R, hub: Arc<Hub>, store: Store, feed: Arc<ViewFeed>)
where
    W: Sink<Message> + Send + 'static,
    R: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    metrics::gauge!("tally_ws_connections").increment(1.0);
    let mailbox = hub.mailbox(Box::pin(sink.sink_map_err(|_| ())));
    let mut topics = HashSet::new();
    let outbox = mailbox.clone();
    // Aborted when this function returns or is dropped: the send loop never outlives its socket.
    let mut send = AbortOnDropHandle::new(tokio::spawn(async move { outbox.send_loop().await }));
    let receive = async {
        while let Some(Ok(message)) = stream.next().await {
            match message {
                Message::Text(text) => handle(text.as_str(), &hub, &store, &feed, &mailbox, &mut topics).await,
                Message::Binary(_) => mailbox.put_error(error_frame("invalid_request", "send JSON text messages")),
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    };
    tokio::select! {
        _ = &mut send => {}
        _ = receive => {}
    }
    for topic in &topics {
        hub.unsubscribe(topic, &mailbox);
    }
    drop(send);
    // A fan-out under way may still hold the mailbox: the socket closes now all the same.
    mailbox.detach().await;
    metrics::gauge!("tally_ws_connections").decrement(1.0);
}

/// A topic is `members` or `member:<id>`; returns the member id for the latter.
fn parse_topic(topic: &str) -> Result<Option<&str>, String> {
    if topic == MEMBERS_TOPIC {
        return Ok(None);
    }
    let id = topic
        .strip_prefix("member:")
        .ok_or_else(|| format!("unknown topic '{topic}': use \"member:<id>\" or \"members\""))?;
    validate::id("member id", id).map(|_| Some(id))
}

async fn handle(
    text: &str,
    hub: &Hub,
    store: &Store,
    feed: &ViewFeed,
    mailbox: &Arc<Mailbox>,
    topics: &mut HashSet<String>,
) {
    let message = match serde_json::from_str::<ClientMessage>(text) {
        Ok(m) => m,
        Err(_) => {
            let hint =
                r#"expected {"subscribe": "member:<id>"}, {"unsubscribe": "member:<id>"} or {"subscribe": "members"}"#;
            mailbox.put_error(error_frame("invalid_request", hint));
            return;
        }
    };
    match message {
        ClientMessage::Subscribe(topic) => {
            let member_id = match parse_topic(&topic) {
                Ok(id) => id.map(str::to_string),
                Err(e) => return mailbox.put_error(error_frame("invalid_request", &e)),
            };
            let key = hub.subscribe(&topic, mailbox);
            topics.insert(topic.clone());
            if let Some(id) = member_id {
                match queries::member_view_cached(store, &feed.cache, &id).await {
                    Ok(Some((json, position))) => mailbox.put(&key, view_frame(&topic, position.max(0) as u64, &json)),
                    // Not enrolled yet: the view is sent the moment it exists.
                    Ok(None) => {}
                    Err(err) => {
                        tracing::error!(error = %err, "cannot read view for a new subscriber");
                        mailbox.put_error(error_frame("internal", "the current view could not be read"));
                    }
                }
            }
        }
        ClientMessage::Unsubscribe(topic) => {
            if let Err(e) = parse_topic(&topic) {
                return mailbox.put_error(error_frame("invalid_request", &e));
            }
            hub.unsubscribe(&topic, mailbox);
            topics.remove(&topic);
        }
    }
}
