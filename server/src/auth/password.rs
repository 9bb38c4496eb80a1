//! Passwords: Argon2id (through `password-auth`, its default), hashed and checked on threads of
//! their own, a bounded number at once, at the lowest scheduling priority.
//!
//! An Argon2id hash is tens of milliseconds of one core and 19 MiB of memory, by design. Run on
//! tokio's worker threads it would stall every request sharing them; run without a bound, a storm
//! of sign-ins would take every core. So hashes run on `concurrency` threads of their own (by
//! default half the cores), one at a time each, waiting their turn in a queue. Those threads are
//! niced to 19: when a request needs a core a hash holds, the kernel gives it the core at once,
//! so a sign-in storm slows sign-ins, not the other requests (BENCHMARKS.md, P9). Tokio's blocking
//! pool could not be niced: its threads also serve other blocking work.

use std::sync::{mpsc, Arc, Mutex};
use tokio::sync::{oneshot, OnceCell};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct Passwords {
    jobs: mpsc::Sender<Job>,
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
    /// `concurrency` hashing threads; they stop once every clone of this is gone.
    pub fn new(concurrency: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..concurrency.max(1) {
            let queue = queue.clone();
            let started = std::thread::Builder::new().name(format!("password-hash-{i}")).spawn(move || {
                lowest_priority();
                loop {
                    // The lock is held only while waiting for the next job.
                    let job = match queue.lock() {
                        Ok(queue) => queue.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            });
            if let Err(err) = started {
                tracing::error!(error = %err, "cannot start a password hashing thread");
            }
        }
        Passwords { jobs, decoy: Arc::default() }
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
        let (done, answer) = oneshot::channel();
        let job: Job = Box::new(move || {
            metrics::gauge!("tally_password_hashes_running").increment(1.0);
            let _ = done.send(work());
            metrics::gauge!("tally_password_hashes_running").decrement(1.0);
        });
        self.jobs.send(job).map_err(|_| PasswordError::Stopped)?;
        answer.await.map_err(|_| PasswordError::Stopped)
    }
}

/// Nice the calling thread to 19. On Linux `setpriority(PRIO_PROCESS, 0, …)` applies to the
/// calling thread alone (each thread is a task of its own to the scheduler).
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a plain system call on the calling thread; it reads no memory of ours.
        let failed = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) } != 0;
        if failed {
            tracing::warn!("cannot lower the password hashing thread's priority");
        }
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
