use std::collections::BTreeSet;
use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::random_id;

/// What a service token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Create tenants and set their mode.
    TenantsWrite,
    /// Fetch a tenant's decrypted Stripe key (charging services).
    KeysRead,
    /// List connections and their health (ops).
    OpsRead,
    /// Act on the service's own work: redeliver an announcement to Atlas (ops).
    OpsWrite,
    /// Read the events Stripe delivered for a tenant (charging services).
    EventsRead,
    /// Call Stripe for a tenant through the proxy, which adds the key (charging services).
    StripeCall,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Self::TenantsWrite,
        Self::KeysRead,
        Self::OpsRead,
        Self::OpsWrite,
        Self::EventsRead,
        Self::StripeCall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantsWrite => "tenants:write",
            Self::KeysRead => "keys:read",
            Self::OpsRead => "ops:read",
            Self::OpsWrite => "ops:write",
            Self::EventsRead => "events:read",
            Self::StripeCall => "stripe:call",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == raw)
    }

    /// Scopes as stored: space separated, sorted.
    pub fn join(scopes: &BTreeSet<Scope>) -> String {
        scopes
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Parses the stored form; an unknown scope is dropped, never widened.
    pub fn split(stored: &str) -> BTreeSet<Scope> {
        stored.split_whitespace().filter_map(Scope::parse).collect()
    }
}

const PREFIX: &str = "ast_";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 43;

/// SHA-256 of a token's secret part. The secret has ~256 bits of entropy, so a fast hash is
/// enough: nobody can brute-force it, and the check stays cheap on the hot path.
#[derive(Clone, PartialEq, Eq)]
pub struct ServiceTokenHash(pub [u8; 32]);

impl ServiceTokenHash {
    fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for ServiceTokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServiceTokenHash(…)")
    }
}

/// A token as a caller presents it: `ast_<id>_<secret>`. The id is public (it names the
/// token in lists and the audit trail); the secret is only ever compared by hash.
pub struct PresentedServiceToken {
    id: String,
    secret: SecretString,
}

impl PresentedServiceToken {
    pub fn parse(raw: &str) -> Option<Self> {
        let rest = raw.strip_prefix(PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let alnum =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_alphanumeric());
        if !alnum(id, ID_LEN) || !alnum(secret, SECRET_LEN) {
            return None;
        }
        Some(Self {
            id: id.to_owned(),
            secret: SecretString::from(secret.to_owned()),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Constant-time comparison with the stored hash.
    pub fn matches(&self, stored: &ServiceTokenHash) -> bool {
        let presented = ServiceTokenHash::of(self.secret.expose_secret());
        presented.0.ct_eq(&stored.0).into()
    }
}

/// A freshly created token: the plaintext is shown once, the hash is stored.
pub struct IssuedServiceToken {
    pub id: String,
    pub plaintext: SecretString,
    pub hash: ServiceTokenHash,
}

impl IssuedServiceToken {
    pub fn generate() -> Self {
        let id = random_id("", ID_LEN);
        let secret = random_id("", SECRET_LEN);
        let hash = ServiceTokenHash::of(&secret);
        Self {
            plaintext: SecretString::from(format!("{PREFIX}{id}_{secret}")),
            id,
            hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_parse_and_match_only_their_hash() {
        let issued = IssuedServiceToken::generate();
        let presented = PresentedServiceToken::parse(issued.plaintext.expose_secret()).unwrap();
        assert_eq!(presented.id(), issued.id);
        assert!(presented.matches(&issued.hash));
        let other = IssuedServiceToken::generate();
        assert!(!presented.matches(&other.hash));
    }

    #[test]
    fn malformed_tokens_do_not_parse() {
        let issued = IssuedServiceToken::generate();
        let good = issued.plaintext.expose_secret().to_owned();
        for bad in [
            "",
            "ast_",
            &good[..good.len() - 1],
            &format!("{good}x"),
            &good.replacen("ast_", "xst_", 1),
            &good.replace('_', "-"),
        ] {
            assert!(PresentedServiceToken::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn scopes_round_trip_and_unknown_ones_are_dropped() {
        let scopes: BTreeSet<Scope> = [Scope::OpsRead, Scope::KeysRead].into();
        assert_eq!(Scope::join(&scopes), "keys:read ops:read");
        assert_eq!(Scope::split("keys:read ops:read admin:*"), scopes);
    }
}
