//! The live hub: changed views go out to WebSocket subscribers, newest-wins per topic.
//!
//! Each socket has a [`Mailbox`]: its writing half, and at most one pending frame per topic.
//! A change is written straight to every socket that is ready for it; a socket that is not
//! (its client reads slowly) keeps the frame pending, and a newer frame replaces it, so a slow
//! client gets the latest view and never a growing queue.
//!
//! A change is encoded once, as the WebSocket frame's bytes, and those same bytes are written to
//! every subscriber's socket: no socket has a write buffer of its own. (Through the WebSocket
//! library's writer each socket copied every frame into its own buffer, and the first view
//! longer than any before made all 10,000 buffers grow at once, into fresh memory: that one
//! change took twice as long as the others.)
//!
//! A change on a topic that 10,000 sockets watch is 10,000 `put`s, so they do not allocate in
//! the common case: topics are shared `Arc<str>`s (the hub's own key) and the maps keep their
//! capacity between changes.

use app::views::MEMBERS_TOPIC;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// A view message ready to send.
#[derive(Clone, Debug)]
pub struct Frame {
    pub position: u64,
    /// The whole WebSocket frame, header included.
    pub bytes: Bytes,
}

/// The `view` message for a topic, built around the view's stored JSON without re-encoding it.
pub fn view_frame(topic: &str, position: u64, view_json: &str) -> Frame {
    let topic = serde_json::Value::String(topic.to_string());
    let text = format!(r#"{{"type":"view","topic":{topic},"position":{position},"view":{view_json}}}"#);
    Frame { position, bytes: text_frame(&text) }
}

pub fn error_frame(code: &str, message: &str) -> Bytes {
    text_frame(&serde_json::json!({"type": "error", "code": code, "message": message}).to_string())
}

/// An error about one topic (a subscribe refused): names the topic.
pub fn topic_error_frame(code: &str, topic: &str, message: &str) -> Bytes {
    text_frame(&serde_json::json!({"type": "error", "code": code, "topic": topic, "message": message}).to_string())
}

/// A close frame (RFC 6455, 5.5.1): the code, then the reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    control_frame(OpCode::Control(Control::Close), &payload)
}

/// A ping (the client's browser or library answers with a pong).
pub fn ping_frame() -> Bytes {
    control_frame(OpCode::Control(Control::Ping), b"")
}

fn control_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let header = FrameHeader { is_final: true, opcode, ..FrameHeader::default() };
    let mut out = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
    // Into a Vec: cannot fail.
    let _ = header.format(payload.len() as u64, &mut out);
    out.extend_from_slice(payload);
    out.into()
}

/// A text message as the server sends it: one final, unmasked frame (RFC 6455, 5.2), header
/// written by the WebSocket library.
fn text_frame(text: &str) -> Bytes {
    let header = FrameHeader { is_final: true, opcode: OpCode::Data(Data::Text), ..FrameHeader::default() };
    let mut out = Vec::with_capacity(header.len(text.len() as u64) + text.len());
    // Into a Vec: cannot fail.
    let _ = header.format(text.len() as u64, &mut out);
    out.extend_from_slice(text.as_bytes());
    out.into()
}

/// A topic name, shared between the hub and every mailbox that watches it.
pub type Topic = Arc<str>;

/// The writing half of a client's socket (any error means the socket is gone).
pub type SocketWriter = Pin<Box<dyn AsyncWrite + Send>>;

#[derive(Default)]
struct Pending {
    /// Newest unsent frame per topic.
    views: HashMap<Topic, Frame>,
    /// Highest position sent per topic: anything at or below is stale.
    sent: HashMap<Topic, u64>,
    /// Frames answering the client's own messages: errors, and the WebSocket library's pong and
    /// close replies. Each is one or more whole frames.
    replies: Vec<Bytes>,
    /// Scratch for ordering a batch's views (kept for its capacity).
    order: Vec<Frame>,
}

struct Writer {
    /// None once the socket failed or its client left.
    io: Option<SocketWriter>,
    /// The rest of a frame the socket took only part of: written before anything else.
    rest: Bytes,
    /// Nothing written is still waiting in the socket's buffers.
    flushed: bool,
}

/// Replies answer the client's own messages; a client flooding them loses the oldest.
const MAX_PENDING_REPLIES: usize = 16;

pub struct Mailbox {
    id: u64,
    pending: Mutex<Pending>,
    /// Held by the socket's send loop while it writes, or by a publisher writing directly.
    writer: tokio::sync::Mutex<Writer>,
    notify: Notify,
}

impl Mailbox {
    /// Send `frame` for `topic` unless something as new is already pending or sent.
    ///
    /// Borrowed: a fan-out's tasks on every core share one frame, and a clone per socket would
    /// bounce its reference count between the cores twice per socket; only a frame left
    /// pending is cloned.
    ///
    /// A socket with nothing pending and nothing unflushed gets the frame written at once, by
    /// the caller: that is one `write` call, where waking the socket's send loop would cost a
    /// task wake-up and a poll besides. Otherwise the frame waits for the send loop
    /// (newest-wins: a slow client never grows a queue).
    pub fn put(&self, topic: &Topic, frame: &Frame) {
        let Ok(mut p) = self.pending.lock() else { return };
        if p.sent.get(topic).is_some_and(|sent| *sent >= frame.position)
            || p.views.get(topic).is_some_and(|f| f.position >= frame.position)
        {
            return;
        }
        // Written while `pending` is held: the send loop takes frames under that lock too, so a
        // frame it took is written before this one (it holds the writer until then).
        if p.views.is_empty() && p.replies.is_empty() && self.write_now(frame) {
            // Updated in place: no clone of the topic for each socket of a fan-out.
            match p.sent.get_mut(topic) {
                Some(sent) => *sent = frame.position,
                None => {
                    p.sent.insert(topic.clone(), frame.position);
                }
            }
            return;
        }
        p.views.insert(topic.clone(), frame.clone());
        drop(p);
        self.notify.notify_one();
    }

    /// Write without waiting: true if the frame was handed to the socket (or the socket is
    /// gone), false if the send loop has to send it.
    fn write_now(&self, frame: &Frame) -> bool {
        let Ok(mut writer) = self.writer.try_lock() else { return false };
        let Writer { io, rest, flushed } = &mut *writer;
        let (true, true, Some(socket)) = (*flushed, rest.is_empty(), io.as_mut()) else { return false };
        // Never waits: a socket that is not ready leaves the frame to the send loop, which
        // waits properly (with its own waker).
        let mut cx = Context::from_waker(Waker::noop());
        match socket.as_mut().poll_write(&mut cx, &frame.bytes) {
            Poll::Pending => return false,
            Poll::Ready(Ok(n)) if n == frame.bytes.len() => match socket.as_mut().poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => return true,
                // The frame is the socket's; the send loop finishes the flush.
                Poll::Pending => *flushed = false,
                Poll::Ready(Err(_)) => *io = None,
            },
            // The socket is gone: the send loop ends, and with it the connection.
            Poll::Ready(Ok(0) | Err(_)) => *io = None,
            // The socket's buffer took part of it: the send loop writes the rest.
            Poll::Ready(Ok(n)) => *rest = frame.bytes.slice(n..),
        }
        self.notify.notify_one();
        true
    }

    /// Send `frame` (an error, or the WebSocket library's reply to a ping or a close) before any
    /// view still pending.
    pub fn put_reply(&self, frame: Bytes) {
        let Ok(mut p) = self.pending.lock() else { return };
        if p.replies.len() >= MAX_PENDING_REPLIES {
            p.replies.remove(0);
        }
        p.replies.push(frame);
        drop(p);
        self.notify.notify_one();
    }

    /// Send `frame` even if a view at the same position was sent for `topic` already: that view
    /// came from a table since replaced by a blue/green swap (see `Hub::republish`). A newer one,
    /// sent or pending, still wins.
    pub fn resend(&self, topic: &Topic, frame: &Frame) {
        if let Ok(mut p) = self.pending.lock() {
            if p.sent.get(topic) == Some(&frame.position) {
                p.sent.remove(topic);
            }
        }
        self.put(topic, frame);
    }

    /// Forget what was sent for a topic, so a re-subscribe gets the current view again.
    pub fn forget(&self, topic: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.sent.remove(topic);
            p.views.remove(topic);
        }
    }

    /// The socket's send loop: finish writes and flushes, and send what waits, until the socket
    /// fails or is closed.
    pub async fn send_loop(&self) {
        let mut batch = Vec::new();
        loop {
            self.notify.notified().await;
            let mut writer = self.writer.lock().await;
            let Writer { io, rest, flushed } = &mut *writer;
            let Some(socket) = io.as_mut() else { return };
            let sent = async {
                socket.write_all(rest).await?;
                *rest = Bytes::new();
                while self.take(&mut batch) {
                    for frame in batch.drain(..) {
                        socket.write_all(&frame).await?;
                    }
                }
                socket.flush().await?;
                *flushed = true;
                std::io::Result::Ok(())
            };
            if sent.await.is_err() {
                *io = None;
                return;
            }
        }
    }

    /// The connection ends: send the replies still pending (the close handshake's reply), for
    /// at most `grace`, and close the socket. Nothing is written to it afterwards.
    pub async fn close(&self, grace: std::time::Duration) {
        let mut writer = self.writer.lock().await;
        let Some(mut socket) = writer.io.take() else { return };
        let rest = std::mem::take(&mut writer.rest);
        let replies = self.pending.lock().map(|mut p| std::mem::take(&mut p.replies)).unwrap_or_default();
        let finish = async {
            socket.write_all(&rest).await?;
            for frame in replies {
                socket.write_all(&frame).await?;
            }
            socket.shutdown().await
        };
        let _ = tokio::time::timeout(grace, finish).await;
    }

    /// Move what is pending into `out` (replies first, then views by position); false if nothing
    /// was.
    fn take(&self, out: &mut Vec<Bytes>) -> bool {
        let Ok(mut p) = self.pending.lock() else { return false };
        if p.views.is_empty() && p.replies.is_empty() {
            return false;
        }
        let Pending { views, sent, replies, order } = &mut *p;
        out.append(replies);
        for (topic, frame) in views.drain() {
            sent.insert(topic, frame.position);
            order.push(frame);
        }
        // Several topics at once (the staff console's `members`): oldest change first.
        order.sort_by_key(|frame| frame.position);
        out.extend(order.drain(..).map(|frame| frame.bytes));
        true
    }
}

/// Sockets written by one change before other tasks get a turn. Written all in one go, 10,000
/// sockets take tens of milliseconds, and any task woken meanwhile (a command's answer, after
/// the log's sync) would wait for all of them; a chunk at a time, it waits for one chunk.
const WRITE_CHUNK: usize = 256;

#[derive(Default)]
pub struct Hub {
    /// Each topic's mailboxes by id, that is in the order their sockets connected: a fan-out
    /// writes the sockets in that order, and so touches the mailboxes, the kernel's sockets and
    /// (on one machine) the clients' memory in the order it was allocated, not at random.
    topics: Mutex<HashMap<Topic, BTreeMap<u64, Arc<Mailbox>>>>,
    next_id: AtomicU64,
}

impl Hub {
    /// A mailbox for a new socket; its send loop is [`Mailbox::send_loop`].
    pub fn mailbox(&self, io: SocketWriter) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            pending: Mutex::new(Pending::default()),
            writer: tokio::sync::Mutex::new(Writer { io: Some(io), rest: Bytes::new(), flushed: true }),
            notify: Notify::new(),
        })
    }

    /// Returns the hub's own name for the topic, for frames put directly in the mailbox.
    pub fn subscribe(&self, topic: &str, mailbox: &Arc<Mailbox>) -> Topic {
        let Ok(mut topics) = self.topics.lock() else { return topic.into() };
        let key = match topics.get_key_value(topic) {
            Some((key, _)) => key.clone(),
            None => Topic::from(topic),
        };
        topics.entry(key.clone()).or_default().insert(mailbox.id, mailbox.clone());
        key
    }

    pub fn unsubscribe(&self, topic: &str, mailbox: &Mailbox) {
        if let Ok(mut topics) = self.topics.lock() {
            if let Some(subs) = topics.get_mut(topic) {
                subs.remove(&mailbox.id);
                if subs.is_empty() {
                    topics.remove(topic);
                }
            }
        }
        mailbox.forget(topic);
    }

    /// Whether any socket watches `topic`, itself or through `members`: a change nobody watches
    /// need not be encoded.
    pub fn watched(&self, topic: &str) -> bool {
        self.topics.lock().is_ok_and(|topics| [topic, MEMBERS_TOPIC].iter().any(|t| topics.contains_key(*t)))
    }

    /// The topics starting with `prefix` that some socket watches.
    pub fn watched_topics(&self, prefix: &str) -> Vec<String> {
        let Ok(topics) = self.topics.lock() else { return Vec::new() };
        topics.keys().filter(|t| t.starts_with(prefix)).map(|t| t.to_string()).collect()
    }

    pub fn subscriber_count(&self) -> usize {
        self.topics.lock().map(|t| t.values().map(BTreeMap::len).sum()).unwrap_or(0)
    }

    /// A frame for the subscribers of `topic` alone (not `members`): the operations samples.
    pub fn publish_only(&self, topic: &str, position: u64, view_json: &str) {
        let (key, recipients): (Option<Topic>, Vec<Arc<Mailbox>>) = match self.topics.lock() {
            Ok(topics) => match topics.get_key_value(topic) {
                Some((key, subs)) => (Some(key.clone()), subs.values().cloned().collect()),
                None => (None, Vec::new()),
            },
            Err(_) => return,
        };
        let Some(key) = key else { return };
        let frame = view_frame(topic, position, view_json);
        for mailbox in recipients {
            mailbox.put(&key, &frame);
        }
    }

    /// The hub's name for a member topic and the mailboxes of its subscribers and of `members`
    /// subscribers (pending frames are kept per member topic, for both).
    fn recipients(&self, topic: &str) -> Option<(Topic, Vec<Arc<Mailbox>>)> {
        let topics = self.topics.lock().ok()?;
        let key = topics.get_key_value(topic).map_or_else(|| topic.into(), |(key, _)| key.clone());
        let subscribers = [topic, MEMBERS_TOPIC].into_iter().filter_map(|t| topics.get(t));
        Some((key, subscribers.flat_map(|subs| subs.values().cloned()).collect()))
    }

    /// Push one view again, at a position its subscribers may have been sent already: the table
    /// it was read from was replaced (a blue/green swap, see `ViewFeed::replaced`). Rare: no
    /// chunking.
    pub fn republish(&self, topic: &str, position: u64, view_json: &str) {
        let Some((key, recipients)) = self.recipients(topic) else { return };
        let frame = view_frame(topic, position, view_json);
        for mailbox in recipients {
            mailbox.resend(&key, &frame);
        }
    }

    /// Push one view (already serialized) on its topic.
    pub fn publish(&self, topic: &str, position: u64, view_json: &str) {
        let Some((key, recipients)) = self.recipients(topic) else { return };
        if recipients.is_empty() {
            return;
        }
        let frame = view_frame(topic, position, view_json);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if recipients.len() > WRITE_CHUNK => {
                // Not in the caller (the projector) but in tasks of their own, a chunk at a time.
                // Written later than the publish, a frame still never overtakes a newer one:
                // `put` compares positions. (A socket that unsubscribes meanwhile can still get
                // this one view, as it could before between the hub's lock and the put.)
                //
                // One task per worker thread, each with its share of the sockets, so every core
                // writes (one task alone left the other core to the clients, which then woke
                // once per write: the median delivery came later).
                //
                // Unconstrained: tokio's cooperative budget would turn the socket writes after
                // the first hundred or so into "not ready", leaving them to the send loops. The
                // tasks give way between chunks instead.
                let recipients: Arc<[Arc<Mailbox>]> = recipients.into();
                let share = recipients.len().div_ceil(runtime.metrics().num_workers().max(1));
                for start in (0..recipients.len()).step_by(share) {
                    let (recipients, key, frame) = (recipients.clone(), key.clone(), frame.clone());
                    runtime.spawn(tokio::task::unconstrained(async move {
                        let end = (start + share).min(recipients.len());
                        for chunk in recipients[start..end].chunks(WRITE_CHUNK) {
                            chunk.iter().for_each(|m| m.put(&key, &frame));
                            // Whatever was woken meanwhile runs before the next chunk's writes.
                            requeue().await;
                        }
                    }));
                }
            }
            _ => recipients.iter().for_each(|m| m.put(&key, &frame)),
        }
    }
}

/// Let the tasks woken so far run first, and stay where another worker can take this one.
///
/// `tokio::task::yield_now` keeps the task on its own worker's deferred list until that worker
/// runs out of work, where no other worker can steal it: if that worker's thread stalls (the
/// host takes its CPU, a page fault waits for the disk), the rest of the fan-out waits with it
/// while the other worker may idle. A task that wakes itself goes to the back of its worker's
/// run queue, behind the tasks woken meanwhile, and an idle worker steals it from there.
async fn requeue() {
    let mut woken = false;
    std::future::poll_fn(|cx| {
        if woken {
            return std::task::Poll::Ready(());
        }
        woken = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    /// What a test socket saw, and whether it is ready for more.
    #[derive(Default)]
    struct SocketState {
        /// Every byte written, in order.
        written: Vec<u8>,
        /// Not ready (a client that does not read): the send loop has to wait.
        blocked: bool,
        /// At most this many bytes taken per write (a full kernel buffer takes part of a frame).
        limit: Option<usize>,
        shut_down: bool,
        waker: Option<Waker>,
    }

    /// A socket for the hub's tests: records every message written to it.
    #[derive(Clone, Default)]
    struct TestSocket {
        state: Arc<Mutex<SocketState>>,
        /// Called on every write (the tests' probes).
        on_send: Option<Arc<dyn Fn() + Send + Sync>>,
    }

    impl TestSocket {
        fn sent(&self) -> Vec<String> {
            messages(&self.state.lock().unwrap().written)
        }
        fn set_blocked(&self, blocked: bool) {
            let mut state = self.state.lock().unwrap();
            state.blocked = blocked;
            if let Some(waker) = state.waker.take() {
                waker.wake();
            }
        }
        fn mailbox(&self, hub: &Hub) -> Arc<Mailbox> {
            hub.mailbox(Box::pin(self.clone()))
        }
    }

    impl AsyncWrite for TestSocket {
        fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let mut state = self.state.lock().unwrap();
            if state.blocked {
                state.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = buf.len().min(state.limit.unwrap_or(usize::MAX));
            state.written.extend_from_slice(&buf[..n]);
            drop(state);
            if let Some(on_send) = &self.on_send {
                on_send();
            }
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.state.lock().unwrap().shut_down = true;
            Poll::Ready(Ok(()))
        }
    }

    /// The text messages in `bytes`, as a client would read them; a frame still incomplete at
    /// the end is left out.
    fn messages(bytes: &[u8]) -> Vec<String> {
        let mut cursor = std::io::Cursor::new(bytes);
        let mut out = Vec::new();
        while let Some((header, length)) = FrameHeader::parse(&mut cursor).unwrap() {
            assert!(header.is_final && header.mask.is_none());
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            let start = cursor.position() as usize;
            let Some(text) = bytes.get(start..start + length as usize) else { break };
            out.push(String::from_utf8(text.to_vec()).unwrap());
            cursor.set_position((start + text.len()) as u64);
        }
        out
    }

    fn position(message: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(message).unwrap();
        v["position"].as_u64().unwrap()
    }

    /// What the send loop would send next, if anything.
    fn take(mailbox: &Mailbox) -> Option<Vec<String>> {
        let mut out = Vec::new();
        mailbox.take(&mut out).then_some(out.iter().flat_map(|frame| messages(frame)).collect())
    }

    #[test]
    fn a_topic_is_watched_by_its_own_subscribers_and_by_those_of_members() {
        let hub = Hub::default();
        let (one, all) = (TestSocket::default(), TestSocket::default());
        let (one, all) = (one.mailbox(&hub), all.mailbox(&hub));
        assert!(!hub.watched("member:m-1"));
        hub.subscribe("member:m-1", &one);
        assert!(hub.watched("member:m-1") && !hub.watched("member:m-2"));
        hub.unsubscribe("member:m-1", &one);
        assert!(!hub.watched("member:m-1"));
        hub.subscribe(MEMBERS_TOPIC, &all);
        assert!(hub.watched("member:m-1") && hub.watched("member:m-2"));
    }

    #[test]
    fn a_ready_socket_gets_each_change_at_once() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        let mb = socket.mailbox(&hub);
        hub.subscribe("member:a", &mb);
        hub.publish("member:a", 1, "{}");
        hub.publish("member:a", 2, "{}");
        // Not subscribed.
        hub.publish("member:b", 3, "{}");
        // No send loop runs here: the publisher wrote them.
        let sent: Vec<u64> = socket.sent().iter().map(|m| position(m)).collect();
        assert_eq!(sent, [1, 2]);
        assert!(take(&mb).is_none());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_slow_client_gets_only_the_newest_view_per_topic() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        let mb = socket.mailbox(&hub);
        let send_loop = {
            let mb = mb.clone();
            tokio::spawn(async move { mb.send_loop().await })
        };
        hub.subscribe("member:a", &mb);
        socket.set_blocked(true);
        for p in 1..=100 {
            hub.publish("member:a", p, &format!(r#"{{"n":{p}}}"#));
        }
        assert!(socket.sent().is_empty());
        socket.set_blocked(false);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while socket.sent().is_empty() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the send loop sends once the client reads");
        // Caught up: the next change is written at once again.
        hub.publish("member:a", 101, "{}");
        let sent: Vec<u64> = socket.sent().iter().map(|m| position(m)).collect();
        assert_eq!(sent, [100, 101]);
        send_loop.abort();
    }

    #[test]
    fn an_older_view_never_follows_a_newer_one() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        let mb = socket.mailbox(&hub);
        hub.subscribe("member:a", &mb);
        hub.publish("member:a", 5, "{}");
        hub.publish("member:a", 4, "{}");
        socket.set_blocked(true);
        hub.publish("member:a", 3, "{}");
        assert_eq!(socket.sent().len(), 1);
        assert!(take(&mb).is_none());
    }

    #[test]
    fn members_topic_sees_every_member() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        let mb = socket.mailbox(&hub);
        hub.subscribe(MEMBERS_TOPIC, &mb);
        socket.set_blocked(true);
        hub.publish("member:b", 2, "{}");
        hub.publish("member:a", 1, "{}");
        let batch = take(&mb).expect("something pending");
        assert_eq!(batch.len(), 2);
        // Oldest change first, whatever order the topics were published in.
        assert!(batch[0].contains(r#""topic":"member:a""#), "{:?}", batch[0]);
        assert!(batch[1].contains(r#""topic":"member:b""#), "{:?}", batch[1]);
    }

    /// Sockets that each note their index in `log` when written.
    fn noting_sockets(hub: &Hub, n: usize, log: &Arc<Mutex<Vec<usize>>>) -> Vec<Arc<Mailbox>> {
        (0..n)
            .map(|i| {
                let log = log.clone();
                let socket = TestSocket {
                    on_send: Some(Arc::new(move || log.lock().unwrap().push(i))),
                    ..TestSocket::default()
                };
                let mb = socket.mailbox(hub);
                hub.subscribe("member:a", &mb);
                mb
            })
            .collect()
    }

    /// Until `n` writes are noted in `log` (the fan-out tasks run meanwhile), at most 5 s.
    async fn wait_for_writes(log: &Mutex<Vec<usize>>, n: usize) {
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while log.lock().unwrap().len() < n {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every socket got the change");
    }

    /// A fan-out writes the sockets in the order they subscribed (see [`Hub`]), in the caller for
    /// a few sockets and in chunks for many.
    #[tokio::test(flavor = "current_thread")]
    async fn a_fan_out_writes_the_sockets_in_the_order_they_subscribed() {
        for sockets in [WRITE_CHUNK / 2, 4 * WRITE_CHUNK] {
            let hub = Hub::default();
            let log = Arc::new(Mutex::new(Vec::new()));
            let _mailboxes = noting_sockets(&hub, sockets, &log);
            hub.publish("member:a", 1, "{}");
            wait_for_writes(&log, sockets).await;
            assert_eq!(*log.lock().unwrap(), (0..sockets).collect::<Vec<_>>(), "{sockets} sockets");
        }
    }

    /// A task woken after a change to many sockets (a command's answer) waits for one chunk of
    /// their writes, not for all of them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_big_fan_out_lets_other_tasks_run_between_chunks() {
        const SOCKETS: usize = 4 * WRITE_CHUNK;
        let hub = Hub::default();
        let log = Arc::new(Mutex::new(Vec::new()));
        let _mailboxes = noting_sockets(&hub, SOCKETS, &log);
        hub.publish("member:a", 1, "{}");
        let probe = {
            let log = log.clone();
            tokio::spawn(async move { log.lock().unwrap().push(usize::MAX) })
        };
        probe.await.unwrap();
        wait_for_writes(&log, SOCKETS + 1).await;
        let log = log.lock().unwrap();
        let probe_at = log.iter().position(|i| *i == usize::MAX).unwrap();
        assert!(probe_at <= WRITE_CHUNK, "the other task ran after {probe_at} writes");
    }

    /// The host can take a CPU away from a worker thread for tens of milliseconds. If that
    /// happens to the worker that was running a big fan-out, the other worker carries it on: here
    /// the first write spawns a task that holds the fan-out's thread (it runs there next, between
    /// two chunks) until every other socket has its view, or 10 s.
    #[test]
    fn a_stalled_worker_does_not_hold_back_the_rest_of_a_fan_out() {
        const SOCKETS: usize = 4 * WRITE_CHUNK;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
        let hub = Hub::default();
        let written = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let stalled = Arc::new(AtomicBool::new(false));
        let on_send: Arc<dyn Fn() + Send + Sync> = {
            let (written, stalled) = (written.clone(), stalled.clone());
            Arc::new(move || {
                written.fetch_add(1, Ordering::SeqCst);
                if !stalled.swap(true, Ordering::SeqCst) {
                    let release = release.clone();
                    tokio::spawn(async move {
                        let stall = release.lock().unwrap().take();
                        if let Some(stall) = stall {
                            let _ = stall.recv_timeout(std::time::Duration::from_secs(10));
                        }
                    });
                }
            })
        };
        let _mailboxes: Vec<Arc<Mailbox>> = (0..SOCKETS)
            .map(|_| {
                let mb = TestSocket { on_send: Some(on_send.clone()), ..TestSocket::default() }.mailbox(&hub);
                hub.subscribe("member:a", &mb);
                mb
            })
            .collect();
        runtime.block_on(async {
            hub.publish("member:a", 1, "{}");
            let all = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while written.load(Ordering::SeqCst) < SOCKETS {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            })
            .await;
            let _ = release_tx.send(());
            assert!(all.is_ok(), "{} of {SOCKETS} sockets had the view", written.load(Ordering::SeqCst));
        });
    }

    /// A socket whose kernel buffer takes only part of a frame gets the rest before anything
    /// else, from the send loop.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_the_socket_took_in_part_is_finished_before_the_next() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        socket.state.lock().unwrap().limit = Some(10);
        let mb = socket.mailbox(&hub);
        let send_loop = {
            let mb = mb.clone();
            tokio::spawn(async move { mb.send_loop().await })
        };
        hub.subscribe("member:a", &mb);
        hub.publish("member:a", 1, r#"{"n":1}"#);
        hub.publish("member:a", 2, r#"{"n":2}"#);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while socket.sent().len() < 2 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("both views arrive whole");
        let sent: Vec<u64> = socket.sent().iter().map(|m| position(m)).collect();
        assert_eq!(sent, [1, 2]);
        send_loop.abort();
    }

    /// Closing sends the replies still pending (the close handshake's), then shuts the socket;
    /// nothing is written after.
    #[tokio::test(flavor = "current_thread")]
    async fn closing_sends_pending_replies_then_shuts_the_socket() {
        let hub = Hub::default();
        let socket = TestSocket::default();
        let mb = socket.mailbox(&hub);
        hub.subscribe("member:a", &mb);
        mb.put_reply(error_frame("invalid_request", "bad"));
        mb.close(std::time::Duration::from_secs(5)).await;
        hub.publish("member:a", 1, "{}");
        let sent = socket.sent();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert!(sent[0].contains("invalid_request"));
        assert!(socket.state.lock().unwrap().shut_down);
    }

    #[test]
    fn a_view_of_any_length_is_one_whole_frame() {
        for len in [0, 125, 126, 65_535, 65_536, 200_000] {
            let view = format!(r#"{{"pad":"{}"}}"#, "x".repeat(len));
            let frame = view_frame("member:a", 1, &view);
            let [message] = &messages(&frame.bytes)[..] else { panic!("one message per frame") };
            assert!(frame.bytes.ends_with(b"}}"), "nothing after the message");
            let v: serde_json::Value = serde_json::from_str(message).unwrap();
            assert_eq!(v["view"]["pad"].as_str().map(str::len), Some(len));
        }
    }

    #[test]
    fn view_frames_are_valid_messages() {
        let frame = view_frame("member:a\"x", 3, r#"{"member_id":"a"}"#);
        let [message] = &messages(&frame.bytes)[..] else { panic!("one message per frame") };
        let v: serde_json::Value = serde_json::from_str(message).unwrap();
        assert_eq!(v["type"], "view");
        assert_eq!(v["topic"], "member:a\"x");
        assert_eq!(v["position"], 3);
        assert_eq!(v["view"]["member_id"], "a");
    }
}
