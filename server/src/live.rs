//! The live hub: changed views go out to WebSocket subscribers, newest-wins per topic.
//!
//! Each socket has a [`Mailbox`] holding at most one pending frame per topic. Publishing replaces
//! the pending frame if the new one is newer, so a slow client gets the latest view and never a
//! growing queue; frames are serialized once per change and shared by every subscriber.
//!
//! A change on a topic that 10,000 sockets watch is 10,000 `put`s and 10,000 `take`s, so neither
//! allocates in the common case: topics are shared `Arc<str>`s (the hub's own key) and the maps
//! keep their capacity between changes.

use app::views::MEMBERS_TOPIC;
use axum::extract::ws::Utf8Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A message ready to send.
#[derive(Clone, Debug)]
pub struct Frame {
    pub position: u64,
    pub text: Utf8Bytes,
}

/// The `view` message for a topic, built around the view's stored JSON without re-encoding it.
pub fn view_frame(topic: &str, position: u64, view_json: &str) -> Frame {
    let topic = serde_json::Value::String(topic.to_string());
    let text = format!(r#"{{"type":"view","topic":{topic},"position":{position},"view":{view_json}}}"#);
    Frame { position, text: text.into() }
}

pub fn error_frame(code: &str, message: &str) -> Utf8Bytes {
    serde_json::json!({"type": "error", "code": code, "message": message}).to_string().into()
}

/// A topic name, shared between the hub and every mailbox that watches it.
pub type Topic = Arc<str>;

#[derive(Default)]
struct Pending {
    /// Newest unsent frame per topic.
    views: HashMap<Topic, Frame>,
    /// Highest position sent per topic: anything at or below is stale.
    sent: HashMap<Topic, u64>,
    errors: Vec<Utf8Bytes>,
    /// Scratch for ordering a batch's views (kept for its capacity).
    order: Vec<Frame>,
}

/// Errors answer the client's own messages; a client flooding bad messages loses the oldest.
const MAX_PENDING_ERRORS: usize = 16;

pub struct Mailbox {
    id: u64,
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Mailbox {
    /// Keep `frame` for `topic` unless something as new is already pending or sent.
    pub fn put(&self, topic: &Topic, frame: Frame) {
        let Ok(mut p) = self.pending.lock() else { return };
        if p.sent.get(topic).is_some_and(|sent| *sent >= frame.position)
            || p.views.get(topic).is_some_and(|f| f.position >= frame.position)
        {
            return;
        }
        p.views.insert(topic.clone(), frame);
        drop(p);
        self.notify.notify_one();
    }

    pub fn put_error(&self, text: Utf8Bytes) {
        let Ok(mut p) = self.pending.lock() else { return };
        if p.errors.len() >= MAX_PENDING_ERRORS {
            p.errors.remove(0);
        }
        p.errors.push(text);
        drop(p);
        self.notify.notify_one();
    }

    /// Forget what was sent for a topic, so a re-subscribe gets the current view again.
    pub fn forget(&self, topic: &str) {
        if let Ok(mut p) = self.pending.lock() {
            p.sent.remove(topic);
            p.views.remove(topic);
        }
    }

    /// Wait until something is pending, then move it all into `out` (errors first, then views
    /// by position).
    pub async fn next_batch(&self, out: &mut Vec<Utf8Bytes>) {
        loop {
            let notified = self.notify.notified();
            if self.take(out) {
                return;
            }
            notified.await;
        }
    }

    /// Move what is pending into `out`; false if nothing was.
    fn take(&self, out: &mut Vec<Utf8Bytes>) -> bool {
        let Ok(mut p) = self.pending.lock() else { return false };
        if p.views.is_empty() && p.errors.is_empty() {
            return false;
        }
        let Pending { views, sent, errors, order } = &mut *p;
        out.append(errors);
        for (topic, frame) in views.drain() {
            sent.insert(topic, frame.position);
            order.push(frame);
        }
        // Several topics at once (the staff console's `members`): oldest change first.
        order.sort_by_key(|frame| frame.position);
        out.extend(order.drain(..).map(|frame| frame.text));
        true
    }
}

/// Sockets woken at once by one change. Woken all together, 10,000 sockets' senders fill the
/// runtime's queues, and any task woken after them (a command's answer, after the log's sync)
/// waits for every one of those sends; woken a chunk at a time, it waits for one chunk.
const WAKE_CHUNK: usize = 256;

#[derive(Default)]
pub struct Hub {
    topics: Mutex<HashMap<Topic, HashMap<u64, Arc<Mailbox>>>>,
    next_id: AtomicU64,
}

impl Hub {
    pub fn mailbox(&self) -> Arc<Mailbox> {
        Arc::new(Mailbox {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            pending: Mutex::new(Pending::default()),
            notify: Notify::new(),
        })
    }

    pub fn subscribe(&self, topic: &str, mailbox: &Arc<Mailbox>) {
        if let Ok(mut topics) = self.topics.lock() {
            topics.entry(Topic::from(topic)).or_default().insert(mailbox.id, mailbox.clone());
        }
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

    pub fn subscriber_count(&self) -> usize {
        self.topics.lock().map(|t| t.values().map(HashMap::len).sum()).unwrap_or(0)
    }

    /// Push one view (already serialized) on its topic.
    pub fn publish(&self, topic: &str, position: u64, view_json: &str) {
        let (key, recipients): (Option<Topic>, Vec<Arc<Mailbox>>) = match self.topics.lock() {
            Ok(topics) => (
                topics.get_key_value(topic).map(|(key, _)| key.clone()),
                [topic, MEMBERS_TOPIC]
                    .iter()
                    .filter_map(|t| topics.get(*t))
                    .flat_map(|subs| subs.values().cloned())
                    .collect(),
            ),
            Err(_) => return,
        };
        if recipients.is_empty() {
            return;
        }
        // Pending frames are kept per member topic, also for `members` subscribers.
        let key = key.unwrap_or_else(|| topic.into());
        let frame = view_frame(topic, position, view_json);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) if recipients.len() > WAKE_CHUNK => {
                // A chunk is kept and woken before the next is kept: the first sends start at
                // once, instead of after the whole loop (about 5 ms for 10,000 sockets, each
                // mailbox a few cache misses away), and the other cores send meanwhile. Kept
                // later than the publish, a frame still never overtakes a newer one: `put`
                // compares positions. (A socket that unsubscribes meanwhile can still get this
                // one view, as it could before between the hub's lock and the put.)
                runtime.spawn(async move {
                    for chunk in recipients.chunks(WAKE_CHUNK) {
                        chunk.iter().for_each(|m| m.put(&key, frame.clone()));
                        // Whatever was woken meanwhile runs before the next chunk's sends.
                        tokio::task::yield_now().await;
                    }
                });
            }
            _ => recipients.iter().for_each(|m| m.put(&key, frame.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the socket would send next, if anything.
    fn take(mailbox: &Mailbox) -> Option<Vec<Utf8Bytes>> {
        let mut out = Vec::new();
        mailbox.take(&mut out).then_some(out)
    }

    #[test]
    fn a_slow_client_gets_only_the_newest_view_per_topic() {
        let hub = Hub::default();
        let mb = hub.mailbox();
        hub.subscribe("member:a", &mb);
        for p in 1..=100 {
            hub.publish("member:a", p, &format!(r#"{{"n":{p}}}"#));
        }
        hub.publish("member:b", 7, "{}"); // not subscribed
        let batch = take(&mb).expect("something pending");
        assert_eq!(batch.len(), 1);
        assert!(batch[0].as_str().contains(r#""position":100"#));
        assert!(take(&mb).is_none());
    }

    #[test]
    fn an_older_view_never_follows_a_newer_one() {
        let hub = Hub::default();
        let mb = hub.mailbox();
        hub.subscribe("member:a", &mb);
        hub.publish("member:a", 5, "{}");
        assert_eq!(take(&mb).map(|b| b.len()), Some(1));
        hub.publish("member:a", 4, "{}");
        assert!(take(&mb).is_none());
    }

    #[test]
    fn members_topic_sees_every_member() {
        let hub = Hub::default();
        let mb = hub.mailbox();
        hub.subscribe(MEMBERS_TOPIC, &mb);
        hub.publish("member:b", 2, "{}");
        hub.publish("member:a", 1, "{}");
        let batch = take(&mb).expect("something pending");
        assert_eq!(batch.len(), 2);
        // Oldest change first, whatever order the topics were published in.
        assert!(batch[0].as_str().contains(r#""topic":"member:a""#), "{:?}", batch[0]);
        assert!(batch[1].as_str().contains(r#""topic":"member:b""#), "{:?}", batch[1]);
    }

    /// A task woken after a change to many sockets (a command's answer) waits for one chunk of
    /// their sends, not for all of them.
    #[tokio::test(flavor = "current_thread")]
    async fn a_big_fan_out_lets_other_tasks_run_between_chunks() {
        const SOCKETS: usize = 4 * WAKE_CHUNK;
        let hub = Arc::new(Hub::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for i in 0..SOCKETS {
            let mailbox = hub.mailbox();
            hub.subscribe("member:a", &mailbox);
            let (order, started) = (order.clone(), started.clone());
            senders.push(tokio::spawn(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let mut out = Vec::new();
                mailbox.next_batch(&mut out).await;
                order.lock().unwrap().push(i);
            }));
        }
        // Every sender waits on its mailbox before the change (one runtime thread: no race).
        while started.load(Ordering::SeqCst) < SOCKETS as u64 {
            tokio::task::yield_now().await;
        }
        hub.publish("member:a", 1, "{}");
        let probe = {
            let order = order.clone();
            tokio::spawn(async move { order.lock().unwrap().push(usize::MAX) })
        };
        probe.await.unwrap();
        for sender in senders {
            sender.await.unwrap();
        }
        let order = order.lock().unwrap();
        assert_eq!(order.len(), SOCKETS + 1, "every socket got the change");
        let probe_at = order.iter().position(|i| *i == usize::MAX).unwrap();
        assert!(probe_at <= WAKE_CHUNK, "the other task ran after {probe_at} sends");
    }

    #[test]
    fn view_frames_are_valid_messages() {
        let frame = view_frame("member:a\"x", 3, r#"{"member_id":"a"}"#);
        let v: serde_json::Value = serde_json::from_str(frame.text.as_str()).unwrap();
        assert_eq!(v["type"], "view");
        assert_eq!(v["topic"], "member:a\"x");
        assert_eq!(v["position"], 3);
        assert_eq!(v["view"]["member_id"], "a");
    }
}
