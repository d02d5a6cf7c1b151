//! The `latch-control` binary: parses flags, sets up logging, runs the control plane until
//! SIGINT or SIGTERM.

use anyhow::Context;
use clap::Parser;
use latch_control::{Args, Config, ControlPlane};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Args::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", latch_identity::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    latch_admin::init_logging(&args.log_format);
    latch_control::config::check_renamed_variables(&args, |name| std::env::var_os(name))
        .map_err(anyhow::Error::msg)?;
    let config = Config::try_from(args).map_err(anyhow::Error::msg)?;
    let control_plane = ControlPlane::start(config)
        .await
        .context("latch-control could not start")?;
    latch_admin::serve::shutdown_on_signal()
        .context("installing the SIGINT and SIGTERM handlers")?
        .cancelled()
        .await;
    tracing::info!("shutting down");
    control_plane.shutdown().await;
    Ok(())
}
