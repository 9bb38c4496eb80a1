//! Commands decided together in one group commit behave exactly as if they ran one after another:
//! the batch executor is called directly here, so every command below is in the same batch.

mod common;

use app::domain::transaction::{Channel, Purchase};
use server::commands::{
    execute_batch, Answer, Command, CommandError, Envelope, Executed, Idempotency, MemberAction, StateCache,
};
use server::store::{NewEvent, PoolSizes, Store, StoredEvent, Streams};
use sqlx::Row;

fn member(id: &str, action: MemberAction) -> Envelope {
    common::member_command(id, action)
}

fn enroll(id: &str, email: &str) -> Envelope {
    member(id, MemberAction::Enroll { name: format!("Member {id}"), email: email.into(), account: None })
}

fn earn(id: &str, points: u64) -> Envelope {
    member(id, MemberAction::Earn { points, reason: None })
}

fn keyed(mut envelope: Envelope, key: &str, request: &str) -> Envelope {
    envelope.idempotency =
        Some(Idempotency { scope: "api".into(), key: key.into(), request: request.into(), unused: false });
    envelope
}

fn purchase(transaction_id: &str, member_id: &str) -> Envelope {
    Envelope {
        command: Command::RecordPurchase(Purchase {
            transaction_id: transaction_id.into(),
            member_id: Some(member_id.into()),
            amount_cents: 1_000,
            currency: "EUR".into(),
            channel: Channel::Ecommerce,
            performed_at: "2026-11-23T10:00:00Z".into(),
        }),
        ..earn(member_id, 1)
    }
}

async fn open() -> (Store, std::sync::Arc<tempfile::TempDir>) {
    let (url, dir) = common::fresh_database().await;
    let store = Store::open(&url, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    (store, dir)
}

/// One batch in one transaction, committed, the way the command writer runs it: on a SQLite
/// file's native connection, else through sqlx.
/// The member's stream version a member command's answer reports.
fn version_of(answer: &Answer) -> i64 {
    match &answer.outcome {
        server::commands::Outcome::Member(member) => member.version,
        other => panic!("not a member command's outcome: {other:?}"),
    }
}

async fn batch(store: &Store, cache: &mut StateCache, envelopes: &[Envelope]) -> Vec<Result<Answer, CommandError>> {
    const NOW: &str = "2026-11-23T10:00:00Z";
    let mut conn = store.write.acquire().await.expect("connection");
    let head = store.head().await.expect("head");
    let executed: Executed = match &store.native {
        Some(native) => common::native_batch(native, envelopes, NOW, cache).await.expect("batch"),
        None => {
            let refs: Vec<&Envelope> = envelopes.iter().collect();
            let mut tx = store.begin_commands(&mut conn).await.expect("transaction");
            let mut streams = Streams::begin(&mut tx, store.heads()).await.expect("streams");
            let executed = execute_batch(&mut streams, &refs, NOW, Some(cache)).await.expect("batch");
            tx.commit().await.expect("commit");
            executed
        }
    };
    // What the batch reports appending is what the log holds (the consumers take it from memory).
    let stored = store.read_all(head, 10_000).await.expect("read back");
    let as_json = |events: &[StoredEvent]| serde_json::to_value(events).expect("json");
    assert_eq!(as_json(&executed.appended), as_json(&stored), "appended events differ from the stored ones");
    executed.answers
}

async fn count(store: &Store, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(&store.read).await.expect("count").try_get::<i64, _>(0).expect("number")
}

#[tokio::test]
async fn later_commands_in_a_batch_see_what_earlier_ones_decided() {
    let (store, _dir) = open().await;
    let mut cache = StateCache::default();
    let answers = batch(
        &store,
        &mut cache,
        &[
            enroll("m1", "ada@example.com"),
            enroll("m2", "ADA@example.com"), // same email, other case: taken by m1 a moment ago
            earn("m1", 30),
            member("m1", MemberAction::Redeem { points: 20, reward: None }),
            member("m1", MemberAction::Redeem { points: 20, reward: None }), // only 10 left
            earn("nobody", 5),
            member("m1", MemberAction::UpdateProfile { name: None, email: Some("ada@new.example".into()) }),
            enroll("m3", "ada@example.com"), // released by m1's change just before
        ],
    )
    .await;
    let version = |i: usize| answers[i].as_ref().map(version_of).map_err(|e| e.to_string());
    assert_eq!(version(0), Ok(1));
    assert!(matches!(answers[1], Err(CommandError::Member(_))), "second enrol with the same email is refused");
    assert_eq!((version(2), version(3)), (Ok(2), Ok(3)));
    assert!(matches!(answers[4], Err(CommandError::Member(_))), "no points left for the second redeem");
    assert!(matches!(answers[5], Err(CommandError::Member(_))), "unknown member");
    assert_eq!((version(6), version(7)), (Ok(4), Ok(1)));

    // Every appended event has its own position, in order, and answers point at their own.
    let positions: Vec<i64> = answers.iter().filter_map(|a| a.as_ref().ok()).map(Answer::position).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions grow: {positions:?}");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events").await, 5);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events WHERE stream_id = 'member-m1'").await, 4);
    let owners: Vec<(String, String)> = sqlx::query("SELECT email, member_id FROM email_reservations ORDER BY email")
        .fetch_all(&store.read)
        .await
        .expect("reservations")
        .iter()
        .map(|r| (r.get("email"), r.get("member_id")))
        .collect();
    assert_eq!(
        owners,
        vec![("ada@example.com".to_string(), "m3".to_string()), ("ada@new.example".to_string(), "m1".to_string())]
    );

    // The next batch starts from the cached states and agrees with the log.
    let answers = batch(&store, &mut cache, &[earn("m1", 1)]).await;
    assert_eq!(answers[0].as_ref().map(version_of).ok(), Some(5));
}

#[tokio::test]
async fn every_answer_of_a_batch_larger_than_one_insert_names_its_own_event() {
    // 400 events: several multi-row INSERTs (each holds at most `MAX_PARAMS / 7` events), whose
    // positions the store reports without reading the rows back on SQLite.
    let (store, _dir) = open().await;
    let mut cache = StateCache::default();
    let members = 200;
    let enrolments: Vec<Envelope> =
        (0..members).map(|i| enroll(&format!("p{i}"), &format!("p{i}@example.com"))).collect();
    batch(&store, &mut cache, &enrolments).await;
    let mut envelopes: Vec<Envelope> = (0..members).map(|i| earn(&format!("p{i}"), 1 + i as u64)).collect();
    envelopes.extend((0..members).map(|i| earn(&format!("p{}", members - 1 - i), 500)));
    let answers = batch(&store, &mut cache, &envelopes).await;
    assert!(envelopes.len() > server::store::MAX_PARAMS / 7 * 2, "spans more than two INSERTs");
    for (answer, envelope) in answers.iter().zip(&envelopes) {
        let answer = answer.as_ref().expect("earned");
        let Command::Member { member_id, action: MemberAction::Earn { points, .. } } = &envelope.command else {
            unreachable!("only earns here")
        };
        let row = sqlx::query("SELECT stream_id, data FROM events WHERE position = $1")
            .bind(answer.position())
            .fetch_one(&store.read)
            .await
            .expect("the event at the answered position");
        let data: serde_json::Value = serde_json::from_str(row.get::<&str, _>("data")).expect("json");
        assert_eq!(row.get::<String, _>("stream_id"), format!("member-{member_id}"));
        assert_eq!(data["points"], *points, "answer {answer:?} points at another command's event");
    }
}

#[tokio::test]
async fn a_repeated_idempotency_key_in_one_batch_replays_the_first_answer() {
    let (store, _dir) = open().await;
    let mut cache = StateCache::default();
    batch(&store, &mut cache, &[enroll("m1", "ada@example.com")]).await;
    let answers = batch(
        &store,
        &mut cache,
        &[
            keyed(earn("m1", 10), "k1", "earn 10"),
            keyed(earn("m1", 10), "k1", "earn 10"),
            keyed(earn("m1", 11), "k1", "earn 11"),
            keyed(member("nobody", MemberAction::Earn { points: 1, reason: None }), "k2", "earn 1"),
            keyed(enroll("nobody", "nobody@example.com"), "k2", "enroll"), // k2's first use was refused
        ],
    )
    .await;
    let first = answers[0].as_ref().expect("first earn");
    let second = answers[1].as_ref().expect("replay");
    assert_eq!((first.replayed, second.replayed), (false, true));
    assert_eq!(first.outcome, second.outcome);
    assert!(matches!(answers[2], Err(CommandError::IdempotencyKeyReused)));
    assert!(matches!(answers[3], Err(CommandError::Member(_))));
    assert_eq!(answers[4].as_ref().map(version_of).ok(), Some(1), "the enrolment ran");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events WHERE event_type = 'PointsEarned'").await, 1);

    // In a later batch the stored key replays the same answer.
    let later = batch(&store, &mut cache, &[keyed(earn("m1", 10), "k1", "earn 10")]).await;
    assert_eq!(later[0].as_ref().map(|a| (&a.outcome, a.replayed)).ok(), Some((&first.outcome, true)));
}

#[tokio::test]
async fn a_purchase_recorded_twice_in_one_batch_answers_with_its_first_position() {
    let (store, _dir) = open().await;
    let mut cache = StateCache::default();
    batch(&store, &mut cache, &[enroll("m1", "ada@example.com")]).await;
    let answers =
        batch(&store, &mut cache, &[purchase("t1", "m1"), earn("m1", 1), purchase("t1", "m1"), purchase("t2", "m1")])
            .await;
    let positions: Vec<i64> = answers.iter().map(|a| a.as_ref().expect("accepted").position()).collect();
    assert_eq!(positions[0], positions[2], "the repeat points at the first recording");
    assert!(positions[3] > positions[1]);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events WHERE event_type = 'TransactionPerformed'").await, 2);
}

#[tokio::test]
async fn states_cached_by_the_writer_follow_events_appended_by_others() {
    let (store, _dir) = open().await;
    let mut cache = StateCache::default();
    batch(&store, &mut cache, &[enroll("m1", "ada@example.com"), earn("m1", 10)]).await;
    // Someone else (another node, the loyalty policy) appends to m1 behind the writer's back.
    let mut other = StateCache::default();
    batch(&store, &mut other, &[earn("m1", 5), member("m1", MemberAction::Redeem { points: 15, reward: None })]).await;
    let answers = batch(&store, &mut cache, &[member("m1", MemberAction::Redeem { points: 1, reward: None })]).await;
    assert!(matches!(answers[0], Err(CommandError::Member(_))), "the balance is 0, not the cached 10");
    let answers = batch(&store, &mut cache, &[earn("m1", 2)]).await;
    assert_eq!(answers[0].as_ref().map(version_of).ok(), Some(5));
}

#[tokio::test]
async fn a_native_batch_that_fails_leaves_nothing_and_names_the_clash() {
    // Always a SQLite file: only SQLite has the native connection.
    let dir = tempfile::tempdir().expect("dir");
    let url = dir.path().join("native.db").display().to_string();
    let store = Store::open(&url, &PoolSizes { read: 2, write: 2 }, true).await.expect("store");
    let native = store.native.clone().expect("a SQLite file has a native connection");
    let mut cache = StateCache::default();
    batch(&store, &mut cache, &[enroll("m1", "ada@example.com")]).await;

    let event = |version: i64| NewEvent {
        stream_id: "member-m1".into(),
        stream_version: version,
        event_type: "PointsEarned",
        schema_version: 1,
        data: serde_json::json!({"points": 1}),
        metadata: serde_json::json!({}),
    };
    // Version 2 is free, version 1 is taken: the second insert fails after the first succeeded.
    let events = vec![event(2), event(1)];
    let failed = common::native_append(&native, events, "2026-11-23T10:00:00Z").await;
    let err = failed.expect_err("a taken stream version must fail the batch");
    assert!(server::store::is_unique_violation(&err), "not reported as a unique violation: {err}");
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events").await, 1, "part of a failed batch was kept");

    // The connection is sound afterwards: the next batch commits.
    let answers = batch(&store, &mut cache, &[earn("m1", 3)]).await;
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    assert_eq!(count(&store, "SELECT COUNT(*) FROM events").await, 2);
}
