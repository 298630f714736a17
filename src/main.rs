use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = atlas_stripe::cli::Cli::parse();
    match atlas_stripe::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("atlas-stripe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
