//! Proxy-to-proxy transport: TLS 1.3 with SVIDs on both ends and ALPN `latch/1`, then a small
//! length-prefixed header naming the target port. Owns the mesh TLS configs (one client config
//! per expected server ID, cached) and the header codec; used by inbound and outbound.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use latch_identity::{
    CertStore, ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier,
    TrustDomain,
};
use rustls::{ClientConfig, ServerConfig};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// ALPN of the TCP-over-mTLS transport, version 1.
pub const ALPN_LATCH: &[u8] = b"latch/1";
/// Header version this proxy speaks.
pub const HEADER_VERSION: u8 = 1;
/// Largest header body accepted (the version-1 body is 3 bytes; the rest is room to grow).
pub const MAX_HEADER_LEN: usize = 256;

#[derive(Debug, Error)]
pub enum HeaderError {
    #[error("transport header of {0} bytes is over the {MAX_HEADER_LEN}-byte cap")]
    TooLong(usize),
    #[error("transport header is truncated")]
    Truncated,
    #[error("transport header version {0} is not supported (this proxy speaks {HEADER_VERSION})")]
    Version(u8),
    #[error("transport header names port 0")]
    PortZero,
    #[error("no transport header within {0:?}")]
    Timeout(Duration),
    #[error("reading the transport header: {0}")]
    Io(#[from] io::Error),
}

/// What the client side tells the server side before any application byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportHeader {
    /// Port of the application on the server's side.
    pub target_port: u16,
}

impl TransportHeader {
    /// Wire form: u16 big-endian body length, then body = version (1 byte), target port (u16 BE).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(5);
        out.extend_from_slice(&3u16.to_be_bytes());
        out.push(HEADER_VERSION);
        out.extend_from_slice(&self.target_port.to_be_bytes());
        out
    }

    /// Parses a header body (without the length prefix).
    pub fn decode_body(body: &[u8]) -> Result<Self, HeaderError> {
        let (&version, rest) = body.split_first().ok_or(HeaderError::Truncated)?;
        if version != HEADER_VERSION {
            return Err(HeaderError::Version(version));
        }
        let port = rest.get(..2).ok_or(HeaderError::Truncated)?;
        let target_port = u16::from_be_bytes([port[0], port[1]]);
        if target_port == 0 {
            return Err(HeaderError::PortZero);
        }
        Ok(Self { target_port })
    }

    /// Reads one header, refusing oversized ones before reading their body, within `timeout`.
    pub async fn read_from<R: AsyncRead + Unpin>(
        reader: &mut R,
        timeout: Duration,
    ) -> Result<Self, HeaderError> {
        let read = async {
            let mut len = [0u8; 2];
            reader
                .read_exact(&mut len)
                .await
                .map_err(eof_is_truncation)?;
            let len = usize::from(u16::from_be_bytes(len));
            if len > MAX_HEADER_LEN {
                return Err(HeaderError::TooLong(len));
            }
            let mut body = vec![0u8; len];
            reader
                .read_exact(&mut body)
                .await
                .map_err(eof_is_truncation)?;
            Self::decode_body(&body)
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| HeaderError::Timeout(timeout))?
    }

    pub async fn write_to<W: AsyncWrite + Unpin>(&self, writer: &mut W) -> io::Result<()> {
        writer.write_all(&self.encode()).await
    }
}

fn eof_is_truncation(e: io::Error) -> HeaderError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        HeaderError::Truncated
    } else {
        HeaderError::Io(e)
    }
}

/// The mesh TLS configs, built once per identity store.
pub struct MeshTls {
    store: Arc<CertStore>,
    server: Arc<ServerConfig>,
    clients: DashMap<SpiffeId, Arc<ClientConfig>>,
}

impl MeshTls {
    /// Server side requires a client SVID of `trust_domain` chained to the bundle.
    pub fn new(store: Arc<CertStore>, trust_domain: TrustDomain) -> Result<Self, rustls::Error> {
        let verifier = SpiffeClientVerifier::new(
            store.clone(),
            ClientAuth::Required(ExpectedPeer::TrustDomain(trust_domain)),
        );
        let mut server =
            latch_identity::tls::server_config(store.clone(), Arc::new(verifier), &[ALPN_LATCH])?;
        // No resumption yet: a resumed session skips certificate checks, and tickets would
        // have to be bound to the SVID that earned them.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        Ok(Self {
            store,
            server: Arc::new(server),
            clients: DashMap::new(),
        })
    }

    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client config that accepts only a server presenting exactly `expected`.
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        if let Some(config) = self.clients.get(expected) {
            return Ok(config.clone());
        }
        let verifier =
            SpiffeServerVerifier::new(self.store.clone(), ExpectedPeer::Exactly(expected.clone()));
        let mut config = latch_identity::tls::client_config(
            Some(self.store.clone()),
            Arc::new(verifier),
            &[ALPN_LATCH],
        )?;
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        self.clients.insert(expected.clone(), config.clone());
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_round_trips() {
        let header = TransportHeader { target_port: 8080 };
        let bytes = header.encode();
        let read = TransportHeader::read_from(&mut bytes.as_slice(), Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(read, header);
    }

    #[tokio::test]
    async fn bad_headers_are_refused() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff, 0xff], "TooLong"),
            (vec![0x00, 0x03, 0x01], "Truncated"),
            (vec![0x00], "Truncated"),
            (vec![0x00, 0x03, 0x02, 0x00, 0x50], "Version"),
            (vec![0x00, 0x03, 0x01, 0x00, 0x00], "PortZero"),
            (vec![0x00, 0x01, 0x01], "Truncated"),
        ];
        for (bytes, want) in cases {
            let err = TransportHeader::read_from(&mut bytes.as_slice(), Duration::from_secs(1))
                .await
                .unwrap_err();
            assert!(format!("{err:?}").starts_with(want), "{bytes:?}: {err:?}");
        }
    }

    #[tokio::test]
    async fn a_silent_peer_times_out() {
        let (mut client, _server) = tokio::io::duplex(64);
        let err = TransportHeader::read_from(&mut client, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, HeaderError::Timeout(_)));
    }
}
