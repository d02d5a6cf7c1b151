//! Copies bytes both ways between two connections until both directions finish, passing each
//! half-close on (EOF on one side shuts down writing on the other). An error in either direction
//! (a reset) ends both; so do an idle period with no bytes either way, a half-closed pair whose
//! remaining direction stalls, and the proxy stopping.

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
    /// One direction ended with EOF and the other moved nothing for the half-closed allowance.
    HalfClosedStalled(Transferred),
    Cancelled(Transferred),
    Failed(io::Error, Transferred),
}

async fn one_way<R, W>(
    mut from: R,
    mut to: W,
    moved: &AtomicU64,
    last: &AtomicU64,
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
        to.write_all(&buf[..n]).await?;
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
/// byte, or `cancel` fires. Once one direction has ended with EOF, the other must keep moving:
/// `half_closed` without a byte moved in it (the side that is left is silent, or its
/// destination stopped reading) closes the pair, so a connection whose one side is gone is not
/// held for the whole idle timeout.
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
    let start = Instant::now();
    let totals = || Transferred {
        forward: forward.load(Ordering::Relaxed),
        backward: backward.load(Ordering::Relaxed),
    };
    // An EOF ends one direction only (half-close); an error ends both.
    let to_b = one_way(a_read, b_write, &forward, &last, start);
    let to_a = one_way(b_read, a_write, &backward, &last, start);
    tokio::pin!(to_b, to_a);
    let (mut to_b_done, mut to_a_done) = (false, false);
    let mark_progress = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    loop {
        let half = to_b_done || to_a_done;
        let limit = if half { idle.min(half_closed) } else { idle };
        let quiet_for = start
            .elapsed()
            .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
        if quiet_for >= limit {
            return if half {
                CopyEnd::HalfClosedStalled(totals())
            } else {
                CopyEnd::Idle(totals())
            };
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
            _ = tokio::time::sleep(limit - quiet_for) => {}
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
    async fn a_half_closed_pair_whose_other_side_stalls_is_closed() {
        // The client sends and closes; the app never answers nor closes.
        let (client, proxy_a) = tokio::io::duplex(64);
        let (proxy_b, _server) = tokio::io::duplex(64);
        let (_, mut client_write) = tokio::io::split(client);
        client_write.write_all(b"hi").await.unwrap();
        client_write.shutdown().await.unwrap();
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
