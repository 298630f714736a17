//! Every value checked against a sensible range, and the production rules. A value its type
//! refuses never gets here (see `de`); what is left is ranges and how settings fit together.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use secrecy::ExposeSecret;

use super::public_url::{http_url_problem, public_base_url_problem};
use super::{Settings, SettingsError};

impl Settings {
    /// Checks every value against a sensible range, and the production rules. `load` calls
    /// it (and then also says which layer set a refused value).
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.check(&|_| None)
    }

    pub(super) fn check(
        &self,
        origin: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), SettingsError> {
        let problems = self.problems();
        if problems.0.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = problems
            .0
            .into_iter()
            .map(|(key, message)| match origin(&key) {
                Some(layer) => format!("{key} {message} (set in {layer})"),
                None => format!("{key} {message}"),
            })
            .collect();
        Err(SettingsError::Invalid(lines.join("; ")))
    }

    fn problems(&self) -> Problems {
        let mut p = Problems::default();
        self.server_problems(&mut p);
        self.database_problems(&mut p);
        self.stripe_problems(&mut p);
        self.auth_problems(&mut p);
        self.reverify_problems(&mut p);
        self.webhook_problems(&mut p);
        p.millis(
            "accounting.flush_interval_ms",
            self.accounting.flush_interval,
            1..=3_600_000,
        );
        p.range(
            "accounting.retention_days",
            self.accounting.retention_days,
            1..=3650,
        );
        self.proxy_problems(&mut p);
        for (key, problem) in self.notifications.problems(self.is_production()) {
            p.push(key, problem);
        }
        self.kms_problems(&mut p);
        self.dev_problems(&mut p);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            p.push("log.filter", format!("is not a log filter ({e})"));
        }
        p
    }

    fn server_problems(&self, p: &mut Problems) {
        let s = &self.server;
        p.range(
            "server.body_limit_bytes",
            s.body_limit_bytes,
            1024..=1 << 20,
        );
        p.millis("server.shutdown_grace_ms", s.shutdown_grace, 0..=300_000);
        p.millis(
            "server.header_read_timeout_ms",
            s.header_read_timeout,
            1..=300_000,
        );
        p.millis(
            "server.body_read_timeout_ms",
            s.body_read_timeout,
            1..=300_000,
        );
        p.millis("server.idle_timeout_ms", s.idle_timeout, 1..=3_600_000);
        p.range("server.max_connections", s.max_connections, 1..=100_000);
        p.range(
            "server.max_connections_per_peer",
            s.max_connections_per_peer,
            0..=s.max_connections,
        );
        // At most 4 GiB - 1: a reservation is counted in a semaphore's u32 permits.
        p.range(
            "server.inflight_body_bytes",
            s.inflight_body_bytes,
            1 << 20..=u32::MAX as usize,
        );
        // A declared length over the budget is then always over the route's limit too, and
        // refused 413 before a byte is read, never 503 (`crate::server::BodyBudget`).
        for (key, limit) in [
            ("server.body_limit_bytes", s.body_limit_bytes),
            ("webhooks.body_limit_bytes", self.webhooks.body_limit_bytes),
            ("proxy.body_limit_bytes", self.proxy.body_limit_bytes),
        ] {
            if limit > s.inflight_body_bytes {
                p.push(
                    "server.inflight_body_bytes",
                    format!("is below {key} ({limit}); give at least that"),
                );
            }
        }
        // Port 0 (tests) binds a free port for each: the same text is then no clash.
        let ops = s.ops_bind.trim();
        if !ops.is_empty() && ops == s.bind.trim() && !ops.ends_with(":0") {
            p.push(
                "server.ops_bind",
                "is server.bind; give another port, or leave it empty to serve probes on bind",
            );
        }
        p.millis("server.health_refresh_ms", s.health_refresh, 50..=3_600_000);
        if s.bind.trim().is_empty() {
            p.push("server.bind", "is empty; give host:port, e.g. 0.0.0.0:8080");
        }
    }

    fn database_problems(&self, p: &mut Problems) {
        let d = &self.database;
        p.range("database.max_connections", d.max_connections, 1..=1000);
        p.millis(
            "database.acquire_timeout_ms",
            d.acquire_timeout,
            1..=300_000,
        );
        let url = d.url.expose_secret();
        if !(url.starts_with("postgres://")
            || url.starts_with("postgresql://")
            || url.starts_with("sqlite:"))
        {
            p.push(
                "database.url",
                "must be a postgres:// (or postgresql://) or sqlite: URL",
            );
        }
    }

    fn stripe_problems(&self, p: &mut Problems) {
        let st = &self.stripe;
        if http_url_problem(&st.api_base).is_some() {
            p.push(
                "stripe.api_base",
                "must be an http(s) URL with a host and without query or fragment",
            );
        }
        if st.api_version.trim().is_empty() || st.api_version.contains(char::is_whitespace) {
            p.push(
                "stripe.api_version",
                "must be a Stripe API version, e.g. 2023-08-16",
            );
        }
        p.millis("stripe.connect_timeout_ms", st.connect_timeout, 1..=60_000);
        p.millis("stripe.request_timeout_ms", st.request_timeout, 1..=300_000);
        p.range("stripe.max_retries", st.max_retries, 0..=10);
        p.millis(
            "stripe.retry_base_delay_ms",
            st.retry_base_delay,
            1..=60_000,
        );
        p.millis(
            "stripe.retry_max_delay_ms",
            st.retry_max_delay,
            millis(st.retry_base_delay).max(1)..=300_000,
        );
        p.millis("stripe.probe_deadline_ms", st.probe_deadline, 1..=600_000);
        if st.required_resources.is_empty() {
            p.push("stripe.required_resources", "lists no resource");
        }
    }

    fn auth_problems(&self, p: &mut Problems) {
        let a = &self.auth;
        p.secs(
            "auth.tenant_token_leeway_secs",
            a.tenant_token_leeway,
            0..=300,
        );
        p.secs(
            "auth.tenant_token_max_ttl_secs",
            a.tenant_token_max_ttl,
            1..=86_400,
        );
        for (key, value) in [
            ("auth.tenant_token_issuer", &a.tenant_token_issuer),
            ("auth.tenant_token_audience", &a.tenant_token_audience),
        ] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                p.push(key, "is empty; leave it unset to not check the claim");
            }
        }
    }

    fn reverify_problems(&self, p: &mut Problems) {
        let r = &self.reverify;
        // Zero period and retry: due at every tick (tests use it).
        p.secs("reverify.period_secs", r.period, 0..=30 * 86_400);
        p.secs("reverify.jitter_secs", r.jitter, 0..=r.period.as_secs());
        p.secs("reverify.retry_secs", r.retry, 0..=86_400);
        p.millis("reverify.tick_ms", r.tick, 1..=3_600_000);
        p.range("reverify.batch", r.batch, 1..=10_000);
        p.range("reverify.concurrency", r.concurrency, 1..=256);
        // A lease must outlast the probe it covers, or a second process probes again.
        let min_lease = millis(self.stripe.probe_deadline).div_ceil(1000).max(1);
        p.secs("reverify.lease_secs", r.lease, min_lease..=86_400);
        let one_verification = u32::try_from(crate::connection::calls_per_verification(
            self.stripe.required_resources.len(),
        ))
        .unwrap_or(u32::MAX);
        p.range(
            "reverify.max_stripe_calls_per_second",
            r.max_stripe_calls_per_second.get(),
            one_verification..=10_000,
        );
    }

    fn webhook_problems(&self, p: &mut Problems) {
        let w = &self.webhooks;
        if let Some(problem) = public_base_url_problem(&w.public_base_url, self.is_production()) {
            p.push("webhooks.public_base_url", problem);
        }
        if w.enabled_events.is_empty() {
            p.push("webhooks.enabled_events", "lists no event");
        }
        if w.enabled_events
            .iter()
            .any(|e| e.contains(|c: char| !(c.is_ascii_alphanumeric() || "._*".contains(c))))
        {
            p.push(
                "webhooks.enabled_events",
                "must list Stripe event types, e.g. invoice.paid",
            );
        }
        p.secs("webhooks.tolerance_secs", w.tolerance, 1..=3600);
        p.secs(
            "webhooks.recovery_interval_secs",
            w.recovery_interval,
            10..=86_400,
        );
        // A sweep must come round before Stripe forgets an event (30 days), with room for
        // a run that Stripe leaves inconclusive for a while.
        p.secs(
            "webhooks.recovery_sweep_secs",
            w.recovery_sweep,
            w.recovery_interval.as_secs()..=25 * 86_400,
        );
        // Deleted events must be older than anything a recovery can list again (Stripe's 30
        // days), or a recovery would store them a second time as new.
        p.range("webhooks.retention_days", w.retention_days, 31..=3650);
        p.range(
            "webhooks.body_limit_bytes",
            w.body_limit_bytes,
            1024..=16 << 20,
        );
        // Up to 10 s: a lone delivery waits this long, so anything near it only makes
        // sense in a test that wants batches to close on their size alone.
        p.range("webhooks.batch_wait_us", w.batch_wait_us, 0..=10_000_000);
    }

    fn proxy_problems(&self, p: &mut Problems) {
        let x = &self.proxy;
        p.range("proxy.body_limit_bytes", x.body_limit_bytes, 1024..=1 << 20);
        p.millis("proxy.max_wait_ms", x.max_wait, 0..=60_000);
        p.millis("proxy.deadline_ms", x.deadline, 100..=120_000);
        let field = |f: &str| {
            !f.is_empty()
                && (f.split('.')).all(|part| {
                    !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                })
        };
        if let Some(bad) = x.expand_allowed.iter().find(|f| !field(f)) {
            p.push(
                "proxy.expand_allowed",
                format!("lists {bad:?}; give Stripe field paths such as customer or data.invoice"),
            );
        }
    }

    fn kms_problems(&self, p: &mut Problems) {
        let k = &self.crypto.aws_kms;
        if k.is_configured() {
            if k.region.trim().is_empty() {
                p.push(
                    "crypto.aws_kms.region",
                    "is empty while crypto.aws_kms.key_id is set: name the key's region",
                );
            }
            if k.key_id.trim().len() > 2048 || k.key_id.trim().contains(char::is_whitespace) {
                p.push(
                    "crypto.aws_kms.key_id",
                    "is not a KMS key id, key ARN, alias name or alias ARN",
                );
            }
        }
        if !k.region.is_empty()
            && !k
                .region
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            p.push(
                "crypto.aws_kms.region",
                "is not an AWS region name (e.g. eu-west-1)",
            );
        }
        if !k.endpoint_url.trim().is_empty() {
            match url::Url::parse(k.endpoint_url.trim()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.push(
                    "crypto.aws_kms.endpoint_url",
                    "is not an http(s) URL (leave it empty for AWS's own endpoint)",
                ),
            }
        }
        p.millis("crypto.aws_kms.retry_max_ms", k.retry_max, 100..=600_000);
    }

    fn dev_problems(&self, p: &mut Problems) {
        if !self.dev.generate_secrets {
            return;
        }
        if self.is_production() {
            p.push(
                "dev.generate_secrets",
                "= true is refused in production: production never generates development \
                 secrets; remove it and give every secret (crypto.master_keys, \
                 crypto.active_key_id, crypto.fingerprint_key, auth.tenant_token_secret)",
            );
        } else if self.dev.secrets_file.as_os_str().is_empty() {
            p.push("dev.secrets_file", "is empty");
        }
    }
}

/// A duration in whole milliseconds, as `_ms` settings are written (saturating: every
/// range checked here is far below `u64::MAX` ms).
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What `validate` found: (dotted key, what is wrong) pairs.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_owned(), message.into()));
    }

    fn range<T: PartialOrd + fmt::Display + Copy>(
        &mut self,
        key: &str,
        value: T,
        range: RangeInclusive<T>,
    ) {
        if !range.contains(&value) {
            self.push(
                key,
                format!("must be {} to {}, not {value}", range.start(), range.end()),
            );
        }
    }

    /// A `_ms` setting's range, in the setting's unit.
    fn millis(&mut self, key: &str, value: Duration, range: RangeInclusive<u64>) {
        self.range(key, millis(value), range);
    }

    /// A `_secs` setting's range, in the setting's unit.
    fn secs(&mut self, key: &str, value: Duration, range: RangeInclusive<u64>) {
        self.range(key, value.as_secs(), range);
    }
}
