//! Talking to Stripe: the HTTP client (timeouts, retries, pinned version), the
//! side-effect-free permission probe, our webhook endpoint and the event log.

mod client;
pub mod events;
mod probe;
pub mod webhooks;

pub use client::{
    Forward, Forwarded, StripeClient, StripeClientConfig, StripeFailure, StripeMethod, StripeReply,
    StripeRequest,
};
pub use probe::{probe_request, probe_write_access, ProbeError};
