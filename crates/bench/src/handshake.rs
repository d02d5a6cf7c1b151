//! `cargo xtask bench handshake`: what the post-quantum key exchange costs. Full mTLS handshakes
//! as two proxies run them (SVIDs both ways, the SPIFFE verifiers, TLS 1.3, ALPN latch/1, no
//! resumption) between a rustls client and server in memory on one thread, with Latch's groups
//! (X25519MLKEM768 first) and with X25519 only, interleaved: ClientHello and ServerHello sizes,
//! bytes each way, and CPU per handshake for both sides together.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use latch_identity::store::SvidResolver;
use latch_identity::{
    CertStore, ClientAuth, ExpectedPeer, SpiffeClientVerifier, SpiffeId, SpiffeServerVerifier,
    TrustBundle,
};
use rustls::crypto::SupportedKxGroup;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

/// `latch-bench handshake`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Full handshakes per setting and round.
    #[arg(long, default_value_t = 500)]
    handshakes: u32,
    /// Rounds, settings interleaved; the report gives the median round.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
}

const ID: &str = "spiffe://bench.local/ns/demo/sa/api";

/// A client and a server config on `groups`, presenting one SVID each way.
fn configs(
    groups: &[&'static dyn SupportedKxGroup],
) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let (ca_pem, svid) = latch_testkit::certs::ca_and_svid(ID);
    let bundle = TrustBundle::from_pem(ca_pem.as_bytes()).context("the bench CA")?;
    let store = Arc::new(CertStore::with_svid(svid, bundle));
    let expected = ExpectedPeer::Exactly(SpiffeId::parse(ID)?);
    let mut provider = (*latch_identity::tls::provider()).clone();
    provider.kx_groups = groups.to_vec();
    let provider = Arc::new(provider);
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier::new(
            store.clone(),
            ClientAuth::Required(expected.clone()),
        )))
        .with_cert_resolver(Arc::new(SvidResolver::new(store.clone())));
    server.send_tls13_tickets = 0;
    server.alpn_protocols = vec![b"latch/1".to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            store.clone(),
            expected,
        )))
        .with_client_cert_resolver(Arc::new(SvidResolver::new(store)));
    client.resumption = rustls::client::Resumption::disabled();
    client.enable_sni = false;
    client.alpn_protocols = vec![b"latch/1".to_vec()];
    Ok((Arc::new(client), Arc::new(server)))
}

/// Bytes of one handshake on the wire (TLS records, headers included).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Sizes {
    client_hello: usize,
    server_hello: usize,
    client_total: usize,
    server_total: usize,
}

/// The length of the first TLS record in `flight`, header included.
fn first_record(flight: &[u8]) -> usize {
    match flight {
        [_, _, _, hi, lo, ..] => 5 + usize::from(u16::from_be_bytes([*hi, *lo])),
        _ => flight.len(),
    }
}

/// Moves everything `from` wants to send into `to`; the bytes moved.
fn deliver(
    from: &mut dyn FnMut(&mut Vec<u8>) -> std::io::Result<usize>,
    to: &mut dyn FnMut(&mut &[u8]) -> Result<()>,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.clear();
    while from(buf)? > 0 {}
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to(&mut rest)?;
    }
    Ok(())
}

/// One full handshake between new connections of `client` and `server`.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Result<Sizes> {
    let mut c = ClientConnection::new(
        client.clone(),
        latch_identity::tls::placeholder_server_name(),
    )?;
    let mut s = ServerConnection::new(server.clone())?;
    let mut sizes = Sizes::default();
    let mut buf = Vec::with_capacity(16 * 1024);
    for _ in 0..8 {
        if !c.is_handshaking() && !s.is_handshaking() {
            if c.alpn_protocol() != Some(b"latch/1") {
                bail!("ALPN latch/1 not negotiated");
            }
            return Ok(sizes);
        }
        deliver(
            &mut |out| {
                if c.wants_write() {
                    c.write_tls(out)
                } else {
                    Ok(0)
                }
            },
            &mut |input| {
                s.read_tls(input)?;
                s.process_new_packets()?;
                Ok(())
            },
            &mut buf,
        )?;
        if sizes.client_hello == 0 {
            sizes.client_hello = first_record(&buf);
        }
        sizes.client_total += buf.len();
        deliver(
            &mut |out| {
                if s.wants_write() {
                    s.write_tls(out)
                } else {
                    Ok(0)
                }
            },
            &mut |input| {
                c.read_tls(input)?;
                c.process_new_packets()?;
                Ok(())
            },
            &mut buf,
        )?;
        if sizes.server_hello == 0 && !buf.is_empty() {
            sizes.server_hello = first_record(&buf);
        }
        sizes.server_total += buf.len();
    }
    bail!("the handshake did not finish in 8 flights")
}

struct Setting {
    name: &'static str,
    groups: &'static [&'static dyn SupportedKxGroup],
}

static X25519_ONLY: &[&dyn SupportedKxGroup] = &[rustls::crypto::aws_lc_rs::kx_group::X25519];

fn settings() -> [Setting; 2] {
    [
        Setting {
            name: "X25519MLKEM768 (Latch)",
            groups: latch_identity::crypto::KX_GROUPS,
        },
        Setting {
            name: "X25519 only",
            groups: X25519_ONLY,
        },
    ]
}

pub fn run(options: Options) -> Result<()> {
    if options.handshakes == 0 || options.rounds == 0 {
        bail!("--handshakes and --rounds must be at least 1");
    }
    let settings = settings();
    let configs = settings
        .iter()
        .map(|s| configs(s.groups))
        .collect::<Result<Vec<_>>>()?;
    let mut sizes = vec![Sizes::default(); settings.len()];
    let mut micros: Vec<Vec<f64>> = vec![Vec::new(); settings.len()];
    for _ in 0..options.rounds {
        for (i, (client, server)) in configs.iter().enumerate() {
            let started = Instant::now();
            for _ in 0..options.handshakes {
                sizes[i] = handshake(client, server)?;
            }
            micros[i].push(started.elapsed().as_secs_f64() * 1e6 / f64::from(options.handshakes));
        }
    }
    println!(
        "full mTLS handshakes in memory, one thread, {} per setting and round, median of {} \
         rounds\n",
        options.handshakes, options.rounds
    );
    println!(
        "| key exchange | ClientHello, bytes | ServerHello, bytes | client to server, bytes | \
         server to client, bytes | CPU per handshake (both sides), µs |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (i, setting) in settings.iter().enumerate() {
        let rounds = &mut micros[i];
        rounds.sort_by(f64::total_cmp);
        let s = sizes[i];
        println!(
            "| {} | {} | {} | {} | {} | {:.0} |",
            setting.name,
            s.client_hello,
            s.server_hello,
            s.client_total,
            s.server_total,
            rounds[rounds.len() / 2]
        );
    }
    Ok(())
}
