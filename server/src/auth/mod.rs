//! Identity and access (API.md "Identity and access"): accounts, sessions, keys, access links,
//! sign-in limits, and the revocations that end them on every node.
//!
//! Who may do what is not here: that is one pure table, `app::domain::access`. This module says
//! who is asking (the request path resolves a [`Caller`] from a bearer key or a session cookie,
//! from memory) and keeps that answer true: when a session ends or a key is revoked, every node
//! forgets it and closes the sockets it opened (see [`Auth::revoke`]).

pub mod accounts;
mod kept;
pub mod keys;
pub mod limits;
pub mod links;
pub mod password;
pub mod secret;
pub mod sessions;
pub mod sockets;

use crate::store::{Backend, Store};
use accounts::Accounts;
use keys::Keys;
use limits::SignInLimits;
use password::Passwords;
use sessions::SessionRecords;
use sockets::{Owner, Sockets};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// PostgreSQL: where nodes tell each other of revocations.
pub const CHANNEL: &str = "tally_auth";

/// What the identity layer is configured with (see `config::ServeArgs`).
#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// A session ends after this long without use.
    pub session_idle: Duration,
    /// `scheme://host[:port]` of the configured public URL, if any: the only origin allowed to
    /// make cookie-authenticated changes (else the request's own `Host`).
    pub public_origin: Option<String>,
    /// Cookies are `Secure` (and HSTS is sent) when the public URL is https.
    pub https: bool,
    /// Open WebSockets allowed per account or key.
    pub max_sockets_per_principal: usize,
    /// Password hashes computed at once.
    pub hash_concurrency: usize,
}

impl AuthConfig {
    /// From `TALLY_PUBLIC_URL` (may be empty) and the rest.
    pub fn new(
        public_url: &str,
        session_idle: Duration,
        max_sockets_per_principal: usize,
        hash_concurrency: usize,
    ) -> anyhow::Result<Self> {
        let public_url = public_url.trim().trim_end_matches('/');
        let public_origin = if public_url.is_empty() {
            None
        } else {
            let (scheme, rest) = public_url
                .split_once("://")
                .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
                .ok_or_else(|| anyhow::anyhow!("TALLY_PUBLIC_URL must start with http:// or https://"))?;
            let host = rest.split('/').next().unwrap_or_default();
            anyhow::ensure!(!host.is_empty(), "TALLY_PUBLIC_URL has no host");
            Some(format!("{scheme}://{}", host.to_ascii_lowercase()))
        };
        let https = public_origin.as_deref().is_some_and(|o| o.starts_with("https://"));
        Ok(AuthConfig {
            session_idle,
            public_origin,
            https,
            max_sockets_per_principal: max_sockets_per_principal.max(1),
            hash_concurrency: hash_concurrency.max(1),
        })
    }
}

/// A revocation, as applied on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    /// One session ended (signed out), by its id's hash.
    Session(String),
    /// Every session of an account ended but one (a password change keeps the session that made
    /// it), or the account itself changed (role, disabled).
    Account { account: String, except: Option<String> },
    /// A key was revoked.
    Key(String),
}

impl Revoked {
    fn payload(&self) -> String {
        match self {
            Revoked::Session(hash) => format!("session:{hash}"),
            Revoked::Account { account, except } => format!("account:{account}:{}", except.as_deref().unwrap_or("")),
            Revoked::Key(id) => format!("key:{id}"),
        }
    }

    fn parse(payload: &str) -> Option<Revoked> {
        let (kind, rest) = payload.split_once(':')?;
        Some(match kind {
            "session" => Revoked::Session(rest.to_string()),
            "account" => {
                let (account, except) = rest.split_once(':')?;
                let except = (!except.is_empty()).then(|| except.to_string());
                Revoked::Account { account: account.to_string(), except }
            }
            "key" => Revoked::Key(rest.to_string()),
            _ => return None,
        })
    }
}

pub struct Auth {
    pub store: Store,
    pub config: AuthConfig,
    pub passwords: Passwords,
    pub sessions: SessionRecords,
    pub accounts: Accounts,
    pub keys: Keys,
    pub sockets: Arc<Sockets>,
    pub limits: SignInLimits,
}

impl Auth {
    pub fn new(store: Store, config: AuthConfig) -> Self {
        // On PostgreSQL nothing is kept in memory until revocations from other nodes are heard.
        let cached = store.backend == Backend::Sqlite;
        Auth {
            passwords: Passwords::new(config.hash_concurrency),
            sessions: SessionRecords::new(store.clone(), cached),
            accounts: Accounts::new(store.clone(), cached),
            keys: Keys::new(store.clone(), cached),
            sockets: Sockets::new(config.max_sockets_per_principal),
            limits: SignInLimits::default(),
            config,
            store,
        }
    }

    /// End access on every node: forget it here, close its sockets, and tell the other nodes
    /// (PostgreSQL), after the change that caused it has committed.
    pub async fn revoke(&self, revoked: Revoked) {
        self.apply(&revoked);
        if self.store.backend == Backend::Postgres {
            let sent = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(revoked.payload())
                .execute(&self.store.read)
                .await;
            if let Err(err) = sent {
                // The other nodes find out when their sockets are next checked against the table
                // (their sweep) or when their listener reconnects.
                tracing::error!(error = %err, "could not announce a revocation to the other nodes");
            }
        }
    }

    /// Apply a revocation on this node.
    fn apply(&self, revoked: &Revoked) {
        let closed = match revoked {
            Revoked::Session(hash) => {
                self.sessions.forget(std::slice::from_ref(hash));
                self.sockets.close_where(|o| matches!(o, Owner::Session { hash: h, .. } if h == hash))
            }
            Revoked::Account { account, except } => {
                self.accounts.forget(account);
                self.sessions.forget_account(account, except.as_deref());
                self.sockets.close_where(|o| {
                    matches!(o, Owner::Session { hash, account: a } if a == account && Some(hash) != except.as_ref())
                })
            }
            Revoked::Key(id) => {
                self.keys.forget(id);
                self.sockets.close_where(|o| matches!(o, Owner::Key(k) if k == id))
            }
        };
        if closed > 0 {
            tracing::info!(?revoked, closed, "closed the sockets of revoked access");
            metrics::counter!("tally_ws_revoked_total").increment(closed as u64);
        }
    }

    /// Close the sockets whose session has ended or expired (checked against memory, and the
    /// table when memory says expired); with `keys`, also those of keys revoked meanwhile
    /// (after revocations may have been missed).
    pub async fn recheck_sockets(&self, keys: bool) {
        for owner in self.sockets.owners() {
            let live = match &owner {
                Owner::Session { hash, .. } => self.sessions.alive(hash).await,
                Owner::Key(id) if keys => self.keys.live(id).await,
                Owner::Key(_) => Ok(true),
            };
            match live {
                Ok(true) => {}
                Ok(false) => {
                    let closed = self.sockets.close_where(|o| *o == owner);
                    tracing::info!(closed, "closed the sockets of an ended session or key");
                }
                Err(err) => tracing::warn!(error = %err, "cannot check a socket's session"),
            }
        }
    }

    /// Housekeeping, until shut down: sockets of expired sessions closed within half a second;
    /// keys' last use written about once a minute; expired sessions, old links and old sign-in
    /// failures dropped hourly.
    pub async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let mut sweep = tokio::time::interval(Duration::from_millis(500));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut ticks: u64 = 0;
        loop {
            tokio::select! {
                _ = sweep.tick() => {}
                _ = shutdown.cancelled() => break,
            }
            self.recheck_sockets(false).await;
            ticks += 1;
            if ticks.is_multiple_of(120) {
                if let Err(err) = self.keys.write_last_used().await {
                    tracing::warn!(error = %err, "cannot write when keys were last used");
                }
            }
            if ticks % 7200 == 1 {
                self.prune().await;
            }
        }
        let _ = self.keys.write_last_used().await;
    }

    async fn prune(&self) {
        self.limits.forget_old();
        match self.sessions.delete_expired().await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "deleted expired sessions"),
            Ok(_) => {}
            Err(err) => tracing::warn!(error = %err, "cannot delete expired sessions"),
        }
        if let Err(err) = links::prune(&self.store).await {
            tracing::warn!(error = %err, "cannot delete old access links");
        }
    }

    /// PostgreSQL: the notice listener is connected (see `notices`); revocations from other
    /// nodes will be heard, so sessions, accounts and keys may be kept in memory again. The
    /// sockets opened meanwhile are checked against the tables, for revocations missed.
    pub async fn listening(&self) {
        self.set_cached(true);
        self.recheck_sockets(true).await;
    }

    /// PostgreSQL: the notice listener lost its connection: nothing is kept in memory (every
    /// request reads the tables) until it is back, so nothing revoked elsewhere is missed.
    pub fn not_listening(&self) {
        self.set_cached(false);
    }

    /// PostgreSQL: a revocation another node (or this one) announced.
    pub fn notice(&self, payload: &str) {
        match Revoked::parse(payload) {
            Some(revoked) => self.apply(&revoked),
            None => tracing::warn!(payload, "unknown revocation notice"),
        }
    }

    fn set_cached(&self, on: bool) {
        self.sessions.set_cached(on);
        self.accounts.set_cached(on);
        self.keys.set_cached(on);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_travel_as_text_and_back() {
        for revoked in [
            Revoked::Session("abc".into()),
            Revoked::Account { account: "a1".into(), except: Some("h".into()) },
            Revoked::Account { account: "a1".into(), except: None },
            Revoked::Key("k1".into()),
        ] {
            assert_eq!(Revoked::parse(&revoked.payload()), Some(revoked));
        }
        assert_eq!(Revoked::parse("nonsense"), None);
    }

    #[test]
    fn the_public_url_gives_the_origin_and_whether_cookies_are_secure() {
        let idle = Duration::from_secs(60);
        let config = AuthConfig::new("https://Loyalty.Example.com/portal/", idle, 8, 1).expect("valid");
        assert_eq!(config.public_origin.as_deref(), Some("https://loyalty.example.com"));
        assert!(config.https);
        let plain = AuthConfig::new("", idle, 8, 1).expect("valid");
        assert_eq!(plain.public_origin, None);
        assert!(!plain.https);
        assert!(AuthConfig::new("loyalty.example.com", idle, 8, 1).is_err());
    }
}
