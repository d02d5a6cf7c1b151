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
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    latch_admin::init_logging(&args.log_format);
    let publish_bundle = args.publish_bundle.clone();
    let config = Config::try_from(args).map_err(anyhow::Error::msg)?;
    let control_plane = ControlPlane::start(config)
        .await
        .context("latch-control could not start")?;
    if let Some(path) = publish_bundle {
        publish(&control_plane.bundle_path, &path).with_context(|| {
            format!(
                "--publish-bundle: cannot write the trust bundle to {} (does its folder exist \
                 and is it writable?)",
                path.display()
            )
        })?;
        tracing::info!(path = %path.display(), "trust bundle published");
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    control_plane.shutdown().await;
    Ok(())
}

/// Copies the bundle file the control plane wrote in its data dir to `to` (0644, atomically).
fn publish(bundle: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    let pem = std::fs::read(bundle)?;
    latch_identity::files::write_public(to, &pem)
}
