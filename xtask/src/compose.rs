//! The docker-compose mesh of `deploy/compose`: builds its two images from binaries built on
//! the host (on `debian:bookworm-slim` when it was pulled, else on `latch-base:bookworm`, made
//! with mmdebstrap, as nothing can be pulled on an offline machine), and brings a compose
//! project up on a free /24, waits until it is healthy, and takes it down. Only shells out to docker, docker-compose, mmdebstrap and
//! strip. Used by `cargo xtask compose` and by the end-to-end test tests/tests/compose.rs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The base image both Dockerfiles default to (`ARG BASE`), used when pulled from a registry.
pub const OFFICIAL_BASE_IMAGE: &str = "debian:bookworm-slim";
/// The base image made here with mmdebstrap when the official one was not pulled: Debian
/// bookworm plus `BASE_PACKAGES`, so not the official image and never under its name.
pub const LOCAL_BASE_IMAGE: &str = "latch-base:bookworm";
/// Debian packages of the locally made base image: what the Latch image needs (iptables,
/// iproute2, ca-certificates, curl for health checks) and the demo apps' busybox, so that
/// neither Dockerfile has anything left to fetch.
pub const BASE_PACKAGES: &str = "iptables,iproute2,ca-certificates,curl,busybox";
/// The binaries the Latch image carries.
pub const BINARIES: [&str; 4] = ["latch-control", "latch-proxy", "latchctl", "latch-cni"];
/// `docker-compose -p` of `cargo xtask compose up` (also in deploy/compose/.env).
pub const DEFAULT_PROJECT: &str = "latch";
/// The compose network's /24 by default (docker-compose.yml's `${LATCH_NET:-10.77.0}`), as its
/// first three numbers; a project moves to 10.77.N when this one is taken.
pub const DEFAULT_NET: &str = "10.77.0";
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
    image_field(reference, "{{.Id}}")
}

/// `docker image inspect --format <format>` of `reference`, if the image exists.
fn image_field(reference: &str, format: &str) -> Option<String> {
    let output = Command::new("docker")
        .args(["image", "inspect", "--format", format, reference])
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

/// The base image to build on: `debian:bookworm-slim` if it was pulled from a registry (it has
/// a repository digest), else `latch-base:bookworm`, made from Debian packages with
/// mmdebstrap unless an earlier run made it. Never pulls.
pub fn ensure_base_image() -> Result<String> {
    if let Some(digests) = image_field(OFFICIAL_BASE_IMAGE, "{{len .RepoDigests}}") {
        if digests != "0" {
            return Ok(OFFICIAL_BASE_IMAGE.to_string());
        }
        eprintln!(
            "{OFFICIAL_BASE_IMAGE} here was made locally (it has no registry digest; earlier \
             versions of `cargo xtask compose build` named their mmdebstrap image so) and is not \
             used; remove it with `docker image rm {OFFICIAL_BASE_IMAGE}`"
        );
    }
    if image_id(LOCAL_BASE_IMAGE).is_some() {
        return Ok(LOCAL_BASE_IMAGE.to_string());
    }
    let sources = debian_sources()?;
    eprintln!(
        "{OFFICIAL_BASE_IMAGE} was not pulled: building {LOCAL_BASE_IMAGE} with mmdebstrap from \
         {} ({BASE_PACKAGES})",
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
        .args([
            "import",
            "--change",
            "CMD [\"bash\"]",
            "-",
            LOCAL_BASE_IMAGE,
        ])
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
    Ok(LOCAL_BASE_IMAGE.to_string())
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
            "no Debian apt sources in /etc/apt to build {LOCAL_BASE_IMAGE} from; on a machine \
             with a registry, `docker pull {OFFICIAL_BASE_IMAGE}` instead"
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
    let base = ensure_base_image()?;
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
    build_image(
        &dockerfiles.join("Dockerfile"),
        &context,
        &base,
        &images.latch,
    )?;
    build_image(
        &dockerfiles.join("demo-app.Dockerfile"),
        &empty,
        &base,
        &images.demo,
    )?;
    Ok(())
}

fn build_image(dockerfile: &Path, context: &Path, base: &str, tag: &str) -> Result<()> {
    let before = image_id(tag);
    let output = run(Command::new("docker")
        .args(["build", "--quiet", "--build-arg"])
        .arg(format!("BASE={base}"))
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
    /// The first three numbers of the project's /24 (LATCH_NET).
    net: String,
    /// The control plane's config folder with the workloads' addresses in `net`, when it is
    /// not deploy/compose/config (LATCH_CONTROL_CONFIG).
    config_dir: Option<PathBuf>,
}

impl Project {
    pub fn new(root: &Path, name: &str, images: Images) -> Self {
        Self {
            root: root.to_path_buf(),
            name: name.to_string(),
            images,
            env: Vec::new(),
            net: DEFAULT_NET.to_string(),
            config_dir: None,
        }
    }

    /// Moves the project to a /24 no other Docker network overlaps: the one its network has
    /// already, else 10.77.0.0/24 if free, else the first free 10.77.N.0/24. Off the default,
    /// writes the control plane's config with the workloads' addresses in it under
    /// `<target>/compose/<project>/config`.
    pub fn with_free_subnet(mut self) -> Result<Self> {
        let networks = networks()?;
        let own = networks.iter().find_map(|n| {
            (n.project == self.name)
                .then(|| n.subnets.iter().find_map(|s| s.strip_suffix(".0/24")))
                .flatten()
        });
        let net = match own {
            Some(net) => net.to_string(),
            None => free_net(&networks, &self.name)?,
        };
        if net != DEFAULT_NET {
            let from = self.root.join("deploy/compose/config/control.yaml");
            let text = std::fs::read_to_string(&from)
                .with_context(|| format!("reading {}", from.display()))?;
            let dir = self.generated_dir().join("config");
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("control.yaml"),
                text.replace(&format!("{DEFAULT_NET}."), &format!("{net}.")),
            )?;
            self.config_dir = Some(dir);
        }
        self.net = net;
        Ok(self)
    }

    /// The project's /24, e.g. 10.77.0.0/24.
    pub fn subnet(&self) -> String {
        format!("{}.0/24", self.net)
    }

    /// The address of host `host` in the project's /24 (2: control, 10: client, 20: server).
    pub fn address(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
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
            .env("LATCH_NET", &self.net)
            .envs(self.images.env())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        if let Some(dir) = &self.config_dir {
            command.env("LATCH_CONTROL_CONFIG", dir);
        }
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

    /// Fails with a useful message when another network (of another project, or anything)
    /// overlaps the project's subnet.
    fn check_subnet_free(&self) -> Result<()> {
        let subnet = self.subnet();
        for network in networks()? {
            if network.project == self.name {
                continue;
            }
            if network.subnets.iter().any(|s| overlaps(s, &subnet)) {
                let (name, project) = (&network.name, &network.project);
                let hint = if project.is_empty() {
                    format!("docker network rm {name}")
                } else {
                    format!(
                        "docker-compose -p {project} -f deploy/compose/docker-compose.yml down -v, \
                         or cargo xtask compose down if it is {DEFAULT_PROJECT}"
                    )
                };
                bail!(
                    "network {name} (compose project {project:?}) overlaps {subnet}, which this \
                     compose project was to use; stop it first ({hint}) or start again: a free \
                     /24 is picked at start"
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

    /// Removes the project's containers, networks and volumes, and its generated config.
    pub fn down(&self) -> Result<()> {
        let mut down = self.compose();
        down.args(["down", "--volumes", "--remove-orphans", "--timeout", "10"]);
        run(&mut down).with_context(|| format!("removing compose project {}", self.name))?;
        let _ = std::fs::remove_dir_all(self.generated_dir());
        Ok(())
    }

    /// Where files made for this project live (`<target>/compose/<project>`).
    fn generated_dir(&self) -> PathBuf {
        target_dir(&self.root).join("compose").join(&self.name)
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

/// A Docker network: its name, compose project label (empty if none) and IPv4 subnets.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Network {
    name: String,
    project: String,
    subnets: Vec<String>,
}

/// Every Docker network with its subnets.
fn networks() -> Result<Vec<Network>> {
    let ids = docker(&["network", "ls", "--quiet"])?;
    let mut networks = Vec::new();
    for id in ids.lines() {
        let described = docker(&[
            "network",
            "inspect",
            "--format",
            "{{.Name}}|{{index .Labels \"com.docker.compose.project\"}}|{{range .IPAM.Config}}{{.Subnet}} {{end}}",
            id,
        ])?;
        let mut fields = described.splitn(3, '|');
        networks.push(Network {
            name: fields.next().unwrap_or_default().to_string(),
            project: fields.next().unwrap_or_default().to_string(),
            subnets: fields
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_string)
                .collect(),
        });
    }
    Ok(networks)
}

/// The first 10.77.N (N from 0) whose /24 no network of another project overlaps.
fn free_net(networks: &[Network], project: &str) -> Result<String> {
    (0..=255)
        .map(|n| format!("10.77.{n}"))
        .find(|net| {
            let subnet = format!("{net}.0/24");
            networks
                .iter()
                .filter(|n| n.project != project)
                .all(|n| n.subnets.iter().all(|s| !overlaps(s, &subnet)))
        })
        .context("every 10.77.N.0/24 is taken by a Docker network; remove some (docker network ls)")
}

/// Whether two IPv4 CIDRs share an address (anything else, e.g. IPv6, never overlaps).
fn overlaps(a: &str, b: &str) -> bool {
    let parse = |cidr: &str| -> Option<(u32, u32)> {
        let (ip, len) = cidr.split_once('/')?;
        Some((
            u32::from(ip.parse::<std::net::Ipv4Addr>().ok()?),
            len.parse().ok()?,
        ))
    };
    match (parse(a), parse(b)) {
        (Some((a, la)), Some((b, lb))) => {
            let len = la.min(lb).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            a & mask == b & mask
        }
        _ => false,
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
    fn a_free_net_skips_overlapping_networks_of_other_projects() {
        let network = |name: &str, project: &str, subnets: &[&str]| Network {
            name: name.into(),
            project: project.into(),
            subnets: subnets.iter().map(|s| s.to_string()).collect(),
        };
        let bridge = network("bridge", "", &["172.17.0.0/16"]);
        assert_eq!(
            free_net(std::slice::from_ref(&bridge), "b").unwrap(),
            DEFAULT_NET
        );
        let first = network("a_mesh", "a", &["10.77.0.0/24"]);
        assert_eq!(
            free_net(&[bridge.clone(), first.clone()], "b").unwrap(),
            "10.77.1"
        );
        assert_eq!(
            free_net(std::slice::from_ref(&first), "a").unwrap(),
            DEFAULT_NET,
            "its own"
        );
        let wide = network("wide", "", &["10.77.0.0/23", "fd00::/64"]);
        assert_eq!(free_net(&[wide], "b").unwrap(), "10.77.2");
        let everything = network("ten", "", &["10.0.0.0/8"]);
        assert!(free_net(&[everything], "b").is_err());
        assert!(overlaps("10.77.0.0/24", "10.77.0.128/25"));
        assert!(!overlaps("10.77.0.0/24", "10.77.1.0/24"));
        assert!(!overlaps("fd00::/64", "10.77.0.0/24"));
    }

    #[test]
    fn compose_file_declares_the_subnet_and_images() {
        let text = std::fs::read_to_string(compose_file(&crate::codegen::workspace_root()))
            .expect("compose file");
        assert!(
            text.contains(&format!("subnet: ${{LATCH_NET:-{DEFAULT_NET}}}.0/24")),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
            assert!(
                !line.contains(&format!("{DEFAULT_NET}.")) || line.contains("${LATCH_NET:-"),
                "every address follows LATCH_NET: {line}"
            );
        }
        assert!(text.contains("${LATCH_IMAGE:-latch:local}"));
        assert!(text.contains("${LATCH_DEMO_IMAGE:-latch-demo-app:local}"));
    }
}
