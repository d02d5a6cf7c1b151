//! The `latch-proxy` binary: parses flags, sets up logging, builds the async runtime with
//! `--worker-threads` workers, runs the proxy until SIGINT or SIGTERM.

use anyhow::Context;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches};
use latch_proxy::capture::{CaptureRules, Installed};
use latch_proxy::config::{Command, IptablesAction};
use latch_proxy::{Args, Cli, Config, Proxy};

async fn run(args: Args, admin_given: bool) -> anyhow::Result<()> {
    latch_proxy::check_renamed_variables(admin_given, |name| std::env::var_os(name))?;
    let config = Config::from_args(&args)?;
    latch_proxy::data_path::raise_open_files_limit();
    let proxy = Proxy::start(config)
        .await
        .context("latch-proxy could not start")?;
    latch_admin::serve::shutdown_on_signal()
        .context("installing the SIGINT and SIGTERM handlers")?
        .cancelled()
        .await;
    tracing::info!("shutting down: draining open connections");
    proxy.shutdown().await;
    Ok(())
}

fn iptables(command: Command) -> anyhow::Result<()> {
    let Command::Iptables {
        action,
        proxy_uid,
        exclude_outbound_ports,
        exclude_inbound_ports,
    } = command;
    let rules = CaptureRules {
        proxy_uid,
        exclude_outbound_ports,
        exclude_inbound_ports,
    };
    match action {
        IptablesAction::Print => print!("{}", rules.print()),
        IptablesAction::Install => match rules.install()? {
            Installed::BothFamilies => tracing::info!("capture rules installed (IPv4 and IPv6)"),
            Installed::Ipv4Only(why) => tracing::warn!(
                "capture rules installed for IPv4 only: the IPv6 ones could not be ({}); this \
                 pod has no global IPv6 address, so no IPv6 traffic can bypass the proxy",
                latch_identity::error_chain(&why)
            ),
        },
        IptablesAction::Uninstall => {
            latch_proxy::capture::uninstall()?;
            tracing::info!("capture rules removed");
        }
    }
    Ok(())
}

/// Runs the proxy on a runtime of `--worker-threads` workers.
fn serve(args: Args, admin_given: bool) -> anyhow::Result<()> {
    let workers = args.worker_threads;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name("latch-worker")
        .enable_all()
        .build()
        .with_context(|| format!("starting the async runtime with {workers} worker threads"))?;
    tracing::info!(
        "{} runtime worker threads (--worker-threads)",
        runtime.metrics().num_workers()
    );
    runtime.block_on(run(args, admin_given))
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // From the flag or LATCH_PROXY_ADMIN, not the default.
    let admin_given = matches
        .value_source("admin")
        .is_some_and(|source| source != ValueSource::DefaultValue);
    latch_admin::init_logging(&cli.run.log_format);
    let result = match cli.command {
        Some(command) => iptables(command),
        None => serve(cli.run, admin_given),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", latch_identity::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}
