//! Passwords and login: argon2id hashes in the replicated state, and tokens signed with the
//! cluster's current key. Hashing happens on the server that receives the password, before the
//! account change is proposed, so the log never holds a plaintext password.
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use codafs_common::token::{self, Claims, Role};

use crate::fsm::{AccountRec, ClusterRec};

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

/// Checks a login and signs a token valid for `ttl_secs` (0 = default, capped).
pub fn login(
    account: Option<&AccountRec>,
    password: &str,
    cluster: &ClusterRec,
    ttl_secs: u64,
) -> Result<(String, u64), AuthError> {
    let ok = account.is_some_and(|a| {
        PasswordHash::new(&a.password_hash)
            .is_ok_and(|h| Argon2::default().verify_password(password.as_bytes(), &h).is_ok())
    });
    let (Some(account), true) = (account, ok) else {
        return Err(AuthError::WrongCredentials);
    };
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
    };
    Ok((token::sign(&claims, &key), expires))
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
        let (t, exp) = login(Some(&acct), "correct horse", &cluster, 60).unwrap();
        let claims = token::verify(&t, "c", |id| cluster.key(id), token::unix_now()).unwrap();
        assert_eq!((claims.user.as_str(), claims.role), ("web", Role::User));
        assert!(exp <= token::unix_now() + 60);
        assert_eq!(
            login(Some(&acct), "wrong", &cluster, 0),
            Err(AuthError::WrongCredentials)
        );
        assert_eq!(
            login(None, "correct horse", &cluster, 0),
            Err(AuthError::WrongCredentials)
        );
        let no_pw = AccountRec {
            password_hash: String::new(),
            ..acct
        };
        assert_eq!(login(Some(&no_pw), "", &cluster, 0), Err(AuthError::WrongCredentials));
        assert_eq!(hash_password("short"), Err(AuthError::BadPassword));
    }
}
