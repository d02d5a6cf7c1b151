//! Copies bytes both ways between two connections until both directions finish, passing each
//! half-close on (EOF on one side shuts down writing on the other). An error in either direction
//! (a reset) ends both; so do an idle period with no bytes either way, a half-closed pair whose
//! remaining direction cannot deliver (its destination stopped reading), and the proxy stopping.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Buffer size of a quiet connection: small, so idle connections cost little memory.
const MIN_BUFFER: usize = 2 * 1024;
/// Buffer size during bulk transfer: large reads and TLS writes, fewer system calls.
const MAX_BUFFER: usize = 64 * 1024;

/// Bytes moved in each direction.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Transferred {
    /// From the first stream to the second.
    pub forward: u64,
    /// From the second stream to the first.
    pub backward: u64,
}

/// Why copying stopped early.
#[derive(Debug)]
pub enum CopyEnd {
    Done(Transferred),
    Idle(Transferred),
    /// One direction ended with EOF and the other had bytes it could not deliver for the
    /// half-closed allowance (its destination stopped reading).
    HalfClosedStalled(Transferred),
    Cancelled(Transferred),
    Failed(io::Error, Transferred),
}

/// `Writing::since` when no write is under way.
const NOT_WRITING: u64 = u64::MAX;

/// Since when (ms after the copy's start) one direction has been waiting to write.
struct Writing {
    since: AtomicU64,
}

impl Writing {
    fn new() -> Self {
        Self {
            since: AtomicU64::new(NOT_WRITING),
        }
    }

    /// How long the write under way has waited at `now`, if one is.
    fn waited(&self, now: Duration) -> Option<Duration> {
        match self.since.load(Ordering::Relaxed) {
            NOT_WRITING => None,
            since => Some(now.saturating_sub(Duration::from_millis(since))),
        }
    }
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    moved: &AtomicU64,
    last: &AtomicU64,
    writing: &Writing,
    start: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MIN_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps going.
            return to.shutdown().await;
        }
        writing
            .since
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let written = to.write_all(&buf[..n]).await;
        writing.since.store(NOT_WRITING, Ordering::Relaxed);
        written?;
        // Grow while reads fill the buffer (bulk), shrink back when traffic turns small again.
        if n == buf.len() && buf.len() < MAX_BUFFER {
            buf = vec![0u8; (buf.len() * 4).min(MAX_BUFFER)];
        } else if buf.len() > MIN_BUFFER && n <= MIN_BUFFER / 2 {
            buf = vec![0u8; MIN_BUFFER];
        }
        moved.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Copies between `a` and `b` until both directions have seen EOF, `idle` passes without a
/// byte, or `cancel` fires. Once one direction has ended with EOF, a write of the other that
/// waits `half_closed` (the side that half-closed stopped reading too: it is gone) closes the
/// pair, so a connection whose one side has left is not held for the whole idle timeout. A
/// remaining side that is only silent (an app taking its time to answer) keeps the idle
/// timeout.
pub async fn bidirectional<A, B>(
    a: A,
    b: B,
    idle: Duration,
    half_closed: Duration,
    cancel: &CancellationToken,
) -> CopyEnd
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let (forward, backward, last) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let (writing_b, writing_a) = (Writing::new(), Writing::new());
    let start = Instant::now();
    let totals = || Transferred {
        forward: forward.load(Ordering::Relaxed),
        backward: backward.load(Ordering::Relaxed),
    };
    // An EOF ends one direction only (half-close); an error ends both.
    let to_b = one_way(a_read, b_write, &forward, &last, &writing_b, start);
    let to_a = one_way(b_read, a_write, &backward, &last, &writing_a, start);
    tokio::pin!(to_b, to_a);
    let (mut to_b_done, mut to_a_done) = (false, false);
    let mark_progress = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        let now = start.elapsed();
        let quiet_for = now.saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if quiet_for >= idle {
            return CopyEnd::Idle(totals());
        }
        let mut wake_in = idle - quiet_for;
        // Half-closed: the remaining direction may wait to write for `half_closed` at most.
        let remaining = match (to_b_done, to_a_done) {
            (true, false) => Some(&writing_a),
            (false, true) => Some(&writing_b),
            _ => None,
        };
        if let Some(writing) = remaining {
            match writing.waited(now) {
                Some(waited) if waited >= half_closed => {
                    return CopyEnd::HalfClosedStalled(totals());
                }
                Some(waited) => wake_in = wake_in.min(half_closed - waited),
                None => wake_in = wake_in.min(half_closed),
            }
        }
        tokio::select! {
            result = &mut to_b, if !to_b_done => match result {
                Ok(()) => {
                    to_b_done = true;
                    // The other direction's allowance starts now.
                    mark_progress();
                }
                Err(e) => return CopyEnd::Failed(e, totals()),
            },
            result = &mut to_a, if !to_a_done => match result {
                Ok(()) => {
                    to_a_done = true;
                    mark_progress();
                }
                Err(e) => return CopyEnd::Failed(e, totals()),
            },
            _ = tokio::time::sleep(wake_in) => {}
            _ = cancel.cancelled() => return CopyEnd::Cancelled(totals()),
        }
        if to_b_done && to_a_done {
            return CopyEnd::Done(totals());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn half_close_is_passed_on_and_the_other_direction_continues() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let cancel = CancellationToken::new();
        let copier = tokio::spawn(async move {
            bidirectional(
                proxy_a,
                proxy_b,
                Duration::from_secs(5),
                Duration::from_secs(5),
                &cancel,
            )
            .await
        });
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        client_write.write_all(b"request").await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut got = Vec::new();
        server_read.read_to_end(&mut got).await.unwrap(); // sees EOF after the request
        assert_eq!(got, b"request");
        server_write
            .write_all(b"response after the client's half-close")
            .await
            .unwrap();
        server_write.shutdown().await.unwrap();
        let mut back = Vec::new();
        client_read.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"response after the client's half-close");
        match copier.await.unwrap() {
            CopyEnd::Done(t) => assert_eq!((t.forward, t.backward), (7, 38)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_error_in_one_direction_ends_both() {
        struct Broken;
        impl AsyncRead for Broken {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                _: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()))
            }
        }
        impl AsyncWrite for Broken {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<io::Result<usize>> {
                std::task::Poll::Ready(Ok(buf.len()))
            }
            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                _: &mut std::task::Context<'_>,
            ) -> std::task::Poll<io::Result<()>> {
                std::task::Poll::Ready(Ok(()))
            }
        }
        // The app side stays open and silent; the reset on the other side must still end it.
        let (_app, proxy_a) = tokio::io::duplex(64);
        let end = bidirectional(
            proxy_a,
            Broken,
            Duration::from_secs(5),
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(end, CopyEnd::Failed(..)), "{end:?}");
    }

    #[tokio::test]
    async fn idle_connections_are_closed() {
        let (_client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let end = bidirectional(
            proxy_a,
            proxy_b,
            Duration::from_millis(100),
            Duration::from_millis(50),
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(end, CopyEnd::Idle(_)), "{end:?}");
    }

    #[tokio::test]
    async fn a_half_closed_pair_whose_closed_side_stopped_reading_is_closed() {
        // The client sends, half-closes and never reads again; the app answers with more than
        // the pipes hold, so the proxy's write towards the client waits.
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, server) = tokio::io::duplex(64);
        let (_client_read, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"hi").await.unwrap();
        client_write.shutdown().await.unwrap();
        let (_server_read, mut server_write) = tokio::io::split(server);
        tokio::spawn(async move {
            let _ = server_write.write_all(&[7u8; 64 * 1024]).await;
        });
        let started = Instant::now();
        let end = bidirectional(
            proxy_a,
            proxy_b,
            Duration::from_secs(3600),
            Duration::from_millis(200),
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(end, CopyEnd::HalfClosedStalled(t) if t.forward == 2),
            "{end:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not held to the idle timeout"
        );
    }

    #[tokio::test]
    async fn a_half_closed_pair_waits_for_a_slow_answer() {
        // The client sends its request and half-closes; the app answers after three times the
        // half-closed allowance, which is no reason to cut it.
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let copier = tokio::spawn(async move {
            bidirectional(
                proxy_a,
                proxy_b,
                Duration::from_secs(3600),
                Duration::from_millis(100),
                &CancellationToken::new(),
            )
            .await
        });
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = tokio::io::split(server);
        client_write.write_all(b"query").await.unwrap();
        client_write.shutdown().await.unwrap();
        let mut request = Vec::new();
        server_read.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"query");
        tokio::time::sleep(Duration::from_millis(300)).await;
        server_write.write_all(b"answer").await.unwrap();
        server_write.shutdown().await.unwrap();
        let mut answer = Vec::new();
        client_read.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"answer");
        match copier.await.unwrap() {
            CopyEnd::Done(t) => assert_eq!((t.forward, t.backward), (5, 6)),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_half_closed_pair_stays_open_while_the_other_direction_moves() {
        let (client, proxy_a) = tokio::io::duplex(1024);
        let (proxy_b, server) = tokio::io::duplex(1024);
        let copier = tokio::spawn(async move {
            bidirectional(
                proxy_a,
                proxy_b,
                Duration::from_secs(3600),
                Duration::from_millis(300),
                &CancellationToken::new(),
            )
            .await
        });
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (_, mut server_write) = tokio::io::split(server);
        client_write.shutdown().await.unwrap();
        // The app streams for three times the allowance, a chunk every 100 ms.
        for _ in 0..9 {
            server_write.write_all(b"chunk").await.unwrap();
            let mut got = [0u8; 5];
            client_read.read_exact(&mut got).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server_write.shutdown().await.unwrap();
        match copier.await.unwrap() {
            CopyEnd::Done(t) => assert_eq!((t.forward, t.backward), (0, 45)),
            other => panic!("{other:?}"),
        }
    }
}
