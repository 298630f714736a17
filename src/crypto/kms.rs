//! Master keys held by AWS KMS: an `id:kms:<base64 ciphertext blob>` entry of
//! `crypto.master_keys` is a 256-bit data key KMS encrypted under `crypto.aws_kms.key_id`
//! with an encryption context naming this service and the master-key id. It is decrypted
//! once, at start-up (or by the background retry when KMS did not answer then), and held in
//! memory; sealing and opening never call KMS.
//!
//! Nothing here logs or formats a ciphertext blob, a plaintext or a credential: errors name
//! the master-key id, the KMS endpoint and what went wrong, nothing more.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_kms::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;
use aws_smithy_http_client::tls;
use zeroize::Zeroizing;

use super::keyring::{Holder, Keyring, KeyringError, MasterKeyId};

/// The `service` value of every encryption context (and of the IAM condition on it).
pub const SERVICE: &str = "atlas-stripe";

/// Where and under which key KMS is asked (`crypto.aws_kms`).
#[derive(Clone, Debug)]
pub struct KmsConfig {
    /// Key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    pub region: String,
    /// A KMS-compatible endpoint instead of AWS's (a local KMS in tests).
    pub endpoint_url: Option<String>,
}

impl KmsConfig {
    /// The endpoint in words for messages: the configured URL, or AWS's regional one.
    pub fn endpoint(&self) -> String {
        match &self.endpoint_url {
            Some(url) => url.clone(),
            None => format!("https://kms.{}.amazonaws.com", self.region),
        }
    }
}

/// The encryption context of a master key: binds the blob to this service and this id, so a
/// blob copied to another entry (or made for another service) does not decrypt.
pub fn encryption_context(id: &MasterKeyId) -> HashMap<String, String> {
    HashMap::from([
        ("service".to_owned(), SERVICE.to_owned()),
        ("master_key_id".to_owned(), id.as_str().to_owned()),
    ])
}

/// What went wrong asking KMS about one master key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KmsFailure {
    /// No answer: connection refused, DNS, TLS or a timeout.
    Unreachable,
    /// The standard AWS credential chain found no credentials.
    NoCredentials,
    /// KMS refused the caller: bad credentials, or no permission on the key.
    AccessDenied,
    /// The blob does not decrypt with this entry's encryption context: it was made for
    /// another master-key id or service, or it is not a KMS blob.
    WrongEncryptionContext,
    /// The blob was made under another KMS key than `crypto.aws_kms.key_id`.
    OtherKey,
    /// The KMS key is missing, disabled or pending deletion.
    KeyUnusable,
    /// KMS answered something else (its error code).
    Other(String),
}

impl KmsFailure {
    fn describe(&self) -> String {
        match self {
            Self::Unreachable => "KMS is unreachable".into(),
            Self::NoCredentials => {
                "no AWS credentials: the standard chain (variables, profile, web identity, ECS, \
                 instance metadata) found none"
                    .into()
            }
            Self::AccessDenied => {
                "KMS denied access (check the credentials, that the key policy or IAM policy \
                 allows kms:Decrypt and kms:GenerateDataKey on the key with the service \
                 encryption context, and that the blob was made under crypto.aws_kms.key_id in \
                 this region: some KMS servers report a blob of another KMS key this way)"
                    .into()
            }
            Self::WrongEncryptionContext => {
                "KMS refused the blob: it does not decrypt with the encryption context of this \
                 master-key id (made for another id or service, or not a KMS blob)"
                    .into()
            }
            Self::OtherKey => {
                "the blob was made under another KMS key than crypto.aws_kms.key_id".into()
            }
            Self::KeyUnusable => "the KMS key is missing, disabled or pending deletion".into(),
            Self::Other(code) => format!("KMS answered {code}"),
        }
    }
}

/// A KMS call about one master key failed. Display names the id, the endpoint and what went
/// wrong (it is shown by `/readyz`); never the blob, a plaintext or a credential. The KMS
/// key (an ARN names the account) goes to the log only.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("master key {master_key_id:?} (held by AWS KMS at {endpoint}): {}", .failure.describe())]
pub struct KmsError {
    pub master_key_id: String,
    pub endpoint: String,
    pub key_id: String,
    pub failure: KmsFailure,
    /// The SDK's own account of the error, for the log (error codes and transport errors;
    /// KMS never echoes a blob or a plaintext in them).
    pub cause: String,
}

/// A KMS client for `crypto.aws_kms`: the SDK on hyper + rustls with the ring provider.
#[derive(Clone)]
pub struct Kms {
    client: aws_sdk_kms::Client,
    config: KmsConfig,
}

impl fmt::Debug for Kms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kms").field("config", &self.config).finish()
    }
}

impl Kms {
    /// Resolves credentials lazily (the standard AWS chain); makes no call.
    pub async fn new(config: KmsConfig) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(aws_config::Region::new(config.region.clone()))
            .http_client(http)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .operation_timeout(Duration::from_secs(12))
                    .build(),
            )
            // The start-up retry backs off on its own; one SDK retry for a dropped packet.
            .retry_config(RetryConfig::standard().with_max_attempts(2));
        if let Some(url) = &config.endpoint_url {
            loader = loader.endpoint_url(url);
        }
        let sdk = loader.load().await;
        Self {
            client: aws_sdk_kms::Client::new(&sdk),
            config,
        }
    }

    pub fn config(&self) -> &KmsConfig {
        &self.config
    }

    /// The SDK client, for tools and tests that manage keys.
    pub fn client(&self) -> &aws_sdk_kms::Client {
        &self.client
    }

    fn error<E>(&self, id: &MasterKeyId, err: SdkError<E>) -> KmsError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let cause = aws_sdk_kms::error::DisplayErrorContext(&err).to_string();
        let failure = classify(&err, &cause);
        self.failure(id, failure, cause)
    }

    fn failure(&self, id: &MasterKeyId, failure: KmsFailure, cause: String) -> KmsError {
        KmsError {
            master_key_id: id.as_str().to_owned(),
            endpoint: self.config.endpoint(),
            key_id: self.config.key_id.clone(),
            failure,
            cause,
        }
    }

    /// `GenerateDataKey` (AES_256) under the configured key with `id`'s encryption context.
    /// Returns only the ciphertext blob: the plaintext is wiped unread.
    pub async fn generate_data_key(&self, id: &MasterKeyId) -> Result<Vec<u8>, KmsError> {
        let out = self
            .client
            .generate_data_key()
            .key_id(&self.config.key_id)
            .key_spec(DataKeySpec::Aes256)
            .set_encryption_context(Some(encryption_context(id)))
            .send()
            .await
            .map_err(|e| self.error(id, e))?;
        if let Some(plaintext) = out.plaintext {
            drop(Zeroizing::new(plaintext.into_inner()));
        }
        let blob = out.ciphertext_blob.map(Blob::into_inner);
        blob.filter(|b| !b.is_empty()).ok_or_else(|| {
            self.failure(
                id,
                KmsFailure::Other("no CiphertextBlob".into()),
                String::new(),
            )
        })
    }

    /// `Decrypt` of `id`'s blob with its encryption context, naming the configured key so a
    /// blob made under another key is refused. Returns the 32-byte master key.
    pub async fn decrypt(
        &self,
        id: &MasterKeyId,
        blob: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let out = self
            .client
            .decrypt()
            .key_id(&self.config.key_id)
            .ciphertext_blob(Blob::new(blob))
            .set_encryption_context(Some(encryption_context(id)))
            .send()
            .await
            .map_err(|e| self.error(id, e))?;
        let plaintext = Zeroizing::new(out.plaintext.map(Blob::into_inner).unwrap_or_default());
        // KMS refuses a blob of another key when KeyId is given (IncorrectKeyException);
        // checked here as well where the configured id is a key id or key ARN (an alias
        // would need kms:DescribeKey to resolve), since not every KMS-compatible server does.
        if let (Some(used), Some(want)) = (out.key_id.as_deref(), self.configured_key_uuid()) {
            if !used.ends_with(&format!("key/{want}")) && used != want {
                return Err(self.failure(id, KmsFailure::OtherKey, format!("KMS used {used}")));
            }
        }
        if plaintext.len() != 32 {
            return Err(self.failure(
                id,
                KmsFailure::Other("a data key that is not 32 bytes".into()),
                String::new(),
            ));
        }
        Ok(plaintext)
    }

    /// The key's id when `key_id` is a key id or key ARN; `None` for an alias.
    fn configured_key_uuid(&self) -> Option<&str> {
        let key_id = self.config.key_id.as_str();
        if key_id.starts_with("alias/") || key_id.contains(":alias/") {
            return None;
        }
        Some(key_id.rsplit_once(":key/").map_or(key_id, |(_, id)| id))
    }
}

/// What an SDK error means for the operator; `cause` is the SDK's account of it.
fn classify<E>(err: &SdkError<E>, cause: &str) -> KmsFailure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match err {
        SdkError::DispatchFailure(df)
            if !(df.is_io() || df.is_timeout()) && cause.contains("no credentials") =>
        {
            KmsFailure::NoCredentials
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => KmsFailure::Unreachable,
        SdkError::ConstructionFailure(_) => KmsFailure::AccessDenied,
        _ => match err.code() {
            Some(
                "AccessDeniedException"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "InvalidSignatureException"
                | "IncompleteSignature"
                | "ExpiredTokenException"
                | "MissingAuthenticationToken",
            ) => KmsFailure::AccessDenied,
            Some("InvalidCiphertextException") => KmsFailure::WrongEncryptionContext,
            Some("IncorrectKeyException") => KmsFailure::OtherKey,
            Some(
                "NotFoundException"
                | "DisabledException"
                | "KMSInvalidStateException"
                | "KeyUnavailableException",
            ) => KmsFailure::KeyUnusable,
            Some(code) => KmsFailure::Other(code.to_owned()),
            None => KmsFailure::Unreachable,
        },
    }
}

/// A new KMS-held master key in the configuration format: `id:kms:<base64 blob>`.
pub async fn generate_entry(
    kms: &Kms,
    id: &MasterKeyId,
) -> Result<secrecy::SecretString, KmsError> {
    use base64::Engine;
    let blob = kms.generate_data_key(id).await?;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&blob);
    Ok(secrecy::SecretString::from(format!(
        "{}:kms:{encoded}",
        id.as_str()
    )))
}

/// The service's keyring: [`Keyring::from_config`], refusing `id:kms:…` entries (naming
/// them) when KMS is not configured, since nothing could ever decrypt them.
pub fn build_keyring(
    master_keys: &secrecy::SecretString,
    active_key_id: &str,
    kms: Option<&KmsConfig>,
) -> Result<Keyring, KeyringError> {
    let keyring = Keyring::from_config(master_keys, active_key_id)?;
    if keyring.has_kms() && kms.is_none() {
        let ids: Vec<String> = (keyring.entries().into_iter())
            .filter(|(_, holder)| *holder == Holder::Kms)
            .map(|(id, _)| id.as_str().to_owned())
            .collect();
        return Err(KeyringError::KmsNotConfigured(ids.join(", ")));
    }
    Ok(keyring)
}

/// The KMS-held master keys after one round of decrypting them at start-up.
pub struct Unlocked {
    /// The client, when the keyring holds KMS entries and KMS is configured.
    pub kms: Option<Kms>,
    /// What could not be decrypted (already logged); empty when the keyring is complete.
    pub failures: Vec<KmsError>,
}

/// Decrypts the KMS-held master keys once, for the server and the command-line tools alike:
/// each failure is logged; the caller decides whether to wait (the server) or fail (tools).
pub async fn unlock(keyring: &Keyring, config: Option<KmsConfig>) -> Unlocked {
    let Some(config) = config.filter(|_| keyring.has_kms()) else {
        return Unlocked {
            kms: None,
            failures: Vec::new(),
        };
    };
    let kms = Kms::new(config).await;
    let started = std::time::Instant::now();
    let failures = unlock_pending(keyring, &kms).await;
    for e in &failures {
        log_failure(e, None);
    }
    if failures.is_empty() {
        tracing::info!(
            kms_endpoint = %kms.config().endpoint(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "AWS KMS decrypted the KMS-held master keys"
        );
    }
    Unlocked {
        kms: Some(kms),
        failures,
    }
}

/// Asks KMS to decrypt every KMS-held entry not decrypted yet and installs what it returns.
/// Each failure is recorded on the keyring (for `/readyz`) and returned (for the log).
pub async fn unlock_pending(keyring: &Keyring, kms: &Kms) -> Vec<KmsError> {
    let mut failures = Vec::new();
    for (id, blob) in keyring.pending_kms() {
        let outcome = match kms.decrypt(&id, blob).await {
            Ok(plaintext) => keyring.unlock(&id, &plaintext).map_err(|_| {
                kms.failure(
                    &id,
                    KmsFailure::Other("a data key that is not an AES-256 key".into()),
                    String::new(),
                )
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = outcome {
            keyring.record_failure(&id, e.to_string());
            failures.push(e);
        }
    }
    failures
}

/// Logs a failure of [`unlock_pending`]: the message, and the SDK's account of it.
pub fn log_failure(e: &KmsError, retry_in: Option<Duration>) {
    tracing::error!(
        master_key_id = %e.master_key_id,
        kms_endpoint = %e.endpoint,
        kms_key_id = %e.key_id,
        failure = ?e.failure,
        cause = %e.cause,
        retry_in_ms = retry_in.map(|d| d.as_millis() as u64),
        "{e}"
    );
}

/// Retries [`unlock_pending`] with exponential backoff (from 250 ms up to `max_backoff`)
/// until every KMS-held entry is decrypted or `stop` turns true.
pub fn spawn_retry(
    keyring: std::sync::Arc<Keyring>,
    kms: Kms,
    max_backoff: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = Duration::from_millis(250).min(max_backoff);
        loop {
            let stopped = tokio::select! {
                () = tokio::time::sleep(delay) => false,
                _ = stop.wait_for(|stopped| *stopped) => true,
            };
            if stopped {
                return;
            }
            delay = (delay * 2).min(max_backoff);
            // A shutdown does not wait for KMS to answer (or time out).
            let failures = tokio::select! {
                failures = unlock_pending(&keyring, &kms) => failures,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            for e in &failures {
                log_failure(e, Some(delay));
            }
            if failures.is_empty() {
                match keyring.self_test() {
                    Ok(()) => tracing::info!(
                        kms_endpoint = %kms.config().endpoint(),
                        "AWS KMS decrypted every KMS-held master key; the keyring is complete"
                    ),
                    Err(e) => tracing::error!(error = %e, "keyring self-test failed after KMS"),
                }
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_id_the_endpoint_and_the_failure() {
        let err = KmsError {
            master_key_id: "k2".into(),
            endpoint: "http://127.0.0.1:9".into(),
            key_id: "alias/atlas".into(),
            failure: KmsFailure::Unreachable,
            cause: "connection refused".into(),
        };
        let text = err.to_string();
        assert!(text.contains("\"k2\""), "{text}");
        assert!(text.contains("http://127.0.0.1:9"), "{text}");
        assert!(text.contains("unreachable"), "{text}");
        // The cause goes to the log on its own, not into the message.
        assert!(!text.contains("connection refused"), "{text}");
    }

    /// A `Decrypt` error as the SDK hands it over: KMS's error code, from a 400 answer.
    fn decrypt_error(code: &str) -> SdkError<aws_sdk_kms::operation::decrypt::DecryptError> {
        use aws_sdk_kms::error::ErrorMetadata;
        use aws_sdk_kms::operation::decrypt::DecryptError;
        let meta = ErrorMetadata::builder()
            .code(code)
            .message("refused")
            .build();
        let modeled = match code {
            "IncorrectKeyException" => DecryptError::IncorrectKeyException(
                aws_sdk_kms::types::error::IncorrectKeyException::builder()
                    .message("The key ID in the request does not identify a CMK that can perform this operation.")
                    .meta(meta)
                    .build(),
            ),
            "AccessDeniedException" => DecryptError::generic(meta),
            other => panic!("no such case here: {other}"),
        };
        let status = 400.try_into().expect("a status");
        let raw = aws_sdk_kms::config::http::HttpResponse::new(status, "{}".into());
        SdkError::service_error(modeled, raw)
    }

    /// AWS answers a blob of another KMS key with IncorrectKeyException, and a caller without
    /// permission with AccessDeniedException: each is named for what it is. (moto answers
    /// both with AccessDeniedException, so the API tests cannot tell them apart.)
    #[test]
    fn another_key_and_access_denied_are_told_apart() {
        let other_key = decrypt_error("IncorrectKeyException");
        assert_eq!(classify(&other_key, ""), KmsFailure::OtherKey);
        let denied = decrypt_error("AccessDeniedException");
        assert_eq!(classify(&denied, ""), KmsFailure::AccessDenied);
        assert!(KmsFailure::OtherKey
            .describe()
            .contains("made under another KMS key"));
    }

    #[test]
    fn a_kms_entry_needs_kms_configured() {
        use base64::Engine;
        use secrecy::{ExposeSecret, SecretString};
        let local = Keyring::generate_entry(&MasterKeyId::parse("k1").unwrap());
        let blob = base64::engine::general_purpose::STANDARD.encode([7u8; 48]);
        let both = SecretString::from(format!("{},k2:kms:{blob}", local.expose_secret()));
        let err = build_keyring(&both, "k1", None).unwrap_err();
        assert_eq!(err, KeyringError::KmsNotConfigured("k2".into()));
        assert!(
            err.to_string().contains("crypto.aws_kms.key_id is not set"),
            "{err}"
        );
        let kms = KmsConfig {
            key_id: "alias/atlas".into(),
            region: "eu-west-1".into(),
            endpoint_url: None,
        };
        assert!(build_keyring(&both, "k1", Some(&kms)).is_ok());
        assert!(build_keyring(&local, "k1", None).is_ok());
    }

    #[test]
    fn context_binds_service_and_id() {
        let ctx = encryption_context(&MasterKeyId::parse("k2").unwrap());
        assert_eq!(ctx["service"], "atlas-stripe");
        assert_eq!(ctx["master_key_id"], "k2");
        assert_eq!(ctx.len(), 2);
    }
}
