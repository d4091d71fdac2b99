//! Connections to machines: dialing (with the wake probe's hand-over), pooled keep-alive HTTP/1.1
//! connections, h2c connections for `h2_backend` services, and one-off connections for upgrades.
//!
//! Plain HTTP/1.1 requests go over the edge's own lean client (`h1.rs`: the head serialized into
//! one buffer and written with the body's first frame, the answer head parsed with `httparse`,
//! the body framed as RFC 9112 says); h2c and upgrades stay on hyper's client. An HTTP/1.1
//! connection to a machine has no task of its own. The request that uses it drives it: while
//! waiting for the answer, then from inside the answer's body, which the client connection's
//! task polls as it writes the answer out. When the body is done the connection goes back to an
//! idle pool keyed by the machine's address. A pooled client that runs every connection as a
//! task of its own (hyper-util's) costs each request two task hand-offs (the request over a
//! channel, the answer over a oneshot) and their wake-ups; measured on the edge, that was about
//! a third of its CPU per request, and hyper's connection-level client, driven the same way,
//! still about 16k instructions per request against ~8k for `h1.rs` (`docs/perf.md`).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::EdgeConfig;
use crate::dial::Dialer;
use crate::h1::{AnswerHead, ExtraFields, Framing, H1Conn, H1Error, H1Fail, PlainFields};
use crate::http::Body;

/// Why a connect failed, kept so the proxy can name it (PC01 refused vs PC05 timed out).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connection refused by {0}")]
    Refused(SocketAddr),
    #[error("connecting to {0} timed out")]
    TimedOut(SocketAddr),
    #[error("connecting to {0}: {1}")]
    Other(SocketAddr, std::io::Error),
}

/// Why a request could not be sent to a machine.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Nothing was sent: the connect failed (`refused`: the machine refused it).
    Connect { refused: bool, detail: String },
    /// The HTTP handshake failed (h2c).
    Handshake(String),
    /// The request was (maybe partly) sent and failed.
    Request(String),
}

impl From<ConnectError> for SendError {
    fn from(e: ConnectError) -> Self {
        Self::Connect {
            refused: matches!(e, ConnectError::Refused(_)),
            detail: e.to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dialing.

/// Opens connections to machines, taking a wake probe's fresh connection first.
#[derive(Debug)]
struct Connector {
    dialer: Arc<dyn Dialer>,
    timeout: Duration,
    fresh: FreshConns,
}

/// Connections just opened by someone else (a wake's probe that found the machine accepting),
/// handed to the next connect to the same address instead of a new handshake: on a machine that
/// just resumed, every round trip counts.
#[derive(Debug, Default)]
struct FreshConns(Mutex<HashMap<SocketAddr, (Instant, TcpStream)>>);

impl FreshConns {
    /// How long an offered connection is worth taking.
    const FRESH_FOR: Duration = Duration::from_secs(2);

    fn offer(&self, addr: SocketAddr, stream: TcpStream) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.retain(|_, (at, _)| at.elapsed() < Self::FRESH_FOR);
        map.insert(addr, (Instant::now(), stream));
    }

    fn take(&self, addr: SocketAddr) -> Option<TcpStream> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if map.is_empty() {
            return None;
        }
        let (at, stream) = map.remove(&addr)?;
        (at.elapsed() < Self::FRESH_FOR).then_some(stream)
    }
}

impl Connector {
    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        if let Some(s) = self.fresh.take(addr) {
            return Ok(s);
        }
        match tokio::time::timeout(self.timeout, self.dialer.dial(addr)).await {
            Err(_) => Err(ConnectError::TimedOut(addr)),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(ConnectError::Refused(addr))
            }
            Ok(Err(e)) => Err(ConnectError::Other(addr, e)),
            Ok(Ok(s)) => Ok(s),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1.1: connections driven by their requests, and their idle pool.

/// Idle connections by machine address, each with the moment it went idle, newest last.
type IdleMap = HashMap<SocketAddr, Vec<(Instant, Box<H1Conn>)>, BuildHasherDefault<AddrHasher>>;

/// A cheap hash for machine addresses (every request looks one up twice; SipHash was a few
/// hundred instructions of it). The addresses come from the catalog, not from clients, so
/// nothing chooses keys to collide.
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl AddrHasher {
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.add(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

/// Idle HTTP/1.1 connections by machine address, newest last. Entries older than the idle
/// timeout are closed by a sweeper task that runs while the pool holds anything.
#[derive(Default)]
struct IdlePool {
    conns: Mutex<IdleMap>,
    idle_timeout: Duration,
    sweeping: AtomicBool,
}

impl std::fmt::Debug for IdlePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdlePool")
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

impl IdlePool {
    /// Idle connections kept per machine address; more are closed.
    const PER_ADDR: usize = 256;

    fn lock(&self) -> MutexGuard<'_, IdleMap> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used live connection to `addr`.
    fn take(&self, addr: SocketAddr) -> Option<Box<H1Conn>> {
        loop {
            let (since, mut conn) = self.lock().get_mut(&addr)?.pop()?;
            if since.elapsed() < self.idle_timeout && conn.reusable() {
                return Some(conn);
            }
        }
    }

    fn put(self: &Arc<Self>, mut conn: Box<H1Conn>) {
        if !conn.reusable() {
            return;
        }
        {
            let mut conns = self.lock();
            let list = conns.entry(conn.addr).or_default();
            if list.len() >= Self::PER_ADDR {
                return;
            }
            list.push((Instant::now(), conn));
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(Self::sweep(Arc::downgrade(self)));
                }
                Err(_) => self.sweeping.store(false, Ordering::Release),
            }
        }
    }

    /// Closes connections idle for longer than the timeout, until the pool is empty.
    async fn sweep(pool: Weak<Self>) {
        loop {
            let Some(period) = pool
                .upgrade()
                .map(|p| p.idle_timeout.max(Duration::from_millis(100)))
            else {
                return;
            };
            tokio::time::sleep(period / 2).await;
            let Some(pool) = pool.upgrade() else { return };
            let closed: Vec<Box<H1Conn>> = {
                let mut conns = pool.lock();
                let mut closed = Vec::new();
                for list in conns.values_mut() {
                    let keep_from = list
                        .iter()
                        .position(|(since, _)| since.elapsed() < pool.idle_timeout)
                        .unwrap_or(list.len());
                    closed.extend(list.drain(..keep_from).map(|(_, c)| c));
                }
                conns.retain(|_, list| !list.is_empty());
                if conns.is_empty() {
                    pool.sweeping.store(false, Ordering::Release);
                    drop(conns);
                    drop(closed);
                    return;
                }
                closed
            };
            drop(closed);
        }
    }
}

/// A machine's answer body. For HTTP/1.1 it carries the connection the answer comes over and
/// reads from it (writing what is left of the request body meanwhile); once the body is read to
/// its end the connection goes back to the idle pool.
pub(crate) struct UpstreamBody(Inner);

enum Inner {
    /// Driven elsewhere (h2c, upgrades).
    Hyper(Incoming),
    H1 {
        /// `None` once the body ended or failed.
        conn: Option<Box<H1Conn>>,
        pool: Arc<IdlePool>,
        framing: Framing,
    },
}

/// Why reading a machine's answer body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    #[error(transparent)]
    H1(#[from] H1Error),
}

impl UpstreamBody {
    /// A body whose connection is driven elsewhere (h2c, upgrades).
    fn detached(inner: Incoming) -> Self {
        Self(Inner::Hyper(inner))
    }

    /// The body of an HTTP/1.1 answer framed by `framing` over `conn`.
    fn h1(conn: Box<H1Conn>, pool: Arc<IdlePool>, framing: Framing) -> Self {
        let mut body = Self(Inner::H1 {
            conn: Some(conn),
            pool,
            framing,
        });
        // An answer without a body frees its connection now, not when hyper drops the body.
        if body.is_end_stream() {
            body.release();
        }
        body
    }

    /// Puts the connection back in the pool when the answer left it fit for another request,
    /// else closes it.
    fn release(&mut self) {
        if let Inner::H1 { conn, pool, framing } = &mut self.0
            && let Some(c) = conn.take()
            && c.done_with(framing)
        {
            pool.put(c);
        }
    }
}

impl HttpBody for UpstreamBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        match &mut this.0 {
            Inner::Hyper(inner) => Pin::new(inner).poll_frame(cx).map_err(UpstreamError::from),
            Inner::H1 { conn, framing, .. } => {
                let Some(c) = conn else {
                    return Poll::Ready(None);
                };
                let polled = c.poll_body(cx, framing);
                match &polled {
                    Poll::Ready(None) => this.release(),
                    Poll::Ready(Some(Err(_))) => *conn = None,
                    Poll::Ready(Some(Ok(_))) | Poll::Pending => {}
                }
                polled.map_err(UpstreamError::from)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Hyper(inner) => inner.is_end_stream(),
            Inner::H1 { framing, .. } => framing.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::Hyper(inner) => inner.size_hint(),
            Inner::H1 { framing, .. } => framing.size_hint(),
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An answer read to its end leaves its connection reusable; one dropped half-way must
        // close it, which dropping the connection does.
        self.release();
    }
}

// ---------------------------------------------------------------------------------------------
// h2c.

/// h2c connections to machines (`h2_backend`), one multiplexed connection per machine address.
/// The request's URI carries the client's hostname as `:authority`; the machine's address is
/// given apart. A connection no request started on for the idle timeout is let go (closed
/// once its last stream ends) by a watcher task of its own.
#[derive(Debug, Default)]
struct H2Conns {
    conns: Mutex<HashMap<SocketAddr, H2Conn>>,
    idle_timeout: Duration,
    next_id: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct H2Conn {
    id: u64,
    sender: http2::SendRequest<Body>,
    last_used: Instant,
}

impl H2Conns {
    fn lock(&self) -> MutexGuard<'_, HashMap<SocketAddr, H2Conn>> {
        self.conns.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open connection to `addr`, marked used now.
    fn get(&self, addr: SocketAddr) -> Option<http2::SendRequest<Body>> {
        let mut conns = self.lock();
        let c = conns.get_mut(&addr).filter(|c| !c.sender.is_closed())?;
        c.last_used = Instant::now();
        Some(c.sender.clone())
    }

    /// Keeps `sender` as the connection to `addr`, watched for idleness.
    fn insert(self: &Arc<Self>, addr: SocketAddr, sender: http2::SendRequest<Body>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = self.lock();
            // Forget connections their machines closed (machines come and go).
            conns.retain(|_, c| !c.sender.is_closed());
            conns.insert(
                addr,
                H2Conn {
                    id,
                    sender,
                    last_used: Instant::now(),
                },
            );
        }
        let weak = Arc::downgrade(self);
        let period = self.idle_timeout.max(Duration::from_millis(100)) / 2;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(this) = weak.upgrade() else { return };
                let mut conns = this.lock();
                match conns.get(&addr) {
                    Some(c) if c.id == id => {
                        if c.sender.is_closed() || c.last_used.elapsed() >= this.idle_timeout {
                            conns.remove(&addr);
                            return;
                        }
                    }
                    // Replaced by a newer connection, or gone.
                    _ => return,
                }
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// The edge's upstreams.

/// Connections to machines: HTTP/1.1 (pooled, driven by their requests), h2c for `h2_backend`
/// services, raw TCP for apps' own ports.
#[derive(Debug)]
pub(crate) struct Upstreams {
    connector: Connector,
    /// One idle pool per edge worker (`workers.rs`), so a connection is only ever used on the
    /// thread whose reactor it is registered with; threads that are not workers share the first,
    /// and workers beyond the number of CPUs (`--edge-threads` above it) share pools round the
    /// table (correct either way: a pool is behind a lock; only locality is lost).
    h1: Box<[Arc<IdlePool>]>,
    h2: Arc<H2Conns>,
}

impl Upstreams {
    pub(crate) fn new(dialer: Arc<dyn Dialer>, config: &EdgeConfig) -> Self {
        Self {
            connector: Connector {
                dialer,
                timeout: config.connect_timeout,
                fresh: FreshConns::default(),
            },
            h1: (0..std::thread::available_parallelism().map_or(1, usize::from))
                .map(|_| {
                    Arc::new(IdlePool {
                        idle_timeout: config.pool_idle_timeout,
                        ..IdlePool::default()
                    })
                })
                .collect(),
            h2: Arc::new(H2Conns {
                idle_timeout: config.pool_idle_timeout,
                ..H2Conns::default()
            }),
        }
    }

    /// Hands a connection just opened to `addr` to the next request for it.
    pub(crate) fn offer(&self, addr: SocketAddr, stream: TcpStream) {
        self.connector.fresh.offer(addr, stream);
    }

    /// A TCP connection to `addr` (a woken machine's probe connection when there is one).
    pub(crate) async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, ConnectError> {
        self.connector.connect(addr).await
    }

    /// Sends the request `head`, with the edge's headers `own` after its own, and `body` to the
    /// machine at `addr` over HTTP/1.1, in origin form (`/path?query`), with a Host header (see
    /// [`crate::http::upstream_host`]). The head is only borrowed (`h1.rs`). The answer's header
    /// fields may come apart from its `HeaderMap`, in their wire form ([`PlainFields`]).
    pub(crate) async fn send_h1(
        &self,
        addr: SocketAddr,
        head: &http::request::Parts,
        own: &(dyn ExtraFields + Sync),
        body: Body,
    ) -> Result<(Response<UpstreamBody>, Option<PlainFields>), SendError> {
        let host = if head.headers.contains_key(http::header::HOST) {
            None
        } else {
            crate::http::upstream_host(head, addr)
        };
        let mut body = body;
        // Idle connections first; one the machine closed meanwhile gives the body back.
        let pool = self.h1_pool();
        while let Some(mut conn) = pool.take(addr) {
            match conn.send(head, host.as_ref(), own, body).await {
                Ok(head) => return Ok(Self::h1_answer(pool, head, conn)),
                Err(H1Fail::NotSent(b)) => body = b,
                Err(H1Fail::Sent(e)) => return Err(SendError::Request(aloft_api::error_chain(&e))),
            }
        }
        let mut conn = self.open_h1(addr).await?;
        match conn.send(head, host.as_ref(), own, body).await {
            Ok(head) => Ok(Self::h1_answer(pool, head, conn)),
            Err(H1Fail::NotSent(_)) => Err(SendError::Connect {
                refused: false,
                detail: format!("{addr} closed a new connection before the request was sent"),
            }),
            Err(H1Fail::Sent(e)) => Err(SendError::Request(aloft_api::error_chain(&e))),
        }
    }

    /// Sends `req` (built by `build_upstream` for h2c) to the machine at `addr` over h2c.
    pub(crate) async fn send_h2(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        Ok(self.h2_request(addr, req).await?.map(UpstreamBody::detached))
    }

    /// This worker's idle pool.
    fn h1_pool(&self) -> &Arc<IdlePool> {
        &self.h1[crate::workers::current() % self.h1.len()]
    }

    fn h1_answer(
        pool: &Arc<IdlePool>,
        (parts, plain, framing): AnswerHead,
        conn: Box<H1Conn>,
    ) -> (Response<UpstreamBody>, Option<PlainFields>) {
        let body = UpstreamBody::h1(conn, Arc::clone(pool), framing);
        (Response::from_parts(parts, body), plain)
    }

    /// A new connection (boxed: it moves between the pool and the answers that carry it).
    async fn open_h1(&self, addr: SocketAddr) -> Result<Box<H1Conn>, SendError> {
        let stream = self.connector.connect(addr).await?;
        Ok(Box::new(H1Conn::new(addr, stream)))
    }

    async fn h2_request(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let open = self.h2.get(addr);
        let mut sender = match open {
            Some(s) => s,
            None => {
                let stream = self.connector.connect(addr).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| SendError::Handshake(aloft_api::error_chain(&e)))?;
                tokio::spawn(conn);
                self.h2.insert(addr, sender.clone());
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| SendError::Request(aloft_api::error_chain(&e)))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| SendError::Request(aloft_api::error_chain(&e)))
    }

    /// Sends an upgrade request (WebSocket and the like) over a connection of its own, which a
    /// task drives until both sides are done with the upgraded stream. Never pooled.
    pub(crate) async fn send_upgrade(
        &self,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let stream = self.connector.connect(addr).await?;
        let (mut sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Handshake(aloft_api::error_chain(&e)))?;
        tokio::spawn(conn.with_upgrades());
        sender
            .send_request(req)
            .await
            .map(|r| r.map(UpstreamBody::detached))
            .map_err(|e| SendError::Request(aloft_api::error_chain(&e)))
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    #[test]
    fn machine_addresses_hash_apart() {
        let h = BuildHasherDefault::<AddrHasher>::default();
        let addrs: Vec<SocketAddr> = [
            "10.0.0.1:8080",
            "10.0.0.2:8080",
            "10.0.0.1:8081",
            "[fd00::1]:8080",
            "[fd00::2]:8080",
        ]
        .iter()
        .map(|a| a.parse().unwrap_or_else(|e| panic!("{a}: {e}")))
        .collect();
        let hashes: std::collections::HashSet<u64> = addrs.iter().map(|a| h.hash_one(a)).collect();
        assert_eq!(hashes.len(), addrs.len());
        // hashbrown picks buckets by the low bits and tags by the top 7: both must vary.
        let tops: std::collections::HashSet<u64> = addrs.iter().map(|a| h.hash_one(a) >> 57).collect();
        assert!(tops.len() > 1);
        assert_eq!(h.hash_one(addrs[0]), h.hash_one(addrs[0]));
    }
}
