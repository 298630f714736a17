//! The Stripe proxy for charging services: they send their Stripe request to
//! `/internal/v1/tenants/{id}/stripe/v1/{path}` and this service adds the tenant's key, so
//! the key never leaves it. Only allowlisted endpoints are forwarded (`allowlist.rs`) and
//! each connected account's calls are smoothed under Stripe's rate limits (`smoothing.rs`);
//! of the caller's headers only its `Stripe-Version` and `Idempotency-Key` pass (`headers.rs`).
//! `expand.rs` keeps `expand[]` within `proxy.expand_allowed`. `forward.rs` makes one call: key, turn, Stripe, accounting.

mod allowlist;
mod expand;
mod forward;
mod headers;
mod smoothing;

pub use allowlist::{Allowlist, Endpoint};
pub use expand::expansions_allowed;
pub use forward::{Proxy, ProxyAnswer, ProxyCall, ProxyError};
pub use headers::{caller_headers, is_stripe_version, CallerHeaders, HeaderRefusal};
pub use smoothing::{AccountSmoothing, OverRate};
