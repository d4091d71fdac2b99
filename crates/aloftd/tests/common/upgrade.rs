//! A raw HTTP/1.1 client for the routes that upgrade their connection (console, proxy): the
//! request, the answer's head (and its JSON body unless it switched protocols), then the
//! connection's bytes.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long a read waits before the test fails.
pub(crate) const T: Duration = Duration::from_secs(10);

/// One HTTP/1.1 request's answer: status, headers (lowercase names) and, unless it switched
/// protocols, the body as JSON.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn error(&self) -> &str {
        self.body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {}", self.body))
    }
}

/// A client connection after its answer's head; `buf` holds what came after the head.
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: Vec<u8>,
}

impl Conn {
    /// Sends `GET path` with `token` (when given) and `headers`; reads the answer (and its
    /// body unless it is a 101).
    pub(crate) async fn get(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        headers: &[&str],
    ) -> (Answer, Self) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for h in headers {
            req.push_str(h);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut conn = Self {
            stream,
            buf: Vec::new(),
        };
        let head = loop {
            if let Some(end) = conn.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(conn.buf[..end].to_vec()).unwrap();
                conn.buf.drain(..end + 4);
                break head;
            }
            assert!(conn.fill().await, "the server closed before answering");
        };
        let mut lines = head.split("\r\n");
        let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_owned())
            })
            .collect();
        let mut answer = Answer {
            status,
            headers,
            body: Value::Null,
        };
        if status != 101 {
            let len: usize = answer.header("content-length").unwrap().parse().unwrap();
            while conn.buf.len() < len {
                assert!(conn.fill().await, "the body ended early");
            }
            answer.body = super::json(&conn.buf[..len]);
            conn.buf.drain(..len);
        }
        (answer, conn)
    }

    /// Reads more into `buf`; false at the end of the stream.
    pub(crate) async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        let n = tokio::time::timeout(T, self.stream.read(&mut chunk))
            .await
            .expect("the server sent nothing for 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Exactly `n` bytes.
    pub(crate) async fn read_n(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill().await, "the stream ended after {:?}", self.buf);
        }
        self.buf.drain(..n).collect()
    }

    /// Everything until the end of the stream.
    pub(crate) async fn read_to_end(&mut self) -> Vec<u8> {
        while self.fill().await {}
        std::mem::take(&mut self.buf)
    }
}
