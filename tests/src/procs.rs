//! Child processes of the project's own binaries, for the demo, the benchmarks and the
//! end-to-end tests: found next to the running executable (built on demand for tests), killed
//! (by PID, through `Child`) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
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

/// A child process that is killed when this guard is dropped.
pub struct ChildGuard {
    pub child: Child,
    pub name: String,
}

impl ChildGuard {
    /// Starts `binary` with `args`, stderr appended to `log`.
    pub fn spawn(binary: &str, args: &[&str], log: &Path) -> std::io::Result<Self> {
        let log_file = std::fs::File::create(log)?;
        let child = Command::new(sibling_binary(binary))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()?;
        Ok(Self {
            child,
            name: binary.to_string(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// User+system CPU time the process has used so far (Linux /proc).
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        // USER_HZ is 100 on Linux.
        Some(Duration::from_millis(ticks * 10))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `check` returns true or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    check()
}

/// Whether this process runs as root (network namespaces, mounts, installing tools).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A free loopback port (bound then released; fine for tools started right after).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The workspace's root folder (docs/, target/ are under it).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}
