//! SQLite's log has no index by stream: each event names its stream's previous one, and the
//! stream heads, written behind the log, say where each stream ends (`store::sqlite::heads`). These check
//! that a stream read along its chain is exactly the stream, before and after the heads are
//! written, after a crash that lost the newest of them, on a file made before the chains, and that
//! a stream version is never taken twice, even by an append the heads did not see.

mod common;

use server::commands::{Answer, CommandError, Envelope, MemberAction, StateCache};
use server::store::{NewEvent, PoolSizes, Store, StoredEvent, EVENT_COLUMNS};
use sqlx::Row;
use std::path::Path;

const NOW: &str = "2026-11-23T10:00:00Z";

fn member(id: &str, action: MemberAction) -> Envelope {
    common::member_command(id, action)
}

fn enroll(id: &str) -> Envelope {
    member(id, MemberAction::Enroll { name: format!("Member {id}"), email: format!("{id}@example.com"), account: None })
}

fn earn(id: &str, points: u64) -> Envelope {
    member(id, MemberAction::Earn { points, reason: None })
}

async fn open(path: &Path) -> Store {
    Store::open(&path.display().to_string(), &PoolSizes { read: 2, write: 2 }, true).await.expect("store")
}

/// One batch as the command writer runs it: holding the write connection, on the native one,
/// handing what it appended to the store after the commit.
async fn run(store: &Store, cache: &mut StateCache, envelopes: &[Envelope]) -> Vec<Result<Answer, CommandError>> {
    let _writing = store.write.acquire().await.expect("write connection");
    let native = store.native.as_ref().expect("a SQLite file has a native connection");
    let executed = common::native_batch(native, envelopes, NOW, cache).await.expect("batch");
    store.committed(executed.appended);
    executed.answers
}

/// A stream as a full scan of the log finds it: what its chain must give.
async fn scanned(store: &Store, stream: &str) -> Vec<StoredEvent> {
    let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE stream_id = $1 ORDER BY stream_version");
    let rows = sqlx::query(&sql).bind(stream).fetch_all(&store.read).await.expect("scan");
    rows.iter().map(|row| StoredEvent::from_row(row).expect("event")).collect()
}

fn json(events: &[StoredEvent]) -> serde_json::Value {
    serde_json::to_value(events).expect("json")
}

/// Every stream read along its chain equals the scan, and none is empty but `member-nobody`.
async fn assert_chains(store: &Store, streams: &[&str]) {
    for stream in streams {
        let read = store.read_stream(stream).await.expect("read stream");
        assert_eq!(json(&read), json(&scanned(store, stream).await), "stream {stream}");
        assert!(!read.is_empty(), "stream {stream} is empty");
    }
    assert!(store.read_stream("member-nobody").await.expect("read").is_empty());
}

async fn number(store: &Store, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(&store.read).await.expect("query").try_get::<i64, _>(0).expect("number")
}

/// What `stream_heads` must hold: each stream's newest version and position.
async fn assert_heads_table_complete(store: &Store) {
    let missing = number(
        store,
        "SELECT COUNT(*) FROM (SELECT stream_id, MAX(stream_version) AS v, MAX(position) AS p FROM events \
         GROUP BY stream_id) AS e LEFT JOIN stream_heads AS h ON h.stream_id = e.stream_id \
         WHERE h.version IS NOT e.v OR h.position IS NOT e.p",
    )
    .await;
    assert_eq!(missing, 0, "streams whose head the table does not have right");
}

/// The version the answer of an accepted member command reports.
fn version(answer: &Result<Answer, CommandError>) -> i64 {
    match &answer.as_ref().expect("accepted").outcome {
        server::commands::Outcome::Member(member) => member.version,
        other => panic!("not a member command's outcome: {other:?}"),
    }
}

const STREAMS: [&str; 3] = ["member-m1", "member-m2", "member-m3"];

/// Interleaved appends to three members, several to one member in the same batch.
async fn some_history(store: &Store, cache: &mut StateCache) {
    run(store, cache, &[enroll("m1"), enroll("m2"), earn("m1", 5)]).await;
    for i in 0..20u64 {
        let id = ["m1", "m2"][i as usize % 2];
        run(store, cache, &[earn(id, i + 1), earn("m1", 1)]).await;
    }
    run(store, cache, &[enroll("m3"), earn("m3", 7), earn("m2", 2)]).await;
}

#[tokio::test]
async fn streams_read_along_their_chains_are_the_whole_streams() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("chains.db");
    let store = open(&path).await;
    let mut cache = StateCache::default();
    some_history(&store, &mut cache).await;
    assert_chains(&store, &STREAMS).await;

    // A writer with nothing cached loads the streams along their chains too, and appends next.
    let answers = run(&store, &mut StateCache::default(), &[earn("m1", 1), earn("m2", 1)]).await;
    assert_eq!(version(&answers[0]), scanned(&store, "member-m1").await.len() as i64);
    assert_eq!(version(&answers[1]), scanned(&store, "member-m2").await.len() as i64);

    // Written behind the log: the table then has every head, and the reads are unchanged.
    store.flush_heads().await.expect("write heads");
    assert_heads_table_complete(&store).await;
    assert_eq!(store.flush_heads().await.expect("nothing left"), 0, "a second round has nothing to write");
    assert_chains(&store, &STREAMS).await;

    // After a restart, from the table.
    drop(store);
    let store = open(&path).await;
    assert_chains(&store, &STREAMS).await;
    let answers = run(&store, &mut StateCache::default(), &[earn("m3", 1)]).await;
    assert_eq!(version(&answers[0]), 3);
}

#[tokio::test]
async fn heads_a_crash_lost_are_read_back_from_the_log() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir.path().join("live.db")).await;
    let mut cache = StateCache::default();
    // m4 does not change after its heads are written: after the crash, only the table has it.
    run(&store, &mut cache, &[enroll("m1"), enroll("m2"), enroll("m4")]).await;
    store.flush_heads().await.expect("write heads");
    let early = number(&store, "SELECT MAX(position) FROM events").await;
    some_history(&store, &mut cache).await;

    // The file as a crash would leave it: committed events, and heads written only up to
    // `early` (the table as of that checkpoint: streams that moved on since are not in it).
    let image = dir.path().join("crashed.db");
    sqlx::query("VACUUM INTO $1").bind(image.display().to_string()).execute(&store.read).await.expect("copy");
    drop(store);
    {
        let url = format!("sqlite://{}", image.display());
        let crashed = sqlx::SqlitePool::connect(&url).await.expect("open the image");
        sqlx::query("UPDATE checkpoints SET position = $1 WHERE name = 'stream_heads'")
            .bind(early)
            .execute(&crashed)
            .await
            .expect("checkpoint back");
        sqlx::query("DELETE FROM stream_heads WHERE position > $1").bind(early).execute(&crashed).await.expect("heads");
        crashed.close().await;
    }

    let store = open(&image).await;
    assert_chains(&store, &["member-m1", "member-m2", "member-m3", "member-m4"]).await;
    let answers = run(&store, &mut StateCache::default(), &[earn("m1", 1), earn("m3", 1)]).await;
    assert_eq!(version(&answers[0]), scanned(&store, "member-m1").await.len() as i64);
    assert_eq!(version(&answers[1]), scanned(&store, "member-m3").await.len() as i64);
    store.flush_heads().await.expect("write heads");
    assert_heads_table_complete(&store).await;
}

#[tokio::test]
async fn a_version_appended_behind_the_heads_back_is_still_never_taken_twice() {
    let dir = tempfile::tempdir().expect("dir");
    let store = open(&dir.path().join("foreign.db")).await;
    run(&store, &mut StateCache::default(), &[enroll("m1")]).await;
    let first = number(&store, "SELECT MAX(position) FROM events").await;

    // Version 2 of m1, written around the store (a hand edit, another process): the heads in
    // memory still say version 1.
    sqlx::query(
        "INSERT INTO events (stream_id, stream_version, previous_position, event_type, schema_version, data, \
         metadata, recorded_at) VALUES ('member-m1', 2, $1, 'PointsEarned', 1, \
         '{\"points\":1,\"reason\":\"hand\",\"transaction_id\":null,\"balance_after\":1,\"lifetime_after\":1}', \
         '{}', '2026-11-23T10:00:00Z')",
    )
    .bind(first)
    .execute(&mut *store.write.acquire().await.expect("write connection"))
    .await
    .expect("insert behind the store's back");

    let native = store.native.clone().expect("native");
    let event = |version: i64| NewEvent {
        stream_id: "member-m1".into(),
        stream_version: version,
        event_type: "PointsEarned",
        schema_version: 1,
        data: serde_json::json!({"points": 1, "reason": "test", "transaction_id": null, "balance_after": 2, "lifetime_after": 2}),
        metadata: serde_json::json!({}),
    };
    let taken = common::native_append(&native, vec![event(2)], NOW).await;
    let err = taken.expect_err("version 2 is taken");
    assert!(server::store::is_unique_violation(&err), "not reported as a unique violation: {err}");
    let next = common::native_append(&native, vec![event(3)], NOW).await;
    assert!(next.is_ok(), "{next:?}");
    assert_eq!(number(&store, "SELECT COUNT(*) FROM events WHERE stream_id = 'member-m1'").await, 3);
    assert_chains(&store, &["member-m1"]).await;
}

#[tokio::test]
async fn a_file_made_before_the_chains_gets_them_when_opened() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("old.db");
    // The schema as it was (migrations 1 to 4), with a history in it.
    let old = dir.path().join("old-migrations");
    std::fs::create_dir(&old).expect("dir");
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&here).expect("migrations") {
        let entry = entry.expect("entry");
        let name = entry.file_name().to_string_lossy().to_string();
        if name.as_str() < "0005" {
            std::fs::copy(entry.path(), old.join(&name)).expect("copy");
        }
    }
    {
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
        sqlx::migrate::Migrator::new(old.as_path()).await.expect("migrator").run(&pool).await.expect("old schema");
        for (stream, version) in
            [("member-a", 1), ("member-b", 1), ("member-a", 2), ("member-b", 2), ("member-a", 3), ("member-c", 1)]
        {
            sqlx::query(
                "INSERT INTO events (stream_id, stream_version, event_type, schema_version, data, metadata, recorded_at) \
                 VALUES ($1, $2, 'E', 1, '{}', '{}', '2026-11-23T10:00:00Z')",
            )
            .bind(stream)
            .bind(version)
            .execute(&pool)
            .await
            .expect("event");
        }
        // A position once used, then gone: it must not be handed out again.
        sqlx::query("DELETE FROM events WHERE position = 6").execute(&pool).await.expect("delete");
        pool.close().await;
    }

    let store = open(&path).await;
    assert_chains(&store, &["member-a", "member-b"]).await;
    assert!(store.read_stream("member-c").await.expect("read").is_empty());
    assert_heads_table_complete(&store).await;
    let chained: Vec<Option<i64>> = sqlx::query("SELECT previous_position FROM events ORDER BY position")
        .fetch_all(&store.read)
        .await
        .expect("chain")
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(chained, vec![None, None, Some(1), Some(2), Some(3)]);

    let native = store.native.clone().expect("native");
    let next = NewEvent {
        stream_id: "member-a".into(),
        stream_version: 4,
        event_type: "E",
        schema_version: 1,
        data: serde_json::json!({}),
        metadata: serde_json::json!({}),
    };
    let appended = common::native_append(&native, vec![next], NOW).await.expect("append");
    assert_eq!(appended[0].position, 7, "position 6 was used once");
    assert_chains(&store, &["member-a"]).await;
}
