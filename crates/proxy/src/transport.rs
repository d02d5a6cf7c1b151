//! Proxy-to-proxy transport: TLS 1.3 with SVIDs on both ends and ALPN `latch/1`, then a small
//! length-prefixed header naming the target port. Owns the mesh TLS configs (one client config
//! per expected server ID, cached) and the header codec; used by inbound and outbound.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use latch_identity::{
    CertStore, ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier,
    TrustDomain,
};
use rustls::server::ProducesTickets;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::ServerName;
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

/// Session tickets bound to the server's SVID: each SVID gets its own ticket keys, a ticket is
/// tagged with the SVID it was issued under, and once that SVID has expired its tickets no
/// longer decrypt (the client falls back to a full handshake, which checks certificates again).
/// A resumed TLS 1.3 handshake runs no certificate verifier, so this is what keeps resumption
/// from outliving an identity.
#[derive(Debug)]
pub struct SvidTicketer {
    store: Arc<CertStore>,
    generations: Mutex<Vec<TicketGeneration>>,
}

#[derive(Debug)]
struct TicketGeneration {
    tag: [u8; TAG_LEN],
    not_after: SystemTime,
    keys: Arc<dyn ProducesTickets>,
}

const TAG_LEN: usize = 8;
/// Longest ticket lifetime announced, whatever the SVID's validity.
const MAX_TICKET_LIFETIME: Duration = Duration::from_secs(6 * 3600);

fn serial_tag(serial: &str) -> [u8; TAG_LEN] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, serial.as_bytes());
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&digest.as_ref()[..TAG_LEN]);
    tag
}

impl SvidTicketer {
    pub fn new(store: Arc<CertStore>) -> Self {
        Self {
            store,
            generations: Mutex::new(Vec::new()),
        }
    }

    /// Ticket keys of the SVID valid at `now`, created on first use; drops expired ones.
    fn current(&self, now: SystemTime) -> Option<([u8; TAG_LEN], Arc<dyn ProducesTickets>)> {
        let svid = self.store.valid_svid(now)?;
        let tag = serial_tag(&svid.info().serial);
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        generations.retain(|g| g.not_after > now);
        if let Some(g) = generations.iter().find(|g| g.tag == tag) {
            return Some((tag, g.keys.clone()));
        }
        let keys = rustls::crypto::aws_lc_rs::Ticketer::new().ok()?;
        generations.push(TicketGeneration {
            tag,
            not_after: svid.info().not_after,
            keys: keys.clone(),
        });
        Some((tag, keys))
    }

    /// `decrypt` as of `now`.
    pub fn decrypt_at(&self, cipher: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        let (tag, sealed) = cipher.split_at_checked(TAG_LEN)?;
        let keys = {
            let generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
            let g = generations
                .iter()
                .find(|g| g.tag == tag && g.not_after > now)?;
            g.keys.clone()
        };
        keys.decrypt(sealed)
    }
}

impl ProducesTickets for SvidTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        let now = SystemTime::now();
        let left = self
            .store
            .valid_svid(now)
            .and_then(|s| s.info().not_after.duration_since(now).ok())
            .unwrap_or_default();
        u32::try_from(left.min(MAX_TICKET_LIFETIME).as_secs()).unwrap_or(0)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let (tag, keys) = self.current(SystemTime::now())?;
        let sealed = keys.encrypt(plain)?;
        let mut ticket = Vec::with_capacity(TAG_LEN + sealed.len());
        ticket.extend_from_slice(&tag);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, SystemTime::now())
    }
}

/// True when a resumed session's stored peer certificate is still a valid SVID matching
/// `expected` at `now`, and not revoked. (The chain was verified at the full handshake that
/// made the ticket.)
pub fn resumed_peer_still_valid(
    peer_certificates: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    expected: &ExpectedPeer,
    revocations: &latch_identity::Revocations,
    now: SystemTime,
) -> bool {
    let Some(leaf) = peer_certificates.and_then(|c| c.first()) else {
        return false;
    };
    let Ok(info) = latch_identity::SvidInfo::from_leaf(leaf) else {
        return false;
    };
    let matches = match expected {
        ExpectedPeer::AnyInBundle => true,
        ExpectedPeer::TrustDomain(td) => info.id.is_member_of(td),
        ExpectedPeer::Exactly(id) => &info.id == id,
    };
    matches
        && !info.is_expired_at(now)
        && now >= info.not_before
        && revocations.covers(&info).is_none()
}

/// The mesh TLS configs, built once per identity store.
pub struct MeshTls {
    store: Arc<CertStore>,
    trust_domain: TrustDomain,
    server: Arc<ServerConfig>,
    clients: DashMap<SpiffeId, Arc<ClientConfig>>,
    /// The same without session resumption, for the retry after a stale resumed session.
    fresh_clients: DashMap<SpiffeId, Arc<ClientConfig>>,
    /// HBONE tunnels: ALPN h2, a full handshake each (a tunnel lives long).
    tunnel_clients: DashMap<SpiffeId, Arc<ClientConfig>>,
}

impl MeshTls {
    /// Server side requires a client SVID of `trust_domain` chained to the bundle.
    pub fn new(store: Arc<CertStore>, trust_domain: TrustDomain) -> Result<Self, rustls::Error> {
        let verifier = SpiffeClientVerifier::new(
            store.clone(),
            ClientAuth::Required(ExpectedPeer::TrustDomain(trust_domain.clone())),
        );
        // `latch/1` first: a client offering both keeps the protocol it has always had.
        let mut server = latch_identity::tls::server_config(
            store.clone(),
            Arc::new(verifier),
            &[ALPN_LATCH, crate::hbone::ALPN_H2],
        )?;
        // Stateless resumption with tickets bound to our SVID; no server-side session cache.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.ticketer = Arc::new(SvidTicketer::new(store.clone()));
        server.send_tls13_tickets = 1;
        Ok(Self {
            store,
            trust_domain,
            server: Arc::new(server),
            clients: DashMap::new(),
            fresh_clients: DashMap::new(),
            tunnel_clients: DashMap::new(),
        })
    }

    /// What a resumed inbound session's client must still be.
    /// The identity store: this proxy's SVID, the bundle and the revocations handshakes check.
    pub fn store(&self) -> &Arc<CertStore> {
        &self.store
    }

    pub fn inbound_peer(&self) -> ExpectedPeer {
        ExpectedPeer::TrustDomain(self.trust_domain.clone())
    }

    /// The (never sent) server name under which sessions with `peer` are cached: derived from
    /// the peer's ID and our own SVID's serial, so a ticket is only offered to the identity it
    /// came from, and never after our SVID has rotated.
    pub fn session_name(&self, peer: &SpiffeId) -> ServerName<'static> {
        let serial = self
            .store
            .svid()
            .map(|s| s.info().serial.clone())
            .unwrap_or_default();
        let digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("{peer}\n{serial}").as_bytes(),
        );
        let label = latch_identity::hex::encode(&digest.as_ref()[..16]);
        ServerName::try_from(format!("{label}.latch.invalid"))
            .unwrap_or_else(|_| latch_identity::tls::placeholder_server_name())
    }

    pub fn server(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// A client config that accepts only a server presenting exactly `expected`, resuming
    /// sessions with it.
    pub fn client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        self.client_config(expected, true)
    }

    /// `client` without session resumption: always a full handshake.
    pub fn client_without_resumption(
        &self,
        expected: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        self.client_config(expected, false)
    }

    /// The client config of an HBONE tunnel to `expected`: ALPN h2, no resumption.
    pub fn tunnel_client(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        if let Some(config) = self.tunnel_clients.get(expected) {
            return Ok(config.clone());
        }
        let verifier =
            SpiffeServerVerifier::new(self.store.clone(), ExpectedPeer::Exactly(expected.clone()));
        let mut config = latch_identity::tls::client_config(
            Some(self.store.clone()),
            Arc::new(verifier),
            &[crate::hbone::ALPN_H2],
        )?;
        config.resumption = rustls::client::Resumption::disabled();
        let config = Arc::new(config);
        self.tunnel_clients.insert(expected.clone(), config.clone());
        Ok(config)
    }

    fn client_config(
        &self,
        expected: &SpiffeId,
        resume: bool,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let cache = if resume {
            &self.clients
        } else {
            &self.fresh_clients
        };
        if let Some(config) = cache.get(expected) {
            return Ok(config.clone());
        }
        let verifier =
            SpiffeServerVerifier::new(self.store.clone(), ExpectedPeer::Exactly(expected.clone()));
        let mut config = latch_identity::tls::client_config(
            Some(self.store.clone()),
            Arc::new(verifier),
            &[ALPN_LATCH],
        )?;
        config.resumption = if resume {
            rustls::client::Resumption::in_memory_sessions(4096)
        } else {
            rustls::client::Resumption::disabled()
        };
        let config = Arc::new(config);
        cache.insert(expected.clone(), config.clone());
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
