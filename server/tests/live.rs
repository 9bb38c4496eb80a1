//! `GET /ws` as API.md describes it, with a real WebSocket client.

mod common;

use common::{spawn_app, TestApp};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket opened with the app's admin key.
async fn connect(app: &TestApp) -> Socket {
    common::ws_connect(app, common::As::Key(&app.admin_token)).await.expect("ws connects")
}

async fn send(socket: &mut Socket, message: Value) {
    socket.send(Message::Text(message.to_string().into())).await.expect("sent");
}

async fn send_raw(socket: &mut Socket, text: &str) {
    socket.send(Message::Text(text.to_string().into())).await.expect("sent");
}

#[tokio::test]
async fn subscribing_sends_the_current_view_then_every_change() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.earn("m1", 10).await;
    app.catch_up().await;

    let mut socket = connect(&app).await;
    send(&mut socket, json!({"subscribe": "member:m1"})).await;
    let snapshot = common::next_json(&mut socket).await;
    assert_eq!(snapshot["type"], "view");
    assert_eq!(snapshot["topic"], "member:m1");
    assert_eq!(snapshot["position"], 2);
    assert_eq!(snapshot["view"]["points_balance"], 10);
    assert_eq!(snapshot["position"], snapshot["view"]["position"]);

    let r = app.earn("m1", 1_000).await;
    let pushed = common::next_json(&mut socket).await;
    assert_eq!(pushed["type"], "view");
    assert_eq!(pushed["view"]["points_balance"], 1_010);
    assert_eq!(pushed["view"]["tier"], "silver");
    assert_eq!(pushed["position"], r.body["position"], "the view carries the last event it applied");
}

#[tokio::test]
async fn a_malformed_message_gets_an_error_and_the_socket_stays_open() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.catch_up().await;
    let mut socket = connect(&app).await;
    for bad in ["not json", r#"{"subscribe": "orders"}"#, r#"{"subscribe": 5}"#, r#"{"shout": "member:m1"}"#] {
        send_raw(&mut socket, bad).await;
        let reply = common::next_json(&mut socket).await;
        assert_eq!(reply["type"], "error", "{bad}");
        assert_eq!(reply["code"], "invalid_request");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    send(&mut socket, json!({"subscribe": "member:m1"})).await;
    assert_eq!(common::next_json(&mut socket).await["view"]["member_id"], "m1");
}

#[tokio::test]
async fn unsubscribing_stops_the_updates_and_members_topic_sees_everyone() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.catch_up().await;
    let mut watcher = connect(&app).await;
    send(&mut watcher, json!({"subscribe": "member:m1"})).await;
    common::next_json(&mut watcher).await;
    send(&mut watcher, json!({"unsubscribe": "member:m1"})).await;

    let mut staff = connect(&app).await;
    send(&mut staff, json!({"subscribe": "members"})).await;
    // Let both subscriptions register before the changes.
    send(&mut staff, json!({"subscribe": "member:m1"})).await;
    assert_eq!(common::next_json(&mut staff).await["topic"], "member:m1");

    app.enroll("m2", "Bob", "bob@example.com").await;
    let update = common::next_json(&mut staff).await;
    assert_eq!(update["topic"], "member:m2");
    assert_eq!(update["view"]["name"], "Bob");

    // The unsubscribed socket gets nothing for m1: the next message it sees is the error we provoke.
    app.earn("m1", 5).await;
    app.catch_up().await;
    send_raw(&mut watcher, "ping?").await;
    assert_eq!(common::next_json(&mut watcher).await["type"], "error");
}

#[tokio::test]
async fn a_view_appears_on_the_socket_when_the_member_is_enrolled_later() {
    let app = spawn_app().await;
    let mut socket = connect(&app).await;
    send(&mut socket, json!({"subscribe": "member:late"})).await;
    app.enroll("late", "Late Comer", "late@example.com").await;
    let view = common::next_json(&mut socket).await;
    assert_eq!(view["view"]["name"], "Late Comer");
}

#[tokio::test]
async fn a_ping_gets_its_pong_and_a_close_gets_its_reply() {
    let app = spawn_app().await;
    let mut socket = connect(&app).await;
    socket.send(Message::Ping(b"are you there".to_vec().into())).await.expect("sent");
    let pong = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("an answer within 5 s");
    assert!(matches!(pong, Some(Ok(Message::Pong(ref data))) if &data[..] == b"are you there"), "{pong:?}");

    socket.close(None).await.expect("close sent");
    // The closing handshake completes: the server's close frame, then the end of the stream
    // (a connection dropped without it would be an error here).
    let reply = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("an answer within 5 s");
    assert!(matches!(reply, Some(Ok(Message::Close(_)))), "{reply:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), socket.next()).await.expect("closed within 5 s");
    assert!(end.is_none(), "{end:?}");
}

#[tokio::test]
async fn a_plain_request_to_ws_is_refused_with_an_error_code() {
    let app = spawn_app().await;
    let reply = app.get("/ws").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.code(), "invalid_request");
    let old = app
        .send(
            reqwest::Method::GET,
            "/ws",
            None,
            &[
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "8"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        )
        .await;
    assert_eq!(old.status, 400);
    assert_eq!(old.code(), "invalid_request");
    assert_eq!(old.header("sec-websocket-version"), Some("13"));
}

/// The operations page's feed: staff get a sample of every consumer at once and one a second
/// after; members may not watch it, and `members` subscribers do not get it.
#[tokio::test]
async fn the_operations_topic_sends_staff_a_sample_at_once_then_one_a_second() {
    let app = spawn_app().await;
    app.enroll("m1", "Ada", "ada@example.com").await;
    app.catch_up().await;
    let mut staff = connect(&app).await;
    send(&mut staff, json!({"subscribe": "operations"})).await;
    let first = common::next_json(&mut staff).await;
    assert_eq!((first["type"].as_str(), first["topic"].as_str()), (Some("view"), Some("operations")));
    let names: Vec<&str> =
        first["view"]["items"].as_array().into_iter().flatten().filter_map(|i| i["name"].as_str()).collect();
    assert!(names.contains(&"membership_view") && names.contains(&"loyalty_policy"), "{first}");
    let mut everyone = connect(&app).await;
    send(&mut everyone, json!({"subscribe": "members"})).await;
    let second =
        tokio::time::timeout(Duration::from_secs(3), common::next_json(&mut staff)).await.expect("a sample a second");
    assert_eq!(second["topic"], "operations");
    assert_ne!(second["view"]["at"], first["view"]["at"], "a new sample");
    let third = tokio::time::timeout(Duration::from_secs(3), common::next_json(&mut staff)).await.expect("and another");
    assert!(third["position"].as_u64() > second["position"].as_u64());
    // `members` subscribers heard none of them: the next frame is the error provoked now.
    send_raw(&mut everyone, "ping?").await;
    assert_eq!(common::next_json(&mut everyone).await["type"], "error");

    let (_, cookie) = app.join("Mo", "mo@example.com", "a long password 4").await;
    let mut member = common::ws_connect(&app, common::As::Session(&cookie)).await.expect("ws");
    send(&mut member, json!({"subscribe": "operations"})).await;
    let refused = common::next_json(&mut member).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("forbidden")), "{refused}");
}
