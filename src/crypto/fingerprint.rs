use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// A keyed fingerprint (HMAC-SHA256) of a secret: recognises a re-pasted key without
/// storing anything that could be brute-forced offline from the database alone.
pub struct Fingerprinter {
    key: SecretString,
}

impl Fingerprinter {
    pub fn new(key: SecretString) -> Self {
        Self { key }
    }

    pub fn fingerprint(&self, secret: &str) -> Vec<u8> {
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose_secret().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(secret.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter([REDACTED])")
    }
}
