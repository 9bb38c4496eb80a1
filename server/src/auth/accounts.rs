//! Accounts: who can sign in. Members sign in with their member email (the event store's
//! `email_reservations` say which member has it), people with their own.
//!
//! What an account may do is looked up once and kept in memory ([`Accounts::caller`]); a change
//! to it (password, role, disabled) clears it on every node along with its sessions (see
//! `revoke`).

use super::kept::Kept;
use super::secret;
use crate::store::Store;
use app::domain::access::{Caller, Role};
use app::domain::validate;
use sqlx::Row;
use std::sync::Arc;

/// An account as sign-in and the admin pages see it.
#[derive(Clone)]
pub struct Account {
    pub id: String,
    /// None for members.
    pub role: Option<Role>,
    pub member_id: Option<String>,
    pub email: Option<String>,
    pub name: String,
    pub password_hash: Option<String>,
    pub disabled: bool,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hash.
        f.debug_struct("Account").field("id", &self.id).field("role", &self.role).finish_non_exhaustive()
    }
}

impl Account {
    /// Who this account acts as, once signed in; None while disabled.
    pub fn caller(&self) -> Option<Caller> {
        if self.disabled {
            return None;
        }
        Some(match (&self.member_id, self.role) {
            (Some(member_id), _) => Caller::Member { account_id: self.id.clone(), member_id: member_id.clone() },
            (None, Some(role)) => Caller::Person { account_id: self.id.clone(), role, name: self.name.clone() },
            (None, None) => return None,
        })
    }
}

/// A person's account as the admin page lists it.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct PersonInfo {
    pub id: String,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub disabled: bool,
    pub created_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0}")]
    Invalid(String),
    #[error("another account already has this email address")]
    EmailTaken,
    #[error("no such account")]
    NotFound,
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

const COLUMNS: &str = "id, role, member_id, email, name, password_hash, disabled";

/// A member's account: `$1` id, `$2` member id, `$3` password hash, `$4` created at, `$5` by whom.
/// Also run by the command batch of a member who joins (`commands::io`).
pub const NEW_MEMBER_ACCOUNT_SQL: &str = "INSERT INTO accounts (id, role, member_id, name, password_hash, created_at, \
                                          created_by) VALUES ($1, 'member', $2, '', $3, $4, $5)";

/// Set a member's password inside the caller's transaction, making their account if they have
/// none yet (a member staff enrolled, on first access); returns the account's id.
pub async fn set_member_password(
    conn: &mut sqlx::AnyConnection,
    member_id: &str,
    hash: &str,
    created_by: &str,
) -> Result<String, sqlx::Error> {
    let existing =
        sqlx::query("SELECT id FROM accounts WHERE member_id = $1").bind(member_id).fetch_optional(&mut *conn).await?;
    if let Some(row) = existing {
        let id: String = row.try_get("id")?;
        sqlx::query("UPDATE accounts SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        return Ok(id);
    }
    let id = secret::random_id();
    sqlx::query(NEW_MEMBER_ACCOUNT_SQL)
        .bind(&id)
        .bind(member_id)
        .bind(hash)
        .bind(crate::clock::now())
        .bind(created_by)
        .execute(&mut *conn)
        .await?;
    Ok(id)
}

fn account(row: &sqlx::any::AnyRow) -> Result<Account, sqlx::Error> {
    let role: String = row.try_get("role")?;
    Ok(Account {
        id: row.try_get("id")?,
        role: Role::for_people(&role),
        member_id: row.try_get("member_id")?,
        email: row.try_get("email")?,
        name: row.try_get("name")?,
        password_hash: row.try_get("password_hash")?,
        disabled: row.try_get::<i64, _>("disabled")? != 0,
    })
}

pub struct Accounts {
    store: Store,
    cache: Kept<Arc<Caller>>,
}

/// Accounts kept in memory at most.
const CACHE_ENTRIES: usize = 100_000;

impl Accounts {
    pub fn new(store: Store, cached: bool) -> Self {
        Accounts { store, cache: Kept::new(cached, CACHE_ENTRIES) }
    }

    /// See `Kept`.
    pub fn set_cached(&self, on: bool) {
        self.cache.set_on(on);
    }

    pub fn forget(&self, id: &str) {
        self.cache.forget(id);
    }

    /// Who a signed-in account acts as; None if it is gone or disabled.
    pub async fn caller(&self, id: &str) -> Result<Option<Arc<Caller>>, sqlx::Error> {
        if let Some(caller) = self.cache.get(id) {
            return Ok(Some(caller));
        }
        let Some(caller) = self.get(id).await?.and_then(|a| a.caller()) else { return Ok(None) };
        let caller = Arc::new(caller);
        self.cache.put(id.to_string(), caller.clone());
        Ok(Some(caller))
    }

    pub async fn get(&self, id: &str) -> Result<Option<Account>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM accounts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.store.read)
            .await?;
        row.as_ref().map(account).transpose()
    }

    /// The member's account, if they have one.
    pub async fn of_member(&self, member_id: &str) -> Result<Option<Account>, sqlx::Error> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM accounts WHERE member_id = $1"))
            .bind(member_id)
            .fetch_optional(&self.store.read)
            .await?;
        row.as_ref().map(account).transpose()
    }

    /// The accounts an email signs in to: a person's, and the account of the member who has that
    /// email (one person may be both).
    pub async fn for_sign_in(&self, email: &str) -> Result<Vec<Account>, sqlx::Error> {
        let key = validate::email_key(email);
        let people = sqlx::query(&format!("SELECT {COLUMNS} FROM accounts WHERE email = $1"))
            .bind(&key)
            .fetch_all(&self.store.read)
            .await?;
        let members = sqlx::query(&format!(
            "SELECT {} FROM email_reservations r JOIN accounts a ON a.member_id = r.member_id WHERE r.email = $1",
            COLUMNS.split(", ").map(|c| format!("a.{c}")).collect::<Vec<_>>().join(", ")
        ))
        .bind(&key)
        .fetch_all(&self.store.read)
        .await?;
        people.iter().chain(&members).map(account).collect()
    }

    /// A person's account, without a password (set through an access link).
    pub async fn create_person(
        &self,
        email: &str,
        name: &str,
        role: &str,
        created_by: &str,
    ) -> Result<PersonInfo, AccountError> {
        let email = validate::email(email).map_err(AccountError::Invalid)?;
        let name = validate::name(name).map_err(AccountError::Invalid)?;
        let role = Role::for_people(role)
            .ok_or_else(|| AccountError::Invalid(format!("role must be staff or admin, got '{role}'")))?;
        let person = PersonInfo {
            id: secret::random_id(),
            email: validate::email_key(&email),
            name,
            role,
            disabled: false,
            created_at: crate::clock::now(),
        };
        let mut conn = self.store.write.acquire().await?;
        let inserted = sqlx::query(
            "INSERT INTO accounts (id, role, email, name, created_at, created_by) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (email) DO NOTHING",
        )
        .bind(&person.id)
        .bind(role.as_str())
        .bind(&person.email)
        .bind(&person.name)
        .bind(&person.created_at)
        .bind(created_by)
        .execute(&mut *conn)
        .await?;
        if inserted.rows_affected() == 0 {
            return Err(AccountError::EmailTaken);
        }
        Ok(person)
    }

    pub async fn people(&self) -> Result<Vec<PersonInfo>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, email, name, role, disabled, created_at FROM accounts WHERE member_id IS NULL ORDER BY created_at, id",
        )
        .fetch_all(&self.store.read)
        .await?;
        let mut people = Vec::with_capacity(rows.len());
        for row in rows {
            let Some(role) = Role::for_people(&row.try_get::<String, _>("role")?) else { continue };
            people.push(PersonInfo {
                id: row.try_get("id")?,
                email: row.try_get::<Option<String>, _>("email")?.unwrap_or_default(),
                name: row.try_get("name")?,
                role,
                disabled: row.try_get::<i64, _>("disabled")? != 0,
                created_at: row.try_get("created_at")?,
            });
        }
        Ok(people)
    }

    /// Change a person's role or disable them (or enable them again). The caller ends their
    /// sessions and announces it.
    pub async fn update_person(
        &self,
        id: &str,
        role: Option<&str>,
        disabled: Option<bool>,
    ) -> Result<(), AccountError> {
        let role = match role {
            Some(raw) => Some(
                Role::for_people(raw)
                    .ok_or_else(|| AccountError::Invalid(format!("role must be staff or admin, got '{raw}'")))?,
            ),
            None => None,
        };
        let mut conn = self.store.write.acquire().await?;
        let done = sqlx::query(
            "UPDATE accounts SET role = COALESCE($1, role), disabled = COALESCE($2, disabled) \
             WHERE id = $3 AND member_id IS NULL",
        )
        .bind(role.map(Role::as_str))
        .bind(disabled.map(i64::from))
        .bind(id)
        .execute(&mut *conn)
        .await?;
        drop(conn);
        self.forget(id);
        if done.rows_affected() == 0 {
            return Err(AccountError::NotFound);
        }
        Ok(())
    }

    /// Set an account's password (a hash). The caller ends its other sessions.
    pub async fn set_password(&self, id: &str, hash: &str) -> Result<(), sqlx::Error> {
        let mut conn = self.store.write.acquire().await?;
        sqlx::query("UPDATE accounts SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(id)
            .execute(&mut *conn)
            .await?;
        drop(conn);
        self.forget(id);
        Ok(())
    }
}
