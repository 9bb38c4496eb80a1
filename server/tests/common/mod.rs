//! Boot the real app on 127.0.0.1:0 with its own database file and talk HTTP/WebSocket to it.
#![allow(dead_code)]

pub mod audit;

use serde_json::{json, Value};
use server::config::{AccessArgs, DatabaseArgs, ServeArgs};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    /// Sends an admin key (a bearer token) with every request, unless the request names its
    /// own `authorization`.
    pub client: reqwest::Client,
    /// Sends no credentials.
    pub anon: reqwest::Client,
    /// The admin key's token.
    pub admin_token: String,
    pub state: server::AppState,
    pub database_url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: std::sync::Arc<tempfile::TempDir>,
}

pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The response's status, headers and body (JSON, or the text as a JSON string).
    pub async fn of(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body =
            if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
        Reply { status, headers, body }
    }

    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Who a request is sent as.
#[derive(Debug, Clone, Copy)]
pub enum As<'a> {
    Anonymous,
    /// A key's token.
    Key(&'a str),
    /// A session cookie (`tally_session=…`); the request comes from the app's own origin.
    Session(&'a str),
}

/// The session cookie a response set (`name=value`), if any.
pub fn session_cookie(reply: &Reply) -> Option<String> {
    session_cookie_in(&reply.headers)
}

/// The session cookie these response headers set (`name=value`), if any.
pub fn session_cookie_in(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("tally_session=") && !c.contains("Max-Age=0"))
        .and_then(|c| c.split(';').next())
        .map(str::to_string)
}

/// A command on a member, as the HTTP handlers build it.
pub fn member_command(id: &str, action: server::commands::MemberAction) -> server::commands::Envelope {
    server::commands::Envelope {
        command: server::commands::Command::Member { member_id: id.into(), action },
        expected_version: None,
        idempotency: None,
        meta: server::commands::Meta { correlation_id: "test".into(), causation_id: None, actor: "test".into() },
    }
}

pub fn args(database_url: &str) -> ServeArgs {
    ServeArgs {
        addr: "127.0.0.1:0".parse().expect("address"),
        db: DatabaseArgs { database_url: database_url.to_string(), durable: true, read_pool: 4, write_pool: 4 },
        demo: false,
        poll_ms: 250,
        write_behind_ms: 1000,
        leader_retry_ms: 100,
        park_after: server::config::PARK_AFTER,
        request_timeout_secs: 30,
        unhealthy_after_secs: 30,
        access: AccessArgs::default(),
        cdc_config: None,
        faults: Default::default(),
    }
}

/// A client that sends `Authorization: Bearer <token>` with every request.
pub fn bearer_client(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")).expect("token is a header value");
    headers.insert(reqwest::header::AUTHORIZATION, value);
    reqwest::Client::builder().default_headers(headers).build().expect("client")
}

/// `tally keys create` on `db` (creating its schema if needed): the token it prints last.
pub fn create_key_cli(db: &str, role: &str) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["keys", "create", "--database-url", db, "--name", &format!("test {role}"), "--role", role])
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally keys create runs");
    assert!(output.status.success(), "tally keys create failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    stdout.lines().last().expect("a token on the last line").trim().to_string()
}

/// The store the suite runs against: a fresh SQLite file, or with `TALLY_TEST_STORE=postgres` a
/// fresh PostgreSQL database on the server at `TALLY_TEST_POSTGRES`
/// (default `postgres://postgres@127.0.0.1:5432/test`).
pub async fn fresh_database() -> (String, std::sync::Arc<tempfile::TempDir>) {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    match std::env::var("TALLY_TEST_STORE").as_deref() {
        Ok("postgres") => {
            let admin_url = std::env::var("TALLY_TEST_POSTGRES")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
            use sqlx::Connection;
            let name = format!("tally_t_{}", uuid::Uuid::new_v4().simple());
            let mut admin = sqlx::PgConnection::connect(&admin_url).await.expect("PostgreSQL reachable");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create database");
            let base = admin_url.rsplit_once('/').map(|(base, _)| base).unwrap_or(&admin_url);
            (format!("{base}/{name}"), dir)
        }
        Ok(other) if other != "sqlite" => panic!("TALLY_TEST_STORE must be sqlite or postgres, not {other}"),
        _ => sqlite_database(),
    }
}

/// A fresh SQLite file, whatever `TALLY_TEST_STORE` says.
pub fn sqlite_database() -> (String, std::sync::Arc<tempfile::TempDir>) {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("temp dir"));
    let path: PathBuf = dir.path().join("tally.db");
    (path.to_string_lossy().to_string(), dir)
}

pub async fn spawn_app() -> TestApp {
    let (url, dir) = fresh_database().await;
    spawn_on(&url, dir).await
}

/// Start the app on a given database (kept alive by `dir`).
pub async fn spawn_on(database_url: &str, dir: std::sync::Arc<tempfile::TempDir>) -> TestApp {
    spawn_with(&args(database_url), dir).await
}

/// Start the app with these options (on the database they name, kept alive by `dir`).
pub async fn spawn_with(args: &ServeArgs, dir: std::sync::Arc<tempfile::TempDir>) -> TestApp {
    let database_url = args.db.database_url.as_str();
    server::telemetry::init_tracing();
    let tally = server::build(args).await.expect("app builds");
    let addr = tally.local_addr().expect("bound");
    let state = tally.state.clone();
    let shutdown = tally.shutdown_token();
    let (_, admin_token) = state.auth.keys.create("test admin", "admin", "system").await.expect("an admin key");
    let task = tokio::spawn(tally.serve());
    TestApp {
        addr,
        base: format!("http://{addr}"),
        client: bearer_client(&admin_token),
        anon: reqwest::Client::new(),
        admin_token,
        state,
        database_url: database_url.to_string(),
        shutdown,
        task,
        _dir: dir,
    }
}

impl TestApp {
    /// Stop gracefully and start a new app on the same database.
    pub async fn restart(self) -> TestApp {
        let (url, dir) = (self.database_url.clone(), self._dir.clone());
        self.stop().await;
        spawn_on(&url, dir).await
    }

    /// Keep the database files after `stop` for as long as the returned guard lives.
    pub fn keep_files(&self) -> std::sync::Arc<tempfile::TempDir> {
        self._dir.clone()
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        drop(self.state);
        let _ = tokio::time::timeout(Duration::from_secs(15), self.task).await;
    }

    pub async fn catch_up(&self) {
        self.state.consumers.catch_up(Duration::from_secs(20)).await.expect("consumers catch up");
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::of(req.send().await.expect("request sent")).await
    }

    /// A request as `who`: JSON body, and for a session its cookie and this app's `Origin`.
    pub async fn request(&self, who: As<'_>, method: reqwest::Method, path: &str, body: Option<Value>) -> Reply {
        let mut req = self.anon.request(method, format!("{}{path}", self.base));
        if let Some(body) = body {
            req = req.json(&body);
        }
        req = match who {
            As::Anonymous => req,
            As::Key(token) => req.bearer_auth(token),
            As::Session(cookie) => req.header("cookie", cookie).header("origin", &self.base),
        };
        Reply::of(req.send().await.expect("request sent")).await
    }

    /// A member joins (`POST /api/signup`); returns their id and session cookie.
    pub async fn join(&self, name: &str, email: &str, password: &str) -> (String, String) {
        let body = json!({"name": name, "email": email, "password": password});
        let r = self.request(As::Anonymous, reqwest::Method::POST, "/api/signup", Some(body)).await;
        assert_eq!(r.status, 201, "signup {email}: {:?}", r.body);
        let cookie = session_cookie(&r).expect("signup signs in");
        (r.body["member_id"].as_str().expect("member id").to_string(), cookie)
    }

    /// Sign in (`POST /api/session`); the session cookie.
    pub async fn sign_in(&self, email: &str, password: &str) -> String {
        let body = json!({"email": email, "password": password});
        let r = self.request(As::Anonymous, reqwest::Method::POST, "/api/session", Some(body)).await;
        assert_eq!(r.status, 200, "sign in {email}: {:?}", r.body);
        session_cookie(&r).expect("a session cookie")
    }

    /// A person's account with `role`, its password set through its access link; their cookie.
    pub async fn person(&self, email: &str, role: &str, password: &str) -> String {
        let body = json!({"email": email, "name": format!("Person {role}"), "role": role});
        let r = self.post("/api/users", body).await;
        assert_eq!(r.status, 201, "create {email}: {:?}", r.body);
        let token = r.body["access_link"]["url"].as_str().expect("link").trim_start_matches("/claim/").to_string();
        let claim = json!({"token": token, "password": password});
        let r = self.request(As::Anonymous, reqwest::Method::POST, "/api/claim", Some(claim)).await;
        assert_eq!(r.status, 200, "claim for {email}: {:?}", r.body);
        session_cookie(&r).expect("claiming signs in")
    }

    /// A new key with `role`: its token.
    pub async fn key(&self, role: &str) -> String {
        let r = self.post("/api/keys", json!({"name": format!("{role} key"), "role": role})).await;
        assert_eq!(r.status, 201, "key {role}: {:?}", r.body);
        r.body["token"].as_str().expect("token").to_string()
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send(reqwest::Method::POST, path, Some(body), &[]).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(reqwest::Method::GET, path, None, &[]).await
    }

    pub async fn enroll(&self, id: &str, name: &str, email: &str) -> Reply {
        let r = self.post("/api/members", json!({"member_id": id, "name": name, "email": email})).await;
        assert_eq!(r.status, 201, "enroll {id}: {:?}", r.body);
        r
    }

    pub async fn earn(&self, id: &str, points: i64) -> Reply {
        self.post(&format!("/api/members/{id}/points/earn"), json!({"points": points})).await
    }

    /// The member's view once the projector has applied everything so far.
    pub async fn view(&self, id: &str) -> Value {
        self.catch_up().await;
        let r = self.get(&format!("/api/members/{id}")).await;
        assert_eq!(r.status, 200, "view of {id}: {:?}", r.body);
        r.body
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// The real `tally` binary, serving; killed (like `kill -9`) when dropped.
pub struct Binary(pub std::process::Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Binary {
    /// `kill -9` it, then start it again on `db` (a new port) and wait until it is healthy.
    /// Returns the new server and its base URL.
    pub async fn crash_and_restart(mut self, db: &str, client: &reqwest::Client) -> (Binary, String) {
        self.0.kill().expect("kill -9");
        let _ = self.0.wait();
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}");
        let server = start_binary(db, port, &[]);
        wait_healthy(client, &base).await;
        (server, base)
    }
}

/// Start `tally serve` on `db` at `port`, with these extra environment variables.
pub fn start_binary(db: &str, port: u16, env: &[(&str, &str)]) -> Binary {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--database-url", db])
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tally starts");
    Binary(child)
}

/// Wait until the server at `base` answers `/healthz`.
pub async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        if client.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("server at {base} never became healthy");
}

/// Run `work` on the event store's native connection's thread, where the command writer runs
/// (the tests that use this start no writer, so the thread is free).
pub async fn on_native<T: Send + 'static>(
    native: &server::store::Native,
    work: impl FnOnce(&mut server::store::NativeConn) -> T + Send + 'static,
) -> T {
    let (done, answer) = tokio::sync::oneshot::channel();
    native
        .serve(move |conn| {
            let _ = done.send(work(conn));
        })
        .expect("the native connection's thread runs");
    answer.await.expect("the work ran")
}

/// One command batch in one transaction of the native connection, deciding against `cache`, as
/// the command writer runs it (the caller holds the write lock, as the writer does).
pub async fn native_batch(
    native: &server::store::Native,
    envelopes: &[server::commands::Envelope],
    now: &str,
    cache: &mut server::commands::StateCache,
) -> Result<server::commands::Executed, sqlx::Error> {
    use futures::FutureExt;
    let owned = envelopes.to_vec();
    let now = now.to_string();
    let mut states = std::mem::take(cache);
    let (executed, states) = on_native(native, move |conn| {
        let refs: Vec<&server::commands::Envelope> = owned.iter().collect();
        let executed = conn.transact(|tx| {
            server::commands::execute_batch(tx, &refs, &now, Some(&mut states)).now_or_never().expect("no wait")
        });
        (executed, states)
    })
    .await;
    *cache = states;
    executed
}

/// Append `events` in one transaction of the native connection.
pub async fn native_append(
    native: &server::store::Native,
    events: Vec<server::store::NewEvent>,
    now: &str,
) -> Result<Vec<server::store::StoredEvent>, sqlx::Error> {
    use futures::FutureExt;
    use server::commands::BatchIo;
    let now = now.to_string();
    on_native(native, move |conn| conn.transact(|tx| tx.append(events, &now).now_or_never().expect("no wait"))).await
}

pub type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open `/ws` on `base` (`http://…`) as `who` (a session's upgrade carries the site's `Origin`,
/// as a browser's does).
pub async fn ws_connect_to(base: &str, who: As<'_>) -> Result<WebSocket, tokio_tungstenite::tungstenite::Error> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!("{}/ws", base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request()?;
    let headers = request.headers_mut();
    match who {
        As::Anonymous => {}
        As::Key(token) => {
            headers.insert("authorization", format!("Bearer {token}").parse().expect("header"));
        }
        As::Session(cookie) => {
            headers.insert("cookie", cookie.parse().expect("header"));
            headers.insert("origin", base.parse().expect("header"));
        }
    }
    tokio_tungstenite::connect_async(request).await.map(|(socket, _)| socket)
}

pub async fn ws_connect(app: &TestApp, who: As<'_>) -> Result<WebSocket, tokio_tungstenite::tungstenite::Error> {
    ws_connect_to(&app.base, who).await
}

/// Send `message` as a text frame.
pub async fn send_json(socket: &mut WebSocket, message: Value) {
    use futures::SinkExt;
    let text = tokio_tungstenite::tungstenite::Message::Text(message.to_string().into());
    socket.send(text).await.expect("sent");
}

/// The next text message, as JSON; fails the test after 5 s of silence.
pub async fn next_json(socket: &mut WebSocket) -> Value {
    use futures::StreamExt;
    loop {
        let message = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .expect("a message within 5 s")
            .expect("socket open")
            .expect("no socket error");
        if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
            return serde_json::from_str(&text).expect("JSON message");
        }
    }
}

/// Subscribe to `topic` and return the first message that follows.
pub async fn subscribed(socket: &mut WebSocket, topic: &str) -> Value {
    send_json(socket, json!({"subscribe": topic})).await;
    next_json(socket).await
}

/// The close code a socket gets within `within`, skipping other messages.
pub async fn closed_with(socket: &mut WebSocket, within: Duration) -> u16 {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await.expect("closed within the time") {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Whether every consumer of the server at `base` has reached the head (`GET /api/projections`).
pub async fn projections_caught_up(client: &reqwest::Client, base: &str) -> bool {
    let Ok(response) = client.get(format!("{base}/api/projections")).send().await else { return false };
    let Ok(status) = response.json::<Value>().await else { return false };
    let items = status["items"].as_array().cloned().unwrap_or_default();
    !items.is_empty() && items.iter().all(|i| i["lag"] == 0)
}

/// Stop a `tally serve` process as an orchestrator does (SIGTERM), and wait for it to exit.
pub fn terminate(mut server: Binary) {
    let pid = server.0.id().to_string();
    let _ = std::process::Command::new("kill").args(["-TERM", &pid]).status();
    let _ = server.0.wait();
}

/// A fresh PostgreSQL database, or None (the test is skipped) when no server answers and `CI`
/// is unset.
pub async fn postgres_database() -> Option<String> {
    use sqlx::Connection;
    let admin = std::env::var("TALLY_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut conn = match sqlx::PgConnection::connect(&admin).await {
        Ok(conn) => conn,
        Err(err) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: no PostgreSQL at {admin} ({err}); set TALLY_TEST_POSTGRES to run this test");
            return None;
        }
        Err(err) => panic!("CI needs PostgreSQL at {admin}: {err}"),
    };
    let name = format!("tally_t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
    let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap_or(admin);
    Some(format!("{base}/{name}"))
}

/// PostgreSQL: end every session connected to the database at `db` (as a server restart would),
/// from a connection to another database. `only_listeners`: just the LISTEN connections.
pub async fn terminate_backends_where(db: &str, only_listeners: bool) -> u64 {
    use sqlx::Connection;
    let (base, name) = db.rsplit_once('/').expect("a database URL");
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("admin connection");
    let listeners = if only_listeners { "AND query ILIKE 'LISTEN%'" } else { "" };
    let sql = format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid() {listeners}"
    );
    let ended = sqlx::query(&sql).bind(name).fetch_all(&mut admin).await.expect("terminate backends");
    ended.len() as u64
}

pub async fn terminate_backends(db: &str) -> u64 {
    terminate_backends_where(db, false).await
}
