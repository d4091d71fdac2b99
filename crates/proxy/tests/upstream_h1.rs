//! The edge's own HTTP/1.1 client to machines against raw TCP machines that frame their answers
//! byte by byte as the tests say: chunked answers with extensions and trailers, answers written
//! in many small pieces, HTTP/1.0 machines that close after answering, interim 1xx answers, a
//! machine answering an upload early without reading it, and the request framing the edge adds.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::VecDeque;
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use aloft_api::CatalogEntry;
    use aloft_proxy::{DirectDialer, Edge, EdgeConfig};
    use bytes::Bytes;
    use http::{HeaderMap, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    use crate::common::{Ids, Loopback, NoControl, http_entry};

    /// This file's machines: 127.0.210–219.y.
    static IPS: Loopback = Loopback::new(210, 219);
    static IDS: Ids = Ids::new([0x11, 0x01]);

    fn addr_of(e: &CatalogEntry) -> SocketAddr {
        let port = e.services.first().and_then(|s| s.internal_port).unwrap();
        SocketAddr::new(e.private_ip.parse().unwrap(), port)
    }

    /// An edge with one app, `a`, whose one machine is what the test binds at the address
    /// returned.
    async fn edge() -> (SocketAddr, SocketAddr, JoinHandle<()>) {
        let mut config = EdgeConfig::new("test");
        config.connect_timeout = Duration::from_secs(1);
        config.queue_timeout = Duration::from_millis(300);
        config.pool_idle_timeout = Duration::from_secs(5);
        let edge = Edge::new(config, Arc::new(NoControl), Arc::new(DirectDialer));
        let m = http_entry("a", IDS.next(), IPS.next());
        let machine = addr_of(&m);
        edge.routes().upsert(m);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (addr, machine, tokio::spawn(edge.serve_http(listener)))
    }

    /// What a raw machine saw: connections accepted, request heads, request bodies.
    #[derive(Debug, Default)]
    struct Seen {
        accepted: AtomicUsize,
        heads: Mutex<Vec<String>>,
        bodies: Mutex<Vec<Vec<u8>>>,
    }

    impl Seen {
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
        fn heads(&self) -> Vec<String> {
            self.heads.lock().unwrap().clone()
        }
    }

    /// Reads a request head (lower-cased) and its body (Content-Length or chunked, raw); `None`
    /// when the connection ended first.
    async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
        let mut chunk = [0u8; 4096];
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
        buf.drain(..end);
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse::<usize>().ok());
        let done = |b: &[u8]| match len {
            Some(n) => b.len() >= n,
            None if head.contains("transfer-encoding: chunked") => b.ends_with(b"0\r\n\r\n"),
            None => true,
        };
        while !done(buf) {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf.drain(..len.unwrap_or(buf.len())).collect();
        Some((head, body))
    }

    /// A raw machine at `addr` answering every request with `answer`, written `piece` bytes at a
    /// time (each write flushed, the task yielding in between), closing the connection after
    /// each answer when `close`.
    fn raw_machine(
        addr: SocketAddr,
        answer: &'static [u8],
        piece: usize,
        close: bool,
    ) -> (Arc<Seen>, JoinHandle<()>) {
        let seen = Arc::new(Seen::default());
        let s2 = seen.clone();
        let task = tokio::spawn(async move {
            let listener = TcpListener::bind(addr).await.unwrap();
            while let Ok((mut s, _)) = listener.accept().await {
                s2.accepted.fetch_add(1, Ordering::SeqCst);
                let seen = s2.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                        seen.heads.lock().unwrap().push(head);
                        seen.bodies.lock().unwrap().push(body);
                        for p in answer.chunks(piece) {
                            if s.write_all(p).await.is_err() {
                                return;
                            }
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_micros(200)).await;
                        }
                        if close {
                            return;
                        }
                    }
                });
            }
        });
        (seen, task)
    }

    #[derive(Debug)]
    struct Resp {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    }

    async fn collect(resp: http::Response<hyper::body::Incoming>) -> Resp {
        let (parts, incoming) = resp.into_parts();
        let collected = incoming.collect().await.unwrap();
        Resp {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
        }
    }

    /// One HTTP/1.1 request through the edge on a new connection.
    async fn send<B>(edge: SocketAddr, req: Request<B>) -> Resp
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let go = async {
            let tcp = TcpStream::connect(edge).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            collect(sender.send_request(req).await.unwrap()).await
        };
        tokio::time::timeout(Duration::from_secs(10), go).await.unwrap()
    }

    async fn get(edge: SocketAddr) -> Resp {
        send(
            edge,
            Request::get("/")
                .header("host", "a.localhost")
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
    }

    /// One HTTP/2 request (prior knowledge) through the edge: HTTP/2 carries trailers to clients.
    async fn get_h2(edge: SocketAddr) -> Resp {
        let tcp = TcpStream::connect(edge).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get("http://a.localhost/")
            .body(Full::<Bytes>::default())
            .unwrap();
        let go = async { collect(sender.send_request(req).await.unwrap()).await };
        tokio::time::timeout(Duration::from_secs(10), go).await.unwrap()
    }

    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\nx-machine: raw\r\n\r\n\
        5;name=value\r\nhello\r\n6 ; a=\"b c\"\r\n world\r\n00\r\nx-sum: 42\r\n\r\n";

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_chunked_answer_with_extensions_and_trailers_arrives_whole_and_its_connection_is_reused() {
        let (edge, machine, _edge) = edge().await;
        let (seen, task) = raw_machine(machine, CHUNKED, 3, false);
        for _ in 0..3 {
            let r = get(edge).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(&r.body[..], b"hello world");
            assert_eq!(r.headers["x-machine"], "raw");
        }
        let r = get_h2(edge).await;
        assert_eq!(&r.body[..], b"hello world");
        assert_eq!(
            r.trailers.as_ref().map(|t| &t["x-sum"]),
            Some(&"42".parse().unwrap()),
            "{r:?}"
        );
        assert_eq!(
            seen.accepted(),
            1,
            "one connection for all four requests: {:?}",
            seen.heads()
        );
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_malformed_chunked_answer_fails_and_its_connection_is_not_reused() {
        let (edge, machine, _edge) = edge().await;
        let bad: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n";
        let (seen, task) = raw_machine(machine, bad, usize::MAX, false);
        for i in 1..=2 {
            let tcp = TcpStream::connect(edge).await.unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get("/")
                .header("host", "a.localhost")
                .body(Full::<Bytes>::default())
                .unwrap();
            // The edge may fail before or after passing the head on.
            let got = async {
                let resp = sender.send_request(req).await?;
                resp.into_body().collect().await.map(|_| ())
            };
            let got = tokio::time::timeout(Duration::from_secs(5), got).await.unwrap();
            assert!(got.is_err(), "a malformed answer reached the client whole");
            assert_eq!(
                seen.accepted(),
                i,
                "a connection with a broken answer on it was reused"
            );
        }
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_content_length_answer_split_across_many_writes_arrives_whole() {
        static ANSWER: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let answer = ANSWER.get_or_init(|| {
            let body: Vec<u8> = (0..70_000u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
            let mut a = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
            a.extend_from_slice(&body);
            a
        });
        let (edge, machine, _edge) = edge().await;
        let (seen, task) = raw_machine(machine, answer, 997, false);
        for _ in 0..2 {
            let r = get(edge).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.headers["content-length"], "70000");
            assert_eq!(r.body.len(), 70_000);
            assert!(
                r.body
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| u8::try_from(i % 251) == Ok(b)),
                "body garbled"
            );
        }
        assert_eq!(seen.accepted(), 1);
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http10_machine_that_closes_after_its_answer_is_read_to_the_close() {
        let (edge, machine, _edge) = edge().await;
        let answer: &[u8] = b"HTTP/1.0 200 OK\r\nx-machine: old\r\n\r\nuntil the end";
        let (seen, task) = raw_machine(machine, answer, 4, true);
        for i in 1..=2 {
            let r = get(edge).await;
            assert_eq!(r.status, StatusCode::OK, "{r:?}");
            assert_eq!(&r.body[..], b"until the end");
            assert_eq!(
                seen.accepted(),
                i,
                "a read-to-close connection cannot carry another request"
            );
        }
        // An HTTP/1.0 client cannot tell a cut answer from a whole one; an HTTP/2 client can:
        // the close ends the body, it is no error.
        let r = get_h2(edge).await;
        assert_eq!(&r.body[..], b"until the end");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http10_keep_alive_and_connection_close_answers_decide_reuse() {
        let (edge, machine, _edge) = edge().await;
        let answer: &[u8] = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok";
        let (seen, task) = raw_machine(machine, answer, usize::MAX, false);
        for _ in 0..3 {
            assert_eq!(&get(edge).await.body[..], b"ok");
        }
        assert_eq!(
            seen.accepted(),
            1,
            "HTTP/1.0 with keep-alive keeps the connection"
        );
        task.abort();

        let (edge, machine, _edge) = self::edge().await;
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok";
        // The machine keeps its side open: the edge must not reuse it all the same.
        let (seen, task) = raw_machine(machine, answer, usize::MAX, false);
        for _ in 0..2 {
            assert_eq!(&get(edge).await.body[..], b"ok");
        }
        assert_eq!(
            seen.accepted(),
            2,
            "an answer that says close ends its connection"
        );
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn interim_answers_are_skipped_and_head_and_204_answers_have_no_body() {
        let (edge, machine, _edge) = edge().await;
        let answer: &[u8] =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n\
            HTTP/1.1 200 Fine\r\nContent-Length: 2\r\n\r\nok";
        let (seen, task) = raw_machine(machine, answer, 5, false);
        let r = get(edge).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(&r.body[..], b"ok");
        assert!(r.headers.get("link").is_none(), "{r:?}");
        assert_eq!(seen.accepted(), 1);
        task.abort();

        // A HEAD answer's Content-Length tells the size a GET would get: no body follows.
        let (edge, machine, _edge) = self::edge().await;
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let (seen, task) = raw_machine(machine, answer, usize::MAX, false);
        for _ in 0..2 {
            let req = Request::head("/")
                .header("host", "a.localhost")
                .body(Full::<Bytes>::default())
                .unwrap();
            let r = send(edge, req).await;
            assert_eq!(r.status, StatusCode::OK);
            assert_eq!(r.headers["content-length"], "5");
            assert!(r.body.is_empty());
        }
        assert_eq!(seen.accepted(), 1, "a HEAD answer leaves the connection reusable");
        task.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn request_bodies_are_framed_by_length_or_chunked() {
        let (edge, machine, _edge) = edge().await;
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        let (seen, task) = raw_machine(machine, answer, usize::MAX, false);
        // An empty POST says so (as curl and browsers do), a GET does not.
        let post = Request::post("/e")
            .header("host", "a.localhost")
            .body(Full::<Bytes>::default())
            .unwrap();
        assert_eq!(&send(edge, post).await.body[..], b"ok");
        let _ = get(edge).await;
        // A small body is sent with its length.
        let post = Request::post("/s")
            .header("host", "a.localhost")
            .body(Full::from("hello"))
            .unwrap();
        assert_eq!(&send(edge, post).await.body[..], b"ok");
        // A body of unknown length bigger than the edge keeps is streamed chunked.
        let big = Bytes::from(vec![b'x'; (1 << 20) + 10]);
        let body = frames(vec![big.slice(..1 << 19), big.slice(1 << 19..)]);
        let post = Request::post("/c")
            .header("host", "a.localhost")
            .body(body)
            .unwrap();
        assert_eq!(&send(edge, post).await.body[..], b"ok");
        let heads = seen.heads();
        assert!(
            heads[0].starts_with("post /e http/1.1\r\n") && heads[0].contains("\r\ncontent-length: 0\r\n"),
            "{heads:?}"
        );
        assert!(
            !heads[1].contains("content-length") && !heads[1].contains("transfer-encoding"),
            "{heads:?}"
        );
        assert!(heads[2].contains("\r\ncontent-length: 5\r\n"), "{heads:?}");
        assert!(
            heads[3].contains("\r\ntransfer-encoding: chunked\r\n") && !heads[3].contains("content-length"),
            "{heads:?}"
        );
        let bodies = seen.bodies.lock().unwrap().clone();
        assert_eq!(bodies[2], b"hello");
        let dechunked = dechunk(&bodies[3]);
        assert_eq!(dechunked.len(), big.len());
        assert_eq!(seen.accepted(), 1, "{heads:?}");
        task.abort();
    }

    /// A body of these frames and no known length.
    struct Frames(VecDeque<Bytes>);

    impl hyper::body::Body for Frames {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    fn frames(frames: Vec<Bytes>) -> Frames {
        Frames(frames.into())
    }

    fn dechunk(mut raw: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap(), 16).unwrap();
            raw = &raw[line_end + 2..];
            if size == 0 {
                return out;
            }
            out.extend_from_slice(&raw[..size]);
            assert_eq!(&raw[size..size + 2], b"\r\n");
            raw = &raw[size + 2..];
        }
    }

    /// A machine that answers an upload at once, without reading it, and then neither reads nor
    /// closes: the edge must pass the answer on rather than wait to finish sending the body.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_machine_answering_an_upload_early_without_reading_it_does_not_hang_the_request() {
        let (edge, machine, _edge) = edge().await;
        let task = tokio::spawn(async move {
            let listener = TcpListener::bind(machine).await.unwrap();
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).await.is_ok_and(|n| n > 0) {
                    head.push(b[0]);
                }
                let _ = s
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big!")
                    .await;
                held.push(s);
            }
        });
        // 16 MiB, chunked: far more than socket buffers hold. A raw client, writing on while it
        // reads (the edge may close the client's connection before it has read the whole body).
        let (mut rd, mut wr) = TcpStream::connect(edge).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let head = "POST /upload HTTP/1.1\r\nhost: a.localhost\r\ntransfer-encoding: chunked\r\n\r\n";
            wr.write_all(head.as_bytes()).await?;
            let chunk = [b"10000\r\n".as_slice(), &[b'u'; 0x10000], b"\r\n"].concat();
            for _ in 0..256 {
                wr.write_all(&chunk).await?;
            }
            wr.write_all(b"0\r\n\r\n").await?;
            Ok::<_, std::io::Error>(wr)
        });
        let mut answer = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            while !answer.ends_with(b"too big!") {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read).await.unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
        assert!(answer.ends_with("\r\n\r\ntoo big!"), "{answer}");
        writer.abort();
        task.abort();
    }
}
