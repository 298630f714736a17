use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::domain::TenantId;

/// The claims of a tenant token. `exp` is required; any other claim is ignored.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    tenant_id: String,
    exp: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenantTokenError {
    #[error("the tenant token is malformed, expired, or not signed by Atlas")]
    Invalid,
}

/// Verifies (and, for development and tests, mints) HS256 tenant tokens.
pub struct TenantTokens {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TenantTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantTokens([REDACTED])")
    }
}

impl TenantTokens {
    pub fn new(secret: &SecretString, leeway_secs: u64) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        // Only HS256: a token naming another algorithm (`none`, RS256 with our secret as a
        // public key) is refused by the validation, whatever its header says.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        Self {
            decoding: DecodingKey::from_secret(bytes),
            encoding: EncodingKey::from_secret(bytes),
            validation,
        }
    }

    /// The tenant the token speaks for. The claim is returned as the raw string: the caller
    /// compares it with the path before parsing, so a foreign tenant is a plain 404.
    pub fn verify(&self, token: &str) -> Result<String, TenantTokenError> {
        decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims.tenant_id)
            .map_err(|_| TenantTokenError::Invalid)
    }

    /// Mints a token, as the Atlas app would (the CLI's `tenant-token`, and tests).
    pub fn mint(&self, tenant: &TenantId, ttl: time::Duration) -> SecretString {
        let claims = Claims {
            tenant_id: tenant.as_str().to_owned(),
            exp: (OffsetDateTime::now_utc() + ttl).unix_timestamp(),
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
}
