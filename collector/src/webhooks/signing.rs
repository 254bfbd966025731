//! Standard Webhooks (v1) signatures: `webhook-signature: v1,<base64 HMAC-SHA256>` over
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed with the base64-decoded part of the
//! destination's `whsec_` secret.
//!
//! Any Standard Webhooks (or Svix) library verifies what this signs; the unit test below
//! checks the specification's published test vector.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// The prefix of a destination secret.
pub const SECRET_PREFIX: &str = "whsec_";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("a webhook secret starts with whsec_ followed by base64")]
    Malformed,
    #[error("a webhook secret holds 24 to 64 bytes")]
    BadLength,
}

/// A fresh secret: `whsec_` and the base64 of 32 random bytes.
pub fn new_secret() -> String {
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    format!("{SECRET_PREFIX}{}", BASE64.encode(key))
}

/// The HMAC key a secret stands for.
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, SecretError> {
    let encoded = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or(SecretError::Malformed)?;
    let key = BASE64.decode(encoded).map_err(|_| SecretError::Malformed)?;
    if !(24..=64).contains(&key.len()) {
        return Err(SecretError::BadLength);
    }
    Ok(key)
}

/// One signature, `v1,<base64>`, of `body` sent as message `msg_id` at `timestamp`.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> Result<String, SecretError> {
    // HMAC takes keys of any length; the error is only the trait's signature.
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|_| SecretError::BadLength)?;
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// The `webhook-signature` header: one signature per key, space-separated (the current
/// secret first, then the previous one during a rotation).
pub fn signature_header(
    keys: &[Vec<u8>],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, SecretError> {
    Ok(keys
        .iter()
        .map(|key| sign(key, msg_id, timestamp, body))
        .collect::<Result<Vec<_>, _>>()?
        .join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        // From the specification (standard-webhooks/standard-webhooks, spec and libraries).
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            )
            .unwrap(),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn rotation_sends_both_signatures() {
        let (a, b) = (
            decode_secret(&new_secret()).unwrap(),
            decode_secret(&new_secret()).unwrap(),
        );
        let header = signature_header(&[a.clone(), b.clone()], "msg_1", 7, b"{}").unwrap();
        let parts: Vec<&str> = header.split(' ').collect();
        let one = |key: &[u8]| sign(key, "msg_1", 7, b"{}").unwrap();
        assert_eq!(parts, [one(&a), one(&b)]);
    }

    #[test]
    fn secrets_are_32_random_bytes() {
        let s = new_secret();
        assert!(s.starts_with("whsec_"));
        assert_eq!(decode_secret(&s).unwrap().len(), 32);
        assert_ne!(s, new_secret());
        assert_eq!(decode_secret("MfKQ9r8G"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_!!"), Err(SecretError::Malformed));
        assert_eq!(decode_secret("whsec_AAAA"), Err(SecretError::BadLength));
    }
}
