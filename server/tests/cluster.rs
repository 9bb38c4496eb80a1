//! Several `tally serve` processes on one PostgreSQL: concurrent writers, one active consumer set,
//! failover by `kill -9`, leadership handed back and forth, live updates and read-your-writes
//! across nodes.
//!
//! Needs a PostgreSQL server: `TALLY_TEST_POSTGRES` (default postgres://postgres@127.0.0.1:5432/test).
//! Without one these tests say so and pass, unless `CI` is set, where they fail.

mod common;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use server::store::{PoolSizes, Store};
use sqlx::Connection;
use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// An admin key for the cluster's database (made with `tally keys create`, which creates the
/// schema first if no node has yet), and a client that sends it.
fn admin(db: &str) -> (reqwest::Client, String) {
    let token = common::create_key_cli(db, "admin");
    (common::bearer_client(&token), token)
}

struct Node {
    child: Child,
    base: String,
    port: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("port")
}

async fn start_node(db: &str, client: &reqwest::Client) -> Node {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--database-url", db])
        .env("RUST_LOG", "warn")
        .env("TALLY_LEADER_RETRY_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tally starts");
    let node = Node { child, base: format!("http://127.0.0.1:{port}"), port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if client.get(format!("{}/healthz", node.base)).send().await.is_ok_and(|r| r.status() == 200) {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node on port {port} did not start");
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> u16 {
    client.post(url).json(&body).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// True when this node's /metrics says it runs the consumers.
async fn is_leader(client: &reqwest::Client, node: &Node) -> bool {
    match client.get(format!("{}/metrics", node.base)).send().await {
        Ok(r) => r.text().await.is_ok_and(|t| t.lines().any(|l| l.trim() == "tally_consumer_leader 1")),
        Err(_) => false,
    }
}

/// Wait until every consumer has reached the head (read through `node`).
async fn settle(client: &reqwest::Client, node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status: Value =
            client.get(format!("{}/api/projections", node.base)).send().await.unwrap().json().await.unwrap();
        let items = status["items"].as_array().cloned().unwrap_or_default();
        if !items.is_empty() && items.iter().all(|i| i["lag"] == 0) {
            return;
        }
        assert!(Instant::now() < deadline, "consumers never caught up: {status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every view equals a fresh rebuild from the events; every purchase closed once and earned at
/// most once (see `common::audit`). Returns the number of events checked.
async fn assert_views_match_a_rebuild(db: &str) -> usize {
    let store = Store::open(db, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let events = store.read_all(0, i64::MAX).await.expect("events");
    common::audit::views_match_a_rebuild(&store, &events).await;
    events.len()
}

#[tokio::test]
async fn three_nodes_write_concurrently_and_every_event_is_applied_exactly_once() {
    let Some(db) = common::postgres_database().await else { return };
    let client = admin(&db).0;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(start_node(&db, &client).await);
    }
    let members = 30;
    for i in 0..members {
        let node = &nodes[i % 3];
        let body =
            json!({"member_id": format!("m{i}"), "name": format!("Member {i}"), "email": format!("m{i}@example.com")});
        assert_eq!(post(&client, format!("{}/api/members", node.base), body).await, 201);
    }
    // 900 concurrent commands through all three nodes: earns, redeems and purchases.
    let commands = (0..900).map(|n| {
        let node = &nodes[n % 3];
        let member = format!("m{}", n % members);
        let (path, body) = match n % 3 {
            0 => (format!("/api/members/{member}/points/earn"), json!({"points": 10})),
            1 => (format!("/api/members/{member}/points/redeem"), json!({"points": 3})),
            _ => (
                "/api/transactions".to_string(),
                json!({"transaction_id": format!("t{n}"), "member_id": member, "amount_cents": 1_050, "currency": "EUR", "channel": "pos"}),
            ),
        };
        post(&client, format!("{}{path}", node.base), body)
    });
    let statuses = futures::stream::iter(commands).buffer_unordered(48).collect::<Vec<u16>>().await;
    assert!(statuses.iter().all(|s| [200, 202, 422].contains(s)), "unexpected statuses: {statuses:?}");
    settle(&client, &nodes[0]).await;
    let checked = assert_views_match_a_rebuild(&db).await;
    eprintln!("multi-node: {checked} events appended and checked, 0 skipped, 0 doubled");
    assert!(checked >= members + 900);
}

#[tokio::test]
async fn when_the_consumer_node_is_killed_another_takes_over_within_two_seconds() {
    let Some(db) = common::postgres_database().await else { return };
    let client = admin(&db).0;
    let mut nodes =
        vec![start_node(&db, &client).await, start_node(&db, &client).await, start_node(&db, &client).await];
    for i in 0..10 {
        let body = json!({"member_id": format!("f{i}"), "name": "F", "email": format!("f{i}@example.com")});
        assert_eq!(post(&client, format!("{}/api/members", nodes[0].base), body).await, 201);
    }
    let mut takeovers = Vec::new();
    for round in 0..3 {
        // Load through every node while the leader dies.
        let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
        let load_client = client.clone();
        let load = tokio::spawn(async move {
            let mut n = 0usize;
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                let base = &bases[n % bases.len()];
                let body = json!({"transaction_id": format!("r{round}-{n}"), "member_id": format!("f{}", n % 10), "amount_cents": 500, "currency": "EUR", "channel": "ecommerce"});
                let _ = post(&load_client, format!("{base}/api/transactions"), body).await;
                n += 1;
            }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut leader = None;
        for (i, node) in nodes.iter().enumerate() {
            if is_leader(&client, node).await {
                leader = Some(i);
            }
        }
        let leader = leader.expect("one node leads");
        let killed = nodes.remove(leader);
        let mut killed_child = killed;
        killed_child.child.kill().expect("kill -9");
        let _ = killed_child.child.wait();
        let started = Instant::now();
        'wait: loop {
            for node in &nodes {
                if is_leader(&client, node).await {
                    break 'wait;
                }
            }
            assert!(started.elapsed() < Duration::from_secs(10), "nobody took over");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        takeovers.push(started.elapsed());
        load.await.expect("load task");
        nodes.push(start_node(&db, &client).await);
    }
    settle(&client, &nodes[0]).await;
    let checked = assert_views_match_a_rebuild(&db).await;
    takeovers.sort();
    eprintln!("failover: takeovers {takeovers:?}, median {:?}; {checked} events checked", takeovers[1]);
    assert!(takeovers[1] < Duration::from_secs(2), "median takeover {:?}", takeovers[1]);
    assert!(takeovers.iter().all(|t| *t < Duration::from_secs(2)), "takeovers {takeovers:?}");
}

/// Pause or resume a node's process (`kill -STOP` / `kill -CONT`).
fn signal(node: &Node, sig: &str) {
    let status = Command::new("kill").args([sig, &node.child.id().to_string()]).status().expect("kill runs");
    assert!(status.success(), "kill {sig}");
}

async fn wait_for_leadership(client: &reqwest::Client, node: &Node, leads: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while is_leader(client, node).await != leads {
        assert!(Instant::now() < deadline, "node on port {} never had leadership = {leads}", node.port);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Take the consumer lock away from whichever node holds it: queue for it on a connection of our
/// own, then end the holder's session; PostgreSQL grants the lock to the queued session first.
async fn take_leadership(db: &str) -> sqlx::PgConnection {
    let mut baton = sqlx::PgConnection::connect(db).await.expect("connect");
    let baton_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut baton).await.expect("pid");
    let waiting = tokio::spawn(async move {
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(server::store::CONSUMER_LEADER_LOCK)
            .execute(&mut baton)
            .await
            .expect("lock");
        baton
    });
    let mut admin = sqlx::PgConnection::connect(db).await.expect("connect");
    let locks = "FROM pg_locks WHERE locktype = 'advisory' \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let queued: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) {locks} AND NOT granted AND pid = $1"))
            .bind(baton_pid)
            .fetch_one(&mut admin)
            .await
            .expect("pg_locks");
        if queued == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "our session never queued for the lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sqlx::query(&format!("SELECT pg_terminate_backend(pid) {locks} AND granted"))
        .execute(&mut admin)
        .await
        .expect("terminate the holder");
    waiting.await.expect("lock granted to us")
}

async fn give_up_leadership(mut baton: sqlx::PgConnection) {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(server::store::CONSUMER_LEADER_LOCK)
        .execute(&mut baton)
        .await
        .expect("unlock");
}

/// The projections keep the rows they wrote in memory; a node that leads again after another node
/// ran the projections meanwhile must not apply new events on top of its old copies (the view
/// would lose the other node's changes from its activity list).
#[tokio::test]
async fn a_node_that_leads_again_after_another_did_applies_on_the_current_views() {
    let Some(db) = common::postgres_database().await else { return };
    let client = admin(&db).0;
    let a = start_node(&db, &client).await;
    wait_for_leadership(&client, &a, true).await;
    let b = start_node(&db, &client).await;
    let enroll = json!({"member_id": "m1", "name": "Ada", "email": "ada@example.com"});
    assert_eq!(post(&client, format!("{}/api/members", a.base), enroll).await, 201);
    let earn = |points: u64| json!({"points": points, "reason": format!("earned {points}")});
    assert_eq!(post(&client, format!("{}/api/members/m1/points/earn", a.base), earn(100)).await, 200);
    settle(&client, &a).await; // A's projections now hold m1's rows in memory

    // B leads (A paused, so it cannot take the lock back) and applies an earn.
    let baton = take_leadership(&db).await;
    wait_for_leadership(&client, &a, false).await;
    signal(&a, "-STOP");
    give_up_leadership(baton).await;
    wait_for_leadership(&client, &b, true).await;
    assert_eq!(post(&client, format!("{}/api/members/m1/points/earn", b.base), earn(50)).await, 200);
    settle(&client, &b).await;

    // A leads again (B paused) and applies one more.
    let baton = take_leadership(&db).await;
    wait_for_leadership(&client, &b, false).await;
    signal(&b, "-STOP");
    signal(&a, "-CONT");
    give_up_leadership(baton).await;
    wait_for_leadership(&client, &a, true).await;
    let earned = client.post(format!("{}/api/members/m1/points/earn", a.base)).json(&earn(25)).send().await.unwrap();
    assert_eq!(earned.status(), 200);
    let position = earned.json::<Value>().await.unwrap()["position"].as_i64().expect("position");
    settle(&client, &a).await;
    signal(&b, "-CONT");

    // Read-your-writes: the checkpoints can be current a moment before this node has heard the
    // view change on its listener (its view cache still holds the one before).
    let url = format!("{}/api/members/m1?min_position={position}", a.base);
    let view: Value = client.get(url).send().await.unwrap().json().await.unwrap();
    assert_eq!(view["points_balance"], 175, "{view}");
    let activity: Vec<&str> =
        view["recent_activity"].as_array().unwrap().iter().filter_map(|a| a["description"].as_str()).collect();
    assert_eq!(activity[..3], ["earned 25", "earned 50", "earned 100"], "{view}");
    assert_views_match_a_rebuild(&db).await;
}

#[tokio::test]
async fn a_socket_on_one_node_sees_a_change_made_through_another() {
    let Some(db) = common::postgres_database().await else { return };
    let (client, token) = admin(&db);
    let a = start_node(&db, &client).await;
    let b = start_node(&db, &client).await;
    let body = json!({"member_id": "x", "name": "Cross", "email": "x@example.com"});
    assert_eq!(post(&client, format!("{}/api/members", a.base), body).await, 201);
    settle(&client, &b).await;

    let mut socket = common::ws_connect_to(&b.base, common::As::Key(&token)).await.expect("ws");
    socket.send(Message::Text(json!({"subscribe": "member:x"}).to_string().into())).await.unwrap();
    let mut next = async || loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(10), socket.next()).await.expect("message").unwrap().unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    assert_eq!(next().await["view"]["points_balance"], 0);
    let earned =
        client.post(format!("{}/api/members/x/points/earn", a.base)).json(&json!({"points": 77})).send().await.unwrap();
    let position = earned.json::<Value>().await.unwrap()["position"].as_i64().unwrap();
    let pushed = next().await;
    assert_eq!(pushed["view"]["points_balance"], 77);
    assert_eq!(pushed["position"], position);

    // Read-your-writes through the other node.
    let earned =
        client.post(format!("{}/api/members/x/points/earn", a.base)).json(&json!({"points": 3})).send().await.unwrap();
    let position = earned.json::<Value>().await.unwrap()["position"].as_i64().unwrap();
    let view = client.get(format!("{}/api/members/x?min_position={position}", b.base)).send().await.unwrap();
    assert!(view.headers().get("x-view-stale").is_none());
    assert_eq!(view.json::<Value>().await.unwrap()["points_balance"], 80);
}

#[tokio::test]
async fn revoking_access_through_one_node_closes_its_sockets_on_another_within_a_second() {
    let Some(db) = common::postgres_database().await else { return };
    let client = admin(&db).0;
    let a = start_node(&db, &client).await;
    let b = start_node(&db, &client).await;

    // A member joins through A; their session works on B too (sessions live in the database).
    let joined = reqwest::Client::new()
        .post(format!("{}/api/signup", a.base))
        .json(&json!({"name": "Ada", "email": "ada@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(joined.status(), 201);
    let cookie = common::session_cookie_in(joined.headers()).expect("signed in");
    let member_id = joined.json::<Value>().await.unwrap()["member_id"].as_str().unwrap().to_string();
    settle(&client, &b).await;
    let mut member_socket = common::ws_connect_to(&b.base, common::As::Session(&cookie)).await.expect("ws on B");
    assert_eq!(common::subscribed(&mut member_socket, &format!("member:{member_id}")).await["type"], "view");

    // A key made through A, watching everyone on B.
    let made: Value = client
        .post(format!("{}/api/keys", a.base))
        .json(&json!({"name": "board", "role": "staff"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key_id, key) = (made["id"].as_str().unwrap().to_string(), made["token"].as_str().unwrap().to_string());
    let watcher = common::bearer_client(&key);
    assert_eq!(
        watcher.get(format!("{}/api/members", b.base)).send().await.unwrap().status(),
        200,
        "B knows the key now"
    );
    let mut key_socket = common::ws_connect_to(&b.base, common::As::Key(&key)).await.expect("ws on B");
    key_socket.send(Message::Text(json!({"subscribe": "members"}).to_string().into())).await.unwrap();

    // Signed out through A: B closes the session's socket within a second.
    let out = reqwest::Client::new()
        .delete(format!("{}/api/session", a.base))
        .header("cookie", &cookie)
        .header("origin", &a.base)
        .send()
        .await
        .unwrap();
    assert_eq!(out.status(), 204);
    assert_eq!(common::closed_with(&mut member_socket, Duration::from_secs(1)).await, 4401);
    let me = reqwest::Client::new().get(format!("{}/api/me", b.base)).header("cookie", &cookie).send().await.unwrap();
    assert_eq!(me.status(), 401, "B forgot the session");

    // Revoked through A: B closes the key's socket within a second and refuses the key.
    assert_eq!(client.delete(format!("{}/api/keys/{key_id}", a.base)).send().await.unwrap().status(), 204);
    assert_eq!(common::closed_with(&mut key_socket, Duration::from_secs(1)).await, 4401);
    assert_eq!(watcher.get(format!("{}/api/members", b.base)).send().await.unwrap().status(), 401);
}

/// The notice listeners' connections are cut in the middle of a load: each node notices, serves
/// from the tables meanwhile, reconnects, re-reads what changed in the gap and pushes it. Within
/// two seconds of the consumers catching up, every node's sockets and reads show the last view.
#[tokio::test]
async fn after_the_listeners_are_cut_every_node_converges_within_two_seconds() {
    let Some(db) = common::postgres_database().await else { return };
    let (client, token) = admin(&db);
    let nodes = [start_node(&db, &client).await, start_node(&db, &client).await, start_node(&db, &client).await];
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let members = common::audit::enroll(&client, &bases[0], "w", 3).await;
    settle(&client, &nodes[0]).await;
    let mut sockets = Vec::new();
    for node in &nodes {
        let mut socket = common::ws_connect_to(&node.base, common::As::Key(&token)).await.expect("ws");
        for member in &members {
            common::subscribed(&mut socket, &format!("member:{member}")).await;
        }
        sockets.push(socket);
    }

    let load = tokio::spawn({
        let (client, bases, members) = (client.clone(), bases.clone(), members.clone());
        async move { common::audit::earns(&client, &bases, &members, "listen", 900, 24).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut = common::terminate_backends_where(&db, true).await;
    assert!(cut >= 3, "every node's listener connection was cut ({cut})");
    let sent = load.await.expect("load");
    let acknowledged = sent.iter().filter(|(_, s)| *s == 200).count();
    assert!(acknowledged >= 600, "most earns are acknowledged ({acknowledged})");
    settle(&client, &nodes[0]).await;

    // Each member's balance as the view table holds it once the consumers caught up; read from
    // the database, not through a node, since any node's cache may itself be the one behind.
    let store = Store::open(&db, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let mut expected = HashMap::new();
    for member in &members {
        let (json, _) = server::queries::member_view(&store, member).await.expect("query").expect("view row");
        let view: Value = serde_json::from_str(&json).expect("view json");
        expected.insert(format!("member:{member}"), view["points_balance"].clone());
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    for (node, socket) in nodes.iter().zip(&mut sockets) {
        let mut latest: HashMap<String, Value> = HashMap::new();
        while latest != expected {
            let left = deadline.saturating_duration_since(Instant::now());
            let text = match tokio::time::timeout(left, socket.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(_))) => continue, // pings
                _ => panic!("node {} did not converge within 2 s: {latest:?} ≠ {expected:?}", node.base),
            };
            let frame: Value = serde_json::from_str(&text).unwrap();
            if let Some(topic) = frame["topic"].as_str() {
                latest.insert(topic.to_string(), frame["view"]["points_balance"].clone());
            }
        }
        for member in &members {
            let view: Value =
                client.get(format!("{}/api/members/{member}", node.base)).send().await.unwrap().json().await.unwrap();
            assert_eq!(view["points_balance"], expected[&format!("member:{member}")], "{} reads {member}", node.base);
        }
    }
    for node in &nodes {
        let metrics = client.get(format!("{}/metrics", node.base)).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("tally_notice_listener_reconnects_total"), "{} counted its reconnect", node.base);
    }
    drop(sockets);
    drop(nodes);
    let events = store.read_all(0, i64::MAX).await.expect("events");
    common::audit::views_match_a_rebuild(&store, &events).await;
    let acknowledged_in_log = common::audit::audit(&db, &sent).await;
    assert_eq!(acknowledged_in_log, acknowledged);
}

/// A blue/green rebuild asked for through a node that does not run the consumers: the node that
/// does builds it, and every node swaps. A view is first made wrong in the table (as a projection
/// with a bug would have written it) and read through a node that caches it; after the swap
/// every node serves the rebuilt view, and that node's socket is pushed it without going back.
#[tokio::test]
async fn a_rebuild_asked_through_any_node_is_built_once_and_every_node_swaps() {
    let Some(db) = common::postgres_database().await else { return };
    let (client, token) = admin(&db);
    let a = start_node(&db, &client).await;
    wait_for_leadership(&client, &a, true).await;
    let body = json!({"member_id": "bg", "name": "Blue Green", "email": "bg@example.com"});
    assert_eq!(post(&client, format!("{}/api/members", a.base), body).await, 201);
    assert_eq!(post(&client, format!("{}/api/members/bg/points/earn", a.base), json!({"points": 10})).await, 200);
    settle(&client, &a).await;
    let mut conn = sqlx::PgConnection::connect(&db).await.expect("connect");
    sqlx::query(
        "UPDATE membership_view SET view = replace(view, '\"Blue Green\"', '\"Wrong Name\"') WHERE member_id = 'bg'",
    )
    .execute(&mut conn)
    .await
    .expect("a wrong view");
    let b = start_node(&db, &client).await;
    let name_on = async |node: &Node| -> Value {
        let view: Value =
            client.get(format!("{}/api/members/bg", node.base)).send().await.unwrap().json().await.unwrap();
        view["name"].clone()
    };
    assert_eq!(name_on(&b).await, "Wrong Name", "b reads (and caches) the table as it is");
    let mut socket = common::ws_connect_to(&b.base, common::As::Key(&token)).await.expect("ws");
    socket.send(Message::Text(json!({"subscribe": "member:bg"}).to_string().into())).await.unwrap();
    let mut next = async || loop {
        let msg =
            tokio::time::timeout(Duration::from_secs(20), socket.next()).await.expect("a frame").unwrap().unwrap();
        if let Message::Text(t) = msg {
            return serde_json::from_str::<Value>(&t).unwrap();
        }
    };
    let before = next().await;
    assert_eq!(before["view"]["name"], "Wrong Name");

    let asked = client.post(format!("{}/api/projections/membership_view/rebuild", b.base)).send().await.unwrap();
    assert_eq!(asked.status(), 202);
    let pushed = next().await;
    assert_eq!(pushed["view"]["name"], "Blue Green", "b's socket is pushed the rebuilt view");
    assert!(pushed["position"].as_i64() >= before["position"].as_i64(), "{before} then {pushed}");
    let build: Value = client
        .get(format!("{}/api/projections/membership_view/rebuild", b.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(build["state"], "swapped", "{build}");
    assert_eq!(build["restarts"], 0);
    for node in [&a, &b] {
        assert_eq!(name_on(node).await, "Blue Green", "{} serves the rebuilt view", node.base);
    }
    drop(conn);
}
