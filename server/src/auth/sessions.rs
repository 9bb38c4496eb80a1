//! Where `tower-sessions` keeps signed-in sessions: the `sessions` table of the event store's
//! database (so every node shares them), with an in-memory copy in front of it.
//!
//! `tower-sessions` owns the cookie, the session id (a random 128-bit value, cycled at sign-in)
//! and the record; this store only keeps records. It is Tally's own rather than
//! `tower-sessions-sqlx-store` because Tally needs what that one cannot give:
//! - no database round trip per request: records are served from memory, and a revocation clears
//!   them on every node (see `revoke`);
//! - the sessions of one account can be found and ended together (a password change, a changed
//!   role), so each row names its account;
//! - a copy of the table signs no one in: rows are keyed by the SHA-256 of the session id;
//! - writes go through the store's one write connection on SQLite, in turn with the command
//!   writer, instead of a second connection competing for the file's lock.
//!
//! Idle expiry: a record expires `idle` after it was last saved. Reading does not count as
//! activity in `tower-sessions`, so the request path marks a session as used (which saves it) at
//! most once per [`TOUCH_EVERY`]: an active session is written about once a minute, not on every
//! request, and lives on; an idle one expires.

use super::kept::Kept;
use crate::store::Store;
use sqlx::Row;
use std::sync::Arc;
use time::OffsetDateTime;
use tower_sessions::session::{Id, Record};
use tower_sessions::session_store::{self, Error};

/// The session cookie's name.
pub const COOKIE: &str = "tally_session";

/// The idle expiry as `tower-sessions` takes it.
pub fn idle(idle: std::time::Duration) -> time::Duration {
    time::Duration::try_from(idle).unwrap_or(time::Duration::hours(12))
}

/// The key of Tally's entry in a session record.
pub const AUTH_KEY: &str = "auth";

/// How often a session in use is saved, moving its expiry forward.
pub const TOUCH_EVERY: time::Duration = time::Duration::minutes(1);

/// Records kept in memory; beyond that the copy starts over (every record is still in the table).
const CACHE_ENTRIES: usize = 100_000;

/// What a signed-in session holds.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SessionAuth {
    /// The account signed in.
    pub account: String,
    /// When the session was last marked as used (unix seconds).
    pub touched: i64,
}

impl SessionAuth {
    pub fn new(account: String) -> Self {
        SessionAuth { account, touched: OffsetDateTime::now_utc().unix_timestamp() }
    }

    /// Whether the session should be saved again to stay alive.
    pub fn stale(&self, now: OffsetDateTime) -> bool {
        now.unix_timestamp() - self.touched >= TOUCH_EVERY.whole_seconds()
    }
}

#[derive(Clone)]
struct Cached {
    /// The record as stored; its `id` is whatever the entry was read with (the table knows only
    /// the hash), so loads put the caller's id back.
    record: Record,
    account: String,
}

#[derive(Clone, Debug)]
pub struct SessionRecords {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// By the SHA-256 of the session id, as in the table.
    cache: Kept<Cached>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionRecords").finish_non_exhaustive()
    }
}

/// The stored name of a session id: its SHA-256 (the id itself never reaches the table or a
/// notification).
pub fn id_hash(id: &Id) -> String {
    super::secret::digest(&id.to_string())
}

fn backend(err: impl std::fmt::Display) -> Error {
    Error::Backend(err.to_string())
}

fn account_of(record: &Record) -> Result<String, Error> {
    let auth =
        record.data.get(AUTH_KEY).ok_or_else(|| Error::Encode("a session is kept only once signed in".into()))?;
    let auth: SessionAuth = serde_json::from_value(auth.clone()).map_err(|e| Error::Decode(e.to_string()))?;
    Ok(auth.account)
}

impl SessionRecords {
    pub fn new(store: Store, cached: bool) -> Self {
        SessionRecords { inner: Arc::new(Inner { store, cache: Kept::new(cached, CACHE_ENTRIES) }) }
    }

    /// See `Kept`.
    pub fn set_cached(&self, on: bool) {
        self.inner.cache.set_on(on);
    }

    fn remember(&self, hash: String, record: &Record, account: String) {
        self.inner.cache.put(hash, Cached { record: record.clone(), account });
    }

    /// Forget these sessions here (they were ended, here or on another node).
    pub fn forget(&self, hashes: &[String]) {
        for hash in hashes {
            self.inner.cache.forget(hash);
        }
    }

    /// Forget every session of `account` but `except`, here.
    pub fn forget_account(&self, account: &str, except: Option<&str>) {
        self.inner.cache.retain(|hash, c| c.account != account || Some(hash.as_str()) == except);
    }

    /// End every session of `account` except `except` (a hash) in the table; returns the hashes
    /// of those ended. The caller announces the revocation.
    pub async fn end_account(&self, account: &str, except: Option<&str>) -> Result<Vec<String>, sqlx::Error> {
        let mut conn = self.inner.store.write.acquire().await?;
        let rows = sqlx::query("DELETE FROM sessions WHERE account_id = $1 AND id_hash <> $2 RETURNING id_hash")
            .bind(account)
            .bind(except.unwrap_or(""))
            .fetch_all(&mut *conn)
            .await?;
        drop(conn);
        self.forget_account(account, except);
        rows.iter().map(|row| row.try_get::<String, _>("id_hash")).collect()
    }

    /// Whether the session stored as `hash` is still signed in (not ended, not expired), for the
    /// sockets opened with it. From memory when known there and alive; else from the table.
    pub async fn alive(&self, hash: &str) -> Result<bool, sqlx::Error> {
        let now = OffsetDateTime::now_utc();
        let cached = self.inner.cache.get(hash).map(|c| c.record.expiry_date);
        if cached.is_some_and(|expiry| expiry > now) {
            return Ok(true);
        }
        // Kept in memory from here: the sweep asks about every open socket's session twice a second.
        match self.read(hash, Id(0)).await? {
            Some((record, account)) => {
                self.remember(hash.to_string(), &record, account);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// The record stored as `hash`, if it has not expired, and its account.
    async fn read(&self, hash: &str, id: Id) -> Result<Option<(Record, String)>, sqlx::Error> {
        let row =
            sqlx::query("SELECT account_id, data, expires_at FROM sessions WHERE id_hash = $1 AND expires_at > $2")
                .bind(hash)
                .bind(OffsetDateTime::now_utc().unix_timestamp())
                .fetch_optional(&self.inner.store.read)
                .await?;
        let Some(row) = row else { return Ok(None) };
        let data: String = row.try_get("data")?;
        let expires_at: i64 = row.try_get("expires_at")?;
        let (Ok(data), Ok(expiry_date)) =
            (serde_json::from_str(&data), OffsetDateTime::from_unix_timestamp(expires_at))
        else {
            tracing::warn!("a stored session cannot be read; it counts as signed out");
            return Ok(None);
        };
        Ok(Some((Record { id, data, expiry_date }, row.try_get("account_id")?)))
    }

    /// Delete expired sessions (they would never load again); returns how many.
    pub async fn delete_expired(&self) -> Result<u64, sqlx::Error> {
        let mut conn = self.inner.store.write.acquire().await?;
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(OffsetDateTime::now_utc().unix_timestamp())
            .execute(&mut *conn)
            .await?;
        Ok(done.rows_affected())
    }
}

/// The `data` column: the record's fields (its id is the row's key, hashed).
fn encode(record: &Record) -> Result<String, Error> {
    serde_json::to_string(&record.data).map_err(|e| Error::Encode(e.to_string()))
}

#[async_trait::async_trait]
impl session_store::SessionStore for SessionRecords {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let account = account_of(record)?;
        let now = crate::clock::now();
        // A fresh random 128-bit id is as good as unique; should it not be, draw again.
        for _ in 0..4 {
            let hash = id_hash(&record.id);
            let mut conn = self.inner.store.write.acquire().await.map_err(backend)?;
            let inserted = sqlx::query(
                "INSERT INTO sessions (id_hash, account_id, data, expires_at, created_at) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (id_hash) DO NOTHING",
            )
            .bind(&hash)
            .bind(&account)
            .bind(encode(record)?)
            .bind(record.expiry_date.unix_timestamp())
            .bind(&now)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
            if inserted.rows_affected() == 1 {
                drop(conn);
                self.remember(hash, record, account);
                return Ok(());
            }
            record.id = Id::default();
        }
        Err(Error::Backend("could not draw an unused session id".into()))
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let account = account_of(record)?;
        let hash = id_hash(&record.id);
        let mut conn = self.inner.store.write.acquire().await.map_err(backend)?;
        // Only a session that still exists is saved: one ended meanwhile (signed out on another
        // node) stays ended.
        let updated = sqlx::query("UPDATE sessions SET data = $1, expires_at = $2 WHERE id_hash = $3")
            .bind(encode(record)?)
            .bind(record.expiry_date.unix_timestamp())
            .bind(&hash)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        drop(conn);
        if updated.rows_affected() == 1 {
            self.remember(hash, record, account);
        } else {
            self.forget(&[hash]);
        }
        Ok(())
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let hash = id_hash(id);
        let now = OffsetDateTime::now_utc();
        if let Some(cached) = self.inner.cache.get(&hash) {
            if cached.record.expiry_date > now {
                return Ok(Some(Record { id: *id, ..cached.record }));
            }
        }
        // Not here, or expired here: another node may have kept it alive since.
        match self.read(&hash, *id).await.map_err(backend)? {
            Some((record, account)) => {
                self.remember(hash, &record, account);
                Ok(Some(record))
            }
            None => {
                self.forget(&[hash]);
                Ok(None)
            }
        }
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        let hash = id_hash(id);
        let mut conn = self.inner.store.write.acquire().await.map_err(backend)?;
        sqlx::query("DELETE FROM sessions WHERE id_hash = $1")
            .bind(&hash)
            .execute(&mut *conn)
            .await
            .map_err(backend)?;
        drop(conn);
        self.forget(&[hash]);
        Ok(())
    }
}
