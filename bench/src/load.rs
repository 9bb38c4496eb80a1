//! HTTP load: N keep-alive connections, each sending requests back to back for a while.
//!
//! Each connection is a plain hyper HTTP/1.1 connection driven by the task that sends on it, so a
//! request costs the load generator one task and no pool, URL parsing or hand-off between tasks.
//! The load generator shares the server's two cores: whatever it spends is taken from the server
//! under test (reqwest's pooled client cost about as much CPU per request as the server's view
//! route did; see docs/benchmark-history.md, 2026-11-29).

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, COOKIE, HOST, ORIGIN};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// What one request is: (method, path, JSON body).
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> (Method, String, Option<serde_json::Value>) + Send + Sync>;

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub hist: Histogram<u64>,
}

impl LoadResult {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds.max(1e-9)
    }
    /// Latency percentile in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

/// Who a client says it is: headers sent with each of its requests and WebSocket handshakes.
/// The server answers 401 on `/api`, `/metrics` and `/ws` to a request without them.
#[derive(Clone, Default)]
pub struct Identity(Vec<(HeaderName, HeaderValue)>);

impl Identity {
    /// A key, as a machine client (a point of sale, a script) sends it.
    pub fn key(token: &str) -> anyhow::Result<Identity> {
        Ok(Identity(vec![(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}"))?)]))
    }

    /// A browser on the server's own pages at `base`: its `Origin`, and its session cookie once
    /// signed in. The server refuses a change or a WebSocket upgrade that carries a session cookie
    /// unless `Origin` names the server's own origin (`http://` and the `Host` the request sent).
    pub fn browser(base: &str, session: Option<&str>) -> anyhow::Result<Identity> {
        let mut headers = vec![(ORIGIN, HeaderValue::from_str(base.trim_end_matches('/'))?)];
        if let Some(session) = session {
            let cookie = format!("{}={session}", server::auth::sessions::COOKIE);
            headers.push((COOKIE, HeaderValue::from_str(&cookie)?));
        }
        Ok(Identity(headers))
    }

    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.0
    }

    /// The same headers on a request of the pooled client.
    pub fn on(&self, mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (name, value) in &self.0 {
            request = request.header(name, value);
        }
        request
    }
}

/// A pooled client for the few requests outside the measured loops (seeding, status polls).
pub fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// One keep-alive HTTP/1.1 connection to `base` (`http://host:port`), reconnecting after an error.
pub struct Conn {
    authority: HeaderValue,
    identity: Identity,
    addr: String,
    open: Option<Open>,
}

struct Open {
    sender: http1::SendRequest<Full<Bytes>>,
    /// The connection's I/O, polled by whoever sends (see [`Conn::exchange`]).
    driver: http1::Connection<TokioIo<TcpStream>, Full<Bytes>>,
}

/// Longest a request may take before it counts as failed (and its connection is dropped).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Conn {
    pub fn new(base: &str, identity: &Identity) -> anyhow::Result<Conn> {
        let addr = base.strip_prefix("http://").unwrap_or(base).trim_end_matches('/').to_string();
        Ok(Conn { authority: HeaderValue::from_str(&addr)?, identity: identity.clone(), addr, open: None })
    }

    async fn connect(&mut self) -> anyhow::Result<&mut Open> {
        if self.open.is_none() {
            let stream = TcpStream::connect(&self.addr).await?;
            stream.set_nodelay(true)?;
            let (sender, driver) = http1::handshake(TokioIo::new(stream)).await?;
            self.open = Some(Open { sender, driver });
        }
        self.open.as_mut().ok_or_else(|| anyhow::anyhow!("not connected"))
    }

    /// Send one request and read the whole answer: `Ok(true)` for a 2xx. Any failure drops the
    /// connection, so the next request opens a new one.
    pub async fn exchange(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<bool> {
        let mut request = Request::builder().method(method).uri(path).header(HOST, self.authority.clone());
        for (name, value) in self.identity.headers() {
            request = request.header(name, value);
        }
        let body = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Bytes::from(serde_json::to_vec(body)?)
            }
            None => Bytes::new(),
        };
        let request = request.body(Full::new(body))?;
        let open = self.connect().await?;
        let Open { sender, driver } = open;
        let answer = async {
            let response = sender.send_request(request).await?;
            let ok = response.status().is_success();
            response.into_body().collect().await?;
            Ok::<bool, anyhow::Error>(ok)
        };
        // The request and the connection's I/O in one task: no wake-up of another task per request.
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, async {
            tokio::select! {
                answer = answer => answer,
                closed = driver => {
                    closed?;
                    Err(anyhow::anyhow!("the server closed the connection"))
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {REQUEST_TIMEOUT:?}")));
        if outcome.is_err() {
            self.open = None;
        }
        outcome
    }
}

/// Run `connections` loops for `duration`; a non-2xx answer counts as an error (and as a request).
/// Loop `i` is `who[i % who.len()]`.
pub async fn run(
    base: &str,
    connections: usize,
    duration: Duration,
    make: MakeRequest,
    who: &[Identity],
) -> LoadResult {
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let make = make.clone();
            let conn = Conn::new(base, &who[worker % who.len()]);
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut n, mut errors) = (0u64, 0u64);
                let Ok(mut conn) = conn else { return (0, 1, hist) };
                while Instant::now() < until {
                    let (method, path, body) = make(worker, n);
                    let sent = Instant::now();
                    let ok = conn.exchange(method, &path, body.as_ref()).await.unwrap_or(false);
                    let _ = hist.record((sent.elapsed().as_micros() as u64).max(1));
                    n += 1;
                    if !ok {
                        errors += 1;
                    }
                }
                (n, errors, hist)
            })
        })
        .collect();
    total(tasks, started).await
}

/// Open loop: `rate` requests per second in all, spread over `connections` connections, for
/// `duration`, whatever the server's latency. Each connection keeps its own schedule (its n-th
/// request is due n × `connections` / `rate` after its start; the starts are spread over the first
/// interval). A request's latency is taken from when it was due whenever its connection was still
/// waiting for the previous answer then: that wait is the server's too, and a closed loop (or a
/// schedule that slips) would leave it out of the histogram, the more so the slower the server
/// (coordinated omission). A request sent on time is timed from its send, so that the timer's own
/// lateness in waking the connection (up to a millisecond) is not counted. Loop `i` is
/// `who[i % who.len()]`.
pub async fn open_loop(
    base: &str,
    connections: usize,
    rate: f64,
    duration: Duration,
    make: MakeRequest,
    who: &[Identity],
) -> LoadResult {
    let started = Instant::now();
    let until = started + duration;
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1e-3));
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let make = make.clone();
            let conn = Conn::new(base, &who[worker % who.len()]);
            let first = started + interval.mul_f64(worker as f64 / connections as f64);
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut n, mut errors) = (0u64, 0u64);
                let Ok(mut conn) = conn else { return (0, 1, hist) };
                loop {
                    let due = first + interval.mul_f64(n as f64);
                    if due >= until {
                        break;
                    }
                    let from = if Instant::now() >= due {
                        due
                    } else {
                        tokio::time::sleep_until(due.into()).await;
                        Instant::now()
                    };
                    let (method, path, body) = make(worker, n);
                    let ok = conn.exchange(method, &path, body.as_ref()).await.unwrap_or(false);
                    let _ = hist.record((from.elapsed().as_micros() as u64).max(1));
                    n += 1;
                    if !ok {
                        errors += 1;
                    }
                }
                (n, errors, hist)
            })
        })
        .collect();
    total(tasks, started).await
}

/// The loops' requests, errors and latencies together.
async fn total(tasks: Vec<tokio::task::JoinHandle<(u64, u64, Histogram<u64>)>>, started: Instant) -> LoadResult {
    let mut total = LoadResult { requests: 0, errors: 0, seconds: 0.0, hist: histogram() };
    for task in tasks {
        if let Ok((n, errors, hist)) = task.await {
            total.requests += n;
            total.errors += errors;
            let _ = total.hist.add(hist);
        }
    }
    total.seconds = started.elapsed().as_secs_f64();
    total
}

/// Send `make` requests at about `rate` per second over `connections` loops until `stop`.
pub async fn paced(
    base: String,
    connections: usize,
    rate: f64,
    make: MakeRequest,
    who: Identity,
    stop: tokio_util::sync::CancellationToken,
) -> (u64, f64) {
    let started = Instant::now();
    let per_task = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let (make, stop) = (make.clone(), stop.clone());
            let conn = Conn::new(&base, &who);
            tokio::spawn(async move {
                let Ok(mut conn) = conn else { return 0 };
                let mut tick = tokio::time::interval(per_task);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return n,
                    }
                    let (method, path, body) = make(worker, n);
                    let _ = conn.exchange(method, &path, body.as_ref()).await;
                    n += 1;
                }
            })
        })
        .collect();
    let mut sent = 0;
    for task in tasks {
        sent += task.await.unwrap_or(0);
    }
    (sent, sent as f64 / started.elapsed().as_secs_f64().max(1e-9))
}
