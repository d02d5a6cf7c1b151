//! `latchctl`, the operator CLI: create join tokens through the control plane's admin API,
//! fetch SVIDs as files or from a proxy's SPIFFE Workload API, inject the sidecar into
//! Kubernetes manifests offline, and print the injector webhook's caBundle. Each subcommand is a thin shell over latch-identity,
//! latch-inject and the admin API.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use clap::{Parser, Subcommand};
use latch_identity::client::{CaClient, control_plane_id};
use latch_identity::{CertStore, ExpectedPeer, TrustBundle, TrustDomain, files};
use latch_mesh::ports::{CONTROL_ADMIN, CONTROL_GRPC};

mod admin_client;

#[derive(Debug, Parser)]
#[command(name = "latchctl", version, about = "Operate a Latch mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join tokens: credentials bound to one SPIFFE ID, for workloads outside Kubernetes.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// X509-SVIDs.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// JWT-SVIDs.
    Jwt {
        #[command(subcommand)]
        command: JwtCommand,
    },
    /// Add the latch-proxy sidecar to Kubernetes manifests, as the injector webhook would:
    /// Pods and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets,
    /// ReplicationControllers, Jobs and CronJobs; other documents pass through unchanged.
    Inject {
        /// Multi-document YAML to read, or - for standard input.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        /// Where to write the result (standard output when absent).
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
        /// Image of the injected containers.
        #[arg(long, env = "LATCH_INJECT_IMAGE", default_value = latch_inject::DEFAULT_IMAGE)]
        image: String,
        /// The control plane's gRPC address as pods reach it.
        #[arg(long, env = "LATCH_INJECT_CONTROL_PLANE", default_value = latch_inject::DEFAULT_CONTROL_PLANE)]
        inject_control_plane: String,
        /// Trust domain the proxies join.
        #[arg(long, env = "LATCH_TRUST_DOMAIN", default_value = latch_inject::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        #[command(flatten)]
        proxy: latch_inject::settings::ProxyFlags,
    },
    /// The injector webhook's MutatingWebhookConfiguration.
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// The control plane's CA: its certificates, and rotating its root without downtime.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Identities the control plane issued SVIDs for, and taking one back (revocation).
    Identity {
        #[command(subcommand)]
        command: IdentityCommand,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Where the control plane's admin API is, and the data dir holding its credential.
#[derive(Debug, clap::Args)]
struct AdminArgs {
    /// The control plane's admin address.
    #[arg(
        long,
        env = "LATCH_ADMIN",
        default_value_t = format!("127.0.0.1:{CONTROL_ADMIN}"),
        global = true
    )]
    admin: String,
    /// The control plane's data dir, where the admin credential (admin.token) lives.
    #[arg(
        long,
        env = "LATCH_DATA_DIR",
        default_value = "./latch-data",
        global = true
    )]
    data_dir: PathBuf,
}

impl AdminArgs {
    fn client(&self) -> admin_client::Admin<'_> {
        admin_client::Admin {
            address: &self.admin,
            data_dir: &self.data_dir,
        }
    }
}

#[derive(Debug, Subcommand)]
enum IdentityCommand {
    /// The identities issued for since the control plane started, each with the proof and
    /// serial of its latest SVID (JSON).
    List,
    /// Revoke a SPIFFE ID: every SVID of it issued so far gets no renewal, proxies refuse it
    /// and close its connections within a second; a workload registered again afterwards (a
    /// new join token) works. Kept across restarts until no revoked SVID can still be valid.
    Revoke {
        /// The SPIFFE ID to revoke.
        #[arg(long)]
        spiffe_id: String,
        /// Why: kept with the revocation and told to the workload when it is refused.
        #[arg(long)]
        reason: String,
    },
    /// The revocations in force (JSON).
    Revocations,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Print the CA certificates, where a rotation stands, and which connected proxies do not
    /// hold the current trust bundle yet (JSON).
    Status,
    /// Rotate the root in three steps: `prepare` (a new root joins the trust bundle, signing
    /// nothing), `activate` (once every connected proxy has the new bundle: the new root signs,
    /// the old one stays trusted), `retire` (once the longest leaf lifetime has passed since
    /// activation: the old root leaves the bundle).
    Rotate {
        #[command(subcommand)]
        step: RotateStep,
    },
}

#[derive(Debug, Subcommand)]
enum RotateStep {
    /// Generate the new root and add it to the trust bundle.
    Prepare,
    /// Sign with the new root from now on. Refused while a connected proxy has not
    /// acknowledged the bundle holding it.
    Activate {
        /// Activate even though some connected proxies lack the new bundle (they will refuse
        /// peers holding new certificates until they get it).
        #[arg(long)]
        force: bool,
    },
    /// Drop the previous root from the trust bundle. Refused before the longest leaf lifetime
    /// has passed since activation.
    Retire,
}

#[derive(Debug, Subcommand)]
enum WebhookCommand {
    /// Print the webhook's caBundle value: the control plane's root(s), PEM, base64-encoded.
    CaBundle {
        /// The control plane's trust bundle: <data-dir>/bundle.pem, or the CA certificate in
        /// the latch-ca Secret.
        #[arg(long, env = "LATCH_CA_BUNDLE")]
        bundle: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a join token and print it (the only time it is shown).
    Create {
        /// The SPIFFE ID the token grants.
        #[arg(long)]
        spiffe_id: String,
        /// How long the token can be used.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Allow the token to be used more than once (workloads that restart).
        #[arg(long)]
        reusable: bool,
        /// The control plane's admin address.
        #[arg(long, env = "LATCH_ADMIN", default_value_t = format!("127.0.0.1:{CONTROL_ADMIN}"))]
        admin: String,
        /// The control plane's data dir, where the admin credential (admin.token) lives.
        #[arg(long, env = "LATCH_DATA_DIR", default_value = "./latch-data")]
        data_dir: PathBuf,
        /// Print the whole answer as JSON instead of just the token.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum JwtCommand {
    /// Fetch a JWT-SVID for the audiences from the SPIFFE Workload API, as an app would, and
    /// print the token alone on standard output (its SPIFFE ID on standard error).
    Fetch {
        /// The Workload API socket, unix:///path (SPIFFE_ENDPOINT_SOCKET).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// An audience (`aud`) of the token; repeat for several.
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
    /// Replace the control plane's JWT signing key (as --jwt-key-rotation does on its
    /// schedule): the new key is published now and signs 2 minutes later, once every verifier
    /// has it; the replaced key stays in the JWT bundle until its tokens have expired. Prints
    /// the new key id, when it signs, the key signing now and the bundle's key ids (JSON).
    Rotate {
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Fetch the X509-SVID from the SPIFFE Workload API, as an app would, and print its SPIFFE
    /// ID, serial and expiry (one line per SVID received; with --watch, again on every rotation).
    Fetch {
        /// The Workload API socket, unix:///path (SPIFFE_ENDPOINT_SOCKET, as SPIFFE libraries
        /// read it; an injected pod has it set).
        #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
        socket: String,
        /// Keep the stream open and print each rotation.
        #[arg(long)]
        watch: bool,
    },
    /// Generate a key, get an SVID for it, and write svid.pem, svid.key (0600) and bundle.pem.
    Request {
        /// Join token (or set LATCH_JOIN_TOKEN).
        #[arg(long, env = "LATCH_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// The control plane's gRPC address.
        #[arg(long, env = "LATCH_CONTROL_PLANE", default_value_t = format!("127.0.0.1:{CONTROL_GRPC}"))]
        control_plane: String,
        /// Trust bundle (PEM) to verify the control plane with: <data-dir>/bundle.pem.
        #[arg(long, env = "LATCH_CA_BUNDLE")]
        bundle: PathBuf,
        /// Output folder (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// Requested lifetime (the server's default when absent).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// Trust domain of the control plane (its SVID must be
        /// spiffe://<trust-domain>/ns/latch-system/sa/latch-control).
        #[arg(long, env = "LATCH_TRUST_DOMAIN", default_value = "cluster.local")]
        trust_domain: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", latch_identity::error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Token {
            command:
                TokenCommand::Create {
                    spiffe_id,
                    ttl,
                    reusable,
                    admin,
                    data_dir,
                    json,
                },
        } => {
            let created =
                admin_client::create_token(&admin, &data_dir, &spiffe_id, ttl, reusable).await?;
            if json {
                println!("{created}");
            } else {
                let token = created["token"]
                    .as_str()
                    .context("control plane answered without a token")?;
                println!("{token}");
            }
            Ok(())
        }
        Command::Cert {
            command:
                CertCommand::Request {
                    token,
                    control_plane,
                    bundle,
                    out,
                    ttl,
                    trust_domain,
                },
        } => request_cert(&token, &control_plane, &bundle, &out, ttl, &trust_domain).await,
        Command::Cert {
            command: CertCommand::Fetch { socket, watch },
        } => fetch_svid(&socket, watch).await,
        Command::Jwt {
            command: JwtCommand::Fetch { socket, audience },
        } => fetch_jwt_svid(&socket, audience).await,
        Command::Jwt {
            command: JwtCommand::Rotate { admin },
        } => {
            let answer = admin
                .client()
                .call(
                    hyper::Method::POST,
                    "/v1/jwt/rotate",
                    None,
                    "the control plane refused to rotate the JWT signing key",
                )
                .await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Inject {
            file,
            output,
            image,
            inject_control_plane,
            trust_domain,
            proxy,
        } => {
            TrustDomain::new(&trust_domain)
                .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
            let config = latch_inject::InjectConfig {
                image,
                control_plane: inject_control_plane,
                trust_domain,
                proxy: proxy.settings().map_err(anyhow::Error::msg)?,
            };
            inject(&file, output.as_deref(), &config)
        }
        Command::Ca { command, admin } => {
            let admin = admin.client();
            let answer = match command {
                CaCommand::Status => {
                    admin
                        .call(
                            hyper::Method::GET,
                            "/v1/ca",
                            None,
                            "cannot read the CA status",
                        )
                        .await?
                }
                CaCommand::Rotate { step } => {
                    let (name, body) = match step {
                        RotateStep::Prepare => ("prepare", None),
                        RotateStep::Activate { force } => {
                            ("activate", Some(serde_json::json!({ "force": force })))
                        }
                        RotateStep::Retire => ("retire", None),
                    };
                    admin
                        .call(
                            hyper::Method::POST,
                            &format!("/v1/ca/rotate/{name}"),
                            body,
                            &format!("the control plane refused to {name} the rotation"),
                        )
                        .await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Identity { command, admin } => {
            let admin = admin.client();
            let (method, path, body, what) = match command {
                IdentityCommand::List => (
                    hyper::Method::GET,
                    "/v1/identities",
                    None,
                    "cannot list the identities",
                ),
                IdentityCommand::Revoke { spiffe_id, reason } => (
                    hyper::Method::POST,
                    "/v1/revocations",
                    Some(serde_json::json!({ "spiffe_id": spiffe_id, "reason": reason })),
                    "the control plane refused the revocation",
                ),
                IdentityCommand::Revocations => (
                    hyper::Method::GET,
                    "/v1/revocations",
                    None,
                    "cannot list the revocations",
                ),
            };
            let answer = admin.call(method, path, body, what).await?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
        Command::Webhook {
            command: WebhookCommand::CaBundle { bundle },
        } => {
            let pem = std::fs::read(&bundle)
                .with_context(|| format!("reading the trust bundle {}", bundle.display()))?;
            TrustBundle::from_pem(&pem)
                .with_context(|| format!("trust bundle {}", bundle.display()))?;
            println!("{}", base64::engine::general_purpose::STANDARD.encode(&pem));
            Ok(())
        }
    }
}

fn inject(file: &Path, output: Option<&Path>, config: &latch_inject::InjectConfig) -> Result<()> {
    let mut yaml = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut yaml)
            .context("reading standard input")?;
    } else {
        yaml =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    let (injected, outcomes) = latch_inject::manifest::inject_manifests(&yaml, config)
        .with_context(|| format!("injecting {}", file.display()))?;
    match output {
        Some(path) => std::fs::write(path, &injected)
            .with_context(|| format!("writing {}", path.display()))?,
        None => std::io::stdout()
            .write_all(injected.as_bytes())
            .context("writing standard output")?,
    }
    for outcome in outcomes {
        match outcome.skipped {
            None => eprintln!("injected {}", outcome.object),
            Some(reason) => eprintln!("left {} unchanged: {reason}", outcome.object),
        }
        for warning in outcome.warnings {
            eprintln!("warning: {}: {warning}", outcome.object);
        }
    }
    Ok(())
}

async fn request_cert(
    token: &str,
    control_plane: &str,
    bundle_path: &Path,
    out: &Path,
    ttl: Option<Duration>,
    trust_domain: &str,
) -> Result<()> {
    if token.is_empty() {
        bail!("--token is empty");
    }
    let trust_domain = TrustDomain::new(trust_domain)
        .with_context(|| format!("--trust-domain {trust_domain:?}"))?;
    let pem = std::fs::read(bundle_path)
        .with_context(|| format!("reading the trust bundle {}", bundle_path.display()))?;
    let bundle = TrustBundle::from_pem(&pem)
        .with_context(|| format!("trust bundle {}", bundle_path.display()))?;
    let store = Arc::new(CertStore::new(bundle));
    let expected = ExpectedPeer::Exactly(control_plane_id(&trust_domain));
    let mut client = CaClient::connect(control_plane, store, expected, false).await?;
    let (svid, bundle) = client
        .fetch_svid(None, ttl, Some(token.to_string()))
        .await?;
    files::ensure_private_dir(out).with_context(|| format!("creating {}", out.display()))?;
    let write = |name: &str, contents: String, private: bool| -> Result<()> {
        let path = out.join(name);
        if private {
            files::write_private(&path, contents.as_bytes())
        } else {
            files::write_public(&path, contents.as_bytes())
        }
        .with_context(|| format!("writing {}", path.display()))
    };
    write("svid.key", svid.key_pem(), true)?;
    write("svid.pem", svid.chain_pem(), false)?;
    write("bundle.pem", bundle.to_pem(), false)?;
    let info = svid.info();
    println!(
        "{}\n  serial     {}\n  not before {}\n  not after  {}\n  wrote      {}",
        info.id,
        info.serial,
        latch_identity::svid::format_time(info.not_before),
        latch_identity::svid::format_time(info.not_after),
        ["svid.pem", "svid.key", "bundle.pem"]
            .map(|f| out.join(f).display().to_string())
            .join(", ")
    );
    Ok(())
}

/// A channel to the Workload API at `socket` (unix:///path).
async fn workload_api_channel(socket: &str) -> Result<tonic::transport::Channel> {
    if !socket.starts_with("unix:///") {
        bail!("--socket (SPIFFE_ENDPOINT_SOCKET) must be unix:///absolute/path, got {socket:?}");
    }
    tonic::transport::Endpoint::from_shared(socket.to_string())
        .with_context(|| format!("{socket:?} is not a valid endpoint"))?
        .connect()
        .await
        .with_context(|| format!("cannot connect to the Workload API at {socket}"))
}

/// Prints a JWT-SVID for `audience` from the Workload API at `socket`.
async fn fetch_jwt_svid(socket: &str, audience: Vec<String>) -> Result<()> {
    use latch_proto::workload::JwtsvidRequest;
    use latch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let channel = workload_api_channel(socket).await?;
    let mut request = tonic::Request::new(JwtsvidRequest {
        audience,
        spiffe_id: String::new(),
    });
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let response = SpiffeWorkloadApiClient::new(channel)
        .fetch_jwtsvid(request)
        .await
        .map_err(|status| {
            anyhow::anyhow!(
                "the Workload API at {socket} refused FetchJWTSVID ({:?}): {}",
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    let svid = response
        .svids
        .first()
        .context("the Workload API answered FetchJWTSVID with no JWT-SVID")?;
    eprintln!("{}", svid.spiffe_id);
    println!("{}", svid.svid);
    Ok(())
}

/// Prints the SVIDs the Workload API at `socket` streams: the first, or every one with `watch`.
async fn fetch_svid(socket: &str, watch: bool) -> Result<()> {
    use latch_proto::workload::X509svidRequest;
    use latch_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;

    let channel = workload_api_channel(socket).await?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let mut stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .with_context(|| format!("the Workload API at {socket} refused FetchX509SVID"))?
        .into_inner();
    while let Some(response) = stream
        .message()
        .await
        .with_context(|| format!("the Workload API stream at {socket} failed"))?
    {
        for svid in &response.svids {
            let leaf = first_certificate(&svid.x509_svid)
                .context("the Workload API sent an X509-SVID that is not DER")?;
            let info = latch_identity::SvidInfo::from_leaf(leaf)
                .context("the Workload API sent a certificate that is not an X509-SVID")?;
            println!(
                "{} serial {} valid until {}",
                info.id,
                info.serial,
                humantime::format_rfc3339_seconds(info.not_after)
            );
        }
        std::io::stdout().flush()?;
        if !watch {
            return Ok(());
        }
    }
    bail!("the Workload API at {socket} ended the stream")
}

/// The first DER element of `der` (the leaf of a chain sent as concatenated DER): a tag byte,
/// then the length in short form or long form (X.690 8.1.3).
fn first_certificate(der: &[u8]) -> Option<&[u8]> {
    let first = *der.get(1)?;
    let (header, length) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let octets = usize::from(first & 0x7f);
        if octets == 0 || octets > 4 {
            return None;
        }
        let bytes = der.get(2..2 + octets)?;
        let length = bytes.iter().fold(0usize, |n, b| n << 8 | usize::from(*b));
        (2 + octets, length)
    };
    der.get(..header.checked_add(length)?)
}
