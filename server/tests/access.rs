//! The authorization matrix of API.md "Identity and access", walked cell by cell: every REST row
//! with every principal, every server function with every principal, and `/ws` subscriptions.
//! Each cell asserts the exact status and error code. Runs on SQLite and, with
//! `TALLY_TEST_STORE=postgres`, on PostgreSQL.

mod common;

use common::{spawn_app, As, Reply, TestApp};
use leptos::server_fn::ServerFn;
use reqwest::Method;
use serde_json::{json, Value};

const PASSWORD: &str = "correct horse battery";

/// The principals of API.md's table (its columns), plus a metrics key.
struct Principals {
    /// The member whose id the rows name ("own" for `member_own`).
    target: String,
    member_own: String,
    member_other: String,
    channel: String,
    staff: String,
    admin: String,
    metrics: String,
}

impl Principals {
    async fn new(app: &TestApp) -> Principals {
        let (target, member_own) = app.join("Ada Lovelace", "ada@example.com", PASSWORD).await;
        let (other, member_other) = app.join("Grace Hopper", "grace@example.com", PASSWORD).await;
        // Enough points for every redeem of the matrix.
        assert_eq!(app.earn(&target, 10_000).await.status, 200);
        assert_eq!(app.earn(&other, 10_000).await.status, 200);
        Principals {
            target,
            member_own,
            member_other,
            channel: app.key("channel").await,
            staff: app.person("staff@tally.example", "staff", PASSWORD).await,
            admin: app.person("admin@tally.example", "admin", PASSWORD).await,
            metrics: app.key("metrics").await,
        }
    }

    /// The columns, in API.md's order, then the metrics key.
    fn columns(&self) -> [(&'static str, As<'_>); 7] {
        [
            ("anonymous", As::Anonymous),
            ("member, own", As::Session(&self.member_own)),
            ("member, another's id", As::Session(&self.member_other)),
            ("key channel", As::Key(&self.channel)),
            ("staff", As::Session(&self.staff)),
            ("admin", As::Session(&self.admin)),
            ("key metrics", As::Key(&self.metrics)),
        ]
    }
}

/// What a cell expects: a success status, or an error status with its code.
#[derive(Debug, Clone, Copy)]
enum Cell {
    Ok(u16),
    Err(u16, &'static str),
}

const UNAUTH: Cell = Cell::Err(401, "unauthenticated");
const FORBID: Cell = Cell::Err(403, "forbidden");
const NOT_FOUND: Cell = Cell::Err(404, "member_not_found");

#[track_caller]
fn check(reply: &Reply, cell: Cell, what: &str) {
    match cell {
        Cell::Ok(status) => assert_eq!(reply.status, status, "{what}: {:?}", reply.body),
        Cell::Err(status, code) => {
            assert_eq!((reply.status, reply.code()), (status, code), "{what}: {:?}", reply.body);
        }
    }
}

/// A request of a row: method, path, body.
type Req = (Method, String, Option<Value>);

/// One REST row: the request `make` builds for column `i` is sent as that column's principal.
async fn row(app: &TestApp, p: &Principals, name: &str, expected: [Cell; 7], make: impl Fn(usize) -> Req) {
    for (i, ((column, who), cell)) in p.columns().into_iter().zip(expected).enumerate() {
        let (method, path, body) = make(i);
        let reply = app.request(who, method, &path, body).await;
        check(&reply, cell, &format!("{name} as {column}"));
    }
}

/// The same, with `prepare` run (as the test's admin key) before each request.
async fn row_after<Fut: std::future::Future>(
    app: &TestApp,
    p: &Principals,
    name: &str,
    expected: [Cell; 7],
    prepare: impl Fn(usize) -> Fut,
    make: impl Fn(usize, Fut::Output) -> Req,
) {
    for (i, ((column, who), cell)) in p.columns().into_iter().zip(expected).enumerate() {
        let prepared = prepare(i).await;
        let (method, path, body) = make(i, prepared);
        let reply = app.request(who, method, &path, body).await;
        check(&reply, cell, &format!("{name} as {column}"));
    }
}

#[tokio::test]
async fn every_rest_route_answers_each_principal_exactly_as_api_md_says() {
    let app = spawn_app().await;
    let p = Principals::new(&app).await;
    let id = p.target.clone();
    let ok = Cell::Ok;
    let get = |path: String| (Method::GET, path, None);

    let own_or_staff = [UNAUTH, ok(200), NOT_FOUND, FORBID, ok(200), ok(200), FORBID];
    row(&app, &p, "GET /api/members/{id}", own_or_staff, |_| get(format!("/api/members/{id}"))).await;
    row(&app, &p, "GET …/events", own_or_staff, |_| get(format!("/api/members/{id}/events"))).await;
    row(&app, &p, "PATCH /api/members/{id}", own_or_staff, |i| {
        (Method::PATCH, format!("/api/members/{id}"), Some(json!({"name": format!("Ada {i}")})))
    })
    .await;
    row(&app, &p, "POST …/points/redeem", own_or_staff, |_| {
        (Method::POST, format!("/api/members/{id}/points/redeem"), Some(json!({"points": 1})))
    })
    .await;

    let staff_only = [UNAUTH, FORBID, FORBID, FORBID, ok(200), ok(200), FORBID];
    row(&app, &p, "POST /api/members", [UNAUTH, FORBID, FORBID, FORBID, ok(201), ok(201), FORBID], |i| {
        (Method::POST, "/api/members".into(), Some(json!({"name": "New", "email": format!("new{i}@example.com")})))
    })
    .await;
    row(&app, &p, "GET /api/members", staff_only, |_| get("/api/members".into())).await;
    row(&app, &p, "POST …/points/earn", staff_only, |_| {
        (Method::POST, format!("/api/members/{id}/points/earn"), Some(json!({"points": 5})))
    })
    .await;
    // Active before each suspend, suspended before each reactivate: a permitted one succeeds.
    let (reactivate_path, suspend_path) =
        (format!("/api/members/{id}/reactivate"), format!("/api/members/{id}/suspend"));
    let reactivate = |_| app.post(&reactivate_path, json!({}));
    row_after(&app, &p, "POST …/suspend", staff_only, reactivate, |_, _| {
        (Method::POST, format!("/api/members/{id}/suspend"), Some(json!({})))
    })
    .await;
    let suspend = |_| app.post(&suspend_path, json!({}));
    row_after(&app, &p, "POST …/reactivate", staff_only, suspend, |_, _| {
        (Method::POST, format!("/api/members/{id}/reactivate"), Some(json!({})))
    })
    .await;
    app.post(&format!("/api/members/{id}/reactivate"), json!({})).await;
    row(&app, &p, "POST …/access-link", [UNAUTH, FORBID, FORBID, FORBID, ok(201), ok(201), FORBID], |_| {
        (Method::POST, format!("/api/members/{id}/access-link"), None)
    })
    .await;
    row(&app, &p, "POST /api/transactions", [UNAUTH, FORBID, FORBID, ok(202), ok(202), ok(202), FORBID], |i| {
        let body = json!({"transaction_id": format!("t{i}"), "member_id": id, "amount_cents": 1000, "currency": "EUR", "channel": "pos"});
        (Method::POST, "/api/transactions".into(), Some(body))
    })
    .await;
    row(&app, &p, "GET /api/projections", staff_only, |_| get("/api/projections".into())).await;
    row(&app, &p, "GET /metrics", [UNAUTH, FORBID, FORBID, FORBID, ok(200), ok(200), ok(200)], |_| {
        get("/metrics".into())
    })
    .await;

    row(&app, &p, "GET …/parked", staff_only, |_| get("/api/projections/membership_view/parked".into())).await;
    let never_rebuilt =
        [UNAUTH, FORBID, FORBID, FORBID, Cell::Err(404, "not_found"), Cell::Err(404, "not_found"), FORBID];
    row(&app, &p, "GET …/rebuild", never_rebuilt, |_| get("/api/projections/membership_view/rebuild".into())).await;
    let head = app.state.store.head().await.expect("head");
    row(
        &app,
        &p,
        "GET /api/members/{id}?at_position",
        [UNAUTH, FORBID, NOT_FOUND, FORBID, ok(200), ok(200), FORBID],
        |_| get(format!("/api/members/{id}?at_position={head}")),
    )
    .await;

    let admin_only = |status| [UNAUTH, FORBID, FORBID, FORBID, FORBID, ok(status), FORBID];
    let not_parked = [UNAUTH, FORBID, FORBID, FORBID, FORBID, Cell::Err(404, "not_found"), FORBID];
    row(&app, &p, "POST …/parked/{stream}/retry", not_parked, |_| {
        (Method::POST, "/api/projections/membership_view/parked/member-nobody/retry".into(), None)
    })
    .await;
    row(&app, &p, "POST …/parked/{stream}/skip", not_parked, |_| {
        let body = json!({"reason": "test"});
        (Method::POST, "/api/projections/membership_view/parked/member-nobody/skip".into(), Some(body))
    })
    .await;
    // The loyalty policy cannot be rebuilt: admins are told so, everyone else may not ask.
    let not_rebuildable = [UNAUTH, FORBID, FORBID, FORBID, FORBID, Cell::Err(409, "not_rebuildable"), FORBID];
    row(&app, &p, "POST …/rebuild", not_rebuildable, |_| {
        (Method::POST, "/api/projections/loyalty_policy/rebuild".into(), None)
    })
    .await;
    row(&app, &p, "GET /api/cdc", staff_only, |_| get("/api/cdc".into())).await;
    // Change events come from `cdc` keys (docs/cdc.md): no one here but the admin may post them
    // (and this server has no such source).
    let no_source = [UNAUTH, FORBID, FORBID, FORBID, FORBID, Cell::Err(404, "not_found"), FORBID];
    row(&app, &p, "POST /api/cdc/{source}", no_source, |_| {
        (Method::POST, "/api/cdc/crm".into(), Some(json!({"op": "c", "after": {}, "source": {"table": "t", "lsn": 1}})))
    })
    .await;
    row(&app, &p, "GET /api/keys", admin_only(200), |_| get("/api/keys".into())).await;
    row(&app, &p, "POST /api/keys", admin_only(201), |i| {
        (Method::POST, "/api/keys".into(), Some(json!({"name": format!("till {i}"), "role": "channel"})))
    })
    .await;
    let make_key = |i| app.post("/api/keys", json!({"name": format!("doomed {i}"), "role": "channel"}));
    row_after(&app, &p, "DELETE /api/keys/{id}", admin_only(204), make_key, |_, made| {
        (Method::DELETE, format!("/api/keys/{}", made.body["id"].as_str().unwrap_or_default()), None)
    })
    .await;
    row(&app, &p, "GET /api/users", admin_only(200), |_| get("/api/users".into())).await;
    row(&app, &p, "POST /api/users", admin_only(201), |i| {
        let body = json!({"email": format!("person{i}@tally.example"), "name": "Pat", "role": "staff"});
        (Method::POST, "/api/users".into(), Some(body))
    })
    .await;

    row(&app, &p, "GET /healthz", [ok(200); 7], |_| get("/healthz".into())).await;
    row(&app, &p, "GET /livez", [ok(200); 7], |_| get("/livez".into())).await;
    row(&app, &p, "GET /api/me", [UNAUTH, ok(200), ok(200), ok(200), ok(200), ok(200), ok(200)], |_| {
        get("/api/me".into())
    })
    .await;

    // What `GET /api/me` says of each.
    let me = |who| app.request(who, Method::GET, "/api/me", None);
    let own = me(As::Session(&p.member_own)).await.body;
    assert_eq!((own["kind"].as_str(), own["member_id"].as_str()), (Some("member"), Some(id.as_str())));
    assert_eq!(me(As::Session(&p.staff)).await.body["kind"], "staff");
    assert_eq!(me(As::Session(&p.admin)).await.body["kind"], "admin");
    let key = me(As::Key(&p.channel)).await.body;
    assert_eq!((key["kind"].as_str(), key["role"].as_str()), (Some("key"), Some("channel")));
}

#[tokio::test]
async fn a_member_cannot_tell_another_members_id_from_an_unknown_one() {
    let app = spawn_app().await;
    let p = Principals::new(&app).await;
    let who = As::Session(&p.member_other);
    for path in [format!("/api/members/{}", p.target), "/api/members/nobody-has-this-id".to_string()] {
        let reply = app.request(who, Method::GET, &path, None).await;
        assert_eq!((reply.status, reply.code()), (404, "member_not_found"), "{path}");
        let events = app.request(who, Method::GET, &format!("{path}/events"), None).await;
        assert_eq!((events.status, events.code()), (404, "member_not_found"), "{path}/events");
    }
}

/// A server function called as `who`: a form post (as a browser sends it), answered with JSON.
async fn call(app: &TestApp, who: As<'_>, path: &str, form: &[(&str, &str)]) -> Reply {
    let mut req = app.anon.post(format!("{}{path}", app.base)).form(form).header("accept", "application/json");
    req = match who {
        As::Anonymous => req.header("origin", &app.base),
        As::Key(token) => req.bearer_auth(token),
        As::Session(cookie) => req.header("cookie", cookie).header("origin", &app.base),
    };
    let mut reply = Reply::of(req.send().await.expect("sent")).await;
    // A server function's error is its `AppError`; reshape it like a REST error for `code()`.
    if let Some(code) = reply.body.get("code").filter(|_| reply.status >= 400) {
        reply.body = json!({"error": {"code": code, "message": reply.body["message"]}});
    }
    reply
}

/// A server function's outcome: success, or the error code it answers with.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Out {
    Ok,
    Err(&'static str),
}

#[track_caller]
fn outcome(reply: &Reply) -> Out {
    if reply.status < 400 {
        return Out::Ok;
    }
    // A server function's error comes with the status the REST API gives its code.
    let (out, status) = match reply.code() {
        "unauthenticated" => (Out::Err("unauthenticated"), 401),
        "forbidden" => (Out::Err("forbidden"), 403),
        "member_not_found" => (Out::Err("member_not_found"), 404),
        "invalid_credentials" => (Out::Err("invalid_credentials"), 401),
        "not_found" => (Out::Err("not_found"), 404),
        "not_rebuildable" => (Out::Err("not_rebuildable"), 409),
        other => panic!("unexpected answer {other}: {:?}", reply.body),
    };
    assert_eq!(reply.status, status, "{:?}", reply.body);
    out
}

async fn fn_row(app: &TestApp, p: &Principals, name: &str, path: &str, form: &[(&str, &str)], expected: [Out; 7]) {
    for ((column, who), expected) in p.columns().into_iter().zip(expected) {
        let reply = call(app, who, path, form).await;
        assert_eq!(outcome(&reply), expected, "{name} as {column}: {:?}", reply.body);
    }
}

#[tokio::test]
async fn every_server_function_checks_its_caller() {
    use app::api::*;
    let app = spawn_app().await;
    let p = Principals::new(&app).await;
    let id = p.target.as_str();
    let (ok, unauth, forbid) = (Out::Ok, Out::Err("unauthenticated"), Out::Err("forbidden"));
    let staff_only = [unauth, forbid, forbid, forbid, ok, ok, forbid];
    let admin_only = [unauth, forbid, forbid, forbid, forbid, ok, forbid];

    // Another member's view reads as an unknown member's: `None`, not an error.
    let view = call(&app, As::Session(&p.member_other), GetMember::PATH, &[("member_id", id)]).await;
    assert_eq!((view.status, &view.body), (200, &Value::Null));
    let own = call(&app, As::Session(&p.member_own), GetMember::PATH, &[("member_id", id)]).await;
    assert_eq!(own.body["member_id"], id);
    fn_row(&app, &p, "get_member", GetMember::PATH, &[("member_id", id)], [unauth, ok, ok, forbid, ok, ok, forbid])
        .await;

    fn_row(&app, &p, "search_members", SearchMembers::PATH, &[("query[limit]", "5")], staff_only).await;
    fn_row(&app, &p, "get_consumers", GetConsumers::PATH, &[], staff_only).await;
    fn_row(&app, &p, "member_history", MemberHistory::PATH, &[("member_id", id)], staff_only).await;
    let earn = [("kind", "earn"), ("member_id", id), ("points", "5")];
    fn_row(&app, &p, "staff_action earn", StaffAction::PATH, &earn, staff_only).await;
    let purchase =
        [("kind", "purchase"), ("member_id", id), ("amount", "12.00"), ("currency", "EUR"), ("channel", "pos")];
    fn_row(
        &app,
        &p,
        "staff_action purchase",
        StaffAction::PATH,
        &purchase,
        [unauth, forbid, forbid, ok, ok, ok, forbid],
    )
    .await;
    fn_row(&app, &p, "issue_access_link", IssueAccessLink::PATH, &[("member_id", id)], staff_only).await;

    // A member's own forms: only the member, on their own account.
    let own_only = [unauth, ok, ok, forbid, forbid, forbid, forbid];
    fn_row(&app, &p, "redeem_reward", RedeemReward::PATH, &[("points", "1")], own_only).await;
    fn_row(&app, &p, "update_my_profile", UpdateMyProfile::PATH, &[("name", "Renamed"), ("email", "")], own_only).await;
    // A wrong current password is refused for everyone who has one.
    let password = [("current_password", "not the password"), ("new_password", "another long password")];
    let refused = Out::Err("invalid_credentials");
    fn_row(
        &app,
        &p,
        "change_password",
        ChangePassword::PATH,
        &password,
        [unauth, refused, refused, forbid, refused, refused, forbid],
    )
    .await;

    fn_row(&app, &p, "list_keys", ListKeys::PATH, &[], admin_only).await;
    fn_row(&app, &p, "create_key", CreateKey::PATH, &[("name", "till"), ("role", "channel")], admin_only).await;
    // An unknown key: the admin is told so, everyone else may not ask.
    let missing = admin_only.map(|c| if c == ok { Out::Err("not_found") } else { c });
    fn_row(&app, &p, "revoke_key", RevokeKey::PATH, &[("id", "00000000")], missing).await;
    // The operations page: staff read; admins act (on a stream that is not parked: not found).
    fn_row(&app, &p, "get_parked", GetParked::PATH, &[], staff_only).await;
    let head = app.state.store.head().await.expect("head").to_string();
    let at = [("member_id", id), ("position", head.as_str())];
    fn_row(&app, &p, "get_member_at", GetMemberAt::PATH, &at, staff_only).await;
    let stream = [("consumer", "membership_view"), ("stream_id", "member-nobody")];
    fn_row(&app, &p, "retry_parked", RetryParked::PATH, &stream, missing).await;
    let skip = [("consumer", "membership_view"), ("stream_id", "member-nobody"), ("reason", "test")];
    fn_row(&app, &p, "skip_parked", SkipParked::PATH, &skip, missing).await;
    let loyalty = [("projection", "loyalty_policy")];
    let not_rebuildable = admin_only.map(|c| if c == ok { Out::Err("not_rebuildable") } else { c });
    fn_row(&app, &p, "rebuild_projection", RebuildProjection::PATH, &loyalty, not_rebuildable).await;
    fn_row(&app, &p, "list_people", ListPeople::PATH, &[], admin_only).await;
    let person = [("email", "pat@tally.example"), ("name", "Pat"), ("role", "staff")];
    fn_row(&app, &p, "create_person", CreatePerson::PATH, &person, admin_only).await;
    let people = app.get("/api/users").await.body;
    let pat = people["items"].as_array().expect("items").iter().find(|u| u["email"] == "pat@tally.example");
    let pat = pat.and_then(|u| u["id"].as_str()).expect("pat's account").to_string();
    fn_row(&app, &p, "change_person", ChangePerson::PATH, &[("id", &pat), ("change", "link")], admin_only).await;
}

#[tokio::test]
async fn the_sign_in_server_functions_answer_anyone_and_sign_out_ends_only_sessions() {
    use app::api::*;
    let app = spawn_app().await;
    let p = Principals::new(&app).await;
    let ok = Out::Ok;
    let wrong = [("email", "ada@example.com"), ("password", "not the password")];
    fn_row(&app, &p, "sign_in", SignIn::PATH, &wrong, [Out::Err("invalid_credentials"); 7]).await;
    fn_row(&app, &p, "claim_usable", ClaimUsable::PATH, &[("token", "no-such-link")], [ok; 7]).await;
    let claim = [("token", "no-such-link"), ("password", "a long new password")];
    fn_row(&app, &p, "claim_link", ClaimLink::PATH, &claim, [Out::Err("not_found"); 7]).await;
    // Only a session can end.
    let unauth = Out::Err("unauthenticated");
    fn_row(&app, &p, "sign_out", SignOut::PATH, &[], [unauth, ok, ok, unauth, ok, ok, unauth]).await;
    // Anyone may join (a session, ended or not, is replaced by the new member's).
    for (i, (column, who)) in p.columns().into_iter().enumerate() {
        let email = format!("joiner{i}@example.com");
        let form = [("name", "Joiner"), ("email", email.as_str()), ("password", PASSWORD)];
        assert_eq!(outcome(&call(&app, who, Join::PATH, &form).await), ok, "join as {column}");
    }
}

#[tokio::test]
async fn websocket_upgrades_and_subscriptions_follow_the_table() {
    let app = spawn_app().await;
    let p = Principals::new(&app).await;
    let target = format!("member:{}", p.target);

    let refused = common::ws_connect(&app, As::Anonymous).await.expect_err("no upgrade without credentials");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => assert_eq!(response.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }

    // `member:<id>`: the member themselves and staff get the view; anyone else gets `forbidden`,
    // naming the topic, and nothing else for it.
    let may_read = [false, true, false, false, true, true, false];
    for ((column, who), allowed) in p.columns().into_iter().zip(may_read).skip(1) {
        let mut socket = common::ws_connect(&app, who).await.expect("upgrade");
        common::send_json(&mut socket, json!({"subscribe": &target})).await;
        let first = common::next_json(&mut socket).await;
        if allowed {
            assert_eq!(
                (first["type"].as_str(), first["topic"].as_str()),
                (Some("view"), Some(target.as_str())),
                "{column}"
            );
        } else {
            assert_eq!(first["type"], "error", "{column}: {first}");
            assert_eq!(
                (first["code"].as_str(), first["topic"].as_str()),
                (Some("forbidden"), Some(target.as_str())),
                "{column}"
            );
        }
    }

    // An id that does not exist answers a member as another member's does.
    let mut socket = common::ws_connect(&app, As::Session(&p.member_other)).await.expect("upgrade");
    common::send_json(&mut socket, json!({"subscribe": "member:nobody-has-this-id"})).await;
    let unknown = common::next_json(&mut socket).await;
    assert_eq!(
        (unknown["code"].as_str(), unknown["topic"].as_str()),
        (Some("forbidden"), Some("member:nobody-has-this-id"))
    );

    // `members` is for staff and admins: they hear every member's change.
    let staff_only = [false, false, false, false, true, true, false];
    for ((column, who), allowed) in p.columns().into_iter().zip(staff_only).skip(1) {
        let mut socket = common::ws_connect(&app, who).await.expect("upgrade");
        common::send_json(&mut socket, json!({"subscribe": "members"})).await;
        if allowed {
            let earned = app.earn(&p.target, 1).await;
            assert_eq!(earned.status, 200);
            let change = common::next_json(&mut socket).await;
            assert_eq!(
                (change["type"].as_str(), change["topic"].as_str()),
                (Some("view"), Some(target.as_str())),
                "{column}"
            );
        } else {
            let refused = common::next_json(&mut socket).await;
            assert_eq!(
                (refused["code"].as_str(), refused["topic"].as_str()),
                (Some("forbidden"), Some("members")),
                "{column}"
            );
        }
    }
}
