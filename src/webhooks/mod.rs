//! Stripe's deliveries of a connection's events: verified against the endpoint's signing
//! secret, then stored durably before Stripe hears a 2xx (`receive.rs`). Workers that
//! serve the events (recovery of missed ones) belong here, each in its own file, not in
//! `http/`.

mod receive;

pub use receive::{DeliveryError, Stored, WebhookReceiver};
