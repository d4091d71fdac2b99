//! `aloft proxy` end to end: the real `aloftd` with the in-memory machine driver
//! (`--driver fake --network none`) on a free port with a temporary data directory and config
//! home, and the real `aloft proxy` as a child process.
//!
//! A fake machine runs nothing: aloftd connects a proxied connection to port P of a started fake
//! machine to `127.0.0.1:P` of the host, so an echo server there plays the machine's workload.
//! The echo server sends back what it reads and, once it read the end of stream, `bye\n`, then
//! closes: seeing `bye` after the echo proves the client's half-close reached it while the other
//! direction stayed open.
//!
//! Every `aloft proxy` started here is killed when its test ends, however it ends (the
//! [`Proxy`] guard), and the short-lived commands are killed if they outlive a deadline.
//!
//! `aloftd` is taken from `$ALOFTD_BIN`, else from the target directory next to this test's
//! executable (`target/debug/aloftd`): build it first (`cargo build -p aloftd`).

mod common;

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Read as _, Write as _};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::process::{Child, Output, Stdio};
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use crate::common::{FakeAloftd as Env, free_port, stderr, stdout};

    /// How long anything here may take before the test gives up on it.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// An echo server on `127.0.0.1:port`, on threads of its own (left to end with the test
    /// process): each connection gets back what it sends and, after its end of stream, `bye\n`.
    fn echo_server_on(listener: TcpListener) -> u16 {
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match conn.read(&mut buf) {
                            Ok(0) => break,
                            Ok(n) => {
                                if conn.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                    let _ = conn.write_all(b"bye\n");
                    // Dropping the stream closes it: the client reads its end.
                });
            }
        });
        port
    }

    fn echo_server() -> u16 {
        echo_server_on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// A running `aloft proxy`: killed (and reaped) when dropped.
    struct Proxy {
        child: Child,
        lines: mpsc::Receiver<String>,
        stderr: Arc<Mutex<String>>,
    }

    impl Proxy {
        /// The next line of its stdout; panics (with its stderr) when there is none in time.
        fn line(&mut self) -> String {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => line,
                Err(e) => {
                    let status = self.child.try_wait().unwrap();
                    panic!(
                        "no line from aloft proxy ({e}; exited: {status:?}); stderr:\n{}",
                        self.stderr()
                    )
                }
            }
        }

        /// The local port of its `Proxying local port L to remote [ID]:R` line, checking the
        /// rest of the line.
        fn listening(&mut self, id: &str, remote: u16) -> u16 {
            let line = self.line();
            let port = line
                .strip_prefix("Proxying local port ")
                .and_then(|rest| rest.strip_suffix(&format!(" to remote [{id}]:{remote}")))
                .unwrap_or_else(|| panic!("unexpected first line {line:?}; stderr:\n{}", self.stderr()));
            let port: u16 = port.parse().unwrap();
            assert_ne!(port, 0);
            port
        }

        fn stderr(&self) -> String {
            self.stderr.lock().unwrap().clone()
        }

        /// Waits until its stderr contains `text`.
        fn wait_stderr(&self, text: &str) -> String {
            let deadline = Instant::now() + DEADLINE;
            loop {
                let err = self.stderr();
                if err.contains(text) {
                    return err;
                }
                assert!(Instant::now() < deadline, "{text:?} not in stderr:\n{err}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn pid(&self) -> String {
            self.child.id().to_string()
        }
    }

    impl Drop for Proxy {
        fn drop(&mut self) {
            // Only the process this test started.
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Starts `aloft ARGS…` (a proxy) with stdout read line by line and stderr collected.
    fn proxy(env: &Env, args: &[&str]) -> Proxy {
        let mut child = env
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    return;
                }
                collected
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Proxy { child, lines, stderr }
    }

    /// `aloft ARGS…` that is expected to end by itself: killed if it runs past the deadline
    /// (a proxy that should have refused to start), which fails the test.
    fn finite(env: &Env, args: &[&str]) -> Output {
        let mut child = env
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + DEADLINE;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("aloft {args:?} did not end: {}{}", stdout(&out), stderr(&out));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    /// A started machine named `name` in app `web` (created with it): its id.
    fn machine(env: &Env, name: &str) -> String {
        let m = env.json(&[
            "machine", "run", "-a", "web", "-n", name, "--yes", "--json", "busybox", "sleep", "inf",
        ]);
        assert_eq!(m["name"], name);
        m["id"].as_str().unwrap().to_owned()
    }

    fn connect(port: u16) -> TcpStream {
        let conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        conn
    }

    /// Sends `data`, reads it back, half-closes, and reads `bye` and the end of stream.
    fn exchange(conn: &mut TcpStream, data: &[u8]) {
        conn.write_all(data).unwrap();
        let mut back = vec![0u8; data.len()];
        conn.read_exact(&mut back).unwrap();
        assert!(back == data, "echo differs");
        half_close(conn);
    }

    /// Shuts down the writing side; what arrives then is `bye\n`, then the end of stream.
    fn half_close(conn: &mut TcpStream) {
        conn.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
        assert_eq!(String::from_utf8_lossy(&rest), "bye\n");
    }

    #[test]
    fn proxies_connections_both_ways_with_half_close() {
        let env = Env::start();
        let echo = echo_server();
        let id = machine(&env, "db-1");
        let mut p = proxy(&env, &["proxy", &format!("0:{echo}"), "-a", "web"]);
        let local = p.listening(&id, echo);
        // No REMOTE_HOST: the app's first started machine, and it says so.
        p.wait_stderr(&format!(
            "Using machine {id} (db-1), the first started machine of app web"
        ));

        // Two connections at once, interleaved.
        let mut a = connect(local);
        let mut b = connect(local);
        a.write_all(b"one\n").unwrap();
        b.write_all(b"two\n").unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"two\n");
        a.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"one\n");
        // Binary data, more than any buffer on the way, written while it is read back.
        let payload: Vec<u8> = (0..=255u8).cycle().take(4 << 20).collect();
        let writer = {
            let mut a = a.try_clone().unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || a.write_all(&payload).unwrap())
        };
        let mut back = vec![0u8; payload.len()];
        a.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == payload, "the payload came back different");
        // Half-close: the echo server sees the end only now (its `bye` proves it), and the
        // way back stays open for it; the other connection is not affected.
        half_close(&mut a);
        exchange(&mut b, b"still here\n");

        // A connection after others ended.
        exchange(&mut connect(local), b"three\n");
        assert!(!p.stderr().contains("error"), "{}", p.stderr());

        // Ctrl-C ends it, with 0.
        let kill = std::process::Command::new("kill")
            .args(["-INT", &p.pid()])
            .status()
            .unwrap();
        assert!(kill.success());
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "aloft proxy outlived SIGINT");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(0), "{}", p.stderr());
    }

    #[test]
    fn remote_host_names_the_machine() {
        let env = Env::start();
        let echo = echo_server();
        let first = machine(&env, "db-1");
        let id = machine(&env, "db-2");
        let ports = format!("0:{echo}");
        // By id, by ID.vm.APP.internal (the app from the name: no -a), by name; APP.internal is
        // the first started machine (and says so).
        for (host, app, expected) in [
            (id.clone(), Some("web"), &id),
            (format!("{id}.vm.web.internal"), None, &id),
            ("db-2".to_owned(), Some("web"), &id),
            ("web.internal".to_owned(), None, &first),
        ] {
            let mut args = vec!["proxy", &ports, &host];
            if let Some(app) = app {
                args.extend(["-a", app]);
            }
            let mut p = proxy(&env, &args);
            let local = p.listening(expected, echo);
            exchange(&mut connect(local), host.as_bytes());
            let defaulted = host == "web.internal";
            assert_eq!(
                p.stderr().contains("Using machine"),
                defaulted,
                "{host}: {}",
                p.stderr()
            );
        }

        // LOCAL:REMOTE on a fixed local port, quiet: nothing printed, and it proxies.
        let local = free_port();
        let mut p = proxy(
            &env,
            &["proxy", &format!("{local}:{echo}"), &id, "-a", "web", "-q"],
        );
        let deadline = Instant::now() + DEADLINE;
        let mut conn = loop {
            if let Ok(conn) = TcpStream::connect(("127.0.0.1", local)) {
                break conn;
            }
            assert!(p.child.try_wait().unwrap().is_none(), "{}", p.stderr());
            assert!(Instant::now() < deadline, "nothing listens on {local}");
            std::thread::sleep(Duration::from_millis(20));
        };
        conn.set_read_timeout(Some(DEADLINE)).unwrap();
        exchange(&mut conn, b"quiet\n");
        let _ = p.child.kill();
        let _ = p.child.wait();
        assert!(p.lines.recv_timeout(Duration::from_secs(1)).is_err());
        assert_eq!(p.stderr(), "");
    }

    #[test]
    fn a_failed_connection_is_reported_and_the_proxy_goes_on() {
        let env = Env::start();
        let id = machine(&env, "db-1");
        // A port nothing listens on yet.
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let remote = held.local_addr().unwrap().port();
        drop(held);
        let mut p = proxy(&env, &["proxy", &format!("0:{remote}"), &id, "-a", "web"]);
        let local = p.listening(&id, remote);

        // The connection is accepted, then closed when aloftd's connection is refused.
        let mut conn = connect(local);
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        assert!(rest.is_empty());
        let err = p.wait_stderr("hint:");
        assert!(err.contains("error: connection from 127.0.0.1:"), "{err}");
        assert!(err.contains("(HTTP 502)"), "{err}");
        assert!(err.contains("listen on [::]"), "{err}");
        assert!(p.child.try_wait().unwrap().is_none(), "the proxy ended: {err}");

        // Something listens there now: the next connection goes through.
        echo_server_on(TcpListener::bind(("127.0.0.1", remote)).unwrap());
        exchange(&mut connect(local), b"now\n");

        // The machine stops under it: aloftd's 412, with how to start it again.
        env.ok(&["machine", "stop", &id, "-a", "web"]);
        let mut conn = connect(local);
        let _ = conn.read_to_end(&mut Vec::new());
        let err = p.wait_stderr("start it again");
        assert!(err.contains("(HTTP 412)"), "{err}");
        assert!(err.contains(&format!("aloft machine start {id} -a web")), "{err}");
        assert!(p.child.try_wait().unwrap().is_none(), "the proxy ended: {err}");
    }

    #[test]
    fn refusals_at_start_say_what_is_wrong() {
        let env = Env::start();
        let echo = echo_server();
        let ports = format!("0:{echo}");
        let fails = |args: &[&str], code: i32| {
            let out = finite(&env, args);
            assert_eq!(
                out.status.code(),
                Some(code),
                "aloft {args:?}\nstdout: {}\nstderr: {}",
                stdout(&out),
                stderr(&out)
            );
            assert_eq!(stdout(&out), "", "{args:?}: nothing listened");
            stderr(&out)
        };

        // An app without machines.
        env.ok(&["apps", "create", "web"]);
        let err = fails(&["proxy", &ports, "-a", "web"], 1);
        assert!(err.contains("app web has no started machine"), "{err}");

        let id = machine(&env, "db-1");
        // An unknown machine, by id and by name; an unknown app.
        let err = fails(&["proxy", &ports, "0000000000dead", "-a", "web"], 3);
        assert!(
            err.contains("error: machine 0000000000dead not found in app web"),
            "{err}"
        );
        let err = fails(&["proxy", &ports, "0000000000dead.vm.web.internal"], 3);
        assert!(err.contains("machine 0000000000dead not found"), "{err}");
        let err = fails(&["proxy", &ports, "nope", "-a", "web"], 3);
        assert!(err.contains("no machine named nope in app web"), "{err}");
        let err = fails(&["proxy", &ports, &id, "-a", "nope"], 3);
        assert!(err.contains("app nope not found"), "{err}");

        // Usage: a port 0 with no remote port, a host name of another app than -a's, a host
        // name aloft does not know, --select with a machine named.
        let err = fails(&["proxy", "0", "-a", "web"], 2);
        assert!(err.contains("0:5432"), "{err}");
        let err = fails(
            &["proxy", &ports, &format!("{id}.vm.web.internal"), "-a", "api"],
            2,
        );
        assert!(
            err.contains("REMOTE_HOST names app web but -a/--app says api"),
            "{err}"
        );
        let err = fails(&["proxy", &ports, "ams.web.internal"], 2);
        assert!(err.contains("ID.vm.APP.internal"), "{err}");
        fails(&["proxy", &ports, &id, "-s", "-a", "web"], 2);

        // A local port that is taken.
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = fails(&["proxy", &format!("{port}:{echo}"), &id, "-a", "web"], 1);
        assert!(err.contains("choose another local port"), "{err}");

        // A stopped machine is refused before anything listens, with how to start it.
        env.ok(&["machine", "stop", &id, "-a", "web"]);
        let err = fails(&["proxy", &ports, &id, "-a", "web"], 1);
        assert!(
            err.contains(&format!("machine {id} is not started (stopped)")),
            "{err}"
        );
        assert!(
            err.contains(&format!("hint: start it first: aloft machine start {id} -a web")),
            "{err}"
        );
        // And without a machine named: none is started.
        let err = fails(&["proxy", &ports, "-a", "web"], 1);
        assert!(err.contains("app web has no started machine"), "{err}");
    }
}
