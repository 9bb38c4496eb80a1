//! Change data capture: a system of record's own PostgreSQL database (plain SQL on a database of
//! its own, on the local server) feeds Tally through a replication slot; Debezium change events
//! posted over HTTP do the same for other databases. Exactly once: a reader killed with `kill -9`
//! again and again, and envelopes sent twice, leave every source change applied once.

mod common;

use common::{As, TestApp};
use serde_json::{json, Value};
use server::store::{PoolSizes, Store};
use sqlx::{Connection, PgConnection};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn admin_url() -> String {
    std::env::var("TALLY_TEST_POSTGRES").ok().filter(|u| !u.is_empty()).unwrap_or_else(|| ADMIN_URL.into())
}

/// A system of record: a database of its own with customers and orders tables. Its slot and the
/// database are dropped when the test ends, passed or not (a slot left behind would keep the
/// server's WAL for ever).
struct Source {
    url: String,
    name: String,
    slot: String,
}

impl Source {
    /// None (the test is skipped) when no PostgreSQL answers and `CI` is unset.
    async fn create(identity_full: bool) -> Option<Source> {
        let admin = admin_url();
        let mut conn = match PgConnection::connect(&admin).await {
            Ok(conn) => conn,
            Err(err) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: no PostgreSQL at {admin} ({err})");
                return None;
            }
            Err(err) => panic!("CI needs PostgreSQL at {admin}: {err}"),
        };
        let id = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("tally_t_src_{}", &id[..12]);
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create the source database");
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(admin);
        let source = Source { url: format!("{base}/{name}"), slot: format!("tally_t_{}", &id[..12]), name };
        let mut db = source.connect().await;
        for sql in [
            "CREATE TABLE customers (id serial PRIMARY KEY, full_name text NOT NULL, email text NOT NULL, \
             status text NOT NULL DEFAULT 'active', phone text)",
            "CREATE TABLE orders (id serial PRIMARY KEY, customer_id int, total_cents int NOT NULL)",
        ] {
            sqlx::query(sql).execute(&mut db).await.expect("source schema");
        }
        if identity_full {
            sqlx::query("ALTER TABLE customers REPLICA IDENTITY FULL").execute(&mut db).await.expect("identity");
        }
        Some(source)
    }

    async fn connect(&self) -> PgConnection {
        PgConnection::connect(&self.url).await.expect("source reachable")
    }

    /// The CDC configuration that reads this source as `crm` (`extra`: more settings of the source).
    fn config(&self, dir: &std::path::Path) -> std::path::PathBuf {
        self.config_with(dir, "")
    }

    fn config_with(&self, dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
        let text = format!(
            r#"
[[source]]
name = "crm"
postgres_url = "{url}"
slot = "{slot}"
poll_ms = 5
{extra}

[source.customers]
table = "customers"
member_id = "crm-{{}}"
name = "full_name"
email = "email"
status = "status"
suspended = ["blocked"]

[source.orders]
table = "orders"
transaction_id = "order-{{}}"
customer = "customer_id"
amount_cents = "total_cents"
"#,
            url = self.url,
            slot = self.slot,
        );
        let path = dir.join("cdc.toml");
        std::fs::write(&path, text).expect("config written");
        path
    }

    /// A server on a fresh SQLite file with this source configured (`extra`: more settings of the
    /// source); and the configuration's path.
    async fn serve(&self, extra: &str) -> (TestApp, std::path::PathBuf) {
        let (url, dir) = common::sqlite_database();
        let config = self.config_with(dir.path(), extra);
        let mut args = common::args(&url);
        args.cdc_config = Some(config.clone());
        (common::spawn_with(&args, dir).await, config)
    }

    /// The slot, made before any reader runs, so that it holds everything written from now on.
    async fn create_slot(&self, db: &mut PgConnection) {
        sqlx::query("SELECT 1 FROM pg_create_logical_replication_slot($1, 'test_decoding')")
            .bind(&self.slot)
            .execute(db)
            .await
            .expect("slot");
    }

    async fn exec(&self, db: &mut PgConnection, sql: &str) {
        sqlx::query(sql).execute(db).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        let (admin, name, slot) = (admin_url(), self.name.clone(), self.slot.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async move {
                let Ok(mut conn) = PgConnection::connect(&admin).await else { return };
                // A reader may still hold the slot for a moment after its server stopped.
                for _ in 0..50 {
                    let dropped = sqlx::query(
                        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                    )
                    .bind(&slot)
                    .execute(&mut conn)
                    .await;
                    if dropped.is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await;
            });
        });
        let _ = cleanup.join();
    }
}

/// `GET /api/cdc`'s entry for `source`.
async fn cdc_status(app: &TestApp, source: &str) -> Value {
    let r = app.get("/api/cdc").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body.as_array().and_then(|s| s.iter().find(|s| s["name"] == source).cloned()).unwrap_or(Value::Null)
}

/// Poll `check` until it holds (panics after `within`, naming `what`).
async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} did not happen within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait until the server's reader of `crm` has taken its slot.
async fn reading(app: &TestApp) {
    eventually(Duration::from_secs(20), "the reader takes its slot", || async {
        cdc_status(app, "crm").await["state"] == "reading"
    })
    .await;
}

/// The member's view as served (404 until it exists).
async fn served(app: &TestApp, id: &str) -> Option<Value> {
    let r = app.get(&format!("/api/members/{id}")).await;
    (r.status == 200).then_some(r.body)
}

/// Every event the source caused, by the source position (and command) it came from.
fn by_position(events: &[server::store::StoredEvent], actor: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for event in events.iter().filter(|e| e.metadata["actor"] == actor) {
        let cause = event.metadata["causation_id"].as_str().unwrap_or("none").to_string();
        *counts.entry(cause).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_system_of_record_feeds_the_views_the_page_and_a_subscribed_socket() {
    let Some(source) = Source::create(true).await else { return };
    let (app, _) = source.serve("").await;
    reading(&app).await;

    let mut db = source.connect().await;
    source.exec(&mut db, "BEGIN").await;
    source.exec(&mut db, "INSERT INTO customers (full_name, email) VALUES ('Ann Lee', 'ann@example.com'), ('Bob Ray', 'bob@example.com'), ('Cy Hu', 'cy@example.com')").await;
    source.exec(&mut db, "COMMIT").await;
    source
        .exec(&mut db, "INSERT INTO orders (customer_id, total_cents) VALUES (1, 2500), (2, 990), (NULL, 1000)")
        .await;
    eventually(Duration::from_secs(20), "the orders earn points", || async {
        served(&app, "crm-1").await.is_some_and(|v| v["points_balance"].as_i64() > Some(0))
            && served(&app, "crm-2").await.is_some_and(|v| v["points_balance"].as_i64() > Some(0))
    })
    .await;
    let ann = served(&app, "crm-1").await.expect("Ann is a member");
    assert_eq!((ann["name"].as_str(), ann["email"].as_str()), (Some("Ann Lee"), Some("ann@example.com")));

    // A subscribed socket sees a profile change made in the source.
    let mut socket = common::ws_connect(&app, As::Key(&app.admin_token)).await.expect("socket");
    let first = common::subscribed(&mut socket, "member:crm-2").await;
    assert_eq!(first["view"]["name"], "Bob Ray", "{first}");
    source.exec(&mut db, "UPDATE customers SET full_name = 'Robert Ray' WHERE id = 2").await;
    let pushed = loop {
        let frame = common::next_json(&mut socket).await;
        if frame["view"]["name"] == "Robert Ray" {
            break frame;
        }
    };
    assert_eq!(pushed["topic"], "member:crm-2");

    // An update of a column Tally does not map appends nothing; the status column suspends and
    // reactivates.
    let ann_version = served(&app, "crm-1").await.expect("Ann")["version"].clone();
    source.exec(&mut db, "UPDATE customers SET phone = '555-0100' WHERE id = 1").await;
    source.exec(&mut db, "UPDATE customers SET status = 'blocked' WHERE id = 3").await;
    eventually(Duration::from_secs(20), "Cy is suspended", || async {
        served(&app, "crm-3").await.is_some_and(|v| v["status"] == "suspended")
    })
    .await;
    assert_eq!(served(&app, "crm-1").await.expect("Ann")["version"], ann_version, "the phone number changed nothing");
    source.exec(&mut db, "UPDATE customers SET status = 'active' WHERE id = 3").await;
    eventually(Duration::from_secs(20), "Cy is active again", || async {
        served(&app, "crm-3").await.is_some_and(|v| v["status"] == "active")
    })
    .await;

    // The portal page shows the member as the source has them now.
    let page = app.client.get(format!("{}/members/crm-2", app.base)).send().await.expect("page");
    assert_eq!(page.status(), 200);
    assert!(page.text().await.expect("html").contains("Robert Ray"), "the page shows the new name");

    // Every event names the source; each source change appended its events once.
    let events = app.state.store.read_all(0, i64::MAX).await.expect("events");
    let counts = by_position(&events, "cdc:crm");
    assert_eq!(counts.len(), 3 + 3 + 1 + 2, "3 enrolments, 3 purchases, a rename, a suspension, a reactivation");
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");

    let status = cdc_status(&app, "crm").await;
    assert_eq!(status["kind"], "postgres");
    assert_eq!(status["slot"], source.slot.as_str());
    assert_eq!(status["rows"]["applied"], 9, "{status}");
    assert!(status["rows"]["ignored"].as_u64() >= Some(1), "the phone number: {status}");
    assert!(status["lag_bytes"].is_i64(), "{status}");
    app.stop().await;
}

#[tokio::test]
async fn a_source_that_cannot_be_read_says_how_to_fix_it_and_is_read_once_fixed() {
    let Some(source) = Source::create(false).await else { return };
    let (app, _) = source.serve("").await;
    eventually(Duration::from_secs(20), "the reader reports the problem", || async {
        let status = cdc_status(&app, "crm").await;
        status["state"] == "failing"
            && status["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("ALTER TABLE public.customers REPLICA IDENTITY FULL"))
    })
    .await;
    let (_, health) = common::audit::health(&app.client, &app.base).await;
    let part = health["parts"].as_array().and_then(|p| p.iter().find(|p| p["name"] == "cdc source crm").cloned());
    assert_eq!(part.map(|p| p["state"].clone()), Some(json!("failing")), "{health}");

    let mut db = source.connect().await;
    source.exec(&mut db, "ALTER TABLE customers REPLICA IDENTITY FULL").await;
    eventually(Duration::from_secs(30), "the reader reads once the table is fixed", || async {
        cdc_status(&app, "crm").await["state"] == "reading"
    })
    .await;
    source.exec(&mut db, "INSERT INTO customers (full_name, email) VALUES ('Di Fox', 'di@example.com')").await;
    eventually(Duration::from_secs(20), "Di is enrolled", || async { served(&app, "crm-1").await.is_some() }).await;
    app.stop().await;
}

/// The source changes (commands) the SQLite event store at `path` holds, read-only beside its writer.
async fn causes_in_file(path: &str) -> usize {
    use sqlx::sqlite::SqliteConnectOptions;
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let Ok(mut conn) = sqlx::SqliteConnection::connect_with(&options).await else { return 0 };
    sqlx::query_scalar::<_, i64>(
        "SELECT count(DISTINCT json_extract(metadata, '$.causation_id')) FROM events \
         WHERE json_extract(metadata, '$.actor') = 'cdc:crm'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap_or(0) as usize
}

/// `tally cdc` on `db`, reading the configuration at `config`.
fn start_reader(db: &str, config: &std::path::Path) -> common::Binary {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["cdc", "--database-url", db, "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tally cdc starts");
    common::Binary(child)
}

#[tokio::test]
async fn a_reader_killed_again_and_again_applies_every_source_change_exactly_once() {
    let Some(source) = Source::create(true).await else { return };
    let (url, dir) = common::sqlite_database();
    let config = source.config(dir.path());
    let mut db = source.connect().await;
    source.create_slot(&mut db).await;
    // The event store's schema, before any reader races to make it.
    server::seed::migrate(&server::config::DatabaseArgs {
        database_url: url.clone(),
        durable: true,
        read_pool: 1,
        write_pool: 1,
    })
    .await
    .expect("migrate");

    // The system of record at work: customers in small transactions, renamed, ordering.
    const CUSTOMERS: usize = 240;
    let writer = {
        let mut db = source.connect().await;
        tokio::spawn(async move {
            let mut orders = 0;
            for round in 0..(CUSTOMERS / 4) {
                let mut tx = db.begin().await.expect("begin");
                for i in 0..4 {
                    let n = round * 4 + i + 1;
                    sqlx::query("INSERT INTO customers (full_name, email) VALUES ($1, $2)")
                        .bind(format!("Customer {n}"))
                        .bind(format!("c{n}@example.com"))
                        .execute(&mut *tx)
                        .await
                        .expect("insert customer");
                }
                sqlx::query("INSERT INTO orders (customer_id, total_cents) VALUES ($1, 1500)")
                    .bind((round * 4 + 1) as i32)
                    .execute(&mut *tx)
                    .await
                    .expect("insert order");
                orders += 1;
                if round % 3 == 2 {
                    sqlx::query("UPDATE customers SET full_name = full_name || ' Jr' WHERE id = $1")
                        .bind((round * 4 - 3) as i32)
                        .execute(&mut *tx)
                        .await
                        .expect("rename");
                }
                tx.commit().await.expect("commit");
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            orders
        })
    };

    // kill -9 the reader at random moments while the source writes.
    let mut kills = 0;
    while !writer.is_finished() || kills < 8 {
        let reader = start_reader(&url, &config);
        tokio::time::sleep(Duration::from_millis(150 + rand::random::<u64>() % 400)).await;
        drop(reader); // SIGKILL
        kills += 1;
    }
    let orders = writer.await.expect("the source wrote");
    let renames = (0..CUSTOMERS / 4).filter(|r| r % 3 == 2).count();

    // One more reader, left to read everything, then stopped as an orchestrator would. (Read
    // from the store's file beside the reader: a second reader of the slot would make it wait.)
    let expected = CUSTOMERS + orders + renames;
    let reader = start_reader(&url, &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let applied = causes_in_file(&url).await;
        if applied >= expected {
            break;
        }
        assert!(Instant::now() < deadline, "the reader applied {applied} of {expected} source changes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    common::terminate(reader);

    // A server applies what the readers appended (and writes its views as it stops).
    let app = common::spawn_on(&url, std::sync::Arc::new(tempfile::tempdir().expect("dir"))).await;
    app.catch_up().await;
    app.stop().await;
    // Every source change appended its events exactly once…
    let store = Store::open(&url, &PoolSizes { read: 2, write: 1 }, true).await.expect("store");
    let events = store.read_all(0, i64::MAX).await.expect("events");
    let counts = by_position(&events, "cdc:crm");
    let duplicated: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(duplicated.is_empty(), "source changes applied more than once: {duplicated:?}");
    assert_eq!(counts.len(), expected, "every source change is in the log ({kills} kills)");
    // …and the views equal a rebuild of the log.
    common::audit::views_match_a_rebuild(&store, &events).await;
    store.write.close().await;
}

#[tokio::test]
async fn debezium_envelopes_sent_twice_are_applied_once() {
    let (url, dir) = common::sqlite_database();
    let config = dir.path().join("cdc.toml");
    std::fs::write(
        &config,
        r#"
[[source]]
name = "shop"

[source.customers]
table = "inventory.customers"
member_id = "shop-{}"
name = "first_name"
email = "email"
status = "state"

[source.orders]
table = "inventory.orders"
id = "order_number"
transaction_id = "shop-order-{}"
customer = "purchaser"
amount_cents = "total_cents"
currency = "currency"
"#,
    )
    .expect("config");
    let mut args = common::args(&url);
    args.cdc_config = Some(config);
    let app = common::spawn_with(&args, dir).await;
    let envelopes: Value =
        serde_json::from_str(include_str!("fixtures/debezium/shop.json")).expect("the recorded envelopes");

    // Only a cdc key (or an admin) may post change events.
    let post = |client: reqwest::Client, source: &str, body: Value| {
        let url = format!("{}/api/cdc/{source}", app.base);
        async move { common::Reply::of(client.post(url).json(&body).send().await.expect("answer")).await }
    };
    assert_eq!(post(reqwest::Client::new(), "shop", envelopes.clone()).await.status, 401);
    let channel = common::bearer_client(&app.key("channel").await);
    assert_eq!(post(channel, "shop", envelopes.clone()).await.status, 403);
    let feed = common::bearer_client(&app.key("cdc").await);
    let unknown = post(feed.clone(), "erp", envelopes.clone()).await;
    assert_eq!((unknown.status, unknown.code()), (404, "not_found"));
    let head = app.state.store.head().await.expect("head");
    let mut broken = envelopes.clone();
    broken[3]["source"] = json!({"table": "customers"});
    let refused = post(feed.clone(), "shop", broken).await;
    assert_eq!((refused.status, refused.code()), (400, "invalid_request"), "{:?}", refused.body);
    assert!(refused.body["error"]["message"].as_str().is_some_and(|m| m.contains("event 3")), "{:?}", refused.body);
    assert_eq!(app.state.store.head().await.expect("head"), head, "a malformed batch applies nothing");

    let first = post(feed.clone(), "shop", envelopes.clone()).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["changes"], 7, "the tombstone is left out: {:?}", first.body);
    assert_eq!(first.body["rows"]["applied"], 6, "{:?}", first.body);
    assert_eq!(first.body["rows"]["ignored"], 1, "an update that changed nothing mapped: {:?}", first.body);
    app.catch_up().await;
    let head = app.state.store.head().await.expect("head");
    let again = post(feed, "shop", envelopes).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!((again.body["rows"]["applied"].as_u64(), again.body["rows"]["replayed"].as_u64()), (Some(0), Some(6)));
    app.catch_up().await;
    assert_eq!(app.state.store.head().await.expect("head"), head, "sent twice, appended once");

    let sally = app.view("shop-1001").await;
    assert_eq!(sally["name"], "Sally Marie");
    assert!(sally["points_balance"].as_i64() > Some(0), "her order earned points: {sally}");
    assert_eq!(app.view("shop-1002").await["status"], "suspended", "George was deleted");
    assert_eq!(app.view("shop-1003").await["email"], "ed@walker.com");
    let events = app.state.store.read_all(0, i64::MAX).await.expect("events");
    assert!(by_position(&events, "cdc:shop").values().all(|n| *n == 1));
    let status = cdc_status(&app, "shop").await;
    assert_eq!((status["kind"].as_str(), status["rows"]["replayed"].as_u64()), (Some("debezium"), Some(6)), "{status}");
    app.stop().await;
}

#[tokio::test]
async fn a_slot_holding_back_too_much_wal_warns_and_drop_slot_removes_it() {
    let Some(source) = Source::create(true).await else { return };
    let (app, config) = source.serve("max_retained_wal_mb = 0").await;
    let _config_kept = app.keep_files(); // read by `tally cdc drop-slot` after the server stops
    reading(&app).await;
    let mut db = source.connect().await;
    source.exec(&mut db, "INSERT INTO customers (full_name, email) VALUES ('Eve Ng', 'eve@example.com')").await;
    eventually(Duration::from_secs(20), "the retained WAL passes the limit", || async {
        cdc_status(&app, "crm").await["warning"].as_str().is_some_and(|w| w.contains("holds back"))
    })
    .await;
    // A warning, not an outage: the node still answers 200 and names it.
    let (status, health) = common::audit::health(&app.client, &app.base).await;
    assert_eq!(status, 200, "{health}");
    let warnings = health["warnings"].as_array().cloned().unwrap_or_default();
    assert!(warnings.iter().any(|w| w.as_str().is_some_and(|w| w.contains(&source.slot))), "{health}");
    // With nothing to read in its own database, the slot still moves on (the reader's heartbeat):
    // the WAL other databases write is not kept for it.
    let mut other = PgConnection::connect(&admin_url()).await.expect("admin connection");
    let table = format!("{}_wal", source.name);
    sqlx::query(&format!("CREATE TABLE {table} (n int)")).execute(&mut other).await.expect("WAL elsewhere");
    sqlx::query(&format!("DROP TABLE {table}")).execute(&mut other).await.expect("WAL elsewhere");
    let written: String =
        sqlx::query_scalar("SELECT pg_current_wal_lsn()::text").fetch_one(&mut other).await.expect("lsn");
    eventually(Duration::from_secs(10), "the idle slot moves past the other database's WAL", || async {
        let moved: Option<bool> = sqlx::query_scalar(
            "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots WHERE slot_name = $2",
        )
        .bind(&written)
        .bind(&source.slot)
        .fetch_optional(&mut source.connect().await)
        .await
        .expect("slot");
        moved == Some(true)
    })
    .await;
    let metrics =
        app.client.get(format!("{}/metrics", app.base)).send().await.expect("metrics").text().await.expect("text");
    assert!(metrics.contains("tally_cdc_warning{source=\"crm\"} 1"), "the warning's metric");
    app.stop().await;

    assert_eq!(slots(&mut db, &source.slot).await, 1);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["cdc", "drop-slot", "--source", "crm", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally cdc drop-slot runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("dropped the slot"));
    assert_eq!(slots(&mut db, &source.slot).await, 0, "the source keeps no WAL for Tally any more");
}

/// How many replication slots are named `slot`.
async fn slots(db: &mut PgConnection, slot: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1")
        .bind(slot)
        .fetch_one(db)
        .await
        .expect("slots")
}

/// The source changes (commands) a PostgreSQL event store holds.
async fn causes_in_postgres(url: &str) -> usize {
    let Ok(mut conn) = PgConnection::connect(url).await else { return 0 };
    sqlx::query_scalar::<_, i64>(
        "SELECT count(DISTINCT metadata::jsonb->>'causation_id') FROM events WHERE metadata::jsonb->>'actor' = 'cdc:crm'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap_or(0) as usize
}

#[tokio::test]
async fn two_readers_on_a_postgresql_store_take_turns_and_apply_each_change_once() {
    let Some(source) = Source::create(true).await else { return };
    let Some(store_url) = common::postgres_database().await else { return };
    let dir = tempfile::tempdir().expect("dir");
    let config = source.config(dir.path());
    let db_args =
        server::config::DatabaseArgs { database_url: store_url.clone(), durable: true, read_pool: 1, write_pool: 1 };
    server::seed::migrate(&db_args).await.expect("migrate");
    let mut db = source.connect().await;
    source.create_slot(&mut db).await;
    let insert = |from: i32, to: i32| {
        sqlx::query(
            "INSERT INTO customers (full_name, email) SELECT 'Customer ' || g, 'c' || g || '@example.com' \
             FROM generate_series($1::int, $2::int) g",
        )
        .bind(from)
        .bind(to)
    };
    let applied = |n: usize| {
        let url = store_url.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let done = causes_in_postgres(&url).await;
                if done >= n {
                    return;
                }
                assert!(Instant::now() < deadline, "{done} of {n} source changes applied");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // Two `tally cdc` processes on one PostgreSQL store: one reads, the other waits on standby.
    let first = start_reader(&store_url, &config);
    let second = start_reader(&store_url, &config);
    insert(1, 100).execute(&mut db).await.expect("insert");
    applied(100).await;
    // Whichever held the slot, killing each in turn leaves the other to go on.
    drop(first);
    insert(101, 150).execute(&mut db).await.expect("insert");
    applied(150).await;
    let third = start_reader(&store_url, &config);
    drop(second);
    insert(151, 200).execute(&mut db).await.expect("insert");
    applied(200).await;
    common::terminate(third);

    let store = Store::open(&store_url, &PoolSizes { read: 1, write: 1 }, true).await.expect("store");
    let events = store.read_all(0, i64::MAX).await.expect("events");
    let counts = by_position(&events, "cdc:crm");
    assert_eq!(counts.len(), 200, "every customer enrolled");
    assert!(counts.values().all(|n| *n == 1), "each change applied once: {counts:?}");
    store.write.close().await;
}

#[tokio::test]
async fn a_slot_another_process_reads_is_still_watched_by_the_server() {
    let Some(source) = Source::create(true).await else { return };
    let mut db = source.connect().await;
    source.create_slot(&mut db).await;
    let (app, _) = source.serve("serve = false\nmax_retained_wal_mb = 0").await;
    // No reader here (a `tally cdc` elsewhere would read it): what the source writes waits in
    // the slot, and this node says so.
    source.exec(&mut db, "INSERT INTO customers (full_name, email) VALUES ('Flo Ito', 'flo@example.com')").await;
    eventually(Duration::from_secs(20), "the slot's lag and warning show", || async {
        let status = cdc_status(&app, "crm").await;
        status["state"] == "elsewhere"
            && status["lag_bytes"].as_i64() > Some(0)
            && status["warning"].as_str().is_some_and(|w| w.contains("holds back"))
    })
    .await;
    assert_eq!(served(&app, "crm-1").await, None, "the server does not read a slot it was told to leave");
    assert_eq!(slots(&mut db, &source.slot).await, 1);
    app.stop().await;
}
