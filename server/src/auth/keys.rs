//! Keys of machine clients (points of sale, web shops, scripts, metrics scrapers).
//!
//! A token is `tk_<id>_<secret>`: the id finds the row, the secret (256 random bits) is checked
//! against its stored SHA-256 in constant time. Known keys are kept in memory, so a request with
//! a key reads nothing; revoking one clears it on every node (see `revoke`). When a key was last
//! used is noted in memory and written behind about once a minute, not on every request.

use super::kept::Kept;
use super::secret;
use crate::store::Store;
use app::domain::access::{Caller, Role};
use sqlx::Row;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

const PREFIX: &str = "tk_";
/// Keys kept in memory at most.
const CACHE_ENTRIES: usize = 100_000;

/// A key as `GET /api/keys` lists it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: String,
    pub last_used_at: Option<String>,
}

struct Entry {
    secret_hash: String,
    caller: Arc<Caller>,
    /// Unix seconds of the last use seen here, and of the last one written.
    used: AtomicI64,
    written: AtomicI64,
}

pub struct Keys {
    store: Store,
    cache: Kept<Arc<Entry>>,
    /// Uses of keys read while nothing is kept in memory (PostgreSQL, before the revocation
    /// listener is connected): by key id, unix seconds.
    uncached_uses: std::sync::Mutex<HashMap<String, i64>>,
}

/// `(id, secret)` of a token, if it has the shape of one.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix(PREFIX)?.split_once('_')?;
    let hex = |s: &str| !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id) && !secret.is_empty() && secret.len() <= 128).then_some((id, secret))
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

impl Keys {
    pub fn new(store: Store, cached: bool) -> Self {
        Keys { store, cache: Kept::new(cached, CACHE_ENTRIES), uncached_uses: Default::default() }
    }

    /// See `Kept`.
    pub fn set_cached(&self, on: bool) {
        self.cache.set_on(on);
    }

    /// The caller a bearer token stands for; None for anything but a live key's exact token.
    pub async fn caller(&self, token: &str) -> Result<Option<Arc<Caller>>, sqlx::Error> {
        let Some((id, secret)) = parse(token) else { return Ok(None) };
        let (entry, kept) = match self.cache.get(id) {
            Some(entry) => (entry, true),
            None => match self.read(id).await? {
                Some(entry) => (entry, self.cache.is_on()),
                None => return Ok(None),
            },
        };
        if !secret::matches(secret, &entry.secret_hash) {
            return Ok(None);
        }
        if kept {
            entry.used.store(now_secs(), Ordering::Relaxed);
        } else if let Ok(mut uses) = self.uncached_uses.lock() {
            uses.insert(id.to_string(), now_secs());
        }
        Ok(Some(entry.caller.clone()))
    }

    async fn read(&self, id: &str) -> Result<Option<Arc<Entry>>, sqlx::Error> {
        let row = sqlx::query("SELECT name, role, secret_hash FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .fetch_optional(&self.store.read)
            .await?;
        let Some(row) = row else { return Ok(None) };
        let Some(role) = Role::parse(&row.try_get::<String, _>("role")?) else { return Ok(None) };
        let caller = Caller::Key { key_id: id.to_string(), role, name: row.try_get("name")? };
        let entry = Arc::new(Entry {
            secret_hash: row.try_get("secret_hash")?,
            caller: Arc::new(caller),
            used: AtomicI64::new(0),
            written: AtomicI64::new(0),
        });
        self.cache.put(id.to_string(), entry.clone());
        Ok(Some(entry))
    }

    /// Forget a key here (it was revoked, here or on another node).
    pub fn forget(&self, id: &str) {
        self.cache.forget(id);
    }

    /// A new key; its token is in the answer and nowhere else.
    pub async fn create(&self, name: &str, role: &str, created_by: &str) -> Result<(KeyInfo, String), KeyError> {
        let info = new_key(name, role)?;
        let secret = secret::random(32);
        let mut conn = self.store.write.acquire().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, name, role, secret_hash, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&info.id)
        .bind(&info.name)
        .bind(info.role.as_str())
        .bind(secret::digest(&secret))
        .bind(&info.created_at)
        .bind(created_by)
        .execute(&mut *conn)
        .await?;
        let token = format!("{PREFIX}{}_{secret}", info.id);
        Ok((info, token))
    }

    /// Every key not revoked, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, sqlx::Error> {
        self.write_last_used().await?;
        let rows = sqlx::query(
            "SELECT id, name, role, created_at, last_used_at FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.store.read)
        .await?;
        let mut keys = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(role) = Role::parse(&row.try_get::<String, _>("role")?) else { continue };
            keys.push(KeyInfo {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                role,
                created_at: row.try_get("created_at")?,
                last_used_at: row.try_get("last_used_at")?,
            });
        }
        Ok(keys)
    }

    /// Revoke a key; false if there is no such live key. The caller announces the revocation.
    pub async fn revoke(&self, id: &str) -> Result<bool, sqlx::Error> {
        let mut conn = self.store.write.acquire().await?;
        let done = sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(crate::clock::now())
            .bind(id)
            .execute(&mut *conn)
            .await?;
        drop(conn);
        self.forget(id);
        Ok(done.rows_affected() == 1)
    }

    /// Whether a key is still live (for sockets opened with it, after a missed revocation).
    pub async fn live(&self, id: &str) -> Result<bool, sqlx::Error> {
        let row = sqlx::query("SELECT 1 AS live FROM api_keys WHERE id = $1 AND revoked_at IS NULL")
            .bind(id)
            .fetch_optional(&self.store.read)
            .await?;
        Ok(row.is_some())
    }

    /// Write when the keys used since the last time were last used (one statement per key).
    pub async fn write_last_used(&self) -> Result<(), sqlx::Error> {
        let mut used: Vec<(String, i64, Option<Arc<Entry>>)> = self
            .cache
            .rows()
            .into_iter()
            .filter_map(|(id, e)| {
                let used = e.used.load(Ordering::Relaxed);
                (used > e.written.load(Ordering::Relaxed)).then_some((id, used, Some(e)))
            })
            .collect();
        if let Ok(mut uses) = self.uncached_uses.lock() {
            used.extend(uses.drain().map(|(id, at)| (id, at, None)));
        }
        if used.is_empty() {
            return Ok(());
        }
        let mut conn = self.store.write.acquire().await?;
        for (id, at, entry) in used {
            let at_text = chrono::DateTime::from_timestamp(at, 0).map(crate::clock::rfc3339).unwrap_or_default();
            sqlx::query(
                "UPDATE api_keys SET last_used_at = $1 WHERE id = $2 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind(at_text)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
            if let Some(entry) = entry {
                entry.written.store(at, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}

/// A validated new key (without its secret).
fn new_key(name: &str, role: &str) -> Result<KeyInfo, KeyError> {
    let name = app::domain::validate::name(name).map_err(|e| KeyError::Invalid(format!("key {e}")))?;
    let role = Role::parse(role).ok_or_else(|| {
        KeyError::Invalid(format!("role must be admin, staff, channel, cdc or metrics, got '{role}'"))
    })?;
    Ok(KeyInfo { id: secret::random_id(), name, role, created_at: crate::clock::now(), last_used_at: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_id_and_secret() {
        assert_eq!(parse("tk_0a1b_s3cr-et_x"), Some(("0a1b", "s3cr-et_x")));
        assert_eq!(parse("tk__secret"), None);
        assert_eq!(parse("tk_zz_secret"), None);
        assert_eq!(parse("0a1b_secret"), None);
        assert_eq!(parse("tk_0a1b_"), None);
    }

    #[test]
    fn a_key_needs_a_name_and_a_known_role() {
        assert!(new_key("till 1", "channel").is_ok());
        assert!(new_key("  ", "channel").is_err());
        assert!(new_key("till 1", "member").is_err());
    }
}
