//! The gRPC listener's front door: states its policy (connection cap, per-source cap, handshake
//! deadline) for the shared serve loop (`latch_admin::serve`), sorts finished handshakes into
//! authenticated (a valid SVID of the trust domain) and unauthenticated (join-token and
//! service-account-token callers, with a budget of their own), enforces the deadline to the
//! first request and the unauthenticated lifetime, and hands connections to tonic. Handlers
//! read the peer's certificate chain from the request extensions as `PeerConn`.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use latch_admin::serve::{
    AtCap, Drain, Handshake, HandshakeFailure, ListenerPolicy, ServeMetrics, Slot, Throttled, Tls,
};
use latch_identity::{PeerRole, verify_svid};
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::ca::Ca;
use crate::metrics::Metrics;

/// The listener's name in logs and in `latch_control_connections_refused_total`.
const LISTENER: &str = "grpc";

/// Limits for the TLS front door.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    pub handshake_timeout: Duration,
    pub max_connections: usize,
    /// Most connections from one source address (`--max-connections-per-source`).
    pub max_per_source: usize,
    /// Most connections without a valid SVID at once (`--max-unauthenticated-connections`);
    /// `None` is a quarter of `max_connections`.
    pub max_unauthenticated: Option<usize>,
    /// Every connection is closed when it has sent no request this long after its handshake.
    pub first_request_timeout: Duration,
    /// A connection without a valid SVID is closed this long after its handshake (one
    /// CreateCertificate call fits many times over).
    pub unauthenticated_lifetime: Duration,
    /// A connection with a valid SVID is closed once it has started no request and held none
    /// open (a discovery stream counts while it lasts) for a whole window this long. Clients
    /// reconnect when they next need to.
    pub idle_timeout: Duration,
}

impl AcceptLimits {
    /// The gRPC listener's policy: `--max-connections` TLS connections (more wait in the
    /// kernel's listen queue), `--max-connections-per-source` from one address (more are
    /// closed at once), each handshake within `handshake_timeout`. Per-connection request
    /// limits and the request deadline are tonic's (`ControlPlane::start`).
    pub fn policy(&self) -> ListenerPolicy {
        ListenerPolicy {
            cap_flag: Some("--max-connections"),
            handshake_timeout: Some(self.handshake_timeout),
            per_source: Some(self.max_per_source),
            ..ListenerPolicy::new(LISTENER, self.max_connections, AtCap::Wait)
        }
    }

    /// The unauthenticated budget: as configured, or a quarter of the connection cap.
    pub fn unauthenticated(&self) -> usize {
        self.max_unauthenticated
            .unwrap_or(self.max_connections / 4)
            .max(1)
    }
}

impl Default for AcceptLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
            max_per_source: 64,
            max_unauthenticated: None,
            first_request_timeout: Duration::from_secs(10),
            unauthenticated_lifetime: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What a handler knows about the connection a request came in on.
#[derive(Debug, Clone)]
pub struct PeerConn {
    pub remote: SocketAddr,
    /// The client's certificate chain, leaf first, if it presented one. Only proof of key
    /// possession was checked at the handshake; handlers validate the chain themselves.
    pub certs: Option<Arc<[CertificateDer<'static>]>>,
    activity: Arc<Activity>,
}

/// The requests of one connection, counted by `SeeRequests`: whether one came at all (the
/// first-request deadline) and whether one is being handled now (an unauthenticated
/// connection that is idle can be closed to make room).
#[derive(Debug, Default)]
struct Activity {
    started: AtomicU64,
    in_flight: AtomicUsize,
}

/// A request being handled; dropping it ends it.
pub struct InFlight(Arc<Activity>);

impl Activity {
    fn start(self: &Arc<Self>) -> InFlight {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The tower layer that tells each connection about its requests (install it with
/// `Server::builder().layer`): without it every connection is closed at the first-request
/// deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct SeeRequestsLayer;

impl<S> tower::Layer<S> for SeeRequestsLayer {
    type Service = SeeRequests<S>;
    fn layer(&self, inner: S) -> SeeRequests<S> {
        SeeRequests { inner }
    }
}

/// See `SeeRequestsLayer`. A request counts as in flight until its response is over: a
/// discovery stream for as long as it stays open.
#[derive(Debug, Clone)]
pub struct SeeRequests<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for SeeRequests<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<InFlightBody<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let in_flight = request
            .extensions()
            .get::<PeerConn>()
            .map(|peer| peer.activity.start());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| InFlightBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is done (or dropped: the stream
/// was reset or the connection closed).
pub struct InFlightBody<B> {
    body: B,
    _in_flight: Option<InFlight>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The connections open now without a valid SVID, oldest first. When it is full, a newcomer
/// closes one with no request in flight (a silent connection holds nothing a caller needs):
/// the oldest of the source address holding the most places, so that a flood from fewer
/// addresses than places never closes another address's caller. When every one has a
/// request in flight, the newcomer is refused.
#[derive(Debug)]
struct Unauthenticated {
    max: usize,
    open: Mutex<BTreeMap<u64, Place>>,
    next: AtomicU64,
}

#[derive(Debug)]
struct Place {
    source: IpAddr,
    activity: Arc<Activity>,
    evict: CancellationToken,
}

/// A connection's place in the unauthenticated budget; dropping it frees the place.
struct UnauthenticatedPlace {
    budget: Arc<Unauthenticated>,
    id: u64,
    /// Fires when a newer connection took this place.
    evicted: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Unauthenticated {
    fn admit(
        self: &Arc<Self>,
        source: IpAddr,
        activity: &Arc<Activity>,
    ) -> Option<UnauthenticatedPlace> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.len() >= self.max {
            let mut held: HashMap<IpAddr, usize> = HashMap::new();
            for place in open.values() {
                *held.entry(place.source).or_default() += 1;
            }
            let victim = open
                .iter()
                .filter(|(_, place)| place.activity.idle())
                .max_by_key(|(id, place)| (held[&place.source], Reverse(**id)))
                .map(|(id, _)| *id)?;
            if let Some(place) = open.remove(&victim) {
                place.evict.cancel();
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        open.insert(
            id,
            Place {
                source,
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        Some(UnauthenticatedPlace {
            budget: self.clone(),
            id,
            evicted: Box::pin(evict.cancelled_owned()),
        })
    }
}

impl Drop for UnauthenticatedPlace {
    fn drop(&mut self) {
        let mut open = self.budget.open.lock().unwrap_or_else(|e| e.into_inner());
        open.remove(&self.id);
    }
}

/// Counts every connection the front door closes by reason and logs each reason at most once
/// a second, with what the operator can change.
struct Refusals {
    metrics: Arc<Metrics>,
    limits: AcceptLimits,
    logs: Mutex<HashMap<&'static str, Throttled>>,
}

impl Refusals {
    fn note(&self, reason: &'static str, remote: &dyn std::fmt::Debug) {
        self.metrics.connection_refused(LISTENER, reason);
        let count = {
            let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
            logs.entry(reason).or_default().note()
        };
        let Some(count) = count else { return };
        let limits = &self.limits;
        let what = match reason {
            "handshake_timeout" => format!(
                "did not finish the TLS handshake within {:?}",
                limits.handshake_timeout
            ),
            "first_request_timeout" => format!(
                "sent no request within {:?} of the TLS handshake",
                limits.first_request_timeout
            ),
            "unauthenticated_lifetime" => format!(
                "had no valid SVID and were open for {:?} (one certificate request needs \
                 far less)",
                limits.unauthenticated_lifetime
            ),
            "idle_timeout" => format!(
                "had a valid SVID but neither started nor held a request for {:?}",
                limits.idle_timeout
            ),
            "unauthenticated_evicted" => format!(
                "had no valid SVID and no request in flight, and made room for newer ones \
                 (--max-unauthenticated-connections {})",
                limits.unauthenticated()
            ),
            "unauthenticated_limit" => format!(
                "had no valid SVID and found every unauthenticated place busy with a request \
                 (--max-unauthenticated-connections {})",
                limits.unauthenticated()
            ),
            other => other.to_string(),
        };
        tracing::warn!(
            listener = LISTENER,
            ?remote,
            reason,
            "closed {count} connection(s) since the last report that {what}"
        );
    }
}

/// The TLS handshake, counting the ones that run out of time.
struct CountedTls {
    tls: Tls,
    refusals: Arc<Refusals>,
}

impl Handshake<TcpStream> for CountedTls {
    type Stream = TlsStream<TcpStream>;
    fn handshake(&self, io: TcpStream) -> impl Future<Output = io::Result<Self::Stream>> + Send {
        self.tls.handshake(io)
    }
    fn failed(
        &self,
        listener: &'static str,
        remote: &dyn std::fmt::Debug,
        failure: HandshakeFailure,
    ) {
        match failure {
            HandshakeFailure::TimedOut => self.refusals.note("handshake_timeout", remote),
            failure => Handshake::<TcpStream>::failed(&self.tls, listener, remote, failure),
        }
    }
}

/// What is left before the connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    FirstRequest,
    /// Unauthenticated connections, once they sent a request.
    LifetimeEnd,
    /// Authenticated connections, once they sent a request: `Deadlines::idle_seen` requests
    /// had started when the window began.
    Idle,
}

/// A connection's deadlines and its place in the unauthenticated budget. One timer serves
/// both deadlines, so its waker wakes the connection's task.
struct Deadlines {
    timer: Pin<Box<Sleep>>,
    next: Next,
    lifetime_end: Option<Instant>,
    idle_timeout: Duration,
    idle_seen: u64,
    unauthenticated: Option<UnauthenticatedPlace>,
    /// Why the connection was closed, once it was.
    closed: Option<&'static str>,
    refusals: Arc<Refusals>,
}

impl Deadlines {
    /// Ready once the connection must close (counted and logged once).
    fn poll_closed(&mut self, peer: &PeerConn, cx: &mut Context<'_>) -> Poll<()> {
        if self.closed.is_some() {
            return Poll::Ready(());
        }
        let reason = loop {
            if let Some(place) = &mut self.unauthenticated
                && place.evicted.as_mut().poll(cx).is_ready()
            {
                break "unauthenticated_evicted";
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let started = peer.activity.started.load(Ordering::Relaxed);
            match (self.next, self.lifetime_end) {
                (Next::FirstRequest, _) if started == 0 => break "first_request_timeout",
                (Next::FirstRequest, Some(end)) => {
                    self.timer.as_mut().reset(end);
                    self.next = Next::LifetimeEnd;
                }
                (Next::LifetimeEnd, _) => break "unauthenticated_lifetime",
                (Next::Idle, _) if started == self.idle_seen && peer.activity.idle() => {
                    break "idle_timeout";
                }
                (Next::FirstRequest | Next::Idle, _) => {
                    self.timer
                        .as_mut()
                        .reset(Instant::now() + self.idle_timeout);
                    self.next = Next::Idle;
                    self.idle_seen = started;
                }
            }
        };
        self.closed = Some(reason);
        self.refusals.note(reason, &peer.remote);
        Poll::Ready(())
    }
}

/// A TLS connection ready for tonic. Holds its places under the connection and per-source caps
/// (and the unauthenticated budget) until dropped. Reads end (EOF, so hyper closes the
/// connection) at the first deadline it misses.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    peer: PeerConn,
    deadlines: Deadlines,
    _slot: Slot,
}

impl Connected for TlsConn {
    type ConnectInfo = PeerConn;
    fn connect_info(&self) -> PeerConn {
        self.peer.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.deadlines.poll_closed(&this.peer, cx).is_ready() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Whether `chain` is a currently valid SVID of `ca`'s trust domain: the connection is then
/// authenticated and outside the unauthenticated budget.
fn authenticated(ca: &Ca, chain: &[CertificateDer<'static>]) -> bool {
    verify_svid(chain, &ca.bundle(), SystemTime::now(), PeerRole::Client)
        .is_ok_and(|info| info.id.is_member_of(ca.trust_domain()))
}

/// Runs the accept loop on `listener` until `cancel` fires; returns the stream of finished
/// TLS connections for `serve_with_incoming`, whose server must install `SeeRequestsLayer`.
/// `ca` decides which client certificates are valid SVIDs; refusals are counted in `metrics`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: AcceptLimits,
    ca: Arc<Ca>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let refusals = Arc::new(Refusals {
        metrics: metrics.clone(),
        limits,
        logs: Mutex::default(),
    });
    let budget = Arc::new(Unauthenticated {
        max: limits.unauthenticated(),
        open: Mutex::default(),
        next: AtomicU64::new(0),
    });
    let handshake = CountedTls {
        tls: Tls(TlsAcceptor::from(config)),
        refusals: refusals.clone(),
    };
    latch_admin::serve::serve(
        listener,
        limits.policy(),
        &Drain::immediate(tracker, &cancel),
        metrics as Arc<dyn ServeMetrics>,
        handshake,
        move |conn| {
            let (tx, ca, budget, refusals) =
                (tx.clone(), ca.clone(), budget.clone(), refusals.clone());
            async move {
                let certs: Option<Arc<[CertificateDer<'static>]>> = conn
                    .stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                let activity = Arc::new(Activity::default());
                let now = Instant::now();
                let unauthenticated = match certs.as_deref() {
                    Some(chain) if authenticated(&ca, chain) => None,
                    _ => match budget.admit(conn.remote.ip().to_canonical(), &activity) {
                        Some(place) => Some(place),
                        None => {
                            // Dropping the connection closes it.
                            refusals.note("unauthenticated_limit", &conn.remote);
                            return;
                        }
                    },
                };
                let lifetime_end = unauthenticated
                    .is_some()
                    .then(|| now + limits.unauthenticated_lifetime);
                let conn = TlsConn {
                    stream: conn.stream,
                    peer: PeerConn {
                        remote: conn.remote,
                        certs,
                        activity,
                    },
                    deadlines: Deadlines {
                        timer: Box::pin(tokio::time::sleep_until(
                            now + limits.first_request_timeout,
                        )),
                        next: Next::FirstRequest,
                        lifetime_end,
                        idle_timeout: limits.idle_timeout,
                        idle_seen: 0,
                        unauthenticated,
                        closed: None,
                        refusals,
                    },
                    _slot: conn.slot,
                };
                let _ = tx.send(Ok(conn)).await;
            }
        },
    );
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max: usize) -> Arc<Unauthenticated> {
        Arc::new(Unauthenticated {
            max,
            open: Mutex::default(),
            next: AtomicU64::new(0),
        })
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn evicted(place: &mut UnauthenticatedPlace) -> bool {
        let waker = std::task::Waker::noop();
        place
            .evicted
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_ready()
    }

    #[test]
    fn a_full_budget_closes_the_oldest_idle_place_of_the_address_holding_most() {
        let budget = budget(3);
        let activity: Vec<Arc<Activity>> = (0..5).map(|_| Arc::default()).collect();
        let mut held_a = budget.admit(ip(1), &activity[0]).unwrap();
        let mut attacker_1 = budget.admit(ip(2), &activity[1]).unwrap();
        let mut attacker_2 = budget.admit(ip(2), &activity[2]).unwrap();
        // 127.0.0.2 holds two places: its oldest goes, though 127.0.0.1's is older.
        let mut newcomer = budget.admit(ip(3), &activity[3]).unwrap();
        assert!(evicted(&mut attacker_1));
        assert!(!evicted(&mut held_a) && !evicted(&mut attacker_2) && !evicted(&mut newcomer));

        // One place each: the oldest idle goes; a request in flight protects a place.
        let _in_flight = activity[0].start();
        let mut next = budget.admit(ip(4), &activity[4]).unwrap();
        assert!(evicted(&mut attacker_2), "127.0.0.1's place is busy");
        assert!(!evicted(&mut held_a) && !evicted(&mut next));

        // Every place busy: the newcomer is refused.
        let _busy = (activity[3].start(), activity[4].start());
        assert!(budget.admit(ip(5), &Arc::default()).is_none());

        // A closed connection frees its place.
        drop(newcomer);
        assert!(budget.admit(ip(5), &Arc::default()).is_some());
    }
}
