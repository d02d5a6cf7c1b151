//! `cargo xtask <task>`: codegen, demo, bench. Each task is a thin wrapper around cargo and
//! the project's own binaries so that what a developer runs is what CI runs.

use std::process::Command;

use anyhow::{Context, Result, bail};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = xtask::codegen::workspace_root();
    match args.first().map(String::as_str) {
        Some("codegen") => {
            let out = xtask::codegen::checked_in_dir(&root);
            // Start from an empty folder so a removed .proto removes its module too.
            if out.exists() {
                std::fs::remove_dir_all(&out)?;
            }
            xtask::codegen::generate(&root, &out)?;
            println!("generated {}", out.display());
            Ok(())
        }
        Some("demo") => run_tests_bin(&root, "latch-demo", &args[1..]),
        Some("bench") => run_tests_bin(&root, "latch-bench", &args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 codegen            regenerate crates/proto/src/generated from proto/\n  \
                 demo               run a local mesh: control plane, certificates, mTLS\n  \
                 bench ca [--clients N] [--seconds S]\n                     \
                 SVIDs issued per second over gRPC\n  \
                 bench mesh [--quick] [--reps N] [--seconds S]\n                     \
                 Latch vs stunnel, HAProxy and no proxy (root: installs tools, private netns)\n  \
                 bench discovery [--proxies 1000,5000] [--changes N]\n                     \
                 a config change reaching every connected proxy; memory per proxy"
            );
            bail!("unknown or missing task");
        }
    }
}

/// Builds the release binaries and runs one of latch-tests' binaries with the given arguments.
fn run_tests_bin(root: &std::path::Path, bin: &str, args: &[String]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "--quiet", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let path = root.join("target/release").join(bin);
    let status = Command::new(&path)
        .current_dir(root)
        .args(args)
        .status()
        .with_context(|| format!("running {}", path.display()))?;
    if !status.success() {
        bail!("{bin} failed");
    }
    Ok(())
}
