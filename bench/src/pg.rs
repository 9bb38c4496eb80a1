//! P11: durable commands on PostgreSQL, through one and through two `tally serve` nodes sharing one
//! database, beside `pgbench -N` (its built-in simple-update script) on the same server in the same
//! run as the floor of what that server commits per second; and P12, freshness across the two
//! nodes. Every database it makes is dropped.

use crate::load::{self, Identity, LoadResult};
use anyhow::Context;
use serde_json::json;
use sqlx::{Connection, PgConnection};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct Settings {
    pub admin_url: String,
    pub members: usize,
    pub connections: usize,
    pub seconds: u64,
    pub warmup: u64,
    /// pgbench's scale (100,000 accounts each).
    pub pgbench_scale: u32,
    /// P12: commands per second to node A, sockets on node B, samples.
    pub cross_rate: f64,
    pub cross_clients: usize,
    pub cross_samples: usize,
}

pub struct Measured {
    pub one: LoadResult,
    pub one_cpu: f64,
    pub one_rss: f64,
    pub two: LoadResult,
    /// pgbench -N transactions per second, by client count.
    pub pgbench: Vec<(usize, f64)>,
    /// P12: acknowledgement on node A → view on a socket of node B.
    pub cross: crate::live::Freshness,
    /// Node B's CPU while P12 ran.
    pub cross_cpu: f64,
}

impl Measured {
    pub fn pgbench_best(&self) -> f64 {
        self.pgbench.iter().map(|(_, tps)| *tps).fold(0.0, f64::max)
    }
}

/// Databases made for the measure, dropped at the end whatever happened.
struct Databases {
    admin_url: String,
    names: Vec<String>,
}

impl Databases {
    async fn create(&mut self, name: String) -> anyhow::Result<String> {
        let mut admin = PgConnection::connect(&self.admin_url).await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await?;
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await?;
        self.names.push(name.clone());
        let base = self.admin_url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&self.admin_url);
        Ok(format!("{base}/{name}"))
    }

    async fn drop_all(&self) {
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            for name in &self.names {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
            }
        }
    }
}

pub async fn measure(tally: &Path, work: &Path, settings: &Settings) -> anyhow::Result<Measured> {
    let mut databases = Databases { admin_url: settings.admin_url.clone(), names: Vec::new() };
    let result = run(tally, work, settings, &mut databases).await;
    databases.drop_all().await;
    result
}

fn serve_args(db: &str) -> Vec<String> {
    vec!["serve".into(), "--addr".into(), "127.0.0.1:{port}".into(), "--database-url".into(), db.to_string()]
}

async fn run(tally: &Path, work: &Path, settings: &Settings, databases: &mut Databases) -> anyhow::Result<Measured> {
    let id = std::process::id();
    let url = databases.create(format!("tally_bench_p11_{id}")).await.context("P11 needs PostgreSQL")?;
    let token = crate::create_key(tally, Path::new(&url), "bench-admin", "admin")?;
    let admin = Identity::key(&token)?;
    let envs = [
        ("RUST_LOG", "warn".to_string()),
        ("TALLY_WRITE_POOL", "8".to_string()),
        // P12's sockets are all the admin key's: far more than the default cap per principal.
        ("TALLY_MAX_SOCKETS_PER_PRINCIPAL", "100000".to_string()),
        ("TALLY_WS_IDLE_SECS", "3600".to_string()),
    ];
    let a = crate::proc::spawn("tally (node A)", tally, &serve_args(&url), &envs, &work.join("p11-a.log"), "/healthz")
        .await?;
    let members: Arc<Vec<String>> = Arc::new((0..settings.members).map(|i| format!("p{i}")).collect());
    crate::send_all(
        &a.base,
        &admin,
        settings.connections,
        members.iter().enumerate().map(|(i, m)| {
            (
                "/api/members".to_string(),
                json!({"member_id": m, "name": format!("Member {i}"), "email": format!("{m}@pg.example")}),
            )
        }),
    )
    .await;
    let commands = crate::earn_and_redeem(members.clone());
    let who = std::slice::from_ref(&admin);
    let secs = Duration::from_secs(settings.seconds);
    load::run(&a.base, settings.connections, Duration::from_secs(settings.warmup), commands.clone(), who).await;
    let (one, one_cpu, one_rss) =
        crate::with_usage(a.pid(), load::run(&a.base, settings.connections, secs, commands.clone(), who)).await;

    // A second node on the same database; the same connections, half to each.
    let b = crate::proc::spawn("tally (node B)", tally, &serve_args(&url), &envs, &work.join("p11-b.log"), "/healthz")
        .await?;
    let half = (settings.connections / 2).max(1);
    let (on_a, on_b) = tokio::join!(
        load::run(&a.base, half, secs, commands.clone(), who),
        load::run(&b.base, half, secs, commands.clone(), who)
    );
    let mut two = on_a;
    two.requests += on_b.requests;
    two.errors += on_b.errors;
    two.seconds = two.seconds.max(on_b.seconds);
    two.hist.add(&on_b.hist)?;

    // P12: a command acknowledged by node A, its view received by a socket on node B, while A
    // takes `cross_rate` commands a second.
    let (cross, cross_cpu) = {
        let before = crate::proc::sample(b.pid());
        let fresh = crate::live::freshness(
            &a.base,
            &b.base,
            &admin,
            &admin,
            &members,
            settings.cross_clients,
            settings.cross_rate,
            Duration::from_secs(settings.warmup),
            settings.cross_samples,
        )
        .await?;
        let after = crate::proc::sample(b.pid());
        (fresh, crate::proc::cpu_percent(&before, &after))
    };
    b.stop();
    a.stop();

    // The floor: what the same server commits per second, one row updated per transaction.
    let bench_url = databases.create(format!("tally_bench_pgbench_{id}")).await?;
    let pgbench = pgbench_binary()?;
    let init = std::process::Command::new(&pgbench)
        .args(["-i", "-q", "-s", &settings.pgbench_scale.to_string(), &bench_url])
        .output()?;
    anyhow::ensure!(init.status.success(), "pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    let mut floors = Vec::new();
    let mut counts = vec![settings.connections, 16.min(settings.connections)];
    counts.dedup();
    for clients in counts {
        let out = std::process::Command::new(&pgbench)
            .args(["-N", "-c", &clients.to_string(), "-j", "2", "-T", &settings.seconds.to_string(), &bench_url])
            .output()?;
        anyhow::ensure!(out.status.success(), "pgbench -N failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let tps = text
            .lines()
            .find_map(|l| {
                l.trim().strip_prefix("tps = ").and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok())
            })
            .with_context(|| format!("no tps in pgbench's output: {text}"))?;
        floors.push((clients, tps));
    }
    Ok(Measured { one, one_cpu, one_rss, two, pgbench: floors, cross, cross_cpu })
}

/// `pgbench` on the PATH, or Debian's PostgreSQL's.
fn pgbench_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Ok(out) = std::process::Command::new("pgbench").arg("--version").output() {
        if out.status.success() {
            return Ok("pgbench".into());
        }
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("bin/pgbench"))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().context("pgbench not found (Debian: postgresql-contrib or the server package)")
}
