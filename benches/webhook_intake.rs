//! Webhook intake on PostgreSQL: 32 concurrent senders deliver signed Stripe events (one in
//! ten delivered twice), each stored durably before its 2xx.
//!
//! Run through `scripts/bench-webhooks`, which starts a throwaway PostgreSQL and sets
//! `ATLAS_TEST_POSTGRES_URL` (the bench works in a fresh database of its own there).
//! `TENANTS` (default 1) spreads the events over that many connected tenants (a batch of
//! deliveries spans them).
//!
//! `ATLAS_BENCH_QUICK=1` sends 4 × 20 events (plus redeliveries) and asserts the same, for
//! the test command.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Keyring, MasterKeyId, Purpose, SecretContext};
use atlas_stripe::domain::{
    random_id, Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId,
};
use atlas_stripe::startup::Application;
use atlas_stripe::store::{Actor, NewConnection, StoredState, StoredWebhook, WebhookChange};
use atlas_stripe::stripe::webhooks::sign;
use secrecy::ExposeSecret;

/// The service's allocator (src/main.rs), so the service in this process allocates as it
/// does in production (under glibc's, malloc and free were a tenth of the profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let quick = std::env::var_os("ATLAS_BENCH_QUICK").is_some_and(|v| v != "0");
    let (senders_n, per_sender): (usize, usize) = if quick { (4, 20) } else { (32, 500) };
    let admin =
        std::env::var("ATLAS_TEST_POSTGRES_URL").expect("run through scripts/bench-webhooks");
    // A database of its own, so the count of stored events is this run's alone.
    let name = random_id("bench_", 16).to_lowercase();
    {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to the cluster");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create the bench database");
    }
    let url = format!(
        "{}/{name}",
        admin.rsplit_once('/').expect("a URL with a database").0
    );
    let tenants: usize = std::env::var("TENANTS")
        .ok()
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let master = Keyring::generate_entry(&MasterKeyId::parse("bench").unwrap());
    let settings = Settings::load(
        None,
        &[
            ("server.bind", "127.0.0.1:0"),
            ("database.url", &url),
            ("database.max_connections", "32"),
            ("crypto.master_keys", master.expose_secret()),
            ("crypto.active_key_id", "bench"),
            ("crypto.fingerprint_key", &random_id("", 48)),
            ("auth.tenant_token_secret", &random_id("", 48)),
            ("dev.generate_secrets", "false"),
            ("reverify.enabled", "false"),
            ("log.filter", "warn"),
        ],
    )
    .expect("settings");
    let app = Application::build(&settings).await.expect("app");
    let base = format!("http://127.0.0.1:{}", app.port());
    tokio::spawn(app.run_until(std::future::pending()));

    let store = atlas_stripe::store::connect(&settings.database)
        .await
        .expect("store");
    let keyring = Keyring::from_config(&master, "bench").unwrap();
    let permissions: PermissionReport = Resource::ALL
        .iter()
        .map(|r| (*r, Access::Granted))
        .collect();
    let mut connections = Vec::new();
    for t in 0..tenants {
        let tenant = TenantId::parse(&format!("ten_wh{t}")).unwrap();
        store
            .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
            .await
            .unwrap();
        let secret = random_id("whsec_", 32);
        let (secret_id, webhook_secret_id) = (random_id("sec_", 20), random_id("whs_", 20));
        let context = |id: &str, purpose| SecretContext {
            secret_id: id.to_owned(),
            tenant_id: tenant.clone(),
            mode: Mode::Test,
            purpose,
        };
        let connection_id = random_id("con_", 20);
        let api_key = random_id("rk_test_", 99);
        store
            .save_connection(
                &NewConnection {
                    connection_id: connection_id.clone(),
                    expected: StoredState::Absent,
                    webhook: WebhookChange::Set(StoredWebhook {
                        endpoint_id: random_id("we_", 16),
                        sealed: keyring
                            .seal(
                                &context(&webhook_secret_id, Purpose::WebhookSigningSecret),
                                secret.as_bytes(),
                            )
                            .unwrap(),
                        secret_id: webhook_secret_id,
                    }),
                    tenant_id: tenant.clone(),
                    mode: Mode::Test,
                    key_type: KeyKind::Restricted,
                    key_last4: api_key[api_key.len() - 4..].to_owned(),
                    key_fingerprint: vec![0; 32],
                    sealed: keyring
                        .seal(
                            &context(&secret_id, Purpose::StripeApiKey),
                            api_key.as_bytes(),
                        )
                        .unwrap(),
                    secret_id,
                    status: ConnectionStatus::Active,
                    permissions: permissions.clone(),
                    warnings: Vec::new(),
                    verified_at: atlas_stripe::clock::now(),
                    next_verify_at: atlas_stripe::clock::now() + time::Duration::hours(6),
                },
                &Actor::Cli,
            )
            .await
            .unwrap();
        connections.push((connection_id, secret));
    }
    let connections = Arc::new(connections);

    // Every delivery is built and signed before the clock starts (Stripe's work, not ours),
    // so the senders in this process spend on the measured window only what sending costs.
    let t = time::OffsetDateTime::now_utc().unix_timestamp();
    let plans: Vec<(String, Vec<(String, String)>)> = (0..senders_n)
        .map(|s| {
            let (connection_id, secret) = &connections[s % connections.len()];
            let url = format!("{base}/webhooks/stripe/{connection_id}");
            let mut deliveries = Vec::with_capacity(per_sender + per_sender / 10);
            for i in 0..per_sender {
                let body = serde_json::json!({
                    "id": format!("evt_s{s}_{i}"), "object": "event", "type": "invoice.paid",
                    "created": 1_700_000_000, "livemode": false, "api_version": "2023-08-16",
                    "data": {"object": {"id": format!("in_{s}_{i}"), "object": "invoice", "amount_paid": 4200}},
                })
                .to_string();
                let signature = format!("t={t},v1={}", sign(secret.as_bytes(), t, body.as_bytes()));
                // One in ten is delivered twice, as Stripe redelivers.
                let times = if i % 10 == 0 { 2 } else { 1 };
                for _ in 0..times {
                    deliveries.push((signature.clone(), body.clone()));
                }
            }
            (url, deliveries)
        })
        .collect();

    let cpu_before = process_cpu();
    let (sent, elapsed, p50, p99, failures, client) = if quick {
        send_in_process(plans).await
    } else {
        send_with_wrk(plans, &base).await
    };
    let service_cpu = process_cpu() - cpu_before;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM webhook_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let unique = (senders_n * per_sender) as i64;
    println!(
        "webhook intake{}, {senders_n} senders ({client}), {tenants} tenant(s): {sent} deliveries in {:.2} s = {:.0} deliveries/s; \
         p50 {:.1} ms, p99 {:.1} ms; non-2xx {failures}; stored {stored} of {unique} unique events{}; \
         service CPU {:.0} us per delivery",
        if quick { " (quick mode)" } else { "" },
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64(),
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0,
        if stored == unique { " (exact)" } else { " (MISMATCH)" },
        service_cpu.as_secs_f64() * 1e6 / sent as f64,
    );
    assert_eq!(stored, unique, "every unique event stored exactly once");
    assert_eq!(failures, 0);
}

/// What sending took: (deliveries sent, wall time, p50, p99, non-2xx, the load generator).
type Sent = (usize, Duration, Duration, Duration, usize, &'static str);

/// The quick mode's senders: reqwest in this process (the test command has no wrk yet).
async fn send_in_process(plans: Vec<(String, Vec<(String, String)>)>) -> Sent {
    let http = reqwest::Client::new();
    let started = Instant::now();
    let senders = plans.into_iter().map(|(url, deliveries)| {
        let http = http.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(deliveries.len());
            let mut failures = 0;
            for (signature, body) in deliveries {
                let sent = Instant::now();
                let response = http
                    .post(&url)
                    .header("stripe-signature", signature)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                latencies.push(sent.elapsed());
                if !response.map(|r| r.status().is_success()).unwrap_or(false) {
                    failures += 1;
                }
            }
            (latencies, failures)
        })
    });
    let mut latencies: Vec<Duration> = Vec::new();
    let mut failures = 0;
    for sender in futures_util::future::join_all(senders).await {
        let (l, f) = sender.unwrap();
        latencies.extend(l);
        failures += f;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    (
        latencies.len(),
        elapsed,
        at(0.5),
        at(0.99),
        failures,
        "reqwest, in process",
    )
}

/// The full run's senders: wrk, a process of its own (the floor's pgbench is one too), with
/// one connection per sender, each delivery sent once (scripts/bench/webhook-deliveries.lua).
async fn send_with_wrk(plans: Vec<(String, Vec<(String, String)>)>, base: &str) -> Sent {
    use std::fmt::Write;
    let connections = plans.len();
    let total: usize = plans.iter().map(|(_, d)| d.len()).sum();
    let mut lines = String::new();
    // Interleaved, so that each of wrk's threads takes every sender's deliveries in turn.
    let longest = plans.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
    for i in 0..longest {
        for (url, deliveries) in &plans {
            if let Some((signature, body)) = deliveries.get(i) {
                let path = url.strip_prefix(base).expect("a URL of the service");
                writeln!(lines, "{path}\t{signature}\t{body}").unwrap();
            }
        }
    }
    let file = std::env::temp_dir().join(format!("deliveries-{}.tsv", std::process::id()));
    std::fs::write(&file, lines).expect("write the deliveries");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/bench/webhook-deliveries.lua"
    );
    let threads = 2;
    // Each thread leaves `<done>N` once every delivery of its share is answered.
    let done = std::env::temp_dir().join(format!("deliveries-{}.done", std::process::id()));
    let marks: Vec<std::path::PathBuf> = (0..threads)
        .map(|t| std::path::PathBuf::from(format!("{}{t}", done.display())))
        .collect();
    let mut wrk = std::process::Command::new("wrk");
    wrk.args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", "120s", "--latency", "-s", script, base])
        .env("DELIVERIES", &file)
        .env("THREADS", threads.to_string())
        .env("DONE", &done)
        .stdout(std::process::Stdio::piped());
    let output = tokio::task::spawn_blocking(move || {
        let child = wrk
            .spawn()
            .expect("wrk (scripts/bench-webhooks installs it)");
        // wrk's main thread sleeps out -d whatever its threads do: once every thread is
        // done, SIGINT makes it print its figures for the time it ran.
        let started = Instant::now();
        while !marks.iter().all(|m| m.exists()) && started.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::process::Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let output = child.wait_with_output();
        for m in &marks {
            let _ = std::fs::remove_file(m);
        }
        output
    })
    .await
    .unwrap()
    .expect("wrk's output");
    let _ = std::fs::remove_file(&file);
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let (sent, seconds) = out
        .lines()
        .find_map(|l| {
            let (n, rest) = l.trim().split_once(" requests in ")?;
            Some((n.parse::<usize>().ok()?, rest.split(',').next()?.to_owned()))
        })
        .unwrap_or_else(|| panic!("wrk's summary: {out}"));
    let latency = |q: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(q).map(|v| parse_latency(v.trim())))
            .unwrap_or_else(|| panic!("wrk's {q} latency: {out}"))
    };
    let failures = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .map_or(0, |n| n.trim().parse().unwrap());
    assert!(sent >= total, "wrk sent {sent} of {total}");
    (
        sent,
        parse_latency(&seconds),
        latency("50%"),
        latency("99%"),
        failures,
        "wrk, its own process",
    )
}

/// wrk's durations: 950.00us, 4.10ms, 1.02s, 2.50s.
fn parse_latency(text: &str) -> Duration {
    let (number, unit) = text.split_at(
        text.find(|c: char| c.is_ascii_alphabetic())
            .expect("a unit"),
    );
    let value: f64 = number.parse().expect("a number");
    Duration::from_secs_f64(match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        other => panic!("wrk unit {other}"),
    })
}

/// This process's CPU time so far (user + system), from /proc.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_secs_f64(ticks as f64 / 100.0)
}
