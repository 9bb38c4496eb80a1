//! P10: change data capture. A system of record (a database of its own on the local PostgreSQL
//! server, plain SQL) feeds a Tally server through a replication slot:
//! - backlog: rows written while no reader runs, then a server started with the source
//!   configured; rows per second until every one is applied;
//! - freshness: single-row updates committed at a fixed rate, each to a member watched by a socket;
//!   from the moment the source's `COMMIT` returns to the socket receiving the changed view.

use crate::load::{histogram, Identity};
use anyhow::Context;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub struct Settings {
    pub admin_url: String,
    pub backlog: usize,
    pub rate: f64,
    pub seconds: u64,
    pub watched: usize,
}

pub struct Measured {
    pub backlog: usize,
    pub backlog_secs: f64,
    pub backlog_rows_per_sec: f64,
    /// How long the slot's restart point took to move past the backlog.
    pub settle_secs: f64,
    pub updates: usize,
    pub received: usize,
    pub sent_rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_percent: f64,
    pub rss_mib: f64,
}

/// Drops the source's slot and database, whatever happened.
struct SourceDb {
    admin_url: String,
    name: String,
    slot: String,
}

impl SourceDb {
    async fn cleanup(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            for _ in 0..50 {
                let dropped = sqlx::query(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                )
                .bind(&self.slot)
                .execute(&mut admin)
                .await;
                if dropped.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let _ =
                sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).execute(&mut admin).await;
        }
    }
}

pub async fn measure(tally: &Path, work: &Path, settings: &Settings) -> anyhow::Result<Measured> {
    let mut admin = PgConnection::connect(&settings.admin_url)
        .await
        .with_context(|| format!("P10 needs PostgreSQL at {} (wal_level = logical)", settings.admin_url))?;
    let id = std::process::id();
    let source = SourceDb {
        admin_url: settings.admin_url.clone(),
        name: format!("tally_bench_src_{id}"),
        slot: format!("tally_bench_{id}"),
    };
    source.cleanup().await;
    sqlx::query(&format!("CREATE DATABASE {}", source.name)).execute(&mut admin).await?;
    let result = run(tally, work, settings, &source).await;
    source.cleanup().await;
    result
}

async fn run(tally: &Path, work: &Path, settings: &Settings, source: &SourceDb) -> anyhow::Result<Measured> {
    let base = settings.admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&settings.admin_url);
    let url = format!("{base}/{}", source.name);
    let mut db = PgConnection::connect(&url).await?;
    sqlx::query("CREATE TABLE customers (id int PRIMARY KEY, full_name text NOT NULL, email text NOT NULL, status text NOT NULL)")
        .execute(&mut db)
        .await?;
    sqlx::query("ALTER TABLE customers REPLICA IDENTITY FULL").execute(&mut db).await?;
    sqlx::query("SELECT 1 FROM pg_create_logical_replication_slot($1, 'test_decoding')")
        .bind(&source.slot)
        .execute(&mut db)
        .await?;

    // The backlog: written before any reader runs, a thousand rows per transaction.
    let total = settings.backlog.max(settings.watched);
    let mut from = 1usize;
    while from <= total {
        let to = (from + 999).min(total);
        sqlx::query(
            "INSERT INTO customers SELECT g, 'Customer ' || g, 'c' || g || '@cdc.example', 'active' FROM generate_series($1::int, $2::int) g",
        )
        .bind(from as i32)
        .bind(to as i32)
        .execute(&mut db)
        .await?;
        from = to + 1;
    }

    let backlog_end: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut db).await?;

    let config = work.join("cdc.toml");
    std::fs::write(
        &config,
        format!(
            "[[source]]\nname = \"crm\"\npostgres_url = \"{url}\"\nslot = \"{}\"\n\n[source.customers]\ntable = \"customers\"\nmember_id = \"c{{}}\"\nname = \"full_name\"\nemail = \"email\"\nstatus = \"status\"\n",
            source.slot
        ),
    )?;
    let store = work.join("cdc.db");
    let admin = Identity::key(&crate::create_key(tally, &store, "bench-admin", "admin")?)?;
    let args = vec![
        "serve".into(),
        "--addr".into(),
        "127.0.0.1:{port}".into(),
        "--database-url".into(),
        store.to_string_lossy().to_string(),
        "--cdc-config".into(),
        config.to_string_lossy().to_string(),
    ];
    let envs = [
        ("RUST_LOG", "warn".to_string()),
        ("TALLY_MAX_SOCKETS_PER_PRINCIPAL", "100000".to_string()),
        ("TALLY_WS_IDLE_SECS", "3600".to_string()),
    ];
    let server = crate::proc::spawn("tally", tally, &args, &envs, &work.join("cdc-server.log"), "/healthz").await?;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        let status: Value =
            admin.on(client.get(format!("{}/api/cdc", server.base.as_str()))).send().await?.json().await?;
        let applied = status[0]["rows"]["applied"].as_u64().unwrap_or(0) as usize;
        if applied >= total {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog was not applied within 10 minutes ({applied} of {total}): {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let backlog_secs = started.elapsed().as_secs_f64();
    crate::wait_caught_up(server.base.as_str(), &admin).await?;
    // Each peek decodes the WAL from the slot's restart point, which PostgreSQL moves only at its
    // next snapshot of running transactions (every 15 s at most, while WAL is written): until then
    // every peek decodes the whole backlog again. Freshness is measured once it has moved past it,
    // as it is in steady operation; the reader's heartbeat keeps the slot moving meanwhile.
    let settling = Instant::now();
    loop {
        let past: Option<bool> =
            sqlx::query_scalar("SELECT restart_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2")
                .bind(&backlog_end)
                .bind(&source.slot)
                .fetch_optional(&mut db)
                .await?;
        if past == Some(true) || settling.elapsed() > Duration::from_secs(60) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let settle_secs = settling.elapsed().as_secs_f64();

    // Freshness: one socket per watched member; each update names its sequence number.
    let arrivals: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let ws_url = format!("{}/ws", server.base.as_str().replacen("http://", "ws://", 1));
    let mut sockets = Vec::new();
    for m in 1..=settings.watched {
        let mut request = ws_url.as_str().into_client_request()?;
        request.headers_mut().extend(admin.headers().iter().cloned());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        socket.send(Message::Text(json!({"subscribe": format!("member:c{m}")}).to_string().into())).await?;
        let arrivals = arrivals.clone();
        sockets.push(tokio::spawn(async move {
            while let Some(Ok(message)) = socket.next().await {
                let at = Instant::now();
                if let Message::Text(text) = message {
                    let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    let seq =
                        frame["view"]["name"].as_str().and_then(|n| n.strip_prefix("u")).and_then(|n| n.parse().ok());
                    if let Some(seq) = seq {
                        arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(seq, at);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // every subscription answered

    let before = crate::proc::sample(server.pid());
    // Eight writers share the rate: one connection's commits, each waiting for its WAL to reach
    // the disk, would not keep up.
    const WRITERS: usize = 8;
    let count = (settings.rate * settings.seconds as f64) as usize;
    let every = Duration::from_secs_f64(WRITERS as f64 / settings.rate);
    let begun = Instant::now();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        // Commits as the source's application makes them (synchronous): an asynchronous commit
        // reaches the WAL that decoding reads only at the WAL writer's next flush (up to 200 ms
        // by default), which would be measured here as Tally's delay.
        let mut db = PgConnection::connect(&url).await?;
        let watched = settings.watched;
        writers.push(tokio::spawn(async move {
            let mut sent: Vec<(u64, Instant)> = Vec::new();
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::from_std(begun + every * w as u32 / WRITERS as u32),
                every,
            );
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = w;
            while seq < count {
                tick.tick().await;
                let member = (seq % watched) + 1;
                sqlx::query("UPDATE customers SET full_name = $1 WHERE id = $2")
                    .bind(format!("u{seq}"))
                    .bind(member as i32)
                    .execute(&mut db)
                    .await?;
                sent.push((seq as u64, Instant::now()));
                seq += WRITERS;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut sent = Vec::new();
    for writer in writers {
        sent.extend(writer.await??);
    }
    let sent_rate = sent.len() as f64 / begun.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await; // the last ones arrive
    let after = crate::proc::sample(server.pid());
    let arrivals = arrivals.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let mut hist = histogram();
    for (seq, at) in &sent {
        if let Some(arrived) = arrivals.get(seq) {
            hist.record(arrived.saturating_duration_since(*at).as_micros().max(1) as u64)?;
        }
    }
    for socket in sockets {
        socket.abort();
    }
    server.stop();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Measured {
        backlog: total,
        backlog_secs,
        backlog_rows_per_sec: total as f64 / backlog_secs,
        settle_secs,
        updates: sent.len(),
        received: hist.len() as usize,
        sent_rate,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: hist.max() as f64 / 1000.0,
        cpu_percent: crate::proc::cpu_percent(&before, &after),
        rss_mib: after.rss_kib as f64 / 1024.0,
    })
}
