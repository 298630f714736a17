//! The API and store tests: one binary, each test on its own app and database, on both
//! backends.

mod helpers;
mod stripe_contract;
mod stripe_mock;

mod auth;
mod cli;
mod config_checks;
mod connect;
mod connect_page;
mod cors;
mod docs;
mod fleet;
mod flood;
mod hostile;
mod keys;
mod kms;
mod lifecycle;
mod limits;
mod notifications;
mod openapi_doc;
mod ops;
mod outage;
mod proxy;
mod races;
mod recovery;
mod scale;
mod secrets;
mod slow_clients;
mod store;
mod tenants;
mod webhooks;
