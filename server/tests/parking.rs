//! Poison events are parked per stream, not frozen behind: an event the consumers cannot apply
//! (made so by the fault suite's hook, as a bug in the consumers would) holds back its own
//! member's later events only; every other member's view keeps updating; staff see what is
//! parked and why; an admin retries after the fix (the views then equal an offline rebuild) or
//! skips with a reason that is kept. SQLite, and PostgreSQL with `TALLY_TEST_STORE=postgres`.

mod common;

use common::{As, TestApp};
use futures::StreamExt;
use serde_json::{json, Value};
use server::store::{PoolSizes, Store};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// The consumers with parked streams, once every consumer that will park has (the membership
/// view always does: it applies every member event).
async fn degraded(app: &TestApp) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = app.get("/api/projections").await;
        let items = status.body["items"].as_array().cloned().unwrap_or_default();
        let view = items.iter().find(|i| i["name"] == "membership_view").cloned().unwrap_or_default();
        if view["state"] == "degraded" && view["parked"] == 1 {
            return items
                .iter()
                .filter(|i| i["parked"] == 1)
                .map(|i| i["name"].as_str().unwrap().to_string())
                .collect();
        }
        assert!(Instant::now() < deadline, "the membership view never parked: {:?}", status.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The balance a socket subscribed to `topic` shows next, waiting at most `within` for `balance`.
async fn socket_shows(socket: &mut common::WebSocket, topic: &str, balance: i64, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let next = tokio::time::timeout_at(deadline, socket.next()).await;
        let Ok(Some(Ok(Message::Text(text)))) = next else {
            assert!(next.is_ok(), "{topic} did not show {balance} within {within:?}");
            continue;
        };
        let frame: Value = serde_json::from_str(&text).expect("json frame");
        if frame["topic"] == topic && frame["view"]["points_balance"] == balance {
            return;
        }
    }
}

/// `/admin/operations` as the person with this session cookie.
async fn operations_page(app: &TestApp, cookie: &str) -> String {
    let html = app.request(As::Session(cookie), reqwest::Method::GET, "/admin/operations", None).await;
    assert_eq!(html.status, 200);
    html.body.as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_poison_event_parks_its_stream_while_other_members_go_on_and_a_retry_after_the_fix_applies_it() {
    let (db, dir) = common::fresh_database().await;
    let mut args = common::args(&db);
    args.park_after = 2;
    let faults = args.faults.clone();
    let app = common::spawn_with(&args, dir).await;
    app.enroll("pa", "Ann", "pa@example.com").await;
    app.enroll("pb", "Bea", "pb@example.com").await;
    assert_eq!(app.earn("pb", 10).await.status, 200);
    app.catch_up().await;

    faults.poison_stream("member-pb", app.state.store.head().await.expect("head"));
    for _ in 0..3 {
        assert_eq!(app.earn("pb", 5).await.status, 200, "commands are taken: the consumers park, not the write side");
    }
    let consumers = degraded(&app).await;

    // Another member's view keeps its freshness: each earn reaches a socket within a second.
    let mut socket = common::ws_connect(&app, As::Key(&app.admin_token)).await.expect("ws");
    common::subscribed(&mut socket, "member:pa").await;
    for n in 1..=5 {
        assert_eq!(app.earn("pa", 1).await.status, 200);
        socket_shows(&mut socket, "member:pa", n, Duration::from_secs(1)).await;
    }
    assert_eq!(app.view("pb").await["points_balance"], 10, "the poisoned member's view waits where it was");

    // Staff see what is parked, with the error; the events are held, not lost.
    let staff = app.person("ops@example.com", "staff", "a long password 1").await;
    let list =
        app.request(As::Session(&staff), reqwest::Method::GET, "/api/projections/membership_view/parked", None).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    let parked = &list.body["items"][0];
    assert_eq!(parked["stream_id"], "member-pb");
    assert_eq!(parked["events"].as_array().map(Vec::len), Some(3), "the three parked earns: {parked}");
    assert!(parked["error"].as_str().unwrap_or_default().contains("poison"), "{parked}");
    let (member, cookie) = app.join("Cat", "pc@example.com", "a long password 2").await;
    let path = "/api/projections/membership_view/parked";
    assert_eq!(app.request(As::Session(&cookie), reqwest::Method::GET, path, None).await.status, 403, "{member}");
    assert_eq!(app.request(As::Anonymous, reqwest::Method::GET, path, None).await.status, 401);
    assert_eq!(app.get("/api/projections/nothing/parked").await.status, 404);
    let health = app.get("/healthz?verbose").await;
    assert_eq!(health.status, 200, "degraded is not down: {:?}", health.body);
    let part = health.body["parts"].as_array().into_iter().flatten().find(|p| p["name"] == "membership_view");
    assert_eq!(part.map(|p| (p["state"].clone(), p["parked"].clone())), Some((json!("degraded"), json!(1))));
    let metrics = app.get("/metrics").await.body.as_str().unwrap_or_default().to_string();
    // The gauge's value is shared by the tests of this process; its presence is what is checked.
    assert!(metrics.contains("tally_parked_streams{consumer=\"membership_view\"}"), "{metrics}");

    // Retrying is for admins; before the fix it parks again, with the error.
    let retry = "/api/projections/membership_view/parked/member-pb/retry";
    assert_eq!(app.request(As::Session(&staff), reqwest::Method::POST, retry, None).await.status, 403);
    let again = app.post(retry, json!({})).await;
    assert_eq!((again.status, again.body["outcome"].as_str()), (200, Some("parked")), "{:?}", again.body);
    assert_eq!(app.post("/api/projections/membership_view/parked/member-pa/retry", json!({})).await.status, 404);

    // The operations page lists it, with the error, and (for admins) Retry and Skip.
    let boss = app.person("boss@example.com", "admin", "a long password 5").await;
    let html = operations_page(&app, &boss).await;
    assert!(html.contains("member-pb") && html.contains("poison") && html.contains(">Retry<"), "{html}");
    assert!(!operations_page(&app, &staff).await.contains(">Retry<"), "staff see it, without the actions");

    // Fixed: a retry applies the parked events in order, and the stream goes on as usual; the
    // membership view's through the page's form, the others' through REST.
    faults.cure();
    let form = [("consumer", "membership_view"), ("stream_id", "member-pb")];
    let posted = app
        .anon
        .post(format!("{}{}", app.base, <app::api::RetryParked as leptos::server_fn::ServerFn>::PATH))
        .header("cookie", &boss)
        .header("origin", &app.base)
        .form(&form)
        .send()
        .await
        .expect("posted");
    assert!(posted.status().is_success() || posted.status().is_redirection(), "{}", posted.status());
    for consumer in consumers.iter().filter(|c| *c != "membership_view") {
        let done = app.post(&format!("/api/projections/{consumer}/parked/member-pb/retry"), json!({})).await;
        assert_eq!((done.status, done.body["outcome"].as_str()), (200, Some("applied")), "{consumer}: {:?}", done.body);
    }
    assert!(operations_page(&app, &boss).await.contains("Nothing is parked."));
    assert_eq!(app.earn("pb", 1).await.status, 200);
    assert_eq!(app.view("pb").await["points_balance"], 26);
    let status = app.get("/api/projections").await;
    let items = status.body["items"].as_array().cloned().unwrap_or_default();
    assert!(items.iter().all(|i| i["parked"] == 0 && i["state"] != "degraded"), "{items:?}");

    let url = app.database_url.clone();
    let files = app.keep_files();
    drop(socket);
    app.stop().await;
    let store = Store::open(&url, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let events = store.read_all(0, i64::MAX).await.expect("events");
    common::audit::views_match_a_rebuild(&store, &events).await;
    drop(files);
}

#[tokio::test]
async fn a_skipped_stream_keeps_the_reason_and_its_later_events_apply_across_a_restart() {
    let (db, dir) = common::fresh_database().await;
    let mut args = common::args(&db);
    args.park_after = 1;
    let faults = args.faults.clone();
    let app = common::spawn_with(&args, dir).await;
    app.enroll("sk", "Kim", "sk@example.com").await;
    assert_eq!(app.earn("sk", 10).await.status, 200);
    app.catch_up().await;
    faults.poison_stream("member-sk", app.state.store.head().await.expect("head"));
    assert_eq!(app.earn("sk", 5).await.status, 200);
    let consumers = degraded(&app).await;

    let skip = "/api/projections/membership_view/parked/member-sk/skip";
    let refused = app.post(skip, json!({"reason": "  "})).await;
    assert_eq!((refused.status, refused.code()), (400, "invalid_request"), "a skip needs a reason");
    faults.cure();
    for consumer in &consumers {
        let path = format!("/api/projections/{consumer}/parked/member-sk/skip");
        let done = app.post(&path, json!({"reason": "test purchase entered twice"})).await;
        assert_eq!((done.status, done.body["outcome"].as_str()), (200, Some("skipped")), "{consumer}: {:?}", done.body);
    }
    assert_eq!(app.view("sk").await["points_balance"], 10, "the skipped earn left out");
    // Later events apply as usual; they carry the balance the member has (the write side took the
    // skipped earn), and the skipped one stays out of the card's activity.
    assert_eq!(app.earn("sk", 7).await.status, 200);
    let view = app.view("sk").await;
    assert_eq!(view["points_balance"], 22);
    let earned: Vec<&Value> = view["recent_activity"].as_array().into_iter().flatten().map(|a| &a["points"]).collect();
    assert!(!earned.contains(&&json!(5)) && earned.contains(&&json!(7)), "{view}");
    let list = app.get("/api/projections/membership_view/parked").await;
    assert_eq!(list.body["items"], json!([]));
    let skipped = &list.body["skipped"][0];
    assert_eq!(skipped["reason"], "test purchase entered twice");
    assert!(skipped["actor"].as_str().is_some_and(|a| a.starts_with("key:")), "{skipped}");

    // A restart applies again what its checkpoints had not stored, and still leaves out the
    // skipped event.
    let app = app.restart().await;
    assert_eq!(app.view("sk").await, view);
}
