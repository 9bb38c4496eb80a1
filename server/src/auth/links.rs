//! Access links, `/claim/<token>`: the way in for a member enrolled by staff, for a person whose
//! account an admin made, and back in after a forgotten password. Single use, valid 24 hours,
//! the token kept only as its SHA-256.

use super::secret;
use crate::store::Store;
use sqlx::Row;

/// How long a link may be used.
pub const VALID_FOR: chrono::Duration = chrono::Duration::hours(24);

/// Whose account a link opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFor {
    /// A member: their account is made when the link is used, if they have none yet.
    Member(String),
    /// A person's account.
    Account(String),
}

/// A link, as issued: shown to whoever issued it, once.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct IssuedLink {
    /// `/claim/<token>`.
    pub url: String,
    pub expires_at: String,
}

pub async fn issue(store: &Store, target: &LinkFor, created_by: &str) -> Result<IssuedLink, sqlx::Error> {
    let token = secret::random(32);
    let now = chrono::Utc::now();
    let expires = now + VALID_FOR;
    let (account_id, member_id) = match target {
        LinkFor::Member(id) => (None, Some(id.as_str())),
        LinkFor::Account(id) => (Some(id.as_str()), None),
    };
    let mut conn = store.write.acquire().await?;
    sqlx::query(
        "INSERT INTO access_links (token_hash, account_id, member_id, created_at, created_by, expires_at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(secret::digest(&token))
    .bind(account_id)
    .bind(member_id)
    .bind(crate::clock::rfc3339(now))
    .bind(created_by)
    .bind(expires.timestamp())
    .execute(&mut *conn)
    .await?;
    Ok(IssuedLink { url: format!("/claim/{token}"), expires_at: crate::clock::rfc3339(expires) })
}

/// Use a link: whom it opens, if it is unused and unexpired; from then on it is used. Inside the
/// caller's transaction, so the password it sets and its use commit together.
pub async fn take(conn: &mut sqlx::AnyConnection, token: &str) -> Result<Option<LinkFor>, sqlx::Error> {
    if token.is_empty() || token.len() > 128 {
        return Ok(None);
    }
    let row = sqlx::query(
        "UPDATE access_links SET used_at = $1 WHERE token_hash = $2 AND used_at IS NULL AND expires_at > $3 \
         RETURNING account_id, member_id",
    )
    .bind(crate::clock::now())
    .bind(secret::digest(token))
    .bind(chrono::Utc::now().timestamp())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let account: Option<String> = row.try_get("account_id")?;
    let member: Option<String> = row.try_get("member_id")?;
    Ok(match (account, member) {
        (Some(account), _) => Some(LinkFor::Account(account)),
        (None, Some(member)) => Some(LinkFor::Member(member)),
        (None, None) => None,
    })
}

/// Whether a link could still be used (the claim page asks before showing its form).
pub async fn usable(store: &Store, token: &str) -> Result<bool, sqlx::Error> {
    if token.is_empty() || token.len() > 128 {
        return Ok(false);
    }
    let row = sqlx::query(
        "SELECT 1 AS usable FROM access_links WHERE token_hash = $1 AND used_at IS NULL AND expires_at > $2",
    )
    .bind(secret::digest(token))
    .bind(chrono::Utc::now().timestamp())
    .fetch_optional(&store.read)
    .await?;
    Ok(row.is_some())
}

/// Forget links that were used or expired more than a day ago; returns how many.
pub async fn prune(store: &Store) -> Result<u64, sqlx::Error> {
    let cutoff = (chrono::Utc::now() - chrono::Duration::days(1)).timestamp();
    let mut conn = store.write.acquire().await?;
    let done = sqlx::query("DELETE FROM access_links WHERE expires_at < $1").bind(cutoff).execute(&mut *conn).await?;
    Ok(done.rows_affected())
}
