//! Online (blue/green) rebuilds: a projection is built again from the log in shadow tables while
//! the current ones serve, then swapped in. Under a read and write load no request fails, no read
//! finds a half-built table, no socket sees a position go back, and the views end equal to an
//! offline rebuild; a changed projection version rebuilds at start; a `kill -9` in the middle of
//! a build is followed by a build that starts again and ends equal. SQLite, and PostgreSQL with
//! `TALLY_TEST_STORE=postgres`.

mod common;

use common::TestApp;
use futures::StreamExt;
use serde_json::{json, Value};
use server::store::{PoolSizes, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Wait until the newest rebuild of `projection` is swapped in (panics if it fails or takes
/// longer than `within`); returns it.
async fn swapped(client: &reqwest::Client, base: &str, projection: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let reply = client.get(format!("{base}/api/projections/{projection}/rebuild")).send().await;
        if let Ok(reply) = reply {
            let build: Value = reply.json().await.unwrap_or(Value::Null);
            match build["state"].as_str() {
                Some("swapped") => return build,
                Some("failed") => panic!("the rebuild of {projection} failed: {build}"),
                _ => {}
            }
        }
        assert!(Instant::now() < deadline, "the rebuild of {projection} did not finish within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What the readers and sockets of the load saw.
#[derive(Default)]
struct Seen {
    reads: usize,
    failures: Vec<String>,
}

/// Reads `GET /api/members/{id}` and the member list until `stop`: every answer 200, every
/// member's position and balance never lower than before (only earns are sent), the list always
/// whole (a half-built search table would miss members).
async fn reader(client: reqwest::Client, base: String, members: Vec<String>, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut last: HashMap<String, (i64, i64)> = HashMap::new();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = &members[n % members.len()];
        match client.get(format!("{base}/api/members/{id}")).send().await {
            Ok(r) if r.status() == 200 => {
                let view: Value = r.json().await.unwrap_or(Value::Null);
                let now = (view["position"].as_i64().unwrap_or(-1), view["points_balance"].as_i64().unwrap_or(-1));
                if let Some(before) = last.get(id) {
                    if now.0 < before.0 || now.1 < before.1 {
                        seen.failures.push(format!("{id} went back from {before:?} to {now:?}"));
                    }
                }
                last.insert(id.clone(), now);
            }
            Ok(r) => seen.failures.push(format!("GET {id}: {}", r.status())),
            Err(err) => seen.failures.push(format!("GET {id}: {err}")),
        }
        if n.is_multiple_of(10) {
            match client.get(format!("{base}/api/members?limit=100")).send().await {
                Ok(r) if r.status() == 200 => {
                    let page: Value = r.json().await.unwrap_or(Value::Null);
                    let listed = page["items"].as_array().map_or(0, Vec::len);
                    if listed != members.len().min(100) {
                        seen.failures.push(format!("the member list had {listed} members"));
                    }
                }
                Ok(r) => seen.failures.push(format!("GET /api/members: {}", r.status())),
                Err(err) => seen.failures.push(format!("GET /api/members: {err}")),
            }
        }
        seen.reads += 1;
    }
    seen
}

/// Earns of 1 point over `members` until `stop`: every one answered 200.
async fn writer(client: reqwest::Client, base: String, members: Vec<String>, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let id = &members[(n * 7) % members.len()];
        let url = format!("{base}/api/members/{id}/points/earn");
        match client.post(url).json(&json!({"points": 1, "reason": format!("load {n}")})).send().await {
            Ok(r) if r.status() == 200 => seen.reads += 1,
            Ok(r) => seen.failures.push(format!("earn {id}: {}", r.status())),
            Err(err) => seen.failures.push(format!("earn {id}: {err}")),
        }
    }
    seen
}

/// Every frame a socket subscribed to `topics` receives until `stop`: positions per topic never
/// go back. Returns how many views it received.
async fn watcher(mut socket: common::WebSocket, topics: Vec<String>, stop: Arc<AtomicBool>) -> Seen {
    for topic in &topics {
        common::send_json(&mut socket, json!({"subscribe": topic})).await;
    }
    let mut seen = Seen::default();
    let mut last: HashMap<String, i64> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::from_millis(100), socket.next()).await
        else {
            continue;
        };
        let frame: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if frame["type"] != "view" {
            continue;
        }
        let (topic, position) =
            (frame["topic"].as_str().unwrap_or_default().to_string(), frame["position"].as_i64().unwrap_or(-1));
        if let Some(before) = last.get(&topic) {
            if position < *before {
                seen.failures.push(format!("{topic} went back from {before} to {position}"));
            }
        }
        last.insert(topic, position);
        seen.reads += 1;
    }
    seen
}

/// Stop the app, then compare every stored view and search row with what an offline rebuild
/// writes on the same database.
async fn equal_to_an_offline_rebuild(app: TestApp) {
    let url = app.database_url.clone();
    let files = app.keep_files();
    app.stop().await;
    let store = Store::open(&url, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let online = common::audit::view_rows(&store).await;
    server::rebuild::rebuild(&store).await.expect("offline rebuild");
    let offline = common::audit::view_rows(&store).await;
    assert_eq!(online.len(), offline.len(), "rows after the online rebuild and after an offline one");
    assert!(online == offline, "the online rebuild's rows differ from an offline rebuild's");
    drop(files);
}

#[tokio::test]
async fn an_online_rebuild_under_load_fails_no_request_never_goes_back_and_ends_equal_to_an_offline_one() {
    let app = common::spawn_app().await;
    let members = common::audit::enroll(&app.client, &app.base, "ol", 40).await;
    let sent = common::audit::earns(&app.client, std::slice::from_ref(&app.base), &members, "seed", 400, 8).await;
    assert!(sent.iter().all(|(_, status)| *status == 200));
    app.catch_up().await;

    let stop = Arc::new(AtomicBool::new(false));
    let socket = common::ws_connect(&app, common::As::Key(&app.admin_token)).await.expect("socket");
    let topics: Vec<String> = members.iter().take(5).map(|id| format!("member:{id}")).collect();
    let watching = tokio::spawn(watcher(socket, topics, stop.clone()));
    let readers: Vec<_> = (0..2)
        .map(|_| tokio::spawn(reader(app.client.clone(), app.base.clone(), members.clone(), stop.clone())))
        .collect();
    let writing = tokio::spawn(writer(app.client.clone(), app.base.clone(), members.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Both projections, one after the other, while the load goes on.
    for projection in ["membership_view", "member_search"] {
        let asked = app.post(&format!("/api/projections/{projection}/rebuild"), json!({})).await;
        assert_eq!(asked.status, 202, "{:?}", asked.body);
        assert_eq!(asked.body["state"], "requested");
        let again = app.post(&format!("/api/projections/{projection}/rebuild"), json!({})).await;
        assert_eq!((again.status, again.code()), (409, "rebuild_in_progress"), "{:?}", again.body);
        let build = swapped(&app.client, &app.base, projection, Duration::from_secs(60)).await;
        assert_eq!(build["id"], asked.body["id"]);
        assert_eq!(build["version"], 1);
        assert!(build["position"].as_u64().unwrap_or(0) >= 440, "{build}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut failures = Vec::new();
    let written = writing.await.expect("writer");
    assert!(written.reads > 0, "the writer sent earns during the rebuilds");
    failures.extend(written.failures);
    for reading in readers {
        let read = reading.await.expect("reader");
        assert!(read.reads > 0, "the readers read during the rebuilds");
        failures.extend(read.failures);
    }
    let watched = watching.await.expect("socket");
    assert!(watched.reads > 0, "the socket received views during the rebuilds");
    failures.extend(watched.failures);
    assert!(failures.is_empty(), "{} failures, the first: {:?}", failures.len(), &failures[..failures.len().min(5)]);

    let refused = app.post("/api/projections/loyalty_policy/rebuild", json!({})).await;
    assert_eq!((refused.status, refused.code()), (409, "not_rebuildable"));
    let unknown = app.post("/api/projections/nothing/rebuild", json!({})).await;
    assert_eq!((unknown.status, unknown.code()), (404, "not_found"));
    app.catch_up().await;
    equal_to_an_offline_rebuild(app).await;
}

#[tokio::test]
async fn a_projection_whose_version_changed_is_rebuilt_online_at_start() {
    let app = common::spawn_app().await;
    let members = common::audit::enroll(&app.client, &app.base, "vc", 10).await;
    common::audit::earns(&app.client, std::slice::from_ref(&app.base), &members, "v", 50, 4).await;
    app.catch_up().await;
    let (url, dir) = (app.database_url.clone(), app.keep_files());
    app.stop().await;
    {
        // The table was built by an older version of the projection's code.
        let store = Store::open(&url, &PoolSizes { read: 1, write: 1 }, true).await.expect("store");
        let mut conn = store.views.acquire().await.expect("views connection");
        sqlx::query("UPDATE projection_versions SET version = 0 WHERE name = 'membership_view'")
            .execute(&mut *conn)
            .await
            .expect("older version");
    }
    let app = common::spawn_on(&url, dir).await;
    let build = swapped(&app.client, &app.base, "membership_view", Duration::from_secs(60)).await;
    assert_eq!(build["actor"], "system");
    assert!(build["reason"].as_str().unwrap_or_default().contains("from 0 to 1"), "{build}");
    let none = app.get("/api/projections/member_search/rebuild").await;
    assert_eq!(none.status, 404, "the search projection's version did not change: {:?}", none.body);
    assert_eq!(app.earn(&members[0], 5).await.status, 200);
    assert_eq!(app.view(&members[0]).await["points_balance"].as_i64().map(|b| b > 5), Some(true));

    // `tally rebuild --online` asks the running server and follows the build to its swap; without
    // a key it says what it needs.
    let cli = |key: Option<String>| {
        let base = app.base.clone();
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
            command
                .args(["rebuild", "--online", "--projection", "member_search", "--url", &base])
                .env_remove("TALLY_API_KEY");
            if let Some(key) = key {
                command.env("TALLY_API_KEY", key);
            }
            command.output().expect("tally rebuild runs")
        })
    };
    let refused = cli(None).await.expect("ran");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs an admin key"), "{refused:?}");
    let done = cli(Some(app.admin_token.clone())).await.expect("ran");
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{done:?}");
    assert!(stdout.contains("member_search: rebuilt from") && stdout.contains("swapped in"), "{stdout}");
    assert_eq!(app.get("/api/projections/member_search/rebuild").await.body["state"], "swapped");
    app.catch_up().await;
    equal_to_an_offline_rebuild(app).await;
}

#[tokio::test]
async fn a_build_cut_short_by_kill_9_starts_again_at_restart_and_ends_equal() {
    let (db, dir) = common::fresh_database().await;
    // Enough events that a build takes a while: seeded through the real command path.
    let seeded = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["seed", "--database-url", &db, "--members", "2000", "--purchases", "4000"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("tally seed runs");
    assert!(seeded.success());
    let token = common::create_key_cli(&db, "admin");
    let client = common::bearer_client(&token);
    let port = common::free_port();
    let mut base = format!("http://127.0.0.1:{port}");
    let mut server = common::start_binary(&db, port, &[]);
    common::wait_healthy(&client, &base).await;

    // Ask for a build, kill the server while it is under way, and see the build start again
    // after the restart (asked again should the kill land just after a swap).
    let mut restarted = None;
    for _ in 0..5 {
        let asked = client.post(format!("{base}/api/projections/membership_view/rebuild")).send().await.expect("asked");
        assert_eq!(asked.status(), 202);
        let id = asked.json::<Value>().await.expect("json")["id"].as_u64();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let build: Value = client
                .get(format!("{base}/api/projections/membership_view/rebuild"))
                .send()
                .await
                .expect("progress")
                .json()
                .await
                .expect("json");
            assert!(Instant::now() < deadline, "the build never started: {build}");
            if build["state"] != "requested" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (server, base) = server.crash_and_restart(&db, &client).await;
        let build = swapped(&client, &base, "membership_view", Duration::from_secs(120)).await;
        assert_eq!(build["id"].as_u64(), id, "the build asked for is the one that ends");
        if build["restarts"] == 1 {
            restarted = Some(build);
            break;
        }
    }
    let build = restarted.expect("a kill -9 landed during a build, which started again after the restart");
    assert!(build["position"].as_u64().unwrap_or(0) > 10_000, "{build}");

    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::projections_caught_up(&client, &base).await {
        assert!(Instant::now() < deadline, "the consumers did not catch up after the swap");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::terminate(server);
    let store = Store::open(&db, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let online = common::audit::view_rows(&store).await;
    server::rebuild::rebuild(&store).await.expect("offline rebuild");
    assert!(online == common::audit::view_rows(&store).await, "the views differ from an offline rebuild's");
    drop(dir);
}
