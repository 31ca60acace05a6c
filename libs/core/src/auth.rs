//! API keys, shared by the HTTP services: configured as SHA-256 digests (hex) so the keys
//! themselves are never stored, sent as `Authorization: Bearer <key>`, and compared in
//! constant time against every configured digest.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

pub use instream_config::decode_digest;

/// The key of an `Authorization: Bearer <key>` header (the scheme name in any case).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The index of the digest `key` hashes to. Every digest is compared, whatever matched, so
/// the time taken says nothing about which (or whether one) did.
pub fn find_key(digests: &[[u8; 32]], key: &str) -> Option<usize> {
    let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
    let mut any = subtle::Choice::from(0);
    let mut index = 0u64;
    for (i, accepted) in digests.iter().enumerate() {
        let matched = accepted.ct_eq(&digest);
        index = u64::conditional_select(&index, &(i as u64), matched);
        any |= matched;
    }
    bool::from(any).then_some(index as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn keys_are_found_by_their_digest() {
        let digests: Vec<[u8; 32]> = ["k1", "k2"]
            .iter()
            .map(|k| decode_digest(&hex(k)).unwrap())
            .collect();
        assert_eq!(find_key(&digests, "k2"), Some(1));
        assert_eq!(find_key(&digests, "k3"), None);
        assert_eq!(decode_digest("abc"), None);
        assert_eq!(decode_digest(&"zz".repeat(32)), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, "Bearer  k1 ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("k1"));
        headers.insert(header::AUTHORIZATION, "bearer k2".parse().unwrap());
        assert_eq!(bearer(&headers), Some("k2"));
        headers.insert(header::AUTHORIZATION, "Basic k1".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }
}
