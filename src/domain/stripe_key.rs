use std::fmt;

use secrecy::{ExposeSecret, SecretString};

use super::Mode;

/// A Stripe secret (`sk_`) or restricted (`rk_`) API key, parsed and mode-tagged.
///
/// The plaintext is reachable only through [`StripeKey::expose_secret`], called where the
/// key must leave as plaintext: sealing it, its fingerprint, the `Authorization` header sent
/// to Stripe, and the key-fetch response.
/// `Debug` shows the kind, mode and last four characters, never the key.
pub struct StripeKey {
    secret: SecretString,
    kind: KeyKind,
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Secret,
    Restricted,
}

impl KeyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Secret => "secret",
            Self::Restricted => "restricted",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "secret" => Some(Self::Secret),
            "restricted" => Some(Self::Restricted),
            _ => None,
        }
    }
}

/// Why a pasted string is not a key we accept. Messages are for a person and never contain
/// the pasted text.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFormatError {
    #[error("Paste a secret or restricted key, not the publishable key (pk_…).")]
    Publishable,
    #[error(
        "This is a webhook signing secret (whsec_…); paste a secret or restricted API key instead."
    )]
    WebhookSecret,
    #[error("Organisation API keys (sk_org…) are not supported: they cannot be mode-checked and need a Stripe-Context header. Paste an account's restricted or secret key.")]
    Organization,
    #[error("{0}")]
    Malformed(&'static str),
}

impl KeyFormatError {
    /// The stable error code of the HTTP contract.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Publishable => "publishable_key_not_accepted",
            Self::WebhookSecret => "webhook_secret_not_accepted",
            Self::Organization => "organization_key_not_supported",
            Self::Malformed(_) => "invalid_api_key_format",
        }
    }
}

const PREFIXES: [(&str, KeyKind, Mode); 4] = [
    ("sk_test_", KeyKind::Secret, Mode::Test),
    ("sk_live_", KeyKind::Secret, Mode::Live),
    ("rk_test_", KeyKind::Restricted, Mode::Test),
    ("rk_live_", KeyKind::Restricted, Mode::Live),
];

/// Today's keys carry ~99 characters after the prefix, older ones 24; leave room both ways.
const BODY_LEN: std::ops::RangeInclusive<usize> = 10..=247;

impl StripeKey {
    pub fn parse(pasted: &str) -> Result<Self, KeyFormatError> {
        let key = pasted.trim();
        if key.is_empty() {
            return Err(KeyFormatError::Malformed(
                "The key is empty: paste a restricted key (rk_…) or a secret key (sk_…).",
            ));
        }
        if key.starts_with("pk_") {
            return Err(KeyFormatError::Publishable);
        }
        if key.starts_with("whsec_") {
            return Err(KeyFormatError::WebhookSecret);
        }
        if key.starts_with("sk_org") || key.starts_with("rk_org") {
            return Err(KeyFormatError::Organization);
        }
        let Some((prefix, kind, mode)) = PREFIXES.iter().find(|(p, _, _)| key.starts_with(p))
        else {
            return Err(KeyFormatError::Malformed(
                "This is not a Stripe API key: it must start with rk_test_, rk_live_, sk_test_ or sk_live_.",
            ));
        };
        let body = &key[prefix.len()..];
        if !body.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(KeyFormatError::Malformed(
                "The key contains characters Stripe keys never have (only letters and digits follow the prefix): copy it again from the Stripe dashboard.",
            ));
        }
        if !BODY_LEN.contains(&body.len()) {
            return Err(KeyFormatError::Malformed(
                "The key is too short or too long to be a Stripe key: copy it again, whole, from the Stripe dashboard.",
            ));
        }
        Ok(Self {
            secret: SecretString::from(key.to_owned()),
            kind: *kind,
            mode: *mode,
        })
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The last four characters, shown to the tenant as `…Kgd1` to recognise the key.
    pub fn last4(&self) -> String {
        let key = self.secret.expose_secret();
        key[key.len() - 4..].to_owned()
    }

    /// The plaintext key, for sealing and for the `Authorization` header only.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for StripeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StripeKey({} {} key …{})",
            self.mode,
            self.kind.as_str(),
            self.last4()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail(len: usize) -> String {
        "aB3".chars().cycle().take(len).collect()
    }

    #[test]
    fn accepts_the_four_prefixes_and_trims() {
        for (prefix, kind, mode) in PREFIXES {
            let raw = format!("  {prefix}{}\n", tail(99));
            let key = StripeKey::parse(&raw).expect("valid key");
            assert_eq!((key.kind(), key.mode()), (kind, mode));
            assert_eq!(key.expose_secret(), raw.trim());
        }
    }

    #[test]
    fn body_length_bounds() {
        assert!(StripeKey::parse(&format!("rk_test_{}", tail(10))).is_ok());
        assert!(StripeKey::parse(&format!("rk_test_{}", tail(247))).is_ok());
        assert!(StripeKey::parse(&format!("rk_test_{}", tail(9))).is_err());
        assert!(StripeKey::parse(&format!("rk_test_{}", tail(248))).is_err());
    }

    #[test]
    fn refuses_other_kinds_with_specific_codes() {
        let cases = [
            (
                format!("pk_test_{}", tail(99)),
                "publishable_key_not_accepted",
            ),
            (
                format!("pk_live_{}", tail(99)),
                "publishable_key_not_accepted",
            ),
            (format!("whsec_{}", tail(32)), "webhook_secret_not_accepted"),
            (
                format!("sk_org_live_{}", tail(99)),
                "organization_key_not_supported",
            ),
            (format!("sk_test_{}-x", tail(40)), "invalid_api_key_format"),
            (
                format!("sk_test_{} {}", tail(20), tail(20)),
                "invalid_api_key_format",
            ),
            (format!("sk_prod_{}", tail(40)), "invalid_api_key_format"),
            (format!("SK_TEST_{}", tail(40)), "invalid_api_key_format"),
            ("".to_owned(), "invalid_api_key_format"),
            ("   ".to_owned(), "invalid_api_key_format"),
            ("sk_test_é".to_owned(), "invalid_api_key_format"),
        ];
        for (raw, code) in cases {
            let err = StripeKey::parse(&raw).expect_err(&raw);
            assert_eq!(err.code(), code, "{raw:?}");
            assert!(
                raw.trim().is_empty() || !err.to_string().contains(raw.trim()),
                "the message echoes the input"
            );
        }
    }

    #[test]
    fn debug_shows_only_last4() {
        let raw = format!("rk_live_{}Kgd1", tail(60));
        let key = StripeKey::parse(&raw).expect("valid key");
        let debug = format!("{key:?}");
        assert_eq!(debug, "StripeKey(live restricted key …Kgd1)");
        assert!(!debug.contains(&raw));
    }
}
