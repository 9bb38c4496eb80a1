//! WebSocket measures: freshness under load (P4) and fan-out to many clients (P5).

use crate::load::{self, histogram, Identity};
use bytes::{Buf, BytesMut};
use futures::SinkExt;
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The one field of a `view` message the measures need. Deserializing into this skips the view
/// itself without building it (no allocation per field), so with 10,000 sockets on the same two
/// cores as the server, the clients' own parsing weighs less in the delivery times.
#[derive(serde::Deserialize)]
struct ViewHead {
    position: u64,
}

/// Position of a `view` message, read without building the whole view.
///
/// The server writes the head of every view message the same way (`live::view_frame`:
/// `{"type":"view","topic":"…","position":N,"view":…}`), so the position is read from there
/// without scanning the ~1.5 KiB view: with 10,000 clients on the same two cores as the server,
/// that scan was a seventh of the clients' work per change. Anything else is parsed in full.
fn position_of(text: &str) -> Option<u64> {
    position_from_head(text).or_else(|| serde_json::from_str::<ViewHead>(text).ok().map(|head| head.position))
}

/// The position of a message shaped exactly as `live::view_frame` writes it, else `None`.
fn position_from_head(text: &str) -> Option<u64> {
    let rest = text.strip_prefix(r#"{"type":"view","topic":""#)?;
    let (topic, after) = rest.split_once(r#"","position":"#)?;
    let end = after.find(|c: char| !c.is_ascii_digit())?;
    // An escaped quote in the topic would end it early: leave such messages to the parser.
    if topic.contains('\\') || !after[end..].starts_with(',') {
        return None;
    }
    after[..end].parse().ok()
}

/// Connect as `who`, subscribe to `topic`, and report (position, arrival) of every view received.
///
/// The library makes the connection (handshake, subscribe message); the views are then read
/// straight off the socket, each frame's header parsed by the library's `FrameHeader::parse`.
/// Through the library's stream, every read first zero-filled its buffer and went through its own
/// wakers: with 10,000 clients on the same two cores as the server, that was about a sixth of the
/// clients' work per change, and so part of the delivery times measured. The server sends only
/// views (and a close); it sends nothing before the subscription, so no view is left behind in
/// the library's buffer when reading moves to the socket.
async fn subscriber(
    ws_url: String,
    who: Identity,
    topic: String,
    report: impl FnMut(u64, Instant) + Send + 'static,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let uri: hyper::Uri = ws_url.parse()?;
    let addr = uri.authority().ok_or_else(|| anyhow::anyhow!("no host in {ws_url}"))?;
    let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
    // The library's read buffer serves the handshake only: keep it small for 10,000 clients.
    let config = WebSocketConfig::default().read_buffer_size(4 * 1024);
    let mut request = ws_url.as_str().into_client_request()?;
    request.headers_mut().extend(who.headers().iter().cloned());
    let (mut socket, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
    socket.send(Message::Text(json!({"subscribe": topic}).to_string().into())).await?;
    read_views(socket.get_mut(), report, stop).await
}

/// Read WebSocket frames straight off `tcp` until closed or stopped, reporting (position,
/// arrival) of every view.
async fn read_views(
    tcp: &mut tokio::net::TcpStream,
    mut report: impl FnMut(u64, Instant),
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(READ_BUFFER);
    // One wait for the stop, kept across messages: a new one per message would join and leave
    // the token's waiter list (one lock shared by all 10,000 clients) for every view received.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        // Every complete frame received so far.
        loop {
            let mut cursor = std::io::Cursor::new(&buf[..]);
            let Some((header, length)) = FrameHeader::parse(&mut cursor)? else { break };
            let start = cursor.position() as usize;
            let length = usize::try_from(length)
                .ok()
                .filter(|length| *length <= MAX_MESSAGE)
                .ok_or_else(|| anyhow::anyhow!("a {length}-byte frame: views are a few KiB"))?;
            let end = start + length;
            if buf.len() < end {
                buf.reserve(end - buf.len());
                break;
            }
            match header.opcode {
                OpCode::Data(Data::Text) if header.is_final => {
                    let at = Instant::now();
                    if let Some(p) = std::str::from_utf8(&buf[start..end]).ok().and_then(position_of) {
                        report(p, at);
                    }
                }
                OpCode::Control(Control::Close) => return Ok(()),
                _ => {}
            }
            buf.advance(end);
        }
        // Room for a whole view in one read (reclaims the space of the frames consumed).
        buf.reserve(READ_BUFFER);
        tokio::select! {
            read = tcp.read_buf(&mut buf) => {
                if read? == 0 {
                    return Ok(());
                }
            }
            _ = &mut stopped => return Ok(()),
        }
    }
}

/// Bytes asked of each read: a view (~2 KiB) fits.
const READ_BUFFER: usize = 8 * 1024;
/// Larger frames are an error: the server sends views of a few KiB.
const MAX_MESSAGE: usize = 1 << 20;

/// Earn a point for `member` as `who` (a key that may): the change's position, and when its
/// answer was read.
async fn earn(client: &reqwest::Client, base: &str, who: &Identity, member: &str) -> anyhow::Result<(u64, Instant)> {
    let request = client.post(format!("{base}/api/members/{member}/points/earn")).json(&json!({"points": 1}));
    let resp = who.on(request).send().await?;
    let body: Value = resp.json().await?;
    let at = Instant::now();
    let position = body["position"].as_u64().ok_or_else(|| anyhow::anyhow!("no position in {body}"))?;
    Ok((position, at))
}

pub struct Freshness {
    pub hist: Histogram<u64>,
    pub background_rate: f64,
    pub subscribers: usize,
}

/// P4: ack of a command → a subscribed client holds the new view, with `clients` other sockets
/// subscribed and background commands at `rate` per second, sampled after `warmup` of that load
/// (so that the server's writes of the views it changes are under way, as at steady state).
/// The commands are `admin`'s, sent to `base`; every socket is `watcher`'s, a principal that may
/// read any member, connected to `watch_base` (another node of the same database for P12, else the
/// same server).
#[allow(clippy::too_many_arguments)]
pub async fn freshness(
    base: &str,
    watch_base: &str,
    admin: &Identity,
    watcher: &Identity,
    members: &[String],
    clients: usize,
    rate: f64,
    warmup: Duration,
    samples: usize,
) -> anyhow::Result<Freshness> {
    let ws_url = watch_base.replacen("http://", "ws://", 1) + "/ws";
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let topic = format!("member:{}", members[rand::rng().random_range(0..members.len())]);
        // The other sockets only have to be served: what they receive is not measured.
        tasks.push(tokio::spawn(subscriber(ws_url.clone(), watcher.clone(), topic, |_, _| {}, stop.clone())));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let probe = members[0].clone();
    let (probe_tx, mut probe_rx) = mpsc::unbounded_channel();
    let report = move |position, at| {
        let _ = probe_tx.send((position, at));
    };
    let probe_topic = format!("member:{probe}");
    tasks.push(tokio::spawn(subscriber(ws_url.clone(), watcher.clone(), probe_topic, report, stop.clone())));
    tokio::time::timeout(Duration::from_secs(10), probe_rx.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no snapshot"))?;

    let others: Arc<Vec<String>> = Arc::new(members[1..].to_vec());
    let make: load::MakeRequest = Arc::new(move |_, _| {
        let m = &others[rand::rng().random_range(0..others.len())];
        (hyper::Method::POST, format!("/api/members/{m}/points/earn"), Some(json!({"points": 1})))
    });
    let background = tokio::spawn(load::paced(base.to_string(), 64, rate, make, admin.clone(), stop.clone()));
    tokio::time::sleep(warmup.max(Duration::from_millis(500))).await;

    let client = load::client(2);
    let mut hist = histogram();
    for _ in 0..samples {
        let (position, acked) = earn(&client, base, admin, &probe).await?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, probe_rx.recv()).await {
                Ok(Some((p, at))) if p >= position => {
                    let _ = hist.record((at.saturating_duration_since(acked).as_micros() as u64).max(1));
                    break;
                }
                Ok(Some(_)) => continue,
                _ => anyhow::bail!("the probe view at position {position} never arrived"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.cancel();
    let (_, background_rate) = background.await?;
    join_clients(tasks, "P4").await;
    Ok(Freshness { hist, background_rate, subscribers: clients })
}

pub struct Fanout {
    /// Acknowledgement of the change → each client holds the new view.
    pub hist: Histogram<u64>,
    /// Request for the change sent → each client holds the new view. The acknowledgement can
    /// leave the server after the fan-out has begun (the answer waits for the log's sync, the
    /// views do not), which makes times taken from it shorter: this origin cannot be late.
    pub hist_from_request: Histogram<u64>,
    pub clients: usize,
    pub connected: usize,
    pub missing: usize,
    /// Server memory per socket once connected and subscribed (each holding the current view).
    pub rss_per_connection_kib: f64,
    /// The same after the changes: sockets' write buffers grow to the longest view they sent.
    pub rss_per_connection_after_kib: f64,
    /// CPU time per delivered message over the rounds (µs): the server's, and this load
    /// generator's own (its clients run on the same cores, so their cost is in the delivery times).
    pub server_us_per_message: f64,
    pub client_us_per_message: f64,
    pub view_bytes: usize,
    /// The view the sockets received, as the REST query answers it.
    pub view: String,
    /// Per round, the time from the acknowledgement to the last client's delivery (ms), in
    /// round order: tells a tail that every change has from one that a few slow rounds make.
    pub round_last_ms: Vec<f64>,
    /// Per round, the time from the acknowledgement to the first client's delivery (ms): a
    /// slow round that also starts late waited for something before its fan-out.
    pub round_first_ms: Vec<f64>,
    /// Per round, the command's own round trip (request sent → answer read), in ms.
    pub answer_ms: Vec<f64>,
}

/// P5's commands run on a thread and runtime of their own, with a client of their own, so that
/// the time their answer is read (the origin of the delivery times, and the command's own round
/// trip) is not also a wait behind the 10,000 clients' reads on the same runtime.
struct CommandThread {
    handle: tokio::runtime::Handle,
    client: reqwest::Client,
}

impl CommandThread {
    fn start(stop: &CancellationToken) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let stop = stop.clone();
        std::thread::Builder::new().name("p5-commands".into()).spawn(move || runtime.block_on(stop.cancelled()))?;
        Ok(CommandThread { handle, client: load::client(1) })
    }

    /// Earn a point on the command thread: (position, when its answer was read there).
    async fn earn(&self, base: &str, who: &Identity, member: &str) -> anyhow::Result<(u64, Instant)> {
        let (client, base, who, member) = (self.client.clone(), base.to_string(), who.clone(), member.to_string());
        self.handle.spawn(async move { earn(&client, &base, &who, &member).await }).await?
    }
}

/// The newest view one P5 client received, left where the rounds read it. A view arriving costs
/// the client two stores: sent on a channel instead, each of the 10,000 views per change also
/// woke the task collecting them: about a sixth of the clients' CPU per message.
#[derive(Default)]
struct Latest {
    position: AtomicU64,
    /// Nanoseconds since the slots' origin.
    at: AtomicU64,
}

/// One [`Latest`] per client, and what a round reads from them.
#[derive(Clone)]
struct Slots {
    latest: Arc<Vec<Latest>>,
    origin: Instant,
}

impl Slots {
    fn new(clients: usize) -> Self {
        Slots { latest: Arc::new((0..clients).map(|_| Latest::default()).collect()), origin: Instant::now() }
    }

    /// What client `i` calls for each view it receives.
    fn reporter(&self, i: usize) -> impl FnMut(u64, Instant) + Send + 'static {
        let slots = self.clone();
        move |position, at| {
            let slot = &slots.latest[i];
            slot.at.store(at.saturating_duration_since(slots.origin).as_nanos() as u64, Ordering::Relaxed);
            slot.position.store(position, Ordering::Release);
        }
    }

    /// Clients holding `position` or newer. Checked every millisecond of a round, on the cores
    /// the clients share: positions only.
    fn received(&self, position: u64) -> usize {
        self.latest.iter().filter(|slot| slot.position.load(Ordering::Acquire) >= position).count()
    }

    /// Wait until `clients` hold `position`, at most `wait`, looking every `every`. The clients
    /// time their own arrivals: how often this looks only decides when the wait is over.
    async fn wait_for(&self, position: u64, clients: usize, wait: Duration, every: Duration) {
        let deadline = Instant::now() + wait;
        while self.received(position) < clients && Instant::now() < deadline {
            tokio::time::sleep(every).await;
        }
    }

    /// Arrival times of `position` (or newer), each client's once.
    fn arrivals(&self, position: u64) -> impl Iterator<Item = Instant> + '_ {
        (self.latest.iter())
            .filter(move |slot| slot.position.load(Ordering::Acquire) >= position)
            .map(|slot| self.origin + Duration::from_nanos(slot.at.load(Ordering::Relaxed)))
    }

    /// One round: each arrival of `position` recorded in `hist` as the time since `from`, and
    /// handed to `each` (for another origin). How many arrived, the first and the last.
    fn record(
        &self,
        position: u64,
        from: Instant,
        hist: &mut Histogram<u64>,
        mut each: impl FnMut(Instant),
    ) -> (usize, Duration, Duration) {
        let (mut got, mut first, mut last) = (0, Duration::MAX, Duration::ZERO);
        for at in self.arrivals(position) {
            let took = at.saturating_duration_since(from);
            (got, first, last) = (got + 1, first.min(took), last.max(took));
            let _ = hist.record(micros(took));
            each(at);
        }
        (got, first, last)
    }
}

/// A histogram value: microseconds, at least 1.
fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// CPU time between two samples per delivered message, in µs.
fn us_per_message(before: crate::proc::Sample, after: crate::proc::Sample, messages: u64) -> f64 {
    1e6 * (after.cpu_secs - before.cpu_secs) / messages.max(1) as f64
}

/// Connect `clients` with `connect(i)`, paced so that the listener's backlog keeps up.
async fn connect_all<F>(
    clients: usize,
    mut connect: impl FnMut(usize) -> F,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        tasks.push(tokio::spawn(connect(i)));
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    tasks
}

/// Wait for stopped clients; say how many failed, and why the first did.
async fn join_clients(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>, measure: &str) {
    let mut failed = 0;
    let mut first = None;
    for task in tasks {
        let error = match task.await {
            Ok(Ok(())) => continue,
            Ok(Err(err)) => err,
            Err(err) => err.into(),
        };
        failed += 1;
        first.get_or_insert(error);
    }
    if let Some(error) = first {
        eprintln!("{measure}: {failed} clients failed; the first: {error:#}");
    }
}

/// P5: `clients` sockets on one topic, all `watcher`'s; each change (a command of `admin`'s) must
/// reach all of them.
pub async fn fanout(
    base: &str,
    admin: &Identity,
    watcher: &Identity,
    server_pid: u32,
    member: &str,
    clients: usize,
    rounds: usize,
) -> anyhow::Result<Fanout> {
    let ws_url = base.replacen("http://", "ws://", 1) + "/ws";
    let stop = CancellationToken::new();
    // On an early return too: the clients and the command thread stop with the measure.
    let _stop_on_return = stop.clone().drop_guard();
    let slots = Slots::new(clients);
    let before = crate::proc::sample(server_pid);
    let topic = format!("member:{member}");
    let tasks = connect_all(clients, |i| {
        subscriber(ws_url.clone(), watcher.clone(), topic.clone(), slots.reporter(i), stop.clone())
    })
    .await;
    // Every client first receives the current view.
    slots.wait_for(1, clients, Duration::from_secs(60), Duration::from_millis(100)).await;
    let connected = slots.received(1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = crate::proc::sample(server_pid);
    let rss_per_connection_kib = after.rss_kib.saturating_sub(before.rss_kib) as f64 / connected.max(1) as f64;

    let client = load::client(1);
    // The size of what each socket receives per change (the view, as the REST query answers it).
    let view =
        admin.on(client.get(format!("{base}/api/members/{member}"))).send().await?.error_for_status()?.text().await?;
    let view_bytes = view.len();
    let commands = CommandThread::start(&stop)?;
    let mut hist = histogram();
    let mut hist_from_request = histogram();
    let mut missing = 0;
    let mut round_last_ms = Vec::with_capacity(rounds);
    let mut round_first_ms = Vec::with_capacity(rounds);
    let mut answer_ms = Vec::with_capacity(rounds);
    let (server_before, client_before) = (crate::proc::sample(server_pid), crate::proc::sample(std::process::id()));
    for _ in 0..rounds {
        let sent = Instant::now();
        let (position, acked) = commands.earn(base, admin, member).await?;
        answer_ms.push(acked.saturating_duration_since(sent).as_secs_f64() * 1000.0);
        slots.wait_for(position, connected, Duration::from_secs(10), Duration::from_millis(1)).await;
        let (got, first, last) = slots.record(position, acked, &mut hist, |at| {
            let _ = hist_from_request.record(micros(at.saturating_duration_since(sent)));
        });
        missing += connected.saturating_sub(got);
        round_last_ms.push(last.as_secs_f64() * 1000.0);
        round_first_ms.push(if got == 0 { f64::NAN } else { first.as_secs_f64() * 1000.0 });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (server_after, client_after) = (crate::proc::sample(server_pid), crate::proc::sample(std::process::id()));
    let server_us_per_message = us_per_message(server_before, server_after, hist.len());
    let client_us_per_message = us_per_message(client_before, client_after, hist.len());
    let rss_per_connection_after_kib =
        server_after.rss_kib.saturating_sub(before.rss_kib) as f64 / connected.max(1) as f64;
    stop.cancel();
    join_clients(tasks, "P5").await;
    Ok(Fanout {
        hist,
        hist_from_request,
        clients,
        connected,
        missing,
        rss_per_connection_kib,
        rss_per_connection_after_kib,
        server_us_per_message,
        client_us_per_message,
        view_bytes,
        view,
        round_last_ms,
        round_first_ms,
        answer_ms,
    })
}

/// P5's floor: what the same clients take to receive the same frames from a sender that does
/// nothing else.
pub struct Floor {
    /// Round start (the sender told to write) → each client holds the frame.
    pub hist: Histogram<u64>,
    pub connected: usize,
    pub missing: usize,
    pub sender_us_per_message: f64,
    pub client_us_per_message: f64,
    pub round_last_ms: Vec<f64>,
}

/// P5's floor: `clients` plain TCP sockets (no handshake, no subscription) read by the clients'
/// own loop ([`read_views`]), and a separate process ([`crate::floor`]) that writes each round's
/// view frame, as the server would send it, to every socket in turn.
pub async fn fanout_floor(view_json: &str, topic: &str, clients: usize, rounds: usize) -> anyhow::Result<Floor> {
    // Removed when dropped, on an early return too.
    let view_file = tempfile::Builder::new().prefix("tally-bench-floor-").suffix(".json").tempfile()?;
    std::fs::write(view_file.path(), view_json)?;
    let mut sender = crate::floor::Sender::start(view_file.path(), topic).await?;
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let slots = Slots::new(clients);
    let addr = sender.addr.clone();
    let tasks = connect_all(clients, |i| {
        let (addr, report, stop) = (addr.clone(), slots.reporter(i), stop.clone());
        async move {
            let mut tcp = tokio::net::TcpStream::connect(&addr).await?;
            read_views(&mut tcp, report, stop).await
        }
    })
    .await;
    // The first frame, again until every client holds it: each round also goes to the sockets
    // accepted since the last one.
    let deadline = Instant::now() + Duration::from_secs(60);
    while slots.received(1) < clients && Instant::now() < deadline {
        sender.send(1).await?;
        slots.wait_for(1, clients, Duration::from_millis(500), Duration::from_millis(20)).await;
    }
    let connected = slots.received(1);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut hist = histogram();
    let mut missing = 0;
    let mut round_last_ms = Vec::with_capacity(rounds);
    let (sender_before, client_before) = (crate::proc::sample(sender.pid()), crate::proc::sample(std::process::id()));
    for round in 0..rounds {
        let position = round as u64 + 2;
        let start = Instant::now();
        sender.send(position).await?;
        slots.wait_for(position, connected, Duration::from_secs(10), Duration::from_millis(1)).await;
        let (got, _, last) = slots.record(position, start, &mut hist, |_| {});
        missing += connected.saturating_sub(got);
        round_last_ms.push(last.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (sender_after, client_after) = (crate::proc::sample(sender.pid()), crate::proc::sample(std::process::id()));
    let floor = Floor {
        sender_us_per_message: us_per_message(sender_before, sender_after, hist.len()),
        client_us_per_message: us_per_message(client_before, client_after, hist.len()),
        hist,
        connected,
        missing,
        round_last_ms,
    };
    stop.cancel();
    drop(sender);
    join_clients(tasks, "P5 floor").await;
    Ok(floor)
}

#[cfg(test)]
mod tests {
    use super::position_of;
    use server::live::view_frame;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    #[test]
    fn reads_the_position_the_server_wrote() {
        for topic in ["member:m-1", "members", r#"member:odd"name"#] {
            let frame = view_frame(topic, 4_211, r#"{"member_id":"m-1","position":7,"n":[1,2]}"#);
            // The message is what follows the frame's header.
            let mut cursor = std::io::Cursor::new(&frame.bytes[..]);
            FrameHeader::parse(&mut cursor).unwrap().unwrap();
            let text = std::str::from_utf8(&frame.bytes[cursor.position() as usize..]).unwrap();
            assert_eq!(position_of(text), Some(4_211), "{topic}");
        }
        // Another field order or spacing is parsed in full.
        assert_eq!(position_of(r#"{"position": 9, "type": "view", "view": {}}"#), Some(9));
        assert_eq!(position_of(r#"{"type":"error","code":"invalid_request","message":"x"}"#), None);
    }
}
