//! Stripe's events for a connection, beyond their delivery: the recovery of missed ones
//! (`recovery.rs`) and what it announces (`announcements.rs`).

pub mod announcements;
pub mod recovery;
