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
                        requeue().await;
                    }
                });
            }
            _ => recipients.iter().for_each(|m| m.put(&key, frame.clone())),
        }
    }
}

/// Let the tasks woken so far run first, and stay where another worker can take this one.
///
/// `tokio::task::yield_now` keeps the task on its own worker's deferred list until that worker
/// runs out of work, where no other worker can steal it: if that worker's thread stalls (the
/// host takes its CPU, a page fault waits for the disk), the rest of the fan-out waits with it
/// while the other worker may idle. A task that wakes itself goes to the back of its worker's
/// run queue, behind the senders it woke, and an idle worker steals it from there.
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

    /// Wakes a sender's task, noting the thread that woke it (the one running the fan-out).
    struct NoteThread {
        task: std::task::Waker,
        woken_on: Mutex<Option<std::thread::ThreadId>>,
    }

    impl std::task::Wake for NoteThread {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref()
        }
        fn wake_by_ref(self: &Arc<Self>) {
            *self.woken_on.lock().unwrap() = Some(std::thread::current().id());
            self.task.wake_by_ref()
        }
    }

    /// The host can take a CPU away from a worker thread for tens of milliseconds. If that
    /// happens to the worker that was running a big fan-out, the other worker carries it on: here
    /// the first sender to run on the thread that woke it (so on the fan-out's thread, between
    /// two chunks) holds that thread until every other socket has its view, or 10 s.
    #[test]
    fn a_stalled_worker_does_not_hold_back_the_rest_of_a_fan_out() {
        use std::future::Future;
        const SOCKETS: usize = 4 * WAKE_CHUNK;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_time().build().unwrap();
        let hub = Arc::new(Hub::default());
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let ready = Arc::new(AtomicU64::new(0));
        for i in 0..SOCKETS {
            let mailbox = hub.mailbox();
            hub.subscribe("member:a", &mailbox);
            let (done_tx, release, ready) = (done_tx.clone(), release.clone(), ready.clone());
            runtime.spawn(async move {
                let mut out = Vec::new();
                let mut batch = std::pin::pin!(mailbox.next_batch(&mut out));
                let mut noted: Option<Arc<NoteThread>> = None;
                std::future::poll_fn(|cx| {
                    let note = noted.get_or_insert_with(|| {
                        ready.fetch_add(1, Ordering::SeqCst);
                        Arc::new(NoteThread { task: cx.waker().clone(), woken_on: Mutex::new(None) })
                    });
                    batch.as_mut().poll(&mut std::task::Context::from_waker(&note.clone().into()))
                })
                .await;
                let woken_on = noted.and_then(|n| *n.woken_on.lock().unwrap());
                if woken_on == Some(std::thread::current().id()) {
                    // The first such sender stalls its thread, as the host would.
                    let stall = release.lock().unwrap().take();
                    if let Some(stall) = stall {
                        let _ = stall.recv_timeout(std::time::Duration::from_secs(10));
                        return;
                    }
                }
                let _ = done_tx.send(i);
            });
        }
        runtime.block_on(async {
            while ready.load(Ordering::SeqCst) < SOCKETS as u64 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            hub.publish("member:a", 1, "{}");
            let mut others = 0;
            let all = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while others < SOCKETS - 1 && done_rx.recv().await.is_some() {
                    others += 1;
                }
            })
            .await;
            let _ = release_tx.send(());
            assert!(all.is_ok(), "{others} of the other {} sockets had the view", SOCKETS - 1);
        });
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
