//! What goes wrong in the store, and which of it a caller may retry.

use crate::domain::Mode;

/// Why the store is not ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("database unreachable: {0}")]
    Unreachable(sqlx::Error),
    #[error("migrations: {applied} of {known} applied")]
    MigrationsPending { applied: i64, known: i64 },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("tenant does not exist")]
    TenantMissing,
    /// The tenant's mode changed while a key was being verified for the old one.
    #[error("the tenant is now in {0} mode")]
    ModeChanged(Mode),
    #[error("the tenant has a Stripe connection; disconnect it before changing the mode")]
    TenantHasConnection,
    #[error("a concurrent change won; try again")]
    Conflict,
    /// A stored value failed to parse back into its domain type.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database.url must start with postgres://, postgresql:// or sqlite:")]
    UnsupportedUrl,
    /// The group commit this write was part of failed (each of its writers gets one).
    #[error("the batch failed: {0}")]
    Batch(std::sync::Arc<StoreError>),
}

impl StoreError {
    /// The database cannot be reached or is shutting down or busy: a caller should retry,
    /// and nothing was changed.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(e) => database_unavailable(e),
            Self::Batch(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

fn database_unavailable(e: &sqlx::Error) -> bool {
    match e {
        // A proxy in front of the database (pgbouncer, a cloud SQL proxy) that accepts and
        // then drops the connection shows up as a protocol error.
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // PostgreSQL: connection exceptions (08…), shutting down or not yet accepting
            // connections (57P01–57P03), too many connections (53300).
            code.starts_with("08")
                || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
                // SQLite: busy or locked past the busy timeout.
                || matches!(&*code, "5" | "6")
        }),
        _ => false,
    }
}
