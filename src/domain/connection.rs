use serde::Serialize;

/// The health of a tenant's Stripe connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionStatus {
    /// Verified with every required permission.
    Active,
    /// The key works but lacks a required permission (one was removed, or a new one is required).
    NeedsAttention,
    /// Stripe answered 401: the key was rolled, expired or deleted.
    Revoked,
}

impl ConnectionStatus {
    pub const ALL: [Self; 3] = [Self::Active, Self::NeedsAttention, Self::Revoked];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::NeedsAttention => "needs_attention",
            Self::Revoked => "revoked",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "active" => Some(Self::Active),
            "needs_attention" => Some(Self::NeedsAttention),
            "revoked" => Some(Self::Revoked),
            _ => None,
        }
    }
}

/// Something the tenant should know about a working connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Warning {
    /// A secret key can do everything on the account; a restricted key is least privilege.
    SecretKeyFullAccess,
    /// The key may not read Events: missed events cannot be recovered for it.
    EventRecoveryOff,
}

impl Warning {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "secret_key_full_access" => Some(Self::SecretKeyFullAccess),
            "event_recovery_off" => Some(Self::EventRecoveryOff),
            _ => None,
        }
    }
}
