//! Rewrites the `:authority` of every request a Workload API client sends to `localhost`, before
//! the HTTP/2 server under tonic reads it. gRPC C-core clients (py-spiffe, grpcio), grpc-java and
//! grpc-swift send the Unix socket's path, raw or percent-encoded, which h2 refuses as a malformed
//! authority (RST_STREAM PROTOCOL_ERROR; hyperium/h2 #487). Used only on the Workload API socket,
//! as the read half of each connection (`workload_api::ApiConn`); every other listener keeps h2's
//! strict checks.
//!
//! HPACK makes a header block depend on every block before it on the connection (the dynamic
//! table), so a block cannot be patched in place: each request's block is decoded with the
//! connection's own decoder state (`loona_hpack`, as the client's encoder expects) and encoded
//! again as literals that never touch the server's dynamic table. Every other frame, and the whole
//! server-to-client direction, passes through unchanged; h2 still validates everything else.

use loona_hpack::Decoder;
use thiserror::Error;

/// What every HTTP/2 client sends first (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame payload the server accepts: h2's SETTINGS_MAX_FRAME_SIZE, which tonic
/// leaves at the protocol's default. Rewritten blocks are cut into frames of this size.
const MAX_FRAME: usize = 16_384;
/// The largest header block (HEADERS and its CONTINUATIONs) accepted. A Workload API request's
/// headers take a few hundred bytes; this bounds what one connection can make the proxy hold.
const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The dynamic table size the server advertises (h2 keeps the protocol default, 4096); the
/// client may not use more.
const HEADER_TABLE_SIZE: usize = 4096;
/// What `:authority` becomes: the value grpc-go and tonic clients send on a Unix socket.
const AUTHORITY: &[u8] = b"localhost";

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's byte stream cannot be passed on; the connection is closed.
#[derive(Debug, Error, PartialEq)]
pub enum FrontError {
    #[error("not an HTTP/2 client: the Workload API speaks gRPC (HTTP/2 with prior knowledge)")]
    Preface,
    #[error("HTTP/2 frame of {0} bytes is over the {MAX_FRAME}-byte maximum")]
    FrameTooLarge(usize),
    #[error("malformed HTTP/2 {0} frame")]
    Malformed(&'static str),
    #[error("header block over {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge,
    #[error("HPACK: {0}")]
    Hpack(String),
}

/// A header block being gathered from a HEADERS frame and its CONTINUATIONs.
struct Pending {
    stream_id: [u8; 4],
    end_stream: bool,
    block: Vec<u8>,
}

/// The client-to-server half of one connection: fed raw bytes, yields the bytes the server reads.
pub struct AuthorityRewriter {
    state: BlockState,
    /// Bytes read but not yet a whole frame.
    input: Vec<u8>,
    preface_seen: bool,
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            state: BlockState {
                decoder,
                pending: None,
            },
            input: Vec::new(),
            preface_seen: false,
        }
    }
}

impl AuthorityRewriter {
    /// Takes bytes read from the client and appends to `out` what the server should read, as far
    /// as whole frames allow; a partial frame waits for the next call.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), FrontError> {
        self.input.extend_from_slice(bytes);
        let mut at = 0;
        if !self.preface_seen {
            let n = self.input.len().min(PREFACE.len());
            if self.input[..n] != PREFACE[..n] {
                return Err(FrontError::Preface);
            }
            if n < PREFACE.len() {
                return Ok(());
            }
            out.extend_from_slice(PREFACE);
            self.preface_seen = true;
            at = PREFACE.len();
        }
        let result = loop {
            let rest = &self.input[at..];
            if rest.len() < 9 {
                break Ok(());
            }
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            if len > MAX_FRAME {
                break Err(FrontError::FrameTooLarge(len));
            }
            if rest.len() < 9 + len {
                break Ok(());
            }
            let frame = Frame {
                kind: rest[3],
                flags: rest[4],
                stream_id: [rest[5], rest[6], rest[7], rest[8]],
                payload: &rest[9..9 + len],
                raw: &rest[..9 + len],
            };
            if let Err(e) = self.state.frame(&frame, out) {
                break Err(e);
            }
            at += 9 + len;
        };
        self.input.drain(..at);
        result
    }
}

/// One frame as read, header fields split out.
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream_id: [u8; 4],
    payload: &'a [u8],
    /// The whole frame, header included, for passing it on unchanged.
    raw: &'a [u8],
}

/// The HPACK decoder and the block being gathered: what one frame needs to be handled.
struct BlockState {
    decoder: Decoder<'static>,
    pending: Option<Pending>,
}

impl BlockState {
    fn frame(&mut self, frame: &Frame<'_>, out: &mut Vec<u8>) -> Result<(), FrontError> {
        if let Some(pending) = &mut self.pending {
            // RFC 9113 §6.10: nothing but CONTINUATIONs of the same stream until END_HEADERS.
            if frame.kind != CONTINUATION || frame.stream_id != pending.stream_id {
                return Err(FrontError::Malformed("CONTINUATION expected"));
            }
            if pending.block.len() + frame.payload.len() > MAX_HEADER_BLOCK {
                return Err(FrontError::BlockTooLarge);
            }
            pending.block.extend_from_slice(frame.payload);
            if frame.flags & END_HEADERS != 0 {
                return self.finish(out);
            }
            return Ok(());
        }
        match frame.kind {
            HEADERS => {
                self.pending = Some(Pending {
                    stream_id: frame.stream_id,
                    end_stream: frame.flags & END_STREAM != 0,
                    block: header_block_fragment(frame.flags, frame.payload)?.to_vec(),
                });
                if frame.flags & END_HEADERS != 0 {
                    return self.finish(out);
                }
                Ok(())
            }
            // A client never sends these; passing one on would leave the decoder behind the
            // client's encoder.
            PUSH_PROMISE => Err(FrontError::Malformed("PUSH_PROMISE")),
            CONTINUATION => Err(FrontError::Malformed("CONTINUATION without HEADERS")),
            _ => {
                out.extend_from_slice(frame.raw);
                Ok(())
            }
        }
    }

    /// Decodes the gathered block, replaces `:authority`, and writes it as HEADERS (and
    /// CONTINUATIONs when it outgrows a frame).
    fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), FrontError> {
        let Some(pending) = self.pending.take() else {
            return Ok(());
        };
        let mut block = Vec::with_capacity(pending.block.len() + 64);
        self.decoder
            .decode_with_cb(&pending.block, |name, value| {
                let value: &[u8] = if &*name == b":authority" {
                    AUTHORITY
                } else {
                    &value
                };
                encode_literal(&name, value, &mut block);
            })
            .map_err(|e| FrontError::Hpack(e.to_string()))?;
        let mut chunks = block.chunks(MAX_FRAME).peekable();
        let mut kind = HEADERS;
        let mut flags = if pending.end_stream { END_STREAM } else { 0 };
        if chunks.peek().is_none() {
            // An empty block (legal, if odd) is still one HEADERS frame.
            write_frame(kind, flags | END_HEADERS, pending.stream_id, &[], out);
        }
        while let Some(chunk) = chunks.next() {
            if chunks.peek().is_none() {
                flags |= END_HEADERS;
            }
            write_frame(kind, flags, pending.stream_id, chunk, out);
            kind = CONTINUATION;
            flags = 0;
        }
        Ok(())
    }
}

/// The header block fragment of a HEADERS payload, without padding and priority fields
/// (RFC 9113 §6.2; the priority signal is deprecated and h2 ignores it).
fn header_block_fragment(flags: u8, payload: &[u8]) -> Result<&[u8], FrontError> {
    let mut fragment = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment
            .split_first()
            .ok_or(FrontError::Malformed("HEADERS"))?;
        padding = usize::from(pad);
        fragment = rest;
    }
    if flags & PRIORITY != 0 {
        fragment = fragment.get(5..).ok_or(FrontError::Malformed("HEADERS"))?;
    }
    let end = fragment
        .len()
        .checked_sub(padding)
        .ok_or(FrontError::Malformed("HEADERS"))?;
    Ok(&fragment[..end])
}

/// HPACK "literal header field without indexing, new name", neither string Huffman-coded
/// (RFC 7541 §6.2.2): the server's dynamic table is never used, so it needs no state here.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

/// An HPACK string literal: H = 0, then the length as a 7-bit-prefix integer (RFC 7541 §5.1).
fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    let mut len = s.len();
    if len < 0x7f {
        out.push(len as u8);
    } else {
        out.push(0x7f);
        len -= 0x7f;
        while len >= 0x80 {
            out.push((len % 0x80) as u8 | 0x80);
            len /= 0x80;
        }
        out.push(len as u8);
    }
    out.extend_from_slice(s);
}

fn write_frame(kind: u8, flags: u8, stream_id: [u8; 4], payload: &[u8], out: &mut Vec<u8>) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PATH: &[u8] = b"/SpiffeWorkloadAPI/FetchX509SVID";
    /// What gRPC C-core sends for unix:///tmp/x.sock.
    const SOCKET_AUTHORITY: &[u8] = b"%2Ftmp%2Fx.sock";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(kind, flags, stream.to_be_bytes(), payload, &mut out);
        out
    }

    fn string(s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_string(s, &mut out);
        out
    }

    /// Splits `bytes` (after the preface) into (type, flags, stream, payload).
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        out
    }

    /// Two requests the way C-core encodes them: the first adds `:authority` to the dynamic
    /// table, the second refers to it by index only.
    fn client_bytes() -> Vec<u8> {
        let mut first = vec![0x83, 0x86, 0x04]; // POST, http, :path (literal, no indexing)
        first.extend(string(PATH));
        first.push(0x41); // :authority, literal with incremental indexing
        first.extend(string(SOCKET_AUTHORITY));
        first.push(0x40); // a new name, indexed too
        first.extend(string(b"workload.spiffe.io"));
        first.extend(string(b"true"));
        let mut second = vec![0x83, 0x86, 0x04];
        second.extend(string(PATH));
        second.extend([0xbf, 0xbe]); // dynamic entries 63 (:authority) and 62 (the header)
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[0, 4, 0, 0, 0xff, 0xff])); // SETTINGS
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &first));
        bytes.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0")); // DATA
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        bytes
    }

    fn rewrite(chunks: &[&[u8]]) -> Result<Vec<u8>, FrontError> {
        let mut front = AuthorityRewriter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            front.feed(chunk, &mut out)?;
        }
        Ok(out)
    }

    fn expected_request() -> Vec<(Vec<u8>, Vec<u8>)> {
        [
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", PATH),
            (b":authority", b"localhost"),
            (b"workload.spiffe.io", b"true"),
        ]
        .iter()
        .map(|(n, v)| (n.to_vec(), v.to_vec()))
        .collect()
    }

    #[test]
    fn authority_becomes_localhost_also_when_taken_from_the_dynamic_table() {
        let out = rewrite(&[&client_bytes()]).unwrap();
        let frames = frames(&out);
        assert_eq!(frames.len(), 4);
        // SETTINGS and DATA pass unchanged.
        assert_eq!(frames[0], (0x4, 0, 0, vec![0, 4, 0, 0, 0xff, 0xff]));
        assert_eq!(frames[2], (0x0, END_STREAM, 1, b"\0\0\0\0\0".to_vec()));
        // The server decodes both blocks with a fresh table, as h2 would.
        let mut server = Decoder::new();
        assert_eq!(frames[1].0, HEADERS);
        assert_eq!(frames[1].1, END_HEADERS);
        assert_eq!(server.decode(&frames[1].3).unwrap(), expected_request());
        assert_eq!(
            (frames[3].0, frames[3].1),
            (HEADERS, END_HEADERS | END_STREAM)
        );
        let mut second = expected_request();
        second.swap(3, 4); // the client listed them in this order
        let decoded = server.decode(&frames[3].3).unwrap();
        assert_eq!(decoded[..3], second[..3]);
        assert!(decoded.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
        assert!(decoded.contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
    }

    #[test]
    fn bytes_fed_one_at_a_time_give_the_same_stream() {
        let bytes = client_bytes();
        let whole = rewrite(&[&bytes]).unwrap();
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(rewrite(&singles).unwrap(), whole);
    }

    #[test]
    fn padding_priority_and_continuations_are_folded_and_large_blocks_split() {
        let mut block = vec![0x83, 0x86, 0x04];
        block.extend(string(PATH));
        block.push(0x01); // :authority, literal without indexing
        block.extend(string(SOCKET_AUTHORITY));
        block.push(0x00);
        block.extend(string(b"big"));
        block.extend(string(&[b'x'; 20_000]));
        // HEADERS padded with priority carrying the first 10 bytes, then two CONTINUATIONs.
        let mut payload = vec![3]; // pad length
        payload.extend([0, 0, 0, 0, 16]); // dependency and weight
        payload.extend(&block[..10]);
        payload.extend([0, 0, 0]);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        bytes.extend(frame(CONTINUATION, 0, 5, &block[10..15_000]));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 5, &block[15_000..]));
        let frames = frames(&rewrite(&[&bytes]).unwrap());
        assert_eq!(frames.len(), 2, "over 16 KiB: HEADERS and one CONTINUATION");
        assert_eq!((frames[0].0, frames[0].1), (HEADERS, END_STREAM));
        assert_eq!((frames[1].0, frames[1].1), (CONTINUATION, END_HEADERS));
        assert!(frames.iter().all(|f| f.2 == 5 && f.3.len() <= MAX_FRAME));
        let block: Vec<u8> = frames.iter().flat_map(|f| f.3.clone()).collect();
        let decoded = Decoder::new().decode(&block).unwrap();
        assert_eq!(decoded[3], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(decoded[4].1.len(), 20_000);
    }

    #[test]
    fn what_is_not_http2_or_out_of_bounds_closes_the_connection() {
        assert_eq!(rewrite(&[b"GET / HTTP/1.1\r\n"]), Err(FrontError::Preface));
        let mut big = PREFACE.to_vec();
        big.extend([0x01, 0, 0, 0x0, 0, 0, 0, 0, 1]); // a 64 KiB DATA frame header
        assert_eq!(rewrite(&[&big]), Err(FrontError::FrameTooLarge(65_536)));
        let mut interleaved = PREFACE.to_vec();
        interleaved.extend(frame(HEADERS, 0, 1, &[0x83]));
        interleaved.extend(frame(0x0, 0, 1, b"x"));
        assert!(matches!(
            rewrite(&[&interleaved]),
            Err(FrontError::Malformed(_))
        ));
        let mut endless = PREFACE.to_vec();
        endless.extend(frame(HEADERS, 0, 1, &[0x83]));
        for _ in 0..5 {
            endless.extend(frame(CONTINUATION, 0, 1, &[0x83; MAX_FRAME]));
        }
        assert_eq!(rewrite(&[&endless]), Err(FrontError::BlockTooLarge));
        let mut bad_index = PREFACE.to_vec();
        bad_index.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0x7f])); // index 254
        assert!(matches!(rewrite(&[&bad_index]), Err(FrontError::Hpack(_))));
        let mut table_too_big = PREFACE.to_vec();
        table_too_big.extend(frame(HEADERS, END_HEADERS, 1, &[0x3f, 0xe1, 0x3f, 0x83]));
        assert!(matches!(
            rewrite(&[&table_too_big]),
            Err(FrontError::Hpack(_))
        ));
    }

    proptest! {
        /// Whatever follows the preface, the rewrite returns (bytes or an error) without
        /// panicking, and only ever emits whole frames within the size limit.
        #[test]
        fn any_input_is_handled(frames_in in proptest::collection::vec(
            (any::<u8>(), any::<u8>(), 0u32..4, proptest::collection::vec(any::<u8>(), 0..64)),
            0..8,
        )) {
            let mut bytes = PREFACE.to_vec();
            for (kind, flags, stream, payload) in &frames_in {
                bytes.extend(frame(*kind % 10, *flags, *stream, payload));
            }
            if let Ok(out) = rewrite(&[&bytes]) {
                for f in frames(&out) {
                    prop_assert!(f.3.len() <= MAX_FRAME);
                }
            }
        }
    }
}
