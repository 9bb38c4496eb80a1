//! The engine under faults. Each case puts a load of earns on the server, makes something fail
//! in the middle of it, and ends with the same audit (`common::audit`): every acknowledged
//! command is in the log exactly once, nothing unacknowledged twice, and every view equals an
//! offline rebuild of the log.
//!
//! The PostgreSQL cases need a server (`TALLY_TEST_POSTGRES`, default
//! postgres://postgres@127.0.0.1:5432/test); without one they say so and pass, unless `CI` is set,
//! where they fail. The full-disk case mounts a small tmpfs, which needs root (likewise skipped
//! outside CI without it). The listener case on three nodes is in `cluster.rs`.

mod common;

use common::audit::{self, Sent};
use server::projector::membership_view;
use std::time::{Duration, Instant};

/// Wait until the event store's head reaches `position`.
async fn head_reaches(app: &common::TestApp, position: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.state.store.head().await.expect("head") < position {
        assert!(Instant::now() < deadline, "the head never reached {position}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn answered(sent: &[Sent], status: u16) -> usize {
    sent.iter().filter(|(_, s)| *s == status).count()
}

#[tokio::test]
async fn a_failed_sync_of_the_log_stops_writes_until_a_restart_and_loses_nothing_acknowledged() {
    let (db, dir) = common::sqlite_database();
    let args = common::args(&db);
    let faults = args.faults.clone();
    let app = common::spawn_with(&args, dir).await;
    let members = audit::enroll(&app.client, &app.base, "s", 8).await;
    let start = app.state.store.head().await.expect("head");

    let load = tokio::spawn({
        let (client, bases, members) = (app.client.clone(), vec![app.base.clone()], members.clone());
        async move { audit::earns(&client, &bases, &members, "sync", 800, 32).await }
    });
    head_reaches(&app, start + 100).await;
    // Committed is not yet acknowledged: an earn answered now was synced after those 100, and the
    // flusher answers in commit order, so they are acknowledged before the disk fails.
    assert_eq!(app.earn("s0", 1).await.status, 200);
    faults.fail_log_sync();
    let sent = load.await.expect("load");
    assert!(answered(&sent, 200) >= 100, "the earns before the fault are acknowledged");
    assert!(answered(&sent, 503) > 0, "the earns after the fault are refused 503");
    assert_eq!(answered(&sent, 200) + answered(&sent, 503), sent.len(), "only 200 or 503");

    // Stopped for good: even with the disk well again, no write is acknowledged.
    let refused = app.earn("s0", 1).await;
    assert_eq!((refused.status, refused.code()), (503, "unavailable"));
    let (status, health) = audit::health(&app.client, &app.base).await;
    assert_eq!(status, 503, "{health}");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("writes stopped") && reason.contains("sync"), "{health}");

    // A restart re-reads the log and takes writes again.
    let (url, files) = (app.database_url.clone(), app.keep_files());
    app.stop().await;
    let app = common::spawn_on(&url, files.clone()).await;
    assert_eq!(audit::health(&app.client, &app.base).await.0, 200);
    assert_eq!(app.earn("s0", 1).await.status, 200);
    app.catch_up().await;
    app.stop().await;
    let acknowledged = audit::audit(&url, &sent).await;
    eprintln!("sync failure: {acknowledged} of {} earns acknowledged, all in the log once", sent.len());
    drop(files);
}

/// A tmpfs mounted for the test, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().expect("dir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir.path())
            .status();
        match mounted {
            Ok(status) if status.success() => Some(SmallDisk(dir)),
            _ if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
                None
            }
            other => panic!("CI needs to mount a tmpfs for the full-disk case: {other:?}"),
        }
    }

    /// Fill what space is left with a file; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.path().join("filler");
        let mut file = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while file.write_all(&chunk).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_commands_with_503_and_they_succeed_once_there_is_room() {
    let Some(disk) = SmallDisk::mount(24) else { return };
    let db = disk.0.path().join("tally.db").to_string_lossy().to_string();
    let keep = std::sync::Arc::new(tempfile::tempdir().expect("dir"));
    let app = common::spawn_on(&db, keep.clone()).await;
    let members = audit::enroll(&app.client, &app.base, "d", 8).await;
    let filler = disk.fill();

    let full = audit::earns(&app.client, std::slice::from_ref(&app.base), &members, "full", 1500, 32).await;
    assert!(answered(&full, 503) > 0, "some earns are refused while the disk is full");
    assert_eq!(answered(&full, 200) + answered(&full, 503), full.len(), "only 200 or 503");
    let refused = app.earn("d0", 1).await;
    assert_eq!((refused.status, refused.code()), (503, "unavailable"), "{:?}", refused.body);
    assert!(refused.body["error"]["message"].as_str().is_some_and(|m| m.contains("disk is full")));

    // Room again: nothing to restart, commands are taken at once.
    std::fs::remove_file(filler).expect("free the disk");
    let after = audit::earns(&app.client, std::slice::from_ref(&app.base), &members, "after", 100, 8).await;
    assert_eq!(answered(&after, 200), after.len(), "every earn is acknowledged once there is room");
    app.catch_up().await;
    app.stop().await;
    let sent: Vec<Sent> = full.into_iter().chain(after).collect();
    let acknowledged = audit::audit(&db, &sent).await;
    eprintln!("full disk: {acknowledged} of {} earns acknowledged, all in the log once", sent.len());
    drop(disk);
}

#[tokio::test]
async fn a_consumer_that_panics_is_restarted_and_catches_up() {
    let (db, dir) = common::sqlite_database();
    let args = common::args(&db);
    let faults = args.faults.clone();
    let app = common::spawn_with(&args, dir).await;
    let members = audit::enroll(&app.client, &app.base, "p", 4).await;
    app.catch_up().await;

    faults.panic_consumer_once(membership_view::NAME);
    let sent = audit::earns(&app.client, std::slice::from_ref(&app.base), &members, "panic", 300, 16).await;
    assert_eq!(answered(&sent, 200), sent.len(), "commands do not depend on the projector");
    app.catch_up().await;
    let (status, health) = audit::health(&app.client, &app.base).await;
    assert_eq!(status, 200, "{health}");
    let parts = health["parts"].as_array().cloned().unwrap_or_default();
    let restarted = parts.iter().find(|p| p["name"] == membership_view::NAME).expect("the projector's group listed");
    assert_eq!(restarted["restarts"], 1, "{health}");
    assert!(restarted["reason"].as_str().is_none_or(|r| r.contains("panicked")), "{health}");
    for id in &members {
        let view = app.view(id).await;
        assert_eq!(view["points_balance"], 75, "{id}: every earn reached the view after the restart");
    }
    let (url, files) = (app.database_url.clone(), app.keep_files());
    app.stop().await;
    audit::audit(&url, &sent).await;
    drop(files);
}

/// A request that times out (408) while its command waits in the writer's queue takes the
/// command with it: it never runs later behind the caller's back. One the writer had already
/// taken runs once, and retrying either with its idempotency key ends with each applied once.
#[tokio::test]
async fn a_command_whose_request_timed_out_runs_once_or_not_at_all() {
    let (db, dir) = common::sqlite_database();
    let mut args = common::args(&db);
    args.request_timeout_secs = 1;
    let faults = args.faults.clone();
    let app = common::spawn_with(&args, dir).await;
    app.enroll("q1", "Quinn", "quinn@example.com").await;
    // (status, whether the answer was replayed)
    let earn = |key: &'static str, points: i64| {
        let (client, url) = (app.client.clone(), format!("{}/api/members/q1/points/earn", app.base));
        async move {
            let body = serde_json::json!({"points": points, "reason": key});
            let r = client.post(url).header("Idempotency-Key", key).json(&body).send().await.expect("sent");
            (r.status().as_u16(), r.headers().get("idempotent-replayed").is_some_and(|v| v == "true"))
        }
    };

    faults.hold_writer();
    let taken = tokio::spawn(earn("taken", 5));
    faults.writer_held().await;
    // The writer holds a batch with "taken" in it; this one waits in the queue behind it.
    assert_eq!(earn("queued", 7).await, (408, false));
    assert_eq!(taken.await.expect("taken"), (408, false));
    faults.release_writer();

    // The writer takes commands in order: once this one is answered it is past both.
    let after = app.post("/api/members/q1/points/earn", serde_json::json!({"points": 1, "reason": "after"})).await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    let view = app.view("q1").await;
    assert_eq!(view["points_balance"], 6, "the taken earn ran once, the queued one never: {view}");

    // Retried with their keys: the taken one answers as it ran, the queued one runs now.
    assert_eq!(earn("taken", 5).await, (200, true));
    assert_eq!(earn("queued", 7).await, (200, false));
    assert_eq!(app.view("q1").await["points_balance"], 13);

    let sent: Vec<Sent> = ["taken", "queued", "after"].iter().map(|r| (r.to_string(), 200)).collect();
    let (url, files) = (app.database_url.clone(), app.keep_files());
    app.stop().await;
    audit::audit(&url, &sent).await;
    drop(files);
}

#[tokio::test]
async fn a_second_server_on_the_same_file_is_refused_and_the_first_goes_on() {
    let (db, dir) = common::sqlite_database();
    let app = common::spawn_on(&db, dir).await;
    let members = audit::enroll(&app.client, &app.base, "t", 4).await;
    let load = tokio::spawn({
        let (client, bases, members) = (app.client.clone(), vec![app.base.clone()], members.clone());
        async move { audit::earns(&client, &bases, &members, "second", 400, 16).await }
    });
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--addr", &format!("127.0.0.1:{}", common::free_port()), "--database-url", &db])
        .output()
        .expect("the second server runs");
    assert!(!second.status.success(), "a second server on {db} must not start");
    let said = String::from_utf8_lossy(&second.stderr);
    let holder = format!("pid {}", std::process::id());
    assert!(said.contains(&db) && said.contains(&holder), "it names the file and the holder: {said}");
    let sent = load.await.expect("load");
    assert_eq!(answered(&sent, 200), sent.len(), "the first server took every command");
    app.catch_up().await;
    let (url, files) = (app.database_url.clone(), app.keep_files());
    app.stop().await;
    audit::audit(&url, &sent).await;
    drop(files);
}

#[tokio::test]
async fn kill_9_under_load_again_and_again_loses_nothing_acknowledged() {
    let (db, _dir) = common::fresh_database().await;
    let client = common::bearer_client(&common::create_key_cli(&db, "admin"));
    let port = common::free_port();
    let mut base = format!("http://127.0.0.1:{port}");
    let mut server = common::start_binary(&db, port, &[]);
    common::wait_healthy(&client, &base).await;
    let members = audit::enroll(&client, &base, "k", 8).await;
    let mut sent: Vec<Sent> = Vec::new();
    for round in 0..3 {
        let load = tokio::spawn({
            let (client, bases, members) = (client.clone(), vec![base.clone()], members.clone());
            async move { audit::earns(&client, &bases, &members, &format!("kill{round}"), 600, 32).await }
        });
        // Let some of the load through, then kill -9 in the middle of it.
        tokio::time::sleep(Duration::from_millis(150)).await;
        (server, base) = server.crash_and_restart(&db, &client).await;
        sent.extend(load.await.expect("load"));
    }
    assert!(answered(&sent, 200) > 0, "some earns were acknowledged before the kills");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !common::projections_caught_up(&client, &base).await {
        assert!(Instant::now() < deadline, "the consumers never caught up after the kills");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server); // SIGKILL: the audit reads the files as a crash left them, views and all
    let restarted_port = common::free_port();
    let restarted = common::start_binary(&db, restarted_port, &[]);
    let restarted_base = format!("http://127.0.0.1:{restarted_port}");
    common::wait_healthy(&client, &restarted_base).await;
    while !common::projections_caught_up(&client, &restarted_base).await {
        assert!(Instant::now() < deadline, "the consumers never caught up after the kills");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A graceful stop stores what the projector holds in memory.
    common::terminate(restarted);
    let acknowledged = audit::audit(&db, &sent).await;
    eprintln!("kill -9 ×3: {acknowledged} of {} earns acknowledged, all in the log once", sent.len());
}

/// PostgreSQL: every backend of the test's database is terminated in the middle of a load (what a
/// restart of the server does to its clients, without stopping the other tests' databases). The
/// commands in flight may fail; none that was acknowledged is lost and none applied twice, even
/// if a `COMMIT` landed as its connection died.
#[tokio::test]
async fn postgres_connections_cut_under_load_lose_and_double_nothing() {
    let Some(db) = common::postgres_database().await else { return };
    let keep = std::sync::Arc::new(tempfile::tempdir().expect("dir"));
    let app = common::spawn_on(&db, keep).await;
    let members = audit::enroll(&app.client, &app.base, "g", 8).await;
    let start = app.state.store.head().await.expect("head");
    let load = tokio::spawn({
        let (client, bases, members) = (app.client.clone(), vec![app.base.clone()], members.clone());
        async move { audit::earns(&client, &bases, &members, "cut", 900, 32).await }
    });
    for cut in 1..=3 {
        head_reaches(&app, start + 150 * cut).await;
        common::terminate_backends(&db).await;
    }
    let sent = load.await.expect("load");
    assert!(answered(&sent, 200) >= 450, "most earns are acknowledged");
    let refused = sent.iter().filter(|(_, status)| *status != 200).map(|(_, status)| *status).collect::<Vec<_>>();
    assert!(refused.iter().all(|s| *s == 503), "a lost connection answers 503, never 500: {refused:?}");
    // Back to normal: the pools reconnect.
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.earn("g0", 1).await.status != 200 {
        assert!(Instant::now() < deadline, "writes never worked again after the cut");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.catch_up().await;
    let url = app.database_url.clone();
    app.stop().await;
    let acknowledged = audit::audit(&url, &sent).await;
    eprintln!("PostgreSQL cut ×3: {acknowledged} of {} earns acknowledged, all in the log once", sent.len());
}
