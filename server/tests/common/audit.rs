//! The audit every fault case ends with: every acknowledged command is in the log exactly once,
//! none that was refused or left unanswered is in it twice, and every view equals what an offline
//! rebuild of the log gives.

use futures::StreamExt;
use serde_json::{json, Value};
use server::projector::membership_view;
use server::store::{PoolSizes, Store};
use std::collections::HashMap;

/// What one command of a load was answered: its earn's unique reason, and the status (0 when no
/// answer came: connection refused or cut).
pub type Sent = (String, u16);

/// `count` earns of 1 point spread over `members`, sent `concurrency` at a time through the
/// servers at `bases` in turn, each with a unique reason `<tag>-<n>` that finds it in the log.
pub async fn earns(
    client: &reqwest::Client,
    bases: &[String],
    members: &[String],
    tag: &str,
    count: usize,
    concurrency: usize,
) -> Vec<Sent> {
    let requests = (0..count).map(|n| {
        let url = format!("{}/api/members/{}/points/earn", bases[n % bases.len()], members[n % members.len()]);
        let reason = format!("{tag}-{n}");
        let request = client.post(url).json(&json!({"points": 1, "reason": reason}));
        async move {
            let status = match request.send().await {
                Ok(response) => response.status().as_u16(),
                Err(_) => 0,
            };
            (reason, status)
        }
    });
    futures::stream::iter(requests).buffer_unordered(concurrency).collect().await
}

/// Enroll `n` members `<prefix>0…` through `base`; their ids.
pub async fn enroll(client: &reqwest::Client, base: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}{i}");
        let body = json!({"member_id": id, "name": format!("Member {i}"), "email": format!("{id}@example.com")});
        let status = client.post(format!("{base}/api/members")).json(&body).send().await.map(|r| r.status().as_u16());
        assert_eq!(status.ok(), Some(201), "enrolling {id}");
        ids.push(id);
    }
    ids
}

/// The audit, on the database at `db` (on SQLite, once no server holds the file): every command
/// in `sent` answered 200 appears exactly once in the log, every other one at most once, and the
/// views equal a rebuild. Returns how many were acknowledged.
pub async fn audit(db: &str, sent: &[Sent]) -> usize {
    let store = Store::open(db, &PoolSizes { read: 2, write: 2 }, true).await.expect("store opens for the audit");
    let events = store.read_all(0, i64::MAX).await.expect("events");
    let mut found: HashMap<&str, usize> = HashMap::new();
    for event in &events {
        if event.event_type == "PointsEarned" {
            if let Some(reason) = event.data["reason"].as_str() {
                *found.entry(reason).or_default() += 1;
            }
        }
    }
    let mut acknowledged = 0;
    for (reason, status) in sent {
        let times = found.get(reason.as_str()).copied().unwrap_or(0);
        if *status == 200 {
            acknowledged += 1;
            assert_eq!(times, 1, "{reason} was acknowledged, and is in the log {times} times");
        } else {
            assert!(times <= 1, "{reason} (answered {status}) is in the log {times} times");
        }
    }
    views_match_a_rebuild(&store, &events).await;
    store.write.close().await;
    acknowledged
}

/// Every view equals a fresh rebuild from the events; positions are unique; every purchase is
/// closed once and earns at most once.
pub async fn views_match_a_rebuild(store: &Store, events: &[server::store::StoredEvent]) {
    let mut positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    positions.dedup();
    assert_eq!(positions.len(), events.len(), "positions are unique");

    let mut rebuilt: HashMap<String, app::views::MembershipView> = HashMap::new();
    let mut closings: HashMap<String, usize> = HashMap::new();
    let mut earned_for: HashMap<String, usize> = HashMap::new();
    for e in events {
        if let Some(id) = e.stream_key("member-") {
            let event: app::domain::member::MemberEvent = e.decode().expect("member event");
            if let app::domain::member::MemberEvent::PointsEarned { transaction_id: Some(t), .. } = &event {
                *earned_for.entry(t.clone()).or_default() += 1;
            }
            if let Some(view) = membership_view::evolve(rebuilt.remove(id), e, &event) {
                rebuilt.insert(id.to_string(), view);
            }
        } else if let Some(txn) = e.stream_key("transaction-") {
            if e.event_type != "TransactionPerformed" {
                *closings.entry(txn.to_string()).or_default() += 1;
            }
        }
    }
    for (id, view) in &rebuilt {
        let (stored, _) = server::queries::member_view(store, id).await.expect("query").expect("view row exists");
        let stored: app::views::MembershipView = serde_json::from_str(&stored).expect("view json");
        assert_eq!(&stored, view, "view of {id} differs from a rebuild");
    }
    let performed = events.iter().filter(|e| e.event_type == "TransactionPerformed").count();
    assert_eq!(closings.len(), performed, "every purchase is closed");
    assert!(closings.values().all(|n| *n == 1), "no purchase is closed twice");
    assert!(earned_for.values().all(|n| *n == 1), "no purchase earns twice");
}

/// `/healthz` of the server at `base`: its status and body.
pub async fn health(client: &reqwest::Client, base: &str) -> (u16, Value) {
    let response = client.get(format!("{base}/healthz?verbose")).send().await.expect("healthz answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Every view row (and search row) as stored, keyed by member.
pub async fn view_rows(store: &server::store::Store) -> Vec<(String, String)> {
    use sqlx::Row;
    let views = sqlx::query("SELECT member_id, view FROM membership_view ORDER BY member_id")
        .fetch_all(&store.read)
        .await
        .unwrap();
    let search = sqlx::query(
        "SELECT member_id, name, email, search_text, sort_key, tier, status, member_since, position \
         FROM member_search ORDER BY member_id",
    )
    .fetch_all(&store.read)
    .await
    .unwrap();
    let mut rows: Vec<(String, String)> =
        views.iter().map(|r| (r.get::<String, _>("member_id"), r.get::<String, _>("view"))).collect();
    for r in &search {
        let line = format!(
            "{}|{}|{}|{}|{}|{}|{}",
            r.get::<String, _>("name"),
            r.get::<String, _>("email"),
            r.get::<String, _>("search_text"),
            r.get::<String, _>("sort_key"),
            r.get::<String, _>("tier"),
            r.get::<String, _>("status"),
            r.get::<i64, _>("position"),
        );
        rows.push((
            format!("search:{}", r.get::<String, _>("member_id")),
            format!("{line}|{}", r.get::<String, _>("member_since")),
        ));
    }
    rows
}
