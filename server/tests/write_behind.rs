//! SQLite: the projector writes the membership views behind, with its checkpoint, about
//! `TALLY_WRITE_BEHIND_MS` after each change (`projector::Runner`). What a user must not notice:
//! every read, search and push shows a change at once, a graceful stop stores what was held, and
//! a crash loses nothing.
//!
//! The tests hold the views for minutes (`--write-behind-ms`), so what the table holds while the
//! server runs is certain, not a race against the timer.

mod common;

use common::{args, free_port, spawn_with, sqlite_database, start_binary, wait_healthy};
use serde_json::{json, Value};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Row};
use std::path::Path;
use std::time::{Duration, Instant};

const HOLD_MS: u64 = 600_000;

/// The views' file, read straight (while the server runs, as another process could).
async fn views_file(database: &str) -> sqlx::SqliteConnection {
    SqliteConnectOptions::new()
        .filename(server::store::views_file(Path::new(database)))
        .read_only(true)
        .connect()
        .await
        .expect("views file opens")
}

/// The views' file opened for writing, as another process could (to lock it, or to add a
/// trigger).
async fn views_writer(database: &str) -> sqlx::SqliteConnection {
    SqliteConnectOptions::new()
        .filename(server::store::views_file(Path::new(database)))
        .connect()
        .await
        .expect("views file opens")
}

/// Wait until the table row holds `balance` for `member`, failing the test after `within`.
async fn wait_stored(database: &str, member: &str, balance: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while stored_balance(database, member).await != Some(balance) {
        assert!(Instant::now() < deadline, "the view never reached the table");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A member's balance as the table row holds it now.
async fn stored_balance(database: &str, member: &str) -> Option<u64> {
    let row = sqlx::query("SELECT view FROM membership_view WHERE member_id = ?")
        .bind(member)
        .fetch_optional(&mut views_file(database).await)
        .await
        .expect("view row read");
    row.map(|r| {
        let view: Value = serde_json::from_str(&r.get::<String, _>("view")).expect("stored view is JSON");
        view["points_balance"].as_u64().expect("balance")
    })
}

/// The text of the element marked `data-testid="{id}"` in server-rendered HTML.
fn test_id_text<'h>(html: &'h str, id: &str) -> Option<&'h str> {
    let rest = &html[html.find(&format!("data-testid=\"{id}\""))?..];
    let start = rest.find('>')? + 1;
    let end = start + rest[start..].find('<')?;
    Some(&rest[start..end])
}

#[tokio::test]
async fn views_held_in_memory_are_read_searched_and_stored_at_a_graceful_stop() {
    let (url, dir) = sqlite_database();
    let mut options = args(&url);
    options.write_behind_ms = HOLD_MS;
    let app = spawn_with(&options, dir.clone()).await;
    app.enroll("wb", "Write Behind", "wb@example.com").await;
    for points in [100, 20, 3] {
        assert_eq!(app.earn("wb", points).await.status, 200);
    }
    app.catch_up().await;

    // Held in memory, not in the table yet (the search row, written at once, is)...
    assert_eq!(stored_balance(&url, "wb").await, None, "the view is held in memory");
    // ...and yet every read shows them.
    assert_eq!(app.view("wb").await["points_balance"], 123);
    let found = app.get("/api/members?q=write").await.body;
    assert_eq!(found["items"][0]["member_id"], "wb");
    assert_eq!(found["items"][0]["points_balance"], 123, "the search takes the balance held in memory");
    let page = app.get("/members/wb").await;
    assert_eq!(page.status, 200);
    let html = page.body.as_str().unwrap_or_default();
    assert_eq!(test_id_text(html, "points-balance"), Some("123"), "the portal page shows the balance held in memory");

    app.stop().await;
    assert_eq!(stored_balance(&url, "wb").await, Some(123), "a graceful stop writes what was held");
    let app = spawn_with(&options, dir).await;
    assert_eq!(app.view("wb").await["points_balance"], 123);
}

#[tokio::test]
async fn changes_held_in_memory_build_on_each_other() {
    // Each member changes four times, none of them written: every change must start from the
    // view held in memory.
    let (url, dir) = sqlite_database();
    let mut options = args(&url);
    options.write_behind_ms = HOLD_MS;
    let app = spawn_with(&options, dir).await;
    for i in 0..30 {
        app.enroll(&format!("c{i}"), &format!("Cache {i}"), &format!("c{i}@example.com")).await;
    }
    app.catch_up().await;
    for round in 1..=3 {
        for i in 0..30 {
            assert_eq!(app.earn(&format!("c{i}"), round * 10 + i).await.status, 200);
        }
    }
    app.catch_up().await;
    for i in 0..30 {
        assert_eq!(stored_balance(&url, &format!("c{i}")).await, None);
        assert_eq!(app.view(&format!("c{i}")).await["points_balance"], 60 + 3 * i);
    }
}

async fn get_json(client: &reqwest::Client, url: String) -> Option<Value> {
    let response = client.get(url).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json().await.ok()
}

/// Wait until the server answers `GET {path}` with 200 and `ok` holds for the body.
async fn wait_for(client: &reqwest::Client, url: String, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(body) = get_json(client, url.clone()).await.filter(|b| ok(b)) {
            return body;
        }
        assert!(Instant::now() < deadline, "{url} never answered as expected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_kill_9_loses_no_view_held_in_memory() {
    let (db, _dir) = sqlite_database();
    let client = common::bearer_client(&common::create_key_cli(&db, "admin"));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = start_binary(&db, port, &[("TALLY_WRITE_BEHIND_MS", &HOLD_MS.to_string())]);
    wait_healthy(&client, &base).await;
    let enrolled = client
        .post(format!("{base}/api/members"))
        .json(&json!({"member_id": "k9", "name": "Kill Nine", "email": "k9@example.com"}))
        .send()
        .await
        .expect("enroll sent");
    assert_eq!(enrolled.status(), 201);
    let mut position = 0;
    for points in [40, 2] {
        let earned = client
            .post(format!("{base}/api/members/k9/points/earn"))
            .json(&json!({"points": points}))
            .send()
            .await
            .expect("earn sent");
        assert_eq!(earned.status(), 200);
        position = earned.json::<Value>().await.expect("answer")["position"].as_u64().expect("position");
    }
    let view = format!("{base}/api/members/k9?min_position={position}");
    wait_for(&client, view.clone(), |v| v["points_balance"] == 42).await;
    assert_eq!(stored_balance(&db, "k9").await, None, "the view is held in memory when the server dies");

    let (_server, base) = server.crash_and_restart(&db, &client).await;
    let view = format!("{base}/api/members/k9?min_position={position}");
    let shown = wait_for(&client, view, |v| v["points_balance"] == 42).await;
    assert_eq!(shown["recent_activity"].as_array().map(Vec::len), Some(3), "enrolled and two earns, once each");
}

#[tokio::test]
async fn a_running_server_writes_each_view_about_the_interval_after_it_changed() {
    let (url, dir) = sqlite_database();
    let mut options = args(&url);
    options.write_behind_ms = 200;
    let app = spawn_with(&options, dir).await;
    app.enroll("soon", "Written Soon", "soon@example.com").await;
    assert_eq!(app.earn("soon", 77).await.status, 200);
    app.catch_up().await;
    // Idle now: the consumers' safety-net poll (250 ms in tests) finds the view due.
    wait_stored(&url, "soon", 77, Duration::from_secs(10)).await;
    // With nothing left unwritten the stored checkpoint reaches the log's head.
    let head = app.state.store.head().await.expect("head");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = sqlx::query("SELECT position FROM checkpoints WHERE name = 'membership_view'")
            .fetch_one(&mut views_file(&url).await)
            .await
            .expect("checkpoint row");
        if row.get::<i64, _>("position") == head {
            break;
        }
        assert!(Instant::now() < deadline, "the stored checkpoint never reached the head");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How often the server counted a failure of `consumer` (its `/metrics`).
async fn failures(app: &common::TestApp, consumer: &str) -> u64 {
    let metrics = app.get("/metrics").await.body;
    let prefix = format!("tally_consumer_errors_total{{consumer=\"{consumer}\"}} ");
    (metrics.as_str().unwrap_or_default().lines())
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_neighbour_failing_beside_the_views_loses_none_of_the_views_held_in_memory() {
    // The views share a group (and its retries) with the search rows. While the search rows fail,
    // the runner commits each consumer on its own and, after each failure, drops what the group
    // keeps in memory: the views held unwritten must be applied again, not skipped.
    let (url, dir) = sqlite_database();
    let mut options = args(&url);
    options.write_behind_ms = HOLD_MS;
    let app = spawn_with(&options, dir.clone()).await;
    app.enroll("held", "Held Views", "held@example.com").await;
    assert_eq!(app.earn("held", 50).await.status, 200);
    app.catch_up().await;
    assert_eq!(stored_balance(&url, "held").await, None, "the view is held in memory");

    let mut views = views_writer(&url).await;
    sqlx::query("CREATE TRIGGER refuse_search BEFORE INSERT ON member_search BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
        .execute(&mut views)
        .await
        .expect("trigger");
    app.enroll("other", "Other Member", "other@example.com").await;
    // The first failure commits the group at once; later ones one consumer at a time.
    let deadline = Instant::now() + Duration::from_secs(30);
    while failures(&app, "member_search").await < 4 {
        assert!(Instant::now() < deadline, "the search rows never failed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("DROP TRIGGER refuse_search").execute(&mut views).await.expect("trigger dropped");
    app.catch_up().await;
    assert_eq!(app.view("held").await["points_balance"], 50);

    app.stop().await;
    assert_eq!(stored_balance(&url, "held").await, Some(50), "the held view is written at the stop");
    assert!(stored_balance(&url, "other").await.is_some(), "and so is the one applied meanwhile");
}

/// The next `view` message on `socket` within `wait`, if any.
async fn next_view(
    socket: &mut tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    wait: Duration,
) -> Option<Value> {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let message = tokio::time::timeout_at(deadline, socket.next()).await.ok()??.ok()?;
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            let message: Value = serde_json::from_str(&text).ok()?;
            if message["type"] == "view" {
                return Some(message);
            }
        }
    }
}

#[tokio::test]
async fn a_change_goes_out_before_the_views_due_with_it_are_written() {
    // Views due at every batch: each change's batch also writes them, in a transaction. While
    // another writer holds the views' file that transaction waits; the push must not.
    let (url, dir) = sqlite_database();
    let mut options = args(&url);
    options.write_behind_ms = 1;
    let app = spawn_with(&options, dir).await;
    app.enroll("due", "Due Views", "due@example.com").await;
    app.catch_up().await;
    let mut socket = common::ws_connect(&app, common::As::Key(&app.admin_token)).await.expect("ws connects");
    use futures::SinkExt;
    let subscribe = json!({"subscribe": "member:due"}).to_string();
    socket.send(tokio_tungstenite::tungstenite::Message::Text(subscribe.into())).await.expect("subscribed");
    let snapshot = next_view(&mut socket, Duration::from_secs(5)).await.expect("the current view");
    assert_eq!(snapshot["view"]["points_balance"], 0);

    let mut writer = views_writer(&url).await;
    sqlx::query("BEGIN IMMEDIATE").execute(&mut writer).await.expect("the views' file locked");
    let earned = app.earn("due", 40).await;
    assert_eq!(earned.status, 200, "{:?}", earned.body);
    // Well within the server's wait for the lock (10 s), and long after a push that did not wait.
    let pushed = next_view(&mut socket, Duration::from_secs(3)).await;
    let still_stored = stored_balance(&url, "due").await;
    sqlx::query("ROLLBACK").execute(&mut writer).await.expect("the views' file unlocked");
    let pushed = pushed.expect("the change was pushed while its write waited for the lock");
    assert_eq!(pushed["view"]["points_balance"], 40);
    assert_ne!(still_stored, Some(40), "the write did wait for the lock");

    // And the write follows once the file is free.
    wait_stored(&url, "due", 40, Duration::from_secs(15)).await;
}
