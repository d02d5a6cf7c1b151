//! The `latch-proxy` binary: parses flags, sets up logging, runs the proxy until SIGINT or
//! SIGTERM.

use anyhow::Context;
use clap::Parser;
use latch_proxy::{Args, Config, Proxy};

async fn run(args: Args) -> anyhow::Result<()> {
    let config = Config::from_args(&args)?;
    let proxy = Proxy::start(config)
        .await
        .context("latch-proxy could not start")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    proxy.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    latch_admin::init_logging(&args.log_format);
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
