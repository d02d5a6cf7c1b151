//! A minimal HTTP/1 client for the control plane's admin API, authenticated with the admin
//! credential from `<data-dir>/admin.token`.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Where the admin API is and the data dir holding its credential.
pub struct Admin<'a> {
    pub address: &'a str,
    pub data_dir: &'a Path,
}

impl Admin<'_> {
    fn credential(&self) -> Result<String> {
        let path = self.data_dir.join("admin.token");
        let credential = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading the admin credential {} (point --data-dir or LATCH_DATA_DIR at the \
                 control plane's data dir)",
                path.display()
            )
        })?;
        Ok(credential.trim().to_string())
    }

    /// Sends `method path` (with `body` as JSON) and returns the JSON answer; a non-2xx answer
    /// is an error carrying the control plane's message, prefixed with `what`.
    pub async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<serde_json::Value>,
        what: &str,
    ) -> Result<serde_json::Value> {
        let credential = self.credential()?;
        let admin = self.address;
        let tcp = TcpStream::connect(admin)
            .await
            .with_context(|| format!("connecting to the control plane's admin API at {admin}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, admin)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::AUTHORIZATION, format!("Bearer {credential}"))
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))?;
        let response = tokio::time::timeout(Duration::from_secs(30), sender.send_request(request))
            .await
            .context("the admin API did not answer within 30s")??;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("admin API answered {status} with a body that is not JSON"))?;
        if !status.is_success() {
            let message = value["error"].as_str().unwrap_or("no message");
            bail!("{what} ({status}): {message}");
        }
        Ok(value)
    }
}

/// POSTs to /v1/join-tokens and returns the JSON answer.
pub async fn create_token(
    admin: &str,
    data_dir: &Path,
    spiffe_id: &str,
    ttl: Duration,
    reusable: bool,
) -> Result<serde_json::Value> {
    let body = serde_json::json!({
        "spiffe_id": spiffe_id,
        "ttl_seconds": ttl.as_secs(),
        "reusable": reusable,
    });
    Admin {
        address: admin,
        data_dir,
    }
    .call(
        hyper::Method::POST,
        "/v1/join-tokens",
        Some(body),
        "control plane refused to create the token",
    )
    .await
}
