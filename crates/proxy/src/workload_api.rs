//! The SPIFFE Workload API on a Unix socket, so SPIFFE-aware applications get the proxy's SVID
//! and bundles: FetchX509SVID, FetchX509Bundles and FetchJWTBundles answer at once and again on
//! every change; FetchJWTSVID and ValidateJWTSVID go through `jwt` (tokens from the control
//! plane, cached per audience set; the JWT bundle from discovery). Who may connect
//! is decided per connection by the peer's uid (`peers`); the socket is created with its final
//! mode (`socket`); every request passes through `authority::AuthorityRewriter`, so clients that
//! send the socket path as `:authority` (gRPC C-core, Java, Swift) are served too.

mod authority;
pub mod jwt;
mod peers;
mod socket;

pub use peers::AllowedPeers;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use authority::AuthorityRewriter;

use crate::metrics::Metrics;

use latch_admin::serve::{AtCap, Drain, ListenerPolicy, NoMetrics, Plain, Slot, Throttled};
use latch_identity::{CertStore, SpiffeId, Svid, TrustBundle};
use latch_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use latch_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

/// The metadata every Workload API request must carry (SPIFFE Workload API spec).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[derive(Debug, Error)]
pub enum WorkloadApiError {
    #[error("--workload-api must be unix:///absolute/path, got {0:?}")]
    Address(String),
    #[error(
        "cannot create the Workload API socket {path}: {source} (check that the directory is \
         writable by the proxy's uid)"
    )]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where and for whom the Workload API is served.
#[derive(Debug, Clone)]
pub struct WorkloadApiConfig {
    pub socket: PathBuf,
    pub allowed: AllowedPeers,
}

/// Parses `unix:///path` (or a bare absolute path) into a socket path.
pub fn socket_path(address: &str) -> Result<PathBuf, WorkloadApiError> {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    if !path.starts_with('/') {
        return Err(WorkloadApiError::Address(address.to_string()));
    }
    Ok(PathBuf::from(path))
}

fn concat_der<'a>(
    certs: impl IntoIterator<Item = &'a rustls_pki_types::CertificateDer<'a>>,
) -> Vec<u8> {
    certs
        .into_iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

fn x509_svid_response(svid: &Svid, bundle: &TrustBundle) -> X509svidResponse {
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: svid.id().to_string(),
            x509_svid: concat_der(svid.chain()),
            x509_svid_key: svid.private_key().secret_pkcs8_der().to_vec(),
            bundle: concat_der(bundle.roots()),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: Default::default(),
    }
}

fn x509_bundles_response(store: &CertStore) -> Option<X509BundlesResponse> {
    let svid = store.svid()?;
    let trust_domain_id = svid.id().trust_domain().id().to_string();
    let bundle = store.bundle();
    Some(X509BundlesResponse {
        crl: Vec::new(),
        bundles: [(trust_domain_id, concat_der(bundle.roots()))].into(),
    })
}

fn jwt_bundles_response(store: &CertStore) -> Option<JwtBundlesResponse> {
    let svid = store.svid()?;
    let bundle = store.jwt_bundle()?;
    let trust_domain_id = svid.id().trust_domain().id().to_string();
    Some(JwtBundlesResponse {
        bundles: [(trust_domain_id, bundle.to_jwks().to_string().into_bytes())].into(),
    })
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request
        .metadata()
        .get(SECURITY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "security header missing from request: set the gRPC metadata {SECURITY_HEADER}: true"
        ))),
    }
}

/// The gRPC service.
pub struct WorkloadApi {
    store: Arc<CertStore>,
    jwt: Arc<jwt::JwtSvids>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl WorkloadApi {
    /// Streams `make(store)` now (once it has something) and after every store change that
    /// changes it, until the client goes away or the proxy stops.
    fn stream<T: Send + PartialEq + Clone + 'static>(
        &self,
        make: fn(&CertStore) -> Option<T>,
    ) -> ResponseStream<T> {
        let (tx, rx) = mpsc::channel(4);
        let store = self.store.clone();
        let cancel = self.cancel.clone();
        let mut changes = store.subscribe();
        self.tracker.spawn(async move {
            let mut last = None;
            loop {
                changes.mark_unchanged();
                if let Some(message) = make(&store)
                    && last.as_ref() != Some(&message)
                {
                    if tx.send(Ok(message.clone())).await.is_err() {
                        return;
                    }
                    last = Some(message);
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tx.closed() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.stream(|store| {
            store
                .svid()
                .map(|svid| x509_svid_response(&svid, &store.bundle()))
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.stream(x509_bundles_response)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        if request.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if !request.spiffe_id.is_empty() {
            let asked = SpiffeId::parse(&request.spiffe_id)
                .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?;
            let held = self.store.svid().map(|s| s.id().clone());
            if held.as_ref() != Some(&asked) {
                return Err(Status::permission_denied(format!(
                    "no identity issued for {asked}: this workload's is {}",
                    held.map_or_else(|| "not known yet".to_string(), |id| id.to_string())
                )));
            }
        }
        let (spiffe_id, token) = self.jwt.fetch(&request.audience).await?;
        Ok(Response::new(JwtsvidResponse {
            svids: vec![Jwtsvid {
                spiffe_id: spiffe_id.to_string(),
                svid: token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        Ok(Response::new(self.stream(jwt_bundles_response)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let request = request.into_inner();
        let claims = jwt::validate(
            &self.store,
            &request.svid,
            &request.audience,
            std::time::SystemTime::now(),
        )?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: claims.subject.to_string(),
            claims: claims.claims.as_object().map(jwt::proto_struct),
        }))
    }
}

/// The Workload API listener: 1024 connections (each app holds one or two streams; more wait in
/// the kernel's listen queue). Local, and a uid not allowed is closed at accept without taking a
/// place for longer, so no handshake deadline.
fn policy() -> ListenerPolicy {
    ListenerPolicy::new("workload_api", 1024, AtCap::Wait)
}

/// A Workload API connection for tonic; holds its place under the cap until dropped. What the
/// client sends reaches tonic through the `:authority` rewrite; replies go out unchanged.
struct ApiConn {
    stream: UnixStream,
    front: AuthorityRewriter,
    /// Rewritten bytes tonic has not read yet, from `ready_from` on.
    ready: Vec<u8>,
    ready_from: usize,
    _slot: Slot,
}

impl ApiConn {
    fn new(stream: UnixStream, slot: Slot) -> Self {
        Self {
            stream,
            front: AuthorityRewriter::default(),
            ready: Vec::new(),
            ready_from: 0,
            _slot: slot,
        }
    }
}

impl Connected for ApiConn {
    type ConnectInfo = <UnixStream as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        Connected::connect_info(&self.stream)
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_from < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_from);
                buf.put_slice(&this.ready[this.ready_from..this.ready_from + n]);
                this.ready_from += n;
                if this.ready_from == this.ready.len() {
                    this.ready.clear();
                    this.ready_from = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut bytes = [0u8; 8192];
            let mut read = ReadBuf::new(&mut bytes);
            std::task::ready!(Pin::new(&mut this.stream).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.front.feed(read.filled(), &mut this.ready) {
                tracing::debug!("Workload API connection closed: {e}");
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)));
            }
        }
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Closes, counts and logs the connections of uids that are not allowed.
struct PeerGate {
    allowed: AllowedPeers,
    metrics: Arc<Metrics>,
    log: Mutex<Throttled>,
}

impl PeerGate {
    /// Whether the peer of `stream` may use the Workload API (SO_PEERCRED).
    fn admit(&self, stream: &UnixStream) -> bool {
        let credentials = stream.peer_cred();
        if let Ok(peer) = &credentials
            && self.allowed.allows(peer.uid())
        {
            return true;
        }
        self.metrics.workload_api_refused.inc();
        let count = self.log.lock().unwrap_or_else(|e| e.into_inner()).note();
        if let Some(count) = count {
            match credentials {
                Ok(peer) => tracing::warn!(
                    uid = peer.uid(),
                    pid = peer.pid().unwrap_or(0),
                    refused_since_last_line = count,
                    "Workload API: refused a connection from uid {} (pid {}): this proxy \
                     allows {}; to let it in, add --workload-api-allow-uid {}",
                    peer.uid(),
                    peer.pid().map_or("unknown".to_string(), |p| p.to_string()),
                    self.allowed.describe(),
                    peer.uid(),
                ),
                Err(e) => tracing::warn!(
                    refused_since_last_line = count,
                    "Workload API: refused a connection whose peer credentials cannot be read: {e}"
                ),
            }
        }
        false
    }
}

/// Binds the socket (replacing a stale one) with the mode `config.allowed` calls for, and serves
/// until `cancel`.
pub fn serve(
    config: &WorkloadApiConfig,
    store: Arc<CertStore>,
    jwt: Arc<jwt::JwtSvids>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), WorkloadApiError> {
    let path = &config.socket;
    let mode = config
        .allowed
        .socket_mode(rustix::process::getuid().as_raw());
    let listener = socket::bind(path, mode).map_err(|source| WorkloadApiError::Socket {
        path: path.to_path_buf(),
        source,
    })?;
    tracing::info!(
        socket = %path.display(),
        mode = format!("{mode:o}"),
        "Workload API: serving {}",
        config.allowed.describe()
    );
    let gate = Arc::new(PeerGate {
        allowed: config.allowed.clone(),
        metrics,
        log: Mutex::new(Throttled::default()),
    });
    let service = SpiffeWorkloadApiServer::new(WorkloadApi {
        store,
        jwt,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    });
    let (tx, rx) = mpsc::channel(64);
    latch_admin::serve::serve(
        listener,
        policy(),
        &Drain::immediate(tracker, &cancel),
        Arc::new(NoMetrics),
        Plain,
        move |conn| {
            let tx = tx.clone();
            let gate = gate.clone();
            async move {
                if !gate.admit(&conn.stream) {
                    return;
                }
                let conn = ApiConn::new(conn.stream, conn.slot);
                let _ = tx.send(Ok::<_, std::io::Error>(conn)).await;
            }
        },
    );
    let path = path.to_path_buf();
    tracker.spawn(async move {
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(ReceiverStream::new(rx), cancel.cancelled_owned())
            .await;
        if let Err(e) = result {
            tracing::error!("Workload API on {} stopped: {e}", path.display());
        }
        let _ = std::fs::remove_file(&path);
    });
    Ok(())
}
