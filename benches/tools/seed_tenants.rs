//! Benchmark set-up, not part of the product: seeds connected tenants `ten_<from>` to
//! `ten_<tenants - 1>` and prints a `keys:read` service token. Reads the same configuration
//! as the service (`ATLAS_STRIPE__…` variables), applies the migrations first, and writes
//! what the service would have written for each tenant:
//!
//! - the tenant, and its connection with a random restricted key and a webhook signing
//!   secret, each sealed under the configured active master key (real envelopes: the
//!   service opens them), re-verification spread over the next 7 days;
//! - its recovery cursor and its announcement sequence;
//! - `--events` stored webhook events (default 2), `--usage` key-fetch tallies (default 2)
//!   and one proxied-call tally, and two audit records (created, connected).
//!
//! PostgreSQL takes each table by `COPY`, chunks of 10,000 tenants, three chunks at once (a
//! million tenants in minutes); SQLite takes batched multi-row `INSERT`s, a transaction per
//! chunk. The maintained counts are kept by the database's own triggers either way.
//!
//! `cargo run --release --example seed-tenants -- --tenants 1000000 [--from 10000]`

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::Context;
use atlas_stripe::auth::{IssuedServiceToken, Scope};
use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Fingerprinter, Keyring, SealedSecret, SecretContext};
use atlas_stripe::domain::{random_id, Access, Mode, PermissionReport, Resource, TenantId};
use atlas_stripe::startup::open_store;
use atlas_stripe::store::{Actor, NewServiceToken};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use rand::Rng;
use secrecy::ExposeSecret;
use sqlx::{PgPool, QueryBuilder, Sqlite, SqlitePool};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Tenants per chunk: one COPY per table, or one SQLite transaction.
const CHUNK: usize = 10_000;
/// Rows per SQLite INSERT (well under SQLite's bound-parameter limit).
const SQLITE_ROWS: usize = 400;

struct Args {
    from: usize,
    tenants: usize,
    events: usize,
    usage: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let args: Vec<String> = std::env::args().collect();
    let number = |name: &str, default: usize| -> anyhow::Result<usize> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .with_context(|| format!("{name} takes a number"))?
                .parse()?),
            None => Ok(default),
        }
    };
    Ok(Args {
        from: number("--from", 0)?,
        tenants: number("--tenants", 10_000)?,
        events: number("--events", 2)?,
        usage: number("--usage", 2)?,
    })
}

/// What one seeded tenant holds.
struct Tenant {
    id: String,
    connection_id: String,
    secret_id: String,
    key_last4: String,
    fingerprint: Vec<u8>,
    sealed: SealedSecret,
    endpoint_id: String,
    webhook_secret_id: String,
    webhook_sealed: SealedSecret,
    next_verify_at: OffsetDateTime,
    recovery_due_at: OffsetDateTime,
}

/// Everything the rows are made from, shared by the chunks.
struct Seeder {
    keyring: Keyring,
    fingerprinter: Fingerprinter,
    permissions: String,
    token_id: String,
    now: OffsetDateTime,
    events: usize,
    usage: usize,
}

impl Seeder {
    fn tenant(&self, i: usize) -> anyhow::Result<Tenant> {
        let mut rng = rand::thread_rng();
        let id = format!("ten_{i}");
        let tenant = TenantId::parse(&id)?;
        let api_key = random_id("rk_test_", 99);
        let secret_id = random_id("sec_", 20);
        let context = SecretContext::api_key(&secret_id, &tenant, Mode::Test);
        let webhook_secret_id = random_id("whs_", 20);
        let webhook_context =
            SecretContext::webhook_secret(&webhook_secret_id, &tenant, Mode::Test);
        let week = 7 * 24 * 3600;
        Ok(Tenant {
            connection_id: random_id("con_", 20),
            key_last4: api_key[api_key.len() - 4..].to_owned(),
            fingerprint: self.fingerprinter.fingerprint(&api_key),
            sealed: self.keyring.seal(&context, api_key.as_bytes())?,
            secret_id,
            endpoint_id: random_id("we_", 24),
            webhook_sealed: self
                .keyring
                .seal(&webhook_context, random_id("whsec_", 32).as_bytes())?,
            webhook_secret_id,
            next_verify_at: self.now + time::Duration::seconds(rng.gen_range(60..week)),
            recovery_due_at: self.now + time::Duration::seconds(rng.gen_range(60..24 * 3600)),
            id,
        })
    }

    fn event_payload(&self, tenant: &Tenant, event_id: &str, created: i64) -> String {
        // About the size of a small Stripe event (a customer.updated), no secret in it.
        format!(
            r#"{{"id":"{event_id}","object":"event","api_version":"2024-06-20","created":{created},"type":"customer.updated","livemode":false,"pending_webhooks":0,"request":{{"id":null,"idempotency_key":null}},"data":{{"object":{{"id":"cus_{}","object":"customer","email":"{}@example.com","metadata":{{"atlas_tenant":"{}"}},"balance":0,"currency":"usd","delinquent":false,"description":"seeded by benches/tools/seed_tenants.rs"}}}}}}"#,
            &tenant.connection_id[4..],
            tenant.id,
            tenant.id
        )
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let settings = Settings::load(None, &[])?;
    let store = open_store(&settings).await?;
    let secrets = settings.secrets()?;
    let permissions: PermissionReport = Resource::ALL
        .iter()
        .map(|r| (*r, Access::Granted))
        .collect();
    let issued = IssuedServiceToken::generate();
    let token = NewServiceToken {
        id: issued.id.clone(),
        name: "bench".into(),
        scopes: [Scope::KeysRead].into(),
        hash: issued.hash,
    };
    store.insert_service_token(&token, &Actor::Cli).await?;
    let seeder = Arc::new(Seeder {
        keyring: atlas_stripe::startup::keyring(&settings, &secrets)?,
        fingerprinter: Fingerprinter::new(secrets.fingerprint_key.clone()),
        permissions: serde_json::to_string(&permissions)?,
        token_id: issued.id.clone(),
        now: atlas_stripe::clock::now(),
        events: args.events,
        usage: args.usage,
    });
    let url = settings.database.url.expose_secret().to_owned();
    let chunks: Vec<(usize, usize)> = (args.from..args.tenants)
        .step_by(CHUNK)
        .map(|start| (start, (start + CHUNK).min(args.tenants)))
        .collect();
    let started = std::time::Instant::now();
    if url.starts_with("postgres") {
        let pool = PgPool::connect(&url).await?;
        stream::iter(chunks)
            .map(|(start, end)| {
                let (seeder, pool) = (seeder.clone(), pool.clone());
                // A task each: sealing and formatting use both cores while PostgreSQL copies.
                async move { tokio::spawn(copy_chunk(seeder, pool, start, end)).await? }
            })
            .buffer_unordered(3)
            .try_collect::<Vec<()>>()
            .await?;
    } else {
        let pool = SqlitePool::connect(&url).await?;
        for (start, end) in chunks {
            insert_chunk(&seeder, &pool, start, end).await?;
        }
    }
    // Start-up marks connections due when the required resources grew; recorded here once,
    // as the service's first start would, so that a measured start is a steady-state one.
    store
        .mark_due_lacking(&settings.stripe.required_resources, seeder.now)
        .await?;
    eprintln!(
        "seeded tenants {} to {} in {:.1} s",
        args.from,
        args.tenants,
        started.elapsed().as_secs_f64()
    );
    println!("{}", issued.plaintext.expose_secret());
    Ok(())
}

fn timestamp(at: OffsetDateTime) -> anyhow::Result<String> {
    Ok(at.format(&Rfc3339)?)
}

/// `bytea` in COPY's text format: `\x` and hex, its backslash escaped.
fn bytea(bytes: &[u8]) -> String {
    format!("\\\\x{}", hex::encode(bytes))
}

/// One chunk of tenants into PostgreSQL, a COPY per table.
async fn copy_chunk(
    seeder: Arc<Seeder>,
    pool: PgPool,
    start: usize,
    end: usize,
) -> anyhow::Result<()> {
    let tenants: Vec<Tenant> = (start..end)
        .map(|i| seeder.tenant(i))
        .collect::<anyhow::Result<_>>()?;
    let now = timestamp(seeder.now)?;
    let [mut t, mut c, mut r, mut n, mut a, mut e, mut k, mut s] =
        std::array::from_fn::<String, 8, _>(|_| String::new());
    for (offset, tenant) in tenants.iter().enumerate() {
        let tid = &tenant.id;
        writeln!(t, "{tid}\ttest\t{now}\t{now}")?;
        writeln!(
            c,
            "{tid}\t{}\t{}\t{}\t{}\t{}\tactive\ttest\trestricted\t{}\t{}\t{}\t[]\t{now}\t{now}\t{now}\t{}\t{}\t{}\t{}\t{}\t{}",
            tenant.connection_id,
            tenant.secret_id,
            tenant.sealed.master_key_id,
            bytea(&tenant.sealed.wrapped_key),
            bytea(&tenant.sealed.ciphertext),
            tenant.key_last4,
            bytea(&tenant.fingerprint),
            seeder.permissions,
            timestamp(tenant.next_verify_at)?,
            tenant.endpoint_id,
            tenant.webhook_secret_id,
            tenant.webhook_sealed.master_key_id,
            bytea(&tenant.webhook_sealed.wrapped_key),
            bytea(&tenant.webhook_sealed.ciphertext),
        )?;
        writeln!(
            r,
            "{}\t{tid}\ttest\t{now}\t{}",
            tenant.connection_id,
            timestamp(tenant.recovery_due_at)?
        )?;
        writeln!(n, "{tid}\t0\tactive")?;
        writeln!(
            a,
            "{now}\tcli\ttenant.created\t{tid}\t{{\"mode\":\"test\"}}"
        )?;
        writeln!(
            a,
            "{now}\tcli\tconnection.created\t{tid}\t{{\"connection_id\":\"{}\",\"key_last4\":\"{}\"}}",
            tenant.connection_id, tenant.key_last4
        )?;
        for j in 0..seeder.events {
            let event_id = random_id("evt_", 24);
            let created = seeder.now.unix_timestamp() - (j as i64 + 1) * 600;
            // txid 1: older than any running transaction, so the feed shows them at once.
            let seq = ((start + offset) * seeder.events + j) as i64;
            writeln!(
                e,
                "{tid}\t1\t{seq}\t{}\t{event_id}\tcustomer.updated\t{created}\tf\t{now}\t{}\twebhook",
                tenant.connection_id,
                seeder.event_payload(tenant, &event_id, created)
            )?;
        }
        for j in 0..seeder.usage {
            let window = timestamp(seeder.now - time::Duration::minutes(j as i64 + 1))?;
            writeln!(k, "{}\t{tid}\t{window}\t3\t{window}", seeder.token_id)?;
        }
        writeln!(s, "{}\t{tid}\t{now}\t1\t{now}", seeder.token_id)?;
    }
    let mut conn = pool.acquire().await?;
    for (table, rows) in [
        ("tenants (tenant_id, mode, created_at, updated_at)", t),
        (
            "stripe_connections (tenant_id, connection_id, api_key_secret_id, master_key_id, \
             wrapped_key, ciphertext, status, mode, key_type, key_last4, key_fingerprint, \
             permissions, warnings, verified_at, connected_at, updated_at, next_verify_at, \
             webhook_endpoint_id, webhook_secret_id, webhook_master_key_id, \
             webhook_wrapped_key, webhook_ciphertext)",
            c,
        ),
        (
            "recovery_cursors (connection_id, tenant_id, mode, recovered_through, due_at)",
            r,
        ),
        (
            "notification_tenants (tenant_id, seq, connection_status)",
            n,
        ),
        (
            "audit_events (occurred_at, actor, action, tenant_id, detail)",
            a,
        ),
        (
            "webhook_events (tenant_id, txid, seq, connection_id, event_id, event_type, \
             created, livemode, received_at, payload, source)",
            e,
        ),
        (
            "key_fetches (token_id, tenant_id, window_start, fetch_count, last_fetched_at)",
            k,
        ),
        (
            "stripe_calls (token_id, tenant_id, window_start, call_count, last_called_at)",
            s,
        ),
    ] {
        let mut copy = conn
            .copy_in_raw(&format!("COPY {table} FROM STDIN"))
            .await?;
        copy.send(rows.into_bytes()).await?;
        copy.finish().await?;
    }
    Ok(())
}

/// One chunk of tenants into SQLite: multi-row INSERTs in one transaction.
async fn insert_chunk(
    seeder: &Seeder,
    pool: &SqlitePool,
    start: usize,
    end: usize,
) -> anyhow::Result<()> {
    let tenants: Vec<Tenant> = (start..end)
        .map(|i| seeder.tenant(i))
        .collect::<anyhow::Result<_>>()?;
    let now = seeder.now;
    let mut tx = pool.begin().await?;
    for part in tenants.chunks(SQLITE_ROWS) {
        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO tenants (tenant_id, mode, created_at, updated_at, event_seq) ",
        );
        q.push_values(part, |mut b, t| {
            b.push_bind(&t.id)
                .push_bind("test")
                .push_bind(now)
                .push_bind(now)
                .push_bind(seeder.events as i64);
        });
        q.build().execute(&mut *tx).await?;

        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO stripe_connections (tenant_id, connection_id, api_key_secret_id, \
             master_key_id, wrapped_key, ciphertext, status, mode, key_type, key_last4, \
             key_fingerprint, permissions, warnings, verified_at, connected_at, updated_at, \
             next_verify_at, webhook_endpoint_id, webhook_secret_id, webhook_master_key_id, \
             webhook_wrapped_key, webhook_ciphertext) ",
        );
        q.push_values(part, |mut b, t| {
            b.push_bind(&t.id)
                .push_bind(&t.connection_id)
                .push_bind(&t.secret_id)
                .push_bind(&t.sealed.master_key_id)
                .push_bind(&t.sealed.wrapped_key)
                .push_bind(&t.sealed.ciphertext)
                .push_bind("active")
                .push_bind("test")
                .push_bind("restricted")
                .push_bind(&t.key_last4)
                .push_bind(&t.fingerprint)
                .push_bind(&seeder.permissions)
                .push_bind("[]")
                .push_bind(now)
                .push_bind(now)
                .push_bind(now)
                .push_bind(t.next_verify_at)
                .push_bind(&t.endpoint_id)
                .push_bind(&t.webhook_secret_id)
                .push_bind(&t.webhook_sealed.master_key_id)
                .push_bind(&t.webhook_sealed.wrapped_key)
                .push_bind(&t.webhook_sealed.ciphertext);
        });
        q.build().execute(&mut *tx).await?;

        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO recovery_cursors (connection_id, tenant_id, mode, recovered_through, \
             due_at) ",
        );
        q.push_values(part, |mut b, t| {
            b.push_bind(&t.connection_id)
                .push_bind(&t.id)
                .push_bind("test")
                .push_bind(now)
                .push_bind(t.recovery_due_at);
        });
        q.build().execute(&mut *tx).await?;

        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO notification_tenants (tenant_id, seq, connection_status) ",
        );
        q.push_values(part, |mut b, t| {
            b.push_bind(&t.id).push_bind(0_i64).push_bind("active");
        });
        q.build().execute(&mut *tx).await?;

        let mut q = QueryBuilder::<Sqlite>::new(
            "INSERT INTO audit_events (occurred_at, actor, action, tenant_id, detail) ",
        );
        q.push_values(part, |mut b, t| {
            b.push_bind(now)
                .push_bind("cli")
                .push_bind("connection.created")
                .push_bind(&t.id)
                .push_bind(format!(
                    "{{\"connection_id\":\"{}\",\"key_last4\":\"{}\"}}",
                    t.connection_id, t.key_last4
                ));
        });
        q.build().execute(&mut *tx).await?;

        for j in 0..seeder.events {
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO webhook_events (tenant_id, txid, seq, connection_id, event_id, \
                 event_type, created, livemode, received_at, payload, source) ",
            );
            q.push_values(part, |mut b, t| {
                let event_id = random_id("evt_", 24);
                let created = now.unix_timestamp() - (j as i64 + 1) * 600;
                let payload = seeder.event_payload(t, &event_id, created);
                b.push_bind(&t.id)
                    .push_bind(0_i64)
                    .push_bind(j as i64 + 1)
                    .push_bind(&t.connection_id)
                    .push_bind(event_id)
                    .push_bind("customer.updated")
                    .push_bind(created)
                    .push_bind(false)
                    .push_bind(now)
                    .push_bind(payload)
                    .push_bind("webhook");
            });
            q.build().execute(&mut *tx).await?;
        }
        for j in 0..seeder.usage {
            let window = now - time::Duration::minutes(j as i64 + 1);
            let mut q = QueryBuilder::<Sqlite>::new(
                "INSERT INTO key_fetches (token_id, tenant_id, window_start, fetch_count, \
                 last_fetched_at) ",
            );
            q.push_values(part, |mut b, t| {
                b.push_bind(&seeder.token_id)
                    .push_bind(&t.id)
                    .push_bind(window)
                    .push_bind(3_i64)
                    .push_bind(window);
            });
            q.build().execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}
