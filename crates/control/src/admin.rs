//! The control plane's admin HTTP server: `/healthz`, `/ready`, `/metrics`, `GET /v1/ca` (the
//! CA certificates and where a root rotation stands), and the mutating `POST /v1/join-tokens`
//! and `POST /v1/ca/rotate/{prepare,activate,retire}`, which require the admin credential from
//! `<data-dir>/admin.token` as a bearer token. latchctl is its client.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use latch_admin::{HttpResponse, error, json, text};
use latch_identity::{CertStore, SpiffeId};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ca::{Ca, RotationError};
use crate::discovery::BundleAcks;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::revocations::{Issued, Revocations};
use crate::tokens::{JoinTokens, TokenError};

/// Largest admin request body accepted.
const MAX_BODY: usize = 16 * 1024;
/// /ready warns when a CA certificate expires within this.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default lifetime of a join token created without --ttl.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Everything the admin endpoints read.
pub struct AdminState {
    pub ca: Arc<Ca>,
    /// The JWT-SVID signing keys; `POST /v1/jwt/rotate` replaces the current one.
    pub jwt: Arc<crate::jwt_authority::JwtAuthority>,
    pub tokens: Arc<JoinTokens>,
    pub revocations: Arc<Revocations>,
    pub issued: Arc<Issued>,
    pub metrics: Arc<Metrics>,
    /// The mesh being served; /ready shows why the config file's latest edit is not.
    pub mesh: Arc<Mesh>,
    /// Which bundle each connected proxy acknowledged; `activate` waits for all.
    pub bundle_acks: Arc<BundleAcks>,
    /// The control plane's own serving identity; /ready is false without a valid one.
    pub own_identity: Arc<CertStore>,
    /// SHA-256 of the admin credential.
    pub admin_credential_hash: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    spiffe_id: String,
    reason: String,
}

/// 401 for a request without the admin credential.
fn unauthorized() -> HttpResponse {
    error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin credential: latchctl reads it from <data-dir>/admin.token \
         (set --data-dir or LATCH_DATA_DIR to the control plane's data dir)",
    )
}

#[derive(Debug, Default, Deserialize)]
struct ActivateRequest {
    /// Activate even though some connected proxies have not acknowledged the new bundle.
    #[serde(default)]
    force: bool,
}

#[derive(Debug, Deserialize)]
struct CreateTokenRequest {
    spiffe_id: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    reusable: bool,
}

impl AdminState {
    fn ready(&self) -> Result<(), String> {
        let now = SystemTime::now();
        if now >= self.ca.not_after() {
            return Err("CA certificate has expired".into());
        }
        if self.own_identity.valid_svid(now).is_none() {
            return Err("control plane has no valid serving certificate".into());
        }
        if !self.mesh.is_synced() {
            return Err(
                "the mesh has not been read from its source yet; discovery streams are refused \
                 until then"
                    .into(),
            );
        }
        Ok(())
    }

    /// One line per CA certificate that expires within `EXPIRY_WARNING`.
    fn expiry_warnings(&self, now: SystemTime) -> Vec<String> {
        self.ca
            .certificates()
            .into_iter()
            .filter(|c| c.not_after.duration_since(now).unwrap_or_default() < EXPIRY_WARNING)
            .map(|c| {
                let days = c
                    .not_after
                    .duration_since(now)
                    .unwrap_or_default()
                    .as_secs()
                    / 86_400;
                format!(
                    "ca: {} {} expires at {} (in {days} days); rotate it (`latchctl ca rotate \
                     prepare`, docs/reliability.md)",
                    c.role,
                    c.fingerprint,
                    latch_identity::svid::format_time(c.not_after)
                )
            })
            .collect()
    }

    /// `GET /v1/ca`: the rotation status and which connected proxies lack the current bundle.
    fn ca_status(&self) -> serde_json::Value {
        let (connected, lagging) = self.bundle_acks.lagging(&self.bundle_sha256());
        serde_json::json!({
            "rotation": self.ca.rotation_status(),
            "bundle_sha256": self.bundle_sha256(),
            "proxies_connected": connected,
            "proxies_without_current_bundle": lagging,
        })
    }

    fn bundle_sha256(&self) -> String {
        latch_identity::bundle::sha256_hex(self.ca.bundle().to_pem().as_bytes())
    }

    /// Publishes a new JWT signing key now and serves the new JWT bundle to the proxies.
    async fn rotate_jwt_key(&self, request: Request<Incoming>) -> HttpResponse {
        if let Err(refused) = self.authorized_body(request).await {
            return refused;
        }
        let now = SystemTime::now();
        match self.jwt.rotate(now).await {
            Ok(rotation) => {
                self.mesh.set_jwt_bundle(self.jwt.bundle_jwks());
                let keys = self.jwt.keys();
                json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "new_kid": rotation.kid,
                        "signs_from": humantime::format_rfc3339_seconds(rotation.signs_from).to_string(),
                        "signing_kid": keys.signing_kid(now).unwrap_or_default(),
                        "bundle_kids": keys.bundle().kids().collect::<Vec<_>>(),
                    }),
                )
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn rotate(&self, step: &str, request: Request<Incoming>) -> HttpResponse {
        let body = match self.authorized_body(request).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let result = match step {
            "prepare" => self.ca.prepare_rotation(),
            "activate" => {
                let request: ActivateRequest = if body.is_empty() {
                    ActivateRequest::default()
                } else {
                    match serde_json::from_slice(&body) {
                        Ok(r) => r,
                        Err(e) => {
                            return error(StatusCode::BAD_REQUEST, format!("request body: {e}"));
                        }
                    }
                };
                if let Err(refusal) = self.new_root_reached_every_proxy() {
                    if !request.force {
                        return error(StatusCode::CONFLICT, refusal);
                    }
                    tracing::warn!("activating the new root although {refusal} (--force)");
                }
                self.ca.activate_rotation()
            }
            "retire" => self.ca.retire_rotation(SystemTime::now()),
            _ => return error(StatusCode::NOT_FOUND, "not found"),
        };
        match result {
            Ok(_) => json(StatusCode::OK, &self.ca_status()),
            Err(RotationError::Ca(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            Err(e) => error(StatusCode::CONFLICT, e.to_string()),
        }
    }

    /// Whether the mesh serves the bundle holding the prepared root and every connected proxy
    /// has acknowledged it.
    fn new_root_reached_every_proxy(&self) -> Result<(), String> {
        let want = self.bundle_sha256();
        if *self.mesh.snapshot().trust_bundle_sha256 != *want {
            return Err("the bundle with the new root is not published to the proxies yet".into());
        }
        let (connected, lagging) = self.bundle_acks.lagging(&want);
        if lagging.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = lagging.iter().take(10).map(String::as_str).collect();
        Err(format!(
            "{} of {connected} connected proxies have not acknowledged the trust bundle with the \
             new root ({}{}); they would refuse peers holding certificates from it. Wait and \
             retry, check those proxies (a NACK is logged here), or activate with --force",
            lagging.len(),
            shown.join(", "),
            if lagging.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        ))
    }

    /// The body of a management request (at most `MAX_BODY`), or the response refusing it: no
    /// or a wrong admin credential, or a body too large.
    async fn authorized_body(
        &self,
        request: Request<Incoming>,
    ) -> Result<hyper::body::Bytes, HttpResponse> {
        if !self.authorized(&request) {
            return Err(unauthorized());
        }
        match Limited::new(request.into_body(), MAX_BODY).collect().await {
            Ok(body) => Ok(body.to_bytes()),
            Err(e) => Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body: {e}"),
            )),
        }
    }

    fn authorized(&self, request: &Request<Incoming>) -> bool {
        let presented = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Comparing hashes keeps the comparison's timing independent of the secret.
        presented.is_some_and(|p| crate::tokens::token_hash(p.trim()) == self.admin_credential_hash)
    }

    /// The request's JSON body as `T`, once the admin credential is checked.
    async fn authorized_json<T: serde::de::DeserializeOwned>(
        &self,
        request: Request<Incoming>,
    ) -> Result<T, HttpResponse> {
        let body = self.authorized_body(request).await?;
        serde_json::from_slice(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("request body: {e}")))
    }

    /// `raw` as a SPIFFE ID of this control plane's trust domain, or why not (for a 400).
    fn member_id(&self, raw: &str) -> Result<SpiffeId, String> {
        let id = SpiffeId::parse(raw).map_err(|e| {
            format!(
                "{} is not a SPIFFE ID: {e}",
                latch_admin::untrusted(raw, 256)
            )
        })?;
        if !id.is_member_of(self.ca.trust_domain()) {
            return Err(format!(
                "{id} is not in this control plane's trust domain {}",
                self.ca.trust_domain()
            ));
        }
        Ok(id)
    }

    /// `POST /v1/revocations` {spiffe_id, reason}: revokes every SVID of the ID issued so far
    /// and republishes the MeshConfig, so proxies refuse them and close their connections.
    async fn revoke(&self, request: Request<Incoming>) -> HttpResponse {
        let req: RevokeRequest = match self.authorized_json(request).await {
            Ok(req) => req,
            Err(refused) => return refused,
        };
        let id = match self.member_id(&req.spiffe_id) {
            Ok(id) => id,
            Err(why) => return error(StatusCode::BAD_REQUEST, why),
        };
        if req.reason.trim().is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "a reason is required: it is kept with the revocation and told to the workload",
            );
        }
        // Long enough that every SVID issued before now has expired when it is dropped.
        let cover = self.ca.ttl_policy().max + 2 * crate::ca::BACKDATE;
        match self
            .revocations
            .revoke(&id, req.reason.trim(), SystemTime::now(), cover)
            .await
        {
            Ok(revocation) => {
                tracing::warn!(spiffe_id = %id, reason = %latch_admin::untrusted(&revocation.reason, 256), "revoked");
                json(StatusCode::CREATED, &revocation)
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn create_token(&self, request: Request<Incoming>) -> HttpResponse {
        let req: CreateTokenRequest = match self.authorized_json(request).await {
            Ok(req) => req,
            Err(refused) => return refused,
        };
        let id = match self.member_id(&req.spiffe_id) {
            Ok(id) => id,
            Err(why) => return error(StatusCode::BAD_REQUEST, why),
        };
        if latch_identity::client::is_reserved(&id) {
            return error(
                StatusCode::BAD_REQUEST,
                latch_identity::client::reserved_refusal(&id),
            );
        }
        let ttl = req
            .ttl_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TOKEN_TTL);
        if ttl.is_zero() {
            return error(StatusCode::BAD_REQUEST, "ttl_seconds must be positive");
        }
        match self.tokens.create(&id, ttl, req.reusable).await {
            Ok(new) => {
                self.metrics.join_tokens_created.inc();
                tracing::info!(spiffe_id = %id, reusable = req.reusable, ttl = ?ttl, "created join token");
                json(StatusCode::CREATED, &new)
            }
            Err(e @ TokenError::SingleUseUnguaranteed) => {
                error(StatusCode::BAD_REQUEST, e.to_string())
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    async fn handle(self: Arc<Self>, request: Request<Incoming>) -> HttpResponse {
        match (request.method(), request.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/ready") => {
                // A source problem (a rejected config edit, a failing Kubernetes watch) leaves
                // /ready at 200 once synced: the last good model is still served (see
                // mesh::file_source); the body says which source and why.
                let mut problems = self.mesh.problems();
                problems.extend(self.expiry_warnings(SystemTime::now()));
                match self.ready() {
                    Ok(()) if problems.is_empty() => latch_admin::readiness(Ok(())),
                    Ok(()) => text(StatusCode::OK, format!("ready\n{}\n", problems.join("\n"))),
                    Err(why) if problems.is_empty() => latch_admin::readiness(Err(why)),
                    Err(why) => {
                        latch_admin::readiness(Err(format!("{why}\n{}", problems.join("\n"))))
                    }
                }
            }
            (&Method::GET, "/metrics") => latch_admin::metrics(self.metrics.registry()),
            (&Method::POST, "/v1/join-tokens") => self.create_token(request).await,
            (&Method::POST, "/v1/revocations") => self.revoke(request).await,
            (&Method::GET, "/v1/revocations") if self.authorized(&request) => json(
                StatusCode::OK,
                &serde_json::json!({"revocations": self.revocations.list(SystemTime::now())}),
            ),
            (&Method::GET, "/v1/identities") if self.authorized(&request) => json(
                StatusCode::OK,
                &serde_json::json!({"identities": self.issued.list()}),
            ),
            (&Method::GET, "/v1/revocations" | "/v1/identities") => unauthorized(),
            (&Method::GET, "/v1/ca") => json(StatusCode::OK, &self.ca_status()),
            (&Method::POST, "/v1/jwt/rotate") => self.rotate_jwt_key(request).await,
            (&Method::POST, path) if path.starts_with("/v1/ca/rotate/") => {
                let step = path.trim_start_matches("/v1/ca/rotate/").to_string();
                self.rotate(&step, request).await
            }
            (
                _,
                "/healthz" | "/ready" | "/metrics" | "/v1/join-tokens" | "/v1/ca"
                | "/v1/revocations" | "/v1/identities" | "/v1/jwt/rotate",
            ) => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            _ => error(StatusCode::NOT_FOUND, "not found"),
        }
    }
}

/// Serves the admin API on `listener` until `cancel` fires.
pub fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    latch_admin::serve(
        listener,
        move |_peer, request| state.clone().handle(request),
        tracker,
        cancel,
    );
}
