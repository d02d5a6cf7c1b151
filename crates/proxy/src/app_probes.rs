//! The app's kubelet probes, run by the proxy. Under STRICT capture a plaintext probe from the
//! kubelet to an app port is redirected to the proxy and refused (the pod never turns Ready),
//! and a `tcpSocket` probe always succeeds (the proxy accepts for a dead app too). So the
//! injector rewrites each app container's `httpGet`, `tcpSocket` and `grpc` probe into an
//! `httpGet` of `/app-health/<container>/<kind>` on the admin port, which capture never
//! redirects, and hands the originals to the proxy (`--app-probes`, from the pod annotation
//! `latch.dev/app-probes`). The proxy runs the original against the app on loopback, as the
//! kubelet would have run it against the pod IP, and answers 200 or 503: the status only, never
//! the app's response.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// The admin path prefix of rewritten probes.
pub const PATH_PREFIX: &str = "/app-health/";
/// The kubelet's default probe timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Probes running at once; more are answered 503 at once (the kubelet probes each container a
/// few times a period, so this is only reached by someone hammering the admin port).
const MAX_CONCURRENT: usize = 16;
/// Most bytes read of an HTTP answer: the status line is all a probe needs.
const MAX_STATUS_LINE: usize = 1024;

/// One original probe, in the Kubernetes Probe's own shape (ports already resolved to numbers
/// by the injector, as the kubelet resolves named ports against the container's ports).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppProbe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<Grpc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGet {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub port: u16,
    /// HTTP (default) or HTTPS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<Header>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grpc {
    pub port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

impl AppProbe {
    /// Checks what the kubelet's API validation would: exactly one handler, a path that is a
    /// path, header names and values that cannot split the request.
    pub fn validate(&self) -> Result<(), String> {
        let handlers = [
            self.http_get.is_some(),
            self.tcp_socket.is_some(),
            self.grpc.is_some(),
        ];
        if handlers.iter().filter(|h| **h).count() != 1 {
            return Err("needs exactly one of httpGet, tcpSocket, grpc".into());
        }
        if let Some(http) = &self.http_get {
            if let Some(path) = &http.path
                && (!path.starts_with('/') || path.chars().any(|c| c.is_control() || c == ' '))
            {
                return Err(format!("httpGet.path {path:?} is not an absolute path"));
            }
            match http.scheme.as_deref() {
                None | Some("HTTP" | "HTTPS") => {}
                Some(other) => {
                    return Err(format!("httpGet.scheme {other:?} is not HTTP or HTTPS"));
                }
            }
            for header in &http.http_headers {
                let token =
                    |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic() && b != b':');
                if !token(&header.name) || header.value.chars().any(|c| c.is_control()) {
                    return Err(format!(
                        "httpGet header {:?} is not a valid header",
                        header.name
                    ));
                }
            }
        }
        Ok(())
    }

    fn timeout(&self) -> Duration {
        self.timeout_seconds
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
    }
}

/// The probes of a pod by `<container>/<kind>` (kind: startup, readiness, liveness).
#[derive(Debug)]
pub struct AppProbes {
    probes: BTreeMap<String, AppProbe>,
    running: Arc<Semaphore>,
}

impl Default for AppProbes {
    fn default() -> Self {
        Self {
            probes: BTreeMap::new(),
            running: Arc::new(Semaphore::new(MAX_CONCURRENT)),
        }
    }
}

/// A probe's verdict: the HTTP status for the kubelet and a short reason.
pub type Verdict = Result<(), String>;

impl AppProbes {
    /// Parses `--app-probes` (JSON: `{"<container>/<kind>": probe}`); refuses what the kubelet
    /// would not run.
    pub fn parse(json: &str) -> Result<Self, String> {
        let probes: BTreeMap<String, AppProbe> =
            serde_json::from_str(json).map_err(|e| format!("--app-probes is not valid: {e}"))?;
        for (key, probe) in &probes {
            let valid_key = key.split_once('/').is_some_and(|(c, kind)| {
                !c.is_empty() && matches!(kind, "startup" | "readiness" | "liveness")
            });
            if !valid_key {
                return Err(format!(
                    "--app-probes: {key:?} is not <container>/<startup|readiness|liveness>"
                ));
            }
            probe
                .validate()
                .map_err(|e| format!("--app-probes: {key}: {e}"))?;
        }
        Ok(Self {
            probes,
            ..Self::default()
        })
    }

    pub fn is_empty(&self) -> bool {
        self.probes.is_empty()
    }

    /// The configured `<container>/<kind>` names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.probes.keys().map(String::as_str)
    }

    /// Runs the probe for admin path `path` (`/app-health/<container>/<kind>`); `None` when no
    /// such probe was configured.
    pub async fn run(&self, path: &str) -> Option<Verdict> {
        let probe = self.probes.get(path.strip_prefix(PATH_PREFIX)?)?;
        let Ok(_permit) = self.running.clone().try_acquire_owned() else {
            return Some(Err("too many probes at once".into()));
        };
        let timeout = probe.timeout();
        Some(
            tokio::time::timeout(timeout, run(probe))
                .await
                .unwrap_or_else(|_| Err(format!("timed out after {timeout:?}"))),
        )
    }
}

async fn run(probe: &AppProbe) -> Verdict {
    if let Some(http) = &probe.http_get {
        http_get(http).await
    } else if let Some(tcp) = &probe.tcp_socket {
        connect(tcp.port).await.map(drop)
    } else if let Some(grpc) = &probe.grpc {
        grpc_health(grpc).await
    } else {
        Err("no handler".into())
    }
}

async fn connect(port: u16) -> Result<TcpStream, String> {
    TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect to port {port}: {e}"))
}

/// The kubelet's HTTP probe: GET with `User-Agent: kube-probe`, `Host` the target unless a
/// header sets it, any status from 200 to 399 a success. HTTPS does not verify the
/// certificate, as the kubelet does not.
async fn http_get(http: &HttpGet) -> Verdict {
    let tcp = connect(http.port).await?;
    let mut request = format!("GET {} HTTP/1.1\r\n", http.path.as_deref().unwrap_or("/"));
    let has = |name: &str| {
        http.http_headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name))
    };
    if !has("host") {
        request.push_str(&format!("Host: 127.0.0.1:{}\r\n", http.port));
    }
    if !has("user-agent") {
        request.push_str("User-Agent: kube-probe/latch\r\n");
    }
    if !has("accept") {
        request.push_str("Accept: */*\r\n");
    }
    for header in &http.http_headers {
        request.push_str(&format!("{}: {}\r\n", header.name, header.value));
    }
    request.push_str("Connection: close\r\n\r\n");
    let status = if http.scheme.as_deref() == Some("HTTPS") {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(insecure_tls()))
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").expect("a valid name"),
                tcp,
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        status_of(tls, &request).await?
    } else {
        status_of(tcp, &request).await?
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(format!("HTTP status {status}"))
    }
}

/// Sends `request` and reads the status code of the answer's status line.
async fn status_of<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<u16, String> {
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < MAX_STATUS_LINE {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        [version, code, ..] if version.starts_with("HTTP/") => {
            code.parse().map_err(|_| "not an HTTP response".to_string())
        }
        _ => Err("not an HTTP response".into()),
    }
}

/// TLS for HTTPS probes: like the kubelet's, it accepts any certificate (the app's own, often
/// self-signed; the connection is on loopback inside the pod) but checks the handshake
/// signature, and offers TLS 1.2 as well, since the app may not speak 1.3. Never used for mesh
/// traffic.
fn insecure_tls() -> rustls::ClientConfig {
    let provider = latch_identity::tls::provider();
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`; status 1 is SERVING.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

const SERVING: i32 = 1;

/// The kubelet's gRPC probe: `grpc.health.v1.Health/Check` in plaintext HTTP/2, SERVING a
/// success.
async fn grpc_health(grpc: &Grpc) -> Verdict {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{}", grpc.port))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| format!("connect to port {}: {e}", grpc.port))?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| format!("gRPC: {e}"))?;
    let answer: tonic::Response<HealthCheckResponse> = client
        .unary(
            tonic::Request::new(HealthCheckRequest {
                service: grpc.service.clone().unwrap_or_default(),
            }),
            tonic::codegen::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map_err(|status| {
            format!(
                "gRPC health check: {:?} {}",
                status.code(),
                status.message()
            )
        })?;
    match answer.into_inner().status {
        SERVING => Ok(()),
        other => Err(format!("gRPC health status {other} (not SERVING)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_what_the_kubelet_would_not_run() {
        let ok = r#"{"app/readiness":{"httpGet":{"path":"/healthz","port":8080,"httpHeaders":[{"name":"X-Probe","value":"1"}]},"timeoutSeconds":2},
                     "app/liveness":{"tcpSocket":{"port":8080}},
                     "api/startup":{"grpc":{"port":9090,"service":"api"}}}"#;
        let probes = AppProbes::parse(ok).unwrap();
        assert_eq!(probes.probes.len(), 3);
        for (bad, why) in [
            (
                r#"{"app/ready":{"tcpSocket":{"port":1}}}"#,
                "is not <container>/<startup|readiness|liveness>",
            ),
            (r#"{"app/readiness":{}}"#, "exactly one of"),
            (
                r#"{"app/readiness":{"tcpSocket":{"port":1},"grpc":{"port":2}}}"#,
                "exactly one of",
            ),
            (
                r#"{"app/readiness":{"httpGet":{"path":"x","port":1}}}"#,
                "not an absolute path",
            ),
            (
                r#"{"app/readiness":{"httpGet":{"path":"/ HTTP/1.1\r\nX: y","port":1}}}"#,
                "not an absolute path",
            ),
            (
                r#"{"app/readiness":{"httpGet":{"port":1,"httpHeaders":[{"name":"X","value":"a\r\nB: c"}]}}}"#,
                "not a valid header",
            ),
            (
                r#"{"app/readiness":{"httpGet":{"port":1,"scheme":"FTP"}}}"#,
                "not HTTP or HTTPS",
            ),
            (
                r#"{"app/readiness":{"exec":{"command":["true"]}}}"#,
                "not valid",
            ),
        ] {
            let err = AppProbes::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn probes_report_what_the_app_answers() {
        // An HTTP app answering 200 on /ok and 500 elsewhere, and whether it saw our headers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 2048];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).to_string();
                    let ok = request.starts_with("GET /ok ")
                        && request.contains("User-Agent: kube-probe/latch\r\n")
                        && request.contains("X-Probe: yes\r\n");
                    let status = if ok {
                        "200 OK"
                    } else {
                        "500 Internal Server Error"
                    };
                    let _ = conn
                        .write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let json = format!(
            r#"{{"app/readiness":{{"httpGet":{{"path":"/ok","port":{port},"httpHeaders":[{{"name":"X-Probe","value":"yes"}}]}}}},
                "app/liveness":{{"httpGet":{{"path":"/broken","port":{port}}}}},
                "app/startup":{{"tcpSocket":{{"port":{port}}}}},
                "other/startup":{{"tcpSocket":{{"port":{closed}}}}}}}"#
        );
        let probes = AppProbes::parse(&json).unwrap();
        assert_eq!(probes.run("/app-health/app/readiness").await, Some(Ok(())));
        assert_eq!(
            probes.run("/app-health/app/liveness").await,
            Some(Err("HTTP status 500".into()))
        );
        assert_eq!(probes.run("/app-health/app/startup").await, Some(Ok(())));
        let refused = probes
            .run("/app-health/other/startup")
            .await
            .unwrap()
            .unwrap_err();
        assert!(refused.contains("connect to port"), "{refused}");
        assert_eq!(probes.run("/app-health/nope/startup").await, None);
        assert_eq!(probes.run("/ready").await, None);
    }
}
