//! Stripe's deliveries of a connection's events: verified against the endpoint's signing
//! secret, then stored durably before Stripe hears a 2xx (`receive.rs`), concurrent
//! deliveries sharing one commit (`batch.rs`); the recovery of events Stripe could not
//! deliver (`recovery.rs`), and what it announces (`announcements.rs`).

pub mod announcements;
mod batch;
mod receive;
pub mod recovery;

pub use batch::BatchSettings;
pub use receive::{DeliveryError, Stored, WebhookReceiver};
