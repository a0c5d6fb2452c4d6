//! Passwords and login: argon2id hashes in the replicated state, and tokens signed with the
//! cluster's current key. Hashing happens on the server that receives the password, before the
//! account change is proposed, so the log never holds a plaintext password.
//!
//! Every login runs exactly one argon2 verification, also for an unknown account or one without
//! a password (against a dummy hash), so response times do not tell which accounts exist. How
//! many run at once and how often an account or an address may try is bounded in [`limits`].
pub mod limits;

use std::sync::OnceLock;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use codafs_common::token::{self, Claims, Role};

use crate::fsm::{AccountRec, ClusterRec};

pub use limits::{LimitError, LoginGuard};

/// Shortest password accepted.
pub const MIN_PASSWORD: usize = 8;
/// Longest password accepted (argon2 would take anything; a bound keeps requests small).
pub const MAX_PASSWORD: usize = 1024;
/// Token lifetime when the client does not ask for one.
pub const DEFAULT_TOKEN_SECS: u64 = 12 * 3600;
/// Longest token lifetime a login may ask for.
pub const MAX_TOKEN_SECS: u64 = 30 * 86400;

/// Why a password or login was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("password must be {MIN_PASSWORD} to {MAX_PASSWORD} bytes")]
    BadPassword,
    /// Deliberately vague: does not say whether the user exists.
    #[error("wrong user name or password")]
    WrongCredentials,
    #[error("hashing failed: {0}")]
    Hash(String),
}

/// argon2id hash (PHC string) of a new password.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.len() < MIN_PASSWORD || password.len() > MAX_PASSWORD {
        return Err(AuthError::BadPassword);
    }
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// A hash of a random password with the same parameters as real ones: what a login for an
/// unknown account (or one without a password) is checked against, so it costs the same.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let pw = hex::encode(rand::random::<[u8; 16]>());
        // Hashing a 32-byte password with a fresh salt does not fail; if it ever did, an
        // unparsable hash still makes every check below fail (only faster).
        hash_password(&pw).unwrap_or_default()
    })
}

/// Makes the dummy hash now (one argon2 hash, on the calling thread), so the first login for an
/// unknown account does not cost twice as much as later ones.
pub fn prepare() {
    dummy_hash();
}

/// Whether `password` is the account's. Runs one argon2 verification whatever the account:
/// absent accounts and accounts without a password are checked against a dummy hash and fail.
/// CPU-heavy (tens of milliseconds): call it off the async workers.
pub fn password_matches(account: Option<&AccountRec>, password: &str) -> bool {
    let real = account
        .map(|a| a.password_hash.as_str())
        .filter(|h| !h.is_empty())
        .and_then(|h| PasswordHash::new(h).ok());
    let dummy = PasswordHash::new(dummy_hash()).ok();
    let (hash, genuine) = match (real, dummy) {
        (Some(h), _) => (h, true),
        (None, Some(d)) => (d, false),
        (None, None) => return false,
    };
    let ok = Argon2::default().verify_password(password.as_bytes(), &hash).is_ok();
    ok && genuine
}

/// Signs a token for `account` valid for `ttl_secs` (0 = default, capped), carrying the
/// account's current token `generation`.
pub fn issue_token(
    account: &AccountRec,
    cluster: &ClusterRec,
    ttl_secs: u64,
    generation: u64,
) -> Result<(String, u64), AuthError> {
    let (key_id, key) = cluster
        .current_key()
        .ok_or_else(|| AuthError::Hash("cluster has no signing key".into()))?;
    let ttl = if ttl_secs == 0 {
        DEFAULT_TOKEN_SECS
    } else {
        ttl_secs.min(MAX_TOKEN_SECS)
    };
    let expires = token::unix_now() + ttl;
    let claims = Claims {
        user: account.name.clone(),
        role: if account.admin { Role::Admin } else { Role::User },
        cluster: cluster.cluster_id.clone(),
        key_id,
        expires,
        generation,
    };
    Ok((token::sign(&claims, &key), expires))
}

/// Checks a login and signs a token (see [`password_matches`] and [`issue_token`]).
pub fn login(
    account: Option<&AccountRec>,
    password: &str,
    cluster: &ClusterRec,
    ttl_secs: u64,
    generation: u64,
) -> Result<(String, u64), AuthError> {
    match account {
        Some(a) if password_matches(account, password) => issue_token(a, cluster, ttl_secs, generation),
        _ => Err(AuthError::WrongCredentials),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_login_and_refusals() {
        let cluster = ClusterRec {
            cluster_id: "c".into(),
            keys: vec![(1, [9; 32])],
            next_volume_id: 1,
        };
        let acct = AccountRec {
            name: "web".into(),
            admin: false,
            password_hash: hash_password("correct horse").unwrap(),
            created_ns: 0,
        };
        let (t, exp) = login(Some(&acct), "correct horse", &cluster, 60, 7).unwrap();
        let claims = token::verify(&t, "c", |id| cluster.key(id), token::unix_now()).unwrap();
        assert_eq!((claims.user.as_str(), claims.role), ("web", Role::User));
        assert_eq!(claims.generation, 7, "the token carries the account's generation");
        assert!(exp <= token::unix_now() + 60);
        assert_eq!(
            login(Some(&acct), "wrong", &cluster, 0, 0),
            Err(AuthError::WrongCredentials)
        );
        assert_eq!(
            login(None, "correct horse", &cluster, 0, 0),
            Err(AuthError::WrongCredentials)
        );
        let no_pw = AccountRec {
            password_hash: String::new(),
            ..acct
        };
        assert_eq!(
            login(Some(&no_pw), "", &cluster, 0, 0),
            Err(AuthError::WrongCredentials)
        );
        assert_eq!(hash_password("short"), Err(AuthError::BadPassword));
    }

    /// An unknown account costs one argon2 verification like a known one: both take far longer
    /// than a lookup would, and within a small factor of each other.
    #[test]
    fn unknown_accounts_cost_an_argon2_verification() {
        let acct = AccountRec {
            name: "web".into(),
            admin: false,
            password_hash: hash_password("correct horse").unwrap(),
            created_ns: 0,
        };
        let no_pw = AccountRec {
            password_hash: String::new(),
            ..acct.clone()
        };
        dummy_hash();
        // The fastest of several runs of each, interleaved, so a busy machine skews none of
        // them (four runs were not enough while other builds shared both cores).
        let cases = [Some(&acct), None, Some(&no_pw)];
        let mut best = [std::time::Duration::MAX; 3];
        for _ in 0..12 {
            for (b, a) in best.iter_mut().zip(cases) {
                let t = std::time::Instant::now();
                assert!(!password_matches(a, "wrong password"));
                *b = (*b).min(t.elapsed());
            }
        }
        let known = best[0];
        for (what, t) in [("unknown", best[1]), ("passwordless", best[2])] {
            assert!(
                t * 3 > known && t < known * 3,
                "{what} account took {t:?}, a known one {known:?}"
            );
        }
        assert!(password_matches(Some(&acct), "correct horse"));
        // The dummy hash is not a password anyone can know, and it is never accepted anyway.
        assert!(!password_matches(None, ""));
    }
}
