//! The `atlas-stripe` command line: the server and the operator's tools.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use secrecy::ExposeSecret;

use crate::auth::{IssuedServiceToken, Scope, TenantTokens};
use crate::config::Settings;
use crate::crypto::{Keyring, MasterKeyId};
use crate::domain::{Mode, TenantId};
use crate::startup::{open_store, shutdown_signal, Application};
use crate::store::{Actor, NewServiceToken};

#[derive(Debug, Parser)]
#[command(
    name = "atlas-stripe",
    version,
    about = "Connects Atlas tenants' Stripe accounts"
)]
pub struct Cli {
    /// A configuration file layered over the built-in defaults and
    /// config/$ATLAS_STRIPE_ENVIRONMENT.toml; ATLAS_STRIPE__… variables still win.
    #[arg(long, global = true, env = "ATLAS_STRIPE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Create, list and revoke service tokens for internal callers.
    #[command(subcommand)]
    ServiceToken(ServiceTokenCommand),
    /// Mint a tenant token signed with the configured secret (development and demos).
    TenantToken {
        #[arg(long)]
        tenant: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Print a URL that opens the reference connect page (/connect/stripe) for a tenant, with
    /// a development tenant token in its fragment (creating the tenant when it is missing).
    DemoUrl {
        #[arg(long, default_value = "ten_demo")]
        tenant: String,
        /// The mode of a tenant created now; an existing tenant keeps its own.
        #[arg(long, default_value = "test")]
        mode: String,
        /// Where the service is reached; defaults to server.bind, on 127.0.0.1 when it binds
        /// every address. The page accepts a token in its address on loopback hosts only.
        #[arg(long)]
        base_url: Option<String>,
        /// Lifetime of the token in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
    },
    /// Master-key tools.
    #[command(subcommand)]
    Keys(KeysCommand),
}

#[derive(Debug, Subcommand)]
pub enum ServiceTokenCommand {
    /// Create a token; it is printed once and only its hash is stored.
    Create {
        /// Who holds it, e.g. "billing-worker".
        #[arg(long)]
        name: String,
        /// Repeatable: tenants:write, keys:read, ops:read.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print new master-key material as `id:base64key` for crypto.master_keys.
    Generate {
        #[arg(long)]
        id: String,
    },
    /// Re-wrap every data key under crypto.active_key_id, in batches, while the service runs.
    /// Safe to interrupt and rerun.
    Rewrap {
        #[arg(long, default_value_t = 500)]
        batch: i64,
    },
    /// Count stored keys per master-key id.
    Status,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // Printing new key material needs no configuration: it works before there is one.
    if let Some(Command::Keys(KeysCommand::Generate { id })) = &cli.command {
        let id = MasterKeyId::parse(id)?;
        println!("{}", Keyring::generate_entry(&id).expose_secret());
        return Ok(());
    }
    let settings = Settings::load(cli.config.as_deref(), &[])?;
    crate::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let app = Application::build(&settings).await?;
            tracing::info!(bind = %settings.server.bind, port = app.port(), "serving");
            app.run_until(shutdown_signal()).await?;
        }
        Command::Migrate => {
            open_store(&settings).await?;
            println!("migrations applied");
        }
        Command::ServiceToken(command) => service_token(&settings, command).await?,
        Command::TenantToken { tenant, ttl_secs } => {
            let tenant = TenantId::parse(&tenant)?;
            let secrets = settings.secrets()?;
            let tokens = TenantTokens::from_settings(&secrets.tenant_token_secret, &settings.auth);
            let token = tokens.mint(&tenant, time::Duration::seconds(ttl_secs));
            println!("{}", token.expose_secret());
        }
        Command::DemoUrl {
            tenant,
            mode,
            base_url,
            ttl_secs,
        } => demo_url(&settings, &tenant, &mode, base_url, ttl_secs).await?,
        Command::Keys(KeysCommand::Generate { .. }) => unreachable!("handled above"),
        Command::Keys(KeysCommand::Rewrap { batch }) => {
            if !(1..=10_000).contains(&batch) {
                bail!("--batch must be 1 to 10000");
            }
            let store = open_store(&settings).await?;
            let secrets = settings.secrets()?;
            let report =
                crate::rotation::rewrap_all(&*store, &secrets.keyring, batch, None).await?;
            println!(
                "rewrapped {} keys under {} in {} batches",
                report.rewrapped,
                secrets.keyring.active_id().as_str(),
                report.batches
            );
            for (secret_id, reason) in &report.failed {
                eprintln!("not rewrapped: {secret_id}: {reason}");
            }
            if !report.failed.is_empty() {
                bail!("{} keys could not be rewrapped", report.failed.len());
            }
        }
        Command::Keys(KeysCommand::Status) => {
            let store = open_store(&settings).await?;
            let secrets = settings.secrets()?;
            println!("{:<34} {:>10}  configured", "master_key_id", "keys");
            for (id, count) in store.count_secrets_by_master_key().await? {
                let configured = if secrets.keyring.contains(id.as_str()) {
                    "yes"
                } else {
                    "NO"
                };
                let active = if id == *secrets.keyring.active_id() {
                    " (active)"
                } else {
                    ""
                };
                println!("{:<34} {count:>10}  {configured}{active}", id.as_str());
            }
        }
    }
    Ok(())
}

/// `atlas-stripe demo-url`: the connect page for one tenant, its token in the fragment (which
/// browsers never send to a server).
async fn demo_url(
    settings: &Settings,
    tenant: &str,
    mode: &str,
    base_url: Option<String>,
    ttl_secs: i64,
) -> anyhow::Result<()> {
    let tenant = TenantId::parse(tenant)?;
    let requested = Mode::parse(mode)?;
    let secrets = settings.secrets()?;
    let store = open_store(settings).await?;
    let mode = match store.find_tenant(&tenant).await? {
        Some(record) => {
            if record.mode != requested {
                eprintln!("tenant {tenant} exists in {} mode; using that", record.mode);
            }
            record.mode
        }
        None => {
            store.upsert_tenant(&tenant, requested, &Actor::Cli).await?;
            eprintln!("created tenant {tenant} in {requested} mode");
            requested
        }
    };
    let base = match base_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let bind: std::net::SocketAddr = settings.server.bind.parse().with_context(|| {
                format!("server.bind {:?} is not host:port", settings.server.bind)
            })?;
            let host = match bind.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            format!("http://{host}:{}", bind.port())
        }
    };
    let tokens = TenantTokens::from_settings(&secrets.tenant_token_secret, &settings.auth);
    let token = tokens.mint(&tenant, time::Duration::seconds(ttl_secs));
    eprintln!(
        "open this while `atlas-stripe serve` runs; the token expires in {} min:",
        ttl_secs / 60
    );
    println!(
        "{base}/connect/stripe#tenant={tenant}&mode={mode}&token={}",
        token.expose_secret()
    );
    Ok(())
}

async fn service_token(settings: &Settings, command: ServiceTokenCommand) -> anyhow::Result<()> {
    let store = open_store(settings).await?;
    match command {
        ServiceTokenCommand::Create { name, scopes } => {
            let scopes = scopes
                .iter()
                .map(|s| {
                    Scope::parse(s).with_context(|| {
                        let known: Vec<&str> = Scope::ALL.iter().map(|s| s.as_str()).collect();
                        format!("unknown scope {s:?}; known: {}", known.join(", "))
                    })
                })
                .collect::<anyhow::Result<BTreeSet<_>>>()?;
            if name.trim().is_empty() || name.len() > 100 {
                bail!("--name must be 1 to 100 characters");
            }
            let issued = IssuedServiceToken::generate();
            let record = NewServiceToken {
                id: issued.id.clone(),
                name,
                scopes,
                hash: issued.hash,
            };
            store.insert_service_token(&record, &Actor::Cli).await?;
            eprintln!("service token {} created; it is shown only now:", issued.id);
            println!("{}", issued.plaintext.expose_secret());
        }
        ServiceTokenCommand::List => {
            println!(
                "{:<18} {:<24} {:<36} {:<26} revoked",
                "id", "name", "scopes", "created"
            );
            for token in store.list_service_tokens().await? {
                println!(
                    "{:<18} {:<24} {:<36} {:<26} {}",
                    token.id,
                    token.name,
                    Scope::join(&token.scopes),
                    token.created_at,
                    token
                        .revoked_at
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "-".into())
                );
            }
        }
        ServiceTokenCommand::Revoke { id } => {
            if !store.revoke_service_token(&id, &Actor::Cli).await? {
                bail!("no active service token with id {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
