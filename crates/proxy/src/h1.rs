//! A lean HTTP/1.1 client connection to a machine, over the `TcpStream` itself (plain requests
//! only: upgrades and h2c stay on hyper, see `upstream.rs`).
//!
//! The request head is serialized into one buffer the connection keeps, and written with the
//! first frame of the body in one (vectored) write when that frame is ready at once, as a kept
//! body always is. The answer head is parsed with `httparse` straight from the connection's read
//! buffer. Its fields stay there, as runs of lines passed on as they are ([`PlainFields`]), when
//! the edge has nothing to read in them, as for nearly every answer; else they go into
//! `http::response::Parts` (values are slices of that buffer, not copies).
//! The body is framed as RFC 9112 §6.3 says and read by whoever holds the answer's body; the
//! connection can carry another request when the answer was read to its end, both sides wanted
//! to keep it open, and nothing is left over. hyper's client did the same through a dispatch
//! channel, a oneshot and a general state machine: about 16k instructions per request on the
//! edge's benchmark, twice what this takes (`docs/perf.md`).
//!
//! Request body framing: none when the body is known to be empty (`content-length: 0` added
//! for POST, PUT and PATCH that lack one); the request's own valid `Content-Length`; else the
//! body's exact length; else `transfer-encoding: chunked` (for any method: a body the client
//! sent is forwarded, where hyper dropped an unknown-length one on GET). Request trailers are
//! not forwarded (the edge strips the `Trailer` header, as hyper's client needed it).
//!
//! An answer can arrive while the request body is still being sent (a machine answering early):
//! the body keeps being sent from the answer's body while the answer is read, both polled with
//! the same waker, so neither side waits on the other. When the machine stops reading, the
//! write waits (or fails) while the answer is still read to its end; the connection is then not
//! reused. A write that fails with nothing of the request written gives the body back
//! (`H1Fail::NotSent`): the connection was closed by the machine.
//!
//! The head is serialized from the caller's request head, borrowed: the edge keeps the client's
//! request for a retry or a replay anyway, and a copy per attempt (a `HeaderMap` clone and its
//! drop) cost more than the rest of serializing it.
//!
//! Answer body framing: none for HEAD, 1xx, 204 and 304; chunked when `Transfer-Encoding` ends
//! in `chunked` (sizes in hex, extensions skipped, trailers passed on as a trailers frame, as
//! hyper's client did); read to close for another `Transfer-Encoding` (an error in HTTP/1.0,
//! as in hyper), else the `Content-Length` (invalid or differing values are an error), else
//! read to close. Malformed framing is an error and the connection is closed.

use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version, request, response};
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::net::TcpStream;

use crate::http::{Body, BoxError};

/// The largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The most header lines an answer head (or its trailers) may have, as hyper's default.
pub(crate) const MAX_HEADERS: usize = 100;
/// The largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;
/// Chunk-extension bytes accepted over one body (hyper's bound too).
const MAX_CHUNK_EXT: usize = 16 * 1024;
/// The first read's room; it doubles while reads fill it, up to `READ_MAX`.
pub(crate) const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;

/// Why a request or its answer failed on an HTTP/1.1 connection to a machine.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("writing the request to the machine failed: {0}")]
    Write(#[source] io::Error),
    #[error("reading the machine's answer failed: {0}")]
    Read(#[source] io::Error),
    #[error("the machine closed the connection before its answer was complete")]
    Closed,
    #[error("the machine's answer is malformed ({0}); check the app's HTTP server")]
    Malformed(&'static str),
    #[error("the machine's answer head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the machine answered 101 Switching Protocols to a request that asked for no upgrade")]
    UnexpectedUpgrade,
    #[error("the request body is {0} than its Content-Length")]
    BodyLength(&'static str),
    #[error("the client's request body failed: {0}")]
    Body(#[source] BoxError),
}

/// Why a request on an [`H1Conn`] failed.
pub(crate) enum H1Fail {
    /// The connection was closed before any of the request was written: its body (with what
    /// was already read of it) can go elsewhere.
    NotSent(Body),
    /// It failed after (maybe part of) it was written.
    Sent(H1Error),
}

/// How a body goes out (a request's to a machine, or an answer's to a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    None,
    /// Exactly this many bytes (left to write).
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (an answer to an HTTP/1.0 client, of unknown length).
    Close,
}

/// A body being written.
pub(crate) struct Sending {
    pub(crate) body: Body,
    pub(crate) framing: BodyFraming,
    /// Trailers are written (chunked only; else they are dropped).
    pub(crate) trailers: bool,
}

/// Why writing a body stopped.
pub(crate) enum SendFail {
    Io(io::Error),
    Other(H1Error),
}

/// How an answer's body is framed, and how much of it is left.
#[derive(Debug)]
pub(crate) enum Framing {
    /// No body at all.
    Empty,
    /// Exactly this many bytes left.
    Length(u64),
    Chunked(ChunkedDecoder),
    /// Until the machine closes the connection.
    Close,
    /// Read to its end.
    Done,
}

/// What [`Framing::next`] found of a body in a read buffer.
#[derive(Debug)]
pub(crate) enum BodyStep {
    Frame(Frame<Bytes>),
    /// The body ended.
    End,
    /// The buffer holds no more of it: read more.
    More,
}

impl Framing {
    /// Takes the body's next frame out of the front of `buf` (the bytes read from the
    /// connection), framed as `self` says, which it updates (`Done` once the body ended).
    /// Malformed chunked framing is an error.
    pub(crate) fn next(&mut self, buf: &mut BytesMut) -> Result<BodyStep, H1Error> {
        Ok(match self {
            Self::Empty | Self::Done => BodyStep::End,
            Self::Length(0) => {
                *self = Self::Done;
                BodyStep::End
            }
            Self::Length(left) if !buf.is_empty() => {
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left -= n as u64;
                BodyStep::Frame(Frame::data(buf.split_to(n).freeze()))
            }
            Self::Chunked(dec) => match dec.decode(buf)? {
                Some(Decoded::Data(d)) => BodyStep::Frame(Frame::data(d)),
                Some(Decoded::Trailers(t)) => BodyStep::Frame(Frame::trailers(t)),
                None if dec.is_done() => {
                    *self = Self::Done;
                    BodyStep::End
                }
                None => BodyStep::More,
            },
            Self::Close if !buf.is_empty() => BodyStep::Frame(Frame::data(buf.split().freeze())),
            Self::Length(_) | Self::Close => BodyStep::More,
        })
    }

    /// As hyper's `Incoming` reports it (the servers frame the answer to the client by it).
    pub(crate) fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty | Self::Done | Self::Length(0) => true,
            // Done once its trailers were passed on (the servers poll no further).
            Self::Chunked(dec) => dec.is_done(),
            Self::Length(_) | Self::Close => false,
        }
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty | Self::Done => SizeHint::with_exact(0),
            Self::Length(n) => SizeHint::with_exact(*n),
            Self::Chunked(_) | Self::Close => SizeHint::default(),
        }
    }
}

/// An HTTP/1.1 connection to a machine, driven by whoever holds it.
pub(crate) struct H1Conn {
    pub(crate) addr: SocketAddr,
    io: TcpStream,
    /// Bytes read and not consumed yet.
    rbuf: BytesMut,
    /// Room to make for the next read.
    read_size: usize,
    /// What to write next.
    out: Out,
    /// The request body still to write.
    sending: Option<Sending>,
    /// A write failed after some of the request was written; the answer is still read.
    write_failed: Option<io::Error>,
    /// Both sides want the connection kept open after this exchange.
    keep_alive: bool,
    /// Scratch room for parsing answer heads.
    spans: Vec<[usize; 4]>,
}

impl H1Conn {
    pub(crate) fn new(addr: SocketAddr, io: TcpStream) -> Self {
        Self {
            addr,
            io,
            rbuf: BytesMut::new(),
            read_size: READ_MIN,
            out: Out::default(),
            sending: None,
            write_failed: None,
            keep_alive: true,
            spans: Vec::new(),
        }
    }

    /// Whether the exchange left the connection fit for another request: the answer was read
    /// to its end (the caller knows), the request was written whole, both sides keep it open,
    /// and nothing unasked-for was read.
    fn finished_cleanly(&self) -> bool {
        self.keep_alive
            && self.sending.is_none()
            && self.out.is_empty()
            && self.write_failed.is_none()
            && self.rbuf.is_empty()
    }

    /// Whether it can carry another request: finished cleanly, and not closed by the machine as
    /// far as the socket knows now (a read that would block; no syscall when the reactor saw
    /// nothing since the last one).
    pub(crate) fn reusable(&mut self) -> bool {
        if !self.finished_cleanly() {
            return false;
        }
        self.reserve_read();
        matches!(self.io.try_read_buf(&mut self.rbuf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Sends the request `head` (with `host` as its Host header when it has none, and the
    /// headers `extra` after its own) and `body`, and reads its answer's head. The body is read
    /// with [`H1Conn::poll_body`].
    pub(crate) async fn send(
        &mut self,
        head: &request::Parts,
        host: Option<&HeaderValue>,
        extra: &(dyn ExtraFields + Sync),
        body: Body,
    ) -> Result<AnswerHead, H1Fail> {
        self.out.reset();
        let (framing, close) = encode_head(
            &mut self.out.buf,
            head,
            host,
            extra,
            body.is_end_stream(),
            body.size_hint().exact(),
        );
        self.write_failed = None;
        self.keep_alive = !close;
        let mut unsent = None;
        match framing {
            BodyFraming::None => unsent = Some(body),
            framing => {
                self.sending = Some(Sending {
                    body,
                    framing,
                    trailers: false,
                });
            }
        }
        let head_request = head.method == Method::HEAD;
        let answer = poll_fn(|cx| self.poll_head(cx, head_request)).await;
        match answer {
            Ok(a) => Ok(a),
            Err(e) if !self.out.wrote && !matches!(e, H1Error::Body(_) | H1Error::BodyLength(_)) => {
                // Nothing of it went out: the machine had closed the connection.
                let rest = self.sending.take().map(|s| s.body).or(unsent);
                let prefix = self.out.take_data();
                self.keep_alive = false;
                Err(H1Fail::NotSent(
                    crate::http::Prefixed { prefix, rest }.boxed_unsync(),
                ))
            }
            Err(e) => {
                self.keep_alive = false;
                Err(H1Fail::Sent(e))
            }
        }
    }

    fn poll_head(&mut self, cx: &mut Context<'_>, head_request: bool) -> Poll<Result<AnswerHead, H1Error>> {
        loop {
            self.progress_send(cx)?;
            match ready!(self.poll_read(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(self
                        .write_failed
                        .take()
                        .map_or(H1Error::Closed, H1Error::Write)));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(H1Error::Read(e))),
            }
            while let Some(ParsedHead { parts, plain, seen }) = parse_head(&mut self.rbuf, &mut self.spans)? {
                if parts.status == StatusCode::SWITCHING_PROTOCOLS {
                    return Poll::Ready(Err(H1Error::UnexpectedUpgrade));
                }
                if parts.status.is_informational() {
                    continue;
                }
                let framing = answer_framing(head_request, &parts, &seen)?;
                self.keep_alive &=
                    answer_keeps_alive(parts.version, &seen) && !matches!(framing, Framing::Close);
                return Poll::Ready(Ok((parts, plain, framing)));
            }
        }
    }

    /// Reads the next frame of the answer's body, framed by `framing` (which it updates), while
    /// writing what is left of the request body.
    pub(crate) fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
        framing: &mut Framing,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            if let Err(e) = self.progress_send(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            match framing.next(&mut self.rbuf) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(BodyStep::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(BodyStep::End) => return Poll::Ready(None),
                Ok(BodyStep::More) => {}
            }
            match ready!(self.poll_read(cx)) {
                Ok(0) if matches!(framing, Framing::Close) => {
                    self.keep_alive = false;
                    *framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return Poll::Ready(Some(Err(H1Error::Closed))),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(H1Error::Read(e)))),
            }
        }
    }

    /// Whether the answer (framed by `framing`, read to its end) leaves the connection fit for
    /// another request.
    pub(crate) fn done_with(&self, framing: &Framing) -> bool {
        framing.is_end_stream() && self.finished_cleanly()
    }

    fn reserve_read(&mut self) {
        reserve_read(&mut self.rbuf, self.read_size);
    }

    /// Reads more of the answer into `rbuf`; `Ok(0)`: the machine closed the connection.
    ///
    /// Through tokio's `AsyncRead` rather than `try_read_buf`: a read that fills less than the
    /// room it had drained the socket, and tokio then forgets the socket's readiness, so the
    /// next read (or [`H1Conn::reusable`]'s check) waits for the reactor instead of costing a
    /// `recvfrom` that would block: one syscall less per request.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_read_buf(cx, &mut self.io, &mut self.rbuf, &mut self.read_size)
    }

    /// Moves the request along; a write that fails after some of it went out stops the writing
    /// (the machine may have answered and closed) and leaves the answer to be read.
    fn progress_send(&mut self, cx: &mut Context<'_>) -> Result<(), H1Error> {
        if self.sending.is_none() && self.out.is_empty() {
            return Ok(());
        }
        match self.out.poll_send(cx, &mut self.io, &mut self.sending) {
            Poll::Ready(Ok(())) | Poll::Pending => Ok(()),
            Poll::Ready(Err(SendFail::Other(e))) => Err(e),
            Poll::Ready(Err(SendFail::Io(e))) if !self.out.wrote => Err(H1Error::Write(e)),
            Poll::Ready(Err(SendFail::Io(e))) => {
                self.sending = None;
                self.out.abandon();
                self.write_failed = Some(e);
                self.keep_alive = false;
                Ok(())
            }
        }
    }
}

/// Makes room in `buf` for a read of `read_size` when little is left.
fn reserve_read(buf: &mut BytesMut, read_size: usize) {
    if buf.capacity() - buf.len() < READ_MIN / 4 {
        buf.reserve(read_size);
    }
}

/// Reads from `io` into `buf` (made room for first); `Ok(0)`: the peer closed its side.
/// `read_size` (start at [`READ_MIN`]) doubles while reads fill the room they had, up to
/// `READ_MAX`.
///
/// Through tokio's `AsyncRead` rather than `try_read_buf`: a read that fills less than the
/// room it had drained the socket, and tokio then forgets the socket's readiness, so the next
/// read waits for the reactor instead of costing a `recvfrom` that would block.
pub(crate) fn poll_read_buf<R: AsyncRead + Unpin>(
    cx: &mut Context<'_>,
    io: &mut R,
    buf: &mut BytesMut,
    read_size: &mut usize,
) -> Poll<io::Result<usize>> {
    reserve_read(buf, *read_size);
    let room = buf.capacity() - buf.len();
    let read = std::pin::pin!(io.read_buf(buf));
    let n = ready!(read.poll(cx))?;
    if n == room && *read_size < READ_MAX {
        *read_size *= 2;
    }
    Poll::Ready(Ok(n))
}

/// What ends a body framed so: nothing, or chunked's last chunk.
fn end_of_body(framing: BodyFraming) -> Result<&'static [u8], H1Error> {
    match framing {
        BodyFraming::Chunked => Ok(b"0\r\n\r\n"),
        BodyFraming::Length(0) | BodyFraming::None | BodyFraming::Close => Ok(&[]),
        BodyFraming::Length(_) => Err(H1Error::BodyLength("shorter")),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing.

/// Bytes queued for a connection: `buf[pos..]` (a head, a chunk's size line), then `data` (a
/// body frame's bytes, not copied), then `tail` (a chunk's CRLF, the last chunk), written
/// together in one vectored write when the socket takes them.
#[derive(Debug, Default)]
pub(crate) struct Out {
    pub(crate) buf: Vec<u8>,
    pos: usize,
    data: Bytes,
    tail: &'static [u8],
    /// Something was written since [`Out::reset`].
    pub(crate) wrote: bool,
}

impl Out {
    /// Forgets what was queued, for a new message.
    pub(crate) fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.data = Bytes::new();
        self.tail = &[];
        self.wrote = false;
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len() && self.data.is_empty() && self.tail.is_empty()
    }

    /// Drops what is queued and not written (the write failed).
    pub(crate) fn abandon(&mut self) {
        self.pos = self.buf.len();
        self.data = Bytes::new();
        self.tail = &[];
    }

    /// The body frame's bytes not written yet.
    fn take_data(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }

    /// Room to queue more after what `buf` holds (written bytes dropped).
    fn compact(&mut self) {
        if self.pos >= self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
    }

    /// Writes what is queued, then flushes `io` (a TLS stream's records).
    pub(crate) fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
    ) -> Poll<io::Result<()>> {
        loop {
            let head = &self.buf[self.pos.min(self.buf.len())..];
            if head.is_empty() && self.data.is_empty() && self.tail.is_empty() {
                self.compact();
                return Pin::new(io).poll_flush(cx);
            }
            let n = if self.data.is_empty() && self.tail.is_empty() {
                ready!(Pin::new(&mut *io).poll_write(cx, head))?
            } else {
                let parts = [
                    IoSlice::new(head),
                    IoSlice::new(&self.data),
                    IoSlice::new(self.tail),
                ];
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &parts))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.wrote = true;
            let mut n = n;
            let from_head = n.min(head.len());
            self.pos += from_head;
            n -= from_head;
            let from_data = n.min(self.data.len());
            self.data.advance(from_data);
            n -= from_data;
            self.tail = &self.tail[n.min(self.tail.len())..];
        }
    }

    /// Writes what is queued and the body `sending` holds (taken when it ended), as far as they
    /// can go now; `Ready(Ok(()))` once all of it was written.
    pub(crate) fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut W,
        sending: &mut Option<Sending>,
    ) -> Poll<Result<(), SendFail>> {
        loop {
            if self.data.is_empty()
                && self.tail.is_empty()
                && let Some(s) = sending
            {
                match Pin::new(&mut s.body).poll_frame(cx) {
                    Poll::Pending => {
                        if self.is_empty() {
                            return Poll::Pending;
                        }
                    }
                    Poll::Ready(None) => {
                        self.tail = end_of_body(s.framing).map_err(SendFail::Other)?;
                        *sending = None;
                    }
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(SendFail::Other(H1Error::Body(e)))),
                    Poll::Ready(Some(Ok(frame))) => {
                        let data = match frame.into_data() {
                            Ok(data) => data,
                            Err(frame) => {
                                // Trailers: written when the body is chunked and they are
                                // wanted (see the module doc), else dropped.
                                if let (Ok(trailers), BodyFraming::Chunked, true) =
                                    (frame.into_trailers(), s.framing, s.trailers)
                                {
                                    self.compact();
                                    self.buf.extend_from_slice(b"0\r\n");
                                    encode_fields(&mut self.buf, &trailers);
                                    self.buf.extend_from_slice(b"\r\n");
                                    *sending = None;
                                }
                                continue;
                            }
                        };
                        let last = s.body.is_end_stream();
                        if !data.is_empty() {
                            self.compact();
                            match &mut s.framing {
                                BodyFraming::Length(left) => {
                                    *left = left
                                        .checked_sub(data.len() as u64)
                                        .ok_or(SendFail::Other(H1Error::BodyLength("longer")))?;
                                }
                                BodyFraming::Chunked => {
                                    write_hex(&mut self.buf, data.len() as u64, 1);
                                    self.buf.extend_from_slice(b"\r\n");
                                    self.tail = b"\r\n";
                                }
                                BodyFraming::Close => {}
                                // Nothing is written of a body framed so.
                                BodyFraming::None => {
                                    *sending = None;
                                    continue;
                                }
                            }
                            self.data = data;
                        }
                        // A body that ends short of its length fails once what it gave was
                        // written (the next poll finds its end).
                        if last && let Ok(end) = end_of_body(s.framing) {
                            if !end.is_empty() {
                                self.tail = if self.tail.is_empty() {
                                    end
                                } else {
                                    b"\r\n0\r\n\r\n"
                                };
                            }
                            *sending = None;
                        }
                        continue;
                    }
                }
            }
            if self.is_empty() && sending.is_none() {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_flush(cx, io)).map_err(SendFail::Io)?;
        }
    }
}

/// Writes header fields (`name: value` lines).
pub(crate) fn encode_fields(buf: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        write_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// The request head.

/// Writes `parts` as a request head into `buf` (cleared first) and says how the body goes
/// (`ended` when the body is known to be empty, `exact` its length when known) and whether the
/// request asks to close the connection. One pass over the headers: the framing ones are
/// noted on the way, and the `Content-Length` written (once) after the others.
fn encode_head(
    buf: &mut Vec<u8>,
    parts: &request::Parts,
    host: Option<&HeaderValue>,
    extra: &(dyn ExtraFields + Sync),
    ended: bool,
    exact: Option<u64>,
) -> (BodyFraming, bool) {
    buf.clear();
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    buf.extend_from_slice(if target.is_empty() {
        b"/"
    } else {
        target.as_bytes()
    });
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = host {
        buf.extend_from_slice(b"host: ");
        buf.extend_from_slice(host.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    let mut seen = FramingHeaders::default();
    for (name, value) in &parts.headers {
        if seen.note(name, value.as_bytes()) == Some(Noted::ContentLength) {
            continue;
        }
        write_field(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    // Headers the caller adds (the edge's own, which frame nothing).
    extra.write_to(buf);
    let given_len = seen.len.ok().flatten();
    let (framing, write_len) = if seen.te {
        // The request's own Transfer-Encoding (written above) frames it; chunked goes last.
        if !seen.chunked {
            buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        (BodyFraming::Chunked, None)
    } else if let Some(n) = given_len {
        let framing = if ended && n == 0 {
            BodyFraming::None
        } else {
            BodyFraming::Length(n)
        };
        (framing, Some(n))
    } else if ended {
        let zero = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
        (BodyFraming::None, zero.then_some(0))
    } else if let Some(n) = exact {
        (BodyFraming::Length(n), Some(n))
    } else {
        buf.extend_from_slice(b"transfer-encoding: chunked\r\n");
        (BodyFraming::Chunked, None)
    };
    if let Some(n) = write_len {
        buf.extend_from_slice(b"content-length: ");
        write_dec(buf, n);
        buf.extend_from_slice(b"\r\n");
    }
    buf.extend_from_slice(b"\r\n");
    (framing, seen.close)
}

/// Header fields a request gets after its own (they frame nothing).
pub(crate) trait ExtraFields {
    /// Writes them, each as a `name: value` line.
    fn write_to(&self, buf: &mut Vec<u8>);
}

impl<const N: usize> ExtraFields for [(HeaderName, HeaderValue); N] {
    fn write_to(&self, buf: &mut Vec<u8>) {
        for (name, value) in self {
            write_field(buf, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Writes a `name: value` line.
pub(crate) fn write_field(buf: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    buf.extend_from_slice(name);
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// Which framing header [`FramingHeaders::note`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Noted {
    ContentLength,
    TransferEncoding,
    Connection,
}

/// What a message's framing headers say, noted while going over its headers once (comparing
/// standard names is cheap; looking each one up in a `HeaderMap` is not).
#[derive(Debug)]
pub(crate) struct FramingHeaders {
    /// `Content-Length`: `Ok(None)` when there is none, `Err` when a value is not a number or
    /// values differ.
    pub(crate) len: Result<Option<u64>, ()>,
    /// There is a `Transfer-Encoding`…
    pub(crate) te: bool,
    /// …and its last coding is `chunked`.
    pub(crate) chunked: bool,
    /// `Connection` lists `close`.
    pub(crate) close: bool,
    /// `Connection` lists `keep-alive`.
    pub(crate) keep_alive: bool,
    /// `Connection` lists `upgrade`, and there is an `Upgrade` header.
    pub(crate) upgrade: (bool, bool),
    /// `Expect: 100-continue` (a request's).
    pub(crate) expect_continue: bool,
    /// `TE` lists `trailers` (a request's: its client takes trailers).
    pub(crate) te_trailers: bool,
}

impl Default for FramingHeaders {
    fn default() -> Self {
        Self {
            len: Ok(None),
            te: false,
            chunked: false,
            close: false,
            keep_alive: false,
            upgrade: (false, false),
            expect_continue: false,
            te_trailers: false,
        }
    }
}

impl FramingHeaders {
    pub(crate) fn note(&mut self, name: &HeaderName, value: &[u8]) -> Option<Noted> {
        if name == header::CONTENT_LENGTH {
            self.note_length(value);
            Some(Noted::ContentLength)
        } else if name == header::TRANSFER_ENCODING {
            self.note_transfer_encoding(value);
            Some(Noted::TransferEncoding)
        } else if name == header::CONNECTION {
            self.note_connection(value);
            Some(Noted::Connection)
        } else {
            if name == header::UPGRADE {
                self.upgrade.1 = true;
            } else if name == header::EXPECT {
                self.expect_continue |= value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
            } else if name == header::TE {
                self.te_trailers |= value
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"));
            }
            None
        }
    }
    fn note_length(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',') {
            self.len = match (self.len, parse_decimal(part.trim_ascii())) {
                (Ok(None), Some(n)) => Ok(Some(n)),
                (Ok(Some(l)), Some(n)) if l == n => Ok(Some(n)),
                _ => Err(()),
            };
        }
    }

    fn note_transfer_encoding(&mut self, value: &[u8]) {
        self.te = true;
        self.chunked = value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
    }

    fn note_connection(&mut self, value: &[u8]) {
        // Nearly always one of these alone.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
            return;
        }
        if value.eq_ignore_ascii_case(b"close") {
            self.close = true;
            return;
        }
        for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            self.close |= t.eq_ignore_ascii_case(b"close");
            self.keep_alive |= t.eq_ignore_ascii_case(b"keep-alive");
            self.upgrade.0 |= t.eq_ignore_ascii_case(b"upgrade");
        }
    }
}

pub(crate) fn write_dec(buf: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
}

/// `n` in lower-case hex, zero-padded to `width` digits (never cut; at least one digit).
pub(crate) fn write_hex(buf: &mut Vec<u8>, mut n: u64, width: usize) {
    let mut digits = [b'0'; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for _ in digits.len() - i..width {
        buf.push(b'0');
    }
    buf.extend_from_slice(&digits[i..]);
}

// ---------------------------------------------------------------------------------------------
// The answer head.

/// Parses an answer head from the front of `buf`, taking it out; `None`: not complete yet.
/// `spans` is scratch room, kept by the connection so that parsing allocates nothing.
fn parse_head(buf: &mut BytesMut, spans: &mut Vec<[usize; 4]>) -> Result<Option<ParsedHead>, H1Error> {
    if buf.is_empty() {
        return Ok(None);
    }
    // Where each name and value lies in `buf`, to slice them out of the frozen head.
    spans.clear();
    let (len, code, version, reason) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(H1Error::HeadTooLarge),
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Malformed("more than 100 header lines"));
            }
            Err(_) => return Err(H1Error::Malformed("invalid head")),
        };
        if len > MAX_HEAD {
            return Err(H1Error::HeadTooLarge);
        }
        let base = buf.as_ptr() as usize;
        let offset = |p: *const u8| p as usize - base;
        spans.extend(resp.headers.iter().map(|h| {
            let n = offset(h.name.as_ptr());
            let v = offset(h.value.as_ptr());
            [n, n + h.name.len(), v, v + h.value.len()]
        }));
        let reason = resp.reason.map(|r| {
            let at = offset(r.as_ptr());
            (at, at + r.len())
        });
        (len, resp.code.unwrap_or(0), resp.version.unwrap_or(1), reason)
    };
    let head = buf.split_to(len).freeze();
    let status = StatusCode::from_u16(code).map_err(|_| H1Error::Malformed("invalid status code"))?;
    let (headers, plain, seen) = match plain_fields(&head, spans) {
        Some((plain, seen)) => (HeaderMap::new(), Some(plain), seen),
        None => {
            let (headers, seen) = fields_of(&head, spans).map_err(H1Error::Malformed)?;
            (headers, None, seen)
        }
    };
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = if version == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    parts.headers = headers;
    if let Some((s, e)) = reason {
        let reason = &head[s..e];
        if Some(reason) != status.canonical_reason().map(str::as_bytes)
            && let Ok(r) = hyper::ext::ReasonPhrase::try_from(head.slice(s..e))
        {
            // Passed on as hyper's client did: its server writes it in place of the canonical one.
            parts.extensions.insert(r);
        }
    }
    Ok(Some(ParsedHead { parts, plain, seen }))
}

/// An answer head: its parts (whose headers hold none of `plain`'s fields), and what its
/// framing fields say.
struct ParsedHead {
    parts: response::Parts,
    plain: Option<PlainFields>,
    seen: FramingHeaders,
}

/// An answer's head as [`H1Conn::send`] gives it: its parts (whose headers hold none of
/// `plain`'s fields), and how its body is framed.
pub(crate) type AnswerHead = (response::Parts, Option<PlainFields>, Framing);

/// The header fields of a head parsed into `head` at `spans` (name start and end, value start
/// and end), and what its framing headers say. Values are slices of `head`, not copies.
///
/// What only this connection is told (`Connection: keep-alive` or `close`, `Keep-Alive`) is
/// noted and not kept: the edge strips it anyway (`strip_hop_by_hop`), and removing it from
/// the map costs more than not adding it. A Connection header naming other headers (or
/// `upgrade`) stays, for the strip to remove those too.
pub(crate) fn fields_of(
    head: &Bytes,
    spans: &[[usize; 4]],
) -> Result<(HeaderMap, FramingHeaders), &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut seen = FramingHeaders::default();
    for &[ns, ne, vs, ve] in spans {
        let name = HeaderName::from_bytes(&head[ns..ne]).map_err(|_| "invalid header name")?;
        seen.note(&name, &head[vs..ve]);
        if name == crate::http::names::KEEP_ALIVE
            || (name == header::CONNECTION && only_persistence(&head[vs..ve]))
        {
            continue;
        }
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve)).map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    Ok((headers, seen))
}

/// The most runs of lines [`PlainFields`] keeps; a head cut into more is made a `HeaderMap`.
const MAX_RUNS: usize = 6;

/// An answer's header fields as the machine wrote them, when the edge only passes them on: none
/// is one it reads, merges or removes by what another says (a `fly-*` field, `Via`, a replay's
/// content type, a `Connection` naming other fields), and every line ends in CRLF. Writing
/// them to an HTTP/1 client is then a copy of a few runs of lines, where a `HeaderMap` cost a
/// name check, a hash and an insertion per field, and the same again to add the edge's own
/// (together about a quarter of the edge's instructions per request, `docs/perf.md`).
/// [`PlainFields::append_to`] makes the map when one is needed (an HTTP/2 client, a service's
/// `response.headers` edits).
///
/// Not in the runs: the framing and connection fields (the edge frames the answer itself;
/// `length` keeps what `Content-Length` said), the other hop-by-hop ones, and `Server`, kept
/// apart: the edge's replaces it, unless the service says `pristine` (the edge adds none).
pub(crate) struct PlainFields {
    head: Bytes,
    /// Byte ranges of `head` holding whole lines to pass on, in order.
    runs: [(u16, u16); MAX_RUNS],
    n_runs: u8,
    /// The machine's `Server` line.
    server: Option<(u16, u16)>,
    /// A `Date` is among the lines.
    pub(crate) date: bool,
    /// What `Content-Length` said.
    pub(crate) length: Option<u64>,
}

impl PlainFields {
    /// The lines passed on: the runs, then the machine's `Server` when `with_server`.
    fn lines(&self, with_server: bool) -> impl Iterator<Item = &[u8]> {
        let server = self.server.filter(|_| with_server);
        self.runs[..usize::from(self.n_runs)]
            .iter()
            .copied()
            .chain(server)
            .map(|(s, e)| &self.head[usize::from(s)..usize::from(e)])
    }

    /// Writes the fields, each as a `name: value` line (`Server` only `with_server`).
    pub(crate) fn write(&self, buf: &mut Vec<u8>, with_server: bool) {
        for run in self.lines(with_server) {
            buf.extend_from_slice(run);
        }
    }

    /// Adds the fields to `map` (`Server` only `with_server`).
    pub(crate) fn append_to(self, map: &mut HeaderMap, with_server: bool) {
        for run in self.lines(with_server) {
            for line in run.split_inclusive(|&b| b == b'\n') {
                let Some(colon) = line.iter().position(|&b| b == b':') else {
                    continue;
                };
                let value = line[colon + 1..].trim_ascii();
                // Checked by httparse already: neither can fail.
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(&line[..colon]),
                    HeaderValue::from_maybe_shared(self.head.slice_ref(value)),
                ) else {
                    continue;
                };
                map.append(name, value);
            }
        }
    }

    fn push_run(&mut self, start: usize, end: usize) -> Option<()> {
        let slot = self.runs.get_mut(usize::from(self.n_runs))?;
        *slot = (u16::try_from(start).ok()?, u16::try_from(end).ok()?);
        self.n_runs += 1;
        Some(())
    }
}

/// What an answer's header field is to the edge.
enum Field {
    /// Passed on as it is.
    Plain,
    Date,
    Server,
    /// The framing fields (a `Connection` naming nothing but persistence): noted, and not
    /// passed on.
    Length,
    TransferEncoding,
    Connection,
    /// Another hop-by-hop field, not passed on.
    Hop,
    /// One the edge reads or changes: the head goes into a `HeaderMap`.
    Special,
}

fn classify(name: &[u8], value: &[u8]) -> Field {
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    match name.len() {
        2 if is(b"te") => Field::Hop,
        3 if is(b"via") => Field::Special,
        4 if is(b"date") => Field::Date,
        6 if is(b"server") => Field::Server,
        7 if is(b"trailer") || is(b"upgrade") => Field::Hop,
        10 if is(b"keep-alive") => Field::Hop,
        10 if is(b"connection") => {
            if only_persistence(value) {
                Field::Connection
            } else {
                Field::Special
            }
        }
        12 if is(b"content-type") => {
            let replay = crate::replay::REPLAY_JSON_CONTENT_TYPE.as_bytes();
            // The prefix first: the whole check takes UTF-8 and splits.
            if value
                .get(..replay.len())
                .is_some_and(|v| v.eq_ignore_ascii_case(replay))
                && std::str::from_utf8(value).is_ok_and(crate::replay::is_replay_json)
            {
                Field::Special
            } else {
                Field::Plain
            }
        }
        14 if is(b"content-length") => Field::Length,
        16 if is(b"proxy-connection") => Field::Hop,
        17 if is(b"transfer-encoding") => Field::TransferEncoding,
        _ if name.len() >= 4 && name[..4].eq_ignore_ascii_case(b"fly-") => Field::Special,
        _ => Field::Plain,
    }
}

/// The fields of an answer head parsed into `head` at `spans` (as [`fields_of`] takes them) in
/// their wire form, and what its framing fields say; `None` when the edge must see them in a
/// `HeaderMap` (see [`PlainFields`]).
fn plain_fields(head: &Bytes, spans: &[[usize; 4]]) -> Option<(PlainFields, FramingHeaders)> {
    let end = head
        .len()
        .checked_sub(2)
        .filter(|_| head.ends_with(b"\r\n\r\n"))?;
    let mut seen = FramingHeaders::default();
    let mut plain = PlainFields {
        head: head.clone(),
        runs: [(0, 0); MAX_RUNS],
        n_runs: 0,
        server: None,
        date: false,
        length: None,
    };
    // Where the run being gathered began.
    let mut run: Option<usize> = None;
    for (i, &[ns, ne, vs, ve]) in spans.iter().enumerate() {
        let line_end = spans.get(i + 1).map_or(end, |next| next[0]);
        if !head[..line_end].ends_with(b"\r\n") {
            return None;
        }
        let value = &head[vs..ve];
        match classify(&head[ns..ne], value) {
            Field::Plain => {
                run.get_or_insert(ns);
                continue;
            }
            Field::Date => {
                plain.date = true;
                run.get_or_insert(ns);
                continue;
            }
            Field::Special => return None,
            Field::Server => plain.server = Some((u16::try_from(ns).ok()?, u16::try_from(line_end).ok()?)),
            Field::Hop => {}
            Field::Length => seen.note_length(value),
            Field::TransferEncoding => seen.note_transfer_encoding(value),
            Field::Connection => seen.note_connection(value),
        }
        // A line left out ends the run before it.
        if let Some(start) = run.take() {
            plain.push_run(start, ns)?;
        }
    }
    if let Some(start) = run {
        plain.push_run(start, end)?;
    }
    plain.length = seen.len.ok().flatten();
    Some((plain, seen))
}

/// Whether a Connection header's value names nothing but the connection's persistence
/// (`keep-alive`, `close`, or nothing).
fn only_persistence(value: &[u8]) -> bool {
    if value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close") {
        return true; // nearly always
    }
    value.split(|&b| b == b',').all(|t| {
        let t = t.trim_ascii();
        t.is_empty() || t.eq_ignore_ascii_case(b"keep-alive") || t.eq_ignore_ascii_case(b"close")
    })
}

/// How the answer to a request (a HEAD request when `head_request`) is framed, RFC 9112 §6.3.
fn answer_framing(
    head_request: bool,
    parts: &response::Parts,
    seen: &FramingHeaders,
) -> Result<Framing, H1Error> {
    let s = parts.status.as_u16();
    if head_request || (100..200).contains(&s) || s == 204 || s == 304 {
        return Ok(Framing::Empty);
    }
    if seen.te {
        if parts.version == Version::HTTP_10 {
            return Err(H1Error::Malformed("Transfer-Encoding in an HTTP/1.0 answer"));
        }
        // RFC 9112 §6.3 lets Transfer-Encoding override it, and calls the pair a sign of
        // response splitting; forwarding it would also hand the client a Content-Length that
        // does not frame what follows. Refused, as nginx refuses it from an upstream.
        if seen.len != Ok(None) {
            return Err(H1Error::Malformed("both Transfer-Encoding and Content-Length"));
        }
        return Ok(if seen.chunked {
            Framing::Chunked(ChunkedDecoder::default())
        } else {
            Framing::Close
        });
    }
    match seen.len {
        Ok(Some(n)) => Ok(Framing::Length(n)),
        Ok(None) => Ok(Framing::Close),
        Err(()) => Err(H1Error::Malformed("invalid or differing Content-Length")),
    }
}

/// Whether the answer lets the connection stay open (HTTP/1.1 unless `close`, HTTP/1.0 only
/// with `keep-alive`).
fn answer_keeps_alive(version: Version, seen: &FramingHeaders) -> bool {
    match version {
        Version::HTTP_11 => !seen.close,
        Version::HTTP_10 => seen.keep_alive,
        _ => false,
    }
}

pub(crate) fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then_some(())
            .and_then(|()| n.checked_mul(10))
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
    })
}

// ---------------------------------------------------------------------------------------------
// Chunked answers.

/// What the chunked decoder found.
#[derive(Debug, PartialEq)]
pub(crate) enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// The chunk size's hex digits.
    Size {
        size: u64,
        digits: u32,
    },
    /// Whitespace after the size.
    SizeWs {
        size: u64,
    },
    /// A chunk extension, skipped.
    Ext {
        size: u64,
    },
    /// The LF ending the size line.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// The trailer section, up to its empty line.
    Trailers,
    Done,
}

/// Decodes a chunked body (RFC 9112 §7.1), strictly: anything malformed is an error.
#[derive(Debug)]
pub(crate) struct ChunkedDecoder {
    state: ChunkState,
    ext_len: usize,
    trailers: Vec<u8>,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self {
            state: ChunkState::Size { size: 0, digits: 0 },
            ext_len: 0,
            trailers: Vec::new(),
        }
    }
}

impl ChunkedDecoder {
    pub(crate) fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Decodes from the front of `buf`, taking what it used: chunk data as it comes, then the
    /// trailers if there are any. `Ok(None)`: `buf` is used up (or the body is done).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, H1Error> {
        use ChunkState as S;
        let bad = H1Error::Malformed;
        loop {
            if let S::Data { left } = self.state {
                if buf.is_empty() {
                    return Ok(None);
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                let left = left - n as u64;
                self.state = if left == 0 { S::DataCr } else { S::Data { left } };
                return Ok(Some(Decoded::Data(buf.split_to(n).freeze())));
            }
            if self.state == S::Done {
                return Ok(None);
            }
            let Some(&b) = buf.first() else { return Ok(None) };
            buf.advance(1);
            self.state = match (self.state, b) {
                (S::Size { size, digits }, _) if b.is_ascii_hexdigit() => {
                    if size >> 60 != 0 {
                        return Err(bad("chunk size too large"));
                    }
                    let v = (b as char).to_digit(16).unwrap_or(0);
                    S::Size {
                        size: size << 4 | u64::from(v),
                        digits: digits + 1,
                    }
                }
                (S::Size { digits: 0, .. }, _) => return Err(bad("invalid chunk size")),
                (S::Size { size, .. } | S::SizeWs { size }, b' ' | b'\t') => S::SizeWs { size },
                (S::Size { size, .. } | S::SizeWs { size } | S::Ext { size }, b';') => {
                    self.count_ext()?;
                    S::Ext { size }
                }
                (S::Size { size, .. } | S::SizeWs { size } | S::Ext { size }, b'\r') => S::SizeLf { size },
                (S::Size { .. } | S::SizeWs { .. }, _) => return Err(bad("invalid chunk size")),
                (S::Ext { size }, _) => {
                    if b != b'\t' && (b < 0x20 || b == 0x7f) {
                        return Err(bad("invalid chunk extension"));
                    }
                    self.count_ext()?;
                    S::Ext { size }
                }
                (S::SizeLf { size: 0 }, b'\n') => S::Trailers,
                (S::SizeLf { size }, b'\n') => S::Data { left: size },
                (S::SizeLf { .. }, _) => return Err(bad("chunk size line not ended by CRLF")),
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => S::Size { size: 0, digits: 0 },
                (S::DataCr | S::DataLf, _) => return Err(bad("chunk data not followed by CRLF")),
                (S::Trailers, _) => {
                    if b == b'\n' && !self.trailers.ends_with(b"\r") {
                        return Err(bad("trailer line not ended by CRLF"));
                    }
                    self.trailers.push(b);
                    if self.trailers.len() > MAX_TRAILERS {
                        return Err(bad("trailers too large"));
                    }
                    if self.trailers == b"\r\n" {
                        self.state = S::Done;
                        return Ok(None);
                    }
                    if self.trailers.ends_with(b"\r\n\r\n") {
                        self.state = S::Done;
                        return parse_trailers(&self.trailers).map(|t| Some(Decoded::Trailers(t)));
                    }
                    S::Trailers
                }
                (S::Data { .. } | S::Done, _) => self.state,
            };
        }
    }

    fn count_ext(&mut self) -> Result<(), H1Error> {
        self.ext_len += 1;
        if self.ext_len > MAX_CHUNK_EXT {
            return Err(H1Error::Malformed("chunk extensions too large"));
        }
        Ok(())
    }
}

fn parse_trailers(raw: &[u8]) -> Result<HeaderMap, H1Error> {
    let bad = || H1Error::Malformed("invalid trailers");
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let Ok(httparse::Status::Complete((_, parsed))) = httparse::parse_headers(raw, &mut headers) else {
        return Err(bad());
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for h in parsed {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad())?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad())?;
        map.append(name, value);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn decode_all(input: &[u8], splits: &[usize]) -> Result<(Vec<u8>, Option<HeaderMap>, bool), H1Error> {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::new();
        let mut data = Vec::new();
        let mut trailers = None;
        let mut from = 0;
        for &to in splits.iter().chain(std::iter::once(&input.len())) {
            buf.extend_from_slice(&input[from..to]);
            from = to;
            while let Some(d) = dec.decode(&mut buf)? {
                match d {
                    Decoded::Data(d) => data.extend_from_slice(&d),
                    Decoded::Trailers(t) => trailers = Some(t),
                }
            }
        }
        assert!(buf.is_empty() || dec.is_done(), "left over: {buf:?}");
        Ok((data, trailers, dec.is_done()))
    }

    const WITH_TRAILERS: &[u8] =
        b"5;name=value;other\r\nhello\r\n1a \t ; x=\"q\"\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 42\r\nx-b: 1\r\n\r\n";

    #[test]
    fn chunked_bodies_decode_whatever_the_split() {
        for input in [
            WITH_TRAILERS,
            b"3\r\nabc\r\n0\r\n\r\n".as_slice(),
            b"A\r\n0123456789\r\n0000\r\n\r\n".as_slice(),
        ] {
            let whole = decode_all(input, &[]).unwrap();
            assert!(whole.2, "not done: {input:?}");
            for i in 0..=input.len() {
                for j in i..=input.len() {
                    let split = decode_all(input, &[i, j]).unwrap();
                    assert_eq!(split.0, whole.0, "split at {i}, {j}");
                    assert_eq!(split.1, whole.1, "split at {i}, {j}");
                    assert!(split.2);
                }
            }
        }
        let (data, trailers, _) = decode_all(WITH_TRAILERS, &[]).unwrap();
        assert_eq!(data, b"helloabcdefghijklmnopqrstuvwxyz");
        let trailers = trailers.unwrap();
        assert_eq!(trailers["x-sum"], "42");
        assert_eq!(trailers["x-b"], "1");
        assert_eq!(decode_all(b"3\r\nabc\r\n0\r\n\r\n", &[]).unwrap().1, None);
    }

    #[test]
    fn the_decoder_stops_at_the_end_of_the_body() {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&b"1\r\na\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n"[..]);
        assert_eq!(
            dec.decode(&mut buf).unwrap(),
            Some(Decoded::Data(Bytes::from_static(b"a")))
        );
        assert_eq!(dec.decode(&mut buf).unwrap(), None);
        assert!(dec.is_done());
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for bad in [
            b"\r\n".as_slice(),
            b"g\r\n",
            b";ext\r\n",
            b"-1\r\n",
            b"3\nabc\r\n",
            b"3\r\nabcX\r\n",
            b"3\r\nabc\rX",
            b"3 4\r\nabc\r\n",
            b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
            b"3\r\nabc\r\n0\r\nx: 1\n\r\n",
            b"3;a\x01b\r\n",
            // 17 hex digits: more than 64 bits.
            b"10000000000000000\r\n",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(
                matches!(decode_all(bad, &[]), Err(H1Error::Malformed(_))),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The largest size that fits is a size (its data just never comes).
        assert!(decode_all(b"ffffffffffffffff\r\n", &[]).is_ok());
        let long_ext = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_EXT], b"\r\na\r\n"].concat();
        assert!(decode_all(&long_ext, &[]).is_err());
    }

    /// A parsed head with all its fields in its map (plain ones appended), and what its framing
    /// fields say.
    fn parsed(buf: &mut BytesMut) -> Result<Option<(response::Parts, FramingHeaders)>, H1Error> {
        Ok(parse_head(buf, &mut Vec::new())?.map(
            |ParsedHead {
                 mut parts,
                 plain,
                 seen,
             }| {
                if let Some(plain) = plain {
                    plain.append_to(&mut parts.headers, true);
                }
                (parts, seen)
            },
        ))
    }

    fn head_and_seen(raw: &str) -> Result<Option<(response::Parts, FramingHeaders)>, H1Error> {
        parsed(&mut BytesMut::from(raw.as_bytes()))
    }

    fn head(raw: &str) -> Result<Option<response::Parts>, H1Error> {
        head_and_seen(raw).map(|h| h.map(|(parts, _)| parts))
    }

    fn framing_of(raw: &str, head_request: bool) -> Result<Framing, H1Error> {
        let (parts, seen) = head_and_seen(raw)?.unwrap();
        answer_framing(head_request, &parts, &seen)
    }

    #[test]
    fn answer_heads_are_parsed_into_parts() {
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 201 Made\r\nA: 1\r\nset-cookie: x\r\nSet-Cookie: y\r\n\r\nbody"[..]);
        let (parts, _) = parsed(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..], b"body");
        assert_eq!(parts.status, 201);
        assert_eq!(parts.version, Version::HTTP_11);
        assert_eq!(parts.headers["a"], "1");
        assert_eq!(parts.headers.get_all("set-cookie").iter().count(), 2);
        let reason = parts.extensions.get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Made");
        let ok = head("HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert_eq!(ok.version, Version::HTTP_10);
        assert!(ok.extensions.get::<hyper::ext::ReasonPhrase>().is_none());
        assert!(head("HTTP/1.1 200 OK\r\nA: 1\r\n").unwrap().is_none());
        assert!(matches!(
            head("HTTP/1.1 2000 OK\r\n\r\n"),
            Err(H1Error::Malformed(_))
        ));
        assert!(matches!(head("SSH-2.0-x\r\n\r\n"), Err(H1Error::Malformed(_))));
        let huge = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert!(matches!(head(&huge), Err(H1Error::HeadTooLarge)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")).is_err());
    }

    #[test]
    fn what_only_the_machine_connection_is_told_is_noted_not_kept() {
        let (parts, seen) = head_and_seen(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nA: 1\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(parts.headers.len(), 1, "{:?}", parts.headers);
        assert_eq!(parts.headers["a"], "1");
        assert!(answer_keeps_alive(parts.version, &seen));
        let (parts, seen) = head_and_seen("HTTP/1.1 200 OK\r\nconnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(parts.headers.is_empty());
        assert!(
            !answer_keeps_alive(parts.version, &seen),
            "close is still honoured"
        );
        // A Connection header that names other headers stays, for the edge to strip them.
        let parts = head("HTTP/1.1 200 OK\r\nConnection: close, x-secret\r\nx-secret: 1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(parts.headers["connection"], "close, x-secret");
        assert_eq!(parts.headers["x-secret"], "1");
    }

    #[test]
    fn answer_framing_follows_rfc_9112() {
        let f = |raw: &str| framing_of(raw, false);
        assert!(matches!(
            framing_of("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true),
            Ok(Framing::Empty)
        ));
        for s in ["204 No Content", "304 Not Modified"] {
            assert!(matches!(
                f(&format!("HTTP/1.1 {s}\r\ncontent-length: 5\r\n\r\n")),
                Ok(Framing::Empty)
            ));
        }
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        ));
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        ));
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").is_err());
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: -5\r\n\r\n").is_err());
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n").is_err());
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, Chunked\r\n\r\n"),
            Ok(Framing::Chunked(_))
        ));
        assert!(f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n").is_err());
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: x\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(matches!(
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n"),
            Ok(Framing::Close)
        ));
        assert!(f("HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(matches!(f("HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::Close)));
        // What hyper's Incoming reported, which the servers frame the answer by.
        assert_eq!(Framing::Length(5).size_hint().exact(), Some(5));
        assert!(Framing::Length(0).is_end_stream() && Framing::Empty.is_end_stream());
        assert_eq!(Framing::Empty.size_hint().exact(), Some(0));
        assert_eq!(Framing::Close.size_hint().exact(), None);
        assert!(!Framing::Chunked(ChunkedDecoder::default()).is_end_stream());
    }

    fn plain(raw: &str) -> Option<PlainFields> {
        let ParsedHead { parts, plain, .. } =
            parse_head(&mut BytesMut::from(raw.as_bytes()), &mut Vec::new())
                .unwrap()
                .unwrap();
        if plain.is_some() {
            assert!(parts.headers.is_empty(), "{:?}", parts.headers);
        }
        plain
    }

    fn written(plain: &PlainFields, with_server: bool) -> String {
        let mut buf = Vec::new();
        plain.write(&mut buf, with_server);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn plain_answer_fields_are_kept_as_written_less_what_the_edge_frames() {
        let p = plain(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 15:00:00 GMT\r\n\
             Content-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\
             Keep-Alive: timeout=5\r\nX-A: 1\r\nTransfer-Encoding: identity\r\nset-cookie: b=2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(
            written(&p, false),
            "Date: Thu, 03 Dec 2026 15:00:00 GMT\r\nContent-Type: text/plain\r\nX-A: 1\r\nset-cookie: b=2\r\n"
        );
        assert!(p.date);
        assert_eq!(p.length, Some(3));
        assert!(written(&p, true).ends_with("set-cookie: b=2\r\nServer: nginx\r\n"));
        let mut map = HeaderMap::new();
        p.append_to(&mut map, true);
        assert_eq!(map.len(), 5, "{map:?}");
        assert_eq!(map["x-a"], "1");
        assert_eq!(map["server"], "nginx");
        assert_eq!(map["content-type"], "text/plain");
        // No fields at all.
        let none = plain("HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(written(&none, true), "");
        assert!(!none.date && none.length.is_none());
    }

    #[test]
    fn fields_the_edge_reads_or_merges_make_a_map() {
        for special in [
            "fly-replay: region=ams",
            "Fly-Replay-Cache: x",
            "via: 1.0 cache",
            "content-type: application/vnd.fly.replay+json; charset=utf-8",
            "connection: close, x-secret",
        ] {
            let raw = format!("HTTP/1.1 200 OK\r\nx-a: 1\r\n{special}\r\n\r\n");
            assert!(plain(&raw).is_none(), "{special} stayed plain");
            let (parts, _) = head_and_seen(&raw).unwrap().unwrap();
            assert_eq!(parts.headers["x-a"], "1");
        }
        // Lines ending in a bare LF are not passed on as they are.
        assert!(plain("HTTP/1.1 200 OK\nx-a: 1\n\n").is_none());
        assert!(plain("HTTP/1.1 200 OK\r\nx-a: 1\nx-b: 2\r\n\r\n").is_none());
        // Nor a head cut into more runs than kept.
        let cut: String = (0..=MAX_RUNS)
            .map(|i| format!("x-{i}: v\r\nte: trailers\r\n"))
            .collect();
        assert!(plain(&format!("HTTP/1.1 200 OK\r\n{cut}\r\n")).is_none());
        let fits: String = (0..MAX_RUNS)
            .map(|i| format!("x-{i}: v\r\nte: trailers\r\n"))
            .collect();
        assert!(plain(&format!("HTTP/1.1 200 OK\r\n{fits}\r\n")).is_some());
        // Only the replay type is the replay's.
        assert!(plain("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n").is_some());
    }

    #[test]
    fn keep_alive_needs_both_sides() {
        let keeps = |raw: &str| {
            let (parts, seen) = head_and_seen(raw).unwrap().unwrap();
            answer_keeps_alive(parts.version, &seen)
        };
        assert!(keeps("HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!keeps("HTTP/1.1 200 OK\r\nconnection: foo, Close\r\n\r\n"));
        assert!(!keeps("HTTP/1.0 200 OK\r\n\r\n"));
        assert!(keeps("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"));
    }

    const NO_EXTRA: &[(HeaderName, HeaderValue); 0] = &[];

    fn encoded(req: http::request::Builder, ended: bool, exact: Option<u64>) -> (String, BodyFraming) {
        let (parts, ()) = req.body(()).unwrap().into_parts();
        let mut buf = b"garbage".to_vec();
        let (framing, _) = encode_head(&mut buf, &parts, None, NO_EXTRA, ended, exact);
        (String::from_utf8(buf).unwrap(), framing)
    }

    #[test]
    fn request_heads_are_serialized_with_their_framing() {
        let get = || {
            Request::get("/p?q=1")
                .header("host", "a.example")
                .header("x-two", "1")
        };
        let (h, f) = encoded(get(), true, Some(0));
        assert_eq!(h, "GET /p?q=1 HTTP/1.1\r\nhost: a.example\r\nx-two: 1\r\n\r\n");
        assert_eq!(f, BodyFraming::None);
        let (h, f) = encoded(Request::post("/").header("host", "h"), true, Some(0));
        assert_eq!(h, "POST / HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(f, BodyFraming::None);
        let (h, f) = encoded(Request::delete("/").header("host", "h"), true, Some(0));
        assert_eq!(h, "DELETE / HTTP/1.1\r\nhost: h\r\n\r\n");
        assert_eq!(f, BodyFraming::None);
        let (h, f) = encoded(Request::put("/x").header("content-length", "12"), false, None);
        assert_eq!(h, "PUT /x HTTP/1.1\r\ncontent-length: 12\r\n\r\n");
        assert_eq!(f, BodyFraming::Length(12));
        let (h, f) = encoded(Request::put("/x"), false, Some(1234567890));
        assert_eq!(h, "PUT /x HTTP/1.1\r\ncontent-length: 1234567890\r\n\r\n");
        assert_eq!(f, BodyFraming::Length(1234567890));
        let (h, f) = encoded(Request::post("/x").header("content-length", "x"), false, None);
        assert_eq!(h, "POST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!(f, BodyFraming::Chunked);
        let (h, f) = encoded(
            Request::post("/x")
                .header("transfer-encoding", "gzip")
                .header("content-length", "3"),
            false,
            Some(3),
        );
        assert_eq!(
            h,
            "POST /x HTTP/1.1\r\ntransfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        assert_eq!(f, BodyFraming::Chunked);
        let (h, _) = encoded(Request::options("*"), true, None);
        assert_eq!(h, "OPTIONS * HTTP/1.1\r\n\r\n");
        // A Content-Length goes after the other headers, once.
        let (h, f) = encoded(
            Request::post("/")
                .header("content-length", "2, 2")
                .header("a", "b")
                .header("content-length", "2"),
            false,
            Some(2),
        );
        assert_eq!(h, "POST / HTTP/1.1\r\na: b\r\ncontent-length: 2\r\n\r\n");
        assert_eq!(f, BodyFraming::Length(2));
        // A request that says close is noted.
        let (parts, ()) = Request::get("/")
            .header("connection", "Close")
            .body(())
            .unwrap()
            .into_parts();
        assert!(encode_head(&mut Vec::new(), &parts, None, NO_EXTRA, true, None).1);
        let (parts, ()) = Request::get("/")
            .header("connection", "keep-alive")
            .body(())
            .unwrap()
            .into_parts();
        assert!(!encode_head(&mut Vec::new(), &parts, None, NO_EXTRA, true, None).1);
        // A head without a Host header gets the one given, first.
        let (parts, ()) = Request::get("/").header("a", "b").body(()).unwrap().into_parts();
        let mut buf = Vec::new();
        let extra = [(
            HeaderName::from_static("via"),
            HeaderValue::from_static("1.1 aloft"),
        )];
        encode_head(
            &mut buf,
            &parts,
            Some(&HeaderValue::from_static("10.0.0.1:80")),
            &extra,
            true,
            None,
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "GET / HTTP/1.1\r\nhost: 10.0.0.1:80\r\na: b\r\nvia: 1.1 aloft\r\n\r\n",
            "the Host given first, the extra headers after the request's own"
        );
    }

    #[test]
    fn numbers_are_written_in_decimal_and_hex() {
        for n in [0u64, 9, 10, 255, 4096, u64::MAX] {
            let (mut d, mut x) = (Vec::new(), Vec::new());
            write_dec(&mut d, n);
            write_hex(&mut x, n, 1);
            assert_eq!(String::from_utf8(d).unwrap(), n.to_string());
            assert_eq!(String::from_utf8(x).unwrap(), format!("{n:x}"));
            let mut padded = Vec::new();
            write_hex(&mut padded, n, 12);
            assert_eq!(String::from_utf8(padded).unwrap(), format!("{n:012x}"));
        }
    }
}
