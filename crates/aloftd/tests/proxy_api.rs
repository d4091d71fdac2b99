//! `GET …/machines/{id}/proxy?port=N` (`aloft proxy`) end to end in process: the real router
//! (`aloft-control`) over the real agent on its `FakeDriver`, served by `axum::serve` on a
//! loopback socket, as aloftd serves it. A fake machine runs nothing, so its ports are the
//! host's loopback (`FakeDriver::connect`): a listener on `127.0.0.1:P` plays the workload
//! listening on the machine's port P. The client is raw HTTP/1.1, so these tests pin the wire
//! protocol itself (`aloft_api::tunnel`).

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use aloft_agent::DriverOp;
    use axum::http::StatusCode;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use crate::common::Harness;
    use crate::common::upgrade::{Conn, T};

    const UPGRADE: &[&str] = &["Connection: Upgrade", "Upgrade: aloft-tcp"];
    /// What each side sends in the big transfer.
    const BIG: usize = 1 << 20;

    fn proxy(app: &str, id: &str, query: &str) -> String {
        format!("/v1/apps/{app}/machines/{id}/proxy?{query}")
    }

    /// A workload listening on a fake machine's port (`127.0.0.1:port`): it echoes what it
    /// reads; at the client's end of stream it answers `eof after N bytes\n` and closes. Each
    /// connection's byte count is reported on the channel once it saw the end of stream.
    struct Echo {
        port: u16,
        accepted: Arc<AtomicUsize>,
        eofs: mpsc::UnboundedReceiver<usize>,
    }

    impl Echo {
        async fn start() -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let accepted = Arc::new(AtomicUsize::new(0));
            let (tx, eofs) = mpsc::unbounded_channel();
            let count = accepted.clone();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        let mut total = 0;
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) => break,
                                Ok(n) => {
                                    total += n;
                                    if s.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                                Err(_) => return,
                            }
                        }
                        let _ = tx.send(total);
                        let _ = s.write_all(format!("eof after {total} bytes\n").as_bytes()).await;
                        let _ = s.shutdown().await;
                    });
                }
            });
            Self { port, accepted, eofs }
        }

        /// Connections accepted so far (the listener's task may lag behind the kernel's
        /// handshake: see `wait_accepted`).
        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }

        /// Waits until `n` connections were accepted.
        async fn wait_accepted(&self, n: usize) {
            let deadline = Instant::now() + T;
            while self.accepted() < n {
                assert!(
                    Instant::now() < deadline,
                    "{} connections, not {n}",
                    self.accepted()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }

    /// How many connections the host was asked to make.
    fn connects(h: &Harness) -> usize {
        h.fake
            .world()
            .calls
            .iter()
            .filter(|(op, _)| *op == DriverOp::Connect)
            .count()
    }

    /// A port of the loopback that nothing listens on.
    fn closed_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// `len` bytes of a pattern that a lost, repeated or reordered chunk breaks.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i % 251).unwrap().wrapping_add(seed))
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_proxy_carries_bytes_both_ways_and_passes_half_closes_on() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let mut echo = Echo::start().await;
        let path = proxy("web", &id, &format!("port={}", echo.port));

        let (answer, mut c) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(answer.status, 101, "{}", answer.body);
        assert_eq!(answer.header("upgrade"), Some("aloft-tcp"));
        assert_eq!(answer.header("connection"), Some("upgrade"));
        assert_eq!(connects(&h), 1, "connected before the 101");
        echo.wait_accepted(1).await;
        // Small exchanges, in order.
        c.stream.write_all(b"hello ").await.unwrap();
        assert_eq!(c.read_n(6).await, b"hello ");
        c.stream.write_all(b"world").await.unwrap();
        assert_eq!(c.read_n(5).await, b"world");

        // 1 MiB up while 1 MiB comes back (the echo), read concurrently.
        let up = pattern(BIG, 7);
        let (mut rd, mut wr) = c.stream.into_split();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            wr.write_all(&sent).await.unwrap();
            wr
        });
        let mut down = std::mem::take(&mut c.buf);
        let mut chunk = vec![0u8; 64 * 1024];
        while down.len() < BIG {
            let n = tokio::time::timeout(T, rd.read(&mut chunk))
                .await
                .expect("the echo stalled")
                .unwrap();
            assert!(n > 0, "the stream ended after {} bytes", down.len());
            down.extend_from_slice(&chunk[..n]);
        }
        assert!(down == up, "1 MiB came back changed");
        let mut wr = writer.await.unwrap();

        // The client's half-close reaches the workload as its end of stream; the workload's
        // answer after it still arrives, then its close ends the stream.
        wr.shutdown().await.unwrap();
        let seen = tokio::time::timeout(T, echo.eofs.recv()).await.unwrap().unwrap();
        assert_eq!(seen, 11 + BIG);
        let mut rest = Vec::new();
        tokio::time::timeout(T, rd.read_to_end(&mut rest))
            .await
            .expect("the workload's close did not end the stream")
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&rest),
            format!("eof after {} bytes\n", 11 + BIG)
        );
        // The machine is untouched.
        let (_, m) = h.call("GET", &format!("/v1/apps/web/machines/{id}"), None).await;
        assert_eq!(m["state"], "started");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_workload_speaking_first_and_closing_ends_the_stream() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        // A workload that greets, reads one line, answers it and closes (as a server that
        // hangs up on QUIT does), while the client still has its side open.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let workload = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 ready\n").await.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            s.write_all(format!("221 bye {}\n", String::from_utf8_lossy(&line)).as_bytes())
                .await
                .unwrap();
        });
        let (answer, mut c) = Conn::get(
            addr,
            &proxy("web", &id, &format!("port={port}")),
            Some(&h.token),
            UPGRADE,
        )
        .await;
        assert_eq!(answer.status, 101, "{}", answer.body);
        assert_eq!(c.read_n(10).await, b"220 ready\n");
        c.stream.write_all(b"QUIT\n").await.unwrap();
        assert_eq!(c.read_to_end().await, b"221 bye QUIT\n");
        workload.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_are_json_errors_before_the_upgrade() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let echo = Echo::start().await;
        let token = Some(h.token.as_str());
        let port = format!("port={}", echo.port);
        let path = proxy("web", &id, &port);

        // No upgrade asked: 426 naming the protocol.
        let (a, _) = Conn::get(addr, &path, token, &[]).await;
        assert_eq!(a.status, 426, "{}", a.body);
        assert_eq!(a.header("upgrade"), Some("aloft-tcp"));
        assert!(a.error().contains("Upgrade: aloft-tcp"), "{}", a.error());
        assert!(a.error().contains("aloft proxy"), "{}", a.error());
        let (a, _) = Conn::get(addr, &path, token, &["Upgrade: aloft-tcp"]).await;
        assert_eq!(a.status, 426, "without Connection: upgrade: {}", a.body);
        // Another protocol: 400.
        let (a, _) = Conn::get(addr, &path, token, &["Connection: upgrade", "Upgrade: websocket"]).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.error().contains("websocket"), "{}", a.error());
        // No port, a bad one.
        let (a, _) = Conn::get(addr, &proxy("web", &id, ""), token, UPGRADE).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.error().contains("port is required"), "{}", a.error());
        for bad in ["port=0", "port=65536", "port=pg"] {
            let (a, _) = Conn::get(addr, &proxy("web", &id, bad), token, UPGRADE).await;
            assert_eq!(a.status, 400, "{bad}: {}", a.body);
            assert!(a.error().contains("1 to 65535"), "{}", a.error());
        }
        // No token, an unknown machine or app.
        let (a, _) = Conn::get(addr, &path, None, UPGRADE).await;
        assert_eq!(a.status, 401, "{}", a.body);
        let (a, _) = Conn::get(addr, &proxy("web", "3d8d413b29d089", &port), token, UPGRADE).await;
        assert_eq!(a.status, 404, "{}", a.body);
        let (a, _) = Conn::get(addr, &proxy("nope", &id, &port), token, UPGRADE).await;
        assert_eq!(a.status, 404, "{}", a.body);
        // Another organization's token does not reach the app's machines.
        let other = aloft_control::create_token(&h.control, "acme", "ci")
            .unwrap()
            .token;
        let (a, _) = Conn::get(addr, &path, Some(&other), UPGRADE).await;
        assert_eq!(a.status, 403, "{}", a.body);
        assert_eq!(echo.accepted(), 0, "nothing reached the workload");
        assert_eq!(connects(&h), 0, "every refusal came before the host");

        // Nothing listening on the port: 502 naming it, the machine and what to check.
        let closed = closed_port();
        let (a, _) = Conn::get(
            addr,
            &proxy("web", &id, &format!("port={closed}")),
            token,
            UPGRADE,
        )
        .await;
        assert_eq!(a.status, 502, "{}", a.body);
        assert!(
            a.error().contains(&format!(
                "nothing accepted a connection on port {closed} of machine {id}"
            )),
            "{}",
            a.error()
        );
        assert!(a.error().contains("[::]"), "{}", a.error());

        // A stopped machine: 412, and the host makes no connection.
        let (s, body) = h
            .call("POST", &format!("/v1/apps/web/machines/{id}/stop"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        h.wait("web", &id, "stopped").await;
        let before = connects(&h);
        let (a, _) = Conn::get(addr, &path, token, UPGRADE).await;
        assert_eq!(a.status, 412, "{}", a.body);
        assert!(a.error().contains("stopped"), "{}", a.error());
        assert_eq!(connects(&h), before);
        assert_eq!(echo.accepted(), 0, "nothing reached the workload");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn proxies_per_server_are_capped() {
        let mut h = Harness::new(|_| {});
        h.tune_state(|s| s.with_max_proxies(1));
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let mut echo = Echo::start().await;
        let path = proxy("web", &id, &format!("port={}", echo.port));
        let (a, mut first) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 101, "{}", a.body);
        let (a, _) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(a.error().contains("proxied connections"), "{}", a.error());
        assert_eq!(connects(&h), 1, "the refused one never connected");

        // The first is still served; once both its sides are closed, its place is free.
        first.stream.write_all(b"ping").await.unwrap();
        assert_eq!(first.read_n(4).await, b"ping");
        first.stream.shutdown().await.unwrap();
        assert_eq!(tokio::time::timeout(T, echo.eofs.recv()).await.unwrap(), Some(4));
        assert_eq!(first.read_to_end().await, b"eof after 4 bytes\n");
        drop(first);
        let deadline = Instant::now() + T;
        loop {
            let (a, _) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
            if a.status == 101 {
                break;
            }
            assert_eq!(a.status, 503, "{}", a.body);
            assert!(Instant::now() < deadline, "the ended proxy kept its place");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        echo.wait_accepted(2).await;
    }
}
