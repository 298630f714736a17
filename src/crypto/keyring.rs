use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};

use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use super::envelope::{self, SealedSecret, SecretContext};
use super::{CryptoError, Purpose};
use crate::domain::{Mode, StripeKey, TenantId};

/// The id of one master-key version, recorded beside every wrapped data key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MasterKeyId(String);

impl MasterKeyId {
    pub fn parse(raw: &str) -> Result<Self, KeyringError> {
        let ok = !raw.is_empty()
            && raw.len() <= 32
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(KeyringError::BadId)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyringError {
    #[error("crypto.master_keys is empty: list at least one `id:base64key` pair")]
    Empty,
    #[error("crypto.master_keys: each entry is `id:base64key`, comma separated")]
    BadEntry,
    #[error("crypto.master_keys: a key id is 1 to 32 characters of letters, digits, '_' and '-'")]
    BadId,
    #[error("crypto.master_keys: key {0:?} is not 32 bytes of standard base64 (generate one with `atlas-stripe keys generate`)")]
    BadKey(String),
    #[error("crypto.master_keys: key id {0:?} is listed twice")]
    Duplicate(String),
    #[error("crypto.master_keys: key {0:?} is `id:kms:` and a KMS ciphertext blob in standard base64 (generate one with `atlas-stripe keys generate --kms`)")]
    BadKmsBlob(String),
    #[error("crypto.active_key_id {0:?} is not one of the ids in crypto.master_keys")]
    ActiveMissing(String),
    #[error(
        "crypto.master_keys: master key {0} is held by AWS KMS (`id:kms:…`) but \
         crypto.aws_kms.key_id is not set (set ATLAS_STRIPE__CRYPTO__AWS_KMS__KEY_ID \
         and ATLAS_STRIPE__CRYPTO__AWS_KMS__REGION)"
    )]
    KmsNotConfigured(String),
}

/// Where a master key is held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    Local,
    Kms,
}

/// One master key: local material, or a KMS blob decrypted later (once).
enum Slot {
    Local(Aes256Gcm),
    Kms {
        blob: Vec<u8>,
        /// Set once, when KMS decrypted the blob; read lock-free on every seal and open.
        cipher: OnceLock<Aes256Gcm>,
        /// Why the last attempt failed (no secret in it), for readiness and the log.
        last_failure: Mutex<Option<String>>,
    },
}

impl Slot {
    fn cipher(&self) -> Option<&Aes256Gcm> {
        match self {
            Self::Local(cipher) => Some(cipher),
            Self::Kms { cipher, .. } => cipher.get(),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Self::Kms { blob, .. } = self {
            zeroize::Zeroize::zeroize(blob);
        }
    }
}

/// The configured master-key versions: one active for sealing, all of them for opening.
/// A KMS-held key is usable once [`Keyring::unlock`] was given its plaintext; until then,
/// anything needing it fails with [`CryptoError::MasterKeyUnavailable`].
pub struct Keyring {
    keys: BTreeMap<MasterKeyId, Slot>,
    active: MasterKeyId,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field(
                "ids",
                &self.keys.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            )
            .field("active", &self.active.as_str())
            .finish()
    }
}

impl Keyring {
    /// Parses `id:base64key` and `id:kms:base64blob` entries, comma separated, and the
    /// active id. KMS entries are not decrypted here (see [`Keyring::unlock`]).
    pub fn from_config(
        master_keys: &SecretString,
        active_key_id: &str,
    ) -> Result<Self, KeyringError> {
        let mut keys = BTreeMap::new();
        for entry in master_keys.expose_secret().split(',').map(str::trim) {
            if entry.is_empty() {
                continue;
            }
            let (id, material) = entry.split_once(':').ok_or(KeyringError::BadEntry)?;
            let id = MasterKeyId::parse(id.trim())?;
            let slot = if let Some(blob) = material.trim().strip_prefix("kms:") {
                let blob = BASE64
                    .decode(blob.trim())
                    .ok()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| KeyringError::BadKmsBlob(id.0.clone()))?;
                Slot::Kms {
                    blob,
                    cipher: OnceLock::new(),
                    last_failure: Mutex::new(None),
                }
            } else {
                let bytes = Zeroizing::new(
                    BASE64
                        .decode(material.trim())
                        .map_err(|_| KeyringError::BadKey(id.0.clone()))?,
                );
                Slot::Local(
                    Aes256Gcm::new_from_slice(&bytes)
                        .map_err(|_| KeyringError::BadKey(id.0.clone()))?,
                )
            };
            if keys.insert(id.clone(), slot).is_some() {
                return Err(KeyringError::Duplicate(id.0));
            }
        }
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let active = MasterKeyId::parse(active_key_id)
            .ok()
            .filter(|id| keys.contains_key(id))
            .ok_or_else(|| KeyringError::ActiveMissing(active_key_id.to_owned()))?;
        Ok(Self { keys, active })
    }

    /// Fresh key material in the configuration format: `id:base64key`.
    pub fn generate_entry(id: &MasterKeyId) -> SecretString {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut());
        SecretString::from(format!("{}:{}", id.as_str(), BASE64.encode(bytes.as_ref())))
    }

    pub fn active_id(&self) -> &MasterKeyId {
        &self.active
    }

    /// Whether `id` is configured (held locally or by KMS, decrypted yet or not).
    pub fn contains(&self, id: &str) -> bool {
        self.keys.keys().any(|k| k.as_str() == id)
    }

    /// Every configured id and where its key is held.
    pub fn entries(&self) -> Vec<(MasterKeyId, Holder)> {
        (self.keys.iter())
            .map(|(id, slot)| {
                let holder = match slot {
                    Slot::Local(_) => Holder::Local,
                    Slot::Kms { .. } => Holder::Kms,
                };
                (id.clone(), holder)
            })
            .collect()
    }

    /// Whether any entry is held by KMS.
    pub fn has_kms(&self) -> bool {
        (self.keys.values()).any(|slot| matches!(slot, Slot::Kms { .. }))
    }

    /// The KMS-held entries not decrypted yet, with their blobs (to hand to KMS only).
    pub fn pending_kms(&self) -> Vec<(MasterKeyId, &[u8])> {
        (self.keys.iter())
            .filter_map(|(id, slot)| match slot {
                Slot::Kms { blob, cipher, .. } if cipher.get().is_none() => {
                    Some((id.clone(), blob.as_slice()))
                }
                _ => None,
            })
            .collect()
    }

    /// Why each KMS-held entry not decrypted yet is not: `(id, last failure)`.
    pub fn unavailable(&self) -> Vec<(MasterKeyId, String)> {
        (self.keys.iter())
            .filter_map(|(id, slot)| match slot {
                Slot::Kms {
                    cipher,
                    last_failure,
                    ..
                } if cipher.get().is_none() => {
                    let failure = last_failure.lock().unwrap_or_else(|e| e.into_inner());
                    let why = failure
                        .clone()
                        .unwrap_or_else(|| "not decrypted by KMS yet".to_owned());
                    Some((id.clone(), why))
                }
                _ => None,
            })
            .collect()
    }

    /// Installs the plaintext KMS returned for `id` (wiped by the caller's `Zeroizing`).
    /// A second call for the same id is a no-op.
    pub fn unlock(&self, id: &MasterKeyId, plaintext: &[u8]) -> Result<(), CryptoError> {
        match self.keys.get(id) {
            Some(Slot::Kms { cipher, .. }) => {
                let new = Aes256Gcm::new_from_slice(plaintext).map_err(|_| CryptoError::Open)?;
                let _ = cipher.set(new);
                Ok(())
            }
            _ => Err(CryptoError::UnknownMasterKey(id.as_str().to_owned())),
        }
    }

    /// Records why KMS did not decrypt `id` (a message without secrets).
    pub fn record_failure(&self, id: &MasterKeyId, why: String) {
        if let Some(Slot::Kms { last_failure, .. }) = self.keys.get(id) {
            *last_failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    }

    fn cipher(&self, id: &str) -> Result<&Aes256Gcm, CryptoError> {
        let (id, slot) = self
            .keys
            .iter()
            .find(|(k, _)| k.as_str() == id)
            .ok_or_else(|| CryptoError::UnknownMasterKey(id.to_owned()))?;
        slot.cipher()
            .ok_or_else(|| CryptoError::MasterKeyUnavailable(id.as_str().to_owned()))
    }

    /// Seals under the active master key.
    pub fn seal(
        &self,
        context: &SecretContext,
        plaintext: &[u8],
    ) -> Result<SealedSecret, CryptoError> {
        envelope::seal(
            self.cipher(self.active.as_str())?,
            self.active.as_str(),
            context,
            plaintext,
        )
    }

    /// Opens with whichever master key the record names.
    pub fn open(
        &self,
        context: &SecretContext,
        sealed: &SealedSecret,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        envelope::open(self.cipher(&sealed.master_key_id)?, context, sealed)
    }

    /// Opens a sealed Stripe API key: the one way a stored key comes back to plaintext.
    pub fn open_stripe_key(
        &self,
        context: &SecretContext,
        sealed: &SealedSecret,
    ) -> Result<StripeKey, CryptoError> {
        let plaintext = self.open(context, sealed)?;
        let text = std::str::from_utf8(&plaintext).map_err(|_| CryptoError::NotAStripeKey)?;
        StripeKey::parse(text).map_err(|_| CryptoError::NotAStripeKey)
    }

    /// Re-wraps the data key under the active master key (a no-op copy when it already is).
    pub fn rewrap(
        &self,
        context: &SecretContext,
        sealed: &SealedSecret,
    ) -> Result<SealedSecret, CryptoError> {
        envelope::rewrap(
            self.cipher(&sealed.master_key_id)?,
            self.cipher(self.active.as_str())?,
            self.active.as_str(),
            context,
            sealed,
        )
    }

    /// Seals and opens a canary with the active key, and proves every listed key can
    /// wrap and unwrap: what `/readyz` asks before traffic is sent here.
    pub fn self_test(&self) -> Result<(), CryptoError> {
        let context = SecretContext {
            secret_id: "self_test".to_owned(),
            tenant_id: TenantId::parse("keyring-self-test").map_err(|_| CryptoError::Seal)?,
            mode: Mode::Test,
            purpose: Purpose::StripeApiKey,
        };
        let canary = b"atlas-stripe keyring self-test";
        let sealed = self.seal(&context, canary)?;
        if self.open(&context, &sealed)?.as_slice() != canary {
            return Err(CryptoError::Open);
        }
        for id in self.keys.keys() {
            let sealed = envelope::seal(self.cipher(id.as_str())?, id.as_str(), &context, canary)?;
            self.rewrap(&context, &sealed)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str) -> String {
        let id = MasterKeyId::parse(id).unwrap();
        Keyring::generate_entry(&id).expose_secret().to_owned()
    }

    fn ring(entries: &[&str], active: &str) -> Keyring {
        Keyring::from_config(&SecretString::from(entries.join(",")), active).expect("valid keyring")
    }

    fn keyring(ids: &[&str], active: &str) -> Keyring {
        let entries: Vec<String> = ids.iter().map(|id| entry(id)).collect();
        let entries: Vec<&str> = entries.iter().map(String::as_str).collect();
        ring(&entries, active)
    }

    fn context(tenant: &str, mode: Mode) -> SecretContext {
        SecretContext {
            secret_id: "sec_1".to_owned(),
            tenant_id: TenantId::parse(tenant).unwrap(),
            mode,
            purpose: Purpose::StripeApiKey,
        }
    }

    #[test]
    fn round_trip() {
        let ring = keyring(&["k1"], "k1");
        let ctx = context("ten_a", Mode::Test);
        let sealed = ring.seal(&ctx, b"rk_test_secret").unwrap();
        assert_eq!(sealed.master_key_id, "k1");
        assert!(!sealed.ciphertext.windows(7).any(|w| w == b"rk_test"));
        assert_eq!(
            ring.open(&ctx, &sealed).unwrap().as_slice(),
            b"rk_test_secret"
        );
    }

    #[test]
    fn each_seal_uses_a_fresh_data_key_and_nonce() {
        let ring = keyring(&["k1"], "k1");
        let ctx = context("ten_a", Mode::Test);
        // Each layer is stored as `nonce (12 bytes) || ciphertext || tag`.
        let nonce = |sealed: &[u8]| sealed[..12].to_vec();
        let seals: Vec<SealedSecret> = (0..16).map(|_| ring.seal(&ctx, b"same").unwrap()).collect();
        for (i, a) in seals.iter().enumerate() {
            for b in &seals[i + 1..] {
                assert_ne!(
                    nonce(&a.ciphertext),
                    nonce(&b.ciphertext),
                    "the secret layer reused a nonce"
                );
                assert_ne!(
                    nonce(&a.wrapped_key),
                    nonce(&b.wrapped_key),
                    "the data-key layer reused a nonce"
                );
                // A fresh data key: b's ciphertext does not open under a's data key (with one
                // data key for both, this mix would open).
                let mixed = SealedSecret {
                    master_key_id: a.master_key_id.clone(),
                    wrapped_key: a.wrapped_key.clone(),
                    ciphertext: b.ciphertext.clone(),
                };
                assert_eq!(
                    ring.open(&ctx, &mixed),
                    Err(CryptoError::Open),
                    "two seals share a data key"
                );
            }
        }
        // The mix is a real test: each seal opens on its own.
        for sealed in &seals {
            assert_eq!(ring.open(&ctx, sealed).unwrap().as_slice(), b"same");
        }
    }

    #[test]
    fn wrong_context_does_not_open() {
        let ring = keyring(&["k1"], "k1");
        let ctx = context("ten_a", Mode::Test);
        let sealed = ring.seal(&ctx, b"secret").unwrap();
        let others = [
            context("ten_b", Mode::Test),
            context("ten_a", Mode::Live),
            SecretContext {
                secret_id: "sec_2".into(),
                ..ctx.clone()
            },
            SecretContext {
                purpose: Purpose::WebhookSigningSecret,
                ..ctx.clone()
            },
        ];
        for other in others {
            assert_eq!(
                ring.open(&other, &sealed),
                Err(CryptoError::Open),
                "{other:?}"
            );
        }
    }

    #[test]
    fn any_tampered_byte_fails() {
        let ring = keyring(&["k1"], "k1");
        let ctx = context("ten_a", Mode::Test);
        let sealed = ring.seal(&ctx, b"secret").unwrap();
        for i in 0..sealed.ciphertext.len() {
            let mut bad = sealed.clone();
            bad.ciphertext[i] ^= 0x01;
            assert_eq!(ring.open(&ctx, &bad), Err(CryptoError::Open));
        }
        for i in 0..sealed.wrapped_key.len() {
            let mut bad = sealed.clone();
            bad.wrapped_key[i] ^= 0x80;
            assert_eq!(ring.open(&ctx, &bad), Err(CryptoError::Open));
        }
        let mut short = sealed.clone();
        short.ciphertext.truncate(5);
        assert_eq!(ring.open(&ctx, &short), Err(CryptoError::Open));
    }

    #[test]
    fn unknown_or_relabelled_master_key_fails() {
        let ring = keyring(&["k1", "k2"], "k1");
        let ctx = context("ten_a", Mode::Test);
        let sealed = ring.seal(&ctx, b"secret").unwrap();
        let unknown = SealedSecret {
            master_key_id: "k9".into(),
            ..sealed.clone()
        };
        assert_eq!(
            ring.open(&ctx, &unknown),
            Err(CryptoError::UnknownMasterKey("k9".into()))
        );
        let relabelled = SealedSecret {
            master_key_id: "k2".into(),
            ..sealed
        };
        assert_eq!(ring.open(&ctx, &relabelled), Err(CryptoError::Open));
    }

    #[test]
    fn rewrap_moves_to_the_active_key_and_still_opens() {
        let (k1, k2) = (entry("k1"), entry("k2"));
        let ctx = context("ten_a", Mode::Test);
        let sealed = ring(&[&k1], "k1").seal(&ctx, b"secret").unwrap();

        let rotated = ring(&[&k1, &k2], "k2");
        let rewrapped = rotated.rewrap(&ctx, &sealed).unwrap();
        assert_eq!(rewrapped.master_key_id, "k2");
        assert_eq!(rewrapped.ciphertext, sealed.ciphertext);
        assert_ne!(rewrapped.wrapped_key, sealed.wrapped_key);
        // Once rewrapped, the old master key can be dropped from the configuration.
        let only_new = ring(&[&k2], "k2");
        assert_eq!(
            only_new.open(&ctx, &rewrapped).unwrap().as_slice(),
            b"secret"
        );
        assert!(matches!(
            only_new.open(&ctx, &sealed),
            Err(CryptoError::UnknownMasterKey(_))
        ));
        // A rewrap refuses a pair that does not open instead of writing garbage.
        let mut tampered = sealed.clone();
        tampered.ciphertext[20] ^= 1;
        assert_eq!(rotated.rewrap(&ctx, &tampered), Err(CryptoError::Open));
    }

    #[test]
    fn config_errors_are_specific() {
        let entry = Keyring::generate_entry(&MasterKeyId::parse("k1").unwrap());
        let good = entry.expose_secret().to_owned();
        let cases = [
            ("", "k1", KeyringError::Empty),
            ("k1", "k1", KeyringError::BadEntry),
            ("k 1:AAAA", "k1", KeyringError::BadId),
            ("k1:AAAA", "k1", KeyringError::BadKey("k1".into())),
            (
                &format!("{good},{good}") as &str,
                "k1",
                KeyringError::Duplicate("k1".into()),
            ),
            (
                &good as &str,
                "k2",
                KeyringError::ActiveMissing("k2".into()),
            ),
        ];
        for (spec, active, expected) in cases {
            let err =
                Keyring::from_config(&SecretString::from(spec.to_owned()), active).unwrap_err();
            assert_eq!(err, expected, "{spec:?}");
            assert!(
                !err.to_string().contains(&good[3..]),
                "key material in an error"
            );
        }
    }

    #[test]
    fn a_kms_entry_is_unavailable_until_unlocked() {
        let local = entry("k1");
        let blob = BASE64.encode([7u8; 48]);
        let ring = ring(&[&local, &format!("k2:kms:{blob}")], "k2");
        assert!(ring.has_kms());
        assert_eq!(
            ring.entries(),
            vec![
                (MasterKeyId::parse("k1").unwrap(), Holder::Local),
                (MasterKeyId::parse("k2").unwrap(), Holder::Kms)
            ]
        );
        let ctx = context("ten_a", Mode::Test);
        assert_eq!(
            ring.seal(&ctx, b"secret"),
            Err(CryptoError::MasterKeyUnavailable("k2".into()))
        );
        assert!(ring.self_test().is_err());
        let k2 = MasterKeyId::parse("k2").unwrap();
        assert_eq!(ring.pending_kms(), vec![(k2.clone(), &[7u8; 48][..])]);
        ring.record_failure(&k2, "KMS is unreachable".into());
        assert_eq!(
            ring.unavailable(),
            vec![(k2.clone(), "KMS is unreachable".to_owned())]
        );
        ring.unlock(&k2, &[9u8; 32]).unwrap();
        assert!(ring.pending_kms().is_empty() && ring.unavailable().is_empty());
        let sealed = ring.seal(&ctx, b"secret").unwrap();
        assert_eq!(sealed.master_key_id, "k2");
        assert_eq!(ring.open(&ctx, &sealed).unwrap().as_slice(), b"secret");
        ring.self_test().unwrap();
        assert!(!format!("{ring:?}").contains(&blob));
        // Not a blob: refused with the id, never the text.
        let err =
            Keyring::from_config(&SecretString::from("k3:kms:!!!".to_owned()), "k3").unwrap_err();
        assert_eq!(err, KeyringError::BadKmsBlob("k3".into()));
    }

    #[test]
    fn self_test_passes_and_debug_hides_material() {
        let ring = keyring(&["k1", "k2"], "k2");
        ring.self_test().unwrap();
        assert_eq!(
            format!("{ring:?}"),
            r#"Keyring { ids: ["k1", "k2"], active: "k2" }"#
        );
    }
}
