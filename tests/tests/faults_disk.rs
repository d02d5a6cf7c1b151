//! Fault injection (docs/reliability.md, "Faults"), disk: the real latch-control on a read-only (bind mount) or full
//! (tmpfs) data dir refuses what must be recorded with an error naming the file, keeps issuing
//! SVIDs and recovers; each test prints the numbers docs/reliability.md reports. Needs root for
//! the mounts; skips without (fails with LATCH_REQUIRE_NETNS=1, as CI sets).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use latch_testkit::admin::is_ready;
use latch_testkit::files::utf8;
use latch_testkit::processes::{ControlProcess, ProxySpec, wait_for_rotation};

/// Set to 1 (CI does) to fail, not skip, the mount and namespace tests without root or tools.
const REQUIRE_ROOT_ENV: &str = "LATCH_REQUIRE_NETNS";

/// True when this process may mount (root, `mount` and `umount` on PATH); otherwise a loud
/// SKIPPED line, or a panic under LATCH_REQUIRE_NETNS=1.
fn require_mounts() -> bool {
    let tools = ["mount", "umount"];
    let mut missing: Vec<&str> = if latch_testkit::is_root() {
        vec![]
    } else {
        vec!["root"]
    };
    missing.extend(tools.iter().filter(|t| !latch_testkit::netns::on_path(t)));
    if missing.is_empty() {
        return true;
    }
    if std::env::var(REQUIRE_ROOT_ENV).is_ok_and(|v| v == "1") {
        panic!(
            "{REQUIRE_ROOT_ENV}=1 but this machine lacks: {}",
            missing.join(", ")
        );
    }
    latch_testkit::skip::skipped(&format!(
        "needs root, mount, umount; missing: {} (set {REQUIRE_ROOT_ENV}=1 to fail instead)",
        missing.join(", ")
    ));
    false
}

/// Runs `mount args`, panicking with its message on failure.
fn mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .expect("running mount");
    assert!(
        out.status.success(),
        "mount {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A mount made by a test, unmounted (lazily if busy) when dropped, also when the test fails.
struct Mounted {
    path: PathBuf,
}

impl Mounted {
    /// `src` bind-mounted on `path`, then made read-only.
    fn read_only_bind(src: &Path, path: &Path) -> Self {
        mount(&["--bind", utf8(src), utf8(path)]);
        let mounted = Self {
            path: path.to_path_buf(),
        };
        mounted.set_read_only(true);
        mounted
    }

    /// A tmpfs of `size` bytes on `path`.
    fn tmpfs(path: &Path, size: usize) -> Self {
        let options = format!("size={size},mode=0700");
        mount(&["-t", "tmpfs", "-o", &options, "lf-faults", utf8(path)]);
        Self {
            path: path.to_path_buf(),
        }
    }

    fn set_read_only(&self, read_only: bool) {
        let options = if read_only {
            "remount,ro,bind"
        } else {
            "remount,rw,bind"
        };
        mount(&["-o", options, utf8(&self.path)]);
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Every file under `dir` (relative path and bytes), recursively.
fn files_under(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("read dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                folders.push(path);
            } else {
                let name = path.strip_prefix(dir).expect("under dir");
                files.insert(
                    name.display().to_string(),
                    std::fs::read(&path).expect("read file"),
                );
            }
        }
    }
    files
}

/// Writes zeros to `path` until the file system is full; the bytes written.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = [0u8; 4096];
    let mut written = 0;
    while file.write_all(&chunk).is_ok() {
        written += chunk.len() as u64;
    }
    let _ = file.sync_all();
    written
}

/// Start-up of a fresh control plane on an unwritable data dir: it exits with an error naming
/// the path and the reason, and leaves nothing behind.
fn assert_refused_start(control: &mut ControlProcess, reason: &str) -> String {
    let mut process = control.spawn();
    let status = process.wait_exit(Duration::from_secs(20));
    let log = process.log();
    let status = status.unwrap_or_else(|| panic!("latch-control still running after 20 s:\n{log}"));
    assert!(!status.success(), "latch-control started anyway:\n{log}");
    let ca_dir = control.data_dir.join("ca");
    let error = log
        .lines()
        .find(|l| l.contains("could not start"))
        .unwrap_or_else(|| panic!("no start-up error in the log:\n{log}"))
        .to_string();
    assert!(
        error.contains(utf8(&ca_dir)) && error.contains(reason),
        "the error should name {} and say {reason:?}: {error}",
        ca_dir.display()
    );
    error
}

#[test]
fn data_dir_read_only_refuses_writes_clearly_and_keeps_issuing() {
    if !require_mounts() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lf-ro-")
        .tempdir()
        .expect("dir");
    let (src, data) = (dir.path().join("src"), dir.path().join("data"));
    std::fs::create_dir(&src).expect("src");
    std::fs::create_dir(&data).expect("data");
    let mut control = ControlProcess::new(dir.path(), &data);

    // Fresh and read-only: no CA can be made. Root ignores file modes, not a read-only mount.
    let mounted = Mounted::read_only_bind(&src, &data);
    assert!(
        std::fs::write(data.join("probe"), b"x").is_err(),
        "the mount is writable"
    );
    let error = assert_refused_start(&mut control, "Read-only file system");
    assert!(
        files_under(&src).is_empty(),
        "a refused start wrote {:?}",
        files_under(&src)
    );

    // Writable: a CA, a proxy holding a short SVID, a spare single-use token. Then read-only.
    mounted.set_read_only(false);
    let mut process = control.start();
    let proxy_spec = ProxySpec::new("web", "6s");
    let proxy = proxy_spec.start(&control, dir.path());
    let spare = control.create_token("spare", false).expect("token");
    process.kill9();
    mounted.set_read_only(true);
    let before = files_under(&data);

    // The existing CA starts, renews the proxy's SVID, issues for a reusable token ...
    let process = control.start();
    let renewed_in = wait_for_rotation(&proxy, &proxy_spec.admin);
    let reusable = std::fs::read_to_string(dir.path().join("web.token")).expect("token");
    control
        .request_cert(reusable.trim(), &dir.path().join("reusable"))
        .unwrap_or_else(|e| {
            panic!(
                "a reusable token works on a read-only data dir: {e}\n{}",
                process.logs()
            )
        });
    // ... and refuses what it must record, with the file and the reason.
    let token_error = control
        .create_token("new", false)
        .expect_err("token created on a read-only dir");
    let tokens_file = data.join("join-tokens.json");
    for needle in [utf8(&tokens_file), "Read-only file system", "503"] {
        assert!(
            token_error.contains(needle),
            "latchctl should say {needle:?}: {token_error}"
        );
    }
    let spend_error = control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect_err("a single-use token was spent without being recorded");
    assert!(
        spend_error.contains(utf8(&tokens_file)) && spend_error.contains("Read-only file system"),
        "{spend_error}"
    );
    assert_eq!(
        files_under(&data),
        before,
        "files changed on a read-only data dir"
    );
    assert!(is_ready(&control.admin), "{}", process.logs());

    // Writable again: tokens are created and the refused single-use token was not spent.
    mounted.set_read_only(false);
    control
        .create_token("new", false)
        .expect("token after the fix");
    control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect("the single-use token refused earlier still works");
    println!(
        "read-only data dir: fresh start refused ({error}); with an existing CA: started, SVID \
         renewed {:.1} s later, `latchctl token create` refused: {token_error}; single-use token \
         refused: {spend_error}; recovered on remount rw",
        renewed_in.as_secs_f64()
    );
}

#[test]
fn data_dir_full_refuses_writes_clearly_leaves_no_partial_file_and_recovers() {
    if !require_mounts() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lf-full-")
        .tempdir()
        .expect("dir");
    let data = dir.path().join("data");
    std::fs::create_dir(&data).expect("data");
    // Room for a dozen small files; each takes a 4 KiB page.
    let _mounted = Mounted::tmpfs(&data, 64 * 1024);
    let mut control = ControlProcess::new(dir.path(), &data);
    let filler = data.join("filler");

    // Fresh, with one free page: the CA key fits, its certificate does not. The start fails,
    // and neither a lone key nor a temp file is left to block the next start.
    fill(&filler);
    let len = std::fs::metadata(&filler).expect("filler").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&filler)
        .and_then(|f| f.set_len(len - 4096))
        .expect("free one page");
    let error = assert_refused_start(&mut control, "No space left on device");
    let left: Vec<String> = files_under(&data)
        .into_keys()
        .filter(|f| f != "filler")
        .collect();
    assert!(left.is_empty(), "a failed start left {left:?}");
    std::fs::remove_file(&filler).expect("free the space");
    let mut process = control.start();
    let root = std::fs::read(data.join("ca/root.crt.pem")).expect("root");

    // Running, then the disk fills up.
    let proxy_spec = ProxySpec::new("web", "6s");
    let proxy = proxy_spec.start(&control, dir.path());
    let spare = control.create_token("spare", false).expect("token");
    let filled = fill(&filler);
    let before = files_under(&data);
    let token_error = control
        .create_token("new", false)
        .expect_err("token created on a full disk");
    let tokens_file = data.join("join-tokens.json");
    for needle in [utf8(&tokens_file), "No space left on device", "503"] {
        assert!(
            token_error.contains(needle),
            "latchctl should say {needle:?}: {token_error}"
        );
    }
    let spend_error = control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect_err("a single-use token was spent without being recorded");
    assert!(
        spend_error.contains("No space left on device"),
        "{spend_error}"
    );
    let renewed_in = wait_for_rotation(&proxy, &proxy_spec.admin);
    assert_eq!(
        files_under(&data),
        before,
        "a failed write changed or left a file"
    );

    // A restart on the full disk keeps the CA and serves.
    process.kill9();
    let process = control.start();
    wait_for_rotation(&proxy, &proxy_spec.admin);
    assert_eq!(
        std::fs::read(data.join("ca/root.crt.pem")).expect("root"),
        root
    );
    assert!(is_ready(&control.admin), "{}", process.logs());

    // Space back: tokens again, and the refused single-use token was not spent.
    std::fs::remove_file(&filler).expect("free the space");
    control
        .create_token("new", false)
        .expect("token once there is room");
    control
        .request_cert(&spare, &dir.path().join("spare"))
        .expect("the single-use token refused earlier still works");
    println!(
        "full data dir (tmpfs 64 KiB, {filled} bytes of filler): fresh start refused ({error}), \
         nothing left behind, started once space returned; running: `latchctl token create` \
         refused: {token_error}; single-use token refused: {spend_error}; SVID renewed {:.1} s \
         into the full disk; restart on the full disk kept the CA; recovered once space returned",
        renewed_in.as_secs_f64()
    );
}
