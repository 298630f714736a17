//! Envelope encryption of the secrets we hold (Stripe API keys and webhook signing secrets).
//!
//! Each secret gets a fresh 256-bit data key; the secret is sealed with AES-256-GCM under the
//! data key, and the data key is wrapped with AES-256-GCM under a versioned master key. Both
//! seals carry associated data naming the secret's context, so a ciphertext moved to another
//! row, tenant, mode or purpose does not open.

mod envelope;
mod fingerprint;
mod keyring;
pub mod kms;

pub use envelope::{Purpose, SealedSecret, SecretContext};
pub use fingerprint::Fingerprinter;
pub use keyring::{Holder, Keyring, KeyringError, MasterKeyId};
pub use kms::{Kms, KmsConfig, KmsError, KmsFailure};

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// The record names a master key this process was not configured with.
    #[error("master key {0:?} is not in the configured keyring")]
    UnknownMasterKey(String),
    /// The master key is held by AWS KMS and was not decrypted yet (KMS did not answer at
    /// start-up; a background retry is under way). Retryable.
    #[error("master key {0:?} is held by AWS KMS and not decrypted yet")]
    MasterKeyUnavailable(String),
    /// Authentication failed: tampered bytes, a wrong context, or the wrong key.
    #[error("sealed secret failed to open (tampered, moved to another context, or wrong key)")]
    Open,
    #[error("sealing failed")]
    Seal,
    /// Opened, but what was sealed is not a Stripe API key.
    #[error("the opened secret is not a Stripe API key")]
    NotAStripeKey,
}
