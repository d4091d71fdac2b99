//! The HTTP side of the edge: listeners (plain and TLS), the `http` handler that forwards
//! requests to machines, and the pooled connections to machines.

use std::convert::Infallible;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aloft_api::{HeaderValue as RuleValue, MachineId, MachineService};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::balance::{self, Choice, Want};
use crate::error::{self, ProxyCode};
use crate::h1::PlainFields;
use crate::h1_server::{self, Answer};
use crate::load::LoadGuard;
use crate::routes::{AppRoutes, MachineRoute};
use crate::upstream::{SendError, UpstreamBody};
use crate::{Edge, EdgeConfig, scale};

/// Errors carried by bodies.
pub(crate) type BoxError = Box<dyn StdError + Send + Sync>;
/// Every body the edge sends or forwards.
pub(crate) type Body = UnsyncBoxBody<Bytes, BoxError>;

/// A body of `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The largest request body kept for a retry or a replay.
const REPLAYABLE_BODY: u64 = crate::replay::MAX_REPLAY_BODY as u64;

// ---------------------------------------------------------------------------------------------
// Listeners.

/// Where a client connection came in.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    /// The public port the listener stands for (80, 443, or an app's own port).
    pub(crate) service_port: u16,
    pub(crate) https: bool,
    /// The TLS server name the client asked for.
    pub(crate) sni: Option<String>,
    /// Header values every request of the connection carries, made once per connection.
    values: ConnValues,
}

#[derive(Debug, Clone)]
struct ConnValues {
    client_ip: HeaderValue,
    port: HeaderValue,
    region: HeaderValue,
    /// The edge's request headers these make, as lines (see [`EdgeHeaders`]'s `write_to`):
    /// `Fly-Client-IP`, `Fly-Forwarded-Port` and `Fly-Region`; `X-Forwarded-For` with the
    /// client's address alone; `X-Forwarded-Proto`, `-Port` and `-SSL`.
    lines: Arc<[Vec<u8>; 3]>,
}

impl ConnInfo {
    pub(crate) fn new(
        config: &EdgeConfig,
        peer: SocketAddr,
        service_port: u16,
        https: bool,
        sni: Option<String>,
    ) -> Self {
        let value = |s: String| HeaderValue::try_from(s).unwrap_or_else(|_| HeaderValue::from_static(""));
        let client_ip = value(peer.ip().to_canonical().to_string());
        let port = HeaderValue::from(service_port);
        let region = value(config.region.clone());
        let lines = |fields: &[(HeaderName, &HeaderValue)]| {
            let mut buf = Vec::new();
            for (name, value) in fields {
                crate::h1::write_field(&mut buf, name.as_str().as_bytes(), value.as_bytes());
            }
            buf
        };
        let (proto, ssl) = forwarded_proto_ssl(https);
        let lines = [
            lines(&[
                (names::FLY_CLIENT_IP, &client_ip),
                (names::FLY_FORWARDED_PORT, &port),
                (names::FLY_REGION, &region),
            ]),
            lines(&[(names::X_FORWARDED_FOR, &client_ip)]),
            lines(&[
                (names::X_FORWARDED_PROTO, &HeaderValue::from_static(proto)),
                (names::X_FORWARDED_PORT, &port),
                (names::X_FORWARDED_SSL, &HeaderValue::from_static(ssl)),
            ]),
        ];
        Self {
            service_port,
            https,
            sni,
            values: ConnValues {
                client_ip,
                port,
                region,
                lines: Arc::new(lines),
            },
        }
    }
}

impl Edge {
    /// Serves plain HTTP on `listener` (standing for public port [`EdgeConfig::http_port`])
    /// until the task is dropped.
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener) {
        let port = self.config.http_port;
        self.accept_loop(listener, port, false).await;
    }

    /// Serves HTTPS on `listener` (standing for [`EdgeConfig::https_port`]) with `tls`, whose
    /// certificate resolver picks by SNI (see [`crate::tls`]).
    pub async fn serve_https(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let port = self.config.https_port;
        let _ = self.tls.set(tls);
        if let Ok(addr) = listener.local_addr() {
            let _ = self.https_bound.set(addr.port());
        }
        self.accept_loop(listener, port, true).await;
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, service_port: u16, https: bool) {
        self.accept_clients(listener, move |edge, stream, peer| {
            edge.serve_client(stream, peer, service_port, https)
        })
        .await;
    }

    /// Serves a client connection of the HTTP (or HTTPS) listener.
    async fn serve_client(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        service_port: u16,
        https: bool,
    ) {
        let info = ConnInfo::new(&self.config, peer, service_port, https, None);
        if https {
            // Boxed, as HTTP/2 and the rare paths of a request are: a future holds room for
            // the largest future it may await, and every open connection holds its task.
            Box::pin(self.serve_tls_conn(stream, info)).await;
        } else {
            self.serve_conn(stream, info, false).await;
        }
    }

    /// Accepts client connections on `listener` until the task is dropped: each one admitted
    /// under the per-client limit (else closed at once and counted) is served by `serve` on a
    /// task of its own, holding its client slot until it ends.
    pub(crate) async fn accept_clients<F, Fut>(self: Arc<Self>, listener: TcpListener, serve: F)
    where
        F: Fn(Arc<Self>, TcpStream, SocketAddr) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    eprintln!("edge: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = self.clients.admit(peer.ip(), self.config.max_conns_per_client) else {
                self.metrics.refused_connection();
                drop(stream);
                continue;
            };
            self.metrics.accepted_connection();
            let _ = stream.set_nodelay(true);
            let served = serve(Arc::clone(&self), stream, peer);
            tokio::spawn(async move {
                let _slot = slot;
                served.await;
            });
        }
    }

    async fn serve_tls_conn(self: Arc<Self>, stream: TcpStream, mut info: ConnInfo) {
        let Some(tls) = self.tls.get().cloned() else {
            return;
        };
        let started = Instant::now();
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let accepted = tokio::time::timeout(self.config.header_read_timeout, acceptor.accept(stream)).await;
        let Ok(Ok(tls_stream)) = accepted else {
            self.metrics.tls_handshake(false, started.elapsed());
            return;
        };
        self.metrics.tls_handshake(true, started.elapsed());
        // An ACME TLS-ALPN-01 validation ends with its handshake (RFC 8737).
        if crate::tls::is_acme_tls(tls_stream.get_ref().1.alpn_protocol()) {
            return;
        }
        info.sni = tls_stream.get_ref().1.server_name().map(str::to_owned);
        let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
        self.serve_conn(tls_stream, info, h2).await;
    }

    /// Serves one client connection: HTTP/2 when `h2` (negotiated by ALPN) or when the client
    /// opens with HTTP/2's preface, else HTTP/1.x with the edge's own server (`h1_server`).
    pub(crate) async fn serve_conn<I>(self: Arc<Self>, io: I, info: ConnInfo, h2: bool)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let svc = (self, info);
        if h2 {
            return Box::pin(Self::serve_h2(io, svc)).await;
        }
        let limits = h1_server::Limits {
            head_timeout: svc.0.config.header_read_timeout,
            max_head: svc.0.config.max_header_bytes.max(8192),
        };
        match h1_server::serve(io, limits, &svc).await {
            h1_server::Ended::Done => {}
            h1_server::Ended::H2(io) => Box::pin(Self::serve_h2(io, svc)).await,
        }
    }

    /// Serves HTTP/2 on a client connection with hyper.
    async fn serve_h2<I>(io: I, svc: (Arc<Self>, ConnInfo))
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let timeout = svc.0.config.header_read_timeout;
        let max_header_list = u32::try_from(svc.0.config.max_header_bytes).unwrap_or(u32::MAX);
        // The edge and the connection's facts, in one allocation of the connection's own: a
        // request clones this, not the edge's `Arc`, whose count every worker would write.
        let ctx = Arc::new(svc);
        let asked = Arc::new(AtomicBool::new(false));
        let asked2 = asked.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            asked2.store(true, Ordering::Release);
            let ctx = ctx.clone();
            async move {
                let (edge, info) = &*ctx;
                Ok::<_, Infallible>(edge.handle(req.map(RequestBody::H2), info).await.into_response())
            }
        });
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(max_header_list)
            .serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        // A client that sends nothing, or never a request, would hold the connection forever:
        // it must have sent a first request within the head timeout.
        tokio::select! {
            _ = conn.as_mut() => return,
            () = tokio::time::sleep(timeout) => {}
        }
        if asked.load(Ordering::Acquire) {
            let _ = conn.await;
        }
    }
}

impl h1_server::Service for (Arc<Edge>, ConnInfo) {
    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Answer> + Send + '_ {
        self.0.handle(req, &self.1)
    }
}

/// A client's request body: read by the edge's HTTP/1 server, or hyper's HTTP/2 one.
#[derive(Debug)]
pub(crate) enum RequestBody {
    Empty,
    /// Read whole with the head.
    Full(Full<Bytes>),
    H1(h1_server::Streamed),
    H2(Incoming),
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(b) => b.is_end_stream(),
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(b) => b.size_hint(),
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The http handler.

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(0);

/// A request's id (`Fly-Request-Id`): milliseconds since the epoch and a sequence number in
/// hex, then the edge's region (cut at 63 bytes, a DNS label's most, as aloftd's `--region`
/// allows). Reads as a `str`. Kept inline: making it costs no allocation, and the hot paths
/// write its bytes; a `HeaderValue` of it is made only where a map needs one ([`Self::value`]).
#[derive(Clone, Copy)]
pub(crate) struct RequestId {
    text: [u8; REQUEST_ID_MAX],
    len: u8,
}

/// The longest request id: 12 + 8 hex digits, `-`, and a region name of up to 63 bytes.
const REQUEST_ID_MAX: usize = 21 + 63;

thread_local! {
    /// An edge worker's own request count (see [`request_seq`]).
    static WORKER_SEQ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The sequence part of a request id: unique within a millisecond. An edge worker counts on
/// its own (its index in the low 12 bits, its count above): no counter shared by every request
/// on every core. Other threads (tests) share one counter, under index `0xfff`.
fn request_seq() -> u64 {
    const OTHERS: u64 = 0xfff;
    if !crate::workers::is_worker() {
        return (REQUEST_SEQ.fetch_add(1, Ordering::Relaxed) << 12) | OTHERS;
    }
    let n = WORKER_SEQ.replace(WORKER_SEQ.get().wrapping_add(1));
    (n << 12) | (crate::workers::current() as u64 % OTHERS)
}

thread_local! {
    /// The wall clock (milliseconds since the epoch) at a moment of the monotonic one, read
    /// again after a second: a request's id then takes its time from the request's start,
    /// which the edge reads anyway, with no second clock read.
    static WALL: std::cell::Cell<Option<(Instant, u64)>> = const { std::cell::Cell::new(None) };
}

/// Milliseconds since the epoch at `at` (a moment just past).
fn epoch_ms(at: Instant) -> u64 {
    WALL.with(|wall| {
        if let Some((base, ms)) = wall.get()
            && let Some(since) = at.checked_duration_since(base)
            && since < Duration::from_secs(1)
        {
            return ms + u64::try_from(since.as_millis()).unwrap_or(0);
        }
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        wall.set(Some((at, ms)));
        ms
    })
}

impl RequestId {
    /// The id of a request that started at `started`.
    fn new(region: &str, started: Instant) -> Self {
        let ms = epoch_ms(started);
        let seq = request_seq();
        // Written by hand: `format!` was a few percent of a request's instructions.
        let mut text = [0u8; REQUEST_ID_MAX];
        let hex = |out: &mut [u8], mut n: u64| {
            for digit in out.iter_mut().rev() {
                *digit = b"0123456789abcdef"[(n & 15) as usize];
                n >>= 4;
            }
        };
        hex(&mut text[..12], ms);
        hex(&mut text[12..20], seq & 0xffff_ffff);
        text[20] = b'-';
        let region = &region.as_bytes()[..region.len().min(REQUEST_ID_MAX - 21)];
        let len = 21 + region.len();
        text[21..len].copy_from_slice(region);
        Self {
            text,
            len: u8::try_from(len).unwrap_or(u8::MAX),
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }

    /// The id as a header value (made anew: it allocates).
    pub(crate) fn value(&self) -> HeaderValue {
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        // Made of hex digits, '-' and the region's name (checked at start): always visible ASCII.
        std::str::from_utf8(self.as_bytes()).unwrap_or_default()
    }
}

/// A request body: kept whole (so the request can be retried or replayed) or streamed once.
enum ReqBody {
    Kept(Bytes),
    Stream(Option<Body>),
}

impl ReqBody {
    fn take(&mut self) -> Body {
        match self {
            // An empty body (nearly every request's) is a type of its own, no allocation.
            Self::Kept(b) if b.is_empty() => empty(),
            Self::Kept(b) => full(b.clone()),
            Self::Stream(s) => s.take().unwrap_or_else(empty),
        }
    }
    fn replayable(&self) -> bool {
        matches!(self, Self::Kept(_))
    }
}

/// Where a replay sends the request next.
#[derive(Debug, Default, Clone)]
pub(crate) struct Route {
    pub(crate) app: String,
    pub(crate) force_instance: Option<String>,
    pub(crate) prefer_instance: Option<String>,
    pub(crate) regions: Vec<String>,
    pub(crate) prefer_regions: Vec<String>,
    pub(crate) exclude: Vec<MachineId>,
}

/// A machine's answer (its plain fields apart, see `h1.rs`), from which machine, and the
/// machine's unit of load, held until the answer is done with.
struct MachineAnswer {
    resp: Response<UpstreamBody>,
    plain: Option<PlainFields>,
    machine: Arc<MachineRoute>,
    guard: LoadGuard,
}

/// What one attempt to forward produced.
enum Forwarded {
    /// The machine answered.
    Answer(Box<MachineAnswer>),
    /// The edge answers itself.
    Fail(ProxyCode, Option<String>),
}

impl Edge {
    async fn handle(self: &Arc<Self>, mut req: Request<RequestBody>, conn: &ConnInfo) -> Answer {
        let started = Instant::now();
        let rid = RequestId::new(&self.config.region, started);
        if let Some(resp) = self.acme_http_challenge(&req) {
            return resp.into();
        }
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
            .or(conn.sni.as_deref())
            .unwrap_or_default();
        let snap = self.routes.snapshot();
        let Some(app) = snap.app_for_host(host, &self.config.base_domain).cloned() else {
            self.metrics
                .response(None, StatusCode::NOT_FOUND, started.elapsed());
            return error::response(ProxyCode::PR04, Some(&format!("unknown host {host:?}")), &rid).into();
        };
        if !conn.https
            && let Some(resp) = self.force_https(&app, &req, host, conn)
        {
            self.metrics
                .response(Some(&app.name), resp.status(), started.elapsed());
            return resp.into();
        }
        let hints = match crate::replay::RoutingHints::from_headers(req.headers()) {
            Ok(h) => h,
            Err(e) => {
                let mut r = error::response(ProxyCode::PR03, Some(&e.to_string()), &rid);
                *r.status_mut() = StatusCode::BAD_REQUEST;
                self.metrics
                    .response(Some(&app.name), r.status(), started.elapsed());
                return r.into();
            }
        };
        let mut route = Route {
            app: app.name.clone(),
            force_instance: hints.force_instance.as_ref().map(|i| i.as_str().to_owned()),
            prefer_instance: hints.prefer_instance.as_ref().map(|i| i.as_str().to_owned()),
            regions: region_names(hints.force_region.as_slice()),
            prefer_regions: region_names(&hints.prefer_regions),
            exclude: Vec::new(),
        };
        // Only the edge says a request was replayed: a client can't forge it.
        if has_fly_header(req.headers()) {
            for forged in [
                crate::replay::FLY_REPLAY_SRC,
                crate::replay::FLY_REPLAY_FAILED,
                crate::replay::FLY_PREFERRED_INSTANCE_UNAVAILABLE,
            ] {
                req.headers_mut().remove(forged);
            }
        }
        let version = req.version();
        let own = EdgeHeaders::take(req.headers_mut(), conn, &rid, version);
        let resp = if is_upgrade(&req) {
            // Boxed, as the other rare paths below (h2c, waking a machine): see `serve_client`.
            Box::pin(self.forward_upgrade(req, &app, &route, conn, &rid, &own))
                .await
                .into()
        } else {
            self.forward(req, app, &mut route, conn, &rid, &own).await
        };
        self.metrics
            .response(Some(&route.app), resp.status(), started.elapsed());
        resp
    }

    fn acme_http_challenge(&self, req: &Request<RequestBody>) -> Option<Response<Body>> {
        let token = req.uri().path().strip_prefix("/.well-known/acme-challenge/")?;
        let answer = (self.acme_http.get()?.0)(token)?;
        let mut resp = Response::new(full(answer));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        Some(resp)
    }

    fn force_https(
        &self,
        app: &AppRoutes,
        req: &Request<RequestBody>,
        host: &str,
        conn: &ConnInfo,
    ) -> Option<Response<Body>> {
        let forced = app.machines.iter().any(|m| {
            m.entry.services.iter().any(|s| {
                s.ports
                    .iter()
                    .any(|p| p.port == Some(conn.service_port) && p.force_https == Some(true))
            })
        });
        if !forced {
            return None;
        }
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        // A client that named a port (`Host: app.localhost:8080`) reaches the edge's listeners
        // directly: it goes to the HTTPS listener's own port. One that named none came in on the
        // public HTTP port (bound, or forwarded to the edge): it goes to the public HTTPS port.
        let named_port = host
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
        let port = match self.https_bound.get() {
            Some(bound) if named_port => *bound,
            _ => self.config.https_port,
        };
        let host = crate::routes::normalize_host(host)?;
        let location = if port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{port}{path}")
        };
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
        resp.headers_mut()
            .insert(header::LOCATION, HeaderValue::try_from(location).ok()?);
        Some(resp)
    }

    /// Forwards a (non-upgrade) request, following replays.
    async fn forward(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        first_app: Arc<AppRoutes>,
        route: &mut Route,
        conn: &ConnInfo,
        rid: &RequestId,
        own: &EdgeHeaders<'_>,
    ) -> Answer {
        let (mut parts, incoming) = req.into_parts();
        let mut body = match kept_body(&parts.headers, incoming).await {
            Ok(b) => b,
            Err(resp_code) => return error::response(resp_code, None, rid).into(),
        };
        let mut app = first_app;
        let mut hops = 0u32;
        // The machine whose replay (or cached one) sent the request on, and since when.
        let mut replay_from: Option<(Arc<MachineRoute>, crate::replay::Replay, Instant)> = None;
        // Replay cache: a cached target skips the machine that would replay (replay_cache.rs).
        let (mut cache, hit) =
            self.replay_cache_lookup(&app, conn.service_port, route, &mut parts, body.replayable());
        if let Some((next, (from, replay))) = hit {
            (app, hops, replay_from) = (next, 1, Some((from, replay, Instant::now())));
        }
        loop {
            let deadline = replay_from
                .as_ref()
                .and_then(|(_, r, _)| r.timeout)
                .map(|t| Instant::now() + t);
            let attempt = self
                .attempt(
                    &app,
                    route,
                    Outgoing {
                        parts: &parts,
                        body: &mut body,
                        own,
                    },
                    conn,
                    deadline,
                )
                .await;
            let MachineAnswer {
                resp,
                plain,
                machine,
                guard,
            } = match attempt {
                Forwarded::Answer(answer) => *answer,
                Forwarded::Fail(code, detail) => {
                    if let Some(first) = cache.unreachable(self, route, &mut parts) {
                        (app, hops, replay_from) = (first, 0, None);
                        continue;
                    }
                    // A replay whose target can't be reached falls back to the replaying machine
                    // when it asked to.
                    if let Some((src, replay, since)) = replay_from.take()
                        && replay.fallback.is_some()
                    {
                        let failed = crate::replay::replay_failed(&crate::replay::ReplayFailure {
                            instance: route.force_instance.as_deref().unwrap_or(""),
                            app: &route.app,
                            region: &route.regions.join(","),
                            replay_source: src.entry.id.as_str(),
                            reason: match code {
                                ProxyCode::PM03 | ProxyCode::PL01 => crate::replay::FailReason::Timeout,
                                ProxyCode::PR01 | ProxyCode::PR02 => crate::replay::FailReason::NoCandidate,
                                _ => crate::replay::FailReason::RetriesExhausted,
                            },
                            elapsed: since.elapsed(),
                        });
                        if let Ok(v) = HeaderValue::try_from(failed) {
                            parts.headers.insert(crate::replay::FLY_REPLAY_FAILED, v);
                        }
                        parts.headers.remove(crate::replay::FLY_REPLAY_SRC);
                        if let Some(a) = self.routes.snapshot().app(&src.entry.app).cloned() {
                            app = a;
                        }
                        *route = Route {
                            app: src.entry.app.clone(),
                            force_instance: Some(src.entry.id.as_str().to_owned()),
                            ..Route::default()
                        };
                        hops = crate::replay::MAX_REPLAY_HOPS; // no further replays
                        continue;
                    }
                    return error::response(code, detail.as_deref(), rid).into();
                }
            };
            // The answer is looked at in place: nearly every one passes, and moving it into a
            // check and back out cost two copies of it.
            let replay = match replay_check(&resp) {
                Err(code) => return error::response(code, None, rid).into(),
                Ok(ReplayCheck::Replay(replay)) => *replay,
                Ok(ReplayCheck::InBody) => match Box::pin(replay_in_body(resp)).await {
                    Ok(replay) => replay,
                    Err(code) => return error::response(code, None, rid).into(),
                },
                Ok(ReplayCheck::Pass) => {
                    let Some(service) = machine.service_for_port(conn.service_port) else {
                        return error::response(ProxyCode::PR01, None, rid).into();
                    };
                    let mut resp = resp;
                    cache.finished(self, &machine, resp.headers_mut());
                    return finish_response(resp, plain, guard, service, rid);
                }
            };
            cache.replayed(self, &machine, &replay, hops == 0, &parts);
            hops += 1;
            if !body.replayable() {
                return error::response(ProxyCode::PA01, None, rid).into();
            }
            if hops > crate::replay::MAX_REPLAY_HOPS {
                return error::response(ProxyCode::PA02, None, rid).into();
            }
            drop(guard);
            match self.apply_replay(&replay, &machine, &app, route, &mut parts) {
                Ok(next) => app = next,
                Err(code) => return error::response(code, None, rid).into(),
            }
            replay_from = Some((machine, replay, Instant::now()));
        }
    }

    /// Chooses a machine (waking or queueing as needed) and sends the request to it, trying other
    /// machines when a connect fails before the request was sent.
    async fn attempt(
        self: &Arc<Self>,
        app: &Arc<AppRoutes>,
        route: &mut Route,
        out: Outgoing<'_>,
        conn: &ConnInfo,
        deadline: Option<Instant>,
    ) -> Forwarded {
        let Outgoing { parts, body, own } = out;
        let mut last: Option<(ProxyCode, String)> = None;
        let mut tried: Vec<MachineId> = route.exclude.clone();
        // When no machine can take the request right now but one is on its way back (a
        // deploy restarting it, or one whose connect just failed: the catalog may not show
        // yet that it went down, or it started but does not listen yet), the request waits
        // instead of failing, as long as it can be sent again, up to the queue timeout from
        // the first such answer (most requests never read the clock for it). An app that
        // never listens thus fails after the queue timeout, not at once: a deploy's restarts
        // cost no request.
        let mut waiting_since: Option<Instant> = None;
        let mut attempts = 0usize;
        while attempts < self.config.connect_attempts.max(1) {
            let picked = self.pick(app, route, &tried, conn.service_port, deadline).await;
            let (machine, guard) = match picked {
                Ok(p) => p,
                Err((ProxyCode::PR01, detail))
                    if body.replayable()
                        && (last.is_some() || self.coming_back(&app.name, conn.service_port)) =>
                {
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    let give_up = deadline.unwrap_or(since + self.config.queue_timeout);
                    let left = give_up.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return match last {
                            Some((c, d)) => Forwarded::Fail(c, Some(d)),
                            None => Forwarded::Fail(ProxyCode::PR01, detail),
                        };
                    }
                    let changed = self.routes.changed();
                    let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), changed).await;
                    tried.clone_from(&route.exclude);
                    attempts = 0;
                    continue;
                }
                Err((code, detail)) => {
                    return match last {
                        Some((c, d)) if code == ProxyCode::PR01 => Forwarded::Fail(c, Some(d)),
                        _ => Forwarded::Fail(code, detail),
                    };
                }
            };
            attempts += 1;
            let Some(service) = machine.service_for_port(conn.service_port) else {
                return Forwarded::Fail(ProxyCode::PR01, None);
            };
            let (Some(ip), Some(port)) = (machine.ip, service.internal_port) else {
                return Forwarded::Fail(ProxyCode::PR01, None);
            };
            let h2 = service
                .ports
                .iter()
                .any(|p| p.http_options.as_ref().and_then(|o| o.h2_backend) == Some(true));
            let addr = SocketAddr::new(ip, port);
            let sent = if h2 {
                let upstream = build_upstream(parts, own, addr, true, body.take());
                Box::pin(self.client.send_h2(addr, upstream))
                    .await
                    .map(|resp| (resp, None))
            } else {
                self.client.send_h1(addr, parts, own, body.take()).await
            };
            match sent {
                Ok((resp, plain)) => {
                    return Forwarded::Answer(Box::new(MachineAnswer {
                        resp,
                        plain,
                        machine,
                        guard,
                    }));
                }
                Err(SendError::Connect { refused, detail }) => {
                    self.mark_failed(&machine.entry.id);
                    let code = if refused { ProxyCode::PC01 } else { ProxyCode::PC05 };
                    last = Some((code, format!("machine {}: {detail}", machine.entry.id)));
                    if !body.replayable() {
                        break;
                    }
                    tried.push(machine.entry.id.clone());
                }
                Err(SendError::Handshake(detail)) => {
                    return Forwarded::Fail(
                        ProxyCode::PU01,
                        Some(format!("machine {}: {detail}", machine.entry.id)),
                    );
                }
                Err(SendError::Request(detail)) => {
                    // The machine went away with the request (e.g. a deploy stopped it): an
                    // idempotent request that got no answer is safe to send again elsewhere,
                    // as nginx's proxy_next_upstream does.
                    let detail = format!("machine {}: {detail}", machine.entry.id);
                    if !(body.replayable() && is_idempotent(&parts.method)) {
                        return Forwarded::Fail(ProxyCode::PU02, Some(detail));
                    }
                    self.mark_failed(&machine.entry.id);
                    last = Some((ProxyCode::PU02, detail));
                    tried.push(machine.entry.id.clone());
                }
            }
        }
        match last {
            Some((ProxyCode::PU02, d)) => Forwarded::Fail(ProxyCode::PU02, Some(d)),
            Some((ProxyCode::PC01, d)) if tried.len() <= 1 => Forwarded::Fail(ProxyCode::PC01, Some(d)),
            Some((_, d)) => Forwarded::Fail(ProxyCode::PC07, Some(d)),
            None => Forwarded::Fail(ProxyCode::PR03, None),
        }
    }

    /// Whether a machine of `app` serving `port` is on its way to `started` (created, starting,
    /// restarting, or being updated by a deploy): worth waiting for.
    fn coming_back(&self, app: &str, port: u16) -> bool {
        use aloft_api::MachineState as S;
        self.routes.snapshot().app(app).is_some_and(|a| {
            a.machines.iter().any(|m| {
                m.service_for_port(port).is_some()
                    && !m.cordoned
                    && matches!(
                        m.entry.state,
                        S::Creating | S::Created | S::Starting | S::Restarting | S::Updating | S::Replacing
                    )
            })
        })
    }

    /// A machine for the request, with its unit of load: chosen, woken, or waited for.
    pub(crate) async fn pick(
        self: &Arc<Self>,
        app: &Arc<AppRoutes>,
        route: &Route,
        tried: &[MachineId],
        port: u16,
        deadline: Option<Instant>,
    ) -> Result<(Arc<MachineRoute>, LoadGuard), (ProxyCode, Option<String>)> {
        // When it started to wait: its queue timeout runs from there.
        let mut queue_since: Option<Instant> = None;
        // The app's waiting room once this request counts in its `queued` and listens for freed
        // capacity: from the first time it finds the app full, and then before it looks again,
        // so that a unit freed in between is not missed (a freed unit rings only while `queued`
        // is not 0, see `LoadGuard`). Requests that never wait don't look the room up, nor
        // register with its `Notify` (its lock).
        let mut queued: Option<Arc<crate::load::AppLoad>> = None;
        let result = loop {
            let room = queued.clone();
            let freed = room.as_ref().map(|r| r.freed.notified());
            tokio::pin!(freed);
            if let Some(f) = freed.as_mut().as_pin_mut() {
                f.enable();
            }
            // Always the newest view of the app: machines may have started since.
            let current = self
                .routes
                .snapshot()
                .app(&app.name)
                .cloned()
                .unwrap_or_else(|| app.clone());
            let want = Want {
                port,
                force_instance: route.force_instance.as_deref(),
                prefer_instance: route.prefer_instance.as_deref(),
                regions: &route.regions,
                prefer_regions: &route.prefer_regions,
                exclude: tried,
            };
            match balance::choose(self, &current, &want) {
                Choice::Ready(m, g) => break Ok((m, g)),
                Choice::Wake(m) => {
                    let Some(internal) = m.service_for_port(port).and_then(|s| s.internal_port) else {
                        break Err((ProxyCode::PR01, None));
                    };
                    match Box::pin(scale::wake(self, &m, internal)).await {
                        // Choose again: the machine counts as started now, and every request
                        // that waited for it must still respect its hard limit (taking it
                        // unconditionally let a crowd of first requests all land on it).
                        Ok(()) => {}
                        Err((code, detail)) => break Err((code, Some(detail))),
                    }
                }
                Choice::NotFound => break Err((ProxyCode::PR02, route.force_instance.clone())),
                Choice::NoneHealthy => break Err((ProxyCode::PR01, None)),
                Choice::Full => match freed.as_mut().as_pin_mut() {
                    None => {
                        let room = self.loads.app(&app.name);
                        if room.queued.fetch_add(1, Ordering::SeqCst) >= self.config.queue_limit {
                            room.queued.fetch_sub(1, Ordering::SeqCst);
                            break Err((ProxyCode::PL01, Some("the request queue is full".to_owned())));
                        }
                        queued = Some(room);
                        queue_since = Some(Instant::now());
                    }
                    Some(freed) => {
                        let since = *queue_since.get_or_insert_with(Instant::now);
                        let queue_deadline = deadline.unwrap_or(since + self.config.queue_timeout);
                        let left = queue_deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() || tokio::time::timeout(left, freed).await.is_err() {
                            break Err((ProxyCode::PL01, Some("no capacity freed up in time".to_owned())));
                        }
                    }
                },
            }
        };
        if let Some(room) = queued {
            room.queued.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    async fn forward_upgrade(
        self: &Arc<Self>,
        req: Request<RequestBody>,
        app: &Arc<AppRoutes>,
        route: &Route,
        conn: &ConnInfo,
        rid: &RequestId,
        own: &EdgeHeaders<'_>,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        // An upgrade request normally has no body: then a connect that fails (nothing was
        // sent) is retried on another machine, as for other requests.
        let retryable = body.is_end_stream();
        let mut body = Some(body);
        let mut tried: Vec<MachineId> = Vec::new();
        let mut last: Option<(ProxyCode, String)> = None;
        let mut attempts = 0;
        let (mut resp, machine, guard) = loop {
            let picked = self.pick(app, route, &tried, conn.service_port, None).await;
            let (machine, guard) = match (picked, last.take()) {
                (Ok(p), _) => p,
                (Err((ProxyCode::PR01, _)), Some((code, detail))) => {
                    return error::response(code, Some(&detail), rid);
                }
                (Err((code, detail)), _) => return error::response(code, detail.as_deref(), rid),
            };
            let Some(service) = machine.service_for_port(conn.service_port) else {
                return error::response(ProxyCode::PR01, None, rid);
            };
            let (Some(ip), Some(port)) = (machine.ip, service.internal_port) else {
                return error::response(ProxyCode::PR01, None, rid);
            };
            let addr = SocketAddr::new(ip, port);
            let upstream_body = match body.take() {
                Some(b) => b.boxed_unsync(),
                None => empty(),
            };
            let upstream = build_upstream(&parts, own, addr, false, upstream_body);
            attempts += 1;
            match self.client.send_upgrade(addr, upstream).await {
                Ok(r) => break (r, machine, guard),
                Err(SendError::Connect { refused, detail }) => {
                    self.mark_failed(&machine.entry.id);
                    let code = if refused { ProxyCode::PC01 } else { ProxyCode::PC05 };
                    let detail = format!("machine {}: {detail}", machine.entry.id);
                    if !retryable || attempts >= self.config.connect_attempts.max(1) {
                        return error::response(code, Some(&detail), rid);
                    }
                    last = Some((code, detail));
                    tried.push(machine.entry.id.clone());
                }
                Err(SendError::Handshake(d) | SendError::Request(d)) => {
                    return error::response(
                        ProxyCode::PU02,
                        Some(&format!("machine {}: {d}", machine.entry.id)),
                        rid,
                    );
                }
            }
        };
        let Some(service) = machine.service_for_port(conn.service_port) else {
            return error::response(ProxyCode::PR01, None, rid);
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return finish_response(resp, None, guard, service, rid).into_response();
        }
        // The edge's HTTP/1 server joins the client to the machine once it wrote the answer.
        let tunnel = h1_server::TunnelSlot::new(h1_server::Tunnel {
            other: hyper::upgrade::on(&mut resp),
            hold: Box::new(guard),
        });
        let (parts, _) = resp.into_parts();
        let mut out = Response::from_parts(parts, empty());
        out.extensions_mut().insert(tunnel);
        add_response_headers(out.headers_mut(), rid, service, Version::HTTP_11);
        out
    }
}

/// Whether a machine's answer asks for a replay.
enum ReplayCheck {
    Pass,
    /// In its `fly-replay` header (boxed: rare, and the check's value stays small).
    Replay(Box<crate::replay::Replay>),
    /// In its body (the JSON form).
    InBody,
}

/// What a machine's answer says about replaying (its fields in wire form never do: see
/// `PlainFields`). A malformed replay is PA03.
fn replay_check(resp: &Response<UpstreamBody>) -> Result<ReplayCheck, ProxyCode> {
    if let Some(r) = crate::replay::Replay::from_headers(resp.headers()).map_err(|_| ProxyCode::PA03)? {
        return Ok(ReplayCheck::Replay(Box::new(r)));
    }
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(crate::replay::is_replay_json);
    Ok(if is_json {
        ReplayCheck::InBody
    } else {
        ReplayCheck::Pass
    })
}

/// The replay in an answer's body (the JSON form, bounded).
async fn replay_in_body(resp: Response<UpstreamBody>) -> Result<crate::replay::Replay, ProxyCode> {
    let limited = Limited::new(
        resp.into_body(),
        usize::try_from(REPLAYABLE_BODY).unwrap_or(usize::MAX),
    );
    let bytes = limited.collect().await.map_err(|_| ProxyCode::PA03)?.to_bytes();
    crate::replay::parse_json(&bytes).map_err(|_| ProxyCode::PA03)
}

impl Edge {
    /// Points `route` at a replay's target and marks the request as replayed.
    pub(crate) fn apply_replay(
        &self,
        replay: &crate::replay::Replay,
        from: &Arc<MachineRoute>,
        current: &Arc<AppRoutes>,
        route: &mut Route,
        parts: &mut http::request::Parts,
    ) -> Result<Arc<AppRoutes>, ProxyCode> {
        let snap = self.routes.snapshot();
        let target = match &replay.app {
            Some(name) if *name != current.name => {
                let t = snap.app(name).cloned().ok_or(ProxyCode::PA04)?;
                if let (Some(a), Some(b)) = (&t.org, &current.org)
                    && a != b
                {
                    return Err(ProxyCode::PA05);
                }
                t
            }
            _ => current.clone(),
        };
        *route = Route {
            app: target.name.clone(),
            force_instance: replay.instance.as_ref().map(|i| i.as_str().to_owned()),
            prefer_instance: replay.prefer_instance.as_ref().map(|i| i.as_str().to_owned()),
            regions: region_names(&replay.regions),
            prefer_regions: Vec::new(),
            exclude: if replay.elsewhere {
                vec![from.entry.id.clone()]
            } else {
                Vec::new()
            },
        };
        if let Some(t) = &replay.transform {
            if let Some(path) = &t.path
                && let Ok(pq) = http::uri::PathAndQuery::try_from(path.as_str())
            {
                let mut up = parts.uri.clone().into_parts();
                up.path_and_query = Some(pq);
                if let Ok(u) = Uri::from_parts(up) {
                    parts.uri = u;
                }
            }
            for name in &t.delete_headers {
                parts.headers.remove(name.as_str());
            }
            for (name, value) in &t.set_headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::try_from(name.as_str()),
                    HeaderValue::try_from(value.as_str()),
                ) {
                    parts.headers.insert(n, v);
                }
            }
            // The app may rewrite the request but not the edge's own headers, which are kept
            // apart (`EdgeHeaders`): what it set under their names goes.
            EdgeHeaders::remove_from(&mut parts.headers);
        }
        // After the transform, so the app cannot forge where the request comes from.
        let src = crate::replay::replay_src(
            from.entry.id.as_str(),
            &from.entry.region,
            crate::replay::micros_since_epoch(SystemTime::now()),
            replay.state.as_deref(),
        );
        if let Ok(v) = HeaderValue::try_from(src) {
            parts.headers.insert(crate::replay::FLY_REPLAY_SRC, v);
        }
        Ok(target)
    }
}

/// Region names from a region list: `any` lifts the constraint; other aliases are taken as
/// region names (aloft's regions are operator-named labels).
fn region_names(sels: &[crate::replay::RegionSel]) -> Vec<String> {
    use crate::replay::RegionSel;
    if sels
        .iter()
        .any(|s| matches!(s, RegionSel::Alias(a) if a == "any"))
    {
        return Vec::new();
    }
    sels.iter().map(|s| s.as_str().to_owned()).collect()
}

/// Reads the body whole when it is small enough to keep for a retry or replay (or absent).
async fn kept_body(headers: &HeaderMap, body: RequestBody) -> Result<ReqBody, ProxyCode> {
    let hint = body.size_hint();
    if body.is_end_stream() {
        return Ok(ReqBody::Kept(Bytes::new()));
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let big = declared.or(hint.exact()).is_some_and(|n| n > REPLAYABLE_BODY);
    if big {
        return Ok(ReqBody::Stream(Some(body.boxed_unsync())));
    }
    // Small, or of unknown length (chunked, or HTTP/2 without content-length, which is common):
    // read up to the limit, and stream on from there when it is longer.
    let mut body = body;
    let mut kept = bytes::BytesMut::new();
    loop {
        match body.frame().await {
            None => return Ok(ReqBody::Kept(kept.freeze())),
            Some(Err(_)) => return Err(ProxyCode::PU02),
            Some(Ok(frame)) => {
                // Trailers are not forwarded (as before: a kept body is data only).
                let Ok(data) = frame.into_data() else { continue };
                kept.extend_from_slice(&data);
                if kept.len() as u64 > REPLAYABLE_BODY {
                    let rest = Prefixed {
                        prefix: kept.freeze(),
                        rest: Some(body),
                    };
                    return Ok(ReqBody::Stream(Some(rest.boxed_unsync())));
                }
            }
        }
    }
}

/// A request body of which the edge already took `prefix` (read it while deciding whether to
/// keep the body, or took it out to send and then gave the request back unsent): `prefix`,
/// then what is left of the body.
pub(crate) struct Prefixed<B> {
    pub(crate) prefix: Bytes,
    pub(crate) rest: Option<B>,
}

impl<B> HttpBody for Prefixed<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.prefix.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut self.prefix)))));
        }
        match &mut self.rest {
            Some(rest) => Pin::new(rest).poll_frame(cx).map_err(Into::into),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.as_ref().is_none_or(HttpBody::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        let rest = self
            .rest
            .as_ref()
            .map_or(SizeHint::with_exact(0), HttpBody::size_hint);
        let n = self.prefix.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(n));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(n));
        }
        hint
    }
}

fn is_upgrade(req: &Request<RequestBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get(header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// The request headers the proxy sets (see [`EdgeHeaders`]); a replay's transform cannot
/// change them.
const PROXY_REQUEST_HEADERS: [&str; 9] = [
    "fly-client-ip",
    "fly-forwarded-port",
    "fly-region",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "via",
    "fly-request-id",
];

/// Header names the edge sets or removes on every request, parsed once.
pub(crate) mod names {
    use http::header::HeaderName;

    pub(crate) const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    pub(super) const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    pub(super) const FLY_CLIENT_IP: HeaderName = HeaderName::from_static("fly-client-ip");
    pub(super) const FLY_FORWARDED_PORT: HeaderName = HeaderName::from_static("fly-forwarded-port");
    pub(super) const FLY_REGION: HeaderName = HeaderName::from_static("fly-region");
    pub(super) const FLY_REQUEST_ID: HeaderName = HeaderName::from_static("fly-request-id");
    pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub(super) const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
    pub(super) const X_FORWARDED_SSL: HeaderName = HeaderName::from_static("x-forwarded-ssl");
}

/// Whether `n` is a hop-by-hop header (RFC 9110 §7.6.1, and the old `Keep-Alive` and
/// `Proxy-Connection`).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    n == header::CONNECTION
        || n == header::TE
        || n == header::TRAILER
        || n == header::TRANSFER_ENCODING
        || n == header::UPGRADE
        || n == names::KEEP_ALIVE
        || n == names::PROXY_CONNECTION
}

/// Removes hop-by-hop headers (and those the Connection header names), keeping the upgrade pair
/// of an upgrade request when `upgrades` (one with an `Upgrade` header, in HTTP/1.1). Most
/// messages have none, or only `Connection: keep-alive`: one pass over the names finds out
/// which are there without hashing anything, and only those are removed.
fn strip_hop_by_hop(h: &mut HeaderMap, upgrades: bool) {
    let mut present: Vec<HeaderName> = Vec::new();
    let (mut connection, mut upgrade) = (false, false);
    for n in h.keys() {
        if !is_hop_by_hop(n) {
            continue;
        }
        connection |= n == header::CONNECTION;
        upgrade |= n == header::UPGRADE;
        present.push(n.clone());
    }
    if upgrades && upgrade {
        present.retain(|n| n != header::CONNECTION && n != header::UPGRADE);
    }
    if connection {
        // Other headers the Connection header names (`keep-alive`, `close` and `upgrade` are
        // handled with the rest).
        for v in h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for t in v.split(',').map(str::trim) {
                if t.is_empty()
                    || t.eq_ignore_ascii_case("keep-alive")
                    || t.eq_ignore_ascii_case("close")
                    || t.eq_ignore_ascii_case("upgrade")
                {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
                    present.push(n);
                }
            }
        }
    }
    for n in present {
        h.remove(n);
    }
}

/// Whether `h` has a header whose name starts with `fly-` (a routing hint, a replay, or one
/// only the edge may set): one pass over the names, no hashing, so that messages without any,
/// nearly all of them, skip the lookups.
pub(crate) fn has_fly_header(h: &HeaderMap) -> bool {
    h.keys().any(|n| n.as_str().starts_with("fly-"))
}

/// The request to send to the machine at `addr` (a copy: `parts` stay for a retry or a replay).
fn build_upstream(
    parts: &http::request::Parts,
    own: &EdgeHeaders<'_>,
    addr: SocketAddr,
    h2: bool,
    body: Body,
) -> Request<Body> {
    let mut headers = parts.headers.clone();
    own.apply(&mut headers);
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let uri = if h2 {
        // h2c carries the client's hostname as `:authority` (and no Host header, RFC 9113
        // §8.3.1); the connection to the machine is chosen apart.
        let authority = headers
            .remove(header::HOST)
            .or_else(|| upstream_host(parts, addr))
            .and_then(|h| Authority::try_from(h.as_bytes()).ok())
            .or_else(|| Authority::try_from(machine_authority(addr)).ok());
        let mut up = http::uri::Parts::default();
        up.scheme = Some(http::uri::Scheme::HTTP);
        up.authority = authority;
        up.path_and_query = Some(pq);
        Uri::from_parts(up).unwrap_or_default()
    } else {
        // HTTP/1.1 in origin form; the Host header names the app.
        if !headers.contains_key(header::HOST)
            && let Some(h) = upstream_host(parts, addr)
        {
            headers.insert(header::HOST, h);
        }
        Uri::from(pq)
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = if h2 { Version::HTTP_2 } else { Version::HTTP_11 };
    *req.headers_mut() = headers;
    req
}

/// The Host a request without one goes to a machine with: the authority of its URI (h2
/// clients send the app's name there, not in a Host header; the app still wants one), else the
/// machine's address (HTTP/1.0 clients may send neither).
pub(crate) fn upstream_host(parts: &http::request::Parts, addr: SocketAddr) -> Option<HeaderValue> {
    if let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::try_from(a.as_str())
    {
        return Some(v);
    }
    HeaderValue::try_from(machine_authority(addr)).ok()
}

/// A machine's address as a URI authority (`ip:port`, `[ip6]:port`).
fn machine_authority(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// `name`'s lines joined with `, ` and then `last`, or `None` when it has no (non-empty) line: a
/// client or proxy before the edge may have sent several.
fn append_to_list(h: &HeaderMap, name: &HeaderName, last: &str) -> Option<HeaderValue> {
    let mut joined = String::new();
    for v in h
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
    {
        if !v.is_empty() {
            joined.push_str(v);
            joined.push_str(", ");
        }
    }
    if joined.is_empty() {
        return None;
    }
    joined.push_str(last);
    HeaderValue::try_from(joined).ok()
}

/// A request as it goes to a machine: the client's head (with what replays changed), its body,
/// and the edge's own headers.
struct Outgoing<'a> {
    parts: &'a http::request::Parts,
    body: &'a mut ReqBody,
    own: &'a EdgeHeaders<'a>,
}

/// The request headers the edge sets ([`PROXY_REQUEST_HEADERS`], in that order), computed
/// once per request from the client's headers and connection, and kept apart from the request's
/// own headers: an HTTP/1.1 request to a machine gets them written straight into its head after
/// the client's headers (`h1.rs`), h2c and upgrades get them put into their copy of the headers
/// ([`EdgeHeaders::apply`]). Inserting them into the request's map instead (growing it, hashing
/// nine names) was a tenth of the edge's instructions per request.
pub(crate) struct EdgeHeaders<'a> {
    conn: &'a ConnInfo,
    rid: &'a RequestId,
    /// X-Forwarded-For and Via as the client sent them, the edge's value last; `None` when it
    /// sent none.
    xff: Option<HeaderValue>,
    via: Option<HeaderValue>,
    /// The edge's Via token: the protocol the client spoke to it (RFC 9110 §7.6.3).
    via_token: &'static str,
}

impl<'a> EdgeHeaders<'a> {
    /// The edge's headers for the request whose headers are `h` (which lose their hop-by-hop
    /// headers and the client's own copies of the edge's; X-Forwarded-For and Via are read
    /// first, as the edge's values extend them).
    fn take(h: &mut HeaderMap, conn: &'a ConnInfo, rid: &'a RequestId, version: Version) -> Self {
        strip_hop_by_hop(h, version == Version::HTTP_11);
        let via_token = match version {
            Version::HTTP_2 => "2 aloft",
            Version::HTTP_10 => "1.0 aloft",
            _ => "1.1 aloft",
        };
        let mut own = Self {
            conn,
            rid,
            xff: None,
            via: None,
            via_token,
        };
        if Self::any_in(h) {
            own.xff = conn
                .values
                .client_ip
                .to_str()
                .ok()
                .and_then(|ip| append_to_list(h, &names::X_FORWARDED_FOR, ip));
            own.via = append_to_list(h, &header::VIA, via_token);
            Self::remove_all(h);
        }
        own
    }

    /// Calls `f` with each header, name and value, in [`PROXY_REQUEST_HEADERS`]' order.
    fn each(&self, mut f: impl FnMut(HeaderName, &HeaderValue)) {
        let v = &self.conn.values;
        let (proto, ssl) = forwarded_proto_ssl(self.conn.https);
        f(names::FLY_CLIENT_IP, &v.client_ip);
        f(names::FLY_FORWARDED_PORT, &v.port);
        f(names::FLY_REGION, &v.region);
        f(names::X_FORWARDED_FOR, self.xff.as_ref().unwrap_or(&v.client_ip));
        f(names::X_FORWARDED_PROTO, &HeaderValue::from_static(proto));
        f(names::X_FORWARDED_PORT, &v.port);
        f(names::X_FORWARDED_SSL, &HeaderValue::from_static(ssl));
        match &self.via {
            Some(via) => f(header::VIA, via),
            None => f(header::VIA, &HeaderValue::from_static(self.via_token)),
        }
        f(names::FLY_REQUEST_ID, &self.rid.value());
    }

    /// Removes from `h` every header the edge sets.
    fn remove_from(h: &mut HeaderMap) {
        if Self::any_in(h) {
            Self::remove_all(h);
        }
    }

    /// Removes them by name (the lookups [`Self::any_in`] saves when there is none).
    fn remove_all(h: &mut HeaderMap) {
        for name in PROXY_REQUEST_HEADERS {
            h.remove(name);
        }
    }

    /// Whether `h` has any header the edge sets: one pass over the names, no hashing, so that
    /// the lookups happen only when it has (nearly never).
    fn any_in(h: &HeaderMap) -> bool {
        h.keys().any(|n| {
            // All nine start with f, v or x: most names are passed over on their first byte.
            matches!(n.as_str().as_bytes().first(), Some(b'f' | b'v' | b'x'))
                && PROXY_REQUEST_HEADERS.contains(&n.as_str())
        })
    }

    /// Puts them into `h` (a copy of the request's headers, for hyper's client).
    fn apply(&self, h: &mut HeaderMap) {
        h.reserve(PROXY_REQUEST_HEADERS.len());
        self.each(|name, value| {
            h.insert(name, value.clone());
        });
    }
}

impl crate::h1::ExtraFields for EdgeHeaders<'_> {
    /// As [`EdgeHeaders::each`] gives them, mostly from the connection's lines made once.
    fn write_to(&self, buf: &mut Vec<u8>) {
        let [fly, own_xff, forwarded] = &*self.conn.values.lines;
        buf.extend_from_slice(fly);
        match &self.xff {
            Some(xff) => crate::h1::write_field(buf, b"x-forwarded-for", xff.as_bytes()),
            None => buf.extend_from_slice(own_xff),
        }
        buf.extend_from_slice(forwarded);
        let via = self
            .via
            .as_ref()
            .map_or(self.via_token.as_bytes(), HeaderValue::as_bytes);
        crate::h1::write_field(buf, b"via", via);
        crate::h1::write_field(buf, b"fly-request-id", self.rid.as_bytes());
    }
}

/// `X-Forwarded-Proto` and `X-Forwarded-SSL` for a connection (over TLS or not).
fn forwarded_proto_ssl(https: bool) -> (&'static str, &'static str) {
    if https { ("https", "on") } else { ("http", "off") }
}

/// The response headers the edge adds (unless the service's port says `pristine`) and the
/// service's `response.headers` edits.
/// `version`: the protocol the machine answered in (the `Via` token names it).
fn add_response_headers(h: &mut HeaderMap, rid: &RequestId, service: &MachineService, version: Version) {
    if let Some(stamp) = Stamp::new(service, rid, version) {
        stamp.insert_into(h);
    }
    for rules in response_rules(service) {
        for (name, rule) in &rules.headers {
            let Ok(name) = HeaderName::try_from(name.as_str()) else {
                continue;
            };
            match rule {
                RuleValue::Bool(false) => {
                    h.remove(&name);
                }
                RuleValue::Bool(true) => {}
                RuleValue::One(v) => {
                    if let Ok(v) = HeaderValue::try_from(v.as_str()) {
                        h.insert(name, v);
                    }
                }
                RuleValue::Many(vs) => {
                    h.remove(&name);
                    for v in vs {
                        if let Ok(v) = HeaderValue::try_from(v.as_str()) {
                            h.append(name.clone(), v);
                        }
                    }
                }
            }
        }
    }
}

/// The fields the edge adds to a machine's answer, unless the service's port says `pristine`:
/// `Server`, `Via` (its token last) and `Fly-Request-Id`.
pub(crate) struct Stamp {
    via: &'static str,
    request_id: RequestId,
}

impl Stamp {
    /// The stamp for an answer in `version`; `None` when `pristine`.
    fn new(service: &MachineService, rid: &RequestId, version: Version) -> Option<Self> {
        let pristine = response_rules(service).find_map(|r| r.pristine).unwrap_or(false);
        (!pristine).then(|| Self {
            via: if version == Version::HTTP_2 {
                "2 aloft"
            } else {
                "1.1 aloft"
            },
            request_id: *rid,
        })
    }

    /// Writes the fields as lines, for an answer holding no `Server`, `Via` or
    /// `Fly-Request-Id` of its own.
    pub(crate) fn write(&self, buf: &mut Vec<u8>) {
        crate::h1::write_field(buf, b"server", b"aloft");
        crate::h1::write_field(buf, b"via", self.via.as_bytes());
        crate::h1::write_field(buf, b"fly-request-id", self.request_id.as_bytes());
    }

    /// Puts the fields into `h`, in place of those there, the machine's `Via` kept before the
    /// edge's token.
    pub(crate) fn insert_into(self, h: &mut HeaderMap) {
        h.insert(header::SERVER, HeaderValue::from_static("aloft"));
        let via = append_to_list(h, &header::VIA, self.via).unwrap_or(HeaderValue::from_static(self.via));
        h.insert(header::VIA, via);
        h.insert(names::FLY_REQUEST_ID, self.request_id.value());
    }
}

/// The `response` options of the service's ports.
fn response_rules(service: &MachineService) -> impl Iterator<Item = &aloft_api::HttpResponseOptions> {
    service
        .ports
        .iter()
        .filter_map(|p| p.http_options.as_ref()?.response.as_ref())
}

/// A machine's answer as the client gets it. Fields passed on in their wire form stay so,
/// stamped, unless the service edits the answer's headers.
fn finish_response(
    resp: Response<UpstreamBody>,
    plain: Option<PlainFields>,
    guard: LoadGuard,
    service: &MachineService,
    rid: &RequestId,
) -> Answer {
    let (mut parts, body) = resp.into_parts();
    let body = Guarded {
        inner: body,
        guard: Some(guard),
    }
    .boxed_unsync();
    let edits = response_rules(service).any(|r| !r.headers.is_empty());
    match plain {
        Some(plain) if !edits => {
            // The map holds only what the edge added (the replay cache's status).
            let stamp = Stamp::new(service, rid, parts.version);
            Answer {
                resp: Response::from_parts(parts, body),
                plain: Some(plain),
                stamp,
            }
        }
        plain => {
            if let Some(plain) = plain {
                // All of them: `add_response_headers` replaces the Server unless pristine.
                plain.append_to(&mut parts.headers, true);
            }
            strip_hop_by_hop(&mut parts.headers, false);
            add_response_headers(&mut parts.headers, rid, service, parts.version);
            Response::from_parts(parts, body).into()
        }
    }
}

/// A machine's answer body, holding the machine's unit of load until the last byte went out
/// (or the client went away).
struct Guarded {
    inner: UpstreamBody,
    guard: Option<LoadGuard>,
}

impl HttpBody for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match polled {
            Poll::Ready(None) => {
                self.guard = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                self.guard = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Methods a client expects to be safe to repeat (RFC 9110 §9.2.2).
fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::workers::TestWorkers;

    #[derive(Debug)]
    struct NoControl;

    impl crate::MachineControl for NoControl {
        fn start(&self, _: &str, _: &MachineId) -> crate::scale::ControlFuture {
            Box::pin(async { Ok(()) })
        }
        fn stop(&self, _: &str, _: &MachineId) -> crate::scale::ControlFuture {
            Box::pin(async { Ok(()) })
        }
        fn suspend(&self, _: &str, _: &MachineId) -> crate::scale::ControlFuture {
            Box::pin(async { Ok(()) })
        }
    }

    /// Every open client connection holds its task: what it may await that few connections
    /// need (TLS, HTTP/2, upgrades, h2c, waking a machine) is boxed, else each would hold room
    /// for it (a plain connection's task: 15.5 KB before, 6.5 KB after, release build).
    #[tokio::test]
    async fn a_plain_http1_connection_holds_a_small_task() {
        let edge = Edge::new(
            EdgeConfig::new("test"),
            Arc::new(NoControl),
            Arc::new(crate::DirectDialer),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let task = edge
            .clone()
            .serve_client(stream, listener.local_addr().unwrap(), 80, false);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 10 * 1024, "a connection's task takes {size} bytes");
    }

    #[test]
    fn request_ids_made_on_different_workers_never_collide() {
        let workers = TestWorkers::start(2, "test-ids");
        let ids = |worker: usize| {
            workers.run(worker, async {
                (0..1000).map(|_| request_seq()).collect::<Vec<_>>()
            })
        };
        let mut all: HashSet<u64> = ids(0).into_iter().collect();
        all.extend(ids(1));
        all.extend((0..1000).map(|_| request_seq()));
        assert_eq!(all.len(), 3000);
        let id = RequestId::new("ams", Instant::now());
        assert!(id.ends_with("-ams") && id.len() == 24, "{}", &*id);
        assert_eq!(id.value(), &*id);
        let long = RequestId::new(&"r".repeat(100), Instant::now());
        assert_eq!(long.len(), 21 + 63, "a region name is cut at 63 bytes");
    }

    #[test]
    fn the_edges_request_headers_are_written_as_they_are_put_in_a_map() {
        let config = EdgeConfig::new("ams");
        let peer: SocketAddr = "10.1.2.3:5555".parse().unwrap();
        let rid = RequestId::new("ams", Instant::now());
        for https in [false, true] {
            let conn = ConnInfo::new(&config, peer, 443, https, None);
            for client in [&[][..], &[("x-forwarded-for", "9.9.9.9"), ("via", "1.0 cdn")][..]] {
                let mut h = HeaderMap::new();
                for (n, v) in client {
                    h.insert(*n, HeaderValue::from_static(v));
                }
                let own = EdgeHeaders::take(&mut h, &conn, &rid, Version::HTTP_11);
                let mut written = Vec::new();
                crate::h1::ExtraFields::write_to(&own, &mut written);
                let mut each = Vec::new();
                own.each(|n, v| crate::h1::write_field(&mut each, n.as_str().as_bytes(), v.as_bytes()));
                assert_eq!(
                    String::from_utf8(written).unwrap(),
                    String::from_utf8(each).unwrap()
                );
                let mut map = HeaderMap::new();
                own.apply(&mut map);
                assert_eq!(map.len(), PROXY_REQUEST_HEADERS.len());
                assert_eq!(map["x-forwarded-proto"], if https { "https" } else { "http" });
                let (xff, via) = if client.is_empty() {
                    ("10.1.2.3", "1.1 aloft")
                } else {
                    ("9.9.9.9, 10.1.2.3", "1.0 cdn, 1.1 aloft")
                };
                assert_eq!(map["x-forwarded-for"], xff);
                assert_eq!(map["via"], via);
                assert_eq!(map["fly-client-ip"], "10.1.2.3");
            }
        }
    }

    #[test]
    fn request_ids_tell_the_wall_clock_time_from_one_read_a_second() {
        let wall = || {
            let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
            u64::try_from(d.as_millis()).unwrap()
        };
        let before = Instant::now();
        std::thread::sleep(Duration::from_millis(5));
        let first = Instant::now();
        // Bounds wide enough for a loaded host: a wrong clock is off by far more.
        let ms = epoch_ms(first);
        assert!(ms.abs_diff(wall()) < 1000, "{ms} is not now");
        std::thread::sleep(Duration::from_millis(30));
        let later = epoch_ms(Instant::now());
        assert!((30..5000).contains(&(later - ms)), "{later} - {ms}");
        // A moment before the base is read from the wall clock again (as is one a second on).
        let earlier = epoch_ms(before);
        assert!(earlier.abs_diff(wall()) < 1000);
        let id = RequestId::new("ams", Instant::now());
        let id_ms = u64::from_str_radix(&id[..12], 16).unwrap();
        assert!(id_ms.abs_diff(wall()) < 1000, "{}", &*id);
    }
}
