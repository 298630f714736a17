use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::AuthSettings;
use crate::domain::TenantId;

/// The claims of a tenant token that we read. `exp` is required and `nbf` honoured; `iss`
/// and `aud` are checked by the validation when configured; any other claim is ignored.
#[derive(Debug, Deserialize)]
struct Claims {
    tenant_id: String,
    exp: i64,
    /// Read so that a present but malformed `nbf` is refused rather than skipped.
    #[serde(default)]
    #[allow(dead_code)]
    nbf: Option<i64>,
}

/// The claims of a token we mint.
#[derive(Serialize)]
struct MintedClaims<'a> {
    tenant_id: &'a str,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantTokenError {
    #[error("the tenant token is malformed, expired, or not signed by Atlas")]
    Invalid,
}

/// What a tenant token must satisfy beside its signature (the `[auth]` settings).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantTokenPolicy {
    /// Clock skew allowed on `exp`, `nbf` and the lifetime bound.
    pub leeway_secs: u64,
    /// `exp` no further away than this (plus the leeway).
    pub max_ttl_secs: u64,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, `aud` must name it. Unset, a token carrying `aud` is refused.
    pub audience: Option<String>,
}

impl TenantTokenPolicy {
    /// The default of `auth.tenant_token_max_ttl_secs`.
    pub const DEFAULT_MAX_TTL_SECS: u64 = 3600;

    pub fn from_settings(auth: &AuthSettings) -> Self {
        Self {
            leeway_secs: auth.tenant_token_leeway.as_secs(),
            max_ttl_secs: auth.tenant_token_max_ttl.as_secs(),
            issuer: auth.tenant_token_issuer.clone(),
            audience: auth.tenant_token_audience.clone(),
        }
    }
}

/// Verifies (and, for development and tests, mints) HS256 tenant tokens.
pub struct TenantTokens {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
    policy: TenantTokenPolicy,
}

impl std::fmt::Debug for TenantTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantTokens([REDACTED])")
    }
}

impl TenantTokens {
    /// The default policy with this leeway: lifetime at most an hour, no `iss`/`aud` check.
    pub fn new(secret: &SecretString, leeway_secs: u64) -> Self {
        Self::with_policy(
            secret,
            TenantTokenPolicy {
                leeway_secs,
                max_ttl_secs: TenantTokenPolicy::DEFAULT_MAX_TTL_SECS,
                issuer: None,
                audience: None,
            },
        )
    }

    /// As the `[auth]` settings say.
    pub fn from_settings(secret: &SecretString, auth: &AuthSettings) -> Self {
        Self::with_policy(secret, TenantTokenPolicy::from_settings(auth))
    }

    pub fn with_policy(secret: &SecretString, policy: TenantTokenPolicy) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        // Only HS256: a token naming another algorithm (`none`, RS256 with our secret as a
        // public key) is refused by the validation, whatever its header says.
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp"];
        validation.leeway = policy.leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        if let Some(issuer) = &policy.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        // validate_aud stays on: without a configured audience a token naming one is
        // meant for someone else (RFC 7519, 4.1.3).
        if let Some(audience) = &policy.audience {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        Self {
            decoding: DecodingKey::from_secret(bytes),
            encoding: EncodingKey::from_secret(bytes),
            validation,
            policy,
        }
    }

    /// The tenant the token speaks for. The claim is returned as the raw string: the caller
    /// compares it with the path before parsing, so a foreign tenant is a plain 404.
    pub fn verify(&self, token: &str) -> Result<String, TenantTokenError> {
        let claims = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TenantTokenError::Invalid)?
            .claims;
        // A token valid for longer than the policy allows is refused whole, not trimmed:
        // a long-lived token is a leaked token waiting to happen.
        let now = i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap_or(i64::MAX);
        let furthest = now
            .saturating_add_unsigned(self.policy.max_ttl_secs)
            .saturating_add_unsigned(self.policy.leeway_secs);
        if claims.exp > furthest {
            return Err(TenantTokenError::Invalid);
        }
        Ok(claims.tenant_id)
    }

    /// Mints a token, as the Atlas app would (the CLI's `tenant-token`, and tests), with the
    /// configured `iss` and `aud`.
    pub fn mint(&self, tenant: &TenantId, ttl: time::Duration) -> SecretString {
        let claims = MintedClaims {
            tenant_id: tenant.as_str(),
            exp: (OffsetDateTime::now_utc() + ttl).unix_timestamp(),
            iss: self.policy.issuer.as_deref(),
            aud: self.policy.audience.as_deref(),
        };
        let token = encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims cannot fail");
        SecretString::from(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(secret: &str) -> TenantTokens {
        TenantTokens::new(&SecretString::from(secret.to_owned()), 0)
    }

    #[test]
    fn minted_tokens_verify_and_name_the_tenant() {
        let t = tokens("a-secret-of-enough-length-for-hs256!!");
        let token = t.mint(
            &TenantId::parse("ten_1").unwrap(),
            time::Duration::minutes(5),
        );
        assert_eq!(t.verify(token.expose_secret()), Ok("ten_1".to_owned()));
    }

    #[test]
    fn refuses_other_secret_expired_and_garbage() {
        let t = tokens("a-secret-of-enough-length-for-hs256!!");
        let other = tokens("another-secret-of-enough-length-for-hs256");
        let tenant = TenantId::parse("ten_1").unwrap();
        let foreign = other.mint(&tenant, time::Duration::minutes(5));
        assert_eq!(
            t.verify(foreign.expose_secret()),
            Err(TenantTokenError::Invalid)
        );
        let expired = t.mint(&tenant, time::Duration::seconds(-10));
        assert_eq!(
            t.verify(expired.expose_secret()),
            Err(TenantTokenError::Invalid)
        );
        assert_eq!(t.verify("not-a-jwt"), Err(TenantTokenError::Invalid));
        // alg "none" with the same claims.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ0ZW5hbnRfaWQiOiJ0ZW5fMSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert_eq!(t.verify(none), Err(TenantTokenError::Invalid));
    }

    #[test]
    fn exp_is_required() {
        let t = tokens("a-secret-of-enough-length-for-hs256!!");
        #[derive(Serialize)]
        struct NoExp {
            tenant_id: &'static str,
        }
        let token = encode(
            &Header::new(Algorithm::HS256),
            &NoExp { tenant_id: "ten_1" },
            &EncodingKey::from_secret(b"a-secret-of-enough-length-for-hs256!!"),
        )
        .unwrap();
        assert_eq!(t.verify(&token), Err(TenantTokenError::Invalid));
    }

    const SECRET: &str = "a-secret-of-enough-length-for-hs256!!";

    fn sign(claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> i64 {
        OffsetDateTime::now_utc().unix_timestamp()
    }

    fn policy(leeway_secs: u64, max_ttl_secs: u64) -> TenantTokenPolicy {
        TenantTokenPolicy {
            leeway_secs,
            max_ttl_secs,
            issuer: None,
            audience: None,
        }
    }

    #[test]
    fn nbf_is_honoured_with_the_leeway() {
        let t = TenantTokens::with_policy(&SecretString::from(SECRET), policy(30, 3600));
        let at = |nbf: serde_json::Value| {
            t.verify(&sign(
                serde_json::json!({"tenant_id": "ten_1", "exp": now() + 600, "nbf": nbf}),
            ))
        };
        assert_eq!(at((now() + 300).into()), Err(TenantTokenError::Invalid));
        assert_eq!(
            at((now() + 10).into()),
            Ok("ten_1".into()),
            "within the leeway"
        );
        assert_eq!(at((now() - 60).into()), Ok("ten_1".into()));
        assert_eq!(
            at("soon".into()),
            Err(TenantTokenError::Invalid),
            "malformed"
        );
    }

    #[test]
    fn exp_no_further_away_than_the_max_ttl_plus_leeway() {
        let t = TenantTokens::with_policy(&SecretString::from(SECRET), policy(30, 600));
        let with_exp =
            |exp: i64| t.verify(&sign(serde_json::json!({"tenant_id": "ten_1", "exp": exp})));
        assert_eq!(with_exp(now() + 600), Ok("ten_1".into()));
        assert_eq!(
            with_exp(now() + 620),
            Ok("ten_1".into()),
            "within the leeway"
        );
        assert_eq!(with_exp(now() + 700), Err(TenantTokenError::Invalid));
        assert_eq!(with_exp(i64::MAX), Err(TenantTokenError::Invalid));
        // The default policy: an hour.
        let t = TenantTokens::new(&SecretString::from(SECRET), 0);
        let tenant = TenantId::parse("ten_1").unwrap();
        let day = t.mint(&tenant, time::Duration::days(1));
        assert_eq!(
            t.verify(day.expose_secret()),
            Err(TenantTokenError::Invalid)
        );
        let hour = t.mint(&tenant, time::Duration::minutes(59));
        assert_eq!(t.verify(hour.expose_secret()), Ok("ten_1".into()));
    }

    #[test]
    fn iss_and_aud_are_required_when_configured() {
        let configured = TenantTokens::with_policy(
            &SecretString::from(SECRET),
            TenantTokenPolicy {
                issuer: Some("https://app.atlas.example".into()),
                audience: Some("atlas-stripe".into()),
                ..policy(0, 3600)
            },
        );
        let exp = now() + 600;
        let cases = [
            (serde_json::json!({"tenant_id": "ten_1", "exp": exp}), false),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "https://app.atlas.example"}),
                false,
            ),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "aud": "atlas-stripe"}),
                false,
            ),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "https://evil.example", "aud": "atlas-stripe"}),
                false,
            ),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "https://app.atlas.example", "aud": "atlas-billing"}),
                false,
            ),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "https://app.atlas.example", "aud": "atlas-stripe"}),
                true,
            ),
            (
                serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "https://app.atlas.example", "aud": ["atlas-billing", "atlas-stripe"]}),
                true,
            ),
        ];
        for (claims, accepted) in cases {
            let result = configured.verify(&sign(claims.clone()));
            assert_eq!(result.is_ok(), accepted, "{claims}");
        }
        // Minted tokens carry them.
        let tenant = TenantId::parse("ten_1").unwrap();
        let minted = configured.mint(&tenant, time::Duration::minutes(5));
        assert_eq!(
            configured.verify(minted.expose_secret()),
            Ok("ten_1".into())
        );

        // Unset: iss is not checked; a token naming an audience is refused.
        let plain = TenantTokens::with_policy(&SecretString::from(SECRET), policy(0, 3600));
        let iss = sign(serde_json::json!({"tenant_id": "ten_1", "exp": exp, "iss": "anyone"}));
        assert_eq!(plain.verify(&iss), Ok("ten_1".into()));
        let aud =
            sign(serde_json::json!({"tenant_id": "ten_1", "exp": exp, "aud": "atlas-stripe"}));
        assert_eq!(plain.verify(&aud), Err(TenantTokenError::Invalid));
    }
}
