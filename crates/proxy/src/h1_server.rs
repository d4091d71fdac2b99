//! The edge's HTTP/1.x server: reads requests from a client connection, hands each to a
//! [`Service`] and writes its answer, one request at a time (pipelined requests wait in the read
//! buffer). hyper's server did the same through a general dispatcher, a body channel per
//! request and a buffered writer of its own: about a third of the edge's instructions per
//! request (`docs/perf.md`). HTTP/2 stays on hyper: a connection that opens with HTTP/2's
//! preface is handed back ([`Ended::H2`]) with what was read of it.
//!
//! Requests (RFC 9112):
//! - A head must arrive whole within the head timeout from when the server started waiting for
//!   it: the first from the connection's start, the next from the end of the answer before (an
//!   idle keep-alive connection is closed after it too). Past it the connection is closed
//!   without an answer. A head larger than the limit, or of more than 100 header lines, gets
//!   431; a malformed one 400; an HTTP version other than 1.x 505. Each closes the connection.
//! - Body framing: `Transfer-Encoding` whose last coding is `chunked`; a `Transfer-Encoding`
//!   with a `Content-Length`, in HTTP/1.0, or ending in another coding is refused (400: a
//!   smuggling attempt, or a body that cannot be framed). Else a valid `Content-Length`
//!   (differing values: 400), else no body.
//! - A body read whole with its head is handed over as one piece. Others stream through a slot
//!   of one frame, read from the connection only as the service takes them. `Expect:
//!   100-continue` gets its `100 Continue` at once when the body did not come with the head
//!   (as nginx sends it).
//! - While the service works, the connection is watched: a client that closes it (even only its
//!   sending side: HTTP/1 half-close is not supported, as in hyper's default) cancels the
//!   request: the service's future is dropped (a queued request leaves its queue, a machine's
//!   exchange is abandoned). Watching costs no syscall when the last read emptied the socket.
//!
//! Answers:
//! - Framing: none for HEAD, 1xx, 204 and 304 (a HEAD's or 304's `Content-Length` passed on as
//!   is, a HEAD's without one given its body's length); else the answer's own `Content-Length`, else its body's exact length, else chunked
//!   to an HTTP/1.1 client or until close to an HTTP/1.0 one. Trailers are written when the
//!   body is chunked and the request said `TE: trailers`, else dropped.
//! - `Date` is added when missing (formatted once a second per thread); `Connection: close` when
//!   the connection closes after the answer, `Connection: keep-alive` to an HTTP/1.0 client
//!   that keeps it.
//! - The head goes out with the body's first frame in one write when that frame is ready.
//! - A body that fails, or ends short of its length, closes the connection without ending the
//!   answer: the client sees it cut, never complete.
//! - Upgrades: a `101` answer to an upgrade request carrying a [`TunnelSlot`] is written, then
//!   the connection is joined to the tunnel's other end (what the client sent early goes
//!   first). Any other `101` closes the connection.
//!
//! The connection stays open for another request when both sides want it, the answer was
//! written whole, and the request body was read to its end (a body the service left unread is
//! drained, up to 256 KiB within a second). Closing after an error, or with input unread, shuts
//! the sending side and reads (and drops) what the client still sends for up to a second, so
//! that the answer is not lost to a reset.

use std::future::{Future, poll_fn};
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use http::header;
use http::{Method, Request, Response, StatusCode, Uri, Version, request};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::h1::{
    self, BodyFraming, BodyStep, ChunkedDecoder, Framing, FramingHeaders, Out, PlainFields, Sending,
};
use http_body_util::Full;

use crate::http::{Body, BoxError, RequestBody, Stamp};

/// HTTP/2's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The most of an unread request body drained to keep the connection.
const DRAIN_MAX: u64 = 256 * 1024;
/// How long a closing connection drains what the client still sends; and an unread body.
const LINGER: Duration = Duration::from_secs(1);

/// What answers requests.
pub(crate) trait Service {
    fn call(&self, req: Request<RequestBody>) -> impl Future<Output = Answer> + Send + '_;
}

/// A service's answer: a response, and maybe header fields a machine wrote, passed on in their
/// wire form, with the edge's stamp (written in that order, before the response's own
/// headers, which hold none of them).
pub(crate) struct Answer {
    pub(crate) resp: Response<Body>,
    pub(crate) plain: Option<PlainFields>,
    pub(crate) stamp: Option<Stamp>,
}

impl From<Response<Body>> for Answer {
    fn from(resp: Response<Body>) -> Self {
        Self {
            resp,
            plain: None,
            stamp: None,
        }
    }
}

impl Answer {
    pub(crate) fn status(&self) -> StatusCode {
        self.resp.status()
    }

    /// The answer as one response, its plain fields among its headers (for hyper's server).
    pub(crate) fn into_response(self) -> Response<Body> {
        let Self {
            mut resp,
            plain,
            stamp,
        } = self;
        if let Some(plain) = plain {
            // The machine's Server, unless the edge's replaces it.
            plain.append_to(resp.headers_mut(), stamp.is_none());
        }
        if let Some(stamp) = stamp {
            stamp.insert_into(resp.headers_mut());
        }
        resp
    }
}

/// The server's limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// How long a request head may take to arrive.
    pub(crate) head_timeout: Duration,
    /// The largest request head accepted.
    pub(crate) max_head: usize,
}

/// How serving a connection ended.
#[derive(Debug)]
pub(crate) enum Ended<I> {
    /// The connection is done with (closed, or handed to a tunnel that ended).
    Done,
    /// The client speaks HTTP/2: `io`, of which `read` was read already.
    H2(Rewind<I>),
}

/// The other end of an upgraded connection, which the service puts (in a [`TunnelSlot`]) into
/// the extensions of its `101` answer.
pub(crate) struct Tunnel {
    pub(crate) other: hyper::upgrade::OnUpgrade,
    /// Held until the tunnel closes (the machine's unit of load).
    pub(crate) hold: Box<dyn Send + Sync>,
}

/// A [`Tunnel`] in a form response extensions take (they must be `Clone`).
#[derive(Clone)]
pub(crate) struct TunnelSlot(Arc<Mutex<Option<Tunnel>>>);

impl TunnelSlot {
    pub(crate) fn new(tunnel: Tunnel) -> Self {
        Self(Arc::new(Mutex::new(Some(tunnel))))
    }

    fn take(&self) -> Option<Tunnel> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// Serves HTTP/1.x requests on `io` with `service` until the connection closes, or hands it back
/// when it opens with HTTP/2's preface.
pub(crate) async fn serve<I, S>(io: I, limits: Limits, service: &S) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service,
{
    let mut conn = Conn {
        io,
        rbuf: BytesMut::new(),
        read_size: h1::READ_MIN,
        out: Out::default(),
        spans: Vec::new(),
        limits,
        timer: Box::pin(tokio::time::sleep(limits.head_timeout)),
    };
    let mut first = true;
    loop {
        // Set when the head is first waited for: a head already read costs no clock read.
        let mut deadline = None;
        let next = poll_fn(|cx| conn.poll_head(cx, first, &mut deadline)).await;
        first = false;
        let head = match next {
            Next::Request(head) => head,
            Next::H2 => {
                return Ended::H2(Rewind {
                    read: conn.rbuf.freeze(),
                    io: conn.io,
                });
            }
            Next::Closed => return Ended::Done,
            Next::Reject(status) => {
                conn.reject(status).await;
                return Ended::Done;
            }
        };
        match conn.exchange(head, service).await {
            After::Next => {}
            After::Close { linger } => {
                conn.close(linger).await;
                return Ended::Done;
            }
            After::Tunnel(tunnel) => {
                conn.tunnel(tunnel).await;
                return Ended::Done;
            }
        }
    }
}

/// A client connection.
struct Conn<I> {
    io: I,
    /// Bytes read and not used yet.
    rbuf: BytesMut,
    read_size: usize,
    out: Out,
    /// Scratch room for parsing heads.
    spans: Vec<[usize; 4]>,
    limits: Limits,
    /// Wakes the connection at the head deadline: re-armed only when it fires early (deadlines
    /// only move later), not for every request.
    timer: Pin<Box<Sleep>>,
}

/// What waiting for a request head gave.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per request, by value; boxing the head would allocate for each"
)]
enum Next {
    Request(Head),
    H2,
    /// Closed by the client, failed, or timed out.
    Closed,
    /// Answered with this status, then closed.
    Reject(StatusCode),
}

/// What follows an exchange.
enum After {
    Next,
    Close { linger: bool },
    Tunnel(Tunnel),
}

/// A request head and what it says about the exchange.
#[derive(Debug)]
struct Head {
    parts: request::Parts,
    /// How its body is framed: `Empty`, `Length` or `Chunked`.
    body: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    te_trailers: bool,
}

/// The client went away (or broke the protocol): the connection closes.
struct Gone;

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        h1::poll_read_buf(cx, &mut self.io, &mut self.rbuf, &mut self.read_size)
    }

    fn poll_head(&mut self, cx: &mut Context<'_>, first: bool, deadline: &mut Option<Instant>) -> Poll<Next> {
        loop {
            let sniffing = first && PREFACE.starts_with(&self.rbuf[..self.rbuf.len().min(PREFACE.len())]);
            if sniffing && self.rbuf.len() >= PREFACE.len() {
                return Poll::Ready(Next::H2);
            }
            if !sniffing {
                match parse_request(&mut self.rbuf, &mut self.spans, self.limits.max_head) {
                    Ok(Some(head)) => return Poll::Ready(Next::Request(head)),
                    Ok(None) => {}
                    Err(status) => return Poll::Ready(Next::Reject(status)),
                }
            }
            match self.poll_read(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Next::Closed),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + self.limits.head_timeout);
            if self.timer.deadline() > deadline {
                self.timer.as_mut().reset(deadline);
            }
            loop {
                ready!(self.timer.as_mut().poll(cx));
                if Instant::now() >= deadline {
                    return Poll::Ready(Next::Closed);
                }
                self.timer.as_mut().reset(deadline);
            }
        }
    }

    /// Answers `status` with an empty body, and closes.
    async fn reject(&mut self, status: StatusCode) {
        self.out.reset();
        let buf = &mut self.out.buf;
        status_line(buf, status, None);
        buf.extend_from_slice(b"content-length: 0\r\nconnection: close\r\n");
        write_date(buf);
        buf.extend_from_slice(b"\r\n");
        let _ = tokio::time::timeout(LINGER, poll_fn(|cx| self.out.poll_flush(cx, &mut self.io))).await;
        self.close(true).await;
    }

    /// Shuts the connection's sending side, and with `linger` drops what the client still sends
    /// for a while (so that what was written is not lost to a reset).
    async fn close(&mut self, linger: bool) {
        let _ = tokio::time::timeout(LINGER, self.io.shutdown()).await;
        if !linger {
            return;
        }
        let mut dropped = 0u64;
        let _ = tokio::time::timeout(
            LINGER,
            poll_fn(|cx| {
                loop {
                    self.rbuf.clear();
                    match ready!(self.poll_read(cx)) {
                        Ok(n) if n > 0 && dropped < DRAIN_MAX => dropped += n as u64,
                        _ => return Poll::Ready(()),
                    }
                }
            }),
        )
        .await;
    }

    /// Joins the connection to the tunnel's other end.
    async fn tunnel(&mut self, tunnel: Tunnel) {
        let Tunnel { other, hold } = tunnel;
        let Ok(upgraded) = other.await else { return };
        let mut other = TokioIo::new(upgraded);
        if !self.rbuf.is_empty() {
            let early = self.rbuf.split().freeze();
            if other.write_all(&early).await.is_err() {
                return;
            }
        }
        let _ = tokio::io::copy_bidirectional(&mut self.io, &mut other).await;
        drop(hold);
    }

    /// One request and its answer.
    async fn exchange<S: Service>(&mut self, head: Head, service: &S) -> After {
        let Head {
            parts,
            body: framing,
            mut keep_alive,
            expect_continue,
            upgrade,
            te_trailers,
        } = head;
        let version = parts.version;
        let head_request = parts.method == Method::HEAD;
        self.out.reset();
        let mut pump: Option<Pump> = None;
        // A body that came whole with the head is handed over as it is; others stream.
        let len = match framing {
            Framing::Length(n) => Some(n),
            _ => None,
        };
        let whole = len.and_then(|n| usize::try_from(n).ok().filter(|&n| n <= self.rbuf.len()));
        let body = if let Some(n) = whole {
            RequestBody::Full(Full::new(self.rbuf.split_to(n).freeze()))
        } else if framing.is_end_stream() {
            RequestBody::Empty
        } else {
            let (feeder, streamed) = streamed(len);
            pump = Some(Pump::new(framing, feeder));
            RequestBody::H1(streamed)
        };
        if expect_continue && pump.is_some() && version == Version::HTTP_11 {
            self.out.buf.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let mut answer = pin!(service.call(Request::from_parts(parts, body)));
        // The answer first, the client only while it is awaited: most requests then watch the
        // client once (each look registers with the reactor).
        let resp = poll_fn(|cx| {
            if !self.out.is_empty() && matches!(self.out.poll_flush(cx, &mut self.io), Poll::Ready(Err(_))) {
                return Poll::Ready(None);
            }
            if let Poll::Ready(resp) = answer.as_mut().poll(cx) {
                return Poll::Ready(Some(resp));
            }
            if self.poll_client(cx, &mut pump).is_err() {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        let Some(Answer { resp, plain, stamp }) = resp else {
            return After::Close { linger: false };
        };
        // A `100 Continue` the socket did not take whole yet goes out first: cut, it would
        // garble the answer.
        if !self.out.is_empty() && poll_fn(|cx| self.out.poll_flush(cx, &mut self.io)).await.is_err() {
            return After::Close { linger: false };
        }
        let (rparts, rbody) = resp.into_parts();
        let mut tunnel = None;
        if rparts.status == StatusCode::SWITCHING_PROTOCOLS {
            tunnel = upgrade
                .then(|| rparts.extensions.get::<TunnelSlot>().and_then(TunnelSlot::take))
                .flatten();
            if tunnel.is_none() {
                return After::Close { linger: true };
            }
        }
        self.out.reset();
        let asked = Asked {
            version,
            head_request,
        };
        let framing = encode_answer(
            &mut self.out.buf,
            &rparts,
            (plain.as_ref(), stamp.as_ref()),
            &rbody,
            asked,
            &mut keep_alive,
        );
        let mut sending = (framing != BodyFraming::None).then(|| Sending {
            body: rbody,
            framing,
            trailers: te_trailers,
        });
        let written = poll_fn(|cx| {
            if let Poll::Ready(sent) = self.out.poll_send(cx, &mut self.io, &mut sending) {
                return Poll::Ready(sent.is_ok());
            }
            if self.poll_client(cx, &mut pump).is_err() {
                return Poll::Ready(false);
            }
            Poll::Pending
        })
        .await;
        if !written {
            return After::Close { linger: false };
        }
        if let Some(tunnel) = tunnel {
            return After::Tunnel(tunnel);
        }
        if let Some(p) = &mut pump
            && !p.done()
        {
            // The service left (some of) the body unread: drained, within bounds, to keep the
            // connection.
            p.feed = Feed::Drain(DRAIN_MAX);
            let drained = tokio::time::timeout(
                LINGER,
                poll_fn(|cx| match self.poll_pump(cx, p) {
                    Err(Gone) => Poll::Ready(false),
                    Ok(()) if p.done() => Poll::Ready(true),
                    Ok(()) => Poll::Pending,
                }),
            )
            .await;
            if drained != Ok(true) {
                return After::Close { linger: true };
            }
        }
        if keep_alive {
            After::Next
        } else {
            After::Close {
                linger: !self.rbuf.is_empty(),
            }
        }
    }

    /// Moves the request body along (as far as the service takes it), else watches for the
    /// client closing the connection. `Err`: it did, or broke the body's framing.
    fn poll_client(&mut self, cx: &mut Context<'_>, pump: &mut Option<Pump>) -> Result<(), Gone> {
        if let Some(p) = pump
            && !p.done()
            && !matches!(p.feed, Feed::Idle)
        {
            self.poll_pump(cx, p)?;
            if !p.done() && !matches!(p.feed, Feed::Idle) {
                return Ok(());
            }
        }
        // Reads what the client sends next (a pipelined request, held up to the head limit),
        // to see it close.
        while self.rbuf.len() < self.limits.max_head {
            match self.poll_read(cx) {
                Poll::Ready(Ok(0) | Err(_)) => return Err(Gone),
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        Ok(())
    }

    /// Reads the request body into its slot while the slot has room (or drops it, draining).
    fn poll_pump(&mut self, cx: &mut Context<'_>, p: &mut Pump) -> Result<(), Gone> {
        loop {
            if p.done() {
                return Ok(());
            }
            match &p.feed {
                Feed::To(feeder) => match feeder.poll_room(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(false) => {
                        p.feed = Feed::Idle;
                        return Ok(());
                    }
                    Poll::Ready(true) => {}
                },
                Feed::Idle => return Ok(()),
                Feed::Drain(_) => {}
            }
            match p.framing.next(&mut self.rbuf) {
                Ok(BodyStep::Frame(frame)) => p.deliver(frame)?,
                Ok(BodyStep::End) => {}
                Ok(BodyStep::More) => match self.poll_read(cx) {
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Ok(0) | Err(_)) => {
                        p.fail("the client closed the connection before its request body was complete");
                        return Err(Gone);
                    }
                    Poll::Ready(Ok(_)) => {}
                },
                Err(_) => {
                    p.fail("the request's chunked body is malformed");
                    return Err(Gone);
                }
            }
            if p.done() {
                p.finish();
                return Ok(());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request heads.

/// Parses a request head from the front of `buf`, taking it out; `None`: not complete yet.
/// `Err`: the status to refuse it with.
fn parse_request(
    buf: &mut BytesMut,
    spans: &mut Vec<[usize; 4]>,
    max_head: usize,
) -> Result<Option<Head>, StatusCode> {
    if buf.is_empty() {
        return Ok(None);
    }
    spans.clear();
    let (len, method, target, minor) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; h1::MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed =
            httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut headers);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= max_head => {
                return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            Err(httparse::Error::Version) if names_another_version(buf) => {
                return Err(StatusCode::HTTP_VERSION_NOT_SUPPORTED);
            }
            Err(_) => return Err(StatusCode::BAD_REQUEST),
        };
        if len > max_head {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        let base = buf.as_ptr() as usize;
        let span = |s: &str| {
            let at = s.as_ptr() as usize - base;
            (at, at + s.len())
        };
        spans.extend(req.headers.iter().map(|h| {
            let n = h.name.as_ptr() as usize - base;
            let v = h.value.as_ptr() as usize - base;
            [n, n + h.name.len(), v, v + h.value.len()]
        }));
        let (Some(method), Some(path), Some(minor)) = (req.method, req.path, req.version) else {
            return Err(StatusCode::BAD_REQUEST);
        };
        (len, span(method), span(path), minor)
    };
    let head = buf.split_to(len).freeze();
    let bad = StatusCode::BAD_REQUEST;
    let method = Method::from_bytes(&head[method.0..method.1]).map_err(|_| bad)?;
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1)).map_err(|_| bad)?;
    let (headers, seen) = h1::fields_of(&head, spans).map_err(|_| bad)?;
    let version = if minor == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let body = request_framing(version, &seen).ok_or(bad)?;
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Head {
        parts,
        body,
        keep_alive: match version {
            Version::HTTP_11 => !seen.close,
            _ => seen.keep_alive && !seen.close,
        },
        expect_continue: seen.expect_continue,
        upgrade: version == Version::HTTP_11 && seen.upgrade == (true, true),
        te_trailers: seen.te_trailers,
    }))
}

/// Whether the request line (cut at its end or at the buffer's) ends in `HTTP/<d>.<d>`: a
/// version the server doesn't speak, rather than something that isn't HTTP.
fn names_another_version(buf: &[u8]) -> bool {
    let line = buf
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .trim_ascii_end();
    let Some(version) = line.rsplit(|&b| b == b' ').next() else {
        return false;
    };
    matches!(version, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// How a request's body is framed (RFC 9112 §6.3); `None`: it can't be, or must not be.
fn request_framing(version: Version, seen: &FramingHeaders) -> Option<Framing> {
    if seen.te {
        let ok = version == Version::HTTP_11 && seen.len == Ok(None) && seen.chunked;
        return ok.then(|| Framing::Chunked(ChunkedDecoder::default()));
    }
    match seen.len {
        Ok(None | Some(0)) => Some(Framing::Empty),
        Ok(Some(n)) => Some(Framing::Length(n)),
        Err(()) => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Answer heads.

/// What the request said that shapes its answer.
#[derive(Debug, Clone, Copy)]
struct Asked {
    version: Version,
    head_request: bool,
}

fn status_line(buf: &mut Vec<u8>, status: StatusCode, reason: Option<&[u8]>) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(
        reason
            .or_else(|| status.canonical_reason().map(str::as_bytes))
            .unwrap_or_default(),
    );
    buf.extend_from_slice(b"\r\n");
}

/// Writes the answer's head (`plain`'s fields and the stamp first) into `buf` and says how its
/// body goes; `keep_alive` (whether the connection is kept after it) is cleared when the answer
/// can't allow it.
fn encode_answer(
    buf: &mut Vec<u8>,
    parts: &http::response::Parts,
    (plain, stamp): (Option<&PlainFields>, Option<&Stamp>),
    body: &Body,
    asked: Asked,
    keep_alive: &mut bool,
) -> BodyFraming {
    let status = parts.status;
    let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>();
    status_line(buf, status, reason.map(hyper::ext::ReasonPhrase::as_bytes));
    let code = status.as_u16();
    let informational = status.is_informational();
    let bodiless = asked.head_request || informational || code == 204 || code == 304;
    let mut seen = FramingHeaders::default();
    let mut date = false;
    if let Some(plain) = plain {
        // The machine's Server, unless the edge's replaces it.
        plain.write(buf, stamp.is_none());
        seen.len = Ok(plain.length);
        date = plain.date;
    }
    if let Some(stamp) = stamp {
        stamp.write(buf);
    }
    for (name, value) in &parts.headers {
        // A 101's Connection and Upgrade say what the connection becomes: written as they are.
        // Framing and persistence headers are noted, and written below as the edge frames it.
        if !informational && seen.note(name, value.as_bytes()).is_some() {
            continue;
        }
        date |= name == header::DATE;
        h1::write_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    if seen.close {
        *keep_alive = false;
    }
    let given = seen.len.ok().flatten();
    let framing = if bodiless {
        // A HEAD's answer says what a GET's would (its own body's length when it has no
        // header); a 304's only what it was given; 1xx and 204 nothing.
        let len = match code {
            _ if informational || code == 204 => None,
            _ if asked.head_request => given.or(body.size_hint().exact()),
            _ => given,
        };
        if let Some(n) = len {
            write_length(buf, n);
        }
        BodyFraming::None
    } else if let Some(n) = given.or(body.size_hint().exact()) {
        write_length(buf, n);
        BodyFraming::Length(n)
    } else if asked.version == Version::HTTP_11 {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        BodyFraming::Chunked
    } else {
        *keep_alive = false;
        BodyFraming::Close
    };
    if !informational {
        if !*keep_alive {
            buf.extend_from_slice(b"connection: close\r\n");
        } else if asked.version == Version::HTTP_10 {
            buf.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !date {
        write_date(buf);
    }
    buf.extend_from_slice(b"\r\n");
    framing
}

fn write_length(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(b"content-length: ");
    h1::write_dec(buf, n);
    buf.extend_from_slice(b"\r\n");
}

thread_local! {
    /// This second's `date: …` line, and the second.
    static DATE: std::cell::RefCell<(u64, Vec<u8>)> = const { std::cell::RefCell::new((u64::MAX, Vec::new())) };
}

/// Writes a `date` header line for now.
fn write_date(buf: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != secs {
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
            *at = secs;
        }
        buf.extend_from_slice(line);
    });
}

// ---------------------------------------------------------------------------------------------
// Streamed request bodies.

/// Where the pump puts what it reads.
enum Feed {
    /// Into the request's body.
    To(Feeder),
    /// Nowhere for now: the service dropped the body.
    Idle,
    /// Dropped, up to this many more bytes.
    Drain(u64),
}

/// Reads a request body from the connection as the service takes it.
struct Pump {
    /// How the body is framed, and how much of it is left.
    framing: Framing,
    feed: Feed,
}

impl Pump {
    fn new(framing: Framing, feeder: Feeder) -> Self {
        Self {
            framing,
            feed: Feed::To(feeder),
        }
    }

    /// The body was read to its end.
    fn done(&self) -> bool {
        self.framing.is_end_stream()
    }

    fn deliver(&mut self, frame: Frame<Bytes>) -> Result<(), Gone> {
        match &mut self.feed {
            Feed::To(feeder) => feeder.send(frame),
            Feed::Idle => {}
            Feed::Drain(left) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                *left = left.checked_sub(n).ok_or(Gone)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self) {
        if let Feed::To(feeder) = &self.feed {
            feeder.end();
        }
    }

    fn fail(&mut self, why: &'static str) {
        if let Feed::To(feeder) = &self.feed {
            feeder.fail(why);
        }
    }
}

/// The slot a streamed request body passes through: one frame at a time.
#[derive(Default)]
struct Slot {
    frame: Option<Frame<Bytes>>,
    end: bool,
    failed: Option<&'static str>,
    /// The body was dropped.
    gone: bool,
    /// Who waits for a frame, and who for room.
    taker: Option<Waker>,
    feeder: Option<Waker>,
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

fn wait(at: &mut Option<Waker>, cx: &Context<'_>) {
    match at {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *at = Some(cx.waker().clone()),
    }
}

/// A request body read from an HTTP/1 connection as it is taken.
pub(crate) struct Streamed {
    slot: Arc<Mutex<Slot>>,
    /// Bytes still to come, when the length is known.
    left: Option<u64>,
    done: bool,
}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

/// The pump's side of a [`Streamed`] body.
struct Feeder {
    slot: Arc<Mutex<Slot>>,
}

fn streamed(len: Option<u64>) -> (Feeder, Streamed) {
    let slot = Arc::new(Mutex::new(Slot::default()));
    (
        Feeder { slot: slot.clone() },
        Streamed {
            slot,
            left: len,
            done: false,
        },
    )
}

impl Feeder {
    /// Whether the slot has room (`Ready(false)`: the body was dropped).
    fn poll_room(&self, cx: &Context<'_>) -> Poll<bool> {
        let mut s = lock(&self.slot);
        if s.gone {
            return Poll::Ready(false);
        }
        if s.frame.is_some() {
            wait(&mut s.feeder, cx);
            return Poll::Pending;
        }
        Poll::Ready(true)
    }

    fn send(&self, frame: Frame<Bytes>) {
        let mut s = lock(&self.slot);
        s.frame = Some(frame);
        if let Some(w) = s.taker.take() {
            w.wake();
        }
    }

    fn end(&self) {
        let mut s = lock(&self.slot);
        s.end = true;
        if let Some(w) = s.taker.take() {
            w.wake();
        }
    }

    fn fail(&self, why: &'static str) {
        let mut s = lock(&self.slot);
        s.failed.get_or_insert(why);
        if let Some(w) = s.taker.take() {
            w.wake();
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        if !lock(&self.slot).end {
            self.fail("the edge stopped reading the request body");
        }
    }
}

impl Drop for Streamed {
    fn drop(&mut self) {
        let mut s = lock(&self.slot);
        s.gone = true;
        if let Some(w) = s.feeder.take() {
            w.wake();
        }
    }
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let mut s = lock(&self.slot);
        if let Some(frame) = s.frame.take() {
            if let Some(w) = s.feeder.take() {
                w.wake();
            }
            drop(s);
            if let (Some(left), Some(d)) = (&mut self.left, frame.data_ref()) {
                *left = left.saturating_sub(d.len() as u64);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(why) = s.failed {
            drop(s);
            self.done = true;
            return Poll::Ready(Some(Err(why.into())));
        }
        if s.end {
            drop(s);
            self.done = true;
            return Poll::Ready(None);
        }
        wait(&mut s.taker, cx);
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.left == Some(0)
    }

    fn size_hint(&self) -> SizeHint {
        self.left.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP/2 hand-off.

/// A connection of which `read` was read already: reads give that first.
#[derive(Debug)]
pub(crate) struct Rewind<I> {
    read: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, Ordering};

    use http::HeaderMap;
    use http_body_util::BodyExt as _;
    use tokio::io::{AsyncReadExt as _, DuplexStream};

    use super::*;

    /// A body of the given frames, of unknown length.
    struct Frames(VecDeque<Frame<Bytes>>);

    impl HttpBody for Frames {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }

    /// Echoes what it was asked, as its path says: `/` reads the body and tells what came;
    /// `/ignore` answers without reading it; `/stream` answers with a body of unknown length
    /// (and trailers); `/short` with a body shorter than its `Content-Length`; `/pending` never
    /// answers, and notes that it was dropped.
    #[derive(Default)]
    struct Echo {
        dropped: Arc<AtomicBool>,
    }

    struct NoteDrop(Arc<AtomicBool>);

    impl Drop for NoteDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl Service for Echo {
        async fn call(&self, req: Request<RequestBody>) -> Answer {
            self.answer(req).await.into()
        }
    }

    impl Echo {
        async fn answer(&self, req: Request<RequestBody>) -> Response<Body> {
            let (parts, body) = req.into_parts();
            let text = |t: String| Response::new(crate::http::full(t));
            match parts.uri.path() {
                "/ignore" => text("ignored".into()),
                "/stream" => {
                    let mut trailers = HeaderMap::new();
                    trailers.insert("x-sum", http::HeaderValue::from_static("42"));
                    let frames = [
                        Frame::data(Bytes::from("ab")),
                        Frame::data(Bytes::from("cd")),
                        Frame::trailers(trailers),
                    ];
                    Response::new(Frames(frames.into()).boxed_unsync())
                }
                "/short" => {
                    let mut r = text("12345".into());
                    r.headers_mut()
                        .insert(header::CONTENT_LENGTH, http::HeaderValue::from_static("10"));
                    r
                }
                "/pending" => {
                    let _note = NoteDrop(self.dropped.clone());
                    std::future::pending::<()>().await;
                    text(String::new())
                }
                _ => match body.collect().await {
                    Ok(c) => {
                        let trailers = c
                            .trailers()
                            .map(|t| format!(" trailers={t:?}"))
                            .unwrap_or_default();
                        let body = String::from_utf8_lossy(&c.to_bytes()).into_owned();
                        text(format!(
                            "{} {} {:?} body={body}{trailers}",
                            parts.method, parts.uri, parts.version
                        ))
                    }
                    Err(e) => {
                        let mut r = text(format!("body failed: {e}"));
                        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                        r
                    }
                },
            }
        }
    }

    const LIMITS: Limits = Limits {
        head_timeout: Duration::from_millis(300),
        max_head: 8192,
    };

    /// A server on one end of a pipe, with `svc`; the client's end.
    fn start(svc: Echo) -> DuplexStream {
        let (client, server) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let _ = serve(server, LIMITS, &svc).await;
        });
        client
    }

    /// What the server wrote until it closed (or `within` passed).
    async fn read_all(client: &mut DuplexStream, within: Duration) -> String {
        let mut all = Vec::new();
        let _ = tokio::time::timeout(within, client.read_to_end(&mut all)).await;
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Sends `raw` and reads all the server writes until it closes.
    async fn exchange(raw: &[u8]) -> String {
        let mut client = start(Echo::default());
        client.write_all(raw).await.unwrap();
        read_all(&mut client, Duration::from_secs(5)).await
    }

    /// Reads until `want` was seen (or a second passed): what came.
    async fn read_until(client: &mut DuplexStream, want: &str) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(2);
        while !String::from_utf8_lossy(&got).contains(want) {
            let Ok(Ok(n)) = tokio::time::timeout_at(deadline, client.read(&mut buf)).await else {
                break;
            };
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// The heads parsed from `pieces` fed one after another (each parse taking what it used).
    fn heads(pieces: &[&[u8]]) -> Result<Vec<String>, StatusCode> {
        let (mut buf, mut spans, mut out) = (BytesMut::new(), Vec::new(), Vec::new());
        for piece in pieces {
            buf.extend_from_slice(piece);
            while let Some(h) = parse_request(&mut buf, &mut spans, 8192)? {
                out.push(format!(
                    "{} {} {:?} {:?} {:?} keep-alive={}",
                    h.parts.method, h.parts.uri, h.parts.version, h.parts.headers, h.body, h.keep_alive
                ));
            }
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    #[test]
    fn heads_parse_the_same_whatever_the_split() {
        let raw: &[u8] = b"GET /a?x=1 HTTP/1.1\r\nHost: a.localhost\r\nX-Many: 1\r\nX-Many: 2\r\n\r\n\
            \r\nHEAD http://b.localhost/b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n\
            OPTIONS * HTTP/1.1\r\nHost: c\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        let whole = heads(&[raw]).unwrap();
        assert_eq!(whole.len(), 3, "{whole:?}");
        assert!(whole[0].starts_with("GET /a?x=1 HTTP/1.1"), "{}", whole[0]);
        assert!(whole[1].contains("keep-alive=true"), "{}", whole[1]);
        assert!(whole[2].ends_with("Empty keep-alive=false"), "{}", whole[2]);
        for i in 0..=raw.len() {
            assert_eq!(heads(&[&raw[..i], &raw[i..]]).unwrap(), whole, "split at {i}");
        }
    }

    #[test]
    fn garbage_never_panics_the_parser() {
        // A fixed pseudo-random sequence (xorshift): bytes biased towards what heads are made of.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let alphabet =
            b"GET / HTTP/1.1\r\n:Host: x\tContent-Length: 12\r\nTransfer-Encoding: chunked\r\n\x00\xff";
        for _ in 0..2000 {
            let mut input = Vec::new();
            for _ in 0..(x % 200) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                input.push(alphabet[usize::try_from(x % alphabet.len() as u64).unwrap()]);
            }
            let mut buf = BytesMut::from(&input[..]);
            let mut spans = Vec::new();
            // Each call either takes a head, waits for more, or refuses: never loops or panics.
            for _ in 0..10 {
                match parse_request(&mut buf, &mut spans, 8192) {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order() {
        let all = exchange(
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let a = all.find("GET /a HTTP/1.1 body=").unwrap();
        let b = all.find("POST /b HTTP/1.1 body=hello").unwrap();
        let c = all.find("GET /c HTTP/1.1 body=").unwrap();
        assert!(a < b && b < c, "{all}");
        assert_eq!(all.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{all}");
        assert!(all.contains("connection: close\r\n"), "{all}");
        assert!(all.contains("\r\ndate: "), "{all}");
    }

    #[tokio::test]
    async fn a_chunked_body_streams_to_the_service_with_its_trailers() {
        let mut client = start(Echo::default());
        client
            .write_all(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .await
            .unwrap();
        // The rest comes later: the service waits for it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .write_all(b"6\r\n world\r\n0\r\nx-sum: 9\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut client, Duration::from_secs(5)).await;
        assert!(
            all.contains("POST /up HTTP/1.1 body=hello world trailers={\"x-sum\": \"9\"}"),
            "{all}"
        );
        assert!(all.contains("GET /next HTTP/1.1 body="), "{all}");
    }

    #[tokio::test]
    async fn expect_100_continue_is_answered_before_the_body_comes() {
        let mut client = start(Echo::default());
        client
            .write_all(b"PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            .await
            .unwrap();
        let interim = read_until(&mut client, "\r\n\r\n").await;
        assert_eq!(interim, "HTTP/1.1 100 Continue\r\n\r\n");
        client.write_all(b"abc").await.unwrap();
        let answer = read_until(&mut client, "body=abc").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    }

    #[tokio::test]
    async fn a_100_continue_the_socket_took_in_part_is_finished_before_the_answer() {
        // A pipe that holds 8 bytes each way: the interim answer can't go out whole at once,
        // and the service answers without waiting for the body.
        let (client, server) = tokio::io::duplex(8);
        tokio::spawn(async move {
            let _ = serve(server, LIMITS, &Echo::default()).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let writer = tokio::spawn(async move {
            wr.write_all(
                b"POST /ignore HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
            wr
        });
        let mut writer = Some(writer);
        let mut all = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 64];
            loop {
                // Slowly: the pipe stays full.
                tokio::time::sleep(Duration::from_millis(2)).await;
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
                if all.ends_with(b"ignored")
                    && let Some(w) = writer.take()
                {
                    let _ = w.await.unwrap().write_all(b"hello").await;
                }
            }
        })
        .await;
        let all = String::from_utf8_lossy(&all);
        assert!(
            all.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"),
            "{all}"
        );
        assert!(all.ends_with("ignored"), "{all}");
    }

    #[tokio::test]
    async fn ambiguous_or_unframeable_requests_are_refused_and_closed() {
        for raw in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "THIS IS NOT HTTP\r\n\r\n",
        ] {
            let all = exchange(raw.as_bytes()).await;
            assert!(all.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{raw:?}: {all}");
            assert!(all.contains("connection: close\r\n"), "{all}");
        }
        let all = exchange(b"GET / HTTP/3.0\r\nHost: x\r\n\r\n").await;
        assert!(all.starts_with("HTTP/1.1 505 "), "{all}");
        let many: String = (0..=h1::MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        let all = exchange(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()).await;
        assert!(all.starts_with("HTTP/1.1 431 "), "{all}");
    }

    #[tokio::test]
    async fn answers_of_unknown_length_are_chunked_or_closed_by_version() {
        let all =
            exchange(b"GET /stream HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n").await;
        assert!(all.contains("transfer-encoding: chunked\r\n"), "{all}");
        assert!(
            all.ends_with("\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\nx-sum: 42\r\n\r\n"),
            "{all}"
        );
        // Without `TE: trailers` the trailers are dropped.
        let all = exchange(b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(all.ends_with("\r\n\r\n2\r\nab\r\n2\r\ncd\r\n0\r\n\r\n"), "{all}");
        // HTTP/1.0 knows no chunks: the body runs to the close, even when asked to keep alive.
        let all = exchange(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await;
        assert!(all.contains("connection: close\r\n"), "{all}");
        assert!(!all.contains("transfer-encoding"), "{all}");
        assert!(all.ends_with("\r\n\r\nabcd"), "{all}");
    }

    #[tokio::test]
    async fn head_and_http10_keep_alive_answers() {
        let mut client = start(Echo::default());
        client
            .write_all(b"HEAD /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let head = read_until(&mut client, "\r\n\r\n").await;
        let len = "HEAD /x HTTP/1.0 body=".len();
        assert!(head.contains(&format!("content-length: {len}\r\n")), "{head}");
        assert!(head.contains("connection: keep-alive\r\n"), "{head}");
        assert!(head.ends_with("\r\n\r\n"), "no body after a HEAD's head: {head}");
        // Still open for an HTTP/1.0 request without keep-alive, which then closes.
        client.write_all(b"GET /y HTTP/1.0\r\n\r\n").await.unwrap();
        let all = read_all(&mut client, Duration::from_secs(5)).await;
        assert!(all.ends_with("GET /y HTTP/1.0 body="), "{all}");
        assert!(all.contains("connection: close\r\n"), "{all}");
    }

    #[tokio::test]
    async fn an_answer_cut_short_closes_the_connection() {
        let all = exchange(b"GET /short HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(all.contains("content-length: 10\r\n"), "{all}");
        assert!(
            all.ends_with("\r\n\r\n12345"),
            "the next request was answered: {all}"
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_away_cancels_its_request() {
        let svc = Echo::default();
        let dropped = svc.dropped.clone();
        let mut client = start(svc);
        client
            .write_all(b"GET /pending HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!dropped.load(Ordering::SeqCst));
        drop(client);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !dropped.load(Ordering::SeqCst) {
            assert!(
                Instant::now() < deadline,
                "the service's future outlived its client"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn an_unread_body_is_drained_when_small_else_the_connection_closes() {
        // Small: drained, and the connection serves the next request.
        let mut client = start(Echo::default());
        client
            .write_all(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
            .await
            .unwrap();
        let first = read_until(&mut client, "ignored").await;
        assert!(first.ends_with("ignored"), "{first}");
        client.write_all(&[b'z'; 10000]).await.unwrap();
        client
            .write_all(b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let all = read_all(&mut client, Duration::from_secs(5)).await;
        assert!(all.contains("GET /after HTTP/1.1 body="), "{all}");
        // Larger than the server drains: closed after the answer.
        let mut client = start(Echo::default());
        let big = DRAIN_MAX + 1;
        client
            .write_all(
                format!("POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: {big}\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let writer = tokio::spawn(async move {
            let _ = client.write_all(&vec![b'z'; usize::try_from(big).unwrap()]).await;
            client
        });
        let mut client = writer.await.unwrap();
        let all = read_all(&mut client, Duration::from_secs(5)).await;
        assert!(all.ends_with("ignored"), "{all}");
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_head_timeout() {
        let mut client = start(Echo::default());
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        let all = read_all(&mut client, Duration::from_secs(5)).await;
        assert!(all.contains("GET / HTTP/1.1 body="), "{all}");
        let idle = started.elapsed();
        assert!(
            idle >= LIMITS.head_timeout && idle < Duration::from_secs(2),
            "{idle:?}"
        );
    }

    #[tokio::test]
    async fn an_http2_preface_is_handed_back_with_what_was_read() {
        let (mut client, server) = tokio::io::duplex(4096);
        let served = tokio::spawn(async move { serve(server, LIMITS, &Echo::default()).await });
        client.write_all(PREFACE).await.unwrap();
        client.write_all(b"more").await.unwrap();
        let Ended::H2(mut rewind) = served.await.unwrap() else {
            panic!("not handed back")
        };
        let mut got = vec![0u8; PREFACE.len() + 4];
        rewind.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..PREFACE.len()], PREFACE);
        assert_eq!(&got[PREFACE.len()..], b"more");
    }
}
