//! Sign-in limits (API.md): at most 10 failed attempts a minute per client address and per
//! account; beyond that, 429 `rate_limited` with `Retry-After`, and the password is not even
//! checked, so a guess cannot be told apart from a refusal.
//!
//! Failures are counted by `governor` (a cell per failure, refilled one every six seconds). A
//! success costs nothing: a shop's many members behind one address sign in freely. Governor
//! cannot be asked whether a key is out of cells without taking one, so the failure that finds
//! none marks the key refused until its next cell, and each attempt first looks at that mark.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed attempts allowed a minute, per address and per account.
pub const FAILURES_PER_MINUTE: u32 = 10;

struct Limit<K: Hash + Eq + Clone> {
    failures: DefaultKeyedRateLimiter<K>,
    refused_until: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> Limit<K> {
    fn new(per_minute: NonZeroU32) -> Self {
        Limit { failures: RateLimiter::keyed(Quota::per_minute(per_minute)), refused_until: Mutex::default() }
    }

    /// How long `key` must wait, if it is refused now.
    fn refused(&self, key: &K) -> Option<Duration> {
        let refused = self.refused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.get(key).and_then(|until| until.checked_duration_since(Instant::now())).filter(|d| !d.is_zero())
    }

    /// Count a failure; if it was one too many, `key` is refused for the returned time.
    fn failed(&self, key: &K) -> Option<Duration> {
        let not_until = self.failures.check_key(key).err()?;
        let wait = not_until.wait_time_from(DefaultClock::default().now()).max(Duration::from_secs(1));
        let mut refused = self.refused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.insert(key.clone(), Instant::now() + wait);
        Some(wait)
    }

    fn forget_old(&self) {
        self.failures.retain_recent();
        let now = Instant::now();
        let mut refused = self.refused_until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.retain(|_, until| *until > now);
    }
}

pub struct SignInLimits {
    by_address: Limit<IpAddr>,
    by_account: Limit<String>,
}

impl Default for SignInLimits {
    fn default() -> Self {
        let per_minute = NonZeroU32::new(FAILURES_PER_MINUTE).unwrap_or(NonZeroU32::MIN);
        SignInLimits { by_address: Limit::new(per_minute), by_account: Limit::new(per_minute) }
    }
}

impl SignInLimits {
    /// Before checking a password: Err(how long to wait) if this address or account is refused.
    pub fn check(&self, address: IpAddr, account: &str) -> Result<(), Duration> {
        match (self.by_address.refused(&address), self.by_account.refused(&account.to_string())) {
            (None, None) => Ok(()),
            (a, b) => Err(a.max(b).unwrap_or_default()),
        }
    }

    /// After a wrong password: Err(how long to wait) if that was one failure too many.
    pub fn failed(&self, address: IpAddr, account: &str) -> Result<(), Duration> {
        match (self.by_address.failed(&address), self.by_account.failed(&account.to_string())) {
            (None, None) => Ok(()),
            (a, b) => Err(a.max(b).unwrap_or_default()),
        }
    }

    /// Drop what is no longer limited (call now and then).
    pub fn forget_old(&self) {
        self.by_address.forget_old();
        self.by_account.forget_old();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eleventh_failure_in_a_minute_is_refused_and_then_every_attempt_until_the_wait_is_over() {
        let limits = SignInLimits::default();
        let address: IpAddr = "192.0.2.1".parse().expect("address");
        for _ in 0..FAILURES_PER_MINUTE {
            assert_eq!(limits.check(address, "ada@example.com"), Ok(()));
            assert_eq!(limits.failed(address, "ada@example.com"), Ok(()));
        }
        let wait = limits.failed(address, "ada@example.com").expect_err("one too many");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(6), "{wait:?}");
        assert!(limits.check(address, "ada@example.com").is_err());
        // Another account from the same address is refused too (the address is limited), and the
        // same account from another address (the account is).
        assert!(limits.check(address, "grace@example.com").is_err());
        assert!(limits.check("192.0.2.2".parse().expect("address"), "ada@example.com").is_err());
        assert_eq!(limits.check("192.0.2.2".parse().expect("address"), "grace@example.com"), Ok(()));
    }
}
