//! The one serve loop every Latch listener runs through (proxy data path and admin, control-plane
//! gRPC, admin and webhook, the proxy's Workload API socket), and the SIGINT/SIGTERM handling
//! both binaries share. `serve` owns the connection cap and what happens at it, the handshake
//! deadline, accept-error backoff, drain and the accept metrics; each listener states its
//! `ListenerPolicy` next to its own code and brings a `Handshake` and a connection handler.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::HttpResponse;

/// A listener that could not be bound: the address, the flag that chose it, and why. The OS
/// error is said once, in the message, and not again as a source.
#[derive(Debug)]
pub struct BindError {
    pub addr: std::net::SocketAddr,
    pub flag: &'static str,
    pub error: io::Error,
}

impl fmt::Display for BindError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot listen on {} ({}): {} (is another process using it? pick another address with {})",
            self.addr, self.flag, self.error, self.flag
        )
    }
}

impl std::error::Error for BindError {}

/// Binds `addr` for the listener chosen by `flag`; returns the listener and the address it got
/// (port 0 picks one). `[::]` listens on both families (IPV6_V6ONLY off, whatever the host's
/// `net.ipv6.bindv6only` says), so IPv4 peers arrive as IPv4-mapped addresses, which `serve`
/// hands to handlers in their plain IPv4 form. On a kernel without IPv6 `[::]` falls back to
/// `0.0.0.0`, said in the log.
pub async fn bind(
    addr: std::net::SocketAddr,
    flag: &'static str,
) -> Result<(TcpListener, std::net::SocketAddr), BindError> {
    let bind_err = |error| BindError { addr, flag, error };
    let listener = match listen_socket(addr) {
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && no_ipv6(&e) => {
            let v4 = std::net::SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port());
            tracing::warn!(
                "{flag} {addr}: this kernel has no IPv6 ({e}); listening on {v4}, IPv4 only"
            );
            listen_socket(v4)
        }
        other => other,
    }
    .map_err(bind_err)?;
    let local = listener.local_addr().map_err(bind_err)?;
    Ok((listener, local))
}

/// A listening TCP socket on `addr` with SO_REUSEADDR (as tokio's `TcpListener::bind`), and
/// both families on an IPv6 wildcard.
fn listen_socket(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// True when `error` says the kernel has no IPv6 at all (or it is disabled on every interface).
fn no_ipv6(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Pause after a failed accept: the failed connection stays in the listen queue, and without a
/// pause the loop would retry at full speed until a descriptor frees up.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What happens to a connection that arrives while its listener is at the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtCap {
    /// Stop accepting until a slot frees: new connections wait in the kernel's listen queue.
    Wait,
    /// Accept it and close it at once (the client sees EOF, not a hang), count it as
    /// `ServeMetrics::refused(listener, "connection_limit")` and log at most once a second.
    Refuse,
}

/// A connection cap: `max` slots, possibly shared by several listeners (the proxy's data
/// path caps all its listeners together). A connection holds its `Slot` until it ends.
#[derive(Debug, Clone)]
pub struct Cap {
    slots: Arc<Semaphore>,
    max: usize,
}

impl Cap {
    pub fn new(max: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots in use now.
    pub fn in_use(&self) -> usize {
        self.max - self.slots.available_permits()
    }
}

/// A connection's place under its listener's cap, and under its source address's cap when the
/// policy has one; dropping it frees both. A handler that hands the connection on (to tonic,
/// say) hands this on with it.
#[derive(Debug)]
pub struct Slot {
    _cap: OwnedSemaphorePermit,
    _source: Option<SourceSlot>,
}

/// How one listener serves: stated once, next to the listener's code.
#[derive(Debug, Clone)]
pub struct ListenerPolicy {
    /// Names the listener in logs and in the label of its accept metrics.
    pub name: &'static str,
    pub cap: Cap,
    pub at_cap: AtCap,
    /// At most this many connections from one source address (IPv4-mapped IPv6 counted as
    /// IPv4) at a time; more are accepted and closed at once, counted as
    /// `source_connection_limit`. Keeps one client from taking the whole cap. Only for
    /// listeners whose `Listen::source` knows addresses (TCP).
    pub per_source: Option<usize>,
    /// The flag that sets the cap, named in log lines telling the operator what to change.
    pub cap_flag: Option<&'static str>,
    /// Deadline for the handshake step (TLS); the connection and its slot go when it passes.
    pub handshake_timeout: Option<Duration>,
    /// HTTP/1 listeners: deadline for receiving each request's head, the first included.
    pub request_header_timeout: Option<Duration>,
    /// TCP keepalive on accepted sockets (probes every quarter of it after that long idle).
    pub keepalive: Option<Duration>,
}

impl ListenerPolicy {
    /// A policy with `max_connections` of its own and no deadlines.
    pub fn new(name: &'static str, max_connections: usize, at_cap: AtCap) -> Self {
        Self {
            name,
            cap: Cap::new(max_connections),
            at_cap,
            per_source: None,
            cap_flag: None,
            handshake_timeout: None,
            request_header_timeout: None,
            keepalive: None,
        }
    }
}

/// Where serving runs and how it stops. Accept loops run on `tracker` and end when
/// `stop_accepting` fires; connections run on `connections` and are told to end by `close`.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    pub tracker: TaskTracker,
    pub connections: TaskTracker,
    pub stop_accepting: CancellationToken,
    pub close: CancellationToken,
}

impl Drain {
    /// No drain: `cancel` stops accepting and closes connections at once, and both loops and
    /// connections run on `tracker`.
    pub fn immediate(tracker: &TaskTracker, cancel: &CancellationToken) -> Self {
        Self {
            tracker: tracker.clone(),
            connections: tracker.clone(),
            stop_accepting: cancel.clone(),
            close: cancel.clone(),
        }
    }

    /// Stops accepting, lets open connections finish for up to `timeout`, then closes what is
    /// left and waits for it. Returns whether everything finished within the timeout.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.stop_accepting.cancel();
        self.connections.close();
        if tokio::time::timeout(timeout, self.connections.wait())
            .await
            .is_ok()
        {
            return true;
        }
        tracing::info!(
            open = self.connections.len(),
            "drain timeout reached; closing the remaining connections"
        );
        self.close.cancel();
        self.connections.wait().await;
        false
    }
}

/// Counters the loop reports to; each binary maps them onto its own metric names.
pub trait ServeMetrics: Send + Sync + 'static {
    /// A connection closed before its handler ran, e.g. `"connection_limit"`.
    fn refused(&self, listener: &'static str, reason: &'static str) {
        let _ = (listener, reason);
    }
    /// A failed accept, by `io_failure_reason`.
    fn accept_failed(&self, listener: &'static str, reason: &'static str) {
        let _ = (listener, reason);
    }
}

/// Counts nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoMetrics;

impl ServeMetrics for NoMetrics {}

/// A listening socket the loop can accept on.
pub trait Listen: Send + 'static {
    type Conn: Send + 'static;
    type Addr: fmt::Debug + Clone + Send + Sync + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Conn, Self::Addr)>> + Send;
    /// Socket options on the listening socket, set once before the first accept.
    fn prepare(&self, _policy: &ListenerPolicy) {}
    /// Socket options for an accepted connection.
    fn tune(&self, _conn: &Self::Conn, _policy: &ListenerPolicy) {}
    /// The address a per-source cap counts a connection under, when there is one.
    fn source(_remote: &Self::Addr) -> Option<IpAddr> {
        None
    }
}

impl Listen for TcpListener {
    type Conn = TcpStream;
    type Addr = std::net::SocketAddr;
    /// The peer's address in its plain form: an IPv4 peer of a dual-stack listener is
    /// `10.0.0.2`, not `::ffff:10.0.0.2`, for every handler, log line and per-source count.
    async fn accept(&self) -> io::Result<(TcpStream, std::net::SocketAddr)> {
        let (conn, remote) = TcpListener::accept(self).await?;
        Ok((conn, canonical(remote)))
    }
    /// On Linux, accepted connections inherit TCP_NODELAY and the keepalive settings from the
    /// listening socket: set once here, they cost no system call per connection.
    fn prepare(&self, policy: &ListenerPolicy) {
        if INHERITED_OPTIONS {
            tcp_options(socket2::SockRef::from(self), policy);
        }
    }
    fn tune(&self, conn: &TcpStream, policy: &ListenerPolicy) {
        if !INHERITED_OPTIONS {
            tcp_options(socket2::SockRef::from(conn), policy);
        }
    }
    fn source(remote: &std::net::SocketAddr) -> Option<IpAddr> {
        Some(remote.ip())
    }
}

/// Whether accepted TCP connections inherit the listening socket's options (Linux does).
const INHERITED_OPTIONS: bool = cfg!(target_os = "linux");

/// TCP_NODELAY always, keepalive when the policy asks for it.
fn tcp_options(socket: socket2::SockRef<'_>, policy: &ListenerPolicy) {
    let _ = socket.set_tcp_nodelay(true);
    if let Some(keepalive) = policy.keepalive {
        let probes = socket2::TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(keepalive / 4);
        let _ = socket.set_tcp_keepalive(&probes);
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`[::ffff:10.0.0.2]:80`) in its IPv4 form.
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Open connections per source address, for `ListenerPolicy::per_source`.
#[derive(Debug, Default, Clone)]
struct SourceCounts(Arc<Mutex<HashMap<IpAddr, usize>>>);

/// A connection's place under its source's cap; dropping it frees the place.
#[derive(Debug)]
struct SourceSlot {
    counts: SourceCounts,
    source: IpAddr,
}

impl SourceCounts {
    /// A place for one more connection from `source`, unless it already has `max`.
    fn try_take(&self, source: IpAddr, max: usize) -> Option<SourceSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let open = counts.entry(source).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(SourceSlot {
            counts: self.clone(),
            source,
        })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = counts.get_mut(&self.source) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

impl Listen for UnixListener {
    type Conn = UnixStream;
    type Addr = Arc<tokio::net::unix::SocketAddr>;
    async fn accept(&self) -> io::Result<(UnixStream, Self::Addr)> {
        let (conn, addr) = UnixListener::accept(self).await?;
        Ok((conn, Arc::new(addr)))
    }
}

/// Why a handshake did not finish.
#[derive(Debug)]
pub enum HandshakeFailure {
    TimedOut,
    Failed(io::Error),
}

/// The step between accept and handler (a TLS handshake, or nothing), run off the accept loop
/// under the policy's `handshake_timeout`.
pub trait Handshake<I>: Send + Sync + 'static {
    type Stream: Send + 'static;
    fn handshake(&self, io: I) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// Reports a failed handshake; by default a debug log line.
    fn failed(&self, listener: &'static str, remote: &dyn fmt::Debug, failure: HandshakeFailure) {
        match failure {
            HandshakeFailure::TimedOut => {
                tracing::debug!(listener, ?remote, "TLS handshake timed out")
            }
            HandshakeFailure::Failed(e) => {
                tracing::debug!(listener, ?remote, "TLS handshake failed: {e}")
            }
        }
    }
}

/// No handshake: the handler gets the accepted socket.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl<I: Send + 'static> Handshake<I> for Plain {
    type Stream = I;
    async fn handshake(&self, io: I) -> io::Result<I> {
        Ok(io)
    }
}

/// A server-side TLS handshake.
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl<I> Handshake<I> for Tls
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = tokio_rustls::server::TlsStream<I>;
    fn handshake(&self, io: I) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        self.0.accept(io)
    }
}

/// A connection handed to a listener's handler.
pub struct Accepted<S, A> {
    pub stream: S,
    pub remote: A,
    /// Keep it for as long as the connection is open: it is the connection's place under the cap.
    /// Bind it by name: an `async move` block that uses only other fields does not capture it.
    pub slot: Slot,
    /// Fires when the connection must end (shutdown, or the end of a drain).
    pub close: CancellationToken,
    pub policy: Arc<ListenerPolicy>,
    /// Where the listener counts what it refuses (`serve_http1`: `request_header_timeout`).
    pub metrics: Arc<dyn ServeMetrics>,
}

/// Accepts on `listener` until `drain.stop_accepting` fires, under `policy`: takes a slot of the
/// cap (or waits for one, or refuses), sets socket options, runs `handshake` within the
/// handshake deadline and then `handle`, each connection as its own task on
/// `drain.connections`. A failed accept (e.g. out of file descriptors) is counted, logged at
/// most once a second and retried after `ACCEPT_BACKOFF`.
pub fn serve<L, H, F, Fut>(
    listener: L,
    policy: ListenerPolicy,
    drain: &Drain,
    metrics: Arc<dyn ServeMetrics>,
    handshake: H,
    handle: F,
) where
    L: Listen,
    H: Handshake<L::Conn>,
    F: Fn(Accepted<H::Stream, L::Addr>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let policy = Arc::new(policy);
    let handshake = Arc::new(handshake);
    let handle = Arc::new(handle);
    let drain = drain.clone();
    let tracker = drain.tracker.clone();
    listener.prepare(&policy);
    tracker.spawn(async move {
        let open_files = open_files_limit();
        let mut accept_failures = Throttled::default();
        let mut refusals = Throttled::default();
        let mut source_refusals = Throttled::default();
        let sources = SourceCounts::default();
        let name = policy.name;
        loop {
            let waited = match policy.at_cap {
                AtCap::Wait => tokio::select! {
                    _ = drain.stop_accepting.cancelled() => return,
                    slot = policy.cap.slots.clone().acquire_owned() => match slot {
                        Ok(slot) => Some(slot),
                        Err(_) => return,
                    },
                },
                AtCap::Refuse => None,
            };
            let (conn, remote) = tokio::select! {
                _ = drain.stop_accepting.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        accept_failed(&policy, &*metrics, &e, open_files, &mut accept_failures);
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            if let Some(failed) = accept_failures.reset() {
                tracing::info!(
                    listener = name,
                    "accepting again after {failed} failed accepts"
                );
            }
            let slot = match waited {
                Some(slot) => slot,
                None => match policy.cap.slots.clone().try_acquire_owned() {
                    Ok(slot) => slot,
                    Err(_) => {
                        // Dropping the connection closes it at once.
                        drop(conn);
                        metrics.refused(name, "connection_limit");
                        if let Some(count) = refusals.note() {
                            let limit = policy.cap.max;
                            let what = match policy.cap_flag {
                                Some(flag) => format!("{flag} {limit}"),
                                None => format!("{limit} connections"),
                            };
                            tracing::warn!(
                                listener = name,
                                ?remote,
                                limit,
                                "connection limit reached ({what}): refused {count} \
                                 connection(s) since the last report"
                            );
                        }
                        continue;
                    }
                },
            };
            let source_slot = match (policy.per_source, L::source(&remote)) {
                (Some(max), Some(source)) => match sources.try_take(source, max) {
                    Some(place) => Some(place),
                    None => {
                        // Closes it at once and frees its place under the listener's cap.
                        drop((conn, slot));
                        metrics.refused(name, "source_connection_limit");
                        if let Some(count) = source_refusals.note() {
                            tracing::warn!(
                                listener = name,
                                %source,
                                limit = max,
                                "connection limit per source address reached ({max}): refused \
                                 {count} connection(s) since the last report"
                            );
                        }
                        continue;
                    }
                },
                _ => None,
            };
            listener.tune(&conn, &policy);
            let (policy, handshake, handle) = (policy.clone(), handshake.clone(), handle.clone());
            let (close, metrics) = (drain.close.clone(), metrics.clone());
            let slot = Slot {
                _cap: slot,
                _source: source_slot,
            };
            drain.connections.spawn(async move {
                let step = handshake.handshake(conn);
                let finished = tokio::select! {
                    _ = close.cancelled() => return,
                    finished = async {
                        match policy.handshake_timeout {
                            Some(deadline) => tokio::time::timeout(deadline, step).await,
                            None => Ok(step.await),
                        }
                    } => finished,
                };
                let stream = match finished {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        handshake.failed(policy.name, &remote, HandshakeFailure::Failed(e));
                        return;
                    }
                    Err(_) => {
                        handshake.failed(policy.name, &remote, HandshakeFailure::TimedOut);
                        return;
                    }
                };
                handle(Accepted {
                    stream,
                    remote,
                    slot,
                    close,
                    policy,
                    metrics,
                })
                .await;
            });
        }
    });
}

/// Counts and logs (throttled) a failed accept. Running out of file descriptors is named with
/// the limit, since that is what an operator has to change.
fn accept_failed(
    policy: &ListenerPolicy,
    metrics: &dyn ServeMetrics,
    e: &io::Error,
    open_files: Option<u64>,
    log: &mut Throttled,
) {
    let listener = policy.name;
    let reason = io_failure_reason(e);
    metrics.accept_failed(listener, reason);
    let Some(count) = log.note() else { return };
    if reason == "fd_limit" {
        let limit = open_files.map_or_else(|| "unknown".to_string(), |l| l.to_string());
        let or_lower = policy
            .cap_flag
            .map(|flag| format!(" or lower {flag} ({})", policy.cap.max))
            .unwrap_or_default();
        tracing::warn!(
            listener,
            failures = count,
            "accept failed: {e}: the process is at its open-file limit (RLIMIT_NOFILE {limit}; \
             every connection holds a descriptor, a proxied one two); new connections wait in \
             the listen queue, retried every {ACCEPT_BACKOFF:?}. Raise the limit (ulimit -n, \
             LimitNOFILE){or_lower}"
        );
    } else {
        tracing::warn!(
            listener,
            failures = count,
            "accept failed: {e}; retrying every {ACCEPT_BACKOFF:?}"
        );
    }
}

/// A short, stable reason for a failed accept or connect, for metrics.
pub fn io_failure_reason(e: &io::Error) -> &'static str {
    // EMFILE (per process) and ENFILE (system-wide), ENOBUFS and ENOMEM on Linux.
    match e.raw_os_error() {
        Some(24) | Some(23) => "fd_limit",
        Some(105) | Some(12) => "out_of_memory",
        _ => "other",
    }
}

/// The soft open-file limit of this process (Linux: /proc/self/limits); `None` when unknown
/// or unlimited.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Serves HTTP/1 on an accepted connection with `handler`, under the policy's request-head
/// deadline (a connection closed by it is counted as `request_header_timeout`), until the
/// client goes or `close` fires.
pub async fn serve_http1<S, A, H, F>(conn: Accepted<S, A>, handler: H)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: fmt::Debug,
    H: Fn(Request<Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = HttpResponse> + Send + 'static,
{
    let Accepted {
        stream,
        remote,
        slot: _slot,
        close,
        policy,
        metrics,
    } = conn;
    let service = service_fn(move |request| {
        let response = handler(request);
        async move { Ok::<_, Infallible>(response.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(policy.request_header_timeout);
    let served = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = close.cancelled() => {}
        result = served => if let Err(e) = result {
            if e.is_timeout() {
                metrics.refused(policy.name, "request_header_timeout");
            }
            tracing::debug!(listener = policy.name, ?remote, "connection: {e}");
        },
    }
}

/// Installs the SIGINT and SIGTERM handlers and returns a token that fires on the first of
/// them (logged by name). Both binaries shut down when it fires.
pub fn shutdown_on_signal() -> io::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::info!(signal = name, "shutdown requested");
        fire.cancel();
    });
    Ok(token)
}

/// Throttles a repeated log line: the first occurrence is logged, then at most one a second,
/// each carrying how many happened since the last one logged. Also used by the proxy's
/// refusal logs.
#[derive(Debug, Default)]
pub struct Throttled {
    since_log: u64,
    total: u64,
    last_log: Option<Instant>,
}

impl Throttled {
    /// Notes one occurrence; returns the count to report when it is time to log.
    pub fn note(&mut self) -> Option<u64> {
        self.since_log += 1;
        self.total += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.since_log))
    }

    /// Ends a streak; returns its length if there was one.
    fn reset(&mut self) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let total = self.total;
        *self = Self::default();
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn throttled_logs_the_first_then_at_most_once_a_second_with_the_count() {
        let mut t = Throttled::default();
        assert_eq!(t.note(), Some(1), "the first is logged");
        assert_eq!(t.note(), None);
        assert_eq!(t.note(), None);
        t.last_log = Some(Instant::now() - Duration::from_secs(2));
        assert_eq!(t.note(), Some(3), "carries what was not logged");
        assert_eq!(t.reset(), Some(4), "the whole streak");
        assert_eq!(t.reset(), None);
        assert_eq!(t.note(), Some(1), "a new streak logs at once");
    }

    #[test]
    fn io_failures_name_the_fd_limit() {
        let reason = |n| io_failure_reason(&io::Error::from_raw_os_error(n));
        assert_eq!(reason(24), "fd_limit");
        assert_eq!(reason(23), "fd_limit");
        assert_eq!(reason(105), "out_of_memory");
        assert_eq!(io_failure_reason(&io::Error::other("x")), "other");
        // This process has a finite limit in any test environment.
        assert!(open_files_limit().is_some_and(|l| l > 0));
    }

    #[derive(Default)]
    struct Counted(std::sync::Mutex<Vec<(&'static str, &'static str)>>);

    impl ServeMetrics for Counted {
        fn refused(&self, listener: &'static str, reason: &'static str) {
            self.0.lock().unwrap().push((listener, reason));
        }
    }

    /// An echo listener under `policy`; returns its address.
    async fn echo(
        policy: ListenerPolicy,
        drain: &Drain,
        metrics: Arc<Counted>,
    ) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(
            listener,
            policy,
            drain,
            metrics,
            Plain,
            |conn: Accepted<TcpStream, _>| async move {
                // Hold the slot: a closure capturing only `stream` and `close` would drop it.
                let (mut stream, _slot) = (conn.stream, conn.slot);
                let (mut r, mut w) = stream.split();
                tokio::select! {
                    _ = conn.close.cancelled() => {}
                    _ = tokio::io::copy(&mut r, &mut w) => {}
                }
            },
        );
        addr
    }

    async fn echoed(addr: std::net::SocketAddr) -> io::Result<TcpStream> {
        let mut tcp = TcpStream::connect(addr).await?;
        tcp.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut buf))
            .await
            .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
        Ok(tcp)
    }

    #[tokio::test]
    async fn accepted_connections_have_nodelay_and_the_policys_keepalive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut policy = ListenerPolicy::new("test", 4, AtCap::Refuse);
        policy.keepalive = Some(Duration::from_secs(40));
        let (seen, mut options) = tokio::sync::mpsc::unbounded_channel();
        serve(
            listener,
            policy,
            &Drain::default(),
            Arc::new(NoMetrics),
            Plain,
            move |conn: Accepted<TcpStream, _>| {
                let socket = socket2::SockRef::from(&conn.stream);
                let _ = seen.send((
                    socket.tcp_nodelay().unwrap(),
                    socket.keepalive().unwrap(),
                    socket.tcp_keepalive_time().unwrap(),
                    socket.tcp_keepalive_interval().unwrap(),
                ));
                async {}
            },
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(2), options.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            got,
            (true, true, Duration::from_secs(40), Duration::from_secs(10))
        );
    }

    #[tokio::test]
    async fn refuse_at_cap_closes_at_once_and_counts() {
        let drain = Drain::default();
        let metrics = Arc::new(Counted::default());
        let addr = echo(
            ListenerPolicy::new("test", 1, AtCap::Refuse),
            &drain,
            metrics.clone(),
        )
        .await;
        let held = echoed(addr).await.unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );
        assert_eq!(*metrics.0.lock().unwrap(), [("test", "connection_limit")]);
        drop(held);
        tokio::time::timeout(Duration::from_secs(2), async {
            while echoed(addr).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("served again once the slot is free");
    }

    #[tokio::test]
    async fn wait_at_cap_queues_and_serves_when_a_slot_frees() {
        let drain = Drain::default();
        let metrics = Arc::new(Counted::default());
        let addr = echo(
            ListenerPolicy::new("test", 1, AtCap::Wait),
            &drain,
            metrics.clone(),
        )
        .await;
        let held = echoed(addr).await.unwrap();
        let waiting = tokio::spawn(echoed(addr));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "the second connection waits");
        drop(held);
        let served = tokio::time::timeout(Duration::from_secs(2), waiting).await;
        assert!(
            matches!(served, Ok(Ok(Ok(_)))),
            "served once the slot frees"
        );
        assert!(metrics.0.lock().unwrap().is_empty(), "nothing refused");
    }

    #[tokio::test]
    async fn the_handshake_deadline_frees_the_slot() {
        struct Never;
        impl Handshake<TcpStream> for Never {
            type Stream = TcpStream;
            async fn handshake(&self, io: TcpStream) -> io::Result<TcpStream> {
                std::future::pending::<()>().await;
                Ok(io)
            }
        }
        let drain = Drain::default();
        let policy = ListenerPolicy {
            handshake_timeout: Some(Duration::from_millis(100)),
            ..ListenerPolicy::new("test", 1, AtCap::Refuse)
        };
        let cap = policy.cap.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(
            listener,
            policy,
            &drain,
            Arc::new(NoMetrics),
            Never,
            |_: Accepted<_, _>| async {},
        );
        let mut slow = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), slow.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at the deadline"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cap.in_use(), 0, "its slot is free");
    }

    /// A connection from `source` (a loopback address) to `addr`.
    async fn connect_from(source: [u8; 4], addr: std::net::SocketAddr) -> io::Result<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((source, 0).into())?;
        socket.connect(addr).await
    }

    #[tokio::test]
    async fn a_source_over_its_cap_is_closed_at_once_while_others_are_served() {
        let drain = Drain::default();
        let metrics = Arc::new(Counted::default());
        let policy = ListenerPolicy {
            per_source: Some(2),
            ..ListenerPolicy::new("test", 8, AtCap::Wait)
        };
        let addr = echo(policy, &drain, metrics.clone()).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut tcp = connect_from([127, 0, 0, 2], addr).await.unwrap();
            tcp.write_all(b"ping").await.unwrap();
            let mut buf = [0u8; 4];
            tcp.read_exact(&mut buf).await.unwrap();
            held.push(tcp);
        }
        let mut over = connect_from([127, 0, 0, 2], addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );
        assert_eq!(
            *metrics.0.lock().unwrap(),
            [("test", "source_connection_limit")]
        );
        assert!(echoed(addr).await.is_ok(), "another source is served");
        held.pop();
        tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                let mut tcp = connect_from([127, 0, 0, 2], addr).await.unwrap();
                tcp.write_all(b"ping").await.unwrap();
                let mut buf = [0u8; 4];
                if tcp.read_exact(&mut buf).await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the source is served again once one of its connections ends");
    }

    #[tokio::test]
    async fn a_connection_handed_on_keeps_its_place_under_the_source_cap() {
        let drain = Drain::default();
        let metrics = Arc::new(Counted::default());
        let policy = ListenerPolicy {
            per_source: Some(1),
            ..ListenerPolicy::new("test", 8, AtCap::Wait)
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (handed_on, mut handed) = tokio::sync::mpsc::unbounded_channel();
        serve(
            listener,
            policy,
            &drain,
            metrics.clone(),
            Plain,
            move |conn: Accepted<TcpStream, _>| {
                // As the control plane's gRPC front door does: another task serves it.
                let _ = handed_on.send((conn.stream, conn.slot));
                async {}
            },
        );
        let _client = TcpStream::connect(addr).await.unwrap();
        let first = handed.recv().await.unwrap();
        let mut over = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );
        assert_eq!(
            *metrics.0.lock().unwrap(),
            [("test", "source_connection_limit")]
        );
        drop(first);
        let _again = TcpStream::connect(addr).await.unwrap();
        let served = tokio::time::timeout(Duration::from_secs(2), handed.recv()).await;
        assert!(
            matches!(served, Ok(Some(_))),
            "served once the first is gone"
        );
    }

    #[tokio::test]
    async fn an_idle_http1_connection_is_closed_at_the_request_head_deadline() {
        let drain = Drain::default();
        let metrics = Arc::new(Counted::default());
        let policy = ListenerPolicy {
            request_header_timeout: Some(Duration::from_millis(300)),
            // Refuse, not Wait: a waiting loop holds the next slot while it accepts.
            ..ListenerPolicy::new("test", 1, AtCap::Refuse)
        };
        let cap = policy.cap.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        serve(
            listener,
            policy,
            &drain,
            metrics.clone(),
            Plain,
            |conn: Accepted<TcpStream, _>| {
                serve_http1(conn, |_| async { crate::text(hyper::StatusCode::OK, "ok") })
            },
        );
        let started = Instant::now();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed without a request: {read:?}"
        );
        assert!(started.elapsed() >= Duration::from_millis(250));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(cap.in_use(), 0, "its slot is free");
        assert_eq!(
            *metrics.0.lock().unwrap(),
            [("test", "request_header_timeout")],
            "counted"
        );
    }

    #[tokio::test]
    async fn drain_stops_accepting_waits_then_closes() {
        let drain = Drain::default();
        let addr = echo(
            ListenerPolicy::new("test", 8, AtCap::Refuse),
            &drain,
            Arc::new(Counted::default()),
        )
        .await;
        let mut open = echoed(addr).await.unwrap();
        let started = Instant::now();
        assert!(
            !drain.shutdown(Duration::from_millis(200)).await,
            "one was still open"
        );
        assert!(started.elapsed() >= Duration::from_millis(200));
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), open.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed after the drain"
        );
        assert!(echoed(addr).await.is_err(), "no longer accepting");
    }
}
