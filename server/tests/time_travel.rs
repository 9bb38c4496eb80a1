//! Time travel for audits: `GET /api/members/{id}?at_position=P` (staff) answers the card as it
//! was right after position P. Checked against a replay computed here from the member's events
//! (balance, lifetime points, name, status and tier), at every one of its positions.
//! SQLite, and PostgreSQL with `TALLY_TEST_STORE=postgres`.

mod common;

use common::As;
use serde_json::{json, Value};

#[tokio::test]
async fn the_card_at_any_past_position_is_what_its_events_up_to_there_say() {
    let app = common::spawn_app().await;
    app.enroll("tt", "Tess", "tt@example.com").await;
    app.enroll("other", "Otto", "other@example.com").await;
    assert_eq!(app.earn("tt", 700).await.status, 200);
    assert_eq!(app.earn("other", 3).await.status, 200);
    let patch = app.send(reqwest::Method::PATCH, "/api/members/tt", Some(json!({"name": "Tess B."})), &[]).await;
    assert_eq!(patch.status, 200, "{:?}", patch.body);
    assert_eq!(app.earn("tt", 400).await.status, 200);
    let redeem = app.post("/api/members/tt/points/redeem", json!({"points": 250, "reward": "Mug"})).await;
    assert_eq!(redeem.status, 200, "{:?}", redeem.body);
    assert_eq!(app.post("/api/members/tt/suspend", json!({"reason": "audit"})).await.status, 200);
    assert_eq!(app.earn("other", 4).await.status, 200);
    app.catch_up().await;

    let events = app.get("/api/members/tt/events").await.body["items"].as_array().cloned().expect("events");
    let (mut balance, mut lifetime, mut name, mut status) = (0, 0, String::new(), "active");
    let mut tier = "bronze".to_string();
    for event in &events {
        let data = &event["data"];
        match event["event_type"].as_str().unwrap_or_default() {
            "MemberEnrolled" => name = data["name"].as_str().unwrap_or_default().to_string(),
            "ProfileUpdated" => name = data["name"].as_str().map(str::to_string).unwrap_or(name),
            "PointsEarned" => {
                balance += data["points"].as_u64().unwrap_or_default();
                lifetime += data["points"].as_u64().unwrap_or_default();
            }
            "PointsRedeemed" => balance -= data["points"].as_u64().unwrap_or_default(),
            "AccountSuspended" => status = "suspended",
            "AccountReactivated" => status = "active",
            "TierChanged" => tier = data["to"].as_str().unwrap_or_default().to_string(),
            other => panic!("unexpected event {other}"),
        }
        let position = event["position"].as_i64().expect("position");
        let at = app.get(&format!("/api/members/tt?at_position={position}")).await;
        assert_eq!(at.status, 200, "{:?}", at.body);
        assert_eq!(at.header("x-view-position"), Some(position.to_string().as_str()));
        let card: &Value = &at.body;
        let shown = |field: &str| card[field].clone();
        assert_eq!(
            (shown("points_balance"), shown("lifetime_points"), shown("name"), shown("status"), shown("tier")),
            (json!(balance), json!(lifetime), json!(name), json!(status), json!(tier)),
            "after position {position}"
        );
        // Another member's events in between change nothing of this card.
        let next = app.get(&format!("/api/members/tt?at_position={}", position + 1)).await;
        if !events.iter().any(|e| e["position"] == position + 1) && next.status == 200 {
            assert_eq!(next.body, at.body, "position {} is another member's", position + 1);
        }
    }
    assert_eq!(
        app.get(&format!("/api/members/tt?at_position={}", events.last().unwrap()["position"])).await.body,
        app.view("tt").await
    );

    // Before enrolment the member did not exist; past the head there is nothing yet.
    let first = events[0]["position"].as_i64().expect("position");
    let before = app.get(&format!("/api/members/tt?at_position={}", first - 1)).await;
    assert_eq!((before.status, before.code()), (404, "member_not_found"));
    let head = app.state.store.head().await.expect("head");
    let future = app.get(&format!("/api/members/tt?at_position={}", head + 1)).await;
    assert_eq!((future.status, future.code()), (400, "invalid_request"));
    // Staff only: a member reading their own card cannot go back in time.
    let (member, cookie) = app.join("Mo", "mo@example.com", "a long password 3").await;
    let own = app
        .request(As::Session(&cookie), reqwest::Method::GET, &format!("/api/members/{member}?at_position=1"), None)
        .await;
    assert_eq!(own.status, 403, "{:?}", own.body);
}
