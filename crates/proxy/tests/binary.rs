//! The real `latch-proxy` binary as an operator meets it: its help names both forms of
//! `--outbound` and says that `--ca-bundle` is required, its admin variable is
//! LATCH_PROXY_ADMIN, and a LATCH_ADMIN meant for latch-control or latchctl stops start-up with
//! a message instead of being silently ignored.

use std::process::{Command, Output};

const BINARY: &str = env!("CARGO_BIN_EXE_latch-proxy");

/// `latch-proxy` with no LATCH_* variable leaking in from the caller.
fn command() -> Command {
    let mut cmd = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCH_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// The help text of `flag` in `latch-proxy --help`, its lines joined.
fn help_of(help: &str, flag: &str) -> String {
    let start = help
        .find(&format!("      {flag} "))
        .unwrap_or_else(|| panic!("{flag} in\n{help}"));
    let rest = &help[start..];
    let end = rest[2..].find("\n      --").map_or(rest.len(), |i| i + 2);
    rest[..end].split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn help_names_both_outbound_forms_the_required_bundle_and_the_admin_variable() {
    let out = command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let outbound = help_of(&help, "--outbound");
    assert!(
        outbound.contains("LISTEN=IP:PORT")
            && outbound.contains("LISTEN=SPIFFE_ID@MESH_HOST:MESH_PORT/TARGET_PORT"),
        "{outbound}"
    );
    let bundle = help_of(&help, "--ca-bundle");
    assert!(
        bundle.contains("Required") && bundle.contains("[env: LATCH_CA_BUNDLE="),
        "{bundle}"
    );
    let admin = help_of(&help, "--admin");
    assert!(admin.contains("[env: LATCH_PROXY_ADMIN="), "{admin}");
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn latch_admin_of_the_control_plane_is_not_taken_for_the_proxy_admin() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("no-bundle.pem");
    let bundle = bundle.to_str().unwrap();
    let base = [
        "--ca-bundle",
        bundle,
        "--join-token",
        "a-join-token-0123456789",
    ];

    let out = command()
        .env("LATCH_ADMIN", "127.0.0.1:15014")
        .args(base)
        .output()
        .unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert_eq!(
        text.matches("LATCH_ADMIN is set (127.0.0.1:15014) but latch-proxy does not read it")
            .count(),
        1,
        "said once:\n{text}"
    );
    assert!(text.contains("--admin or LATCH_PROXY_ADMIN"), "{text}");

    // With the proxy's own address given, LATCH_ADMIN is another program's business: start-up
    // goes on (and here stops at the missing bundle).
    for (given, variable) in [
        (vec!["--admin", "127.0.0.1:0"], None),
        (vec![], Some("127.0.0.1:0")),
    ] {
        let mut cmd = command();
        cmd.env("LATCH_ADMIN", "127.0.0.1:15014")
            .args(base)
            .args(&given);
        if let Some(value) = variable {
            cmd.env("LATCH_PROXY_ADMIN", value);
        }
        let out = cmd.output().unwrap();
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{text}");
        assert!(!text.contains("LATCH_ADMIN is set"), "{given:?}: {text}");
        assert!(text.contains("no-bundle.pem"), "{given:?}: {text}");
    }
}

/// The long flags of `latch-proxy --help`, in order.
fn help_flags(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line.strip_prefix("-h, ").unwrap_or(line);
            let line = line.strip_prefix("-V, ").unwrap_or(line);
            let flag = line.split([' ', '=', '<']).next()?;
            (flag.starts_with("--") && flag.len() > 2).then(|| flag.to_string())
        })
        .collect()
}

/// The flags named in the first column of the README's latch-proxy flag table.
fn readme_flags() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let section = &readme[readme
        .find("\n## latch-proxy\n")
        .expect("a latch-proxy section")..];
    let table = section
        .lines()
        .skip_while(|line| !line.starts_with("| flag |"))
        .take_while(|line| line.starts_with('|'))
        .skip(2);
    table
        .flat_map(|row| {
            let first = row.split('|').nth(1).unwrap_or_default();
            first
                .split('`')
                .filter(|part| part.starts_with("--"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_readme_flag_table_lists_every_flag_of_the_help() {
    let out = command().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    let mut in_help = help_flags(&help);
    in_help.retain(|flag| flag != "--help" && flag != "--version");
    assert!(in_help.contains(&"--worker-threads".to_string()), "{help}");
    let mut in_readme = readme_flags();
    in_help.sort();
    in_readme.sort();
    assert_eq!(
        in_help, in_readme,
        "latch-proxy --help vs README's flag table"
    );
}

#[test]
fn worker_threads_is_a_flag_and_a_variable_and_zero_is_refused() {
    let out = command().arg("--help").output().unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let text = help_of(&help, "--worker-threads");
    assert!(
        text.contains("[env: LATCH_WORKER_THREADS=") && text.contains("[default: "),
        "{text}"
    );
    for (flag, variable) in [(Some("0"), None), (None, Some("0"))] {
        let mut cmd = command();
        if let Some(value) = flag {
            cmd.args(["--worker-threads", value]);
        }
        if let Some(value) = variable {
            cmd.env("LATCH_WORKER_THREADS", value);
        }
        let out = cmd.output().unwrap();
        let text = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{text}");
        assert!(
            text.contains("0 worker threads cannot run the proxy: give at least 1"),
            "{text}"
        );
    }
}

/// Threads of process `pid` whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
                .filter(|name| name.starts_with(prefix))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn the_runtime_runs_the_number_of_worker_threads_asked_for() {
    // Without a control plane the proxy keeps trying to get its SVID; its runtime runs all the
    // same. Its threads are named latch-worker (blocking-pool threads would be too, but start
    // only for blocking work, which this proxy does not do).
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    let (ca_pem, _) = latch_testkit::certs::ca_and_svid("spiffe://cluster.local/ns/a/sa/b");
    std::fs::write(&bundle, ca_pem).unwrap();
    for workers in [1usize, 5] {
        let mut child = command()
            .args(["--ca-bundle", bundle.to_str().unwrap()])
            .args(["--join-token", "a-join-token-0123456789"])
            .args(["--control-plane", "127.0.0.1:9", "--admin", "127.0.0.1:0"])
            .args(["--inbound", "127.0.0.1:0", "--discovery=false"])
            .args(["--worker-threads", &workers.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut seen = 0;
        while std::time::Instant::now() < deadline && seen < workers {
            std::thread::sleep(std::time::Duration::from_millis(50));
            seen = threads_named(child.id(), "latch-worker");
        }
        // A moment more, to see no more than asked for.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let threads = threads_named(child.id(), "latch-worker");
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(threads, workers, "--worker-threads {workers}");
    }
}
