//! Where a database's writes go: a connection taken for one transaction at a time.
//!
//! On PostgreSQL that is the pool's business: many connections, each taken and given back.
//!
//! On SQLite each file has one write connection (see the module docs of `store`), and taking it
//! from sqlx's pool costs two round trips to the driver's thread per use: the pool pings a
//! connection when it is taken (`test_before_acquire`) and again, in a task of its own, when it
//! is given back, and the next taker waits for that task. For the command writer that was 40 %
//! of every batch's time (docs/benchmark-history.md, 2026-11-29). So on
//! SQLite the one connection is taken out of the pool once, kept, and lent through a fair (first
//! come, first served) lock: whoever holds the lock holds the file's write lock too. After an
//! error that may have left it unusable, [`Writes::reset`] closes it and the pool opens a new one.

use crate::health::Health;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

#[derive(Clone)]
pub struct Writes {
    pool: AnyPool,
    /// SQLite: the write connection, once taken out of `pool`.
    kept: Option<Arc<Mutex<Option<PoolConnection<Any>>>>>,
    /// The event store's writes: refused once the node has stopped acknowledging writes (see
    /// `health`).
    guard: Option<Arc<Health>>,
}

/// A write connection, for one transaction; the next taker waits until it is dropped.
pub enum WriteConn {
    Pooled(PoolConnection<Any>),
    Lent(OwnedMappedMutexGuard<Option<PoolConnection<Any>>, AnyConnection>),
}

impl Writes {
    /// Lend the pool's one connection (`kept`: SQLite), or take from the pool each time.
    pub fn new(pool: AnyPool, kept: bool) -> Writes {
        Writes { pool, kept: kept.then(|| Arc::new(Mutex::new(None))), guard: None }
    }

    /// The same, refusing every write once `health` says writes are stopped.
    pub fn guarded(self, health: Arc<Health>) -> Writes {
        Writes { guard: Some(health), ..self }
    }

    /// Wait for the write connection (in order of asking, on SQLite).
    pub async fn acquire(&self) -> Result<WriteConn, sqlx::Error> {
        if let Some(stopped) = self.guard.as_ref().and_then(|health| health.writes_stopped()) {
            return Err(stopped.into_sqlx());
        }
        let Some(kept) = &self.kept else {
            return Ok(WriteConn::Pooled(self.pool.acquire().await?));
        };
        let mut guard: OwnedMutexGuard<Option<PoolConnection<Any>>> = kept.clone().lock_owned().await;
        if guard.is_none() {
            *guard = Some(self.pool.acquire().await?);
        }
        OwnedMutexGuard::try_map(guard, |conn| conn.as_deref_mut())
            .map(WriteConn::Lent)
            .map_err(|_| sqlx::Error::PoolClosed)
    }

    /// After an error: close the kept connection, so the next [`acquire`](Self::acquire) takes a
    /// new one from the pool. Not given back: after some errors its state is not what it seems
    /// (on a full disk SQLite cannot even roll back, and the connection stays inside the failed
    /// transaction, refusing every later `BEGIN`).
    pub async fn reset(&self) {
        if let Some(kept) = &self.kept {
            let conn = kept.lock().await.take();
            if let Some(conn) = conn {
                let _ = conn.close().await;
            }
        }
    }

    /// Close the kept connection and the pool.
    pub async fn close(&self) {
        self.reset().await;
        self.pool.close().await;
    }
}

impl Deref for WriteConn {
    type Target = AnyConnection;

    fn deref(&self) -> &AnyConnection {
        match self {
            WriteConn::Pooled(conn) => conn,
            WriteConn::Lent(conn) => conn,
        }
    }
}

impl DerefMut for WriteConn {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match self {
            WriteConn::Pooled(conn) => conn,
            WriteConn::Lent(conn) => conn,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::any::AnyPoolOptions;
    use sqlx::Row;

    async fn sqlite(dir: &tempfile::TempDir) -> AnyPool {
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("w.db").display());
        AnyPoolOptions::new().max_connections(1).connect(&url).await.expect("open")
    }

    #[tokio::test]
    async fn the_kept_connection_is_lent_in_turn_and_keeps_its_session() {
        let dir = tempfile::tempdir().expect("dir");
        let writes = Writes::new(sqlite(&dir).await, true);
        {
            let mut conn = writes.acquire().await.expect("first");
            // A temporary table lives as long as its connection: seeing it again below means the
            // same connection was lent, not a new one.
            sqlx::query("CREATE TEMP TABLE marker (x INTEGER)").execute(&mut *conn).await.expect("create");
            let second = tokio::time::timeout(std::time::Duration::from_millis(50), writes.acquire()).await;
            assert!(second.is_err(), "a second taker got the connection while the first held it");
        }
        let mut conn = writes.acquire().await.expect("again");
        let row = sqlx::query("SELECT COUNT(*) AS n FROM temp.marker").fetch_one(&mut *conn).await.expect("marker");
        assert_eq!(row.try_get::<i64, _>("n").expect("n"), 0);
        drop(conn);

        // Kept out of the pool between uses; after a reset the pool opens another.
        let short = std::time::Duration::from_millis(50);
        assert!(tokio::time::timeout(short, writes.pool.acquire()).await.is_err(), "the pool had the kept connection");
        writes.reset().await;
        let direct = tokio::time::timeout(std::time::Duration::from_secs(5), writes.pool.acquire()).await;
        assert!(matches!(direct, Ok(Ok(_))), "after a reset the pool has a connection again");
    }
}
