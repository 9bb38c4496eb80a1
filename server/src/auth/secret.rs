//! Random secrets and their stored form: a secret leaves the server once (a key's token, an
//! access link) and is kept only as its SHA-256, compared in constant time.
//!
//! SHA-256 rather than a password hash: these secrets are 256 random bits, not something a
//! person chose, so there is nothing to guess and a fast hash loses nothing.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `bytes` random bytes from the operating system's generator (through `rand`'s thread-local
/// CSPRNG, seeded and reseeded from it), base64url without padding.
pub fn random(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A short random id, hex (for key ids and account ids people see).
pub fn random_id() -> String {
    let mut buf = [0u8; 8];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// What is stored for a secret: its SHA-256, hex.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `secret` is the one `stored` was made from, in time that does not depend on where
/// they differ.
pub fn matches(secret: &str, stored: &str) -> bool {
    digest(secret).as_bytes().ct_eq(stored.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_its_digest_only() {
        let secret = random(32);
        assert_eq!(secret.len(), 43, "256 bits in base64url");
        let stored = digest(&secret);
        assert!(matches(&secret, &stored));
        assert!(!matches(&random(32), &stored));
        assert_ne!(random(32), secret);
    }
}
