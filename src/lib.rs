//! atlas-stripe: connects an Atlas tenant's Stripe account. Verifies a pasted API key
//! without side effects, seals it with envelope encryption, and serves it to Atlas's
//! charging services.

pub mod accounting;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod connection;
pub mod crypto;
pub mod domain;
pub mod health;
pub mod http;
pub mod notifications;
pub mod proxy;
pub mod retention;
pub mod rotation;
pub mod server;
pub mod startup;
pub mod store;
pub mod stripe;
pub mod telemetry;
pub mod webhooks;
