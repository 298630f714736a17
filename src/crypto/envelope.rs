use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use std::fmt;
use zeroize::Zeroizing;

use super::CryptoError;
use crate::domain::{Mode, TenantId};

const NONCE_LEN: usize = 12;
const AAD_VERSION: &[u8] = b"atlas-stripe/sealed/v1";

/// What a sealed secret is for; part of its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    StripeApiKey,
    WebhookSigningSecret,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StripeApiKey => "stripe_api_key",
            Self::WebhookSigningSecret => "webhook_signing_secret",
        }
    }
}

/// Where a secret belongs. Bound into both seals as associated data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretContext {
    pub secret_id: String,
    pub tenant_id: TenantId,
    pub mode: Mode,
    pub purpose: Purpose,
}

impl SecretContext {
    pub fn new(purpose: Purpose, secret_id: &str, tenant_id: &TenantId, mode: Mode) -> Self {
        Self {
            secret_id: secret_id.to_owned(),
            tenant_id: tenant_id.clone(),
            mode,
            purpose,
        }
    }

    /// Where a tenant's Stripe API key is sealed.
    pub fn api_key(secret_id: &str, tenant_id: &TenantId, mode: Mode) -> Self {
        Self::new(Purpose::StripeApiKey, secret_id, tenant_id, mode)
    }

    /// Where the signing secret of our webhook endpoint on the tenant's account is sealed.
    pub fn webhook_secret(secret_id: &str, tenant_id: &TenantId, mode: Mode) -> Self {
        Self::new(Purpose::WebhookSigningSecret, secret_id, tenant_id, mode)
    }

    /// Associated data of the secret layer. Length-prefixed fields, so no two contexts encode
    /// to the same bytes. The master key is not named here: a rewrap replaces only the
    /// wrapped data key.
    fn secret_aad(&self) -> Vec<u8> {
        self.aad(&["secret"])
    }

    /// Associated data of the data-key layer, which also names the master key.
    fn data_key_aad(&self, master_key_id: &str) -> Vec<u8> {
        self.aad(&["data_key", master_key_id])
    }

    fn aad(&self, layer: &[&str]) -> Vec<u8> {
        let context = [
            self.purpose.as_str(),
            self.tenant_id.as_str(),
            self.mode.as_str(),
            self.secret_id.as_str(),
        ];
        let mut aad = AAD_VERSION.to_vec();
        for field in layer.iter().chain(context.iter()) {
            aad.extend_from_slice(&(field.len() as u32).to_be_bytes());
            aad.extend_from_slice(field.as_bytes());
        }
        aad
    }
}

/// A secret as stored: the master-key id, the wrapped data key and the ciphertext, each
/// seal as `nonce || ciphertext || tag`. Holds nothing secret in the clear.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret {
    pub master_key_id: String,
    pub wrapped_key: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealedSecret")
            .field("master_key_id", &self.master_key_id)
            .field("wrapped_key_len", &self.wrapped_key.len())
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}

fn seal_with(cipher: &Aes256Gcm, msg: &[u8], aad: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let nonce = Aes256Gcm::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(&nonce, Payload { msg, aad })
        .map_err(|_| CryptoError::Seal)?;
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    Ok(out)
}

fn open_with(
    cipher: &Aes256Gcm,
    sealed: &[u8],
    aad: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    if sealed.len() < NONCE_LEN {
        return Err(CryptoError::Open);
    }
    let (nonce, msg) = sealed.split_at(NONCE_LEN);
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .map(Zeroizing::new)
        .map_err(|_| CryptoError::Open)
}

/// Seals `plaintext` under a fresh data key wrapped by `master`.
pub(super) fn seal(
    master: &Aes256Gcm,
    master_key_id: &str,
    context: &SecretContext,
    plaintext: &[u8],
) -> Result<SealedSecret, CryptoError> {
    let mut data_key = Zeroizing::new([0u8; 32]);
    OsRng.fill_bytes(data_key.as_mut());
    let data_cipher =
        Aes256Gcm::new_from_slice(data_key.as_ref()).map_err(|_| CryptoError::Seal)?;
    let ciphertext = seal_with(&data_cipher, plaintext, &context.secret_aad())?;
    let wrapped_key = seal_with(
        master,
        data_key.as_ref(),
        &context.data_key_aad(master_key_id),
    )?;
    Ok(SealedSecret {
        master_key_id: master_key_id.to_owned(),
        wrapped_key,
        ciphertext,
    })
}

/// Opens a secret sealed by [`seal`]; `master` must be the key named by `sealed.master_key_id`.
pub(super) fn open(
    master: &Aes256Gcm,
    context: &SecretContext,
    sealed: &SealedSecret,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let data_key = open_with(
        master,
        &sealed.wrapped_key,
        &context.data_key_aad(&sealed.master_key_id),
    )?;
    let data_cipher = Aes256Gcm::new_from_slice(&data_key).map_err(|_| CryptoError::Open)?;
    open_with(&data_cipher, &sealed.ciphertext, &context.secret_aad())
}

/// Re-wraps the data key under another master key; the ciphertext is reused as is.
/// The whole secret is opened first, so a rewrap never replaces a pair that does not open.
pub(super) fn rewrap(
    old_master: &Aes256Gcm,
    new_master: &Aes256Gcm,
    new_master_key_id: &str,
    context: &SecretContext,
    sealed: &SealedSecret,
) -> Result<SealedSecret, CryptoError> {
    let data_key = open_with(
        old_master,
        &sealed.wrapped_key,
        &context.data_key_aad(&sealed.master_key_id),
    )?;
    let data_cipher = Aes256Gcm::new_from_slice(&data_key).map_err(|_| CryptoError::Open)?;
    open_with(&data_cipher, &sealed.ciphertext, &context.secret_aad())?;
    Ok(SealedSecret {
        master_key_id: new_master_key_id.to_owned(),
        wrapped_key: seal_with(
            new_master,
            &data_key,
            &context.data_key_aad(new_master_key_id),
        )?,
        ciphertext: sealed.ciphertext.clone(),
    })
}
