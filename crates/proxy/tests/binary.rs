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
