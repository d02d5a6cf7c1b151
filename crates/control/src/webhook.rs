//! The sidecar injector webhook: HTTPS (TLS 1.3, HTTP/1.1) on `--webhook`, `POST /inject`
//! answering AdmissionReview v1 through latch-inject. Its certificate names
//! `latch-control.latch-system.svc`, is issued by our CA with a key that never leaves memory,
//! and is renewed at half its lifetime; the API server trusts it through the CA's roots
//! (`bundle.pem`) in the MutatingWebhookConfiguration's caBundle. Started by `ControlPlane`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use latch_admin::backoff::Backoff;
use latch_admin::serve::{AtCap, Drain, ListenerPolicy, Tls, serve_http1};
use latch_admin::{HttpResponse, error, json};
use latch_inject::InjectConfig;
use latch_inject::admission::{Verdict, review};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ca::{Ca, CaError};
use crate::metrics::Metrics;

/// The name the API server verifies: `<service>.<namespace>.svc` of deploy/kubernetes.
pub const WEBHOOK_DNS_NAME: &str = "latch-control.latch-system.svc";
/// Largest AdmissionReview accepted. A pod object is at most ~1.5 MiB (etcd's request limit).
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// Deadline for the TLS handshake, and for receiving a request's body.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 256;
/// Connections from one address at once; more are closed at once. A quarter of the cap: a pod
/// sending its headers a byte at a time holds at most this many places (each up to `TIMEOUT`),
/// and the API server keeps the rest.
pub const MAX_PER_SOURCE: usize = MAX_CONNECTIONS / 4;

/// The webhook listener: 256 connections (more wait in the kernel's listen queue), 64 from one
/// address (more closed at once, counted as `source_connection_limit`), 10 s for the TLS
/// handshake and for each request's head (the body's deadline is `Handler::handle`'s).
fn policy() -> ListenerPolicy {
    ListenerPolicy {
        handshake_timeout: Some(TIMEOUT),
        request_header_timeout: Some(TIMEOUT),
        per_source: Some(MAX_PER_SOURCE),
        ..ListenerPolicy::new("webhook", MAX_CONNECTIONS, AtCap::Wait)
    }
}

/// `--webhook` settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    pub inject: InjectConfig,
    /// The MutatingWebhookConfiguration whose caBundles the control plane keeps equal to the
    /// CA's roots, with `--kubernetes` (`--webhook-configuration`).
    pub configuration: String,
}

/// The serving certificate and when it expires.
struct Issued {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

/// Hands the current certificate to every handshake; renewal swaps it.
pub struct WebhookCert {
    current: ArcSwap<Issued>,
}

impl fmt::Debug for WebhookCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookCert")
            .field(
                "not_after",
                &latch_identity::svid::format_time(self.current.load().not_after),
            )
            .finish()
    }
}

impl ResolvesServerCert for WebhookCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

fn issue(ca: &Ca, ttl: Duration) -> Result<Issued, CaError> {
    let sign_err = |e: &dyn fmt::Display| CaError::Sign(format!("webhook certificate: {e}"));
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| sign_err(&e))?;
    let (chain, not_after) = ca.issue_server_cert(
        &[WEBHOOK_DNS_NAME],
        &key.subject_public_key_info(),
        ttl,
        SystemTime::now(),
    )?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = latch_identity::tls::provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| sign_err(&e))?;
    Ok(Issued {
        key: Arc::new(CertifiedKey::new(chain, signing)),
        not_after,
    })
}

/// Issues the first certificate and spawns its renewal at half the remaining lifetime.
fn serving_cert(
    ca: Arc<Ca>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Arc<WebhookCert>, CaError> {
    let ttl = ca.ttl_policy().default;
    let cert = Arc::new(WebhookCert {
        current: ArcSwap::from_pointee(issue(&ca, ttl)?),
    });
    let renewing = cert.clone();
    tracker.spawn(async move {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            let not_after = renewing.current.load().not_after;
            let left = not_after
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep((left / 2).max(Duration::from_secs(1))) => {}
            }
            match issue(&ca, ttl) {
                Ok(issued) => {
                    tracing::debug!(
                        not_after = %latch_identity::svid::format_time(issued.not_after),
                        "renewed the webhook's serving certificate"
                    );
                    renewing.current.store(Arc::new(issued));
                    backoff.reset();
                }
                Err(e) => {
                    // Several retries fit before the certificate expires.
                    backoff.set_cap(
                        (left / 10).clamp(Duration::from_secs(1), Duration::from_secs(30)),
                    );
                    let retry_in = backoff.next_wait();
                    tracing::error!(
                        ?retry_in,
                        "cannot renew the webhook's serving certificate: {e}"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(retry_in) => {}
                    }
                }
            }
        }
    });
    Ok(cert)
}

struct Handler {
    inject: InjectConfig,
    metrics: Arc<Metrics>,
}

impl Handler {
    async fn handle(&self, request: Request<Incoming>) -> HttpResponse {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/inject") => {}
            (_, "/inject") => {
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "POST an AdmissionReview to /inject",
                );
            }
            (_, path) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no such path {path:?}; the injector answers POST /inject"),
                );
            }
        }
        let collected = tokio::time::timeout(
            TIMEOUT,
            Limited::new(request.into_body(), MAX_BODY).collect(),
        )
        .await;
        let body = match collected {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
                self.metrics.webhook_reviewed("invalid");
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("AdmissionReview over {MAX_BODY} bytes"),
                );
            }
            Ok(Err(e)) => {
                return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}"));
            }
            Err(_) => {
                return error(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("body not received within {TIMEOUT:?}"),
                );
            }
        };
        match review(&body, &self.inject) {
            Ok(reviewed) => {
                let result = match &reviewed.verdict {
                    Verdict::Injected => {
                        tracing::info!(pod = %reviewed.pod, "injected the latch-proxy sidecar");
                        "injected"
                    }
                    Verdict::Skipped(reason) => {
                        tracing::info!(pod = %reviewed.pod, "not injected: {reason}");
                        "skipped"
                    }
                    Verdict::Ignored => "ignored",
                    Verdict::Refused(message) => {
                        tracing::warn!(pod = %reviewed.pod, "{message}");
                        "refused"
                    }
                };
                self.metrics.webhook_reviewed(result);
                json(StatusCode::OK, &reviewed.response)
            }
            Err(e) => {
                self.metrics.webhook_reviewed("invalid");
                tracing::warn!("webhook request refused: {e}");
                error(StatusCode::BAD_REQUEST, e.to_string())
            }
        }
    }
}

/// Serves the injector on `listener` until `cancel` fires.
pub fn serve(
    listener: TcpListener,
    config: &WebhookConfig,
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> Result<(), CaError> {
    let cert = serving_cert(ca, tracker, cancel.clone())?;
    let mut tls = ServerConfig::builder_with_provider(latch_identity::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| CaError::Sign(format!("webhook TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let handler = Arc::new(Handler {
        inject: config.inject.clone(),
        metrics: metrics.clone(),
    });
    latch_admin::serve::serve(
        listener,
        policy(),
        &Drain::immediate(tracker, &cancel),
        metrics,
        Tls(TlsAcceptor::from(Arc::new(tls))),
        move |conn| {
            let handler = handler.clone();
            serve_http1(conn, move |request| {
                let handler = handler.clone();
                async move { handler.handle(request).await }
            })
        },
    );
    Ok(())
}
