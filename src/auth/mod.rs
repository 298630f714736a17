//! The two kinds of caller credentials: tenant tokens (JWTs signed by the Atlas app) and
//! service tokens (created by our CLI, stored hashed, scoped).

mod service_token;
mod service_tokens;
mod tenant_token;
pub mod token_cache;

pub use service_token::{IssuedServiceToken, PresentedServiceToken, Scope, ServiceTokenHash};
pub use service_tokens::{AuthError, ServiceTokens, StoredToken, TokenLookup};
pub use tenant_token::{TenantTokenError, TenantTokenPolicy, TenantTokens};
pub use token_cache::ServiceTokenCache;
