//! Builds the application from settings: store, keyring, Stripe client, router, listener.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::accounting::KeyFetchRecorder;
use crate::auth::TenantTokens;
use crate::config::{redact_url, Settings};
use crate::connection::{ConnectPolicy, ConnectionService, Reverifier, VerifySchedule};
use crate::crypto::Fingerprinter;
use crate::domain::Resource;
use crate::health::HealthMonitor;
use crate::http::{self, AppState};
use crate::server::ServerLimits;
use crate::store::{self, Store};
use crate::stripe::{StripeClient, StripeClientConfig};

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    shutdown_grace: Duration,
    limits: ServerLimits,
    background: Vec<JoinHandle<()>>,
    stop_background: tokio::sync::watch::Sender<bool>,
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    use secrecy::ExposeSecret;
    let where_ = redact_url(settings.database.url.expose_secret());
    let store = store::connect(&settings.database)
        .await
        .with_context(|| format!("opening the database at {where_}"))?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!(database = %where_, backend = ?store.backend(), "database ready");
    Ok(store)
}

impl Application {
    /// Binds `server.bind` (port 0 in tests) and wires everything.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let secrets = settings.secrets()?;
        if let Some(path) = &secrets.generated_into {
            tracing::warn!(
                file = %path.display(),
                "USING DEVELOPMENT SECRETS (generated on first run). Never use them in production: \
                 set crypto.master_keys, crypto.active_key_id, crypto.fingerprint_key and \
                 auth.tenant_token_secret, and dev.generate_secrets = false"
            );
        }
        let store = open_store(settings).await?;
        let keyring = Arc::new(secrets.keyring);
        // KMS-held master keys are decrypted once, here. When KMS does not answer, the
        // service starts anyway, not ready, and keeps asking in the background.
        let kms = match settings.crypto.aws_kms.kms_config() {
            Some(config) if keyring.has_kms() => Some(crate::crypto::Kms::new(config).await),
            _ => None,
        };
        let mut kms_pending = false;
        if let Some(kms) = &kms {
            let started = std::time::Instant::now();
            let failures = crate::crypto::kms::unlock_pending(&keyring, kms).await;
            for e in &failures {
                crate::crypto::kms::log_failure(e, None);
            }
            kms_pending = !failures.is_empty();
            if kms_pending {
                tracing::error!(
                    kms_endpoint = %kms.config().endpoint(),
                    "NOT READY: a master key held by AWS KMS could not be decrypted; serving \
                     anyway (requests needing it answer 503) and retrying in the background"
                );
            } else {
                tracing::info!(
                    kms_endpoint = %kms.config().endpoint(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "AWS KMS decrypted the KMS-held master keys"
                );
            }
        }
        if !kms_pending {
            keyring.self_test().context("keyring self-test")?;
        }
        let stripe = StripeClient::new(StripeClientConfig::from_settings(&settings.stripe))
            .context("building the Stripe HTTP client")?;
        let required = settings
            .stripe
            .required_resources
            .iter()
            .map(|name| Resource::parse(name))
            .collect::<Result<Vec<_>, _>>()?;
        let attempts = NonZeroU32::new(settings.limits.connect_attempts_per_minute)
            .context("limits.connect_attempts_per_minute must be at least 1")?;
        let verifies = NonZeroU32::new(settings.limits.verify_attempts_per_minute)
            .context("limits.verify_attempts_per_minute must be at least 1")?;
        let connections = ConnectionService::new(
            store.clone(),
            keyring.clone(),
            stripe,
            Fingerprinter::new(secrets.fingerprint_key),
            ConnectPolicy {
                webhooks: settings.webhooks.clone(),
                required,
                probe_deadline: settings.stripe.probe_deadline(),
                schedule: VerifySchedule {
                    interval: Duration::from_secs(settings.reverify.interval_secs),
                    jitter: Duration::from_secs(settings.reverify.jitter_secs),
                    retry: Duration::from_secs(settings.reverify.retry_secs),
                },
                connect_attempts_per_minute: attempts,
                verify_attempts_per_minute: verifies,
            },
        );
        let connections = Arc::new(connections);
        // Connections verified before a resource became required are due now.
        let marked = store
            .mark_due_lacking(connections.required(), crate::clock::now())
            .await?;
        if marked > 0 {
            tracing::info!(
                connections = marked,
                "the required resources grew: re-verifying connections that lack one"
            );
        }
        let listener = TcpListener::bind(&settings.server.bind)
            .await
            .with_context(|| format!("binding {}", settings.server.bind))?;

        // Background work starts only once nothing else can fail.
        crate::telemetry::metrics();
        let (key_fetches, accounting) = KeyFetchRecorder::spawn(
            store.clone(),
            Duration::from_millis(settings.accounting.flush_interval_ms),
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let health = HealthMonitor::start(store.clone(), keyring.clone()).await;
        let refresh = Duration::from_millis(settings.server.health_refresh_ms);
        let mut background = vec![accounting, health.clone().spawn(refresh, stop_rx.clone())];
        if let (Some(kms), true) = (kms, kms_pending) {
            let max_backoff = Duration::from_millis(settings.crypto.aws_kms.retry_max_ms);
            background.push(crate::crypto::kms::spawn_retry(
                keyring.clone(),
                kms,
                max_backoff,
                stop_rx.clone(),
            ));
        }
        let service_tokens = Arc::new(crate::auth::ServiceTokenCache::default());
        if let Some(listener) = crate::store::spawn_token_listener(
            &settings.database,
            service_tokens.clone(),
            stop_rx.clone(),
        )? {
            background.push(listener);
        }
        background.extend(crate::notifications::spawn(
            &settings.notifications,
            &settings.database,
            store.clone(),
            stop_rx.clone(),
        )?);
        if settings.reverify.enabled {
            let reverifier = Reverifier::new(
                store.clone(),
                connections.clone(),
                settings.reverify.clone(),
            );
            tracing::info!(owner = reverifier.owner(), "background re-verification on");
            background.push(reverifier.spawn(stop_rx));
        }
        let state = AppState::new(crate::http::state::Shared {
            api_body_limit: settings.server.body_limit_bytes,
            webhook_tolerance_secs: settings.webhooks.tolerance_secs,
            webhook_body_limit: settings.webhooks.body_limit_bytes,
            key_fetches,
            service_tokens,
            store,
            keyring,
            tenant_tokens: Arc::new(TenantTokens::from_settings(
                &secrets.tenant_token_secret,
                &settings.auth,
            )),
            connections,
            health,
            proxy: crate::http::proxy::ProxyState::new(&settings.proxy)
                .map_err(|e| anyhow::anyhow!("proxy.allowed: {e}"))?,
            key_fetch_enabled: settings.internal.key_fetch_enabled,
        });
        Ok(Self {
            listener,
            router: http::router(
                state,
                &settings.server.cors_allowed_origins,
                Duration::from_millis(settings.server.body_read_timeout_ms),
            ),
            shutdown_grace: Duration::from_millis(settings.server.shutdown_grace_ms),
            limits: ServerLimits {
                header_read_timeout: Duration::from_millis(settings.server.header_read_timeout_ms),
                idle_timeout: Duration::from_millis(settings.server.idle_timeout_ms),
                max_connections: settings.server.max_connections,
            },
            background,
            stop_background: stop_tx,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish for at most
    /// the grace period.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let drained = crate::server::serve(
            self.listener,
            self.router,
            self.limits,
            shutdown,
            self.shutdown_grace,
        )
        .await;
        if !drained {
            tracing::warn!("shutdown grace period elapsed with requests still in flight");
        }
        // The router (and with it every sender) is gone: background writers flush and end,
        // and the re-verifier stops after the connection it is on.
        let _ = self.stop_background.send(true);
        for task in self.background {
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                tracing::error!("a background writer did not finish flushing in time");
            }
        }
        Ok(())
    }
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called, not when
/// it is first awaited: call it before the listener is bound, or a SIGTERM that comes as
/// soon as the port answers would still kill the process outright (exit 143, no drain).
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let (interrupt, terminate) = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        )
    };
    async move {
        #[cfg(unix)]
        {
            let wait = |registered: std::io::Result<tokio::signal::unix::Signal>| async move {
                match registered {
                    Ok(mut signal) => {
                        signal.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = wait(interrupt) => {},
                () = wait(terminate) => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
