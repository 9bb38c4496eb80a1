//! The read side: queries over the materialized views only (never the events, except the audit
//! trail `GET /api/members/{id}/events`, which is the events by definition, and a view as it was
//! at a past position, which only the log still knows: `member_view_at`).

use crate::store::{Store, StoredEvent};
use app::domain::member::Status;
use app::domain::tier::Tier;
use app::domain::validate;
use app::views::{MemberPage, MemberQuery, MemberSummary};
use base64::Engine;
use sqlx::Row;

pub const DEFAULT_LIMIT: u32 = 20;
pub const MAX_LIMIT: u32 = 100;

/// A member's view and its position: from the cache, else from the database (then cached).
pub async fn member_view_cached(
    store: &Store,
    cache: &crate::view_cache::ViewCache,
    member_id: &str,
) -> Result<Option<(std::sync::Arc<str>, i64)>, sqlx::Error> {
    if let Some(hit) = cache.get(member_id) {
        return Ok(Some(hit));
    }
    let generation = cache.generation();
    Ok(member_view(store, member_id).await?.map(|(json, position)| {
        let json: std::sync::Arc<str> = json.into();
        cache.put_read(member_id, position, json.clone(), generation);
        (json, position)
    }))
}

/// A member's view as it was right after position `at` (an audit: "what did the card show
/// then?"), folded from the member's events up to there with the projection's own `evolve`, so
/// it is what the projector had stored at that moment. `None` when the member had not enrolled.
pub async fn member_view_at(
    store: &Store,
    member_id: &str,
    at: i64,
) -> anyhow::Result<Option<app::views::MembershipView>> {
    use app::domain::{member::MemberAggregate, Aggregate};
    let stream = format!("{}{member_id}", MemberAggregate::STREAM_PREFIX);
    let mut view = None;
    for event in store.read_stream(&stream).await?.iter().take_while(|e| e.position <= at) {
        let decoded: app::domain::member::MemberEvent = event.decode()?;
        view = crate::projector::membership_view::evolve(view, event, &decoded);
    }
    Ok(view)
}

/// The stored JSON of a member's view and its position.
pub async fn member_view(store: &Store, member_id: &str) -> Result<Option<(String, i64)>, sqlx::Error> {
    let row = sqlx::query("SELECT view, position FROM membership_view WHERE member_id = $1")
        .bind(member_id)
        .fetch_optional(&store.read)
        .await?;
    row.map(|r| Ok((r.try_get("view")?, r.try_get("position")?))).transpose()
}

#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// Search `member_search`, ordered by name then id, paginated by an opaque cursor. Balances,
/// lifetime points and positions come from each member's view (the search row does not change
/// when points do): the newer of the stored one and the cached one, which on SQLite can be
/// ahead of the table (the projector writes views behind).
pub async fn search_members(
    store: &Store,
    cache: &crate::view_cache::ViewCache,
    query: &MemberQuery,
) -> Result<MemberPage, QueryError> {
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(QueryError::Invalid(format!("limit must be between 1 and {MAX_LIMIT}")));
    }
    let mut clauses = Vec::new();
    let mut args: Vec<String> = Vec::new();
    if let Some(q) = query.q.as_deref().map(str::trim).filter(|q| !q.is_empty()) {
        if q.chars().count() > validate::MAX_QUERY_CHARS {
            return Err(QueryError::Invalid(format!("q must be at most {} characters", validate::MAX_QUERY_CHARS)));
        }
        args.push(format!("%{}%", escape_like(&q.to_lowercase())));
        clauses.push(format!("s.search_text LIKE ${} ESCAPE '\\'", args.len()));
    }
    if let Some(tier) = query.tier.as_deref().filter(|t| !t.is_empty()) {
        let tier = Tier::parse(tier).ok_or_else(|| QueryError::Invalid(format!("unknown tier '{tier}'")))?;
        args.push(tier.as_str().to_string());
        clauses.push(format!("s.tier = ${}", args.len()));
    }
    if let Some(status) = query.status.as_deref().filter(|s| !s.is_empty()) {
        let status = Status::parse(status).ok_or_else(|| QueryError::Invalid(format!("unknown status '{status}'")))?;
        args.push(status.as_str().to_string());
        clauses.push(format!("s.status = ${}", args.len()));
    }
    if let Some(after) = query.after.as_deref().filter(|a| !a.is_empty()) {
        let (sort_key, member_id) =
            decode_cursor(after).ok_or_else(|| QueryError::Invalid("bad cursor in 'after'".into()))?;
        args.push(sort_key);
        let a = args.len();
        args.push(member_id);
        let b = args.len();
        clauses.push(format!("(s.sort_key > ${a} OR (s.sort_key = ${a} AND s.member_id > ${b}))"));
    }
    let filter = if clauses.is_empty() { String::new() } else { format!("WHERE {}", clauses.join(" AND ")) };
    let sql = format!(
        "SELECT s.member_id, s.name, s.email, s.tier, s.status, s.member_since, s.sort_key, v.view \
         FROM member_search s LEFT JOIN membership_view v ON v.member_id = s.member_id \
         {filter} ORDER BY s.sort_key, s.member_id LIMIT {}",
        limit + 1
    );
    let mut q = sqlx::query(&sql);
    for arg in &args {
        q = q.bind(arg);
    }
    let rows = q.fetch_all(&store.read).await?;
    let mut items = Vec::with_capacity(rows.len());
    let mut last_key = None;
    for row in rows.iter().take(limit as usize) {
        let tier: String = row.try_get("tier")?;
        let status: String = row.try_get("status")?;
        let member_id: String = row.try_get("member_id")?;
        last_key = Some((row.try_get::<String, _>("sort_key")?, member_id.clone()));
        let decode = |json: &str| -> Result<Figures, sqlx::Error> {
            serde_json::from_str(json).map_err(|e| sqlx::Error::Decode(Box::new(e)))
        };
        let stored = row.try_get::<Option<String>, _>("view")?.map(|view| decode(&view)).transpose()?;
        let cached = cache.get(&member_id);
        let figures = match (stored, cached) {
            (Some(stored), Some((json, position))) if position > stored.position as i64 => decode(&json)?,
            (Some(stored), _) => stored,
            (None, Some((json, _))) => decode(&json)?,
            // A search row is written after its view is applied, and the view cache keeps every
            // view the table does not hold yet: only a moment between the two shows neither.
            (None, None) => Figures { points_balance: 0, lifetime_points: 0, position: 0 },
        };
        items.push(MemberSummary {
            member_id,
            name: row.try_get("name")?,
            email: row.try_get("email")?,
            tier: Tier::parse(&tier).unwrap_or(Tier::Bronze),
            status: Status::parse(&status).unwrap_or_default(),
            points_balance: figures.points_balance,
            lifetime_points: figures.lifetime_points,
            member_since: row.try_get("member_since")?,
            position: figures.position,
        });
    }
    let next = if rows.len() > limit as usize { last_key.map(|(k, id)| encode_cursor(&k, &id)) } else { None };
    Ok(MemberPage { items, next })
}

/// What a search result takes from the member's stored view.
#[derive(serde::Deserialize)]
struct Figures {
    points_balance: u64,
    lifetime_points: u64,
    position: u64,
}

fn escape_like(s: &str) -> String {
    s.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
}

fn encode_cursor(sort_key: &str, member_id: &str) -> String {
    let raw = serde_json::json!([sort_key, member_id]).to_string();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    serde_json::from_slice(&raw).ok()
}

/// The audit trail of one member: its stream, oldest first, each event in its type's current
/// shape (see `StoredEvent::upcast`).
pub async fn member_events(store: &Store, member_id: &str) -> Result<Vec<StoredEvent>, sqlx::Error> {
    Ok(store.read_stream(&format!("member-{member_id}")).await?.into_iter().map(StoredEvent::upcast).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor("ada lovelace", "m-1");
        assert_eq!(decode_cursor(&c), Some(("ada lovelace".into(), "m-1".into())));
        assert_eq!(decode_cursor("not a cursor!"), None);
    }

    #[test]
    fn like_wildcards_in_queries_are_literal() {
        assert_eq!(escape_like("50%_off\\"), "50\\%\\_off\\\\");
    }
}
