//! Signed, expiring bearer tokens.
//!
//! A token is `cfs1.<hex of JSON claims>.<hex of MAC>`, where the MAC is blake3 keyed with a
//! 32-byte cluster key over a domain prefix and the claims. Claims name the cluster and the key id,
//! so a token from another cluster or from a rotated-out key is refused with a clear reason.
//! Servers hold the keys in the replicated state; clients treat tokens as opaque strings.
use serde::{Deserialize, Serialize};

const PREFIX: &str = "cfs1";
const DOMAIN: &[u8] = b"codafs-token-v1\0";

/// Role carried by a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    User,
}

/// What a token asserts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub user: String,
    pub role: Role,
    pub cluster: String,
    pub key_id: u32,
    /// Unix seconds after which the token is refused.
    pub expires: u64,
    /// The account's token generation when the token was issued. Servers refuse a token whose
    /// generation is older than the account's current one, which is how removing a user,
    /// changing their password, role or write rights, or `codafs user revoke` ends every token
    /// issued before. Tokens from before this claim existed read as generation 0 (and a zero is
    /// not written, so such tokens look exactly as before).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub generation: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not verify (forged or corrupted)")]
    BadSignature,
    #[error("token expired")]
    Expired,
    #[error("token belongs to another cluster ({0})")]
    WrongCluster(String),
    #[error("token was signed with key {0}, which this cluster no longer knows")]
    UnknownKey(u32),
}

fn mac(key: &[u8; 32], claims_json: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(DOMAIN);
    h.update(claims_json);
    h.finalize()
}

/// Signs claims with `key`.
pub fn sign(claims: &Claims, key: &[u8; 32]) -> String {
    // Serializing a struct of strings and integers cannot fail.
    let json = serde_json::to_vec(claims).unwrap_or_default();
    format!("{PREFIX}.{}.{}", hex::encode(&json), mac(key, &json).to_hex())
}

/// Reads claims without verifying them (for display and key lookup only).
pub fn peek(token: &str) -> Result<Claims, TokenError> {
    let (claims, _, _) = parse(token)?;
    Ok(claims)
}

fn parse(token: &str) -> Result<(Claims, Vec<u8>, [u8; 32]), TokenError> {
    let mut parts = token.trim().split('.');
    let (Some(PREFIX), Some(body), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let json = hex::decode(body).map_err(|_| TokenError::Malformed)?;
    let sig: [u8; 32] = hex::decode(sig)
        .ok()
        .and_then(|s| s.try_into().ok())
        .ok_or(TokenError::Malformed)?;
    let claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    Ok((claims, json, sig))
}

/// Verifies a token against the cluster id and a key lookup, at time `now` (Unix seconds).
pub fn verify(
    token: &str,
    cluster: &str,
    key_for: impl Fn(u32) -> Option<[u8; 32]>,
    now: u64,
) -> Result<Claims, TokenError> {
    let (claims, json, sig) = parse(token)?;
    // The cluster claim is checked first only to give a clearer error; the MAC below is what
    // makes any claim trustworthy.
    if claims.cluster != cluster {
        return Err(TokenError::WrongCluster(claims.cluster));
    }
    let key = key_for(claims.key_id).ok_or(TokenError::UnknownKey(claims.key_id))?;
    // blake3::Hash equality is constant-time.
    if mac(&key, &json) != blake3::Hash::from(sig) {
        return Err(TokenError::BadSignature);
    }
    if claims.expires <= now {
        return Err(TokenError::Expired);
    }
    Ok(claims)
}

/// Current Unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(expires: u64) -> Claims {
        Claims {
            user: "admin".into(),
            role: Role::Admin,
            cluster: "c1".into(),
            key_id: 1,
            expires,
            generation: 0,
        }
    }

    #[test]
    fn sign_verify_and_refusals() {
        let key = [7u8; 32];
        let keys = |id| (id == 1).then_some(key);
        let t = sign(&claims(100), &key);
        assert_eq!(verify(&t, "c1", keys, 50).unwrap(), claims(100));
        assert_eq!(verify(&t, "c1", keys, 100), Err(TokenError::Expired));
        assert!(matches!(verify(&t, "c2", keys, 50), Err(TokenError::WrongCluster(_))));
        assert_eq!(verify(&t, "c1", |_| Some([8u8; 32]), 50), Err(TokenError::BadSignature));
        assert_eq!(verify(&t, "c1", |_| None, 50), Err(TokenError::UnknownKey(1)));
        assert_eq!(verify("garbage", "c1", keys, 50), Err(TokenError::Malformed));
        // Changing the claims (say, the role) without the key breaks the signature.
        let forged_body = hex::encode(
            serde_json::to_vec(&Claims {
                role: Role::Admin,
                user: "eve".into(),
                ..claims(100)
            })
            .unwrap(),
        );
        let sig = t.rsplit('.').next().unwrap();
        assert_eq!(
            verify(&format!("cfs1.{forged_body}.{sig}"), "c1", keys, 50),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn generation_claim_is_optional_and_signed() {
        let key = [7u8; 32];
        let keys = |id| (id == 1).then_some(key);
        // A token written before the claim existed (no "generation" key) reads as generation 0.
        let old_json = br#"{"user":"admin","role":"admin","cluster":"c1","key_id":1,"expires":100}"#;
        let old = format!("cfs1.{}.{}", hex::encode(old_json), mac(&key, old_json).to_hex());
        assert_eq!(verify(&old, "c1", keys, 50).unwrap(), claims(100));
        // Generation 0 is not written, so new tokens of never-revoked accounts look as before.
        assert_eq!(sign(&claims(100), &key), old);
        let later = Claims {
            generation: 42,
            ..claims(100)
        };
        let t = sign(&later, &key);
        assert_eq!(verify(&t, "c1", keys, 50).unwrap().generation, 42);
        // Lowering the generation (to dodge a revocation) breaks the signature.
        let body = hex::encode(serde_json::to_vec(&claims(100)).unwrap());
        let sig = t.rsplit('.').next().unwrap();
        assert_eq!(
            verify(&format!("cfs1.{body}.{sig}"), "c1", keys, 50),
            Err(TokenError::BadSignature)
        );
    }
}
