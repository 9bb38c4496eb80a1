//! HTTP load: N keep-alive connections, each sending requests back to back for a while.

use hdrhistogram::Histogram;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one request is: (method, path, JSON body).
pub type MakeRequest = Arc<dyn Fn(usize, u64) -> (reqwest::Method, String, Option<serde_json::Value>) + Send + Sync>;

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

pub fn client(connections: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(connections)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// Run `connections` loops for `duration`; a non-2xx answer counts as an error (and as a request).
pub async fn run(base: &str, connections: usize, duration: Duration, make: MakeRequest) -> LoadResult {
    let client = client(connections);
    let started = Instant::now();
    let until = started + duration;
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let client = client.clone();
            let make = make.clone();
            let base = base.to_string();
            tokio::spawn(async move {
                let mut hist = histogram();
                let (mut n, mut errors) = (0u64, 0u64);
                while Instant::now() < until {
                    let (method, path, body) = make(worker, n);
                    let mut req = client.request(method, format!("{base}{path}"));
                    if let Some(body) = body {
                        req = req.json(&body);
                    }
                    let sent = Instant::now();
                    let ok = match req.send().await {
                        Ok(resp) => {
                            let ok = resp.status().is_success();
                            ok && resp.bytes().await.is_ok()
                        }
                        Err(_) => false,
                    };
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
    stop: tokio_util::sync::CancellationToken,
) -> (u64, f64) {
    let client = client(connections);
    let started = Instant::now();
    let per_task = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let tasks: Vec<_> = (0..connections)
        .map(|worker| {
            let (client, make, base, stop) = (client.clone(), make.clone(), base.clone(), stop.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(per_task);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n = 0u64;
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        _ = stop.cancelled() => return n,
                    }
                    let (method, path, body) = make(worker, n);
                    let mut req = client.request(method, format!("{base}{path}"));
                    if let Some(body) = body {
                        req = req.json(&body);
                    }
                    if let Ok(resp) = req.send().await {
                        let _ = resp.bytes().await;
                    }
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
