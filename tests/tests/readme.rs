//! The README's "same by hand" block as a newcomer uses it: pasted whole into `bash -e` in a
//! scratch folder with the workspace's binaries on PATH, read from README.md itself (between
//! the `readme-test` markers), never from a copy. Each step's output is checked; then the
//! README's clean-up line runs, after which no process the block started may be left, and the
//! scratch folder (keys, tokens) is gone. Also: the quick start's two commands stay as they are.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use latch_testkit::binaries::{workspace_binary, workspace_root};
use latch_testkit::files::temp_dir;

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("README.md")
}

/// The shell code of the README's fenced block between `<!-- readme-test: NAME begin -->`
/// and `<!-- readme-test: NAME end -->`.
fn block(readme: &str, name: &str) -> String {
    let begin = format!("<!-- readme-test: {name} begin -->");
    let end = format!("<!-- readme-test: {name} end -->");
    let (_, rest) = readme
        .split_once(&begin)
        .unwrap_or_else(|| panic!("README.md has no {begin}"));
    let (marked, _) = rest
        .split_once(&end)
        .unwrap_or_else(|| panic!("README.md has no {end}"));
    let code = marked
        .trim()
        .strip_prefix("```sh\n")
        .and_then(|c| c.strip_suffix("```"))
        .unwrap_or_else(|| panic!("{name}: not one ```sh block:\n{marked}"));
    code.to_string()
}

/// PIDs (with their command lines) of the processes whose environment holds `marker`: what
/// the script started, and whatever they started, still running.
fn processes_with(marker: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            found.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
        }
    }
    found
}

/// Kills (SIGKILL, each by its PID) what is left of the processes this test started.
fn kill_leftovers(marker: &str) {
    for (pid, _) in processes_with(marker) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
}

#[test]
fn quick_start_commands_stay_as_documented() {
    let readme = readme();
    for command in [
        "```sh\ncargo xtask demo\n```",
        "```sh\ncargo test --workspace\n```",
    ] {
        assert!(readme.contains(command), "README.md lost {command}");
    }
}

#[test]
fn by_hand_block_works_pasted_whole_into_bash_e_and_cleans_up() {
    let readme = readme();
    let (by_hand, clean_up) = (block(&readme, "by-hand"), block(&readme, "clean-up"));
    assert!(
        !by_hand.contains("cargo "),
        "the block runs in a scratch folder, not the repository:\n{by_hand}"
    );
    let binaries = workspace_binary("latch-control")
        .parent()
        .expect("binaries' folder")
        .to_path_buf();
    let home = temp_dir("readme");
    let scratch = home.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let marker = format!("LATCH_README_TEST={}-{nanos}", std::process::id());
    let (key, value) = marker.split_once('=').unwrap();
    let path = format!(
        "{}:{}",
        binaries.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let stdout_path = home.path().join("stdout");
    let stderr_path = home.path().join("stderr");
    let mut command = Command::new("bash");
    command.arg("-e");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCH_") {
            command.env_remove(name);
        }
    }
    // What the README's set-up lines do: binaries on PATH, `scratch` set and the current folder.
    command
        .current_dir(&scratch)
        .env("PATH", path)
        .env("scratch", &scratch)
        .env("HOME", home.path())
        .env(key, value)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&stdout_path).unwrap())
        .stderr(std::fs::File::create(&stderr_path).unwrap());
    let mut bash = command.spawn().expect("bash");
    // Pasted: the shell reads the block from its input.
    let pasted = format!("{by_hand}\necho '=== clean-up ==='\n{clean_up}\necho '=== done ==='\n");
    bash.stdin
        .take()
        .unwrap()
        .write_all(pasted.as_bytes())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = bash.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = bash.kill();
            let _ = bash.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let (stdout, stderr) = (read(&stdout_path), read(&stderr_path));
    let leftovers = processes_with(&marker);
    kill_leftovers(&marker);
    let context = format!("--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");

    assert!(
        status.is_some_and(|s| s.success()),
        "bash -e: {status:?}\n{context}"
    );
    let (steps, after) = stdout
        .split_once("=== clean-up ===")
        .unwrap_or_else(|| panic!("the clean-up never ran\n{context}"));
    let lines: Vec<&str> = steps.lines().collect();
    // curl through the mesh: the api app's page.
    assert!(lines.contains(&"hello from api"), "{context}");
    // Nothing but www/ is served: not the admin credential next to it.
    assert!(lines.contains(&"404"), "{context}");
    // api's proxy counted a connection from web's SPIFFE ID.
    assert!(
        lines.iter().any(
            |l| l.starts_with("latch_proxy_tcp_connections_opened_total")
                && l.contains("spiffe://cluster.local/ns/demo/sa/web")
        ),
        "{context}"
    );
    // The SVID latchctl fetched names the requested ID.
    assert!(
        steps.contains("URI:spiffe://cluster.local/ns/demo/sa/cli"),
        "{context}"
    );
    assert!(steps.contains("notAfter="), "{context}");
    assert!(after.contains("=== done ==="), "{context}");
    assert!(
        leftovers.is_empty(),
        "left running after the clean-up line: {leftovers:?}\n{context}"
    );
    assert!(
        !scratch.exists(),
        "the clean-up line leaves the scratch folder (keys, tokens) behind"
    );
}
