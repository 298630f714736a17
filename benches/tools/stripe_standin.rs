//! A Stripe stand-in for the proxy benchmark, not part of the product: answers every
//! request after a fixed delay with a small JSON object and a Request-Id, as Stripe would.
//!
//! `BIND=127.0.0.1:9100 DELAY_MS=50 cargo run --release --example stripe-standin`

use std::time::Duration;

use axum::http::header;
use axum::response::IntoResponse;
use axum::Router;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:9100".into());
    let delay = Duration::from_millis(std::env::var("DELAY_MS").map_or(Ok(50), |d| d.parse())?);
    let app = Router::new().fallback(move || async move {
        tokio::time::sleep(delay).await;
        (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::HeaderName::from_static("request-id"), "req_standin"),
            ],
            r#"{"id":"cus_Bench","object":"customer","email":"bench@example.com"}"#,
        )
            .into_response()
    });
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
