//! The floor the key fetch is measured against, built outside the product: a bare axum +
//! sqlx server with no middleware. `GET /pk/{tenant_id}` runs one
//! `SELECT … WHERE tenant_id = $1` through a pool of the same size as the service's;
//! `GET /healthz` answers at once.
//!
//! `DATABASE_URL=postgres://… POOL=16 BIND=127.0.0.1:9000 cargo run --release --example key-fetch-floor`

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

async fn pk_select(State(pool): State<PgPool>, Path(tenant): Path<String>) -> StatusCode {
    let row: Result<Option<(String,)>, _> =
        sqlx::query_as("SELECT mode FROM tenants WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_optional(&pool)
            .await;
    match row {
        Ok(Some(_)) => StatusCode::NO_CONTENT,
        Ok(None) => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL")?;
    let pool_size: u32 = std::env::var("POOL").map_or(Ok(16), |p| p.parse())?;
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:9000".into());
    let pool = PgPoolOptions::new()
        .test_before_acquire(false)
        .max_connections(pool_size)
        .connect(&url)
        .await?;
    let app = Router::new()
        .route("/pk/{tenant_id}", get(pk_select))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(pool);
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
