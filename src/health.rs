//! What `/readyz` and the database-derived gauges of `/metrics` report, refreshed in the
//! background at most every `server.health_refresh_ms`: probes and scrapes read a snapshot
//! and never reach the database, however many arrive.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::crypto::{Keyring, MasterKeyId};
use crate::domain::ConnectionStatus;
use crate::store::Store;

/// Why a readiness check failed. The detail always goes to the log; it reaches the
/// unauthenticated caller only when `shown` (nothing secret, and actionable for ops).
#[derive(Clone, Debug)]
pub struct CheckFailure {
    pub detail: String,
    pub shown: bool,
}

/// The last look at the database and the keyring.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub database: Result<(), CheckFailure>,
    pub keyring: Result<(), CheckFailure>,
}

pub struct HealthMonitor {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    current: RwLock<Arc<Snapshot>>,
    /// Master keys with a gauge, so one that no longer seals anything drops to 0.
    gauged_keys: std::sync::Mutex<Vec<MasterKeyId>>,
}

impl HealthMonitor {
    /// Looks once, so that the first probe after start-up is already accurate.
    pub async fn start(store: Arc<dyn Store>, keyring: Arc<Keyring>) -> Arc<Self> {
        let unknown = CheckFailure {
            detail: "not checked yet".into(),
            shown: false,
        };
        let monitor = Arc::new(Self {
            store,
            keyring,
            current: RwLock::new(Arc::new(Snapshot {
                database: Err(unknown.clone()),
                keyring: Err(unknown),
            })),
            gauged_keys: Default::default(),
        });
        monitor.refresh().await;
        monitor
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Refreshes every `every` until `stop` turns true.
    pub fn spawn(
        self: Arc<Self>,
        every: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                let stopped = tokio::select! {
                    () = tokio::time::sleep(every) => false,
                    _ = stop.wait_for(|stopped| *stopped) => true,
                };
                if stopped {
                    return;
                }
                self.refresh().await;
            }
        })
    }

    /// Asks the database and the keyring once, and publishes what they said.
    pub async fn refresh(&self) {
        let started = std::time::Instant::now();
        let database = match self.store.check_ready().await {
            Ok(()) => Ok(()),
            Err(e) => Err(CheckFailure {
                detail: e.to_string(),
                shown: false,
            }),
        };
        let keyring = self.check_keyring().await;
        match self.store.count_connections_by_status().await {
            Ok(counts) => {
                for status in ConnectionStatus::ALL {
                    let n = (counts.iter())
                        .find(|(s, _)| *s == status)
                        .map_or(0, |(_, n)| *n);
                    metrics::gauge!("atlas_connections", "status" => status.as_str()).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "health: could not count connections"),
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) =
            Arc::new(Snapshot { database, keyring });
        // Every count it reads is maintained (a few rows however many tenants): this stays
        // flat as they grow, and `scripts/bench-scale` holds it to that.
        metrics::gauge!("atlas_health_refresh_seconds").set(started.elapsed().as_secs_f64());
    }

    /// The keyring opens what it seals, and holds every master key stored secrets name.
    /// Also sets the sealed-keys gauges (rewrap progress) from the same count.
    async fn check_keyring(&self) -> Result<(), CheckFailure> {
        // A KMS-held master key not decrypted yet: which, where, and why (no secret in it).
        let unavailable = self.keyring.unavailable();
        if !unavailable.is_empty() {
            let why: Vec<String> = unavailable.into_iter().map(|(_, why)| why).collect();
            return Err(CheckFailure {
                detail: format!("{}; retrying in the background", why.join("; ")),
                shown: true,
            });
        }
        self.keyring.self_test().map_err(|e| CheckFailure {
            detail: e.to_string(),
            shown: false,
        })?;
        // An unreachable database is the database check's to report.
        let Ok(counts) = self.store.count_secrets_by_master_key().await else {
            return Ok(());
        };
        self.gauge_sealed_keys(&counts);
        let unknown: Vec<&str> = (counts.iter())
            .map(|(id, _)| id)
            .filter(|id| !self.keyring.contains(id.as_str()))
            .map(MasterKeyId::as_str)
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        // Master-key ids are not secret and tell ops what to add back.
        Err(CheckFailure {
            detail: format!(
                "stored keys are sealed under master key {}, which the configuration lacks",
                unknown.join(", ")
            ),
            shown: true,
        })
    }

    fn gauge_sealed_keys(&self, counts: &[(MasterKeyId, u64)]) {
        let mut gauged = self.gauged_keys.lock().unwrap_or_else(|e| e.into_inner());
        for id in gauged.iter() {
            if !counts.iter().any(|(counted, _)| counted == id) {
                metrics::gauge!("atlas_sealed_keys", "master_key_id" => id.as_str().to_owned())
                    .set(0.0);
            }
        }
        for (id, n) in counts {
            metrics::gauge!("atlas_sealed_keys", "master_key_id" => id.as_str().to_owned())
                .set(*n as f64);
        }
        *gauged = counts.iter().map(|(id, _)| id.clone()).collect();
        // Rewrap progress in one figure: what is left under a master key other than the
        // active one (0 once `keys rewrap` is done).
        let remaining = crate::rotation::remaining(counts, self.keyring.active_id());
        metrics::gauge!("atlas_rewrap_remaining_secrets").set(remaining as f64);
    }
}
