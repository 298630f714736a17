//! Builds the application from settings, in named steps: secrets, store, keyring (unlocked
//! through KMS when it holds master keys), the Stripe client and connection use cases, the
//! listener, the background workers, the router. Settings arrive typed: nothing here
//! parses or re-checks a value.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::accounting::KeyFetchRecorder;
use crate::auth::{ServiceTokenCache, ServiceTokens, TenantTokens};
use crate::config::{redact_url, Secrets, Settings};
use crate::connection::{ConnectPolicy, ConnectionService, KeyAccess, Reverifier, VerifySchedule};
use crate::crypto::{kms, Fingerprinter, Keyring, Kms};
use crate::health::HealthMonitor;
use crate::http::{self, AppState};
use crate::proxy::AccountSmoothing;
use crate::server::ServerLimits;
use crate::store::{self, Retained, Store};
use crate::stripe::{StripeClient, StripeClientConfig};
use crate::webhooks::recovery::{EventRecovery, RecoverySettings};

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    /// `server.ops_bind`'s listener and the probe routes, when set.
    ops: Option<(TcpListener, axum::Router)>,
    shutdown_grace: Duration,
    limits: ServerLimits,
    background: Vec<JoinHandle<()>>,
    stop_background: watch::Sender<bool>,
    service_token_cache: Arc<ServiceTokenCache>,
    connections: Arc<ConnectionService>,
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    let where_ = redact_url(settings.database.url.expose_secret());
    let store = store::connect(&settings.database)
        .await
        .with_context(|| format!("opening the database at {where_}"))?;
    store.migrate().await.context("applying migrations")?;
    tracing::info!(database = %where_, backend = ?store.backend(), "database ready");
    Ok(store)
}

/// The configured (or, in development, generated) secrets, warning loudly when generated.
pub fn secrets(settings: &Settings) -> anyhow::Result<Secrets> {
    let secrets = settings.secrets()?;
    if let Some(path) = &secrets.generated_into {
        tracing::warn!(
            file = %path.display(),
            "USING DEVELOPMENT SECRETS (generated on first run). Never use them in production: \
             set crypto.master_keys, crypto.active_key_id, crypto.fingerprint_key and \
             auth.tenant_token_secret, and dev.generate_secrets = false"
        );
    }
    Ok(secrets)
}

/// The keyring of the configured master keys, not unlocked yet.
pub fn keyring(settings: &Settings, secrets: &Secrets) -> anyhow::Result<Keyring> {
    let kms = settings.crypto.aws_kms.kms_config();
    kms::build_keyring(&secrets.master_keys, &secrets.active_key_id, kms.as_ref())
        .map_err(|e| anyhow::anyhow!("configuration: {e}"))
}

/// The keyring, its KMS-held master keys decrypted once. When KMS does not answer, the
/// service starts anyway, not ready, and `workers` keeps asking (the pending client).
async fn unlock(
    settings: &Settings,
    keyring: Keyring,
) -> anyhow::Result<(Arc<Keyring>, Option<Kms>)> {
    let keyring = Arc::new(keyring);
    let unlocked = kms::unlock(&keyring, settings.crypto.aws_kms.kms_config()).await;
    match unlocked.kms {
        Some(kms) if !unlocked.failures.is_empty() => {
            tracing::error!(
                kms_endpoint = %kms.config().endpoint(),
                "NOT READY: a master key held by AWS KMS could not be decrypted; serving \
                 anyway (requests needing it answer 503) and retrying in the background"
            );
            Ok((keyring, Some(kms)))
        }
        _ => {
            keyring.self_test().context("keyring self-test")?;
            Ok((keyring, None))
        }
    }
}

/// The Stripe client and the connection use cases over it; connections verified before a
/// resource became required are marked due.
async fn connections(
    settings: &Settings,
    store: &Arc<dyn Store>,
    keyring: &Arc<Keyring>,
    fingerprint_key: SecretString,
    recovery_due: &Arc<tokio::sync::Notify>,
    smoothing: &Arc<AccountSmoothing>,
) -> anyhow::Result<Arc<ConnectionService>> {
    let stripe = StripeClient::new(StripeClientConfig::from_settings(&settings.stripe))
        .context("building the Stripe HTTP client")?;
    let connections = Arc::new(ConnectionService::new(
        store.clone(),
        keyring.clone(),
        stripe,
        Fingerprinter::new(fingerprint_key),
        ConnectPolicy {
            webhooks: settings.webhooks.clone(),
            required: settings.stripe.required_resources.clone(),
            probe_deadline: settings.stripe.probe_deadline,
            schedule: VerifySchedule {
                period: settings.reverify.period,
                jitter: settings.reverify.jitter,
                retry: settings.reverify.retry,
            },
            connect_attempts_per_minute: settings.limits.connect_attempts_per_minute,
            verify_attempts_per_minute: settings.limits.verify_attempts_per_minute,
            recovery_due: recovery_due.clone(),
            pace: smoothing.clone(),
        },
    ));
    let marked = store
        .mark_due_lacking(connections.required(), crate::clock::now())
        .await?;
    if marked > 0 {
        tracing::info!(
            connections = marked,
            "the required resources grew: re-verifying connections that lack one"
        );
    }
    Ok(connections)
}

async fn listener(settings: &Settings) -> anyhow::Result<TcpListener> {
    TcpListener::bind(&settings.server.bind)
        .await
        .with_context(|| format!("binding {}", settings.server.bind))
}

/// `server.ops_bind`'s listener, when set.
async fn ops_listener(settings: &Settings) -> anyhow::Result<Option<TcpListener>> {
    let bind = settings.server.ops_bind.trim();
    if bind.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(bind)
        .await
        .with_context(|| format!("binding server.ops_bind {bind}"))?;
    Ok(Some(listener))
}

/// The probe listener's bounds: the public timeouts, and its own small cap. Probes and
/// scrapes are a handful of callers; idle sockets past the cap make room as on the public
/// port.
fn ops_limits(public: ServerLimits) -> ServerLimits {
    ServerLimits {
        max_connections: OPS_MAX_CONNECTIONS,
        max_connections_per_peer: 0,
        ..public
    }
}

const OPS_MAX_CONNECTIONS: usize = 64;

/// What the background workers share with the routes.
struct Workers {
    handles: Vec<JoinHandle<()>>,
    recovery: Arc<EventRecovery>,
    key_fetches: KeyFetchRecorder,
    health: Arc<HealthMonitor>,
    service_tokens: Arc<ServiceTokenCache>,
}

/// Each connected account's smoothed rate, shared by the proxy and the recovery of events.
fn smoothing(settings: &Settings) -> Arc<AccountSmoothing> {
    Arc::new(AccountSmoothing::new(
        settings.proxy.live_requests_per_second,
        settings.proxy.test_requests_per_second,
        settings.proxy.max_wait,
    ))
}

/// The recovery of missed events over the Stripe client, at the rate the proxy also takes
/// per account; `due` wakes it.
fn event_recovery(
    settings: &Settings,
    store: &Arc<dyn Store>,
    keyring: &Arc<Keyring>,
    connections: &ConnectionService,
    smoothing: &Arc<AccountSmoothing>,
    due: &Arc<tokio::sync::Notify>,
) -> Arc<EventRecovery> {
    Arc::new(EventRecovery::new(
        store.clone(),
        keyring.clone(),
        connections.stripe().clone(),
        smoothing.clone(),
        RecoverySettings {
            sweep: settings.webhooks.recovery_sweep,
            max_stripe_calls_per_second: Some(
                settings.webhooks.recovery_max_stripe_calls_per_second,
            ),
            ..RecoverySettings::new(
                settings.webhooks.recovery_interval,
                settings.webhooks.enabled_events.clone(),
            )
        },
        due.clone(),
    ))
}

/// Starts the background work: accounting, health snapshots, the KMS retry (when a master
/// key is still pending), the service-token listener, the re-verifier and the recovery of
/// missed events.
async fn workers(
    settings: &Settings,
    store: &Arc<dyn Store>,
    keyring: &Arc<Keyring>,
    pending_kms: Option<Kms>,
    connections: &Arc<ConnectionService>,
    recovery: &Arc<EventRecovery>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Workers> {
    crate::telemetry::metrics();
    let (key_fetches, accounting) =
        KeyFetchRecorder::spawn(store.clone(), settings.accounting.flush_interval);
    let health = HealthMonitor::start(store.clone(), keyring.clone()).await;
    let refresh = settings.server.health_refresh;
    let mut handles = vec![accounting, health.clone().spawn(refresh, stop.clone())];
    if let Some(kms) = pending_kms {
        handles.push(kms::spawn_retry(
            keyring.clone(),
            kms,
            settings.crypto.aws_kms.retry_max,
            stop.clone(),
        ));
    }
    let service_tokens = Arc::new(ServiceTokenCache::default());
    if let Some(listener) =
        store::spawn_token_listener(&settings.database, service_tokens.clone(), stop.clone())?
    {
        handles.push(listener);
    }
    handles.extend(crate::notifications::spawn(
        &settings.notifications,
        &settings.database,
        store.clone(),
        stop.clone(),
    )?);
    // Endpoints a disconnect could not delete from Stripe: always swept (cheap when none).
    handles.push(crate::connection::spawn_endpoint_cleanup(
        connections.clone(),
        stop.clone(),
    ));
    if settings.reverify.enabled {
        let reverifier = Reverifier::new(
            store.clone(),
            connections.clone(),
            settings.reverify.clone(),
        );
        tracing::info!(owner = reverifier.owner(), "background re-verification on");
        handles.push(reverifier.spawn(stop.clone()));
    }
    handles.push(crate::retention::spawn(
        store.clone(),
        vec![
            (Retained::Events, settings.webhooks.retention()),
            (Retained::KeyFetches, settings.accounting.retention()),
            (Retained::StripeCalls, settings.accounting.retention()),
        ],
        stop.clone(),
    ));
    if settings.webhooks.recovery_enabled {
        tracing::info!(owner = recovery.owner(), "recovery of missed events on");
        handles.push(recovery.clone().spawn(stop));
    }
    Ok(Workers {
        handles,
        recovery: recovery.clone(),
        key_fetches,
        health,
        service_tokens,
    })
}

/// The use cases the routes call, and the routes over them: the public ones, and the
/// probes alone when they have a listener of their own.
fn router(
    settings: &Settings,
    secrets: &Secrets,
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    connections: Arc<ConnectionService>,
    smoothing: Arc<AccountSmoothing>,
    workers: &Workers,
) -> (axum::Router, axum::Router) {
    let service_tokens = Arc::new(ServiceTokens::new(
        store.clone(),
        workers.service_tokens.clone(),
    ));
    let keys = Arc::new(KeyAccess::new(
        store.clone(),
        keyring.clone(),
        service_tokens.clone(),
        workers.key_fetches.clone(),
    ));
    let proxy = crate::proxy::Proxy::new(
        &settings.proxy,
        smoothing,
        keys.clone(),
        connections.clone(),
        store.clone(),
    );
    let webhooks = crate::webhooks::WebhookReceiver::new(
        store.clone(),
        keyring.clone(),
        // At most 3600 (validated), so it fits.
        i64::try_from(settings.webhooks.tolerance.as_secs()).unwrap_or(i64::MAX),
        crate::webhooks::BatchSettings {
            max_events: settings.webhooks.batch_max_events.get() as usize,
            wait: std::time::Duration::from_micros(settings.webhooks.batch_wait_us),
        },
    );
    let state = AppState::new(crate::http::state::Shared {
        api_body_limit: settings.server.body_limit_bytes,
        webhook_body_limit: settings.webhooks.body_limit_bytes,
        service_tokens,
        keys,
        webhooks: Arc::new(webhooks),
        store,
        keyring,
        tenant_tokens: Arc::new(TenantTokens::from_settings(
            &secrets.tenant_token_secret,
            &settings.auth,
        )),
        connections,
        health: workers.health.clone(),
        proxy: Arc::new(proxy),
        recovery: workers.recovery.clone(),
        key_fetch_enabled: settings.internal.key_fetch_enabled,
    });
    let ops_apart = !settings.server.ops_bind.trim().is_empty();
    let ops = http::ops_router(state.clone(), settings.server.body_read_timeout);
    let public = http::router(
        state,
        &settings.server.cors_allowed_origins,
        settings.server.body_read_timeout,
        crate::server::BodyBudget::new(settings.server.inflight_body_bytes),
        !ops_apart,
    );
    (public, ops)
}

impl Application {
    /// Binds `server.bind` (port 0 in tests) and wires everything, one step after another.
    pub async fn build(settings: &Settings) -> anyhow::Result<Self> {
        let secrets = secrets(settings)?;
        let keyring = keyring(settings, &secrets)?;
        let store = open_store(settings).await?;
        let (keyring, pending_kms) = unlock(settings, keyring).await?;
        let fingerprint_key = secrets.fingerprint_key.clone();
        // Rung by a repaired endpoint or a requested recovery; the recovery worker listens.
        let recovery_due = Arc::new(tokio::sync::Notify::new());
        let smoothing = smoothing(settings);
        let connections = connections(
            settings,
            &store,
            &keyring,
            fingerprint_key,
            &recovery_due,
            &smoothing,
        )
        .await?;
        let listener = listener(settings).await?;
        let ops_listener = ops_listener(settings).await?;
        // Background work starts only once nothing else can fail.
        let (stop_background, stop) = watch::channel(false);
        let recovery = event_recovery(
            settings,
            &store,
            &keyring,
            &connections,
            &smoothing,
            &recovery_due,
        );
        let workers = workers(
            settings,
            &store,
            &keyring,
            pending_kms,
            &connections,
            &recovery,
            stop,
        )
        .await?;
        let (router, ops_router) = router(
            settings,
            &secrets,
            store,
            keyring,
            connections.clone(),
            smoothing,
            &workers,
        );
        Ok(Self {
            listener,
            router,
            ops: ops_listener.map(|listener| (listener, ops_router)),
            shutdown_grace: settings.server.shutdown_grace,
            limits: ServerLimits {
                header_read_timeout: settings.server.header_read_timeout,
                idle_timeout: settings.server.idle_timeout,
                max_connections: settings.server.max_connections,
                max_connections_per_peer: settings.server.max_connections_per_peer,
            },
            background: workers.handles,
            stop_background,
            service_token_cache: workers.service_tokens,
            connections,
        })
    }

    /// The connection service, whose background sweeps a test runs by hand.
    pub fn connections(&self) -> Arc<ConnectionService> {
        self.connections.clone()
    }

    /// The service-token cache, whose own counts a test reads (the metric is per process).
    pub fn service_token_cache(&self) -> Arc<ServiceTokenCache> {
        self.service_token_cache.clone()
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// The port of `server.ops_bind`'s listener, when set (port 0 in tests).
    pub fn ops_port(&self) -> Option<u16> {
        let (listener, _) = self.ops.as_ref()?;
        listener.local_addr().ok().map(|a| a.port())
    }

    /// Serves until `shutdown` resolves, then lets in-flight requests finish for at most
    /// the grace period.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        // One signal, both listeners: the probes stop answering when the API does.
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let ops = self.ops.map(|(listener, router)| {
            tokio::spawn(crate::server::serve(
                listener,
                router,
                ops_limits(self.limits),
                stopped(stop_rx.clone()),
                self.shutdown_grace,
            ))
        });
        let drained = crate::server::serve(
            self.listener,
            self.router,
            self.limits,
            stopped(stop_rx),
            self.shutdown_grace,
        )
        .await;
        if let Some(ops) = ops {
            // Probes answer within milliseconds: draining them never outlasts the API's.
            let _ = ops.await;
        }
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
