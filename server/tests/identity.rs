//! Identity and access as a user meets it (API.md "Identity and access"): joining, signing in
//! and out, sessions and their cookies, passwords, access links, keys, the sign-in limits,
//! revocation reaching open sockets, the cross-site and abuse defences, and the audit trail.
//! Runs on SQLite and, with `TALLY_TEST_STORE=postgres`, on PostgreSQL.

mod common;

use common::{args, session_cookie, spawn_app, spawn_with, As, TestApp};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const PASSWORD: &str = "correct horse battery";

async fn spawn_configured(configure: impl FnOnce(&mut server::config::ServeArgs)) -> TestApp {
    let (url, dir) = common::fresh_database().await;
    let mut options = args(&url);
    configure(&mut options);
    spawn_with(&options, dir).await
}

fn header<'a>(reply: &'a common::Reply, name: &str) -> Vec<&'a str> {
    reply.headers.get_all(name).iter().filter_map(|v| v.to_str().ok()).collect()
}

async fn me(app: &TestApp, cookie: &str) -> common::Reply {
    app.request(As::Session(cookie), Method::GET, "/api/me", None).await
}

#[tokio::test]
async fn joining_enrols_the_member_and_signs_them_in_with_a_lax_http_only_cookie() {
    let app = spawn_app().await;
    let body = json!({"name": "Ada Lovelace", "email": "ada@example.com", "password": PASSWORD});
    let joined = app.request(As::Anonymous, Method::POST, "/api/signup", Some(body)).await;
    assert_eq!(joined.status, 201, "{:?}", joined.body);
    let member_id = joined.body["member_id"].as_str().expect("member id").to_string();
    assert_eq!(joined.body["version"], 1);
    let set_cookie =
        header(&joined, "set-cookie").into_iter().find(|c| c.starts_with("tally_session=")).expect("cookie");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/"] {
        assert!(set_cookie.contains(attribute), "{set_cookie} lacks {attribute}");
    }
    assert!(!set_cookie.contains("Secure"), "plain HTTP without a public https URL: {set_cookie}");

    let cookie = session_cookie(&joined).expect("cookie");
    let me = me(&app, &cookie).await;
    assert_eq!((me.body["kind"].as_str(), me.body["member_id"].as_str()), (Some("member"), Some(member_id.as_str())));
    // The enrolment is the member's own action.
    let events = app.get(&format!("/api/members/{member_id}/events")).await.body;
    assert_eq!(events["items"][0]["event_type"], "MemberEnrolled");
    assert_eq!(events["items"][0]["metadata"]["actor"], format!("member:{member_id}"));
    // Signing in again with the same email and password works.
    app.sign_in("ADA@example.com", PASSWORD).await;
}

#[tokio::test]
async fn a_refused_join_leaves_neither_a_member_nor_an_account() {
    let app = spawn_app().await;
    app.enroll("taken", "Taken", "taken@example.com").await;
    let cases = [
        (json!({"name": "Short", "email": "short@example.com", "password": "123456789"}), 400, "invalid_request"),
        (json!({"name": "Bad", "email": "not-an-email", "password": PASSWORD}), 400, "invalid_request"),
        (json!({"name": "", "email": "empty@example.com", "password": PASSWORD}), 400, "invalid_request"),
        (json!({"name": "Thief", "email": "TAKEN@example.com", "password": PASSWORD}), 409, "email_taken"),
        (
            json!({"name": "Extra", "email": "x@example.com", "password": PASSWORD, "role": "admin"}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let r = app.request(As::Anonymous, Method::POST, "/api/signup", Some(body.clone())).await;
        assert_eq!((r.status, r.code()), (status, code), "{body}");
        assert!(session_cookie(&r).is_none(), "a refused join signs no one in");
    }
    assert_eq!(app.get("/api/members").await.body["items"].as_array().map(Vec::len), Some(1));
    // The taken email's owner has no account, and the thief's password opens nothing.
    let r = app
        .request(
            As::Anonymous,
            Method::POST,
            "/api/session",
            Some(json!({"email": "taken@example.com", "password": PASSWORD})),
        )
        .await;
    assert_eq!((r.status, r.code()), (401, "invalid_credentials"));
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_email_get_the_same_answer() {
    let app = spawn_app().await;
    app.join("Ada", "ada@example.com", PASSWORD).await;
    for body in [
        json!({"email": "ada@example.com", "password": "wrong password!"}),
        json!({"email": "nobody@example.com", "password": PASSWORD}),
    ] {
        let r = app.request(As::Anonymous, Method::POST, "/api/session", Some(body)).await;
        assert_eq!((r.status, r.code()), (401, "invalid_credentials"));
        assert_eq!(r.body["error"]["message"], "the email address or the password is wrong");
        assert!(session_cookie(&r).is_none());
    }
}

#[tokio::test]
async fn signing_in_gives_a_new_session_id_and_the_old_one_stops_working() {
    let app = spawn_app().await;
    let (_, first) = app.join("Ada", "ada@example.com", PASSWORD).await;
    // Sign in again from the same browser (it sends its current cookie).
    let body = json!({"email": "ada@example.com", "password": PASSWORD});
    let again = app.request(As::Session(&first), Method::POST, "/api/session", Some(body)).await;
    assert_eq!(again.status, 200);
    let second = session_cookie(&again).expect("a new cookie");
    assert_ne!(first, second, "the session id is rotated at sign-in");
    assert_eq!(me(&app, &second).await.status, 200);
    assert_eq!(me(&app, &first).await.status, 401, "the session before sign-in is over");
}

#[tokio::test]
async fn signing_out_ends_the_session_and_clears_the_cookie() {
    let app = spawn_app().await;
    let (_, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let out = app.request(As::Session(&cookie), Method::DELETE, "/api/session", None).await;
    assert_eq!(out.status, 204);
    let cleared =
        header(&out, "set-cookie").into_iter().any(|c| c.starts_with("tally_session=") && c.contains("Max-Age=0"));
    assert!(cleared, "{:?}", header(&out, "set-cookie"));
    assert_eq!((me(&app, &cookie).await.status, me(&app, &cookie).await.code()), (401, "unauthenticated"));
    // A key has no session to end.
    let r = app.request(As::Key(&app.admin_token), Method::DELETE, "/api/session", None).await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn changing_a_password_ends_the_accounts_other_sessions_and_closes_their_sockets() {
    let app = spawn_app().await;
    let (member_id, here) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let elsewhere = app.sign_in("ada@example.com", PASSWORD).await;
    let topic = format!("member:{member_id}");
    let mut other_socket = common::ws_connect(&app, As::Session(&elsewhere)).await.expect("ws");
    assert_eq!(common::subscribed(&mut other_socket, &topic).await["type"], "view");
    let mut this_socket = common::ws_connect(&app, As::Session(&here)).await.expect("ws");
    assert_eq!(common::subscribed(&mut this_socket, &topic).await["type"], "view");

    let wrong = json!({"current_password": "not the password", "new_password": "a brand new password"});
    let r = app.request(As::Session(&here), Method::PUT, "/api/me/password", Some(wrong)).await;
    assert_eq!((r.status, r.code()), (401, "invalid_credentials"));
    let short = json!({"current_password": PASSWORD, "new_password": "short"});
    assert_eq!(app.request(As::Session(&here), Method::PUT, "/api/me/password", Some(short)).await.status, 400);

    let change = json!({"current_password": PASSWORD, "new_password": "a brand new password"});
    let r = app.request(As::Session(&here), Method::PUT, "/api/me/password", Some(change)).await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(common::closed_with(&mut other_socket, Duration::from_secs(1)).await, 4401);
    assert_eq!(me(&app, &elsewhere).await.status, 401, "the other session ended");
    assert_eq!(me(&app, &here).await.status, 200, "the session that changed it goes on");
    // This session's socket stays open: it still gets changes.
    assert_eq!(app.earn(&member_id, 5).await.status, 200);
    assert_eq!(common::subscribed(&mut this_socket, &topic).await["type"], "view");

    let old = app
        .request(
            As::Anonymous,
            Method::POST,
            "/api/session",
            Some(json!({"email": "ada@example.com", "password": PASSWORD})),
        )
        .await;
    assert_eq!(old.status, 401);
    app.sign_in("ada@example.com", "a brand new password").await;
}

#[tokio::test]
async fn an_access_link_sets_a_password_once_and_signs_in() {
    let app = spawn_app().await;
    app.enroll("m1", "Enrolled By Staff", "m1@example.com").await;
    let staff = app.person("staff@tally.example", "staff", PASSWORD).await;
    let link = app.request(As::Session(&staff), Method::POST, "/api/members/m1/access-link", None).await;
    assert_eq!(link.status, 201, "{:?}", link.body);
    let url = link.body["url"].as_str().expect("url").to_string();
    let token = url.strip_prefix("/claim/").expect("a claim path").to_string();
    assert!(link.body["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert_eq!(app.post("/api/members/nobody/access-link", json!({})).await.code(), "member_not_found");

    // The page shows a form; opening it uses nothing up.
    let page = app.request(As::Anonymous, Method::GET, &url, None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.as_str().is_some_and(|html| html.contains("Set your password")));
    let claim = json!({"token": token, "password": "members own password"});
    let claimed = app.request(As::Anonymous, Method::POST, "/api/claim", Some(claim.clone())).await;
    assert_eq!(claimed.status, 200, "{:?}", claimed.body);
    assert_eq!(claimed.body["member_id"], "m1");
    let cookie = session_cookie(&claimed).expect("claiming signs in");
    assert_eq!(me(&app, &cookie).await.body["member_id"], "m1");
    app.sign_in("m1@example.com", "members own password").await;

    // Single use.
    let again = app.request(As::Anonymous, Method::POST, "/api/claim", Some(claim)).await;
    assert_eq!((again.status, again.code()), (404, "not_found"));
    let page = app.request(As::Anonymous, Method::GET, &url, None).await;
    assert_eq!(page.status, 404);
}

#[tokio::test]
async fn an_access_link_is_kept_only_as_a_hash_and_expires() {
    let app = spawn_app().await;
    app.enroll("m1", "M", "m1@example.com").await;
    let link = app.post("/api/members/m1/access-link", json!({})).await;
    let token = link.body["url"].as_str().expect("url").trim_start_matches("/claim/").to_string();
    let store = &app.state.store;
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT token_hash FROM access_links").fetch_all(&store.read).await.expect("rows");
    assert_eq!(rows.len(), 1);
    assert_ne!(rows[0].0, token, "the token itself is not stored");
    // A day later.
    let mut conn = store.write.acquire().await.expect("conn");
    sqlx::query("UPDATE access_links SET expires_at = $1")
        .bind(chrono::Utc::now().timestamp() - 1)
        .execute(&mut *conn)
        .await
        .expect("expire");
    drop(conn);
    let claim = json!({"token": token, "password": "members own password"});
    let r = app.request(As::Anonymous, Method::POST, "/api/claim", Some(claim)).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
}

#[tokio::test]
async fn a_password_reset_link_ends_the_sessions_the_account_had() {
    let app = spawn_app().await;
    let (member_id, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let mut socket = common::ws_connect(&app, As::Session(&cookie)).await.expect("ws");
    assert_eq!(common::subscribed(&mut socket, &format!("member:{member_id}")).await["type"], "view");
    let link = app.post(&format!("/api/members/{member_id}/access-link"), json!({})).await;
    let token = link.body["url"].as_str().expect("url").trim_start_matches("/claim/").to_string();
    let r = app
        .request(
            As::Anonymous,
            Method::POST,
            "/api/claim",
            Some(json!({"token": token, "password": "a new password here"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(common::closed_with(&mut socket, Duration::from_secs(1)).await, 4401);
    assert_eq!(me(&app, &cookie).await.status, 401);
}

#[tokio::test]
async fn a_key_works_until_revoked_and_then_its_sockets_close() {
    let app = spawn_app().await;
    let made = app.post("/api/keys", json!({"name": "Till 1", "role": "staff"})).await;
    assert_eq!(made.status, 201);
    let (id, token) = (made.body["id"].as_str().expect("id"), made.body["token"].as_str().expect("token"));
    assert!(token.starts_with(&format!("tk_{id}_")), "{token}");
    assert_eq!(made.body["role"], "staff");

    let listed = app.get("/api/keys").await.body;
    let entry = listed["items"].as_array().expect("items").iter().find(|k| k["id"] == id).cloned().expect("listed");
    assert_eq!(entry["last_used_at"], Value::Null);
    assert!(entry.get("token").is_none() && !listed.to_string().contains(token), "the token is never shown again");
    let stored: Vec<(String,)> = sqlx::query_as("SELECT secret_hash FROM api_keys WHERE id = $1")
        .bind(id)
        .fetch_all(&app.state.store.read)
        .await
        .expect("row");
    assert!(!token.contains(&stored[0].0), "only a hash of the secret is kept");

    assert_eq!(app.request(As::Key(token), Method::GET, "/api/members", None).await.status, 200);
    let listed = app.get("/api/keys").await.body;
    let entry = listed["items"].as_array().expect("items").iter().find(|k| k["id"] == id).cloned().expect("listed");
    assert!(entry["last_used_at"].as_str().is_some(), "last use is kept: {entry}");

    app.enroll("m1", "M", "m1@example.com").await;
    let mut socket = common::ws_connect(&app, As::Key(token)).await.expect("ws");
    assert_eq!(common::subscribed(&mut socket, "member:m1").await["type"], "view");
    let revoked = app.request(As::Key(&app.admin_token), Method::DELETE, &format!("/api/keys/{id}"), None).await;
    assert_eq!(revoked.status, 204);
    assert_eq!(common::closed_with(&mut socket, Duration::from_secs(1)).await, 4401);
    let r = app.request(As::Key(token), Method::GET, "/api/members", None).await;
    assert_eq!((r.status, r.code()), (401, "unauthenticated"));
    assert_eq!(
        app.request(As::Key(&app.admin_token), Method::DELETE, &format!("/api/keys/{id}"), None).await.status,
        404
    );
    // A token of the right shape with a wrong secret is no one.
    let forged = format!("tk_{}_{}", app.admin_token.split('_').nth(1).expect("id"), "x".repeat(43));
    assert_eq!(app.request(As::Key(&forged), Method::GET, "/api/me", None).await.status, 401);
}

#[tokio::test]
async fn repeated_wrong_passwords_end_in_429_and_the_right_one_works_after_the_wait() {
    let app = spawn_app().await;
    app.join("Ada", "ada@example.com", PASSWORD).await;
    let attempt = |password: &'static str| {
        app.request(
            As::Anonymous,
            Method::POST,
            "/api/session",
            Some(json!({"email": "ada@example.com", "password": password})),
        )
    };
    for _ in 0..10 {
        assert_eq!(attempt("wrong password!").await.code(), "invalid_credentials");
    }
    let limited = attempt("wrong password!").await;
    assert_eq!((limited.status, limited.code()), (429, "rate_limited"));
    let wait: u64 = limited.header("retry-after").and_then(|s| s.parse().ok()).expect("Retry-After");
    assert!((1..=60).contains(&wait), "{wait}");
    // Refused before the password is even looked at: the right one too, for now.
    assert_eq!(attempt(PASSWORD).await.status, 429);
    tokio::time::sleep(Duration::from_secs(wait + 1)).await;
    assert_eq!(attempt(PASSWORD).await.status, 200, "after the wait the right password works");
}

#[tokio::test]
async fn sign_in_failures_are_limited_per_address_and_per_account() {
    let app = spawn_configured(|a| a.access.client_ip_header = Some("x-forwarded-for".into())).await;
    app.join("Ada", "ada@example.com", PASSWORD).await;
    app.join("Grace", "grace@example.com", PASSWORD).await;
    let attempt = |email: &str, from: &str| {
        let body = json!({"email": email, "password": "wrong password!"});
        app.anon
            .post(format!("{}/api/session", app.base))
            .header("x-forwarded-for", format!("10.0.0.1, {from}"))
            .json(&body)
            .send()
    };
    // One account from ten addresses: the account is limited.
    for i in 0..10 {
        assert_eq!(attempt("ada@example.com", &format!("192.0.2.{i}")).await.expect("sent").status(), 401);
    }
    assert_eq!(attempt("ada@example.com", "192.0.2.99").await.expect("sent").status(), 429);
    // One address, many accounts: the address is limited.
    for i in 0..10 {
        assert_eq!(attempt(&format!("user{i}@example.com"), "198.51.100.7").await.expect("sent").status(), 401);
    }
    assert_eq!(attempt("grace@example.com", "198.51.100.7").await.expect("sent").status(), 429);
    // Grace from elsewhere is not.
    assert_eq!(attempt("grace@example.com", "203.0.113.5").await.expect("sent").status(), 401);
}

#[tokio::test]
async fn an_idle_session_expires_and_its_sockets_close() {
    let app = spawn_configured(|a| a.access.session_idle = Duration::from_secs(2).into()).await;
    let (member_id, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let mut socket = common::ws_connect(&app, As::Session(&cookie)).await.expect("ws");
    assert_eq!(common::subscribed(&mut socket, &format!("member:{member_id}")).await["type"], "view");
    let set_cookie_age = |r: &common::Reply| {
        header(r, "set-cookie").into_iter().find(|c| c.starts_with("tally_session=")).map(str::to_string)
    };
    let joined_at = Instant::now();
    assert_eq!(me(&app, &cookie).await.status, 200);
    // Expired 2 s after its last save (the sign-up), and the socket closed within a second.
    assert_eq!(common::closed_with(&mut socket, Duration::from_secs(4)).await, 4401);
    assert!(joined_at.elapsed() < Duration::from_secs(4));
    let after = me(&app, &cookie).await;
    assert_eq!((after.status, after.code()), (401, "unauthenticated"));
    assert!(set_cookie_age(&after).is_some_and(|c| c.contains("Max-Age=0")), "the stale cookie is cleared");
}

#[tokio::test]
async fn a_session_in_use_stays_alive_and_its_cookie_follows_the_idle_time() {
    let app = spawn_configured(|a| a.access.session_idle = Duration::from_secs(3600).into()).await;
    let body = json!({"name": "Ada", "email": "ada@example.com", "password": PASSWORD});
    let joined = app.request(As::Anonymous, Method::POST, "/api/signup", Some(body)).await;
    let set_cookie = header(&joined, "set-cookie")
        .into_iter()
        .find(|c| c.starts_with("tally_session="))
        .expect("cookie")
        .to_string();
    assert!(set_cookie.contains("Max-Age=3600"), "{set_cookie}");
}

#[tokio::test]
async fn a_public_https_url_makes_cookies_secure_and_sends_hsts() {
    let app = spawn_configured(|a| a.access.public_url = "https://loyalty.example.com".into()).await;
    let body = json!({"name": "Ada", "email": "ada@example.com", "password": PASSWORD});
    let joined = app.request(As::Anonymous, Method::POST, "/api/signup", Some(body)).await;
    let set_cookie = header(&joined, "set-cookie").join("; ");
    assert!(set_cookie.contains("Secure"), "{set_cookie}");
    assert!(joined.header("strict-transport-security").is_some_and(|h| h.contains("max-age=")));
    // Signed-in changes must now come from the public origin, not the Host the test sends.
    let cookie = session_cookie(&joined).expect("cookie");
    let from = |origin: &str| {
        app.anon
            .post(format!("{}/api/members/x/points/redeem", app.base))
            .header("cookie", &cookie)
            .header("origin", origin)
            .json(&json!({"points": 1}))
            .send()
    };
    assert_eq!(from(&app.base).await.expect("sent").status(), 403);
    assert_eq!(from("https://loyalty.example.com").await.expect("sent").status(), 404, "allowed; x is not this member");
}

#[tokio::test]
async fn signed_in_changes_from_another_site_are_refused_and_keys_are_exempt() {
    let app = spawn_app().await;
    let (member_id, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    app.earn(&member_id, 100).await;
    let redeem = |origin: Option<&str>, fetch_site: Option<&str>| {
        let mut req = app
            .anon
            .post(format!("{}/api/members/{member_id}/points/redeem", app.base))
            .header("cookie", &cookie)
            .json(&json!({"points": 1}));
        if let Some(origin) = origin {
            req = req.header("origin", origin);
        }
        if let Some(site) = fetch_site {
            req = req.header("sec-fetch-site", site);
        }
        async move {
            let r = req.send().await.expect("sent");
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.ok().and_then(|b| b["error"]["code"].as_str().map(str::to_string)))
        }
    };
    let cross = (403, Some("cross_origin".to_string()));
    assert_eq!(redeem(Some("https://evil.example"), None).await, cross);
    assert_eq!(redeem(None, None).await, cross, "neither header: refused");
    assert_eq!(redeem(None, Some("cross-site")).await, cross);
    assert_eq!(redeem(Some("null"), None).await, cross);
    assert_eq!(redeem(Some(&app.base), None).await.0, 200);
    assert_eq!(redeem(None, Some("same-origin")).await.0, 200);
    let before = app.get(&format!("/api/members/{member_id}/events")).await.body["items"].as_array().map(Vec::len);

    // A server function and the socket upgrade are changes too.
    let path = <app::api::RedeemReward as leptos::server_fn::ServerFn>::PATH;
    let r = app
        .anon
        .post(format!("{}{path}", app.base))
        .header("cookie", &cookie)
        .header("origin", "https://evil.example")
        .form(&[("points", "1")])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{}/ws", app.addr))
            .expect("request");
    request.headers_mut().insert("cookie", cookie.parse().expect("header"));
    request.headers_mut().insert("origin", "https://evil.example".parse().expect("header"));
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    let after = app.get(&format!("/api/members/{member_id}/events")).await.body["items"].as_array().map(Vec::len);
    assert_eq!(before, after, "nothing refused was appended");

    // A key is not something another site can make a browser send.
    let r = app
        .client
        .post(format!("{}/api/members/{member_id}/points/earn", app.base))
        .header("origin", "https://evil.example")
        .json(&json!({"points": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    // Nor can another site sign a visitor in to an account of its choosing.
    let r = app
        .anon
        .post(format!("{}/api/session", app.base))
        .header("origin", "https://evil.example")
        .json(&json!({"email": "ada@example.com", "password": PASSWORD}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn a_command_body_that_is_not_json_is_415_and_changes_nothing() {
    let app = spawn_app().await;
    app.enroll("m1", "M", "m1@example.com").await;
    let r = app
        .client
        .post(format!("{}/api/members/m1/points/earn", app.base))
        .header("content-type", "text/plain")
        .body(r#"{"points": 5}"#)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 415);
    assert_eq!(r.json::<Value>().await.expect("json")["error"]["code"], "unsupported_media_type");
    let r = app
        .client
        .post(format!("{}/api/session", app.base))
        .form(&[("email", "a@example.com")])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 415);
    assert_eq!(app.view("m1").await["points_balance"], 0);
}

#[tokio::test]
async fn every_route_limits_its_body_and_the_search_text() {
    let app = spawn_app().await;
    let big = "x".repeat(100 * 1024);
    let path = <app::api::StaffAction as leptos::server_fn::ServerFn>::PATH;
    let r = app
        .client
        .post(format!("{}{path}", app.base))
        .form(&[("kind", "enroll"), ("name", big.as_str())])
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 413, "a server function's body is limited too");
    let r = app
        .client
        .post(format!("{}/api/session", app.base))
        .json(&json!({"email": big, "password": "x"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 413);
    let long_q = "a".repeat(201);
    let r = app.get(&format!("/api/members?q={long_q}")).await;
    assert_eq!((r.status, r.code()), (400, "invalid_request"));
    assert_eq!(app.get(&format!("/api/members?q={}", "a".repeat(200))).await.status, 200);
}

#[tokio::test]
async fn a_members_history_comes_a_page_at_a_time() {
    let app = spawn_app().await;
    app.enroll("m1", "M", "m1@example.com").await;
    for _ in 0..4 {
        app.earn("m1", 1).await;
    }
    let first = app.get("/api/members/m1/events?limit=2").await.body;
    let items = first["items"].as_array().expect("items");
    assert_eq!(items.len(), 2);
    let next = first["next"].as_i64().expect("a next page");
    assert_eq!(next, items[1]["position"].as_i64().expect("position"));
    let second = app.get(&format!("/api/members/m1/events?limit=2&after={next}")).await.body;
    let last = app.get(&format!("/api/members/m1/events?limit=2&after={}", second["next"])).await.body;
    assert_eq!(last["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(last["next"], Value::Null);
    let versions: Vec<i64> = [&first, &second, &last]
        .iter()
        .flat_map(|p| p["items"].as_array().cloned().unwrap_or_default())
        .map(|e| e["stream_version"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5]);
    for bad in ["limit=0", "limit=1001", "after=x"] {
        assert_eq!(app.get(&format!("/api/members/m1/events?{bad}")).await.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn a_socket_watches_at_most_a_hundred_topics_and_a_principal_opens_only_so_many_sockets() {
    let app = spawn_configured(|a| a.access.max_sockets_per_principal = 2).await;
    let (member_id, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let mut staff = common::ws_connect(&app, As::Key(&app.admin_token)).await.expect("ws");
    for i in 0..100 {
        staff.send(Message::Text(json!({"subscribe": format!("member:m{i}")}).to_string().into())).await.expect("sent");
    }
    let refused = common::subscribed(&mut staff, "member:m100").await;
    assert_eq!(
        (refused["code"].as_str(), refused["topic"].as_str()),
        (Some("too_many_subscriptions"), Some("member:m100"))
    );
    // Re-subscribing a watched topic is not a new one.
    staff.send(Message::Text(json!({"subscribe": "member:m5"}).to_string().into())).await.expect("sent");

    let _one = common::ws_connect(&app, As::Session(&cookie)).await.expect("first");
    let second = app.sign_in("ada@example.com", PASSWORD).await;
    let _two = common::ws_connect(&app, As::Session(&second)).await.expect("second, another session of the account");
    match common::ws_connect(&app, As::Session(&cookie)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 429),
        other => panic!("a third socket of one account: {:?}", other.map(|_| ())),
    }
    drop(_one);
    // Its place is free again once the server has seen it close.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match common::ws_connect(&app, As::Session(&second)).await {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(err) => panic!("the closed socket's place never came free: {err}"),
        }
    }
    let _ = member_id;
}

#[tokio::test]
async fn a_silent_socket_is_pinged_then_closed() {
    let app = spawn_configured(|a| a.access.ws_idle_secs = 2).await;
    let mut socket = common::ws_connect(&app, As::Key(&app.admin_token)).await.expect("ws");
    // Not reading means not answering pings (the client library answers as it reads).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut saw_ping = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await.expect("the server ends it") {
            Some(Ok(Message::Ping(_))) => saw_ping = true,
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(u16::from(frame.code), 1001);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(saw_ping, "the server pinged before giving up");

    // A client that answers (it reads) stays connected.
    let mut socket = common::ws_connect(&app, As::Key(&app.admin_token)).await.expect("ws");
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(message) = tokio::time::timeout_at(until, socket.next()).await {
        assert!(matches!(message, Some(Ok(Message::Ping(_)))), "only pings: {message:?}");
    }
}

#[tokio::test]
async fn a_client_that_sends_its_headers_too_slowly_is_cut_off() {
    let app = spawn_configured(|a| a.access.header_timeout_secs = 1).await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.expect("connect");
    tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").await.expect("partial headers");
    let started = Instant::now();
    let mut buf = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await.expect("closed within 5 s");
    assert!(read.is_ok());
    assert!(started.elapsed() < Duration::from_secs(3), "cut off after about a second: {:?}", started.elapsed());
    // A prompt client is served as usual.
    assert_eq!(app.get("/livez").await.status, 200);
}

#[tokio::test]
async fn pages_carry_security_headers_and_a_nonce_their_scripts_share() {
    let app = spawn_app().await;
    let page = app.request(As::Anonymous, Method::GET, "/", None).await;
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").expect("a CSP").to_string();
    let nonce = csp.split("'nonce-").nth(1).and_then(|r| r.split('\'').next()).expect("a nonce").to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("'wasm-unsafe-eval'"), "{csp}");
    let html = page.body.as_str().expect("html");
    assert!(html.contains(&format!("nonce=\"{nonce}\"")), "the hydration script carries the page's nonce");
    let other = app.request(As::Anonymous, Method::GET, "/", None).await;
    assert_ne!(other.header("content-security-policy"), Some(csp.as_str()), "a new nonce per page");
    for reply in [&page, &app.get("/api/members").await] {
        assert_eq!(reply.header("x-content-type-options"), Some("nosniff"));
        assert_eq!(reply.header("referrer-policy"), Some("same-origin"));
        assert!(reply.header("content-security-policy").is_some_and(|c| c.contains("frame-ancestors 'none'")));
        assert!(reply.header("strict-transport-security").is_none(), "no HSTS over plain HTTP");
    }
}

#[tokio::test]
async fn a_sign_in_made_in_a_server_function_is_saved() {
    let app = spawn_app().await;
    let (member_id, _) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let path = <app::api::SignIn as leptos::server_fn::ServerFn>::PATH;
    // As a browser posts the form without JavaScript (the redirect is looked at, not followed).
    let browser = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let r = browser
        .post(format!("{}{path}", app.base))
        .header("origin", &app.base)
        .header("accept", "text/html")
        .header("referer", format!("{}/", app.base))
        .form(&[("email", "ada@example.com"), ("password", PASSWORD), ("next", "")])
        .send()
        .await
        .expect("sent");
    let status = r.status().as_u16();
    let location = r.headers().get("location").and_then(|v| v.to_str().ok()).map(str::to_string);
    let cookie = common::session_cookie_in(r.headers()).expect("the session cookie is set");
    assert_eq!((status, location.as_deref()), (302, Some(format!("/members/{member_id}").as_str())));
    assert_eq!(me(&app, &cookie).await.body["member_id"], member_id);
    let page = app.request(As::Session(&cookie), Method::GET, &format!("/members/{member_id}"), None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.as_str().is_some_and(|h| h.contains("Redeem a reward")));
}

#[tokio::test]
async fn every_event_names_who_caused_it() {
    let app = spawn_app().await;
    let (member_id, cookie) = app.join("Ada", "ada@example.com", PASSWORD).await;
    let staff = app.person("staff@tally.example", "staff", PASSWORD).await;
    let staff_id = me(&app, &staff).await;
    let _ = staff_id;
    let channel = app.key("channel").await;
    let key_id = channel.split('_').nth(1).expect("key id").to_string();
    app.request(
        As::Session(&staff),
        Method::POST,
        &format!("/api/members/{member_id}/points/earn"),
        Some(json!({"points": 50})),
    )
    .await;
    app.request(
        As::Session(&cookie),
        Method::POST,
        &format!("/api/members/{member_id}/points/redeem"),
        Some(json!({"points": 5})),
    )
    .await;
    let purchase = json!({"transaction_id": "t1", "member_id": member_id, "amount_cents": 2000, "currency": "EUR", "channel": "pos"});
    assert_eq!(app.request(As::Key(&channel), Method::POST, "/api/transactions", Some(purchase)).await.status, 202);
    app.catch_up().await;
    let events = app.get(&format!("/api/members/{member_id}/events")).await.body;
    let actors: Vec<(String, String)> = events["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|e| {
            (
                e["event_type"].as_str().unwrap_or("").to_string(),
                e["metadata"]["actor"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let people = app.get("/api/users").await.body;
    let staff_account = people["items"][0]["id"].as_str().expect("staff id").to_string();
    assert_eq!(actors[0], ("MemberEnrolled".into(), format!("member:{member_id}")));
    assert_eq!(actors[1], ("PointsEarned".into(), format!("user:{staff_account}")));
    assert_eq!(actors[2], ("PointsRedeemed".into(), format!("member:{member_id}")));
    assert_eq!(actors[3], ("PointsEarned".into(), "policy:loyalty".into()));
    let purchase_events = app.state.store.read_stream("transaction-t1").await.expect("stream");
    assert_eq!(purchase_events[0].metadata["actor"], format!("key:{key_id}"));
    assert_eq!(purchase_events[1].metadata["actor"], "policy:loyalty");
}

#[tokio::test]
async fn the_same_idempotency_key_from_two_principals_names_two_commands() {
    let app = spawn_app().await;
    app.enroll("m1", "M", "m1@example.com").await;
    let other = app.key("staff").await;
    let earn = |token: &str| {
        app.anon
            .post(format!("{}/api/members/m1/points/earn", app.base))
            .bearer_auth(token)
            .header("idempotency-key", "same-key")
            .json(&json!({"points": 10}))
            .send()
    };
    let first: Value = earn(&app.admin_token).await.expect("sent").json().await.expect("json");
    let second: Value = earn(&other).await.expect("sent").json().await.expect("json");
    assert_ne!(first["position"], second["position"], "two commands, two events");
    let replay: Value = earn(&other).await.expect("sent").json().await.expect("json");
    assert_eq!(replay["position"], second["position"], "each principal's key replays its own answer");
    assert_eq!(app.view("m1").await["points_balance"], 20);
}

#[tokio::test]
async fn people_accounts_can_be_made_changed_and_disabled_by_admins() {
    let app = spawn_app().await;
    let staff = app.person("staff@tally.example", "staff", PASSWORD).await;
    let people = app.get("/api/users").await.body;
    let id = people["items"][0]["id"].as_str().expect("id").to_string();
    assert_eq!(people["items"][0]["role"], "staff");
    let mut socket = common::ws_connect(&app, As::Session(&staff)).await.expect("ws");
    socket.send(Message::Text(json!({"subscribe": "members"}).to_string().into())).await.expect("sent");

    // Promoted: the old session ends (and its socket); the next sign-in is an admin.
    let r = app
        .request(As::Key(&app.admin_token), Method::PATCH, &format!("/api/users/{id}"), Some(json!({"role": "admin"})))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(common::closed_with(&mut socket, Duration::from_secs(1)).await, 4401);
    assert_eq!(me(&app, &staff).await.status, 401);
    let admin = app.sign_in("staff@tally.example", PASSWORD).await;
    assert_eq!(me(&app, &admin).await.body["kind"], "admin");

    // Disabled: no more sign-ins.
    let r = app
        .request(As::Key(&app.admin_token), Method::PATCH, &format!("/api/users/{id}"), Some(json!({"disabled": true})))
        .await;
    assert_eq!(r.status, 204);
    assert_eq!(me(&app, &admin).await.status, 401);
    let r = app
        .request(
            As::Anonymous,
            Method::POST,
            "/api/session",
            Some(json!({"email": "staff@tally.example", "password": PASSWORD})),
        )
        .await;
    assert_eq!(r.code(), "invalid_credentials");
    // Not twice the same email; not a role that people cannot have; not oneself.
    let r = app.post("/api/users", json!({"email": "STAFF@tally.example", "name": "Again", "role": "staff"})).await;
    assert_eq!((r.status, r.code()), (409, "email_taken"));
    let r = app.post("/api/users", json!({"email": "chan@tally.example", "name": "C", "role": "channel"})).await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn tally_users_create_prints_an_access_link_that_signs_the_person_in() {
    let (db, _dir) = common::fresh_database().await;
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "users",
            "create",
            "--database-url",
            &db,
            "--email",
            "first@tally.example",
            "--name",
            "First Admin",
            "--role",
            "admin",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    let url = stdout.lines().last().expect("the link").trim().to_string();
    assert!(url.starts_with("/claim/"), "{stdout}");
    let app = common::spawn_on(&db, _dir.clone()).await;
    let token = url.trim_start_matches("/claim/");
    let r = app
        .request(As::Anonymous, Method::POST, "/api/claim", Some(json!({"token": token, "password": PASSWORD})))
        .await;
    assert_eq!((r.status, r.body["kind"].as_str()), (200, Some("admin")));
}
