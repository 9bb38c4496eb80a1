//! Where a command batch reads and writes: through sqlx (PostgreSQL, SQLite without a file of
//! its own, and the loyalty policy's batches), or on the event store's native SQLite connection (see `store::sqlite`), which
//! runs a whole batch without handing each statement to another thread.
//!
//! The batch (`batch.rs`) decides; these only load and store. Each method is one of the batch's
//! few statements, so the two implementations stay side by side and alike.

use super::batch::{Reservation, StoredKey};
use super::{Answer, Envelope, NewAccount};
use crate::auth::accounts::NEW_MEMBER_ACCOUNT_SQL;
use crate::store::{self, NativeTx, NewEvent, StoredEvent, Streams, EVENT_COLUMNS};
use sqlx::Row;
use std::collections::HashMap;

/// A batch's statements, inside the caller's transaction.
// Not `dyn`-safe and without `Send` bounds on the futures: every caller names its connection's
// type and awaits in place.
#[allow(async_fn_in_trait)]
pub trait BatchIo {
    /// The newest position (0 when the log is empty).
    async fn head(&mut self) -> Result<i64, sqlx::Error>;
    /// Events after `after`, oldest first, at most `limit`.
    async fn events_after(&mut self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error>;
    /// Every event of each of these streams, oldest first; a stream with no events is absent.
    async fn load_streams(&mut self, stream_ids: &[&str]) -> Result<HashMap<String, Vec<StoredEvent>>, sqlx::Error>;
    /// The stored answers of these keys in `scope`, by key (absent: never seen).
    async fn idempotency_keys(&mut self, scope: &str, keys: &[&str]) -> Result<Vec<(String, StoredKey)>, sqlx::Error>;
    /// `(email key, member)` for each of these email keys that is taken.
    async fn email_owners(&mut self, emails: &[&str]) -> Result<Vec<(String, String)>, sqlx::Error>;
    async fn write_reservation(&mut self, reservation: &Reservation) -> Result<(), sqlx::Error>;
    /// The account of a member who joined by themselves (see `NewAccount`).
    async fn create_member_account(
        &mut self,
        member_id: &str,
        account: &NewAccount,
        created_by: &str,
        now: &str,
    ) -> Result<(), sqlx::Error>;
    /// Append the events, in order; returns them as stored, each with its position. A stream
    /// version already taken fails with a unique violation (the transaction must then be rolled
    /// back: never a partial append).
    async fn append(&mut self, events: Vec<NewEvent>, recorded_at: &str) -> Result<Vec<StoredEvent>, sqlx::Error>;
    /// Store the first answer of each keyed command.
    async fn save_idempotency_keys(&mut self, records: &[(&Envelope, &Answer)], now: &str) -> Result<(), sqlx::Error>;
}

const KEYS_SQL: &str = "SELECT key, request, response FROM idempotency_keys WHERE scope = $1 AND key IN ({})";
const OWNERS_SQL: &str = "SELECT email, member_id FROM email_reservations WHERE email IN ({})";
const TAKE_SQL: &str = "INSERT INTO email_reservations (email, member_id) VALUES ($1, $2)";
const RELEASE_SQL: &str = "DELETE FROM email_reservations WHERE email = $1 AND member_id = $2";
const SAVE_KEY_COLUMNS: &str = "INSERT INTO idempotency_keys (scope, key, request, response, created_at) VALUES";

impl BatchIo for Streams<'_> {
    async fn head(&mut self) -> Result<i64, sqlx::Error> {
        let row =
            sqlx::query("SELECT COALESCE(MAX(position), 0) AS head FROM events").fetch_one(&mut *self.conn).await?;
        row.try_get("head")
    }

    async fn events_after(&mut self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2");
        let rows = sqlx::query(&sql).bind(after).bind(limit).fetch_all(&mut *self.conn).await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    async fn load_streams(&mut self, stream_ids: &[&str]) -> Result<HashMap<String, Vec<StoredEvent>>, sqlx::Error> {
        Streams::load_streams(self, stream_ids).await
    }

    async fn idempotency_keys(&mut self, scope: &str, keys: &[&str]) -> Result<Vec<(String, StoredKey)>, sqlx::Error> {
        let mut found = Vec::new();
        for row in store::select_in(self.conn, KEYS_SQL, &[scope], keys).await? {
            let stored = StoredKey { request: row.try_get("request")?, response: row.try_get("response")? };
            found.push((row.try_get("key")?, stored));
        }
        Ok(found)
    }

    async fn email_owners(&mut self, emails: &[&str]) -> Result<Vec<(String, String)>, sqlx::Error> {
        let rows = store::select_in(self.conn, OWNERS_SQL, &[], emails).await?;
        rows.iter().map(|row| Ok((row.try_get("email")?, row.try_get("member_id")?))).collect()
    }

    async fn write_reservation(&mut self, reservation: &Reservation) -> Result<(), sqlx::Error> {
        let (sql, key, member_id) = match reservation {
            Reservation::Take { key, member_id } => (TAKE_SQL, key, member_id),
            Reservation::Release { key, member_id } => (RELEASE_SQL, key, member_id),
        };
        sqlx::query(sql).bind(key).bind(member_id).execute(&mut *self.conn).await?;
        Ok(())
    }

    async fn create_member_account(
        &mut self,
        member_id: &str,
        account: &NewAccount,
        created_by: &str,
        now: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(NEW_MEMBER_ACCOUNT_SQL)
            .bind(&account.id)
            .bind(member_id)
            .bind(&account.password_hash)
            .bind(now)
            .bind(created_by)
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    async fn append(&mut self, events: Vec<NewEvent>, recorded_at: &str) -> Result<Vec<StoredEvent>, sqlx::Error> {
        Streams::append(self, events, recorded_at).await
    }

    async fn save_idempotency_keys(&mut self, records: &[(&Envelope, &Answer)], now: &str) -> Result<(), sqlx::Error> {
        for chunk in records.chunks(store::MAX_PARAMS / 5) {
            let values =
                (0..chunk.len()).map(|i| format!("({})", store::params(self.conn, i * 5 + 1, 5))).collect::<Vec<_>>();
            let sql = format!("{SAVE_KEY_COLUMNS} {}", values.join(", "));
            let mut query = sqlx::query(&sql);
            for (envelope, answer) in chunk {
                let Some(idem) = &envelope.idempotency else { continue };
                let response = serde_json::to_string(&answer.outcome).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
                query = query.bind(&idem.scope).bind(&idem.key).bind(&idem.request).bind(response).bind(now);
            }
            query.execute(&mut *self.conn).await?;
        }
        Ok(())
    }
}

/// The same statements on the native connection: one row at a time with statements prepared
/// once per connection, since here a statement costs no hand-off. (`$n` is SQLite syntax too.)
impl BatchIo for NativeTx<'_> {
    async fn head(&mut self) -> Result<i64, sqlx::Error> {
        self.read_head()
    }

    async fn events_after(&mut self, after: i64, limit: i64) -> Result<Vec<StoredEvent>, sqlx::Error> {
        self.read_after(after, limit)
    }

    async fn load_streams(&mut self, stream_ids: &[&str]) -> Result<HashMap<String, Vec<StoredEvent>>, sqlx::Error> {
        let mut out: HashMap<String, Vec<StoredEvent>> = HashMap::new();
        for event in self.read_streams(stream_ids)? {
            out.entry(event.stream_id.clone()).or_default().push(event);
        }
        Ok(out)
    }

    async fn idempotency_keys(&mut self, scope: &str, keys: &[&str]) -> Result<Vec<(String, StoredKey)>, sqlx::Error> {
        let sql = KEYS_SQL.replace("IN ({})", "= $2");
        let mut found = Vec::new();
        for key in keys {
            let stored = self
                .query_one(&sql, &[&scope, key], |row| Ok(StoredKey { request: row.get(1)?, response: row.get(2)? }))?;
            if let Some(stored) = stored {
                found.push((key.to_string(), stored));
            }
        }
        Ok(found)
    }

    async fn email_owners(&mut self, emails: &[&str]) -> Result<Vec<(String, String)>, sqlx::Error> {
        let sql = OWNERS_SQL.replace("IN ({})", "= $1");
        let mut found = Vec::new();
        for email in emails {
            if let Some(member_id) = self.query_one(&sql, &[email], |row| row.get::<_, String>(1))? {
                found.push((email.to_string(), member_id));
            }
        }
        Ok(found)
    }

    async fn write_reservation(&mut self, reservation: &Reservation) -> Result<(), sqlx::Error> {
        match reservation {
            Reservation::Take { key, member_id } => self.execute(TAKE_SQL, &[key, member_id])?,
            Reservation::Release { key, member_id } => self.execute(RELEASE_SQL, &[key, member_id])?,
        };
        Ok(())
    }

    async fn create_member_account(
        &mut self,
        member_id: &str,
        account: &NewAccount,
        created_by: &str,
        now: &str,
    ) -> Result<(), sqlx::Error> {
        self.execute(NEW_MEMBER_ACCOUNT_SQL, &[&account.id, &member_id, &account.password_hash, &now, &created_by])?;
        Ok(())
    }

    async fn append(&mut self, events: Vec<NewEvent>, recorded_at: &str) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let mut stored = Vec::with_capacity(events.len());
        for event in events {
            let (data, metadata) = (event.data.to_string(), event.metadata.to_string());
            let position = self.append_event(&event, &data, &metadata, recorded_at)?;
            stored.push(event.stored(position, recorded_at));
        }
        Ok(stored)
    }

    async fn save_idempotency_keys(&mut self, records: &[(&Envelope, &Answer)], now: &str) -> Result<(), sqlx::Error> {
        let sql = format!("{SAVE_KEY_COLUMNS} ($1, $2, $3, $4, $5)");
        for (envelope, answer) in records {
            let Some(idem) = &envelope.idempotency else { continue };
            let response = serde_json::to_string(&answer.outcome).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            self.execute(&sql, &[&idem.scope, &idem.key, &idem.request, &response, &now])?;
        }
        Ok(())
    }
}
