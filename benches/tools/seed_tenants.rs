//! Benchmark set-up, not part of the product: seeds `--tenants N` connected tenants
//! `ten_0…` with sealed random keys and webhook signing secrets (so their webhook URLs
//! are known ids: scripts/measure-hostile) through the store, and prints a `keys:read` service
//! token. Reads the same configuration as the service (`ATLAS_STRIPE__…` variables).
//!
//! `cargo run --release --example seed-tenants -- --tenants 10000`

use anyhow::Context;
use atlas_stripe::auth::{IssuedServiceToken, Scope};
use atlas_stripe::config::Settings;
use atlas_stripe::crypto::{Fingerprinter, SecretContext};
use atlas_stripe::domain::{
    random_id, Access, ConnectionStatus, KeyKind, Mode, PermissionReport, Resource, TenantId,
};
use atlas_stripe::startup::open_store;
use atlas_stripe::store::{
    Actor, NewConnection, NewServiceToken, StoredState, StoredWebhook, WebhookChange,
};
use futures_util::stream::{self, StreamExt, TryStreamExt};
use secrecy::ExposeSecret;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let tenants: usize = match args.iter().position(|a| a == "--tenants") {
        Some(i) => args
            .get(i + 1)
            .context("--tenants takes a number")?
            .parse()?,
        None => 10_000,
    };
    let settings = Settings::load(None, &[])?;
    let store = open_store(&settings).await?;
    let secrets = settings.secrets()?;
    let keyring = &atlas_stripe::startup::keyring(&settings, &secrets)?;
    let fingerprinter = Fingerprinter::new(secrets.fingerprint_key.clone());
    let permissions: PermissionReport = Resource::ALL
        .iter()
        .map(|r| (*r, Access::Granted))
        .collect();
    stream::iter(0..tenants)
        .map(|i| {
            let store = store.clone();
            let permissions = permissions.clone();
            let fingerprinter = &fingerprinter;
            async move {
                let tenant = TenantId::parse(&format!("ten_{i}"))?;
                store
                    .upsert_tenant(&tenant, Mode::Test, &Actor::Cli)
                    .await?;
                let api_key = random_id("rk_test_", 99);
                let secret_id = random_id("sec_", 20);
                let context = SecretContext::api_key(&secret_id, &tenant, Mode::Test);
                let webhook_secret_id = random_id("whs_", 20);
                let webhook_context =
                    SecretContext::webhook_secret(&webhook_secret_id, &tenant, Mode::Test);
                let webhook = StoredWebhook {
                    endpoint_id: random_id("we_", 24),
                    sealed: keyring.seal(&webhook_context, random_id("whsec_", 32).as_bytes())?,
                    secret_id: webhook_secret_id,
                };
                let connection = NewConnection {
                    connection_id: random_id("con_", 20),
                    expected: StoredState::Absent,
                    webhook: WebhookChange::Set(webhook),
                    tenant_id: tenant,
                    mode: Mode::Test,
                    key_type: KeyKind::Restricted,
                    key_last4: api_key[api_key.len() - 4..].to_owned(),
                    key_fingerprint: fingerprinter.fingerprint(&api_key),
                    sealed: keyring.seal(&context, api_key.as_bytes())?,
                    secret_id,
                    status: ConnectionStatus::Active,
                    permissions,
                    warnings: Vec::new(),
                    verified_at: atlas_stripe::clock::now(),
                    next_verify_at: atlas_stripe::clock::now() + time::Duration::hours(6),
                };
                store.save_connection(&connection, &Actor::Cli).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<()>>()
        .await?;
    let issued = IssuedServiceToken::generate();
    let token = NewServiceToken {
        id: issued.id.clone(),
        name: "bench".into(),
        scopes: [Scope::KeysRead].into(),
        hash: issued.hash,
    };
    store.insert_service_token(&token, &Actor::Cli).await?;
    println!("{}", issued.plaintext.expose_secret());
    Ok(())
}
