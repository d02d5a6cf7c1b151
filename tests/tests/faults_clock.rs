//! Fault injection (docs/reliability.md, "Faults"), clocks: a real latch-proxy whose clock runs two minutes ahead
//! of or behind the control plane's (libfaketime) keeps mTLS with its peer and renews its SVID,
//! with no failed exchange under load; prints the numbers docs/reliability.md reports. Skips
//! without libfaketime (fails with LATCH_REQUIRE_FAKETIME=1, as CI sets).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use latch_testkit::admin::is_ready;
use latch_testkit::apps::{Load, echo_app};
use latch_testkit::files::utf8;
use latch_testkit::processes::{ControlProcess, ProxySpec, wait_for_rotation};
use latch_testkit::wait_for;

/// Set to 1 (CI does) to fail, not skip, the clock-skew tests when libfaketime is missing.
const REQUIRE_FAKETIME_ENV: &str = "LATCH_REQUIRE_FAKETIME";

/// libfaketime's preload library (Debian package `faketime`), or a SKIPPED line / a panic
/// under LATCH_REQUIRE_FAKETIME=1.
fn libfaketime() -> Option<PathBuf> {
    let found = ["x86_64-linux-gnu", "aarch64-linux-gnu", ""]
        .iter()
        .flat_map(|arch| {
            ["/usr/lib", "/usr/local/lib"]
                .map(|lib| Path::new(lib).join(arch).join("faketime/libfaketime.so.1"))
        })
        .find(|path| path.is_file());
    if found.is_none() {
        if std::env::var(REQUIRE_FAKETIME_ENV).is_ok_and(|v| v == "1") {
            panic!(
                "{REQUIRE_FAKETIME_ENV}=1 but libfaketime.so.1 is missing (apt-get install faketime)"
            );
        }
        latch_testkit::skip::skipped(&format!(
            "needs libfaketime (apt-get install faketime); set {REQUIRE_FAKETIME_ENV}=1 to fail instead"
        ));
    }
    found
}

/// The first RFC 3339 UTC timestamp in a log (tracing's text format), as a SystemTime.
fn first_log_time(log: &str) -> Option<SystemTime> {
    let bytes = log.as_bytes();
    (0..bytes.len().saturating_sub(19)).find_map(|i| {
        let candidate = log.get(i..i + 19)?;
        let shape = candidate.bytes().enumerate().all(|(j, b)| match j {
            4 | 7 => b == b'-',
            10 => b == b'T',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
        if !shape {
            return None;
        }
        humantime::parse_rfc3339(&format!("{candidate}Z")).ok()
    })
}

/// Two proxies and the control plane; proxy "skewed" runs with its clock `offset_secs` off
/// (libfaketime: SystemTime and the monotonic clock). Traffic flows both ways through both
/// proxies while the SVID named `renewing` renews; no exchange may fail.
fn skewed_peers(
    offset_secs: i64,
    skewed_ttl: &'static str,
    plain_ttl: &'static str,
    renewing: &str,
) {
    let Some(lib) = libfaketime() else { return };
    let dir = tempfile::Builder::new()
        .prefix("lf-skew-")
        .tempdir()
        .expect("dir");
    let mut control = ControlProcess::new(dir.path(), &dir.path().join("data"));
    let process = control.start();
    let (plain_app, skewed_app) = (
        echo_app("127.0.0.1", "plain"),
        echo_app("127.0.0.1", "skewed"),
    );
    let mut plain = ProxySpec::new("plain", plain_ttl);
    let mut skewed = ProxySpec::new("skewed", skewed_ttl);
    skewed.env = vec![
        ("LD_PRELOAD".into(), utf8(&lib).into()),
        ("FAKETIME".into(), format!("{offset_secs:+}")),
    ];
    let to_skewed = plain.to(&skewed, skewed_app);
    let to_plain = skewed.to(&plain, plain_app);
    let plain_proxy = plain.start(&control, dir.path());
    let started = SystemTime::now();
    let skewed_proxy = skewed.start(&control, dir.path());
    let logs = || {
        format!(
            "{}\n{}\n{}",
            process.logs(),
            plain_proxy.logs(),
            skewed_proxy.logs()
        )
    };

    // The fault is real: the skewed proxy's own clock (its log timestamps) is off by the offset.
    let seen = first_log_time(&skewed_proxy.log()).expect("a timestamp in the skewed log");
    let skew = match seen.duration_since(started) {
        Ok(ahead) => ahead.as_secs_f64(),
        Err(behind) => -behind.duration().as_secs_f64(),
    };
    assert!(
        (skew - offset_secs as f64).abs() < 10.0,
        "the skewed proxy's clock is {skew:.0} s off, not {offset_secs} s"
    );

    let load = Load::start(&[(to_skewed, "skewed"), (to_plain, "plain")], 1);
    let (renewer, renewer_admin) = match renewing {
        "skewed" => (&skewed_proxy, skewed.admin.as_str()),
        _ => (&plain_proxy, plain.admin.as_str()),
    };
    let renewed_in = wait_for_rotation(renewer, renewer_admin);
    // A few exchanges more on new connections, so handshakes see the renewed SVID.
    let after = load.ok();
    assert!(
        wait_for(Duration::from_secs(10), || load.ok() > after + 20),
        "traffic stopped after the renewal\n{}",
        logs()
    );
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{} exchanges failed: {:?}\n{}",
        errors.len(),
        &errors[..errors.len().min(5)],
        logs()
    );
    assert!(
        is_ready(&skewed.admin) && is_ready(&plain.admin),
        "{}",
        logs()
    );
    println!(
        "clock of one proxy {offset_secs:+} s: {ok} exchanges both ways between the skewed and \
         the unskewed proxy, 0 failed; {renewing}'s SVID renewed after {:.1} s",
        renewed_in.as_secs_f64()
    );
}

/// Its clock ahead, the skewed proxy sees its SVIDs 120 s shorter: with a 135 s TTL it renews
/// after ~7 s of the 15 s it sees. The other proxy's SVID must outlive the skew to be accepted.
#[test]
fn clock_skew_proxy_two_minutes_ahead_keeps_mtls_and_renews() {
    skewed_peers(120, "135s", "10m", "skewed");
}

/// Its clock behind, the skewed proxy must accept SVIDs issued "in its future": the unskewed
/// proxy renews a 6 s SVID every ~3 s, and each new one is checked by the skewed proxy at every
/// handshake. (Its own SVID needs a TTL over the skew: it renews at half of TTL + 120 s.)
#[test]
fn clock_skew_proxy_two_minutes_behind_keeps_mtls_and_renews() {
    skewed_peers(-120, "10m", "6s", "plain");
}
