//! Where the workspace's own binaries are (`latch-control`, `latch-proxy`, `latchctl`): next to
//! the running executable for the demo and the bench, built on demand for tests. Also runs
//! `latchctl` to completion. Used by `processes`, `netns`, every end-to-end test, bench, demo.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The path of a sibling binary (e.g. `latch-control` next to `latch-bench`). From an
/// integration test, which runs from `target/<profile>/deps`, the binaries' folder is the
/// parent: `target/<profile>`.
pub fn sibling_binary(name: &str) -> PathBuf {
    binary_dir()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name))
}

fn binary_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    match dir.file_name() {
        Some(deps) if deps == "deps" => dir.parent().map(Path::to_path_buf),
        _ => Some(dir.to_path_buf()),
    }
}

/// A binary of this workspace (`latch-control`, `latch-proxy`, `latchctl`, ...), built first if
/// needed. `cargo test` builds only the tested package's own binaries, so the first call in a
/// process runs `cargo build --workspace --bins` into the running test's target dir and
/// profile: a no-op when they are up to date, e.g. after `.ci/run` (which runs the same
/// command before the tests) or `cargo build`.
pub fn workspace_binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = BUILT.get_or_init(build_binaries) {
        panic!("{e}; run `cargo build --workspace --bins` first");
    }
    sibling_binary(name)
}

fn build_binaries() -> Result<(), String> {
    let dir = binary_dir().ok_or("cannot locate the running executable")?;
    let (Some(target_dir), Some(profile)) = (dir.parent(), dir.file_name()) else {
        return Err(format!(
            "{} is not a target/<profile> folder",
            dir.display()
        ));
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
    let manifest = workspace_root().join("Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .args(["build", "--workspace", "--bins", "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir);
    match profile.to_str() {
        Some("debug") => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(other) => {
            command.args(["--profile", other]);
        }
        None => return Err(format!("odd profile folder {}", dir.display())),
    }
    let status = command
        .status()
        .map_err(|e| format!("running {command:?}: {e}"))?;
    if !status.success() {
        return Err(format!("{command:?} failed: {status}"));
    }
    Ok(())
}

/// The workspace's root folder (docs/, target/ are under it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Runs `binary` with `args` to completion.
pub fn run(binary: impl AsRef<OsStr>, args: &[&str]) -> Output {
    let binary = binary.as_ref();
    Command::new(binary)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", binary.to_string_lossy()))
}

/// Runs the workspace's `latchctl` with `args` to completion.
pub fn latchctl(args: &[&str]) -> Output {
    run(workspace_binary("latchctl"), args)
}

/// The arguments of `latchctl token create` for a join token bound to `id`, asked of the admin
/// API at `admin` with the credential in `data_dir`; reusable when asked.
pub fn token_create_args<'a>(
    id: &'a str,
    admin: &'a str,
    data_dir: &'a str,
    reusable: bool,
) -> Vec<&'a str> {
    let mut args = vec![
        "token",
        "create",
        "--spiffe-id",
        id,
        "--admin",
        admin,
        "--data-dir",
        data_dir,
    ];
    if reusable {
        args.push("--reusable");
    }
    args
}

/// A finished command's stdout, trimmed, or its stderr (trimmed) when it failed.
pub fn outcome(out: &Output) -> Result<String, String> {
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}
