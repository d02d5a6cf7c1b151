//! The docker-compose mesh of `deploy/compose`: builds its two images from binaries built on
//! the host (making the `debian:bookworm-slim` base with mmdebstrap when it is not present, as
//! nothing can be pulled on an offline machine), and brings a compose project up, waits until
//! it is healthy, and takes it down. Only shells out to docker, docker-compose, mmdebstrap and
//! strip. Used by `cargo xtask compose` and by the end-to-end test tests/tests/compose.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The base image both Dockerfiles default to (`ARG BASE`).
pub const BASE_IMAGE: &str = "debian:bookworm-slim";
/// Debian packages of the locally made base image: what the Latch image needs (iptables,
/// iproute2, ca-certificates, curl for health checks) and the demo apps' busybox, so that
/// neither Dockerfile has anything left to fetch.
pub const BASE_PACKAGES: &str = "iptables,iproute2,ca-certificates,curl,busybox";
/// The binaries the Latch image carries.
pub const BINARIES: [&str; 3] = ["latch-control", "latch-proxy", "latchctl"];
/// `docker-compose -p` of `cargo xtask compose up` (also in deploy/compose/.env).
pub const DEFAULT_PROJECT: &str = "latch";
/// The compose network's subnet (docker-compose.yml); only one project can use it at a time.
pub const SUBNET: &str = "10.77.0.0/24";
/// The label docker-compose puts on everything it creates for a project.
pub const PROJECT_LABEL: &str = "com.docker.compose.project";

/// The compose file, relative to the workspace root.
pub fn compose_file(root: &Path) -> PathBuf {
    root.join("deploy/compose/docker-compose.yml")
}

/// Image names; docker-compose.yml reads them from LATCH_IMAGE and LATCH_DEMO_IMAGE.
#[derive(Debug, Clone)]
pub struct Images {
    pub latch: String,
    pub demo: String,
}

impl Images {
    /// `latch:<tag>` and `latch-demo-app:<tag>`; the compose file's defaults use tag `local`.
    pub fn tagged(tag: &str) -> Self {
        Self {
            latch: format!("latch:{tag}"),
            demo: format!("latch-demo-app:{tag}"),
        }
    }

    fn env(&self) -> [(&'static str, &str); 2] {
        [
            ("LATCH_IMAGE", self.latch.as_str()),
            ("LATCH_DEMO_IMAGE", self.demo.as_str()),
        ]
    }
}

/// Runs `command`, failing with its stderr when it exits non-zero.
fn run(command: &mut Command) -> Result<Output> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?} (is it installed?)"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(output)
}

/// Runs `command` with its output going to ours (long builds show their progress).
fn run_visible(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?} (is it installed?)"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn docker(args: &[&str]) -> Result<String> {
    run(Command::new("docker").args(args)).map(|o| stdout(&o))
}

/// The image ID `reference` points at, if it exists.
fn image_id(reference: &str) -> Option<String> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", reference])
        .output()
        .ok()?;
    output.status.success().then(|| stdout(&output))
}

/// Whether the Docker engine answers (`docker info`), with the reason when it does not.
pub fn engine_available() -> Result<()> {
    let output = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .context("the docker CLI is not installed (apt-get install docker.io)")?;
    if !output.status.success() {
        bail!(
            "no Docker engine answers: {} (start dockerd)",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Makes `debian:bookworm-slim` from Debian packages with mmdebstrap, unless an image of that
/// name exists already (pulled, or made by an earlier run). Never pulls.
pub fn ensure_base_image() -> Result<()> {
    if image_id(BASE_IMAGE).is_some() {
        return Ok(());
    }
    let sources = debian_sources()?;
    eprintln!(
        "{BASE_IMAGE} is not present: building it with mmdebstrap from {} ({BASE_PACKAGES})",
        sources
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args([
            "--variant=minbase",
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            &format!("--include={BASE_PACKAGES}"),
            "bookworm",
            "-",
        ])
        .args(&sources)
        .stdout(Stdio::piped());
    let mut tarball = mmdebstrap
        .spawn()
        .context("cannot run mmdebstrap (apt-get install mmdebstrap)")?;
    let rootfs = tarball.stdout.take().context("mmdebstrap's stdout")?;
    let imported = Command::new("docker")
        .args(["import", "--change", "CMD [\"bash\"]", "-", BASE_IMAGE])
        .stdin(Stdio::from(rootfs))
        .output()
        .context("running docker import")?;
    let made = tarball.wait().context("waiting for mmdebstrap")?;
    if !made.success() {
        bail!("mmdebstrap failed ({made}); its messages are above");
    }
    if !imported.status.success() {
        bail!(
            "docker import failed: {}",
            String::from_utf8_lossy(&imported.stderr).trim()
        );
    }
    Ok(())
}

/// The host's apt source files that point at Debian's archive (third-party repositories, which
/// have no bookworm suite of their own, are left out).
fn debian_sources() -> Result<Vec<PathBuf>> {
    let mut candidates = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut listed: Vec<PathBuf> = dir
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "list" || e == "sources"))
            .collect();
        listed.sort();
        candidates.extend(listed);
    }
    let sources: Vec<PathBuf> = candidates
        .into_iter()
        .filter(|path| {
            std::fs::read_to_string(path).is_ok_and(|text| {
                text.lines()
                    .any(|l| !l.trim_start().starts_with('#') && l.contains("/debian"))
            })
        })
        .collect();
    if sources.is_empty() {
        bail!(
            "no Debian apt sources in /etc/apt to build {BASE_IMAGE} from; on a machine with a \
             registry, `docker pull {BASE_IMAGE}` instead"
        );
    }
    Ok(sources)
}

/// Builds both images from the binaries in `bin_dir` (e.g. target/release), staging the
/// Latch image's build context in `work_dir` (3 binaries, nothing else). The copies lose their
/// debug info (`strip --strip-debug`: 55 MB to 12 MB for a release latch-proxy, more for a
/// debug build); symbols stay, so a panic's backtrace still names functions.
/// A tag moved to a new build no longer holds the old image; that image is removed when
/// nothing else uses it, so rebuilds leave no dangling images behind.
pub fn build_images(root: &Path, bin_dir: &Path, work_dir: &Path, images: &Images) -> Result<()> {
    ensure_base_image()?;
    let context = work_dir.join("latch-image");
    let empty = work_dir.join("demo-app-image");
    for dir in [&context, &empty] {
        if dir.exists() {
            std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(context.join("bin"))?;
    std::fs::create_dir_all(&empty)?;
    for binary in BINARIES {
        let from = bin_dir.join(binary);
        let to = context.join("bin").join(binary);
        if !from.is_file() {
            bail!(
                "{} is missing: build the binaries first (cargo build --bins)",
                from.display()
            );
        }
        run(Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(&from))
        .context("strip comes with binutils (apt-get install binutils)")?;
    }
    let dockerfiles = root.join("deploy/compose");
    build_image(&dockerfiles.join("Dockerfile"), &context, &images.latch)?;
    build_image(
        &dockerfiles.join("demo-app.Dockerfile"),
        &empty,
        &images.demo,
    )?;
    Ok(())
}

fn build_image(dockerfile: &Path, context: &Path, tag: &str) -> Result<()> {
    let before = image_id(tag);
    let output = run(Command::new("docker")
        .args(["build", "--quiet", "--build-arg"])
        .arg(format!("BASE={BASE_IMAGE}"))
        .arg("-f")
        .arg(dockerfile)
        .args(["-t", tag])
        .arg(context))
    .with_context(|| format!("building {tag} from {}", dockerfile.display()))?;
    let after = stdout(&output);
    if let Some(old) = before.filter(|old| *old != after) {
        // Fails (harmlessly) when a container still uses the old image or another tag holds it.
        let _ = Command::new("docker")
            .args(["image", "rm", &old])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

/// The size of an image in bytes.
pub fn image_size(reference: &str) -> Result<u64> {
    docker(&["image", "inspect", "--format", "{{.Size}}", reference])?
        .parse()
        .with_context(|| format!("size of {reference}"))
}

/// One container of a project, as `docker inspect` sees it.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    /// The compose service (`com.docker.compose.service`).
    pub service: String,
    /// created, running, exited, ...
    pub status: String,
    /// healthy, unhealthy, starting, or empty without a health check.
    pub health: String,
    pub exit_code: i32,
}

/// Everything of a project that is left: container, network and volume names or IDs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
    pub volumes: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty() && self.networks.is_empty() && self.volumes.is_empty()
    }
}

/// A compose project of deploy/compose/docker-compose.yml.
#[derive(Debug, Clone)]
pub struct Project {
    root: PathBuf,
    pub name: String,
    images: Images,
    env: Vec<(String, String)>,
}

impl Project {
    pub fn new(root: &Path, name: &str, images: Images) -> Self {
        Self {
            root: root.to_path_buf(),
            name: name.to_string(),
            images,
            env: Vec::new(),
        }
    }

    /// An environment variable for docker-compose (the file reads e.g. LATCH_SVID_TTL).
    pub fn with_env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// `docker-compose -f <file> -p <name>` with the images and environment set.
    pub fn compose(&self) -> Command {
        let mut command = Command::new("docker-compose");
        command
            .arg("-f")
            .arg(compose_file(&self.root))
            .args(["-p", &self.name])
            .envs(self.images.env())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Starts the project and waits until every health check passes and every one-shot
    /// (capture) container has exited 0.
    pub fn up(&self, timeout: Duration) -> Result<()> {
        self.check_subnet_free()?;
        let mut up = self.compose();
        up.args(["up", "-d", "--remove-orphans"]);
        run(&mut up).with_context(|| format!("starting compose project {}", self.name))?;
        self.wait_healthy(timeout)
    }

    /// Fails with a useful message when another project (or anything) holds the subnet.
    fn check_subnet_free(&self) -> Result<()> {
        let networks = docker(&["network", "ls", "--quiet"])?;
        for id in networks.lines() {
            let described = docker(&[
                "network",
                "inspect",
                "--format",
                "{{.Name}}|{{index .Labels \"com.docker.compose.project\"}}|{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                id,
            ])?;
            let mut fields = described.splitn(3, '|');
            let (name, project, subnets) = (
                fields.next().unwrap_or_default(),
                fields.next().unwrap_or_default(),
                fields.next().unwrap_or_default(),
            );
            if project != self.name && subnets.split_whitespace().any(|s| s == SUBNET) {
                let hint = if project.is_empty() {
                    format!("docker network rm {name}")
                } else {
                    format!(
                        "docker-compose -p {project} -f deploy/compose/docker-compose.yml down -v, \
                         or cargo xtask compose down if it is {DEFAULT_PROJECT}"
                    )
                };
                bail!(
                    "network {name} (compose project {project:?}) already uses {SUBNET}, which \
                     the Latch compose mesh needs; stop it first: {hint}"
                );
            }
        }
        Ok(())
    }

    /// The project's containers (by label, so it works with compose v1's and v2's names).
    pub fn containers(&self) -> Result<Vec<Container>> {
        let filter = format!("label={PROJECT_LABEL}={}", self.name);
        let ids = docker(&["ps", "-a", "--quiet", "--filter", &filter])?;
        let mut containers = Vec::new();
        for id in ids.lines() {
            let described = docker(&[
                "inspect",
                "--format",
                "{{index .Config.Labels \"com.docker.compose.service\"}}|{{.State.Status}}|{{if .State.Health}}{{.State.Health.Status}}{{end}}|{{.State.ExitCode}}",
                id,
            ])?;
            let fields: Vec<&str> = described.split('|').collect();
            let [service, status, health, exit_code] = fields[..] else {
                bail!("unexpected docker inspect output for {id}: {described}");
            };
            containers.push(Container {
                id: id.to_string(),
                service: service.to_string(),
                status: status.to_string(),
                health: health.to_string(),
                exit_code: exit_code.parse().unwrap_or(-1),
            });
        }
        Ok(containers)
    }

    /// The ID of the (first) container of `service`.
    pub fn container(&self, service: &str) -> Result<String> {
        self.containers()?
            .into_iter()
            .find(|c| c.service == service)
            .map(|c| c.id)
            .with_context(|| format!("project {} has no container for {service}", self.name))
    }

    /// The last lines a container logged, for error messages.
    pub fn logs(&self, service: &str) -> String {
        let Ok(id) = self.container(service) else {
            return format!("(no container for {service})");
        };
        match Command::new("docker")
            .args(["logs", "--tail", "40", &id])
            .output()
        {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(docker logs {id}: {e})"),
        }
    }

    /// Waits until the project is healthy; fails at once when a container exits with an error
    /// or turns unhealthy, with its logs.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let containers = self.containers()?;
            if containers.is_empty() {
                bail!("project {} has no containers", self.name);
            }
            let mut waiting = Vec::new();
            for c in &containers {
                let failed = (c.status == "exited" && c.exit_code != 0) || c.health == "unhealthy";
                if failed {
                    bail!(
                        "{} is {} (exit code {}, health {:?}); its log:\n{}",
                        c.service,
                        c.status,
                        c.exit_code,
                        c.health,
                        self.logs(&c.service)
                    );
                }
                let done = if c.health.is_empty() {
                    c.status == "running" || c.status == "exited"
                } else {
                    c.health == "healthy"
                };
                if !done {
                    waiting.push(format!("{} ({} {})", c.service, c.status, c.health));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: String = waiting
                    .iter()
                    .filter_map(|w| w.split(' ').next())
                    .map(|s| format!("--- {s} ---\n{}", self.logs(s)))
                    .collect();
                bail!(
                    "project {} not healthy after {timeout:?}; waiting for: {}\n{logs}",
                    self.name,
                    waiting.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Removes the project's containers, networks and volumes.
    pub fn down(&self) -> Result<()> {
        let mut down = self.compose();
        down.args(["down", "--volumes", "--remove-orphans", "--timeout", "10"]);
        run(&mut down).with_context(|| format!("removing compose project {}", self.name))?;
        Ok(())
    }

    /// What carries the project's label now.
    pub fn leftovers(&self) -> Result<Leftovers> {
        let filter = format!("label={PROJECT_LABEL}={}", self.name);
        let list = |args: &[&str]| -> Result<Vec<String>> {
            Ok(docker(args)?.lines().map(str::to_string).collect())
        };
        Ok(Leftovers {
            containers: list(&["ps", "-a", "--quiet", "--filter", &filter])?,
            networks: list(&["network", "ls", "--quiet", "--filter", &filter])?,
            volumes: list(&["volume", "ls", "--quiet", "--filter", &filter])?,
        })
    }

    /// The name of the project's network (compose v1: `<project>_mesh`), found by label.
    pub fn network(&self) -> Result<String> {
        let filter = format!("label={PROJECT_LABEL}={}", self.name);
        let names = docker(&[
            "network",
            "ls",
            "--filter",
            &filter,
            "--format",
            "{{.Name}}",
        ])?;
        names
            .lines()
            .next()
            .map(str::to_string)
            .with_context(|| format!("project {} has no network", self.name))
    }
}

/// The target dir cargo builds into: CARGO_TARGET_DIR, or `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_relative() { root.join(p) } else { p })
        .unwrap_or_else(|| root.join("target"))
}

/// `cargo build --release --bins`, then both images from target/release (tags `local`).
pub fn build_release(root: &Path, cargo: &Path) -> Result<Images> {
    run_visible(
        Command::new(cargo)
            .current_dir(root)
            .args(["build", "--release", "--bins"]),
    )?;
    let target = target_dir(root);
    let images = Images::tagged("local");
    eprintln!("building images {} and {}", images.latch, images.demo);
    build_images(root, &target.join("release"), &target, &images)?;
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_named_by_tag() {
        let images = Images::tagged("e2e");
        assert_eq!(images.latch, "latch:e2e");
        assert_eq!(images.demo, "latch-demo-app:e2e");
    }

    #[test]
    fn compose_file_declares_the_subnet_and_images() {
        let text = std::fs::read_to_string(compose_file(&crate::codegen::workspace_root()))
            .expect("compose file");
        assert!(text.contains(&format!("subnet: {SUBNET}")), "{text}");
        assert!(text.contains("${LATCH_IMAGE:-latch:local}"));
        assert!(text.contains("${LATCH_DEMO_IMAGE:-latch-demo-app:local}"));
    }
}
