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
}

impl HasDatabase for PgStore {
    type Db = sqlx::Postgres;
}

impl_store!(
    PgStore,
    Backend::Postgres,
    MIGRATOR,
    " FOR UPDATE SKIP LOCKED"
);
