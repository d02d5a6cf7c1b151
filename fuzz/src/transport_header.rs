//! The transport header as the inbound side reads it: `TransportHeader::read_from` on a peer
//! stream delivered in fuzzer-chosen chunk sizes. It must decide exactly what the wire format
//! says, never consume a byte past the length the peer declared (what follows belongs to the
//! application), never read an oversized body at all, and agree with `encode`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use latch_proxy::transport::{HEADER_VERSION, HeaderError, MAX_HEADER_LEN, TransportHeader};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::runtime::Runtime;

/// A peer's bytes, handed out at most `chunk` at a time (0: all at once); counts what was taken.
struct Peer<'a> {
    bytes: &'a [u8],
    chunk: usize,
    taken: usize,
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let rest = &self.bytes[self.taken..];
        let chunk = if self.chunk == 0 {
            rest.len()
        } else {
            self.chunk
        };
        let n = chunk.min(rest.len()).min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.taken += n;
        Poll::Ready(Ok(()))
    }
}

thread_local! {
    static RUNTIME: Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread tokio runtime");
}

/// Reads one header from `bytes`; returns the outcome and how many bytes were consumed.
fn read(bytes: &[u8], chunk: usize) -> (Result<TransportHeader, HeaderError>, usize) {
    let mut peer = Peer {
        bytes,
        chunk,
        taken: 0,
    };
    let result = RUNTIME.with(|rt| {
        rt.block_on(TransportHeader::read_from(
            &mut peer,
            Duration::from_secs(5),
        ))
    });
    (result, peer.taken)
}

/// What the wire format says about `bytes`: Ok(port), or the name of the refusal.
fn by_wire_format(bytes: &[u8]) -> Result<u16, &'static str> {
    let [a, b, rest @ ..] = bytes else {
        return Err("Truncated");
    };
    let declared = usize::from(u16::from_be_bytes([*a, *b]));
    if declared > MAX_HEADER_LEN {
        return Err("TooLong");
    }
    let Some(body) = rest.get(..declared) else {
        return Err("Truncated");
    };
    match body {
        [] => Err("Truncated"),
        [version, ..] if *version != HEADER_VERSION => Err("Version"),
        [_, hi, lo, ..] => match u16::from_be_bytes([*hi, *lo]) {
            0 => Err("PortZero"),
            port => Ok(port),
        },
        _ => Err("Truncated"),
    }
}

fn name(e: &HeaderError) -> &'static str {
    match e {
        HeaderError::TooLong(_) => "TooLong",
        HeaderError::Truncated => "Truncated",
        HeaderError::Version(_) => "Version",
        HeaderError::PortZero => "PortZero",
        HeaderError::Timeout(_) => "Timeout",
        HeaderError::Io(_) => "Io",
    }
}

/// Input: one byte of chunk size, then what the peer sends (header and application bytes).
pub fn check(data: &[u8]) {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let (result, taken) = read(stream, usize::from(chunk));
    let got = result.as_ref().map(|h| h.target_port).map_err(name);
    assert_eq!(got, by_wire_format(stream), "header {stream:02x?}");

    let declared = stream
        .get(..2)
        .map(|p| usize::from(u16::from_be_bytes([p[0], p[1]])));
    match declared {
        None => assert_eq!(taken, stream.len()),
        // An oversized header is refused on its length alone.
        Some(len) if len > MAX_HEADER_LEN => assert_eq!(taken, 2, "read into an oversized body"),
        Some(len) => {
            assert!(
                taken <= 2 + len,
                "read {taken} bytes of a {len}-byte header"
            );
            if result.is_ok() {
                assert_eq!(taken, 2 + len, "left part of the header unread");
            }
        }
    }

    if let Ok(header) = result {
        let encoded = header.encode();
        assert_eq!(read(&encoded, 0).0.ok(), Some(header));
        if declared == Some(3) {
            assert_eq!(&stream[..5], encoded.as_slice());
        }
    }

    // Encoding round-trips for the port these bytes name, and leaves what follows unread.
    if let Some(port) = stream
        .get(..2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]))
        .filter(|p| *p != 0)
    {
        let header = TransportHeader { target_port: port };
        let mut wire = header.encode();
        assert_eq!(wire.len(), 5);
        assert_eq!(TransportHeader::decode_body(&wire[2..]).ok(), Some(header));
        wire.extend_from_slice(stream);
        let (again, taken) = read(&wire, usize::from(chunk));
        assert_eq!(again.ok(), Some(header));
        assert_eq!(taken, 5, "the header consumed application bytes");
    }
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let header = |port: u16| TransportHeader { target_port: port }.encode();
    let mut grown = vec![0x00, 0x08, HEADER_VERSION, 0x1f, 0x90];
    grown.extend_from_slice(&[0xaa; 5]);
    let mut max_len = vec![0x01, 0x00, HEADER_VERSION, 0x00, 0x50];
    max_len.resize(2 + MAX_HEADER_LEN, 0);
    let mut over = vec![0x01, 0x01];
    over.resize(2 + MAX_HEADER_LEN + 1, 0);
    let with = |chunk: u8, bytes: Vec<u8>| [vec![chunk], bytes].concat();
    vec![
        ("port-8080".into(), with(0, header(8080))),
        ("port-8080-bytewise".into(), with(1, header(8080))),
        (
            "then-app-data".into(),
            with(2, [header(443), b"GET / HTTP/1.1\r\n".to_vec()].concat()),
        ),
        ("port-65535".into(), with(0, header(65535))),
        ("longer-body".into(), with(3, grown)),
        ("body-at-cap".into(), with(0, max_len)),
        ("body-over-cap".into(), with(0, over)),
        ("length-ffff".into(), with(0, vec![0xff, 0xff])),
        ("truncated-body".into(), with(0, vec![0x00, 0x03, 0x01])),
        ("one-byte".into(), with(0, vec![0x00])),
        (
            "version-2".into(),
            with(0, vec![0x00, 0x03, 0x02, 0x00, 0x50]),
        ),
        (
            "port-zero".into(),
            with(0, vec![0x00, 0x03, 0x01, 0x00, 0x00]),
        ),
        (
            "short-body".into(),
            with(0, vec![0x00, 0x01, 0x01, 0x1f, 0x90]),
        ),
        ("empty-body".into(), with(0, vec![0x00, 0x00, 0x01])),
    ]
}
