//! Master-key rotation: re-wraps every data key under the active master key, in batches,
//! online. Each batch commits on its own and only rows still under their old master key are
//! rewritten, so a crash loses nothing and a rerun resumes where the last commit left off.

use crate::crypto::{Keyring, MasterKeyId, Purpose};
use crate::store::{RewrappedRow, Store, StoreError};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RewrapReport {
    pub rewrapped: u64,
    pub batches: u64,
    /// Secret ids that would not open (unknown master key, tampered row): left untouched.
    pub failed: Vec<(String, String)>,
}

/// Re-wraps up to `max_batches` batches (all when `None`) of `batch` secrets each: API
/// keys first, then webhook signing secrets.
pub async fn rewrap_all(
    store: &dyn Store,
    keyring: &Keyring,
    batch: i64,
    max_batches: Option<u64>,
) -> Result<RewrapReport, StoreError> {
    let mut report = RewrapReport::default();
    for purpose in [Purpose::StripeApiKey, Purpose::WebhookSigningSecret] {
        rewrap_purpose(store, keyring, purpose, batch, max_batches, &mut report).await?;
    }
    Ok(report)
}

async fn rewrap_purpose(
    store: &dyn Store,
    keyring: &Keyring,
    purpose: Purpose,
    batch: i64,
    max_batches: Option<u64>,
    report: &mut RewrapReport,
) -> Result<(), StoreError> {
    let active = keyring.active_id().as_str();
    let mut after = String::new();
    loop {
        if max_batches.is_some_and(|max| report.batches >= max) {
            break;
        }
        let rows = store
            .secrets_to_rewrap(purpose, active, &after, batch)
            .await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.context.secret_id.clone();
        let mut rewrapped = Vec::with_capacity(rows.len());
        for row in rows {
            match keyring.rewrap(&row.context, &row.sealed) {
                Ok(sealed) => rewrapped.push(RewrappedRow {
                    secret_id: row.context.secret_id,
                    previous_master_key_id: row.sealed.master_key_id,
                    sealed,
                }),
                Err(e) => {
                    metrics::counter!("atlas_rewrap_secrets_total", "result" => "failed")
                        .increment(1);
                    report.failed.push((row.context.secret_id, e.to_string()));
                }
            }
        }
        let written = store.replace_wrapped_keys(purpose, &rewrapped).await?;
        metrics::counter!("atlas_rewrap_secrets_total", "result" => "rewrapped").increment(written);
        report.rewrapped += written;
        report.batches += 1;
        tracing::info!(
            batch = report.batches,
            rewrapped = report.rewrapped,
            failed = report.failed.len(),
            "rewrap progress"
        );
    }
    Ok(())
}

/// Master-key ids that stored secrets name but the keyring lacks.
pub async fn unknown_master_keys(
    store: &dyn Store,
    keyring: &Keyring,
) -> Result<Vec<MasterKeyId>, StoreError> {
    Ok(store
        .count_secrets_by_master_key()
        .await?
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| !keyring.contains(id.as_str()))
        .collect())
}
