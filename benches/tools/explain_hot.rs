//! Benchmark tool, not part of the product: prints the generic plan of every hot statement
//! (`atlas_stripe::store::hot_statements`) on the PostgreSQL at `DATABASE_URL`, and
//! whether it reads a table that grows with the tenants sequentially. `scripts/bench-scale`
//! runs it at each size; exits 1 when any plan does.

use anyhow::Context;
use atlas_stripe::store::{explain_generic, hot_statements, seq_scans_of_growing_tables};
use sqlx::Connection;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("DATABASE_URL")?;
    let mut conn = sqlx::PgConnection::connect(&url).await?;
    let mut scanning = 0;
    for statement in hot_statements() {
        let plan = explain_generic(&mut conn, &statement).await?;
        let scans = seq_scans_of_growing_tables(&plan);
        let verdict = if scans.is_empty() {
            "no seq scan".to_owned()
        } else {
            scanning += 1;
            format!("SEQ SCAN of {}", scans.join(", "))
        };
        println!("== {}: {verdict}", statement.name);
        for line in &plan {
            println!("   {line}");
        }
    }
    println!("plans with a sequential scan of a growing table: {scanning}");
    if scanning > 0 {
        std::process::exit(1);
    }
    Ok(())
}
