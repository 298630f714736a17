//! Talking to Stripe: the HTTP client (timeouts, retries, pinned version) and the
//! side-effect-free permission probe.

mod client;
mod probe;
pub mod webhooks;

pub use client::{
    Forward, Forwarded, StripeClient, StripeClientConfig, StripeFailure, StripeMethod, StripeReply,
    StripeRequest,
};
pub use probe::{probe_request, probe_write_access, ProbeError};
