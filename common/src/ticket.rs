//! Blob read tickets: short-lived proof that the holder may read one blob.
//!
//! Blobs are content-addressed and shared between volumes, so a blob read cannot name the volume
//! it is read for. Instead, a server that shows a file's attributes to a caller allowed to read
//! that file's volume also hands out a ticket for the file's content hash. Any server of the
//! cluster can verify it without a lookup: the ticket is a keyed blake3 MAC over the hash and an
//! expiry time, under a key derived from the cluster's token-signing key (replicated to every
//! server). A ticket is a bearer credential for one hash until it expires; it grants nothing else.
//!
//! Wire form (44 bytes): expiry (u64 BE, Unix seconds) ‖ key id (u32 BE) ‖ MAC (32 bytes).
use crate::Hash;

const CONTEXT: &str = "codafs 2026 blob read ticket v1";
const LEN: usize = 8 + 4 + 32;

/// How long a ticket is valid at least. Expiries are rounded up to [`BUCKET_SECS`] so that
/// replies for the same file in the same few minutes carry identical tickets.
pub const TICKET_SECS: u64 = 10 * 60;
/// Granularity of ticket expiry times.
pub const BUCKET_SECS: u64 = 5 * 60;

/// Why a ticket was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("no read ticket")]
    Missing,
    #[error("malformed read ticket")]
    Malformed,
    #[error("read ticket expired")]
    Expired,
    #[error("read ticket was made with key {0}, which this cluster no longer knows")]
    UnknownKey(u32),
    #[error("read ticket is for another blob or forged")]
    BadMac,
}

/// The key tickets are made with, derived from a token-signing key (so rotating or retiring a
/// signing key also rotates or retires the tickets made with it).
pub fn ticket_key(signing_key: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key(CONTEXT, signing_key)
}

fn mac(key: &[u8; 32], hash: &Hash, expires: u64, key_id: u32) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&hash.0);
    h.update(&expires.to_be_bytes());
    h.update(&key_id.to_be_bytes());
    h.finalize()
}

/// Expiry of a ticket issued at `now`: at least [`TICKET_SECS`] away, on a bucket boundary.
pub fn expiry(now: u64) -> u64 {
    (now + TICKET_SECS).div_ceil(BUCKET_SECS) * BUCKET_SECS
}

/// Issues a ticket for `hash` with the derived `key` (id `key_id`), valid until `expires`.
pub fn issue(key: &[u8; 32], key_id: u32, hash: &Hash, expires: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(LEN);
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(mac(key, hash, expires, key_id).as_bytes());
    out
}

/// Verifies a ticket for `hash` at time `now`; `key_for` maps a key id to its derived key.
pub fn verify(
    ticket: &[u8],
    hash: &Hash,
    key_for: impl Fn(u32) -> Option<[u8; 32]>,
    now: u64,
) -> Result<(), TicketError> {
    if ticket.is_empty() {
        return Err(TicketError::Missing);
    }
    if ticket.len() != LEN {
        return Err(TicketError::Malformed);
    }
    let (exp, rest) = ticket.split_at(8);
    let (id, sig) = rest.split_at(4);
    let expires = u64::from_be_bytes(exp.try_into().map_err(|_| TicketError::Malformed)?);
    let key_id = u32::from_be_bytes(id.try_into().map_err(|_| TicketError::Malformed)?);
    let sig: [u8; 32] = sig.try_into().map_err(|_| TicketError::Malformed)?;
    if expires <= now {
        return Err(TicketError::Expired);
    }
    let key = key_for(key_id).ok_or(TicketError::UnknownKey(key_id))?;
    // blake3::Hash equality is constant-time.
    if mac(&key, hash, expires, key_id) != blake3::Hash::from(sig) {
        return Err(TicketError::BadMac);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_verify_and_refusals() {
        let key = ticket_key(&[3; 32]);
        let keys = |id| (id == 7).then_some(key);
        let h = Hash::of(b"page");
        let now = 1_000_000;
        let exp = expiry(now);
        assert!(exp >= now + TICKET_SECS && exp.is_multiple_of(BUCKET_SECS));
        assert_eq!(expiry(now + 1), exp, "tickets issued moments apart are identical");
        let t = issue(&key, 7, &h, exp);
        assert_eq!(verify(&t, &h, keys, now), Ok(()));
        assert_eq!(verify(&t, &h, keys, exp), Err(TicketError::Expired));
        assert_eq!(verify(&t, &Hash::of(b"other"), keys, now), Err(TicketError::BadMac));
        assert_eq!(verify(&t, &h, |_| None, now), Err(TicketError::UnknownKey(7)));
        assert_eq!(
            verify(&t, &h, |_| Some(ticket_key(&[4; 32])), now),
            Err(TicketError::BadMac)
        );
        assert_eq!(verify(&[], &h, keys, now), Err(TicketError::Missing));
        assert_eq!(verify(&t[..40], &h, keys, now), Err(TicketError::Malformed));
        // Moving the expiry without the key breaks the MAC.
        let mut later = t.clone();
        later[..8].copy_from_slice(&(exp + 86400).to_be_bytes());
        assert_eq!(verify(&later, &h, keys, now), Err(TicketError::BadMac));
        // A ticket made with the signing key itself (not the derived key) does not verify.
        let raw = issue(&[3; 32], 7, &h, exp);
        assert_eq!(verify(&raw, &h, keys, now), Err(TicketError::BadMac));
    }
}
