//! Old events read by new code. `fixtures/v1-log.json` is a log written when `PointsEarned` was at
//! schema version 1 (no `source`), with the answers that code gave: every member's view and
//! events. Loaded into a fresh store as it was written, it must project to the same views and
//! answer the events API the same, apart from the new field, which is derived (`purchase` for an
//! earn with a transaction id, else `staff`). An event newer than the server knows is parked, not
//! guessed at. SQLite, and PostgreSQL with `TALLY_TEST_STORE=postgres`.

mod common;

use serde_json::{json, Value};
use server::store::{Backend, PoolSizes, Store};
use std::collections::HashMap;

fn fixture() -> Value {
    let text = include_str!("fixtures/v1-log.json");
    serde_json::from_str(text).expect("the fixture is JSON")
}

/// Write `events` (the stored rows, in position order) into a fresh store at `url`, as the code
/// that wrote them did: positions from 1, each SQLite event chained to its stream's previous one.
async fn load_log(url: &str, events: &[Value]) {
    let store = Store::open(url, &PoolSizes { read: 1, write: 1 }, true).await.expect("store");
    let mut previous: HashMap<String, i64> = HashMap::new();
    let mut conn = store.write.acquire().await.expect("connection");
    for (i, e) in events.iter().enumerate() {
        let position = i as i64 + 1;
        assert_eq!(e["position"], position, "the fixture's positions run from 1");
        let stream = e["stream_id"].as_str().expect("stream").to_string();
        let (data, metadata) = (e["data"].to_string(), e["metadata"].to_string());
        let query = match store.backend {
            Backend::Sqlite => sqlx::query(
                "INSERT INTO events (stream_id, stream_version, previous_position, event_type, schema_version, data, \
                 metadata, recorded_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(stream.clone())
            .bind(e["stream_version"].as_i64())
            .bind(previous.get(&stream).copied()),
            Backend::Postgres => sqlx::query(
                "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(stream.clone())
            .bind(e["stream_version"].as_i64()),
        };
        query
            .bind(e["event_type"].as_str())
            .bind(e["schema_version"].as_i64())
            .bind(data)
            .bind(metadata)
            .bind(e["recorded_at"].as_str())
            .execute(&mut *conn)
            .await
            .expect("insert");
        previous.insert(stream, position);
    }
    drop(conn);
    store.write.close().await;
}

#[tokio::test]
async fn a_log_of_version_1_events_projects_and_answers_as_it_did_with_the_source_derived() {
    let fixture = fixture();
    let events = fixture["events"].as_array().expect("events");
    assert!(
        events.iter().any(|e| e["event_type"] == "PointsEarned" && e["schema_version"] == 1),
        "the fixture holds version-1 earns"
    );
    let (url, dir) = common::fresh_database().await;
    load_log(&url, events).await;
    let app = common::spawn_on(&url, dir).await;
    app.catch_up().await;

    let views = fixture["views"].as_object().expect("views");
    for (id, expected) in views {
        assert_eq!(&app.view(id).await, expected, "the view of {id}");
        let answered = app.get(&format!("/api/members/{id}/events")).await;
        assert_eq!(answered.status, 200);
        let was = fixture["answers"][id]["items"].as_array().expect("the old answer");
        let now = answered.body["items"].as_array().expect("items");
        assert_eq!(now.len(), was.len(), "{id}'s events");
        for (now, was) in now.iter().zip(was) {
            if was["event_type"] != "PointsEarned" {
                assert_eq!(now, was);
                continue;
            }
            // The new field, derived; the rest as it was.
            let purchase = !was["data"]["transaction_id"].is_null();
            assert_eq!(now["data"]["source"], if purchase { "purchase" } else { "staff" }, "{now}");
            assert_eq!(now["schema_version"], 2);
            let mut without = now.clone();
            without["data"].as_object_mut().expect("data").remove("source");
            without["schema_version"] = json!(1);
            assert_eq!(&without, was);
        }
    }

    // New earns are written at version 2, and projected beside the old ones.
    let id = views.keys().next().expect("a member").clone();
    let before = app.view(&id).await["points_balance"].as_u64().expect("balance");
    assert_eq!(app.earn(&id, 5).await.status, 200);
    assert_eq!(app.view(&id).await["points_balance"], before + 5);
    let answered = app.get(&format!("/api/members/{id}/events")).await;
    let last = answered.body["items"].as_array().and_then(|items| items.last().cloned()).expect("an event");
    assert_eq!((last["schema_version"].clone(), last["data"]["source"].clone()), (json!(2), json!("staff")));

    let files = app.keep_files();
    app.stop().await;
    let store = Store::open(&url, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let all = store.read_all(0, i64::MAX).await.expect("events");
    common::audit::views_match_a_rebuild(&store, &all).await;
    drop(files);
}

#[tokio::test]
async fn an_event_newer_than_the_server_knows_is_parked_not_guessed_at() {
    let fixture = fixture();
    let mut events: Vec<Value> = fixture["events"].as_array().expect("events").clone();
    // The last earn of some member, as a newer Tally would write it.
    let newer = events.iter().rposition(|e| e["event_type"] == "PointsEarned").expect("an earn");
    events[newer]["schema_version"] = json!(3);
    let stream = events[newer]["stream_id"].as_str().expect("stream").to_string();
    let (url, dir) = common::fresh_database().await;
    load_log(&url, &events).await;
    let mut args = common::args(&url);
    args.park_after = 1;
    let app = common::spawn_with(&args, dir).await;
    app.catch_up().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let parked = loop {
        let list = app.get("/api/projections/membership_view/parked").await;
        if let Some(item) = list.body["items"].as_array().and_then(|items| items.first().cloned()) {
            break item;
        }
        assert!(std::time::Instant::now() < deadline, "never parked: {:?}", list.body);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(parked["stream_id"], stream.as_str());
    assert_eq!(parked["from_position"], events[newer]["position"]);
    let error = parked["error"].as_str().unwrap_or_default();
    assert!(error.contains("schema version 3") && error.contains("upgrade"), "{error}");
}
