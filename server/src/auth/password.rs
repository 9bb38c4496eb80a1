//! Passwords: Argon2id (through `password-auth`, its default), hashed and checked on blocking
//! threads, a bounded number at once.
//!
//! An Argon2id hash is tens of milliseconds of one core and 19 MiB of memory, by design. Run on
//! tokio's worker threads it would stall every request sharing them; run without a bound, a storm
//! of sign-ins would take every core. So each hash waits for one of `concurrency` permits (by
//! default half the cores), then runs on the blocking pool.

use std::sync::Arc;
use tokio::sync::{OnceCell, Semaphore};

#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    /// A hash of nothing anyone knows, checked when an email has no account, so that an unknown
    /// email takes as long to refuse as a wrong password.
    decoy: Arc<OnceCell<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the password hasher stopped")]
    Stopped,
}

impl Passwords {
    pub fn new(concurrency: usize) -> Self {
        Passwords { permits: Arc::new(Semaphore::new(concurrency.max(1))), decoy: Arc::default() }
    }

    /// Half the machine's cores, at least one: what sign-ins may take while other requests go on.
    pub fn default_concurrency() -> usize {
        std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
    }

    /// The PHC string of `password` (Argon2id, a fresh random salt).
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let password = password.to_string();
        self.run(move || password_auth::generate_hash(password)).await
    }

    /// Whether `password` matches `hash`; with no hash (no such account, or no password set yet),
    /// a decoy is checked so the answer takes the same time, and it is false.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, PasswordError> {
        let (hash, real) = match hash {
            Some(hash) => (hash.to_string(), true),
            None => (self.decoy().await?, false),
        };
        let password = password.to_string();
        let matches = self.run(move || password_auth::verify_password(password, &hash).is_ok()).await?;
        Ok(real && matches)
    }

    async fn decoy(&self) -> Result<String, PasswordError> {
        self.decoy.get_or_try_init(|| async { self.hash(&uuid::Uuid::new_v4().to_string()).await }).await.cloned()
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, PasswordError> {
        let _permit = self.permits.acquire().await.map_err(|_| PasswordError::Stopped)?;
        metrics::gauge!("tally_password_hashes_running").increment(1.0);
        let out = tokio::task::spawn_blocking(work).await.map_err(|_| PasswordError::Stopped);
        metrics::gauge!("tally_password_hashes_running").decrement(1.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hash_verifies_its_own_password_only() {
        let passwords = Passwords::new(1);
        let hash = passwords.hash("correct horse battery").await.expect("hashed");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(passwords.verify("correct horse battery", Some(&hash)).await.expect("checked"));
        assert!(!passwords.verify("wrong horse battery", Some(&hash)).await.expect("checked"));
        assert!(!passwords.verify("correct horse battery", None).await.expect("checked"));
    }
}
