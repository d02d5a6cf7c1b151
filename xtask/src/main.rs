//! `cargo xtask <task>`: codegen, demo, bench, compose, fuzz. Each task is a thin wrapper around
//! cargo, docker and the project's own binaries so that what a developer runs is what CI runs.

use std::os::unix::process::CommandExt;
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
        Some("compose") => compose(&root, args.get(1).map(String::as_str)),
        Some("demo") => run_tests_bin(&root, "latch-demo", &args[1..]),
        Some("bench") => run_tests_bin(&root, "latch-bench", &args[1..]),
        Some("fuzz") => {
            let fuzz_args = xtask::fuzz::FuzzArgs::parse(&args[1..])?;
            let runs = xtask::fuzz::run(&root, std::path::Path::new(env!("CARGO")), &fuzz_args)?;
            print!("{}", xtask::fuzz::summary(&runs));
            Ok(())
        }
        _ => {
            eprintln!(
                "usage: cargo xtask <task>\n\n\
                 tasks:\n  \
                 codegen            regenerate crates/proto/src/generated from proto/\n  \
                 demo               run a local mesh: control plane, certificates, mTLS\n  \
                 bench ca [--clients N] [--seconds S]\n                     \
                 SVIDs issued per second over gRPC\n  \
                 bench jwt [--clients N] [--seconds S]\n                     \
                 JWT-SVIDs issued per second: signing, control plane, Workload API\n  \
                 bench mesh [--quick] [--reps N] [--seconds S]\n                     \
                 Latch vs stunnel, HAProxy and no proxy (root: installs tools, private netns)\n  \
                 bench discovery [--proxies 1000,5000,10000] [--modes wildcard,on-demand] [--changes N]\n                     \
                 wildcard vs on-demand proxies: sync, a change to the last ACK, memory per proxy\n  \
                 bench handshake [--handshakes N] [--rounds R]\n                     \
                 full mTLS handshakes with and without ML-KEM: bytes and CPU\n  \
                 bench load [--idle N] [--rate R] [--seconds S]\n                     \
                 idle connections + churn through Latch and HAProxy pairs (root, netns)\n  \
                 compose build      the Docker images latch:local and latch-demo-app:local\n  \
                 compose up         build, then start deploy/compose (project \"latch\")\n  \
                 compose test       the end-to-end test against the Docker engine\n  \
                 compose down       remove the project's containers, networks and volumes\n  \
                 fuzz [--seconds N] [--merge] [--write-seeds] [TARGET...]\n                     \
                 run each fuzz target N s (default 60) on fuzz/corpus; fail on a crash"
            );
            bail!("unknown or missing task");
        }
    }
}

/// Builds the release binaries and becomes one of them (`latch-demo` of latch-tests,
/// `latch-bench` of latch-bench) with the given arguments.
fn run_tests_bin(root: &std::path::Path, bin: &str, args: &[String]) -> Result<()> {
    // Cargo's own progress (the crate being compiled, n/total) shows on the terminal: the first
    // build takes minutes, later ones a second.
    eprintln!(
        "building the release binaries ({}): cargo build --release --bins",
        xtask::compose::target_dir(root).join("release").display()
    );
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(xtask::RELEASE_BUILD)
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let path = xtask::compose::target_dir(root).join("release").join(bin);
    // Replaces this process (as `cargo run` replaced itself with us): on Ctrl-C the terminal
    // then waits until the demo has stopped everything and said so, instead of returning to
    // the prompt as soon as we die of SIGINT.
    let error = Command::new(&path).current_dir(root).args(args).exec();
    Err(error).with_context(|| format!("running {}", path.display()))
}

/// `cargo xtask compose build|up|test|down`: the docker-compose mesh of deploy/compose.
fn compose(root: &std::path::Path, action: Option<&str>) -> Result<()> {
    use std::time::{Duration, Instant};
    use xtask::compose::{
        DEFAULT_NET, DEFAULT_PROJECT, Images, Project, build_release, engine_available,
    };

    let cargo = std::path::Path::new(env!("CARGO"));
    let project = || Project::new(root, DEFAULT_PROJECT, Images::tagged("local"));
    match action {
        Some("build") => {
            engine_available()?;
            let images = build_release(root, cargo)?;
            report_sizes(&images)
        }
        Some("up") => {
            engine_available()?;
            let images = build_release(root, cargo)?;
            report_sizes(&images)?;
            let started = Instant::now();
            let project = project().with_free_subnet()?;
            eprintln!(
                "starting compose project {DEFAULT_PROJECT} on {}",
                project.subnet()
            );
            if project.subnet() != format!("{DEFAULT_NET}.0/24") {
                eprintln!(
                    "{DEFAULT_NET}.0/24 is taken by another Docker network (a second copy of the \
                     mesh?): the server is {} here, not {DEFAULT_NET}.20",
                    project.address(20)
                );
            }
            project.up(Duration::from_secs(120))?;
            println!(
                "mesh up and healthy in {:.1} s. Watch the client's requests:\n  \
                 cd deploy/compose && docker-compose logs -f client\n\
                 Stop it with: cargo xtask compose down",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some("down") => {
            let project = project();
            project.down()?;
            let left = project.leftovers()?;
            if !left.is_empty() {
                bail!("left behind after docker-compose down: {left:?}");
            }
            println!("compose project {DEFAULT_PROJECT} removed");
            Ok(())
        }
        Some("test") => {
            let status = Command::new(cargo)
                .current_dir(root)
                .args([
                    "test",
                    "-p",
                    "latch-tests",
                    "--test",
                    "compose",
                    "--",
                    "--nocapture",
                ])
                .env("LATCH_REQUIRE_DOCKER", "1")
                .status()
                .context("running cargo test")?;
            if !status.success() {
                bail!("the compose test failed");
            }
            Ok(())
        }
        _ => bail!("usage: cargo xtask compose build|up|test|down"),
    }
}

fn report_sizes(images: &xtask::compose::Images) -> Result<()> {
    for image in [&images.latch, &images.demo] {
        let size = xtask::compose::image_size(image)?;
        println!("{image}: {:.0} MB", size as f64 / 1e6);
    }
    Ok(())
}
