//! Acknowledged means durable: after a restart (graceful, or kill -9 of the real binary) every
//! acknowledged command is in the views.

mod common;

use common::{free_port, spawn_app, start_binary, wait_healthy};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[tokio::test]
async fn after_a_restart_every_acknowledged_command_is_in_the_views() {
    let app = spawn_app().await;
    for i in 0..20 {
        app.enroll(&format!("m{i}"), &format!("Member {i}"), &format!("m{i}@example.com")).await;
        assert_eq!(app.earn(&format!("m{i}"), 100 + i).await.status, 200);
    }
    let app = app.restart().await;
    app.catch_up().await;
    for i in 0..20 {
        let view = app.view(&format!("m{i}")).await;
        assert_eq!(view["points_balance"], 100 + i);
    }
    assert_eq!(app.get("/api/members?limit=100").await.body["items"].as_array().map(Vec::len), Some(20));
}

#[tokio::test]
async fn a_kill_9_right_after_acknowledgement_loses_nothing() {
    let (db, _dir) = common::fresh_database().await;
    let client = common::bearer_client(&common::create_key_cli(&db, "admin"));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = start_binary(&db, port, &[]);
    wait_healthy(&client, &base).await;

    let post = |path: String, body: Value| {
        let client = client.clone();
        let url = format!("{base}{path}");
        async move { client.post(url).json(&body).send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(
        post("/api/members".into(), json!({"member_id": "k", "name": "K", "email": "k@example.com"})).await.ok(),
        Some(201)
    );
    // Fire concurrent earns; count only the acknowledged ones, then kill -9 at once.
    let earns = (0..200).map(|_| post("/api/members/k/points/earn".into(), json!({"points": 1})));
    let acknowledged = futures::future::join_all(earns).await.into_iter().filter(|r| matches!(r, Ok(200))).count();
    let (_server, base) = server.crash_and_restart(&db, &client).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view: Value =
            client.get(format!("{base}/api/members/k?min_position=1")).send().await.unwrap().json().await.unwrap();
        let balance = view["points_balance"].as_u64().unwrap_or(0) as usize;
        if balance >= acknowledged {
            assert_eq!(balance, acknowledged, "no more points than acknowledged commands");
            break;
        }
        assert!(Instant::now() < deadline, "only {balance} of {acknowledged} acknowledged earns survived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_full_rebuild_reproduces_every_view_byte_for_byte() {
    let app = spawn_app().await;
    for i in 0..8 {
        app.enroll(&format!("r{i}"), &format!("Rebuild {i}"), &format!("r{i}@example.com")).await;
        app.earn(&format!("r{i}"), 700 * (i + 1)).await;
    }
    app.post("/api/members/r1/points/redeem", json!({"points": 100, "reward": "mug"})).await;
    app.post("/api/members/r2/suspend", json!({})).await;
    app.send(reqwest::Method::PATCH, "/api/members/r3", Some(json!({"name": "Renamed"})), &[]).await;
    for t in 0..12 {
        app.post("/api/transactions", json!({"transaction_id": format!("rt{t}"), "member_id": format!("r{}", t % 8), "amount_cents": 1999, "currency": "EUR", "channel": "pos"})).await;
    }
    app.catch_up().await;
    let mut served: Vec<Value> = Vec::new();
    for i in 0..8 {
        served.push(app.view(&format!("r{i}")).await);
    }
    let url = app.database_url.clone();
    let files = app.keep_files();
    // Stopping stores what the projector held in memory (SQLite writes views behind).
    app.stop().await;

    let store = server::store::Store::open(&url, &server::store::PoolSizes { read: 2, write: 1 }, true).await.unwrap();
    let live = common::audit::view_rows(&store).await;
    assert_eq!(live.len(), 16);
    let stored: Vec<Value> = live[..8].iter().map(|(_, view)| serde_json::from_str(view).expect("JSON")).collect();
    assert_eq!(stored, served, "the table holds the views the server served");
    let report = server::rebuild::rebuild(&store).await.expect("rebuild");
    assert_eq!(report.members, 8);
    let rebuilt = common::audit::view_rows(&store).await;
    assert_eq!(rebuilt, live);
    drop(files);
}

/// On SQLite the views live in a file of their own, which cannot commit atomically with the log.
/// After a power cut it could hold views of events the log lost with its unsynced end. At start
/// the server finds a projection's checkpoint beyond the log's head and rebuilds every view from
/// the log; without that, the views would show points no event explains, and the next events
/// (which take the lost positions again) would be skipped as already applied.
#[tokio::test]
async fn views_ahead_of_the_log_are_rebuilt_from_it_at_start() {
    // SQLite whatever TALLY_TEST_STORE says: on PostgreSQL views and events commit together.
    let (url, dir) = common::sqlite_database();
    let app = common::spawn_on(&url, dir.clone()).await;
    app.enroll("p1", "Power Cut", "p1@example.com").await;
    assert_eq!(app.earn("p1", 250).await.status, 200);
    app.catch_up().await;
    let head = app.state.store.head().await.expect("head");
    app.stop().await;

    // What a power cut can leave: the views' file applied events past the log's end.
    let store = server::store::Store::open(&url, &server::store::PoolSizes { read: 2, write: 1 }, true)
        .await
        .expect("store opens");
    assert!(store.views_path().is_some_and(|p| p.exists()), "views in their own file");
    let changed = sqlx::query(
        "UPDATE membership_view SET view = replace(view, '\"points_balance\":250', '\"points_balance\":9250')",
    )
    .execute(&mut *store.views.acquire().await.expect("views connection"))
    .await
    .expect("update view");
    assert_eq!(changed.rows_affected(), 1);
    let mut views = store.views.acquire().await.expect("views connection");
    sqlx::query("UPDATE checkpoints SET position = $1").bind(head + 3).execute(&mut *views).await.expect("move");
    drop(views);
    store.write.close().await;
    store.views.close().await;
    store.read.close().await;
    // One process at a time on a SQLite file: this one lets go before the server starts.
    drop(store);

    let app = common::spawn_on(&url, dir).await;
    app.catch_up().await;
    assert_eq!(app.view("p1").await["points_balance"], 250, "the view again follows the log");
    let projections = app.get("/api/projections").await.body["items"].as_array().cloned().expect("items");
    let views = projections.iter().find(|p| p["name"] == "membership_view").expect("membership_view");
    assert_eq!(views["position"], head, "the checkpoint is back at the log's head");
    // And the next event, which takes the next position of the log, is applied.
    assert_eq!(app.earn("p1", 5).await.status, 200);
    app.catch_up().await;
    assert_eq!(app.view("p1").await["points_balance"], 255);
}

/// A SQLite file has one Tally process at a time: a second `tally serve`, `tally rebuild` or
/// `tally keys create` on a file a server holds exits at once, naming the file and the holder, and
/// the server goes on undisturbed.
#[tokio::test]
async fn a_second_process_on_a_sqlite_file_a_server_holds_is_refused_at_once() {
    let (db, _dir) = common::sqlite_database();
    let client = common::bearer_client(&common::create_key_cli(&db, "admin"));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let server = start_binary(&db, port, &[]);
    wait_healthy(&client, &base).await;
    let enrolled = client
        .post(format!("{base}/api/members"))
        .json(&json!({"member_id": "h", "name": "Held", "email": "h@example.com"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(enrolled.status(), 201);

    let second_port = free_port().to_string();
    let second_addr = format!("127.0.0.1:{second_port}");
    for args in [
        vec!["serve", "--addr", second_addr.as_str(), "--database-url", db.as_str()],
        vec!["rebuild", "--database-url", db.as_str()],
        vec!["keys", "create", "--database-url", db.as_str(), "--name", "late", "--role", "admin"],
    ] {
        let started = Instant::now();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .output()
            .expect("runs");
        assert!(!output.status.success(), "{args:?} must not run beside the server");
        let said = String::from_utf8_lossy(&output.stderr);
        assert!(said.contains(&db) && said.contains(&format!("pid {}", server.0.id())), "{args:?}: {said}");
        assert!(started.elapsed() < Duration::from_secs(5), "{args:?} waited instead of refusing");
    }
    // The server was not disturbed.
    let earned = client
        .post(format!("{base}/api/members/h/points/earn"))
        .json(&json!({"points": 5}))
        .send()
        .await
        .expect("sent");
    assert_eq!(earned.status(), 200);
    let view: Value = client
        .get(format!("{base}/api/members/h?min_position=1"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(view["member_id"], "h");
    drop(server);
}
