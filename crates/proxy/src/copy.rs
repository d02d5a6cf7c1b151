//! Copies bytes both ways between two connections until both directions finish, passing each
//! half-close on (EOF on one side shuts down writing on the other). An error in either direction
//! (a reset) ends both; so do an idle period with no bytes either way and the proxy stopping.

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
/// byte, or `cancel` fires.
pub async fn bidirectional<A, B>(a: A, b: B, idle: Duration, cancel: &CancellationToken) -> CopyEnd
where
    A: AsyncRead + AsyncWrite + Send,
    B: AsyncRead + AsyncWrite + Send,
{
    let (a_read, a_write) = tokio::io::split(a);
    let (b_read, b_write) = tokio::io::split(b);
    let (forward, backward, last) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    // An EOF ends one direction only (half-close); an error ends both.
    let copy = async {
        tokio::try_join!(
            one_way(a_read, b_write, &forward, &last, start),
            one_way(b_read, a_write, &backward, &last, start)
        )
        .map(|_| ())
    };
    let idle_watch = async {
        loop {
            let quiet_for = start
                .elapsed()
                .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
            if quiet_for >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet_for).await;
        }
    };
    let totals = || Transferred {
        forward: forward.load(Ordering::Relaxed),
        backward: backward.load(Ordering::Relaxed),
    };
    tokio::select! {
        result = copy => match result {
            Ok(()) => CopyEnd::Done(totals()),
            Err(e) => CopyEnd::Failed(e, totals()),
        },
        _ = idle_watch => CopyEnd::Idle(totals()),
        _ = cancel.cancelled() => CopyEnd::Cancelled(totals()),
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
            bidirectional(proxy_a, proxy_b, Duration::from_secs(5), &cancel).await
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
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(end, CopyEnd::Idle(_)), "{end:?}");
    }
}
