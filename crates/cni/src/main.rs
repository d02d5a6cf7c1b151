//! `latch-cni`: with `CNI_COMMAND` set, a chained CNI plugin run by the container runtime
//! (reads the configuration on stdin, writes the result or the error object on stdout, exits
//! non-zero on error); otherwise the node installer the DaemonSet runs (`install`,
//! `uninstall`), or the in-pod check that the capture works (`wait`). The commands are in
//! `plugin.rs`, the protocol in `spec.rs`, who is captured in `config.rs`.

mod config;
mod install;
mod netns;
mod plugin;
mod spec;
mod wait;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::spec::{CniError, Command, Env, code};

#[derive(Parser)]
#[command(
    version,
    about = "Latch's chained CNI plugin. Run by the container runtime with CNI_COMMAND set; \
             without it, installs itself on a node"
)]
struct Cli {
    #[command(subcommand)]
    command: Setup,
}

#[derive(Subcommand)]
enum Setup {
    /// Copy this binary into the node's CNI bin folder and chain latch-cni into the node's CNI
    /// configuration.
    Install {
        #[command(flatten)]
        dirs: Dirs,
        /// latch-cni's configuration entry (a JSON object: captureNamespaces, ...).
        #[arg(long, env = "LATCH_CNI_PLUGIN_CONFIG")]
        plugin_config: PathBuf,
        /// Keep running and repair the installation at this interval (e.g. 10s) until
        /// SIGTERM; without it, install once and exit.
        #[arg(long, env = "LATCH_CNI_WATCH", value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
    },
    /// Remove latch-cni from the node's CNI configuration and bin folder.
    Uninstall {
        #[command(flatten)]
        dirs: Dirs,
    },
    /// In a pod, before its app starts (an init container, no privileges needed, any uid but
    /// the proxy's): return once the pod's traffic is captured; fail after --timeout.
    Wait {
        #[arg(long, env = "LATCH_CNI_WAIT_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// The proxy's uid (exempt from capture, so the check cannot run as it).
        #[arg(long, env = "LATCH_PROXY_UID", default_value_t = latch_mesh::ports::PROXY_UID)]
        proxy_uid: u32,
    },
}

#[derive(clap::Args)]
struct Dirs {
    /// The node's CNI bin folder, as mounted.
    #[arg(long, env = "LATCH_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The node's CNI configuration folder, as mounted.
    #[arg(long, env = "LATCH_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
}

fn main() -> ExitCode {
    match std::env::var("CNI_COMMAND") {
        Ok(command) => run_plugin(&command),
        Err(_) => match setup(Cli::parse().command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("latch-cni: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// One CNI invocation: the result (or nothing) on stdout and exit 0, or the error object on
/// stdout and exit 1.
fn run_plugin(command: &str) -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Errors are reported in the configuration's version, also those found before it is read.
    let version = spec::asked_version(&stdin);
    let outcome = Command::parse(command).and_then(|command| {
        read.map_err(|e| CniError::new(code::IO_FAILURE, "cannot read stdin", e.to_string()))?;
        let env = match Env::read(|name| std::env::var(name).ok()) {
            // VERSION needs no environment: a runtime probing versions must get an answer.
            Err(_) if command == Command::Version => Env::default(),
            other => other?,
        };
        plugin::run(command, &env, &stdin)
    });
    let outcome = outcome.map_err(|e| e.in_version(&version));
    let (json, status) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(result)) => (result, ExitCode::SUCCESS),
        Err(error) => {
            eprintln!("latch-cni: {}: {}", error.msg, error.details);
            (
                serde_json::to_value(&error).unwrap_or_default(),
                ExitCode::FAILURE,
            )
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{json}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    status
}

fn setup(command: Setup) -> anyhow::Result<()> {
    match command {
        Setup::Install {
            dirs,
            plugin_config,
            watch,
        } => {
            let binary = std::env::current_exe()?;
            match watch {
                None => {
                    let target = install::Target {
                        bin_dir: dirs.bin_dir,
                        conf_dir: dirs.conf_dir,
                        entry: install::read_entry(&plugin_config)?,
                    };
                    install::install_once(&target, &binary).map(|c| install::report(&c))
                }
                Some(every) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(install::watch(
                        (dirs.bin_dir, dirs.conf_dir),
                        &plugin_config,
                        &binary,
                        every,
                    )),
            }
        }
        Setup::Wait { timeout, proxy_uid } => wait::wait_for_capture(timeout, proxy_uid),
        Setup::Uninstall { dirs } => install::uninstall(&install::Target {
            bin_dir: dirs.bin_dir,
            conf_dir: dirs.conf_dir,
            entry: serde_json::Value::Null,
        }),
    }
}
