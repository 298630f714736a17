use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::sql::{impl_store, HasDatabase};
use super::{Backend, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// The production store. Stateless service instances share one PostgreSQL.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url)?.application_name("atlas-stripe");
        let pool = PgPoolOptions::new()
            // A ping before every checkout doubles the key fetch's round trips; a broken
            // connection fails its query instead and the pool replaces it.
            .test_before_acquire(false)
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The whole batch in one statement (arrays unnested into rows): one round trip per
    /// batch instead of one per secret. A row whose master key changed meanwhile is skipped.
    async fn replace_wrapped_keys_in_batch(
        &self,
        purpose: crate::crypto::Purpose,
        rows: &[super::RewrappedRow],
    ) -> Result<u64, StoreError> {
        let (id_column, master_column, wrapped_column) = match purpose {
            crate::crypto::Purpose::StripeApiKey => {
                ("api_key_secret_id", "master_key_id", "wrapped_key")
            }
            crate::crypto::Purpose::WebhookSigningSecret => (
                "webhook_secret_id",
                "webhook_master_key_id",
                "webhook_wrapped_key",
            ),
        };
        let sql = format!(
            "UPDATE stripe_connections c SET {master_column} = v.new_master, {wrapped_column} = v.wrapped \
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bytea[]) \
             AS v(secret_id, old_master, new_master, wrapped) \
             WHERE c.{id_column} = v.secret_id AND c.{master_column} = v.old_master"
        );
        let ids: Vec<&str> = rows.iter().map(|r| r.secret_id.as_str()).collect();
        let old: Vec<&str> = rows
            .iter()
            .map(|r| r.previous_master_key_id.as_str())
            .collect();
        let new: Vec<&str> = rows
            .iter()
            .map(|r| r.sealed.master_key_id.as_str())
            .collect();
        let wrapped: Vec<&[u8]> = rows
            .iter()
            .map(|r| r.sealed.wrapped_key.as_slice())
            .collect();
        let result = sqlx::query(&sql)
            .bind(&ids)
            .bind(&old)
            .bind(&new)
            .bind(&wrapped)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected())
    }

    /// No lock: the row carries its transaction id, and the feed orders by it and holds
    /// back rows of transactions still running (see `concat_feed`).
    async fn insert_event_in_feed_order(
        &self,
        tenant: &crate::domain::TenantId,
        connection_id: &str,
        event: &super::NewEvent,
    ) -> Result<bool, StoreError> {
        let inserted = sqlx::query(
            "INSERT INTO webhook_events (tenant_id, txid, seq, connection_id, event_id, event_type, \
             created, livemode, received_at, payload) VALUES ($1, \
             pg_current_xact_id()::text::bigint, nextval('webhook_event_seq'), $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (connection_id, event_id) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(connection_id)
        .bind(&event.event_id)
        .bind(&event.event_type)
        .bind(event.created)
        .bind(event.livemode)
        .bind(super::now())
        .bind(&event.payload)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(inserted == 1)
    }
}

impl HasDatabase for PgStore {
    type Db = sqlx::Postgres;
}

impl_store!(
    PgStore,
    Backend::Postgres,
    MIGRATOR,
    " FOR UPDATE SKIP LOCKED",
    // Only rows of transactions older than every running one: those can commit no more.
    " AND txid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
);
