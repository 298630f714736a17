use std::fmt;

use serde::Serialize;

/// An Atlas tenant id: opaque to us, but bounded so it is safe in paths, logs and SQL.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TenantId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("tenant ids are 1 to 64 characters of letters, digits, '_', '-' and '.', starting with a letter or digit")]
pub struct InvalidTenantId;

impl TenantId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, InvalidTenantId> {
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
        let starts_plain = raw.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !starts_plain || raw.len() > Self::MAX_LEN || !raw.chars().all(valid_char) {
            return Err(InvalidTenantId);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

/// Whether a tenant charges with test or live Stripe keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Test,
    Live,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("mode must be \"test\" or \"live\"")]
pub struct InvalidMode;

impl Mode {
    pub fn parse(raw: &str) -> Result<Self, InvalidMode> {
        match raw {
            "test" => Ok(Self::Test),
            "live" => Ok(Self::Live),
            _ => Err(InvalidMode),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Live => "live",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_bounded_and_plain() {
        assert!(TenantId::parse("ten_123").is_ok());
        assert!(TenantId::parse("a.b-c_D9").is_ok());
        assert!(TenantId::parse(&"a".repeat(64)).is_ok());
        assert_eq!(TenantId::parse(&"a".repeat(65)), Err(InvalidTenantId));
        for bad in [
            "", "ten 1", "ten/1", "ten%2F1", "tén", "a\nb", "../x", "..", ".hidden", "-x",
        ] {
            assert_eq!(TenantId::parse(bad), Err(InvalidTenantId), "{bad:?}");
        }
    }

    #[test]
    fn modes_parse_exactly() {
        assert_eq!(Mode::parse("test"), Ok(Mode::Test));
        assert_eq!(Mode::parse("live"), Ok(Mode::Live));
        assert_eq!(Mode::parse("Live"), Err(InvalidMode));
        assert_eq!(Mode::parse(""), Err(InvalidMode));
    }
}
