//! `GET …/machines/{id}/console` end to end in process: the real router (`aloft-control`) over
//! the real agent on its `FakeDriver` (whose sessions run a fake shell: it echoes lines, answers
//! `size` and `env NAME`, exits on `exit N`), served by `axum::serve` on a loopback socket, as
//! aloftd serves it — an upgraded connection needs a real one. The client is raw HTTP/1.1 and
//! the `aloft_api::ConsoleFrame` codec, so these tests pin the wire protocol itself.

mod common;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use aloft_api::{ConsoleExit, ConsoleFrame, TtySize};
    use axum::http::StatusCode;
    use tokio::io::AsyncWriteExt as _;

    use crate::common::Harness;
    use crate::common::upgrade::{Conn, T};

    /// A machine's console path.
    fn console(app: &str, id: &str, query: &str) -> String {
        format!("/v1/apps/{app}/machines/{id}/console?{query}")
    }

    /// The console's frames over an upgraded connection.
    trait Frames {
        async fn send(&mut self, frame: &ConsoleFrame);
        async fn stdin(&mut self, text: &str);
        async fn recv(&mut self) -> Option<ConsoleFrame>;
        async fn expect_stdout(&mut self, want: &str);
        async fn expect_last(&mut self) -> ConsoleFrame;
    }

    impl Frames for Conn {
        async fn send(&mut self, frame: &ConsoleFrame) {
            let mut wire = Vec::new();
            frame.encode(&mut wire);
            self.stream.write_all(&wire).await.unwrap();
        }

        async fn stdin(&mut self, text: &str) {
            self.send(&ConsoleFrame::Stdin(text.as_bytes().to_vec())).await;
        }

        /// The next frame; `None` when the server closed the connection.
        async fn recv(&mut self) -> Option<ConsoleFrame> {
            loop {
                if let Some((frame, n)) = ConsoleFrame::decode(&self.buf).unwrap() {
                    self.buf.drain(..n);
                    return Some(frame);
                }
                if !self.fill().await {
                    assert!(self.buf.is_empty(), "a partial frame at the end: {:?}", self.buf);
                    return None;
                }
            }
        }

        /// Stdout until exactly `want` arrived (frames may split or join lines).
        async fn expect_stdout(&mut self, want: &str) {
            let mut got = Vec::new();
            while got.len() < want.len() {
                match self.recv().await {
                    Some(ConsoleFrame::Stdout(d)) => got.extend_from_slice(&d),
                    other => panic!("wanted stdout {want:?}, got {other:?} after {got:?}"),
                }
            }
            assert_eq!(String::from_utf8_lossy(&got), want);
        }

        /// The server's last frame, then the end of the connection.
        async fn expect_last(&mut self) -> ConsoleFrame {
            let last = self.recv().await.expect("the server closed without a last frame");
            assert_eq!(self.recv().await, None, "nothing after {last:?}");
            last
        }
    }

    const UPGRADE: &[&str] = &["Connection: Upgrade", "Upgrade: aloft-console"];

    fn exit(code: i32) -> ConsoleFrame {
        ConsoleFrame::Exit(ConsoleExit {
            exit_code: Some(code),
            signal: None,
        })
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_console_streams_both_ways_over_the_upgraded_connection() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let path = console(
            "web",
            &id,
            "cmd=sh&cmd=-i&tty=true&rows=24&cols=80&term=xterm-256color&user=postgres",
        );
        let (answer, mut c) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(answer.status, 101, "{}", answer.body);
        assert_eq!(answer.header("upgrade"), Some("aloft-console"));
        assert_eq!(answer.header("connection"), Some("upgrade"));
        // Stdin in pieces: a line is answered once complete.
        c.stdin("hel").await;
        c.stdin("lo\n").await;
        c.expect_stdout("hello\n").await;
        c.stdin("size\n").await;
        c.expect_stdout("24 80\n").await;
        c.send(&ConsoleFrame::Resize(TtySize { rows: 50, cols: 132 }))
            .await;
        c.stdin("size\nenv TERM\nerr on the terminal\n").await;
        c.expect_stdout("50 132\nxterm-256color\non the terminal\n").await;
        c.stdin("exit 3\n").await;
        assert_eq!(c.expect_last().await, exit(3));
        let w = h.fake.world();
        let rec = &w.sessions[0];
        assert_eq!(rec.argv, ["sh", "-i"]);
        assert_eq!(rec.user.as_deref(), Some("postgres"));
        assert_eq!(rec.exit, Some((Some(3), None)));
        assert!(rec.closed, "the session is dropped before the connection closes");

        // Without a command: a shell (the fake image has bash), on pipes: stderr stays apart;
        // an Eof frame closes stdin and the shell exits.
        let (answer, mut c) = Conn::get(addr, &console("web", &id, ""), Some(&h.token), UPGRADE).await;
        assert_eq!(answer.status, 101, "{}", answer.body);
        c.stdin("size\nerr oops\n").await;
        c.expect_stdout("no tty\n").await;
        assert_eq!(c.recv().await, Some(ConsoleFrame::Stderr(b"oops\n".to_vec())));
        c.send(&ConsoleFrame::Eof).await;
        assert_eq!(c.expect_last().await, exit(0));
        assert_eq!(h.fake.world().sessions[1].argv, ["/bin/bash"]);

        // A signal ends the fake shell with it.
        let (_, mut c) = Conn::get(addr, &console("web", &id, "cmd=cat"), Some(&h.token), UPGRADE).await;
        c.send(&ConsoleFrame::Signal(15)).await;
        assert_eq!(
            c.expect_last().await,
            ConsoleFrame::Exit(ConsoleExit {
                exit_code: None,
                signal: Some(15)
            })
        );

        // The machine stopping under a session ends it with an error frame.
        let (_, mut c) = Conn::get(addr, &console("web", &id, "cmd=cat"), Some(&h.token), UPGRADE).await;
        c.stdin("ping\n").await;
        c.expect_stdout("ping\n").await;
        let (s, body) = h
            .call("POST", &format!("/v1/apps/web/machines/{id}/stop"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        match c.expect_last().await {
            ConsoleFrame::Error(m) => assert!(m.contains("not running"), "{m}"),
            other => panic!("wanted an error frame, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn refusals_are_json_errors_before_the_upgrade() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let token = Some(h.token.as_str());
        let path = console("web", &id, "cmd=sh");

        // No upgrade asked: 426 naming the protocol.
        let (a, _) = Conn::get(addr, &path, token, &[]).await;
        assert_eq!(a.status, 426, "{}", a.body);
        assert_eq!(a.header("upgrade"), Some("aloft-console"));
        assert!(a.error().contains("Upgrade: aloft-console"), "{}", a.error());
        let (a, _) = Conn::get(addr, &path, token, &["Upgrade: aloft-console"]).await;
        assert_eq!(a.status, 426, "without Connection: upgrade: {}", a.body);
        // Another protocol: 400.
        let (a, _) = Conn::get(addr, &path, token, &["Connection: upgrade", "Upgrade: websocket"]).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.error().contains("websocket"), "{}", a.error());
        // A bad query, no token, an unknown machine or app.
        let (a, _) = Conn::get(addr, &console("web", &id, "tty=maybe"), token, UPGRADE).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(a.error().contains("tty"), "{}", a.error());
        let (a, _) = Conn::get(addr, &path, None, UPGRADE).await;
        assert_eq!(a.status, 401, "{}", a.body);
        let (a, _) = Conn::get(addr, &console("web", "3d8d413b29d089", ""), token, UPGRADE).await;
        assert_eq!(a.status, 404, "{}", a.body);
        let (a, _) = Conn::get(addr, &console("nope", &id, ""), token, UPGRADE).await;
        assert_eq!(a.status, 404, "{}", a.body);
        // A program the image does not have: init's refusal, 400.
        h.fake.missing_program("/app/nope");
        let (a, _) = Conn::get(addr, &console("web", &id, "cmd=/app/nope"), token, UPGRADE).await;
        assert_eq!(a.status, 400, "{}", a.body);
        assert!(
            a.error().contains("executable not found: /app/nope"),
            "{}",
            a.error()
        );
        // A stopped machine: 412.
        let (s, body) = h
            .call("POST", &format!("/v1/apps/web/machines/{id}/stop"), None)
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        h.wait("web", &id, "stopped").await;
        let (a, _) = Conn::get(addr, &path, token, UPGRADE).await;
        assert_eq!(a.status, 412, "{}", a.body);
        assert!(a.error().contains("stopped"), "{}", a.error());
        assert!(h.fake.world().sessions.is_empty(), "nothing ran");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_client_going_away_kills_the_command() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let (a, mut c) = Conn::get(addr, &console("web", &id, "cmd=sh"), Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 101, "{}", a.body);
        c.stdin("hello\n").await;
        c.expect_stdout("hello\n").await;
        assert!(!h.fake.world().sessions[0].closed);
        drop(c);
        assert!(
            h.fake.wait_until(T, |w| w.sessions[0].closed),
            "the session outlived its connection"
        );
        let rec = h.fake.world().sessions[0].clone();
        assert_eq!(rec.exit, None, "killed, not exited: {rec:?}");
        // The machine is untouched.
        let (_, m) = h.call("GET", &format!("/v1/apps/web/machines/{id}"), None).await;
        assert_eq!(m["state"], "started");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_malformed_client_frame_ends_the_session_with_an_error() {
        let h = Harness::new(|_| {});
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let path = console("web", &id, "cmd=sh");
        let cases: [(&[u8], &str); 4] = [
            (&[9, 0, 0, 0, 0], "unknown console frame kind 9"),
            (&[2, 0, 0, 0, 1, 7], "a resize is 4 bytes"),
            (&[3, 0, 0, 0, 4, 0, 0, 0, 99], "signal 99"),
            (&[16, 0, 0, 0, 1, b'x'], "the server's"),
        ];
        for (i, (wire, needle)) in cases.into_iter().enumerate() {
            let (a, mut c) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
            assert_eq!(a.status, 101, "{}", a.body);
            // Good frames before the bad one are applied.
            c.stdin("before\n").await;
            c.expect_stdout("before\n").await;
            c.stream.write_all(wire).await.unwrap();
            match c.expect_last().await {
                ConsoleFrame::Error(m) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
                other => panic!("wanted an error frame, got {other:?}"),
            }
            let rec = h.fake.world().sessions[i].clone();
            assert!(rec.closed && rec.exit.is_none(), "{rec:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn consoles_per_server_are_capped() {
        let mut h = Harness::new(|_| {});
        h.tune_state(|s| s.with_max_consoles(1));
        let id = h.started_machine("web").await;
        let addr = h.serve().await;
        let path = console("web", &id, "cmd=sh");
        let (a, mut first) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 101, "{}", a.body);
        let (a, _) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(a.error().contains("console sessions"), "{}", a.error());
        // Refused sessions never start; an ended one frees its place.
        assert_eq!(h.fake.world().sessions.len(), 1);
        first.stdin("exit 0\n").await;
        assert_eq!(first.expect_last().await, exit(0));
        let (a, mut again) = Conn::get(addr, &path, Some(&h.token), UPGRADE).await;
        assert_eq!(a.status, 101, "{}", a.body);
        again.stdin("exit 7\n").await;
        assert_eq!(again.expect_last().await, exit(7));
    }
}
