//! instream-http: serving HTTP to clients that may be slow, idle or hostile, written once for
//! ingest, query-api and every admin server (`axum::serve` sets no limit of its own).
//!
//! - At most `max_connections` connections at once. When that is nearly reached, connections
//!   idle between requests are closed, oldest idle first, so that thousands of idle
//!   keep-alive connections cannot lock out a client with a request to make (a connection that
//!   has sent no request is closed sooner than one between requests); at the limit, new ones
//!   wait in the kernel's backlog until one closes.
//! - A request's headers must arrive within `header_read_timeout` (slow-loris); a keep-alive
//!   connection idle that long is closed too. A TLS handshake must end within
//!   [`HANDSHAKE_TIMEOUT`].
//! - Every request carries the [`Peer`] address of its connection (for per-client limits).
//! - On shutdown: no new connection; idle ones close, requests in flight finish.

pub mod tls;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The address a request's connection came from (an extension of every request).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

/// What one server allows its clients.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
}

/// Names the server in its metrics (`instream_http_connections{server}`,
/// `instream_<server>_tls_handshake_failures_total`): `ingest`, `query_api`, `admin`.
#[derive(Clone, Copy, Debug)]
pub struct Server(pub &'static str);

/// One open connection, as the accept loop sees it.
struct Connection {
    /// Requests being handled on it now.
    busy: AtomicUsize,
    /// When it last finished a request (or opened), in ms since the server started.
    idle_since: AtomicU64,
    /// Whether a request has come on it yet.
    used: std::sync::atomic::AtomicBool,
    /// Picked to be closed (never picked, or counted, twice).
    closing: std::sync::atomic::AtomicBool,
    close: Notify,
}

/// A connection is idle enough to be closed for another once it has had nothing to do this
/// long: one that just answered may be about to send its next request.
const IDLE_BEFORE_CLOSED: u64 = 1_000;

/// The same for a connection that has not sent a request since it opened: a client sends its
/// first request as soon as it has connected, so one silent this long is only holding a slot
/// (thousands of them in the backlog must not take a second each to get through).
const SILENT_BEFORE_CLOSED: u64 = 200;

/// The open connections, to find idle ones when the limit nears.
#[derive(Default)]
struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
}

impl Connections {
    fn add(&self, now: u64) -> (u64, Arc<Connection>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let connection = Arc::new(Connection {
            busy: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            used: Default::default(),
            closing: Default::default(),
            close: Notify::new(),
        });
        self.lock().insert(id, connection.clone());
        (id, connection)
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Closes up to `n` connections without a request in flight for a while, the longest
    /// idle first.
    fn close_idle(&self, n: usize, now: u64) -> usize {
        let open = self.lock();
        let mut idle: Vec<&Arc<Connection>> = open
            .values()
            .filter(|c| {
                let enough = if c.used.load(Ordering::Relaxed) {
                    IDLE_BEFORE_CLOSED
                } else {
                    SILENT_BEFORE_CLOSED
                };
                c.busy.load(Ordering::Acquire) == 0
                    && !c.closing.load(Ordering::Acquire)
                    && now.saturating_sub(c.idle_since.load(Ordering::Relaxed)) >= enough
            })
            .collect();
        idle.sort_by_key(|c| c.idle_since.load(Ordering::Relaxed));
        for connection in idle.iter().take(n) {
            connection.closing.store(true, Ordering::Release);
            connection.close.notify_one();
        }
        idle.len().min(n)
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`, then drains.
pub async fn serve(
    server: Server,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = Arc::new(Connections::default());
    let tasks = TaskTracker::new();
    let started = Instant::now();
    let now = move || started.elapsed().as_millis() as u64;
    // Idle connections are closed once fewer than a tenth of the slots are left.
    let reserve = (limits.max_connections / 10).max(1);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    loop {
        // Near the limit, idle connections make room; looked at again while a slot is awaited,
        // as connections go idle.
        let slot = loop {
            let free = make_room(server, &slots, &connections, reserve, now());
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                slot = slots.clone().acquire_owned() => break slot.ok(),
                _ = tokio::time::sleep(Duration::from_millis(100)), if free == 0 => {}
            }
        };
        let Some(slot) = slot else {
            break;
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (id, connection) = connections.add(now());
        let service = TowerToHyperService::new(tracked(&router, peer, &connection, started));
        let (http, tls, stop, open) = (
            http.clone(),
            tls.clone(),
            shutdown.clone(),
            connections.clone(),
        );
        let gauge = metrics::gauge!("instream_http_connections", "server" => server.0);
        gauge.increment(1.0);
        tasks.spawn(async move {
            let _slot = slot;
            // Gone from the open connections (and the gauge) however the task ends.
            let _open = Registered {
                connections: open,
                id,
                gauge,
            };
            let served = match tls {
                Some(acceptor) => match handshake(server, &acceptor, tcp, peer).await {
                    Some(stream) => {
                        drive(&http, TokioIo::new(stream), service, &connection, &stop).await
                    }
                    None => Ok(()),
                },
                None => drive(&http, TokioIo::new(tcp), service, &connection, &stop).await,
            };
            if let Err(e) = served {
                // Header timeouts, resets, malformed requests: the client's doing.
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
}

/// Near the limit (fewer than `reserve` slots free), closes idle connections to make room;
/// returns the free slots.
fn make_room(
    server: Server,
    slots: &Semaphore,
    connections: &Connections,
    reserve: usize,
    now: u64,
) -> usize {
    let free = slots.available_permits();
    if free < reserve {
        let closed = connections.close_idle(reserve - free, now);
        if closed > 0 {
            metrics::counter!("instream_http_idle_closed_total", "server" => server.0)
                .increment(closed as u64);
        }
    }
    free
}

/// `router` for one connection: it knows its peer, and the connection knows when it is busy,
/// used, or idle since (ms from `started`).
fn tracked(
    router: &Router,
    peer: std::net::SocketAddr,
    connection: &Arc<Connection>,
    started: Instant,
) -> Router {
    let connection = connection.clone();
    router
        .clone()
        .layer(axum::Extension(Peer(peer)))
        .layer(axum::middleware::from_fn(
            move |request, next: axum::middleware::Next| {
                let connection = connection.clone();
                async move {
                    connection.busy.fetch_add(1, Ordering::AcqRel);
                    connection.used.store(true, Ordering::Relaxed);
                    let response = next.run(request).await;
                    let now = started.elapsed().as_millis() as u64;
                    connection.idle_since.store(now, Ordering::Relaxed);
                    connection.busy.fetch_sub(1, Ordering::AcqRel);
                    response
                }
            },
        ))
}

/// The TLS stream of `tcp`; `None` (logged at debug, counted) when the handshake fails or
/// takes longer than [`HANDSHAKE_TIMEOUT`].
async fn handshake(
    server: Server,
    acceptor: &TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
    let reason = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => return Some(stream),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".into(),
    };
    tracing::debug!(%peer, %reason, "TLS handshake failed");
    metrics::counter!(format!(
        "instream_{}_tls_handshake_failures_total",
        server.0
    ))
    .increment(1);
    None
}

/// A connection's place among the open ones, given back when its task ends.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
    gauge: metrics::Gauge,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.connections.remove(self.id);
        self.gauge.decrement(1.0);
    }
}

/// Serves one connection until it ends. Picked as idle, it is closed at once if it still
/// has no request (a half-sent request line is not one), else after its request; on
/// shutdown, after the request in flight.
async fn drive<I, S>(
    http: &hyper::server::conn::http1::Builder,
    io: I,
    service: S,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming> + Send,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send,
{
    let conn = http.serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => return result,
        _ = connection.close.notified() => {
            if connection.busy.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
        }
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    conn.await
}
