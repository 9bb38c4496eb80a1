//! The HTTP contract of API.md, endpoint by endpoint, against the real app and a real SQLite file.

mod common;

use common::spawn_app;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn enroll_answers_201_and_the_view_shows_the_new_member() {
    let app = spawn_app().await;
    let r = app.enroll("m1", "Ada Lovelace", "Ada@Example.com").await;
    assert_eq!(r.body, json!({"member_id": "m1", "version": 1, "position": 1}));

    let view = app.view("m1").await;
    assert_eq!(view["name"], "Ada Lovelace");
    assert_eq!(view["email"], "Ada@Example.com");
    assert_eq!(view["status"], "active");
    assert_eq!(view["tier"], "bronze");
    assert_eq!(view["points_balance"], 0);
    assert_eq!(view["next_tier"], json!({"tier": "silver", "points_needed": 1000}));
    assert_eq!(view["recent_activity"][0]["kind"], "enrolled");
    assert_eq!(view["version"], 1);
    assert_eq!(view["position"], 1);
    assert!(view["member_since"].as_str().is_some_and(|s| s.ends_with('Z')));
}

#[tokio::test]
async fn enroll_without_an_id_gets_one() {
    let app = spawn_app().await;
    let r = app.post("/api/members", json!({"name": "Grace", "email": "grace@example.com"})).await;
    assert_eq!(r.status, 201);
    let id = r.body["member_id"].as_str().expect("id");
    assert_eq!(app.view(id).await["name"], "Grace");
}

#[tokio::test]
async fn bad_input_is_400_invalid_request_and_changes_nothing() {
    let app = spawn_app().await;
    let cases = [
        json!({"name": "", "email": "a@example.com"}),
        json!({"name": "   ", "email": "a@example.com"}),
        json!({"name": "Ada", "email": "not-an-email"}),
        json!({"name": "Ada"}),
        json!({"name": 42, "email": "a@example.com"}),
        json!({"name": "Ada", "email": "a@example.com", "admin": true}),
        json!({"name": "Ada", "email": "a@example.com", "member_id": "has space"}),
    ];
    for body in cases {
        let r = app.post("/api/members", body.clone()).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{body}");
        assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let raw = app
        .client
        .post(format!("{}/api/members", app.base))
        .header("content-type", "application/json")
        .body("{\"name\": \"Ada\", ")
        .send()
        .await
        .expect("sent");
    assert_eq!(raw.status(), 400);
    let body: serde_json::Value = raw.json().await.expect("json error body");
    assert_eq!(body["error"]["code"], "invalid_request");

    app.enroll("m1", "Ada", "ada@example.com").await;
    for points in [json!(0), json!(-1), json!(1_000_001), json!(1.5), json!("ten")] {
        let r = app.post("/api/members/m1/points/earn", json!({"points": points})).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "points {points}");
    }
    assert_eq!(app.get("/api/members/m1/events").await.body["items"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn email_is_unique_ignoring_case_and_ids_are_unique() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    let r = app.post("/api/members", json!({"name": "Other", "email": "ADA@example.COM"})).await;
    assert_eq!((r.status, r.code()), (409, "email_taken"));
    let r = app.post("/api/members", json!({"member_id": "m1", "name": "Other", "email": "other@example.com"})).await;
    assert_eq!((r.status, r.code()), (409, "member_exists"));
}

#[tokio::test]
async fn profile_update_changes_the_view_and_moves_the_email_reservation() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.enroll("m2", "Bob", "bob@example.com").await;
    let r = app.send(Method::PATCH, "/api/members/m1", Some(json!({"email": "bob@example.com"})), &[]).await;
    assert_eq!((r.status, r.code()), (409, "email_taken"));
    let r = app
        .send(Method::PATCH, "/api/members/m1", Some(json!({"name": "Ada L.", "email": "ada.l@example.com"})), &[])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["version"], 2);
    let view = app.view("m1").await;
    assert_eq!((view["name"].as_str(), view["email"].as_str()), (Some("Ada L."), Some("ada.l@example.com")));
    // The old address is free again.
    app.enroll("m3", "New Ada", "ada@example.com").await;
    let r = app.send(Method::PATCH, "/api/members/nobody", Some(json!({"name": "X"})), &[]).await;
    assert_eq!((r.status, r.code()), (404, "member_not_found"));
    let r = app.send(Method::PATCH, "/api/members/m1", Some(json!({})), &[]).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
}

#[tokio::test]
async fn earning_across_a_threshold_changes_the_tier() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    assert_eq!(app.earn("m1", 600).await.status, 200);
    let r = app.earn("m1", 600).await;
    assert_eq!(r.body["version"], 4, "PointsEarned and TierChanged are appended together");
    let view = app.view("m1").await;
    assert_eq!(view["tier"], "silver");
    assert_eq!(view["points_balance"], 1200);
    assert_eq!(view["lifetime_points"], 1200);
    assert_eq!(view["next_tier"], json!({"tier": "gold", "points_needed": 3800}));
    assert_eq!(view["recent_activity"][0]["kind"], "tier_changed");
    assert_eq!(view["recent_activity"][1]["kind"], "earned");
    assert_eq!(view["recent_activity"][1]["points"], 600);

    app.earn("m1", 20_000).await;
    let view = app.view("m1").await;
    assert_eq!(view["tier"], "platinum");
    assert_eq!(view["next_tier"], serde_json::Value::Null);
}

#[tokio::test]
async fn redeem_suspend_and_reactivate_follow_the_rules() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.earn("m1", 100).await;
    let r = app.post("/api/members/m1/points/redeem", json!({"points": 101, "reward": "mug"})).await;
    assert_eq!((r.status, r.code()), (422, "insufficient_points"));
    let r = app.post("/api/members/m1/points/redeem", json!({"points": 40, "reward": "mug"})).await;
    assert_eq!(r.status, 200);
    assert_eq!(app.view("m1").await["points_balance"], 60);

    let r = app.post("/api/members/m1/reactivate", json!({})).await;
    assert_eq!((r.status, r.code()), (422, "account_not_suspended"));
    assert_eq!(app.post("/api/members/m1/suspend", json!({"reason": "fraud check"})).await.status, 200);
    let r = app.post("/api/members/m1/suspend", json!({})).await;
    assert_eq!((r.status, r.code()), (422, "account_suspended"));
    let r = app.earn("m1", 5).await;
    assert_eq!((r.status, r.code()), (422, "account_suspended"));
    let r = app.post("/api/members/m1/points/redeem", json!({"points": 5})).await;
    assert_eq!((r.status, r.code()), (422, "account_suspended"));
    assert_eq!(app.view("m1").await["status"], "suspended");
    assert_eq!(app.post("/api/members/m1/reactivate", json!({})).await.status, 200);
    assert_eq!(app.view("m1").await["status"], "active");

    let r = app.earn("ghost", 5).await;
    assert_eq!((r.status, r.code()), (404, "member_not_found"));
    let r = app.get("/api/members/ghost").await;
    assert_eq!((r.status, r.code()), (404, "member_not_found"));
}

#[tokio::test]
async fn the_same_idempotency_key_replays_the_first_answer_and_appends_nothing() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    let key = [("Idempotency-Key", "earn-1")];
    let first = app.send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 10})), &key).await;
    assert_eq!(first.status, 200);
    app.earn("m1", 1).await; // the stream moves on
    let again = app.send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 10})), &key).await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    assert_eq!(app.view("m1").await["points_balance"], 11);

    let other = app.send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 11})), &key).await;
    assert_eq!((other.status, other.code()), (422, "idempotency_key_reused"));

    let enroll_key = [("Idempotency-Key", "enroll-2")];
    let body = json!({"member_id": "m2", "name": "Bob", "email": "bob@example.com"});
    let a = app.send(Method::POST, "/api/members", Some(body.clone()), &enroll_key).await;
    let b = app.send(Method::POST, "/api/members", Some(body), &enroll_key).await;
    assert_eq!((a.status, b.status), (201, 201), "the replay keeps the first status");
    assert_eq!(a.body, b.body);

    let long = "k".repeat(201);
    let r = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 1})), &[("Idempotency-Key", &long)])
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
}

#[tokio::test]
async fn if_match_with_a_stale_version_is_409_and_appends_nothing() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.earn("m1", 10).await;
    let r =
        app.send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 5})), &[("If-Match", "1")]).await;
    assert_eq!((r.status, r.code()), (409, "version_conflict"));
    let r =
        app.send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 5})), &[("If-Match", "2")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body["version"], 3);
    let r = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 5})), &[("If-Match", "\"3\"")])
        .await;
    assert_eq!(r.status, 200, "an ETag-style quoted version works too");
    let r = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 5})), &[("If-Match", "soon")])
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    assert_eq!(app.view("m1").await["points_balance"], 20);
}

#[tokio::test]
async fn bodies_over_64_kib_are_413() {
    let app = spawn_app().await;
    let big = "x".repeat(70 * 1024);
    let r = app.post("/api/members", json!({"name": big, "email": "a@example.com"})).await;
    assert_eq!((r.status, r.code()), (413, "payload_too_large"));
    assert_eq!(app.get("/api/members").await.body["items"], json!([]));
}

#[tokio::test]
async fn fifty_concurrent_redeems_succeed_exactly_as_often_as_the_balance_allows() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.earn("m1", 500).await;
    let redeems = (0..50).map(|_| app.post("/api/members/m1/points/redeem", json!({"points": 20})));
    let replies = futures::future::join_all(redeems).await;
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused = replies.iter().filter(|r| r.status == 422 && r.code() == "insufficient_points").count();
    assert_eq!((ok, refused), (25, 25));
    assert_eq!(app.view("m1").await["points_balance"], 0);
}

#[tokio::test]
async fn min_position_waits_for_the_projector_and_reports_staleness() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    let r = app.earn("m1", 70).await;
    let position = r.body["position"].as_i64().expect("position");
    let view = app.get(&format!("/api/members/m1?min_position={position}")).await;
    assert_eq!(view.status, 200);
    assert_eq!(view.body["points_balance"], 70);
    let seen: i64 = view.header("x-view-position").and_then(|p| p.parse().ok()).expect("X-View-Position");
    assert!(seen >= position);
    assert_eq!(view.header("x-view-stale"), None);

    let later = app.get(&format!("/api/members/m1?min_position={}&wait_ms=50", position + 1000)).await;
    assert_eq!(later.status, 200);
    assert_eq!(later.header("x-view-stale"), Some("true"));
    assert_eq!(later.body["points_balance"], 70);

    let bad = app.get("/api/members/m1?min_position=abc").await;
    assert_eq!((bad.status, bad.code()), (400, "invalid_request"));
}

#[tokio::test]
async fn a_purchase_earns_points_exactly_once() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    let purchase = json!({"transaction_id": "t-1", "member_id": "m1", "amount_cents": 12_399, "currency": "EUR", "channel": "pos"});
    let first = app.post("/api/transactions", purchase.clone()).await;
    assert_eq!(first.status, 202);
    assert_eq!(first.body["transaction_id"], "t-1");
    app.catch_up().await;
    // The same sale sent again: 202 with the first position, nothing recorded.
    let again = app.post("/api/transactions", purchase.clone()).await;
    assert_eq!((again.status, &again.body["position"]), (202, &first.body["position"]));
    // The same id with another sale: a conflict, nothing recorded either.
    let others = [
        json!({"transaction_id": "t-1", "member_id": "m1", "amount_cents": 99_999, "currency": "EUR", "channel": "pos"}),
        json!({"transaction_id": "t-1", "member_id": "m2", "amount_cents": 12_399, "currency": "EUR", "channel": "pos"}),
        json!({"transaction_id": "t-1", "amount_cents": 12_399, "currency": "EUR", "channel": "pos"}),
        json!({"transaction_id": "t-1", "member_id": "m1", "amount_cents": 12_399, "currency": "USD", "channel": "pos"}),
        json!({"transaction_id": "t-1", "member_id": "m1", "amount_cents": 12_399, "currency": "EUR", "channel": "ecommerce"}),
    ];
    for other in others {
        let conflict = app.post("/api/transactions", other.clone()).await;
        assert_eq!((conflict.status, conflict.code()), (409, "transaction_conflict"), "{other}");
    }

    let view = app.view("m1").await;
    assert_eq!(view["points_balance"], 123);
    assert_eq!(view["recent_activity"][0]["description"], "Purchase t-1");
    let events = app.get("/api/members/m1/events").await.body;
    let earned: Vec<_> =
        events["items"].as_array().expect("items").iter().filter(|e| e["event_type"] == "PointsEarned").collect();
    assert_eq!(earned.len(), 1);
    assert_eq!(earned[0]["data"]["reason"], "t-1");
    assert_eq!(earned[0]["metadata"]["idempotency_key"], "t-1");

    let txn = app.state.store.read_stream("transaction-t-1").await.expect("stream");
    let types: Vec<_> = txn.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["TransactionPerformed", "TransactionRewarded"]);
    assert_eq!(txn[1].data, json!({"member_id": "m1", "points": 123}));
}

#[tokio::test]
async fn purchases_that_earn_nothing_are_still_closed() {
    let app = spawn_app().await;
    app.enroll("gold", "Gold", "gold@example.com").await;
    app.earn("gold", 5_000).await;
    app.enroll("sus", "Sus", "sus@example.com").await;
    app.post("/api/members/sus/suspend", json!({})).await;
    let buy = |id: &str, member: Option<&str>| json!({"transaction_id": id, "member_id": member, "amount_cents": 1_000, "currency": "EUR", "channel": "ecommerce"});
    for (id, member) in [("t-anon", None), ("t-ghost", Some("ghost")), ("t-sus", Some("sus")), ("t-gold", Some("gold"))]
    {
        assert_eq!(app.post("/api/transactions", buy(id, member)).await.status, 202);
    }
    app.catch_up().await;
    let closing = |events: Vec<server::store::StoredEvent>| (events[1].event_type.clone(), events[1].data.clone());
    let store = &app.state.store;
    assert_eq!(
        closing(store.read_stream("transaction-t-anon").await.unwrap()),
        ("TransactionNotRewarded".into(), json!({"reason": "no_member"}))
    );
    assert_eq!(
        closing(store.read_stream("transaction-t-ghost").await.unwrap()),
        ("TransactionNotRewarded".into(), json!({"reason": "unknown_member"}))
    );
    assert_eq!(
        closing(store.read_stream("transaction-t-sus").await.unwrap()),
        ("TransactionNotRewarded".into(), json!({"reason": "account_suspended"}))
    );
    assert_eq!(
        closing(store.read_stream("transaction-t-gold").await.unwrap()),
        ("TransactionRewarded".into(), json!({"member_id": "gold", "points": 15}))
    );
    assert_eq!(app.view("gold").await["points_balance"], 5_015);
    assert_eq!(app.view("sus").await["points_balance"], 0);

    for bad in [
        json!({"amount_cents": 0, "currency": "EUR", "channel": "pos"}),
        json!({"amount_cents": 100, "currency": "euro", "channel": "pos"}),
        json!({"amount_cents": 100, "currency": "EUR", "channel": "mail"}),
        json!({"amount_cents": 100, "currency": "EUR"}),
    ] {
        let r = app.post("/api/transactions", bad.clone()).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{bad}");
    }
}

#[tokio::test]
async fn search_filters_and_pages_through_members() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.enroll(&format!("a{i}"), &format!("Alice {i}"), &format!("alice{i}@example.com")).await;
    }
    app.enroll("b1", "Bob", "bob@shop.example").await;
    app.earn("b1", 1_500).await;
    app.post("/api/members/a0/suspend", json!({})).await;
    app.catch_up().await;

    let page = app.get("/api/members?q=ALICE&limit=2").await;
    assert_eq!(page.status, 200);
    assert!(page.header("x-view-position").is_some());
    let names: Vec<_> =
        page.body["items"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()).collect();
    assert_eq!(names, ["Alice 0", "Alice 1"]);
    let mut seen = names;
    let mut next = page.body["next"].as_str().map(str::to_string);
    while let Some(cursor) = next {
        let page = app.get(&format!("/api/members?q=alice&limit=2&after={cursor}")).await;
        seen.extend(page.body["items"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap().to_string()));
        next = page.body["next"].as_str().map(str::to_string);
    }
    assert_eq!(seen.len(), 5);

    let by_email = app.get("/api/members?q=shop.example").await.body;
    assert_eq!(by_email["items"][0]["member_id"], "b1");
    let silver = app.get("/api/members?tier=silver").await.body;
    assert_eq!(silver["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(silver["items"][0]["points_balance"], 1_500);
    // A redemption changes no searched column (the search row stays as it was), yet results show
    // the member's current figures and position, as the view has them.
    let redeemed = app.post("/api/members/b1/points/redeem", json!({"points": 200})).await;
    assert_eq!(redeemed.status, 200);
    app.catch_up().await;
    let bob = app.get("/api/members?q=bob").await.body;
    assert_eq!(
        (&bob["items"][0]["points_balance"], &bob["items"][0]["lifetime_points"]),
        (&json!(1_300), &json!(1_500))
    );
    assert_eq!(bob["items"][0]["position"], app.view("b1").await["position"]);
    let suspended = app.get("/api/members?status=suspended").await.body;
    assert_eq!(suspended["items"][0]["member_id"], "a0");
    assert_eq!(app.get("/api/members?q=100%25").await.body["items"], json!([]));

    for bad in ["tier=diamond", "status=gone", "limit=0", "limit=101", "after=garbage!", "limit=x"] {
        let r = app.get(&format!("/api/members?{bad}")).await;
        assert_eq!((r.status, r.code()), (400, "invalid_request"), "{bad}");
    }
}

#[tokio::test]
async fn the_audit_trail_lists_stored_events_oldest_first() {
    let app = spawn_app().await;
    app.send(
        Method::POST,
        "/api/members",
        Some(json!({"member_id": "m1", "name": "Ada", "email": "ada@example.com"})),
        &[("X-Request-Id", "req-42")],
    )
    .await;
    app.earn("m1", 5).await;
    let items = app.get("/api/members/m1/events").await.body["items"].clone();
    let first = &items[0];
    for field in
        ["position", "stream_id", "stream_version", "event_type", "schema_version", "data", "metadata", "recorded_at"]
    {
        assert!(!first[field].is_null(), "{field} missing");
    }
    assert_eq!(first["stream_id"], "member-m1");
    assert_eq!(first["event_type"], "MemberEnrolled");
    assert_eq!(first["metadata"]["correlation_id"], "req-42");
    assert_eq!(items[1]["stream_version"], 2);
    assert!(items[1]["position"].as_i64() > first["position"].as_i64());
    assert_eq!(app.get("/api/members/ghost/events").await.code(), "member_not_found");
}

#[tokio::test]
async fn operations_endpoints_report_health_consumers_and_metrics() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.catch_up().await;
    assert_eq!(app.get("/healthz").await.status, 200);
    let items = app.get("/api/projections").await.body["items"].clone();
    let names: Vec<_> = items.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["membership_view", "member_search", "loyalty_policy"]);
    for item in items.as_array().unwrap() {
        assert_eq!(
            (item["position"].as_i64(), item["head"].as_i64(), item["lag"].as_i64()),
            (Some(1), Some(1), Some(0))
        );
        assert_eq!(item["state"], "running");
    }
    let metrics = app.client.get(format!("{}/metrics", app.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("tally_consumer_lag"), "{metrics}");
    assert!(metrics.contains("tally_commands_total"));

    let r = app.get("/api/nothing-here").await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
}

/// An event no projection can read (written around the command path, as a bad hand edit would)
/// stops the projections at that event: they report it and never skip it, so nothing after it is
/// shown half-applied. The loyalty policy, which has nothing to do with member events, goes on.
#[tokio::test]
async fn an_event_the_projections_cannot_read_is_reported_and_never_skipped() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada Lovelace", "ada@example.com").await;
    app.catch_up().await;
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
         VALUES ('member-broken', 1, 'MemberEnrolled', 1, '{}', '{}', '2026-01-01T00:00:00Z')",
    )
    .execute(&mut *app.state.store.write.acquire().await.expect("write connection"))
    .await
    .expect("insert an unreadable event");
    let earned = app.earn("m1", 100).await;
    assert_eq!(earned.status, 200, "{:?}", earned.body);
    let head = earned.body["position"].as_i64().expect("position");

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let (views, search, loyalty) = loop {
        let items = app.get("/api/projections").await.body["items"].as_array().cloned().expect("items");
        let find = |name: &str| items.iter().find(|i| i["name"] == name).cloned().expect(name);
        let (views, search, loyalty) = (find("membership_view"), find("member_search"), find("loyalty_policy"));
        let settled = views["state"] == "failing" && search["state"] == "failing" && loyalty["position"] == head;
        if settled || std::time::Instant::now() > deadline {
            break (views, search, loyalty);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for projection in [&views, &search] {
        assert_eq!(projection["state"], "failing", "{projection}");
        assert!(projection["position"].as_i64() < Some(head - 1), "stopped before the bad event: {projection}");
        let error = projection["last_error"].as_str().unwrap_or_default();
        assert!(error.contains("member-broken"), "the error names the event: {projection}");
    }
    assert_eq!(loyalty["position"], head, "the loyalty policy is not held back: {loyalty}");
    assert_eq!(loyalty["state"], "running", "{loyalty}");
    // The earn after the bad event is not in the view: the projection did not skip ahead.
    let view = app.get("/api/members/m1").await;
    assert_eq!(view.body["points_balance"], 0, "{:?}", view.body);
}

#[tokio::test]
async fn idempotency_keys_past_their_window_are_pruned_a_few_at_a_time_and_recent_ones_kept() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    for key in ["old-1", "old-2", "old-3", "old-4", "old-5"] {
        let r = app
            .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 1})), &[("idempotency-key", key)])
            .await;
        assert_eq!(r.status, 200);
    }
    // A purchase: the loyalty policy keeps a key of its own for its earn.
    let purchase =
        json!({"transaction_id": "t-1", "member_id": "m1", "amount_cents": 1_000, "currency": "EUR", "channel": "pos"});
    assert_eq!(app.post("/api/transactions", purchase).await.status, 202);
    app.catch_up().await;
    let store = &app.state.store;
    let mut conn = store.write.acquire().await.expect("write connection");
    sqlx::query("UPDATE idempotency_keys SET created_at = '2020-01-01T00:00:00.000Z'")
        .execute(&mut *conn)
        .await
        .expect("backdate");
    drop(conn);
    let r = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 1})), &[("idempotency-key", "recent")])
        .await;
    assert_eq!(r.status, 200);
    let scopes: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT scope FROM idempotency_keys").fetch_all(&store.read).await.expect("scopes");
    assert!(scopes.iter().any(|(s,)| s == "loyalty_policy"), "{scopes:?}");

    // Batches of two: six old keys (five of the client's, the policy's one; on PostgreSQL also the
    // two the server made for the enrolment and the purchase, sent without one).
    let removed = store.prune_idempotency_keys(chrono::Duration::days(7), 2).await.expect("pruned");
    let server_made = if store.backend == server::store::Backend::Postgres { 2 } else { 0 };
    assert_eq!(removed, 6 + server_made);
    let left: Vec<(String,)> =
        sqlx::query_as("SELECT key FROM idempotency_keys").fetch_all(&store.read).await.expect("keys");
    assert_eq!(left, [("recent".to_string(),)]);
    // The recent key still replays.
    let again = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 1})), &[("idempotency-key", "recent")])
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

/// PostgreSQL only makes them: on SQLite no batch is run again after an unknown outcome.
#[tokio::test]
async fn a_command_sent_without_a_key_gets_one_from_the_server_kept_an_hour() {
    let app = spawn_app().await;
    if app.state.store.backend == server::store::Backend::Sqlite {
        app.enroll("m1", "Ada", "ada@example.com").await;
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM idempotency_keys")
            .fetch_one(&app.state.store.read)
            .await
            .expect("count");
        assert_eq!(n, 0, "SQLite keeps no key the client did not send");
        return;
    }
    app.enroll("m1", "Ada", "ada@example.com").await;
    let earned = app.earn("m1", 1).await;
    assert_eq!(earned.status, 200);
    assert_eq!(earned.header("idempotent-replayed"), None, "a first answer is not a replay");
    let store = &app.state.store;
    let server_keys = "SELECT COUNT(*) FROM idempotency_keys WHERE scope = 'server'";
    let count = |sql: &'static str| async move {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&store.read).await.expect("count");
        n
    };
    assert_eq!(count(server_keys).await, 2, "the enrolment's and the earn's");

    // Kept an hour: younger ones stay, older ones go; clients' keys are not touched.
    assert_eq!(store.prune_keys_in(Some("server"), chrono::Duration::hours(1), 100).await.expect("pruned"), 0);
    let mut conn = store.write.acquire().await.expect("write connection");
    let two_hours_ago = server::clock::rfc3339(chrono::Utc::now() - chrono::Duration::hours(2));
    sqlx::query("UPDATE idempotency_keys SET created_at = $1")
        .bind(two_hours_ago)
        .execute(&mut *conn)
        .await
        .expect("backdate");
    drop(conn);
    let r = app
        .send(Method::POST, "/api/members/m1/points/earn", Some(json!({"points": 1})), &[("idempotency-key", "mine")])
        .await;
    assert_eq!(r.status, 200);
    let mut conn = store.write.acquire().await.expect("write connection");
    sqlx::query("UPDATE idempotency_keys SET created_at = $1 WHERE key = 'mine'")
        .bind(server::clock::rfc3339(chrono::Utc::now() - chrono::Duration::hours(2)))
        .execute(&mut *conn)
        .await
        .expect("backdate");
    drop(conn);
    // The server's own pruner (at start, then every ten minutes) may have taken them first.
    let pruned = store.prune_keys_in(Some("server"), chrono::Duration::hours(1), 100).await.expect("pruned");
    assert!(pruned <= 2, "{pruned}");
    assert_eq!(count(server_keys).await, 0, "the two old server keys are gone");
    assert_eq!(count("SELECT COUNT(*) FROM idempotency_keys WHERE key = 'mine'").await, 1, "a client's key stays");
}
