//! `GET /ws`: subscribe to member views (API.md "Live updates").
//!
//! Subscribe first, then send the current view: with the mailbox keeping only newer frames,
//! nothing is missed between page render and socket connect, or across a reconnect.
//!
//! Access (API.md "Identity and access"): the upgrade needs a session or a key; each subscribe
//! is checked against what the caller may read; at most [`MAX_TOPICS`] topics per socket and a
//! configured number of sockets per principal. When the caller's access ends (signed out,
//! expired, key revoked) the socket is closed with code 4401. A socket the client lets go quiet
//! is pinged, then closed.

use crate::auth::sessions::id_hash;
use crate::auth::sockets::{Owner, Registered};
use crate::fanout::ViewFeed;
use crate::http::error::ApiError;
use crate::live::{close_frame, error_frame, ping_frame, topic_error_frame, view_frame, Hub, Mailbox};
use crate::queries;
use crate::store::Store;
use crate::AppState;
use app::domain::access::{authorize, Action, Caller, Denied};
use app::domain::validate;
use app::views::{ClientMessage, MEMBERS_TOPIC, OPERATIONS_TOPIC};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use std::collections::HashSet;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::task::AbortOnDropHandle;

/// Clients send only tiny subscribe messages: a small read buffer, and a cap on what they send.
const READ_BUFFER: usize = 4 * 1024;
const MAX_INCOMING: usize = 16 * 1024;

/// How long a closing connection may take to send its close reply.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Topics one socket may watch at once (API.md).
pub const MAX_TOPICS: usize = 100;

/// The close code for "your access ended": signed out, expired, revoked (API.md).
pub const CLOSE_REVOKED: u16 = 4401;

/// The WebSocket opening handshake (RFC 6455, 4.2), answered here rather than by axum's
/// extractor: the upgraded connection is then ours, so the live hub can write each change's
/// frame, encoded once, straight to every socket (see `live.rs`).
pub async fn ws(State(state): State<AppState>, mut request: Request) -> Response {
    let caller = request.extensions().get::<Arc<Caller>>().cloned().unwrap_or_else(|| Arc::new(Caller::Anonymous));
    let owner = match &*caller {
        Caller::Key { key_id, .. } => Owner::Key(key_id.clone()),
        Caller::Member { account_id, .. } | Caller::Person { account_id, .. } => {
            let session = request.extensions().get::<tower_sessions::Session>().and_then(|s| s.id());
            match session {
                Some(id) => Owner::Session { hash: id_hash(&id), account: account_id.clone() },
                None => return ApiError::Unauthenticated.into_response(),
            }
        }
        Caller::Anonymous => return ApiError::Unauthenticated.into_response(),
    };
    let accept = match accept_key(request.headers()) {
        Ok(accept) => accept,
        Err(err) => {
            let mut response = err.into_response();
            // RFC 6455, 4.4: tell the client which version this server speaks.
            response.headers_mut().insert("sec-websocket-version", HeaderValue::from_static("13"));
            return response;
        }
    };
    let Some(on_upgrade) = request.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::InvalidRequest("this connection cannot be upgraded to a WebSocket (HTTP/1.1 only)".into())
            .into_response();
    };
    let registered = match state.auth.sockets.register(owner) {
        Ok(registered) => registered,
        Err(too_many) => {
            return ApiError::RateLimitedBy(format!("at most {} live connections per account or key", too_many.0))
                .into_response()
        }
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let client = Client {
                    hub: state.hub.clone(),
                    store: state.store.clone(),
                    feed: state.feed.clone(),
                    consumers: state.consumers.clone(),
                    caller,
                    idle: state.ws_idle,
                };
                serve(TokioIo::new(upgraded), client, registered).await
            }
            Err(err) => tracing::debug!(error = %err, "WebSocket upgrade failed"),
        }
    });
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The `Sec-WebSocket-Accept` answer to a valid opening handshake.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let bad = |message: &str| Err(ApiError::InvalidRequest(message.to_string()));
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return bad("GET /ws is a WebSocket endpoint: send Connection: upgrade and Upgrade: websocket");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return bad("unsupported WebSocket version: send Sec-WebSocket-Version: 13");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return bad("missing Sec-WebSocket-Key");
    };
    // A nonce of 16 bytes, base64-encoded (RFC 6455, 4.1).
    if base64::engine::general_purpose::STANDARD.decode(key.as_bytes()).map(|k| k.len()) != Ok(16) {
        return bad("Sec-WebSocket-Key is not 16 bytes in base64");
    }
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).or_else(|_| bad("invalid Sec-WebSocket-Key"))
}

/// What a connection serves with: the hub and the views, and who its client is.
pub struct Client {
    pub hub: Arc<Hub>,
    pub store: Store,
    pub feed: Arc<ViewFeed>,
    pub consumers: Arc<crate::projector::Consumers>,
    pub caller: Arc<Caller>,
    /// Closed after this long without a frame from the client; pinged at half of it.
    pub idle: Duration,
}

/// One client on an upgraded connection: a receive loop (subscriptions) and a send loop
/// (mailbox) until either ends, the client goes quiet, or its access ends.
///
/// The connection's writing half lives in its mailbox: a change is written there by whoever
/// publishes it, and the send loop only sends what had to wait (a client not reading, errors).
/// The send loop is a task of its own. In one task, every wake-up to send would also poll the
/// socket for reading, and the WebSocket library zero-fills its read buffer on each such poll.
pub async fn serve<S>(io: S, client: Client, registered: Registered)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    metrics::gauge!("tally_ws_connections").increment(1.0);
    let Client { hub, store, feed, consumers, caller, idle } = client;
    let (read, write) = tokio::io::split(io);
    let mailbox = hub.mailbox(Box::pin(write));
    // The WebSocket library reads and decodes the client's frames; what it writes (its pong
    // and close replies) goes through the mailbox like every other frame.
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING));
    let reader = ReadSide { read, mailbox: mailbox.clone() };
    let mut stream = WebSocketStream::from_raw_socket(reader, Role::Server, Some(config)).await;
    let mut topics = HashSet::new();
    let outbox = mailbox.clone();
    // Aborted when this function returns or is dropped: the send loop never outlives its socket.
    let mut send = AbortOnDropHandle::new(tokio::spawn(async move { outbox.send_loop().await }));
    let heard = std::sync::atomic::AtomicU64::new(0);
    let started = tokio::time::Instant::now();
    let receive = async {
        // After a close the library queues its reply and ends the stream on the next read.
        while let Some(Ok(message)) = stream.next().await {
            heard.store(started.elapsed().as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
            match message {
                Message::Text(text) => {
                    let socket = Socket {
                        hub: &hub,
                        store: &store,
                        feed: &feed,
                        consumers: &consumers,
                        mailbox: &mailbox,
                        caller: &caller,
                    };
                    socket.handle(text.as_str(), &mut topics).await
                }
                Message::Binary(_) => mailbox.put_reply(error_frame("invalid_request", "send JSON text messages")),
                Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    };
    // Ping at half the idle time; a client silent for the whole of it (not even a pong) is gone.
    let keep_alive = async {
        let mut ticks = tokio::time::interval_at(started + idle / 2, idle / 2);
        loop {
            ticks.tick().await;
            let quiet = started
                .elapsed()
                .saturating_sub(Duration::from_millis(heard.load(std::sync::atomic::Ordering::Relaxed)));
            if quiet >= idle {
                return;
            }
            mailbox.put_reply(ping_frame());
        }
    };
    tokio::select! {
        _ = &mut send => {}
        _ = receive => {}
        _ = keep_alive => {
            mailbox.put_reply(close_frame(1001, "no frames from the client"));
        }
        _ = registered.closed.cancelled() => {
            mailbox.put_reply(close_frame(CLOSE_REVOKED, "signed out"));
        }
    }
    for topic in &topics {
        hub.unsubscribe(topic, &mailbox);
    }
    drop(send);
    // A fan-out under way may still hold the mailbox: the socket closes now all the same.
    mailbox.close(CLOSE_GRACE).await;
    drop(registered);
    metrics::gauge!("tally_ws_connections").decrement(1.0);
}

/// The connection's reading half, as the WebSocket library sees it. The library writes only
/// replies (pong, close), each call its whole buffer of whole frames (`write_buffer_size(0)`:
/// at once); they are taken in full and queued in the mailbox, ahead of pending views.
struct ReadSide<R> {
    read: R,
    mailbox: Arc<Mailbox>,
}

impl<R: AsyncRead + Unpin> AsyncRead for ReadSide<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReadSide<R> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.mailbox.put_reply(Bytes::copy_from_slice(buf));
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A topic is `members`, `operations` or `member:<id>`; returns the member id for the latter.
fn parse_topic(topic: &str) -> Result<Option<&str>, String> {
    if topic == MEMBERS_TOPIC || topic == OPERATIONS_TOPIC {
        return Ok(None);
    }
    let id = topic
        .strip_prefix("member:")
        .ok_or_else(|| format!("unknown topic '{topic}': use \"member:<id>\", \"members\" or \"operations\""))?;
    validate::id("member id", id).map(|_| Some(id))
}

/// One socket's view of the server, while it handles a client's message.
struct Socket<'a> {
    hub: &'a Hub,
    consumers: &'a crate::projector::Consumers,
    store: &'a Store,
    feed: &'a ViewFeed,
    mailbox: &'a Arc<Mailbox>,
    caller: &'a Caller,
}

impl Socket<'_> {
    async fn handle(&self, text: &str, topics: &mut HashSet<String>) {
        let Socket { hub, store, feed, mailbox, caller, .. } = self;
        let message = match serde_json::from_str::<ClientMessage>(text) {
            Ok(m) => m,
            Err(_) => {
                let hint = r#"expected {"subscribe": "member:<id>"}, {"unsubscribe": "member:<id>"} or {"subscribe": "members"}"#;
                mailbox.put_reply(error_frame("invalid_request", hint));
                return;
            }
        };
        match message {
            ClientMessage::Subscribe(topic) => {
                let member_id = match parse_topic(&topic) {
                    Ok(id) => id.map(str::to_string),
                    Err(e) => return mailbox.put_reply(error_frame("invalid_request", &e)),
                };
                let action = match &member_id {
                    Some(id) => Action::ReadMember(id),
                    None if topic == OPERATIONS_TOPIC => Action::Operations,
                    None => Action::ManageMembers,
                };
                // Another member's id answers as an unknown one does: forbidden, and nothing sent.
                if let Err(denied) = authorize(caller, action) {
                    let message = match denied {
                        Denied::Forbidden | Denied::NotFound => "you may not watch this topic",
                        Denied::Unauthenticated => "sign in first",
                    };
                    return mailbox.put_reply(topic_error_frame("forbidden", &topic, message));
                }
                if !topics.contains(&topic) && topics.len() >= MAX_TOPICS {
                    let message = format!("at most {MAX_TOPICS} topics per connection");
                    return mailbox.put_reply(topic_error_frame("too_many_subscriptions", &topic, &message));
                }
                let key = hub.subscribe(&topic, mailbox);
                topics.insert(topic.clone());
                if topic == OPERATIONS_TOPIC {
                    // The sample now; the next ones every second (see `operations`).
                    match crate::operations::sample(self.consumers).await.and_then(|s| Ok(serde_json::to_string(&s)?)) {
                        Ok(json) => mailbox.put(&key, &view_frame(&topic, 0, &json)),
                        Err(err) => tracing::warn!(error = %err, "cannot take an operations sample"),
                    }
                }
                if let Some(id) = member_id {
                    match queries::member_view_cached(store, &feed.cache, &id).await {
                        Ok(Some((json, position))) => {
                            mailbox.put(&key, &view_frame(&topic, position.max(0) as u64, &json))
                        }
                        // Not enrolled yet: the view is sent the moment it exists.
                        Ok(None) => {}
                        Err(err) => {
                            tracing::error!(error = %err, "cannot read view for a new subscriber");
                            mailbox.put_reply(error_frame("internal", "the current view could not be read"));
                        }
                    }
                }
            }
            ClientMessage::Unsubscribe(topic) => {
                if let Err(e) = parse_topic(&topic) {
                    return mailbox.put_reply(error_frame("invalid_request", &e));
                }
                hub.unsubscribe(&topic, mailbox);
                topics.remove(&topic);
            }
        }
    }
}
