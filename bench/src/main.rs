//! `tally-bench`: measure the CQRS promise on this machine, in one run, on a fresh database.
//!
//! Starts the `tally` binary that sits next to this one as a separate process, seeds it over HTTP
//! through the real command path, then runs P1–P11 and P6b (see BENCHMARKS.md) and prints a table (also
//! written as JSON). The load is generated in this process.
//!
//! Every request says who it is, as the server requires: the harness creates an admin key and a
//! staff key on the fresh database before starting the server (`tally keys create`), and signs a
//! few members in through access links for what members do (read their own view and page, watch
//! their own topic, sign in).

mod cdc;
mod compose;
mod floor;
mod live;
mod load;
mod pg;
mod proc;

use anyhow::Context;
use clap::{Args, Parser};
use load::{Identity, MakeRequest};
use rand::Rng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "tally-bench", about = "Benchmarks for Tally (see BENCHMARKS.md)")]
enum Cli {
    /// Run every measure once on a fresh database and print the table.
    Run(RunArgs),
    /// (internal) One upstream service of the API-composition baseline.
    #[command(hide = true)]
    Upstream {
        #[arg(long)]
        role: String,
        #[arg(long)]
        db: PathBuf,
        #[arg(long)]
        addr: String,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
    },
    /// (internal) The API-composition gateway.
    #[command(hide = true)]
    Compose {
        #[arg(long)]
        addr: String,
        #[arg(long)]
        profile: String,
        #[arg(long)]
        points: String,
        #[arg(long)]
        statement: String,
    },
    /// (internal) P5's floor: writes view frames to plain TCP sockets (see floor.rs).
    #[command(hide = true)]
    FanoutFloorSender {
        #[arg(long)]
        view: PathBuf,
        #[arg(long)]
        topic: String,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    #[arg(long, default_value_t = 10_000)]
    members: usize,
    #[arg(long, default_value_t = 200_000)]
    purchases: usize,
    /// Seconds per throughput measure.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// P3 and P4: seconds of the same load, not measured, before the measured part. The server
    /// writes each changed view one write-behind interval after its change (`TALLY_WRITE_BEHIND_MS`,
    /// 5 s by default), so a window that starts with the load would begin without those writes.
    #[arg(long, default_value_t = 10)]
    warmup: u64,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// P8: connections loading member pages (and the ceiling route, for the ratio).
    #[arg(long, default_value_t = 32)]
    page_connections: usize,
    /// P9: clients signing in at once, as fast as they can.
    #[arg(long, default_value_t = 16)]
    sign_in_clients: usize,
    /// P9: requests per second of the other load (members reading their own view), open loop.
    #[arg(long, default_value_t = 1_000.0)]
    sign_in_load_rate: f64,
    /// P4: sockets subscribed while freshness is measured.
    #[arg(long, default_value_t = 1_000)]
    fresh_clients: usize,
    /// P4: background commands per second.
    #[arg(long, default_value_t = 5_000.0)]
    fresh_rate: f64,
    #[arg(long, default_value_t = 300)]
    fresh_samples: usize,
    /// P5: sockets on one topic.
    #[arg(long, default_value_t = 10_000)]
    fanout_clients: usize,
    #[arg(long, default_value_t = 5)]
    fanout_rounds: usize,
    /// P6: events in the log before rebuilding (topped up with earn commands).
    #[arg(long, default_value_t = 1_000_000)]
    rebuild_events: i64,
    #[arg(long, default_value_t = 3)]
    rebuild_runs: usize,
    /// P7: the release WASM bundle (build it with `cargo leptos build --release --split`).
    #[arg(long, default_value = "target/site/pkg/tally.wasm")]
    wasm: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench-results/latest.json")]
    out: PathBuf,
    /// Tiny sizes, for the test suite's smoke run (the figures mean nothing).
    #[arg(long)]
    smoke: bool,
    /// P10: source rows written before the reader starts (the backlog).
    #[arg(long, default_value_t = 200_000)]
    cdc_backlog: usize,
    /// P10: single-row source updates per second while freshness is measured.
    #[arg(long, default_value_t = 1_000.0)]
    cdc_rate: f64,
    /// P10: seconds of those updates.
    #[arg(long, default_value_t = 10)]
    cdc_seconds: u64,
    /// P10: members watched by a socket each (the updates go round them).
    #[arg(long, default_value_t = 1_000)]
    cdc_watched: usize,
    /// P12: commands per second to one node while freshness is measured on the other.
    #[arg(long, default_value_t = 2_000.0)]
    cross_rate: f64,
    /// P11: members the commands go to.
    #[arg(long, default_value_t = 1_000)]
    pg_members: usize,
    /// P10, P11: the PostgreSQL server their databases are made on (P10: wal_level = logical).
    #[arg(long, env = "TALLY_BENCH_POSTGRES", default_value = "postgres://postgres@127.0.0.1:5432/test")]
    postgres: String,
    /// Run only these measures (e.g. `--only P3,P6`); all by default. P2 needs P1.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

impl RunArgs {
    fn wants(&self, id: &str) -> bool {
        self.only.is_empty()
            || self.only.iter().any(|o| o.eq_ignore_ascii_case(id) || (id == "P1" && o.eq_ignore_ascii_case("P2")))
    }

    fn smoke(mut self) -> Self {
        if self.smoke {
            self.members = 40;
            self.purchases = 200;
            self.seconds = 1;
            self.warmup = 1;
            self.connections = 8;
            self.page_connections = 8;
            self.sign_in_clients = 4;
            self.sign_in_load_rate = 200.0;
            self.fresh_clients = 20;
            self.fresh_rate = 200.0;
            self.fresh_samples = 10;
            self.fanout_clients = 50;
            self.fanout_rounds = 2;
            self.rebuild_events = 2_000;
            self.rebuild_runs = 1;
            self.cdc_backlog = 2_000;
            self.cdc_rate = 100.0;
            self.cdc_seconds = 1;
            self.cdc_watched = 20;
            self.pg_members = 20;
            self.cross_rate = 100.0;
        }
        self
    }
}

/// One row of the table.
#[derive(serde::Serialize, Clone)]
struct Row {
    id: &'static str,
    measure: String,
    result: String,
    target: &'static str,
    met: Option<bool>,
    server_cpu_percent: Option<f64>,
    server_rss_mib: Option<f64>,
    figures: Value,
}

impl Row {
    /// A measure that could not run (its database unreachable, say): the reason, nothing met.
    fn unmeasured(id: &'static str, measure: String, target: &'static str, err: &anyhow::Error) -> Row {
        Row {
            id,
            measure,
            result: format!("not measured: {err:#}"),
            target,
            met: None,
            server_cpu_percent: None,
            server_rss_mib: None,
            figures: json!({"error": format!("{err:#}")}),
        }
    }
}

struct Server {
    proc: proc::Proc,
    /// An admin key: seeding, commands, the consumers' status, metrics.
    admin: Identity,
    /// A staff key: P4's sockets, which watch any member.
    staff: Identity,
}

impl Server {
    fn pid(&self) -> u32 {
        self.proc.pid()
    }
    fn base(&self) -> &str {
        &self.proc.base
    }
}

/// Run `f` and report the server's CPU (percent of one core) and memory while it ran.
async fn with_usage<T>(pid: u32, f: impl std::future::Future<Output = T>) -> (T, f64, f64) {
    let before = proc::sample(pid);
    let out = f.await;
    let after = proc::sample(pid);
    (out, proc::cpu_percent(&before, &after), after.rss_kib as f64 / 1024.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Run(args) => run(args.smoke()).await,
        Cli::Upstream { role, db, addr, latency_ms } => compose::serve_upstream(&role, &db, &addr, latency_ms).await,
        Cli::Compose { addr, profile, points, statement } => {
            compose::serve_gateway(&addr, profile, points, statement).await
        }
        Cli::FanoutFloorSender { view, topic } => floor::serve(&view, &topic),
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(path.exists(), "{} not found: build it first (cargo build --release --bins)", path.display());
    Ok(path)
}

/// Median and largest of per-round figures (0 for none).
fn median_and_max(values: &[f64]) -> (f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (sorted.get(sorted.len() / 2).copied().unwrap_or(0.0), sorted.last().copied().unwrap_or(0.0))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let tally = sibling("tally")?;
    let me = std::env::current_exe()?;
    let work = tempfile::Builder::new().prefix("tally-bench-").tempdir()?;
    let db = work.path().join("bench.db");
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!("tally-bench: {cores} cores; work dir {}", work.path().display());

    let server = start_server(&tally, &db, work.path()).await?;
    let mut rows = Vec::new();
    let members: Arc<Vec<String>> = Arc::new((0..args.members).map(|i| format!("b{i}")).collect());

    // Seed through the real command path, over HTTP (P7 alone needs no data).
    let seeded = ["P1", "P2", "P3", "P4", "P5", "P6", "P6b", "P8", "P9"].iter().any(|id| args.wants(id));
    let (members_to_seed, purchases_to_seed) = if seeded { (args.members, args.purchases) } else { (0, 0) };
    let seeding = Instant::now();
    let enrolled = send_all(
        server.base(),
        &server.admin,
        args.connections,
        (0..members_to_seed).map(|i| {
            (
                "/api/members".to_string(),
                json!({"member_id": format!("b{i}"), "name": format!("Bench Member {i}"), "email": email(i)}),
            )
        }),
    )
    .await;
    let purchases = {
        let mut rng = rand::rng();
        (0..purchases_to_seed)
            .map(|i| {
                let member = members[rng.random_range(0..members.len())].clone();
                let amount: u64 = rng.random_range(100..20_000);
                ("/api/transactions".to_string(), json!({"transaction_id": format!("bt{i}"), "member_id": member, "amount_cents": amount, "currency": "EUR", "channel": "pos"}))
            })
            .collect::<Vec<_>>()
    };
    let recorded = send_all(server.base(), &server.admin, args.connections, purchases.into_iter()).await;
    let seed_secs = seeding.elapsed().as_secs_f64();
    let projecting = Instant::now();
    let head = wait_caught_up(server.base(), &server.admin).await?;
    let project_secs = projecting.elapsed().as_secs_f64();
    eprintln!(
        "seeded {enrolled} members and {recorded} purchases in {seed_secs:.1}s; consumers caught up {project_secs:.1}s later at position {head}"
    );

    // Members signed in, one per connection of the member measures (each password costs the
    // server a hash, so a few dozen, not one per member).
    let signed_in = if ["P1", "P5", "P6b", "P8", "P9"].iter().any(|id| args.wants(id)) {
        args.connections.max(args.page_connections).clamp(2, MAX_SESSIONS).min(args.members)
    } else {
        0
    };
    let sessions = Arc::new(sign_in_members(&server, signed_in).await?);
    let browsers: Vec<Identity> = sessions.iter().map(|m| m.session.clone()).collect();
    let anonymous = [Identity::default()];
    let admin = std::slice::from_ref(&server.admin);

    let secs = Duration::from_secs(args.seconds);
    let view_load = own_member(&sessions, "/api/members/");
    // P1: the materialized view vs a trivial route of the same server.
    if args.wants("P1") {
        let (ceiling, cpu_c, rss_c) =
            with_usage(server.pid(), load::run(server.base(), args.connections, secs, get_path("/livez"), &anonymous))
                .await;
        let (view, cpu_v, rss_v) =
            with_usage(server.pid(), load::run(server.base(), args.connections, secs, view_load.clone(), &browsers))
                .await;
        let ratio = view.rps() / ceiling.rps().max(1e-9);
        rows.push(Row {
        id: "P1",
        measure: format!(
            "GET /api/members/{{id}}, {} connections, each a member's session reading its own member ({} members)",
            args.connections,
            sessions.len().min(args.connections)
        ),
        result: format!(
            "{:.0} req/s (ceiling /livez {:.0} req/s, ratio {:.2}), p50 {:.2} ms, p99 {:.2} ms, errors {}",
            view.rps(), ceiling.rps(), ratio, view.ms(0.5), view.ms(0.99), view.errors
        ),
        target: "≥ 0.7 × ceiling, p99 ≤ 2 ms",
        met: Some(ratio >= 0.7 && view.ms(0.99) <= 2.0),
        server_cpu_percent: Some(cpu_v),
        server_rss_mib: Some(rss_v),
        figures: json!({"view_rps": view.rps(), "ceiling_rps": ceiling.rps(), "ratio": ratio, "p50_ms": view.ms(0.5),
            "p99_ms": view.ms(0.99), "errors": view.errors, "ceiling_p99_ms": ceiling.ms(0.99), "ceiling_cpu_percent": cpu_c, "ceiling_rss_mib": rss_c}),
    });

        // P2: API composition over three upstream services.
        if args.wants("P2") {
            // The upstreams are built from the views' table, which the server writes behind.
            wait_written(server.base(), &server.admin).await?;
            compose::prepare(&server::store::views_file(&db), work.path()).await?;
            let p2 = composition(&me, work.path(), &args, &members, &server, view.rps(), view_load.clone(), &browsers)
                .await?;
            rows.extend(p2);
        }
    }

    // P8: the member's own portal page, rendered on the server, vs the same trivial route.
    if args.wants("P8") {
        let page_bytes = page_size(server.base(), &sessions[0]).await?;
        let connections = args.page_connections;
        let pages = own_member(&sessions, "/members/");
        let (ceiling, cpu_c, rss_c) =
            with_usage(server.pid(), load::run(server.base(), connections, secs, get_path("/livez"), &anonymous)).await;
        let (page, cpu, rss) =
            with_usage(server.pid(), load::run(server.base(), connections, secs, pages, &browsers)).await;
        let ratio = page.rps() / ceiling.rps().max(1e-9);
        rows.push(Row {
            id: "P8",
            measure: format!(
                "the member's own portal page, GET /members/{{id}} rendered on the server ({page_bytes} bytes, uncompressed), \
                 {connections} connections, each a member's session; ceiling /livez on as many"
            ),
            result: format!(
                "{:.0} pages/s (ceiling /livez {:.0} req/s, ratio {ratio:.2}), p50 {:.2} ms, p99 {:.2} ms, errors {}, {page_bytes} bytes per page",
                page.rps(), ceiling.rps(), page.ms(0.5), page.ms(0.99), page.errors
            ),
            target: "≥ 0.25 × ceiling, p99 ≤ 10 ms",
            met: Some(ratio >= 0.25 && page.ms(0.99) <= 10.0 && page.errors == 0),
            server_cpu_percent: Some(cpu),
            server_rss_mib: Some(rss),
            figures: json!({"page_rps": page.rps(), "ceiling_rps": ceiling.rps(), "ratio": ratio, "p50_ms": page.ms(0.5),
                "p99_ms": page.ms(0.99), "errors": page.errors, "page_bytes": page_bytes, "connections": connections,
                "ceiling_p99_ms": ceiling.ms(0.99), "ceiling_cpu_percent": cpu_c, "ceiling_rss_mib": rss_c}),
        });
    }

    // P3: durable commands over HTTP.
    let command_load = earn_and_redeem(members.clone());
    if args.wants("P3") {
        load::run(server.base(), args.connections, Duration::from_secs(args.warmup), command_load.clone(), admin).await;
        let (cmds, cpu, rss) =
            with_usage(server.pid(), load::run(server.base(), args.connections, secs, command_load.clone(), admin))
                .await;
        rows.push(Row {
            id: "P3",
            measure: format!(
                "durable commands over HTTP (earn/redeem 1:1), {} connections, after {} s of the same load",
                args.connections, args.warmup
            ),
            result: format!(
                "{:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms, errors {}",
                cmds.rps(),
                cmds.ms(0.5),
                cmds.ms(0.99),
                cmds.ms(0.999),
                cmds.ms(1.0),
                cmds.errors
            ),
            target: "≥ 25,000/s, p99 ≤ 10 ms",
            met: Some(cmds.rps() >= 25_000.0 && cmds.ms(0.99) <= 10.0),
            server_cpu_percent: Some(cpu),
            server_rss_mib: Some(rss),
            // The tail beyond p99 too: a stall of the one writer (a checkpoint waiting for it, a
            // slow sync) is short and rare, so p99 alone can hide it.
            figures: json!({"rps": cmds.rps(), "p50_ms": cmds.ms(0.5), "p99_ms": cmds.ms(0.99),
                "p999_ms": cmds.ms(0.999), "max_ms": cmds.ms(1.0), "errors": cmds.errors}),
        });
        settle(server.base(), &server.admin).await?;
    }

    // P4: freshness under load.
    if args.wants("P4") {
        let (fresh, cpu, rss) = with_usage(
            server.pid(),
            live::freshness(
                server.base(),
                server.base(),
                &server.admin,
                &server.staff,
                &members,
                args.fresh_clients,
                args.fresh_rate,
                Duration::from_secs(args.warmup),
                args.fresh_samples,
            ),
        )
        .await;
        let fresh = fresh?;
        let (p50, p99) =
            (fresh.hist.value_at_quantile(0.5) as f64 / 1000.0, fresh.hist.value_at_quantile(0.99) as f64 / 1000.0);
        rows.push(Row {
        id: "P4",
        measure: format!(
            "ack → subscribed client holds the new view ({} sockets of a staff key, background {:.0} commands/s achieved)",
            fresh.subscribers, fresh.background_rate
        ),
        result: format!("p50 {p50:.2} ms, p99 {p99:.2} ms over {} samples", fresh.hist.len()),
        target: "p50 ≤ 5 ms, p99 ≤ 25 ms",
        met: Some(p50 <= 5.0 && p99 <= 25.0),
        server_cpu_percent: Some(cpu),
        server_rss_mib: Some(rss),
        figures: json!({"p50_ms": p50, "p99_ms": p99, "samples": fresh.hist.len(), "sockets": fresh.subscribers, "background_rate": fresh.background_rate, "target_rate": args.fresh_rate}),
    });
        settle(server.base(), &server.admin).await?;
    }

    // P5: fan-out to many sockets on one topic: the member's own, every socket the member's
    // session (one member watching from many tabs and devices, as far as the server can tell).
    if args.wants("P5") {
        let watcher = &sessions.iter().find(|m| m.id == members[1]).context("no session of the P5 member")?.session;
        let (fan, cpu, rss) = with_usage(
            server.pid(),
            live::fanout(
                server.base(),
                &server.admin,
                watcher,
                server.pid(),
                &members[1],
                args.fanout_clients,
                args.fanout_rounds,
            ),
        )
        .await;
        let fan = fan?;
        let p99 = fan.hist.value_at_quantile(0.99) as f64 / 1000.0;
        let p99_from_request = fan.hist_from_request.value_at_quantile(0.99) as f64 / 1000.0;
        let (last_median, last_max) = median_and_max(&fan.round_last_ms);
        let (answer_median, answer_max) = median_and_max(&fan.answer_ms);
        // The same frames to as many plain sockets from a process that does nothing else.
        let topic = format!("member:{}", members[1]);
        let floor = live::fanout_floor(&fan.view, &topic, args.fanout_clients, args.fanout_rounds).await?;
        let floor_p99 = floor.hist.value_at_quantile(0.99) as f64 / 1000.0;
        let (floor_last_median, _) = median_and_max(&floor.round_last_ms);
        rows.push(Row {
        id: "P5",
        measure: format!("one change to a topic watched by {} sockets, all the member's own session ({} connected; a view of {} bytes)", fan.clients, fan.connected, fan.view_bytes),
        result: format!(
            "delivery p50 {:.2} ms, p99 {p99:.2} ms, missing {} (from the request: p99 {p99_from_request:.2} ms); last delivery of a round: median {last_median:.1} ms, slowest {last_max:.1} ms; the change's own command answered in {answer_median:.1} ms (median), {answer_max:.1} ms (slowest); server memory {:.1} KiB per connection ({:.1} KiB after the changes); CPU per message: server {:.1} µs, load generator {:.1} µs. Floor (the same frames written to {} plain TCP sockets, read by the same clients, by a process doing nothing else): p99 {floor_p99:.2} ms, missing {}, last delivery of a round: median {floor_last_median:.1} ms; CPU per message: sender {:.1} µs, load generator {:.1} µs",
            fan.hist.value_at_quantile(0.5) as f64 / 1000.0, fan.missing, fan.rss_per_connection_kib,
            fan.rss_per_connection_after_kib, fan.server_us_per_message, fan.client_us_per_message,
            floor.connected, floor.missing, floor.sender_us_per_message, floor.client_us_per_message
        ),
        target: "p99 ≤ 100 ms; ≤ 16 KiB per connection",
        met: Some(
            p99 <= 100.0
                && fan.rss_per_connection_kib.max(fan.rss_per_connection_after_kib) <= 16.0
                && fan.missing == 0
                && fan.connected == fan.clients,
        ),
        server_cpu_percent: Some(cpu),
        server_rss_mib: Some(rss),
        figures: json!({"p50_ms": fan.hist.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": p99, "clients": fan.clients,
            "connected": fan.connected, "missing": fan.missing, "kib_per_connection": fan.rss_per_connection_kib,
            "kib_per_connection_after_changes": fan.rss_per_connection_after_kib,
            "server_us_per_message": fan.server_us_per_message, "client_us_per_message": fan.client_us_per_message, "view_bytes": fan.view_bytes,
            "p99_from_request_ms": p99_from_request, "round_last_median_ms": last_median, "round_last_max_ms": last_max, "round_last_ms": fan.round_last_ms, "round_first_ms": fan.round_first_ms,
            "answer_median_ms": answer_median, "answer_max_ms": answer_max, "answer_ms": fan.answer_ms,
            "floor": {"p50_ms": floor.hist.value_at_quantile(0.5) as f64 / 1000.0, "p99_ms": floor_p99, "connected": floor.connected,
                "missing": floor.missing, "round_last_median_ms": floor_last_median, "round_last_ms": floor.round_last_ms,
                "sender_us_per_message": floor.sender_us_per_message, "client_us_per_message": floor.client_us_per_message}}),
    });
    }

    // P9: sign-ins, and what a storm of them does to everyone else's requests.
    if args.wants("P9") {
        rows.push(sign_in_storm(&args, &server, &sessions).await?);
    }

    // P11: durable commands on PostgreSQL, one node and two, beside pgbench on the same server.
    if args.wants("P11") || args.wants("P12") {
        rows.extend(postgres_rows(&args, &tally, work.path()).await?);
    }

    // P10: change data capture, on a server of its own fed by a database of its own.
    if args.wants("P10") {
        rows.push(cdc_row(&args, &tally, work.path()).await?);
    }

    // P6: top the log up, (P6b: rebuild online under P1's read load,) stop the server, rebuild
    // offline.
    let wants_online = args.wants("P6b");
    if args.wants("P6") || wants_online {
        let head = top_up(server.base(), &server.admin, args.rebuild_events, args.connections, command_load).await?;
        let online = match wants_online {
            true => Some(online_rebuild(&server, args.connections, secs, view_load.clone(), &browsers).await?),
            false => None,
        };
        server.proc.stop();
        let mut rates = Vec::new();
        for _ in 0..args.rebuild_runs {
            let output = std::process::Command::new(&tally)
                .args(["rebuild", "--database-url", &db.to_string_lossy()])
                .env("RUST_LOG", "warn")
                .output()?;
            anyhow::ensure!(
                output.status.success(),
                "tally rebuild failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            let text = String::from_utf8_lossy(&output.stdout).to_string();
            let rate: f64 = text
                .rsplit_once(": ")
                .and_then(|(_, r)| r.split_whitespace().next()?.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("unexpected rebuild output: {text}"))?;
            eprintln!("{}", text.trim());
            rates.push(rate);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        rows.push(Row {
            id: "P6",
            measure: format!(
                "offline rebuild of every view from {head} events (tally rebuild, median of {})",
                rates.len()
            ),
            result: format!(
                "{median:.0} events/s (runs: {})",
                rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(", ")
            ),
            target: "≥ 300,000 events/s",
            met: Some(median >= 300_000.0),
            server_cpu_percent: None,
            server_rss_mib: None,
            figures: json!({"events": head, "events_per_second": median, "runs": rates}),
        });
        if let Some(online) = online {
            rows.push(online.row(median));
        }
    } else {
        server.proc.stop();
    }

    // P7: the release WASM bundle.
    if args.wants("P7") {
        rows.push(wasm_row(&args.wasm));
    }

    // In the order of their ids, whatever order they ran in (P8 and P9 run before P6 stops the
    // server); the sort keeps P2's rows in theirs.
    rows.sort_by_key(|row| row.id);
    print_table(&rows, cores);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let report = json!({"cores": cores, "members": args.members, "purchases": args.purchases, "seconds": args.seconds, "warmup_seconds": args.warmup,
        "connections": args.connections, "seed_seconds": seed_secs, "catch_up_seconds": project_secs, "rows": rows});
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    eprintln!("results written to {}", args.out.display());
    Ok(())
}

/// P11's and P12's rows (not met, with the reason, when they could not run; the smoke run fails
/// then).
async fn postgres_rows(args: &RunArgs, tally: &Path, work: &Path) -> anyhow::Result<Vec<Row>> {
    let settings = pg::Settings {
        admin_url: args.postgres.clone(),
        members: args.pg_members,
        connections: args.connections,
        seconds: args.seconds,
        warmup: args.warmup.min(5),
        pgbench_scale: if args.smoke { 1 } else { 10 },
        cross_rate: args.cross_rate,
        cross_clients: args.fresh_clients.min(100),
        cross_samples: args.fresh_samples,
    };
    let measure = format!(
        "earn/redeem over HTTP, {} connections, {} members, on PostgreSQL (synchronous_commit on): one node, then two nodes on one database; beside pgbench -N on the same server",
        args.connections, args.pg_members
    );
    let target = "one node ≥ 4 × pgbench -N's best tps, p99 ≤ 20 ms; two nodes ≥ 1.0 × one";
    let cross_measure = format!(
        "ack by node A → a socket on node B holds the new view ({} sockets on B, {:.0} commands/s to A), PostgreSQL",
        settings.cross_clients, settings.cross_rate
    );
    let cross_target = "p50 ≤ 5 ms, p99 ≤ 25 ms";
    let m = match pg::measure(tally, work, &settings).await {
        Ok(m) => m,
        Err(err) if args.smoke => return Err(err.context("P11")),
        Err(err) => {
            return Ok(vec![
                Row::unmeasured("P11", measure, target, &err),
                Row::unmeasured("P12", cross_measure, cross_target, &err),
            ])
        }
    };
    let best = m.pgbench_best();
    let ratio = m.one.rps() / best.max(1e-9);
    let two_ratio = m.two.rps() / m.one.rps().max(1e-9);
    let floors = m.pgbench.iter().map(|(c, tps)| format!("{tps:.0} tps at {c} clients")).collect::<Vec<_>>().join(", ");
    let p11 = Row {
        id: "P11",
        measure,
        result: format!(
            "one node {:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms, errors {}; pgbench -N {floors}: {ratio:.2} × its best; two nodes {:.0} commands/s ({two_ratio:.2} × one), p99 {:.2} ms, errors {}",
            m.one.rps(), m.one.ms(0.5), m.one.ms(0.99), m.one.errors, m.two.rps(), m.two.ms(0.99), m.two.errors
        ),
        target,
        met: Some(ratio >= 4.0 && m.one.ms(0.99) <= 20.0 && two_ratio >= 1.0 && m.one.errors == 0 && m.two.errors == 0),
        server_cpu_percent: Some(m.one_cpu),
        server_rss_mib: Some(m.one_rss),
        figures: json!({"one_rps": m.one.rps(), "one_p50_ms": m.one.ms(0.5), "one_p99_ms": m.one.ms(0.99), "one_errors": m.one.errors,
            "two_rps": m.two.rps(), "two_p99_ms": m.two.ms(0.99), "two_errors": m.two.errors,
            "pgbench": m.pgbench.iter().map(|(c, tps)| json!({"clients": c, "tps": tps})).collect::<Vec<_>>(),
            "ratio_to_pgbench": ratio, "two_to_one": two_ratio}),
    };
    let ms = |q: f64| m.cross.hist.value_at_quantile(q) as f64 / 1000.0;
    let p12 = Row {
        id: "P12",
        measure: format!("{cross_measure}; {:.0} commands/s achieved", m.cross.background_rate),
        result: format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} samples",
            ms(0.5),
            ms(0.99),
            ms(1.0),
            m.cross.hist.len()
        ),
        target: cross_target,
        met: Some(ms(0.5) <= 5.0 && ms(0.99) <= 25.0),
        server_cpu_percent: Some(m.cross_cpu),
        server_rss_mib: None,
        figures: json!({"p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "samples": m.cross.hist.len(),
            "background_rate": m.cross.background_rate}),
    };
    Ok(vec![p11, p12])
}

/// P10's row (not met, with the reason, when it could not run; the smoke run fails then).
async fn cdc_row(args: &RunArgs, tally: &Path, work: &Path) -> anyhow::Result<Row> {
    let settings = cdc::Settings {
        admin_url: args.postgres.clone(),
        backlog: args.cdc_backlog,
        rate: args.cdc_rate,
        seconds: args.cdc_seconds,
        watched: args.cdc_watched,
    };
    let measure = format!(
        "CDC from a PostgreSQL source's slot: a backlog of {} rows, then {} single-row updates/s for {} s to members watched by {} sockets; from the source's COMMIT to the socket",
        args.cdc_backlog, args.cdc_rate, args.cdc_seconds, args.cdc_watched
    );
    let target = "freshness p50 ≤ 50 ms, p99 ≤ 250 ms at 1,000 rows/s; backlog ≥ 10,000 rows/s";
    Ok(match cdc::measure(tally, work, &settings).await {
        Ok(m) => Row {
            id: "P10",
            measure,
            result: format!(
                "backlog {} rows in {:.1} s: {:.0} rows/s; then, once the slot's restart point passed the backlog ({:.1} s later), freshness p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {} updates received, sent at {:.0}/s)",
                m.backlog, m.backlog_secs, m.backlog_rows_per_sec, m.settle_secs, m.p50_ms, m.p99_ms, m.max_ms, m.received, m.updates, m.sent_rate
            ),
            target,
            met: Some(m.p50_ms <= 50.0 && m.p99_ms <= 250.0 && m.backlog_rows_per_sec >= 10_000.0 && m.received == m.updates),
            server_cpu_percent: Some(m.cpu_percent),
            server_rss_mib: Some(m.rss_mib),
            figures: json!({"backlog_rows": m.backlog, "backlog_secs": m.backlog_secs, "backlog_rows_per_sec": m.backlog_rows_per_sec,
                "settle_secs": m.settle_secs, "updates": m.updates, "received": m.received, "sent_rate": m.sent_rate, "p50_ms": m.p50_ms, "p99_ms": m.p99_ms, "max_ms": m.max_ms}),
        },
        Err(err) if args.smoke => return Err(err.context("P10")),
        Err(err) => Row::unmeasured("P10", measure, target, &err),
    })
}

/// P6b: P1's read load before and during an online (blue/green) rebuild of the membership views.
struct OnlineRebuild {
    before: load::LoadResult,
    during: load::LoadResult,
    /// The build as the server reports it once swapped in.
    build: Value,
    /// From its start to its swap, by its own timestamps.
    seconds: f64,
    cpu_percent: f64,
    rss_mib: f64,
}

async fn online_rebuild(
    server: &Server,
    connections: usize,
    secs: Duration,
    view_load: MakeRequest,
    browsers: &[Identity],
) -> anyhow::Result<OnlineRebuild> {
    settle(server.base(), &server.admin).await?;
    let before = load::run(server.base(), connections, secs, view_load.clone(), browsers).await;
    let client = reqwest::Client::new();
    let url = format!("{}/api/projections/membership_view/rebuild", server.base());
    let mut during = load::LoadResult { requests: 0, errors: 0, seconds: 0.0, hist: load::histogram() };
    let usage = proc::sample(server.pid());
    server.admin.on(client.post(&url)).send().await?.error_for_status()?;
    // The read load in slices of half a second, until the build is swapped in.
    let build = loop {
        let slice =
            load::run(server.base(), connections, Duration::from_millis(500), view_load.clone(), browsers).await;
        during.requests += slice.requests;
        during.errors += slice.errors;
        during.seconds += slice.seconds;
        during.hist.add(&slice.hist)?;
        let build: Value = server.admin.on(client.get(&url)).send().await?.error_for_status()?.json().await?;
        match build["state"].as_str() {
            Some("swapped") => break build,
            Some("failed") => anyhow::bail!("the online rebuild failed: {build}"),
            _ => anyhow::ensure!(during.seconds < 3600.0, "the online rebuild took over an hour"),
        }
    };
    let after = proc::sample(server.pid());
    let (cpu_percent, rss_mib) = (proc::cpu_percent(&usage, &after), after.rss_kib as f64 / 1024.0);
    let at = |field: &str| {
        let text = build[field].as_str().unwrap_or_default();
        chrono::DateTime::parse_from_rfc3339(text).with_context(|| format!("the build's {field}: {text:?}"))
    };
    let seconds = (at("finished_at")? - at("started_at")?).num_milliseconds() as f64 / 1000.0;
    Ok(OnlineRebuild { before, during, build, seconds, cpu_percent, rss_mib })
}

impl OnlineRebuild {
    /// The row, beside P6's offline rate (`offline`, events/s) from the same run.
    fn row(&self, offline: f64) -> Row {
        let events = self.build["position"].as_f64().unwrap_or(0.0);
        let rate = events / self.seconds.max(1e-9);
        let read_ratio = self.during.rps() / self.before.rps().max(1e-9);
        let rate_ratio = rate / offline.max(1e-9);
        let errors = self.before.errors + self.during.errors;
        Row {
            id: "P6b",
            measure: format!(
                "P1's reads during an online (blue/green) rebuild of the membership views from {events:.0} events, \
                 beside the same reads just before it; its rate beside P6's offline rebuild"
            ),
            result: format!(
                "reads {:.0} req/s during vs {:.0} before (ratio {read_ratio:.2}), p99 {:.2} ms during, errors {errors}; \
                 online rebuild {rate:.0} events/s in {:.1} s vs offline {offline:.0} (ratio {rate_ratio:.2})",
                self.during.rps(),
                self.before.rps(),
                self.during.ms(0.99),
                self.seconds
            ),
            target: "reads ≥ 0.6 × without, 0 errors; online ≥ 0.5 × offline",
            met: Some(read_ratio >= 0.6 && errors == 0 && rate_ratio >= 0.5),
            server_cpu_percent: Some(self.cpu_percent),
            server_rss_mib: Some(self.rss_mib),
            figures: json!({"events": events, "reads_during_rps": self.during.rps(), "reads_before_rps": self.before.rps(),
                "read_ratio": read_ratio, "p99_during_ms": self.during.ms(0.99), "p99_before_ms": self.before.ms(0.99),
                "errors": errors, "online_events_per_second": rate, "online_seconds": self.seconds,
                "offline_events_per_second": offline, "rate_ratio": rate_ratio, "build": self.build}),
        }
    }
}

/// Create the harness's keys on the fresh database, then start the server on it.
async fn start_server(tally: &Path, db: &Path, work: &Path) -> anyhow::Result<Server> {
    let admin = Identity::key(&create_key(tally, db, "bench-admin", "admin")?)?;
    let staff = Identity::key(&create_key(tally, db, "bench-staff", "staff")?)?;
    let args = vec![
        "serve".into(),
        "--addr".into(),
        "127.0.0.1:{port}".into(),
        "--database-url".into(),
        db.to_string_lossy().to_string(),
    ];
    let envs = [
        ("RUST_LOG", "warn".to_string()),
        // P4 watches its members from 1,000 sockets of one staff key, and P5 one member from
        // 10,000 sockets of that member's session: far above the server's default cap per
        // principal (32, enough for a person's tabs and devices).
        ("TALLY_MAX_SOCKETS_PER_PRINCIPAL", "100000".to_string()),
        // The sockets' clients read frames straight off TCP and answer no pings (a browser does):
        // with the default idle time (60 s) a long P4 or P5 on a slow machine would see them
        // closed. Pinging is not what these measures are about.
        ("TALLY_WS_IDLE_SECS", "3600".to_string()),
    ];
    let proc = proc::spawn("tally", tally, &args, &envs, &work.join("server.log"), "/healthz").await?;
    Ok(Server { proc, admin, staff })
}

/// `tally keys create` on the database, before any server holds it: the key's token.
fn create_key(tally: &Path, db: &Path, name: &str, role: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new(tally)
        .args(["keys", "create", "--database-url", &db.to_string_lossy(), "--name", name, "--role", role])
        .env("RUST_LOG", "warn")
        .output()?;
    anyhow::ensure!(output.status.success(), "tally keys create failed: {}", String::from_utf8_lossy(&output.stderr));
    // The token is alone on the last line.
    let stdout = String::from_utf8(output.stdout)?;
    let token = stdout.lines().map(str::trim).rfind(|line| !line.is_empty());
    Ok(token.context("tally keys create printed no token")?.to_string())
}

fn email(i: usize) -> String {
    format!("b{i}@bench.example")
}

/// Members signed in at most: each sign-in is a password hash on the server (Argon2id, tens of
/// milliseconds, a few at a time).
const MAX_SESSIONS: usize = 64;

/// A seeded member signed in, as that member's browser would be.
struct Member {
    id: String,
    email: String,
    password: String,
    session: Identity,
}

/// Sign the first `count` seeded members in the way a member enrolled by staff first does: an
/// access link (staff asks for it), claimed with a new password.
async fn sign_in_members(server: &Server, count: usize) -> anyhow::Result<Vec<Member>> {
    let client = load::client(8);
    futures::future::try_join_all((0..count).map(|i| claim(&client, server, i))).await
}

async fn claim(client: &reqwest::Client, server: &Server, i: usize) -> anyhow::Result<Member> {
    let (base, id) = (server.base(), format!("b{i}"));
    let link = server.admin.on(client.post(format!("{base}/api/members/{id}/access-link")));
    let link: Value = link.send().await?.error_for_status()?.json().await?;
    let token = link["url"].as_str().and_then(|url| url.strip_prefix("/claim/")).context("no access link")?;
    let password = format!("bench-password-{i}");
    let claim = Identity::browser(base, None)?.on(client.post(format!("{base}/api/claim")));
    let answer = claim.json(&json!({"token": token, "password": password})).send().await?.error_for_status()?;
    let cookie = answer
        .headers()
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok()?.strip_prefix(server::auth::sessions::COOKIE)?.strip_prefix('='))
        .find_map(|rest| rest.split(';').next())
        .with_context(|| format!("claiming {id}'s access link set no session cookie"))?;
    let session = Identity::browser(base, Some(cookie))?;
    // The measures that use it read this member only: make sure that works.
    session.on(client.get(format!("{base}/api/members/{id}"))).send().await?.error_for_status()?;
    Ok(Member { id, email: email(i), password, session })
}

/// P3's command load (also P11's): earn and redeem in turn, each connection working through the
/// members in its own order.
fn earn_and_redeem(members: Arc<Vec<String>>) -> MakeRequest {
    Arc::new(move |worker, n| {
        let m = &members[(worker * 7919 + (n as usize / 2) * 64) % members.len()];
        if n % 2 == 0 {
            (hyper::Method::POST, format!("/api/members/{m}/points/earn"), Some(json!({"points": 10})))
        } else {
            (hyper::Method::POST, format!("/api/members/{m}/points/redeem"), Some(json!({"points": 5})))
        }
    })
}

fn get_path(path: &'static str) -> MakeRequest {
    Arc::new(move |_, _| (hyper::Method::GET, path.to_string(), None))
}

/// `GET <prefix><id>` of the member whose session the loop has (loop `i` is session `i % n`, as
/// in `load::run`): members read only their own.
fn own_member(sessions: &Arc<Vec<Member>>, prefix: &'static str) -> MakeRequest {
    let sessions = sessions.clone();
    Arc::new(move |worker, _| (hyper::Method::GET, format!("{prefix}{}", sessions[worker % sessions.len()].id), None))
}

/// P8's page, once: that it is the member's page (not a sign-in or error page), and its size.
async fn page_size(base: &str, member: &Member) -> anyhow::Result<usize> {
    let client = load::client(1);
    let answer = member.session.on(client.get(format!("{base}/members/{}", member.id))).send().await?;
    let status = answer.status();
    let page = answer.text().await?;
    anyhow::ensure!(
        status.is_success() && page.starts_with("<!DOCTYPE html>") && page.contains(&member.id),
        "GET /members/{} with the member's session answered {status}: {}",
        member.id,
        page.chars().take(300).collect::<String>()
    );
    Ok(page.len())
}

/// P9: sign-ins per second, and the latency of other requests before and during a storm of them.
///
/// A calm phase of members reading their own view at a fixed rate, then the same load while
/// `sign_in_clients` clients sign in (correct passwords) back to back. The reads are an open loop
/// timed from when each was due (`load::open_loop`), so requests the storm delays are counted,
/// however long they wait. Each sign-in is a password hash (Argon2id) on the server, a few at a
/// time (`TALLY_HASH_CONCURRENCY`): the storm's hashes must not take the cores the other requests
/// need.
async fn sign_in_storm(args: &RunArgs, server: &Server, sessions: &Arc<Vec<Member>>) -> anyhow::Result<Row> {
    let (base, secs, rate) = (server.base(), Duration::from_secs(args.seconds), args.sign_in_load_rate);
    let reads = own_member(sessions, "/api/members/");
    let browsers: Vec<Identity> = sessions.iter().map(|m| m.session.clone()).collect();
    let (calm, cpu_calm, _) =
        with_usage(server.pid(), load::open_loop(base, args.connections, rate, secs, reads.clone(), &browsers)).await;
    let sign_in: MakeRequest = {
        let sessions = sessions.clone();
        Arc::new(move |worker, _| {
            let m = &sessions[worker % sessions.len()];
            (hyper::Method::POST, "/api/session".into(), Some(json!({"email": m.email, "password": m.password})))
        })
    };
    // Browsers on the sign-in page: no session yet.
    let signing_in = [Identity::browser(base, None)?];
    let ((storm, sign_ins), cpu, rss) = with_usage(server.pid(), async {
        tokio::join!(
            load::open_loop(base, args.connections, rate, secs, reads, &browsers),
            load::run(base, args.sign_in_clients, secs, sign_in, &signing_in)
        )
    })
    .await;
    let signed_in = sign_ins.requests - sign_ins.errors;
    let sign_ins_per_second = signed_in as f64 / sign_ins.seconds.max(1e-9);
    let (calm_p99, storm_p99) = (calm.ms(0.99), storm.ms(0.99));
    let ratio = storm_p99 / calm_p99.max(1e-9);
    Ok(Row {
        id: "P9",
        measure: format!(
            "sign-in storm: {} clients signing in (POST /api/session, correct passwords) back to back, beside \
             {rate:.0} req/s of GET /api/members/{{id}} (open loop, {} connections, each a member's session \
             reading its own member)",
            args.sign_in_clients, args.connections
        ),
        result: format!(
            "{sign_ins_per_second:.0} sign-ins/s (p50 {:.1} ms, p99 {:.1} ms, errors {}); other requests: p99 {calm_p99:.2} ms calm, \
             {storm_p99:.2} ms during the storm ({ratio:.2} ×), p50 {:.2} / {:.2} ms, {:.0} / {:.0} req/s, errors {} / {}",
            sign_ins.ms(0.5), sign_ins.ms(0.99), sign_ins.errors, calm.ms(0.5), storm.ms(0.5), calm.rps(), storm.rps(),
            calm.errors, storm.errors
        ),
        target: "storm p99 ≤ 2 × calm p99",
        met: Some(ratio <= 2.0 && signed_in > 0 && sign_ins.errors == 0 && calm.errors + storm.errors == 0),
        server_cpu_percent: Some(cpu),
        server_rss_mib: Some(rss),
        figures: json!({"sign_ins_per_second": sign_ins_per_second, "sign_ins": signed_in, "sign_in_errors": sign_ins.errors,
            "sign_in_p50_ms": sign_ins.ms(0.5), "sign_in_p99_ms": sign_ins.ms(0.99), "sign_in_clients": args.sign_in_clients,
            "load_rate": rate, "calm_rps": calm.rps(), "storm_rps": storm.rps(), "calm_p50_ms": calm.ms(0.5),
            "storm_p50_ms": storm.ms(0.5), "calm_p99_ms": calm_p99, "storm_p99_ms": storm_p99, "ratio": ratio,
            "calm_errors": calm.errors, "storm_errors": storm.errors, "calm_cpu_percent": cpu_calm}),
    })
}

/// POST every body over `connections` connections as `who`; returns how many were accepted (2xx).
async fn send_all(
    base: &str,
    who: &Identity,
    connections: usize,
    requests: impl Iterator<Item = (String, Value)>,
) -> usize {
    let requests: Arc<Vec<(String, Value)>> = Arc::new(requests.collect());
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..connections)
        .map(|_| {
            let (requests, next, conn) = (requests.clone(), next.clone(), load::Conn::new(base, who));
            tokio::spawn(async move {
                let Ok(mut conn) = conn else { return 0 };
                let mut accepted = 0;
                while let Some((path, body)) = requests.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if conn.exchange(hyper::Method::POST, path, Some(body)).await.unwrap_or(false) {
                        accepted += 1;
                    }
                }
                accepted
            })
        })
        .collect();
    let mut accepted = 0;
    for worker in workers {
        accepted += worker.await.unwrap_or(0);
    }
    accepted
}

/// Wait until every consumer has caught up; returns the head. `admin` may read their status.
async fn wait_caught_up(base: &str, admin: &Identity) -> anyhow::Result<u64> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let request = admin.on(client.get(format!("{base}/api/projections")));
        let status: Value = request.send().await?.error_for_status()?.json().await?;
        let items = status["items"].as_array().cloned().unwrap_or_default();
        if !items.is_empty() && items.iter().all(|i| i["lag"] == 0) {
            return Ok(items[0]["head"].as_u64().unwrap_or(0));
        }
        anyhow::ensure!(Instant::now() < deadline, "consumers did not catch up");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Wait until the server holds no membership view unwritten (see `TALLY_WRITE_BEHIND_MS`).
async fn wait_written(base: &str, admin: &Identity) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = admin.on(client.get(format!("{base}/metrics"))).send().await?.error_for_status()?.text().await?;
        let unwritten = metrics
            .lines()
            .find_map(|line| line.strip_prefix(r#"tally_consumer_unwritten_rows{consumer="membership_view"} "#))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if unwritten == 0.0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{unwritten} views still unwritten after two minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Between measures: the consumers caught up and every view the last measure changed written.
/// P3 changes every member's view, and the server writes each changed view over the next
/// write-behind interval (5 s): a measure started meanwhile would measure those writes too.
async fn settle(base: &str, admin: &Identity) -> anyhow::Result<()> {
    wait_caught_up(base, admin).await?;
    wait_written(base, admin).await
}

/// Append commands (as `admin`) until the log holds `target` events.
async fn top_up(
    base: &str,
    admin: &Identity,
    target: i64,
    connections: usize,
    make: MakeRequest,
) -> anyhow::Result<u64> {
    loop {
        let head = wait_caught_up(base, admin).await?;
        if head as i64 >= target {
            return Ok(head);
        }
        let _ = load::run(base, connections, Duration::from_secs(5), make.clone(), std::slice::from_ref(admin)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn composition(
    me: &Path,
    work: &Path,
    args: &RunArgs,
    members: &Arc<Vec<String>>,
    server: &Server,
    view_rps: f64,
    view_load: MakeRequest,
    viewers: &[Identity],
) -> anyhow::Result<Vec<Row>> {
    let secs = Duration::from_secs(args.seconds);
    let mut rows = Vec::new();
    for latency in [0u64, 5] {
        let mut upstreams = Vec::new();
        for role in compose::ROLES {
            let a = vec![
                "upstream".into(),
                "--role".into(),
                role.into(),
                "--db".into(),
                work.join(format!("{role}.db")).to_string_lossy().to_string(),
                "--addr".into(),
                "127.0.0.1:{port}".into(),
                "--latency-ms".into(),
                latency.to_string(),
            ];
            upstreams.push(proc::spawn(role, me, &a, &[], &work.join(format!("{role}.log")), "/livez").await?);
        }
        let a = vec![
            "compose".into(),
            "--addr".into(),
            "127.0.0.1:{port}".into(),
            "--profile".into(),
            upstreams[0].base.clone(),
            "--points".into(),
            upstreams[1].base.clone(),
            "--statement".into(),
            upstreams[2].base.clone(),
        ];
        let gateway = proc::spawn("gateway", me, &a, &[], &work.join("gateway.log"), "/livez").await?;
        let members = members.clone();
        let request: MakeRequest = Arc::new(move |_, _| {
            let m = &members[rand::rng().random_range(0..members.len())];
            (hyper::Method::GET, format!("/members/{m}"), None)
        });
        // The composition's services are this harness's own, open to anyone.
        let anonymous = [Identity::default()];
        let composed = load::run(&gateway.base, args.connections, secs, request.clone(), &anonymous).await;
        let (view, cpu, rss) = if latency == 0 {
            (None, None, None)
        } else {
            let (v, cpu, rss) =
                with_usage(server.pid(), load::run(server.base(), args.connections, secs, view_load.clone(), viewers))
                    .await;
            (Some(v), Some(cpu), Some(rss))
        };
        let view_rps_now = view.as_ref().map(|v| v.rps()).unwrap_or(view_rps);
        let ratio = view_rps_now / composed.rps().max(1e-9);
        rows.push(Row {
            id: "P2",
            measure: format!("same page data by API composition (3 upstreams, {latency} ms injected latency)"),
            result: format!(
                "composition {:.0} req/s (p99 {:.2} ms, errors {}) vs view {:.0} req/s{}: view = {ratio:.1} × composition",
                composed.rps(), composed.ms(0.99), composed.errors, view_rps_now,
                view.as_ref().map(|v| format!(" (p99 {:.2} ms)", v.ms(0.99))).unwrap_or_default()
            ),
            target: "view ≥ 5 × composition",
            met: Some(ratio >= 5.0),
            server_cpu_percent: cpu,
            server_rss_mib: rss,
            figures: json!({"latency_ms": latency, "composition_rps": composed.rps(), "composition_p99_ms": composed.ms(0.99),
                "composition_errors": composed.errors, "view_rps": view_rps_now, "ratio": ratio}),
        });
        if latency == 5 {
            // One upstream down: what each side answers.
            let statement = upstreams.pop();
            drop(statement);
            let composed = load::run(&gateway.base, args.connections, secs, request, &anonymous).await;
            let view = load::run(server.base(), args.connections, secs, view_load.clone(), viewers).await;
            rows.push(Row {
                id: "P2",
                measure: "statement service down".into(),
                result: format!(
                    "composition: {} of {} requests failed ({:.0} req/s); view: {} of {} failed ({:.0} req/s)",
                    composed.errors,
                    composed.requests,
                    composed.rps(),
                    view.errors,
                    view.requests,
                    view.rps()
                ),
                target: "(report)",
                met: None,
                server_cpu_percent: None,
                server_rss_mib: None,
                figures: json!({"composition_errors": composed.errors, "composition_requests": composed.requests,
                    "view_errors": view.errors, "view_requests": view.requests}),
            });
        }
        drop(gateway);
        drop(upstreams);
    }
    Ok(rows)
}

/// P7: what a browser downloads to run a page. With `cargo leptos build --split` the bundle is the
/// main module (the framework's hydration runtime: all the home page loads) plus, per lazy island,
/// the chunks listed in `__wasm_split_manifest.json` next to it (each page has one island). The target applies to every page's total.
fn wasm_row(path: &Path) -> Row {
    let measure = format!("WASM per page, {} and its split chunks", path.display());
    match wasm_pages(path) {
        Ok(WasmPages { main, pages, all }) => {
            let kib = |b: usize| b as f64 / 1024.0;
            // Each page's total includes the main module; unsplit, the main module is all.
            let heaviest = pages.iter().map(|(_, gz)| *gz).max().unwrap_or(main.1);
            let mut result = format!("home page (main module) **{:.1} KiB** gzip", kib(main.1));
            for (route, gz) in &pages {
                result.push_str(&format!("; {route} {:.1} KiB", kib(*gz)));
            }
            result.push_str(&format!(" (all files {:.1} KiB gzip, {:.1} KiB raw)", kib(all.1), kib(all.0)));
            Row {
                id: "P7",
                measure,
                result,
                target: "≤ 200 KiB gzip",
                met: Some(kib(heaviest) <= 200.0),
                server_cpu_percent: None,
                server_rss_mib: None,
                figures: json!({
                    "main_raw_bytes": main.0,
                    "main_gzip_bytes": main.1,
                    "pages_gzip_bytes": pages.iter().map(|(route, gz)| (route.clone(), json!(gz))).collect::<serde_json::Map<_, _>>(),
                    "heaviest_page_gzip_bytes": heaviest,
                    "raw_bytes": all.0,
                    "gzip_bytes": all.1,
                }),
            }
        }
        Err(err) => Row {
            id: "P7",
            measure,
            result: format!("not measured ({err:#}): run `cargo leptos build --release --split` first"),
            target: "≤ 200 KiB gzip",
            met: None,
            server_cpu_percent: None,
            server_rss_mib: None,
            figures: Value::Null,
        },
    }
}

/// Bytes raw and gzipped.
type Sizes = (usize, usize);

struct WasmPages {
    main: Sizes,
    /// Per lazy island: gzip bytes of the main module plus the island's chunks.
    pages: Vec<(String, usize)>,
    all: Sizes,
}

fn wasm_pages(path: &Path) -> anyhow::Result<WasmPages> {
    use anyhow::Context;
    use std::io::Write;
    let sizes = |file: &Path| -> anyhow::Result<Sizes> {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&bytes)?;
        Ok((bytes.len(), gz.finish()?.len()))
    };
    let main = sizes(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let manifest: std::collections::BTreeMap<String, Vec<String>> =
        match std::fs::read_to_string(dir.join("__wasm_split_manifest.json")) {
            Ok(text) => serde_json::from_str(&text).context("reading __wasm_split_manifest.json")?,
            Err(_) => Default::default(), // not split: the main module is everything
        };
    let mut chunks = std::collections::BTreeMap::new();
    for name in manifest.values().flatten() {
        if !chunks.contains_key(name) {
            chunks.insert(name.clone(), sizes(&dir.join(format!("{name}.wasm")))?);
        }
    }
    let pages = manifest
        .iter()
        .map(|(split, needs)| {
            // `__StaffConsole_loader_<hash>` → `StaffConsole` (the island, one per page)
            let route = split.trim_start_matches('_').trim_end_matches(|c: char| c.is_ascii_digit());
            let route = route.trim_end_matches('_').trim_end_matches("_loader").to_string();
            (route, main.1 + needs.iter().map(|n| chunks[n].1).sum::<usize>())
        })
        .collect();
    let all = chunks.values().fold(main, |(r, g), (cr, cg)| (r + cr, g + cg));
    Ok(WasmPages { main, pages, all })
}

fn print_table(rows: &[Row], cores: usize) {
    println!("\nTally benchmarks on {cores} cores (server CPU in % of one core)\n");
    println!("| # | measure | result | target | met | server CPU | server RSS |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "–",
        };
        let cpu = r.server_cpu_percent.map(|c| format!("{c:.0}%")).unwrap_or_else(|| "–".into());
        let rss = r.server_rss_mib.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "–".into());
        println!("| {} | {} | {} | {} | {met} | {cpu} | {rss} |", r.id, r.measure, r.result, r.target);
    }
}
