//! The "before" picture for P2: API composition. Three small upstream services (profile, points,
//! statement), each with its own SQLite, and a gateway that calls all three concurrently per
//! request and joins their answers into the same page data the materialized view serves.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Row, SqlitePool};
use std::path::Path as FsPath;
use std::str::FromStr;
use std::time::Duration;

pub const ROLES: [&str; 3] = ["profile", "points", "statement"];

/// Copy each service's slice of the data out of Tally's views (their SQLite file,
/// `store::views_file`) into its own database.
pub async fn prepare(tally_views: &FsPath, dir: &FsPath) -> anyhow::Result<()> {
    let source = pool(tally_views, true).await?;
    let rows = sqlx::query("SELECT view FROM membership_view").fetch_all(&source).await?;
    let views: Vec<Value> =
        rows.iter().map(|r| serde_json::from_str(&r.get::<String, _>("view"))).collect::<Result<_, _>>()?;
    for role in ROLES {
        let db = pool(&dir.join(format!("{role}.db")), false).await?;
        let mut tx = db.begin().await?;
        match role {
            "profile" => {
                sqlx::query("CREATE TABLE members (member_id TEXT PRIMARY KEY, name TEXT, email TEXT, status TEXT, member_since TEXT)")
                    .execute(&mut *tx)
                    .await?;
                for v in &views {
                    sqlx::query("INSERT INTO members VALUES (?, ?, ?, ?, ?)")
                        .bind(v["member_id"].as_str())
                        .bind(v["name"].as_str())
                        .bind(v["email"].as_str())
                        .bind(v["status"].as_str())
                        .bind(v["member_since"].as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
            "points" => {
                sqlx::query("CREATE TABLE balances (member_id TEXT PRIMARY KEY, points_balance INTEGER, lifetime_points INTEGER, tier TEXT)")
                    .execute(&mut *tx)
                    .await?;
                for v in &views {
                    sqlx::query("INSERT INTO balances VALUES (?, ?, ?, ?)")
                        .bind(v["member_id"].as_str())
                        .bind(v["points_balance"].as_i64())
                        .bind(v["lifetime_points"].as_i64())
                        .bind(v["tier"].as_str())
                        .execute(&mut *tx)
                        .await?;
                }
            }
            _ => {
                sqlx::query(
                    "CREATE TABLE entries (member_id TEXT, position INTEGER, kind TEXT, points INTEGER, description TEXT, at TEXT, \
                     PRIMARY KEY (member_id, position))",
                )
                .execute(&mut *tx)
                .await?;
                for v in &views {
                    for a in v["recent_activity"].as_array().into_iter().flatten() {
                        sqlx::query("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)")
                            .bind(v["member_id"].as_str())
                            .bind(a["position"].as_i64())
                            .bind(a["kind"].as_str())
                            .bind(a["points"].as_i64())
                            .bind(a["description"].as_str())
                            .bind(a["at"].as_str())
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
        }
        tx.commit().await?;
    }
    Ok(())
}

async fn pool(path: &FsPath, read_only: bool) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(!read_only)
        .read_only(read_only)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
    Ok(SqlitePoolOptions::new().max_connections(8).connect_with(options).await?)
}

#[derive(Clone)]
struct Upstream {
    db: SqlitePool,
    latency: Duration,
}

/// `tally-bench upstream`: one of the three services.
pub async fn serve_upstream(role: &str, db: &FsPath, addr: &str, latency_ms: u64) -> anyhow::Result<()> {
    let state = Upstream { db: pool(db, true).await?, latency: Duration::from_millis(latency_ms) };
    let route = match role {
        "profile" => get(profile),
        "points" => get(points),
        "statement" => get(statement),
        other => anyhow::bail!("unknown role {other}"),
    };
    let app = Router::new()
        .route(&format!("/{role}/{{id}}"), route)
        .route("/livez", get(|| async { "ok" }))
        .with_state(state);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await?;
    Ok(())
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"error": "not found"}))).into_response()
}

fn failed(err: sqlx::Error) -> Response {
    (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({"error": err.to_string()}))).into_response()
}

async fn profile(State(s): State<Upstream>, Path(id): Path<String>) -> Response {
    tokio::time::sleep(s.latency).await;
    match sqlx::query("SELECT name, email, status, member_since FROM members WHERE member_id = ?")
        .bind(&id)
        .fetch_optional(&s.db)
        .await
    {
        Ok(Some(r)) => Json(json!({
            "member_id": id, "name": r.get::<String, _>("name"), "email": r.get::<String, _>("email"),
            "status": r.get::<String, _>("status"), "member_since": r.get::<String, _>("member_since"),
        }))
        .into_response(),
        Ok(None) => not_found(),
        Err(e) => failed(e),
    }
}

async fn points(State(s): State<Upstream>, Path(id): Path<String>) -> Response {
    tokio::time::sleep(s.latency).await;
    match sqlx::query("SELECT points_balance, lifetime_points, tier FROM balances WHERE member_id = ?")
        .bind(&id)
        .fetch_optional(&s.db)
        .await
    {
        Ok(Some(r)) => Json(json!({
            "points_balance": r.get::<i64, _>("points_balance"), "lifetime_points": r.get::<i64, _>("lifetime_points"),
            "tier": r.get::<String, _>("tier"),
        }))
        .into_response(),
        Ok(None) => not_found(),
        Err(e) => failed(e),
    }
}

async fn statement(State(s): State<Upstream>, Path(id): Path<String>) -> Response {
    tokio::time::sleep(s.latency).await;
    let rows = sqlx::query("SELECT position, kind, points, description, at FROM entries WHERE member_id = ? ORDER BY position DESC LIMIT 10")
        .bind(&id)
        .fetch_all(&s.db)
        .await;
    match rows {
        Ok(rows) => Json(json!({"recent_activity": rows.iter().map(|r| json!({
            "position": r.get::<i64, _>("position"), "kind": r.get::<String, _>("kind"), "points": r.get::<i64, _>("points"),
            "description": r.get::<String, _>("description"), "at": r.get::<String, _>("at"),
        })).collect::<Vec<_>>()}))
        .into_response(),
        Err(e) => failed(e),
    }
}

#[derive(Clone)]
struct Gateway {
    client: reqwest::Client,
    profile: String,
    points: String,
    statement: String,
}

/// `tally-bench compose`: the gateway that joins the three per request.
pub async fn serve_gateway(addr: &str, profile: String, points: String, statement: String) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(5))
        .build()?;
    let state = Gateway { client, profile, points, statement };
    let app =
        Router::new().route("/members/{id}", get(compose)).route("/livez", get(|| async { "ok" })).with_state(state);
    axum::serve(tokio::net::TcpListener::bind(addr).await?, app).await?;
    Ok(())
}

async fn fetch(client: &reqwest::Client, url: String) -> Result<Value, String> {
    let resp = client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: {}", resp.status()));
    }
    resp.json().await.map_err(|e| format!("{url}: {e}"))
}

async fn compose(State(g): State<Gateway>, Path(id): Path<String>) -> Response {
    let (profile, points, statement) = tokio::join!(
        fetch(&g.client, format!("{}/profile/{id}", g.profile)),
        fetch(&g.client, format!("{}/points/{id}", g.points)),
        fetch(&g.client, format!("{}/statement/{id}", g.statement)),
    );
    match (profile, points, statement) {
        (Ok(p), Ok(b), Ok(s)) => {
            let lifetime = b["lifetime_points"].as_u64().unwrap_or(0);
            let next_tier = if b["tier"] == "platinum" { None } else { app::views::NextTier::for_lifetime(lifetime) };
            Json(json!({
                "member_id": id, "name": p["name"], "email": p["email"], "status": p["status"], "tier": b["tier"],
                "points_balance": b["points_balance"], "lifetime_points": lifetime, "next_tier": next_tier,
                "recent_activity": s["recent_activity"], "member_since": p["member_since"],
            }))
            .into_response()
        }
        (p, b, s) => {
            let errors: Vec<String> = [p.err(), b.err(), s.err()].into_iter().flatten().collect();
            (StatusCode::BAD_GATEWAY, Json(json!({"error": errors.join("; ")}))).into_response()
        }
    }
}
