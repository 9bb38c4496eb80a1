//! Each consumer's checkpoint row: the position up to which its effects are stored, moved in the
//! same transaction as them.

use crate::clock;
use crate::store::{Store, Writes};
use sqlx::{AnyConnection, Row};

/// Make sure the consumer's row exists in `pool`, where its group commits (it is locked for every
/// batch), and read it.
pub(super) async fn init_checkpoint(store: &Store, pool: &Writes, name: &str) -> Result<i64, sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at) VALUES ($1, 0, $2) ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(clock::now())
    .execute(&mut *pool.acquire().await?)
    .await?;
    load_checkpoint(store, name).await
}

pub async fn load_checkpoint(store: &Store, name: &str) -> Result<i64, sqlx::Error> {
    let sql = format!("SELECT position FROM {} AS c WHERE name = $1", store.checkpoints_table());
    let row = sqlx::query(&sql).bind(name).fetch_optional(&store.read).await?;
    row.map(|r| r.try_get::<i64, _>("position")).transpose().map(|p| p.unwrap_or(0))
}

/// Move the checkpoint from `from` to `to`, inside the batch's transaction; false (and nothing
/// written) when it is no longer at `from`. On PostgreSQL the row lock this takes is held to the
/// commit, and a second node running the same batch waits on it, then finds the checkpoint moved:
/// so no batch is ever applied twice, whatever two nodes believe about who leads.
pub(super) async fn advance_checkpoint(
    conn: &mut AnyConnection,
    name: &str,
    from: i64,
    to: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE checkpoints SET position = $3, updated_at = $4, last_error = NULL WHERE name = $1 AND position = $2",
    )
    .bind(name)
    .bind(from)
    .bind(to)
    .bind(clock::now())
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Set a checkpoint outright (`tally rebuild`).
pub async fn save_checkpoint(conn: &mut AnyConnection, name: &str, position: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO checkpoints (name, position, updated_at, last_error) VALUES ($1, $2, $3, NULL) \
         ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at, last_error = NULL",
    )
    .bind(name)
    .bind(position)
    .bind(clock::now())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub(super) async fn record_error(pool: &Writes, name: &str, message: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE checkpoints SET updated_at = $2, last_error = $3 WHERE name = $1")
        .bind(name)
        .bind(clock::now())
        .bind(message)
        .execute(&mut *pool.acquire().await?)
        .await?;
    Ok(())
}
