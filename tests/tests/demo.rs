//! `cargo xtask demo` as a newcomer runs it: the real `latch-demo` binary (with
//! `--keep-running`, as from a terminal) in a scratch folder. Once it says the mesh keeps
//! running, latch-control and both proxies must still answer and carry a request; Ctrl-C
//! (SIGINT) must then stop the demo and every process it started.

use std::process::Command;
use std::time::{Duration, Instant};

use latch_testkit::binaries::workspace_binary;
use latch_testkit::files::temp_dir;
use latch_testkit::{Child, admin};

/// The demo's "name: pid N, admin http://ADDR/ready" lines after "The mesh keeps running".
fn running_processes(log: &str) -> Vec<(String, u32, String)> {
    let tail = log
        .split_once("The mesh keeps running")
        .map_or("", |(_, tail)| tail);
    tail.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(": pid ")?;
            let (pid, admin) = rest.split_once(", admin http://")?;
            Some((
                name.to_string(),
                pid.parse().ok()?,
                admin.strip_suffix("/ready")?.to_string(),
            ))
        })
        .collect()
}

#[test]
fn demo_keeps_the_mesh_running_until_ctrl_c() {
    let dir = temp_dir("demo");
    let mut command = Command::new(workspace_binary("latch-demo"));
    command.arg("--keep-running").current_dir(dir.path());
    let mut demo = Child::spawn("latch-demo", command, &dir.path().join("demo.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !demo.log().contains("press Ctrl-C to stop") {
        demo.assert_running();
        assert!(
            Instant::now() < deadline,
            "no 'keeps running' line\n{}",
            demo.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = demo.log();
    let processes = running_processes(&log);
    let names: Vec<&str> = processes.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["latch-control", "api's proxy", "web's proxy"],
        "{log}"
    );

    // Well after the line: everything still answers, and a request crosses the mesh.
    std::thread::sleep(Duration::from_secs(2));
    for (name, pid, admin) in &processes {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) is gone although the demo says the mesh keeps running\n{log}"
        );
        assert!(
            admin::is_ready(admin),
            "{name}'s /ready at {admin} does not answer 200\n{log}"
        );
    }
    let entry = log
        .lines()
        .find_map(|l| l.trim().strip_prefix("web's entry to api: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no entry address\n{log}"))
        .to_string();
    let reply = {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(&entry).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        tcp.write_all(b"still there?").unwrap();
        let mut reply = vec![0u8; 512];
        let n = tcp.read(&mut reply).unwrap();
        String::from_utf8_lossy(&reply[..n]).into_owned()
    };
    assert!(reply.contains("api says hello"), "{reply}");

    // Ctrl-C: the demo ends cleanly and takes every process with it.
    assert!(demo.signal("INT"));
    let status = demo.wait_exit(Duration::from_secs(15));
    assert!(
        status.is_some_and(|s| s.success()),
        "demo after SIGINT: {status:?}\n{}",
        demo.logs()
    );
    assert!(
        demo.log().contains("Everything has stopped."),
        "{}",
        demo.logs()
    );
    for (name, pid, admin) in &processes {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) still runs after the demo stopped"
        );
        assert!(
            admin::get_blocking(admin, "/healthz").is_none(),
            "{name}'s admin {admin} still answers"
        );
    }
}
