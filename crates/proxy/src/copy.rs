//! Copies bytes both ways between two connections until both directions finish, passing each
//! half-close on (EOF on one side shuts down writing on the other). An error in either direction
//! (a reset) ends both; so do an idle period with no bytes either way, a half-closed pair whose
//! remaining direction cannot deliver (its destination stopped reading), and the proxy stopping.
//! Copy buffers come from a small shared `BufferPool` (owned by the data path) only while bytes
//! are moving: an idle connection holds none.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Buffer for small messages (requests, answers, interactive traffic).
const SMALL_BUFFER: usize = 4 * 1024;
/// Buffer during bulk transfer: large reads and TLS writes, fewer system calls.
const LARGE_BUFFER: usize = 64 * 1024;
/// Free buffers a pool keeps of each size; more are freed. Buffers in use are not counted: a
/// pool only keeps what bursts of activity handed back (at most 256 KiB + 512 KiB).
const POOLED_SMALL: usize = 64;
const POOLED_LARGE: usize = 8;

/// Copy buffers shared by every connection of a data path. A direction takes one when its
/// source is read and gives it back as soon as a read would wait, so a buffer stays with a
/// connection only while its bytes keep coming (bulk copying keeps its buffer) or while a write
/// of them waits on the destination.
#[derive(Debug, Default)]
pub struct BufferPool {
    small: Mutex<Vec<Vec<u8>>>,
    large: Mutex<Vec<Vec<u8>>>,
    /// Buffers held by connections now.
    lent: AtomicUsize,
}

impl BufferPool {
    fn shelf(&self, size: usize) -> (&Mutex<Vec<Vec<u8>>>, usize) {
        if size == LARGE_BUFFER {
            (&self.large, POOLED_LARGE)
        } else {
            (&self.small, POOLED_SMALL)
        }
    }

    /// A buffer of `size` bytes (`SMALL_BUFFER` or `LARGE_BUFFER`).
    fn take(&self, size: usize) -> Vec<u8> {
        let (shelf, _) = self.shelf(size);
        self.lent.fetch_add(1, Ordering::Relaxed);
        let reused = shelf.lock().map(|mut free| free.pop()).unwrap_or_default();
        reused.unwrap_or_else(|| vec![0u8; size])
    }

    /// Gives `buf` back; freed when the pool already keeps enough of its size.
    fn give(&self, buf: Vec<u8>) {
        let (shelf, keep) = self.shelf(buf.len());
        self.lent.fetch_sub(1, Ordering::Relaxed);
        if let Ok(mut free) = shelf.lock()
            && free.len() < keep
        {
            free.push(buf);
        }
    }

    /// Buffers held by connections now: those whose bytes are being moved.
    pub fn lent(&self) -> usize {
        self.lent.load(Ordering::Relaxed)
    }

    /// Free buffers kept, small and large.
    pub fn pooled(&self) -> (usize, usize) {
        let count = |shelf: &Mutex<Vec<Vec<u8>>>| shelf.lock().map_or(0, |free| free.len());
        (count(&self.small), count(&self.large))
    }
}

/// The buffer one direction holds, if any, and the size it wants next.
struct Held<'p> {
    pool: &'p BufferPool,
    buf: Option<Vec<u8>>,
    size: usize,
}

impl<'p> Held<'p> {
    fn new(pool: &'p BufferPool) -> Self {
        Self {
            pool,
            buf: None,
            size: SMALL_BUFFER,
        }
    }

    fn release(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give(buf);
        }
    }

    /// Reads from `from` into a buffer taken from the pool when the read is first tried; when
    /// the read has to wait, the buffer goes back to the pool until `from` wakes the task.
    /// AsyncRead's contract makes this safe: a read that returns Pending placed no bytes.
    async fn read<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> io::Result<usize> {
        poll_fn(|cx| {
            let size = self.size;
            let buf = match &mut self.buf {
                Some(buf) if buf.len() == size => buf,
                held => {
                    if let Some(other) = held.take() {
                        self.pool.give(other);
                    }
                    held.insert(self.pool.take(size))
                }
            };
            let mut read_buf = ReadBuf::new(buf);
            match Pin::new(&mut *from).poll_read(cx, &mut read_buf) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(read_buf.filled().len())),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => {
                    self.release();
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The bytes the last read placed.
    fn filled(&self, n: usize) -> &[u8] {
        self.buf.as_deref().map_or(&[], |buf| &buf[..n])
    }

    /// Large buffers while reads fill the buffer (bulk), small ones when traffic turns small
    /// again.
    fn adapt(&mut self, n: usize) {
        if n == self.size && self.size < LARGE_BUFFER {
            self.size = LARGE_BUFFER;
        } else if self.size > SMALL_BUFFER && n <= SMALL_BUFFER / 2 {
            self.size = SMALL_BUFFER;
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

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
    pool: &BufferPool,
    moved: &AtomicU64,
    last: &AtomicU64,
    writing: &Writing,
    start: Instant,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut held = Held::new(pool);
    loop {
        let n = held.read(&mut from).await?;
        if n == 0 {
            held.release();
            // Pass the half-close on; the other direction keeps going.
            return to.shutdown().await;
        }
        writing
            .since
            .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        let written = to.write_all(held.filled(n)).await;
        writing.since.store(NOT_WRITING, Ordering::Relaxed);
        written?;
        held.adapt(n);
        moved.fetch_add(n as u64, Ordering::Relaxed);
        last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Copies between `a` and `b`, with buffers from `pool`, until both directions have seen EOF,
/// `idle` passes without a byte, or `cancel` fires. Once one direction has ended with EOF, a write of the other that
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
    pool: &BufferPool,
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
    let to_b = one_way(a_read, b_write, pool, &forward, &last, &writing_b, start);
    let to_a = one_way(b_read, a_write, pool, &backward, &last, &writing_a, start);
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
    use tokio::io::AsyncReadExt;

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
                &BufferPool::default(),
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
            &BufferPool::default(),
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
            &BufferPool::default(),
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
            &BufferPool::default(),
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
                &BufferPool::default(),
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
                &BufferPool::default(),
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

    /// Waits (up to 5 s) until no buffer is lent.
    async fn all_returned(pool: &BufferPool) -> bool {
        for _ in 0..500 {
            if pool.lent() == 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_copy_buffer() {
        let pool = std::sync::Arc::new(BufferPool::default());
        let (mut client, proxy_a) = tokio::io::duplex(256 * 1024);
        let (proxy_b, mut server) = tokio::io::duplex(256 * 1024);
        let copier = tokio::spawn({
            let pool = pool.clone();
            async move {
                bidirectional(
                    proxy_a,
                    proxy_b,
                    Duration::from_secs(3600),
                    Duration::from_secs(5),
                    &CancellationToken::new(),
                    &pool,
                )
                .await
            }
        });
        // A request and its answer, then silence: both directions wait to read.
        client.write_all(b"request").await.unwrap();
        let mut got = [0u8; 7];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"answer").await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert!(all_returned(&pool).await, "{} buffers held", pool.lent());
        assert_eq!(pool.pooled().1, 0, "small messages, small buffers");

        // Bulk: reads that fill the buffer move to a large one, returned once it is quiet.
        let bulk = vec![7u8; 1024 * 1024];
        let (mut server_read, server_write) = tokio::io::split(server);
        let sender = tokio::spawn(async move {
            client.write_all(&bulk).await.unwrap();
            client
        });
        let mut received = vec![0u8; 1024 * 1024];
        server_read.read_exact(&mut received).await.unwrap();
        assert!(received.iter().all(|b| *b == 7));
        let client = sender.await.unwrap();
        assert!(all_returned(&pool).await, "{} buffers held", pool.lent());
        assert_eq!(pool.pooled().1, 1, "the bulk direction used a large buffer");
        drop((client, server_read, server_write));
        let end = copier.await.unwrap();
        assert!(
            matches!(end, CopyEnd::Failed(..) | CopyEnd::Done(_)),
            "{end:?}"
        );
        assert_eq!(pool.lent(), 0);
    }

    #[tokio::test]
    async fn a_write_that_waits_keeps_its_bytes() {
        // The server does not read: the proxy's write waits with the client's bytes, which
        // must stay in the buffer (lent) and all arrive once the server reads.
        let pool = std::sync::Arc::new(BufferPool::default());
        let (mut client, proxy_a) = tokio::io::duplex(64 * 1024);
        let (proxy_b, mut server) = tokio::io::duplex(1024);
        let copier = tokio::spawn({
            let pool = pool.clone();
            async move {
                bidirectional(
                    proxy_a,
                    proxy_b,
                    Duration::from_secs(3600),
                    Duration::from_secs(5),
                    &CancellationToken::new(),
                    &pool,
                )
                .await
            }
        });
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        client.write_all(&sent).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(pool.lent() >= 1, "the waiting write holds its buffer");
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        drop(server);
        drop(client);
        let _ = copier.await.unwrap();
        assert_eq!(pool.lent(), 0);
    }
}
