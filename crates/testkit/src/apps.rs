//! The plain-TCP apps behind the proxies in tests and the demo, and their clients: a named echo
//! app ("<name>: <request>"), a byte echo, one request per connection (`call`), and `Load`,
//! back-to-back calls on threads until stopped. Each app serves on a thread of its own runtime,
//! so sync and async tests use the same ones. Used by the end-to-end tests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Serves `listener` with `serve` for every connection, on a thread with its own runtime.
fn serve_on_thread<F, Fut>(listener: std::net::TcpListener, serve: F)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    listener
        .set_nonblocking(true)
        .expect("non-blocking listener");
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = TcpListener::from_std(listener).expect("app listener");
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
    });
}

/// An app on `ip` that answers every chunk it reads with `<name>: <chunk>`; its port.
pub fn echo_app(ip: &str, name: &'static str) -> u16 {
    let ip: IpAddr = ip.parse().expect("app ip");
    let listener = std::net::TcpListener::bind((ip, 0)).expect("bind app");
    let port = listener.local_addr().expect("app addr").port();
    serve_on_thread(listener, move |mut tcp| async move {
        let mut buf = [0u8; 1024];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                return;
            }
            let reply = format!("{name}: {}", String::from_utf8_lossy(&buf[..n]));
            if tcp.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    port
}

/// An app on loopback that sends back every byte it reads, and half-closes after EOF; its
/// address.
pub fn byte_echo_app() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    serve_on_thread(listener, |mut tcp| async move {
        let (mut r, mut w) = tcp.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    });
    addr
}

/// A request/response app on loopback: reads until the client half-closes, then answers
/// "got N bytes" and closes; its address.
pub fn reply_after_eof_app() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    let addr = listener.local_addr().expect("app addr");
    serve_on_thread(listener, |mut tcp| async move {
        let mut request = Vec::new();
        let _ = tcp.read_to_end(&mut request).await;
        let _ = tcp
            .write_all(format!("got {} bytes", request.len()).as_bytes())
            .await;
    });
    addr
}

/// One exchange with an app through `entry` on a new connection: sends `request`, half-closes,
/// and reads the answer until EOF; the answer or what went wrong.
pub async fn call(entry: impl std::fmt::Display, request: &str) -> Result<String, String> {
    let entry = entry.to_string();
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&entry))
        .await
        .map_err(|_| format!("connect {entry}: timed out"))?
        .map_err(|e| format!("connect {entry}: {e}"))?;
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    tcp.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .map_err(|_| "read: timed out".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    if answer.is_empty() {
        return Err("closed without an answer".into());
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime")
}

/// `call` from a test without a runtime.
pub fn call_blocking(entry: impl std::fmt::Display, request: &str) -> Result<String, String> {
    runtime().block_on(call(entry, request))
}

/// Back-to-back "ping" calls through each entry on threads of their own until stopped; an
/// answer other than `<app>: ping` is a failure, and every failure is kept.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    /// `per_entry` threads for each (entry address, app name).
    pub fn start(entries: &[(String, &'static str)], per_entry: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for (entry, app) in entries {
            for _ in 0..per_entry {
                let (stop, ok, entry, app) = (stop.clone(), ok.clone(), entry.clone(), *app);
                threads.push(std::thread::spawn(move || {
                    let (runtime, expect) = (runtime(), format!("{app}: ping"));
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        match runtime.block_on(call(&entry, "ping")) {
                            Ok(answer) if answer == expect => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => errors.push(format!(
                                "{:?} {entry}: {other:?}",
                                std::time::SystemTime::now()
                            )),
                        }
                    }
                    errors
                }));
            }
        }
        Self { stop, ok, threads }
    }

    /// Successful calls so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Stops the load: (successful calls, failures).
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().expect("load thread"))
            .collect();
        (self.ok.load(Ordering::Relaxed), errors)
    }

    /// `finish` from an async test, without blocking its runtime.
    pub async fn stop(self) -> (u64, Vec<String>) {
        tokio::task::spawn_blocking(move || self.finish())
            .await
            .expect("load stopped")
    }
}
