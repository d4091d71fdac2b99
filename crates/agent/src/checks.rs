//! Health checks: the `tcp`, `http` and `https` checks of a machine's config (top-level
//! `checks` and `services[].checks`), run by the agent against a started machine, their
//! statuses reported in `Machine.checks` ([`aloft_api::CheckStatus`]).
//!
//! - **Definition**: names, defaults and semantics are [`aloft_api::checks`]'s (shared with the
//!   edge proxy, which runs the service checks again from the edge and routes by its own
//!   result). Checks only report: they never restart or stop a machine.
//! - **Lifecycle**: checks start when a machine becomes `started` (boot, resume, restart, a
//!   reattach on agent open), first run once `grace_period` has passed (until then the status is
//!   `warning`, "waiting for the grace period"), and stop — their statuses forgotten — as soon as
//!   any operation starts on the machine or its VM exits. Statuses live in memory only.
//! - **Target**: the address the host reaches the machine on, from its [`NetInfo`]: the first
//!   IPv4 address of its `net_config`, else its first address, else its `private_ip`. A machine
//!   without a network (`NoNetwork`) has none: its checks are critical and say so. A machine
//!   whose network lives in another network namespace is checked from the agent's namespace.
//! - **https**: rustls (ring) as [`aloft_tls::check`] sets it up for both sides: certificates
//!   checked against the host's trust store for `tls_server_name` (sent as SNI) or else the
//!   machine's address, unless `tls_skip_verify`; a failed handshake is critical and its output
//!   says what to change. Connect, handshake, request and status line share the one timeout.
//!
//! Threading: one thread per check while its machine is started, sleeping on a condvar between
//! runs so that a stop ends it at once (a probe in flight finishes within its timeout).

use aloft_net::Namespace;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aloft_api::checks::{
    CheckSpec, MAX_STATUS_LINE, Probe, Tls, http_request, http_state, parse_status_line, specs,
};
use aloft_api::{CheckState, CheckStatus, MachineConfig, MachineId, rfc3339};

use crate::driver::NetInfo;
use crate::ids::now_ms;

/// The address the host reaches the machine on (see the module docs).
pub(crate) fn target(net: Option<&NetInfo>) -> Option<IpAddr> {
    let net = net?;
    if let Some(c) = &net.net_config {
        if let Some(a) = c.addresses.iter().find(|a| a.addr.is_ipv4()) {
            return Some(a.addr);
        }
        if let Some(a) = c.addresses.first() {
            return Some(a.addr);
        }
    }
    net.private_ip.parse().ok()
}

fn io_message(e: &std::io::Error, timeout: Duration) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("timed out after {timeout:?}")
        }
        _ => e.to_string(),
    }
}

/// Runs one check against `ip` now: its state and output.
pub(crate) fn run(spec: &CheckSpec, ip: IpAddr) -> (CheckState, String) {
    let addr = SocketAddr::new(ip, spec.port);
    match &spec.probe {
        Probe::Invalid(why) => (CheckState::Critical, why.clone()),
        Probe::Tcp => match TcpStream::connect_timeout(&addr, spec.timeout) {
            Ok(_) => (CheckState::Passing, format!("connected to {addr}")),
            Err(e) => (
                CheckState::Critical,
                format!("connect to {addr}: {}", io_message(&e, spec.timeout)),
            ),
        },
        Probe::Http {
            method,
            path,
            headers,
            tls,
        } => {
            let scheme = if tls.is_some() { "https" } else { "http" };
            let what = format!("{method} {scheme}://{addr}{path}");
            match http(addr, method, path, headers, tls.as_ref(), spec.timeout) {
                Ok((code, line)) => (http_state(code), format!("{what}: {line}")),
                Err(e) => (CheckState::Critical, format!("{what}: {e}")),
            }
        }
    }
}

/// What is left until `deadline`; a `TimedOut` error once it has passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(std::io::ErrorKind::TimedOut.into())
    } else {
        Ok(d)
    }
}

/// A connection an http check speaks over: plain TCP, or TLS on it. Every socket read and write
/// is bounded by what is left until the check's deadline, so a peer that dribbles bytes cannot
/// stretch a run past its timeout.
enum Conn {
    Plain(TcpStream),
    Tls {
        tls: Box<rustls::ClientConnection>,
        tcp: TcpStream,
    },
}

/// Writes out the TLS records rustls has queued.
fn write_records(
    tls: &mut rustls::ClientConnection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> std::io::Result<()> {
    while tls.wants_write() {
        tcp.set_write_timeout(Some(left(deadline)?))?;
        tls.write_tls(tcp)?;
    }
    Ok(())
}

/// Reads what the socket has (one read) and processes the TLS records in it: `false` at the end
/// of the stream. A TLS error is sent to the peer (its alert) and returned inside the I/O error.
fn read_records(
    tls: &mut rustls::ClientConnection,
    tcp: &mut TcpStream,
    deadline: Instant,
) -> std::io::Result<bool> {
    tcp.set_read_timeout(Some(left(deadline)?))?;
    if tls.read_tls(tcp)? == 0 {
        return Ok(false);
    }
    if let Err(e) = tls.process_new_packets() {
        let _alert_sent = write_records(tls, tcp, deadline);
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    }
    Ok(true)
}

impl Conn {
    fn send(&mut self, data: &[u8], deadline: Instant) -> std::io::Result<()> {
        match self {
            Conn::Plain(tcp) => {
                tcp.set_write_timeout(Some(left(deadline)?))?;
                tcp.write_all(data)
            }
            Conn::Tls { tls, tcp } => {
                tls.writer().write_all(data)?;
                write_records(tls, tcp, deadline)
            }
        }
    }

    /// Some bytes of the response; 0 at its end.
    fn recv(&mut self, buf: &mut [u8], deadline: Instant) -> std::io::Result<usize> {
        match self {
            Conn::Plain(tcp) => {
                tcp.set_read_timeout(Some(left(deadline)?))?;
                tcp.read(buf)
            }
            Conn::Tls { tls, tcp } => loop {
                match tls.reader().read(buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if !read_records(tls, tcp, deadline)? {
                            return Ok(0);
                        }
                    }
                    other => return other,
                }
            },
        }
    }
}

/// Sends the request, reads the status line: (status code, the line after the version). Over
/// TLS when `tls` is given; connect, handshake and exchange share the timeout.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    tls: Option<&Tls>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let deadline = Instant::now() + timeout;
    let tcp = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("connect: {}", io_message(&e, timeout)))?;
    let mut conn = match tls {
        None => Conn::Plain(tcp),
        Some(tls) => handshake(tcp, addr, tls, timeout, deadline)?,
    };
    let req = http_request(method, path, headers, &addr.to_string());
    conn.send(req.as_bytes(), deadline)
        .map_err(|e| format!("send: {}", io_message(&e, timeout)))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    let line = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break String::from_utf8_lossy(&buf[..end]).into_owned();
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err("no status line in the first 8 KiB of the response".into());
        }
        match conn.recv(&mut chunk, deadline) {
            Ok(0) => return Err("the connection closed before a response".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("receive: {}", io_message(&e, timeout))),
        }
    };
    parse_status_line(&line)
}

/// The TLS handshake of an https check on `tcp`, by `deadline`.
fn handshake(
    mut tcp: TcpStream,
    addr: SocketAddr,
    settings: &Tls,
    timeout: Duration,
    deadline: Instant,
) -> Result<Conn, String> {
    let config = aloft_tls::check::config(settings.skip_verify).map_err(|e| format!("TLS setup: {e}"))?;
    let name = aloft_tls::check::server_name(settings.server_name.as_deref(), addr.ip())?;
    let mut tls =
        rustls::ClientConnection::new(config, name.clone()).map_err(|e| format!("TLS setup: {e}"))?;
    let mut run = || -> std::io::Result<()> {
        while tls.is_handshaking() {
            write_records(&mut tls, &mut tcp, deadline)?;
            if tls.is_handshaking() && !read_records(&mut tls, &mut tcp, deadline)? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        write_records(&mut tls, &mut tcp, deadline)
    };
    run().map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("TLS handshake with {addr}: timed out after {timeout:?}")
        }
        _ => aloft_tls::check::handshake_failure(addr, &name, &e),
    })?;
    Ok(Conn::Tls {
        tls: Box::new(tls),
        tcp,
    })
}

/// A stop flag threads sleep on.
#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    cond: Condvar,
}

impl Stop {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn stop(&self) {
        *self.lock() = true;
        self.cond.notify_all();
    }

    fn is_stopped(&self) -> bool {
        *self.lock()
    }

    /// Sleeps `d` unless stopped first; returns whether it was stopped.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut stopped = self.lock();
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            stopped = self
                .cond
                .wait_timeout(stopped, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        true
    }
}

type Statuses = Arc<Mutex<Vec<CheckStatus>>>;

#[derive(Debug)]
struct Running {
    stop: Arc<Stop>,
    statuses: Statuses,
}

/// The checks of every started machine.
#[derive(Debug, Default)]
pub(crate) struct Checks {
    machines: Mutex<HashMap<MachineId, Running>>,
    /// Bumped whenever any status changes (state or output) or a machine's checks start or stop:
    /// the catalog publisher polls it to tell cheaply that nothing changed.
    epoch: Arc<AtomicU64>,
}

fn lock_statuses(s: &Statuses) -> MutexGuard<'_, Vec<CheckStatus>> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Checks {
    fn lock(&self) -> MutexGuard<'_, HashMap<MachineId, Running>> {
        self.machines
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the checks of a machine that just became started (those running are stopped
    /// first: a new boot has a new grace period).
    pub(crate) fn start(&self, id: &MachineId, config: &MachineConfig, net: Option<&NetInfo>) {
        self.stop(id);
        let specs = specs(config);
        if specs.is_empty() {
            return;
        }
        let now = rfc3339(now_ms());
        let statuses: Statuses = Arc::new(Mutex::new(
            specs
                .iter()
                .map(|s| CheckStatus {
                    name: s.name.clone(),
                    status: CheckState::Warning,
                    output: format!("waiting for the grace period ({:?})", s.grace),
                    updated_at: now.clone(),
                })
                .collect(),
        ));
        let stop = Arc::new(Stop::default());
        let ip = target(net);
        // Checks connect from where the machine's tap is: the host's namespace, or the one the
        // network works in.
        let ns = net
            .and_then(|n| n.netns.clone())
            .map_or(Namespace::Current, Namespace::Path);
        for (idx, spec) in specs.into_iter().enumerate() {
            let (stop, statuses, ns) = (stop.clone(), statuses.clone(), ns.clone());
            let epoch = self.epoch.clone();
            std::thread::spawn(move || {
                let ran = ns.run(|| check_loop(&spec, ip, &stop, &statuses, idx, &epoch));
                if let Err(e) = ran
                    && let Some(s) = lock_statuses(&statuses).get_mut(idx)
                {
                    s.status = CheckState::Critical;
                    s.output = format!("cannot enter the machine's network namespace: {e}");
                    s.updated_at = rfc3339(now_ms());
                    epoch.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
        self.lock().insert(id.clone(), Running { stop, statuses });
        self.bump();
    }

    /// See [`Checks::epoch`].
    fn bump(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// A counter that changes whenever any machine's statuses may have: equal values mean equal
    /// statuses.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Stops a machine's checks and forgets their statuses.
    pub(crate) fn stop(&self, id: &MachineId) {
        if let Some(r) = self.lock().remove(id) {
            r.stop.stop();
            self.bump();
        }
    }

    /// Stops every machine's checks (the agent goes away).
    pub(crate) fn stop_all(&self) {
        for (_, r) in self.lock().drain() {
            r.stop.stop();
        }
        self.bump();
    }

    /// The machine's check statuses (empty when it is not started or has no checks).
    pub(crate) fn statuses(&self, id: &MachineId) -> Vec<CheckStatus> {
        self.lock()
            .get(id)
            .map(|r| lock_statuses(&r.statuses).clone())
            .unwrap_or_default()
    }
}

fn check_loop(
    spec: &CheckSpec,
    ip: Option<IpAddr>,
    stop: &Stop,
    statuses: &Statuses,
    idx: usize,
    epoch: &AtomicU64,
) {
    if stop.sleep(spec.grace) {
        return;
    }
    loop {
        let (state, output) = match ip {
            Some(ip) => run(spec, ip),
            None => (
                CheckState::Critical,
                "the machine has no address the host can reach (it has no network)".to_owned(),
            ),
        };
        if stop.is_stopped() {
            return;
        }
        if let Some(s) = lock_statuses(statuses).get_mut(idx) {
            if s.status != state {
                s.updated_at = rfc3339(now_ms());
            }
            if s.status != state || s.output != output {
                epoch.fetch_add(1, Ordering::SeqCst);
            }
            s.status = state;
            s.output = output;
        }
        if stop.sleep(spec.interval) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::net::{Ipv4Addr, TcpListener};
    use std::sync::mpsc;

    use aloft_api::checks::MIN_INTERVAL;
    use aloft_api::{MachineCheck, MachineService, MachineServiceCheck, WaitState};

    use super::*;
    use crate::{Agent, AgentConfig, CreateMachine, FakeDriver};

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn d(ms: u64) -> aloft_api::Duration {
        aloft_api::Duration(Duration::from_millis(ms))
    }

    fn tcp_spec(port: u16) -> CheckSpec {
        CheckSpec {
            name: "t".into(),
            probe: Probe::Tcp,
            port,
            interval: MIN_INTERVAL,
            timeout: Duration::from_millis(500),
            grace: Duration::ZERO,
        }
    }

    fn http_spec(port: u16, method: &str, path: &str) -> CheckSpec {
        CheckSpec {
            probe: Probe::Http {
                method: method.into(),
                path: path.into(),
                headers: vec![("X-Probe".into(), "yes".into())],
                tls: None,
            },
            ..tcp_spec(port)
        }
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        TcpListener::bind((LOCAL, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Serves one connection: sends `response` after reading the request head, which it hands
    /// back through the channel.
    fn serve_once(response: &'static str) -> (u16, mpsc::Receiver<Vec<String>>) {
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut head = Vec::new();
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let line = line.trim_end().to_owned();
                if line.is_empty() {
                    break;
                }
                head.push(line);
            }
            conn.write_all(response.as_bytes()).unwrap();
            tx.send(head).unwrap();
        });
        (port, rx)
    }

    #[test]
    fn tcp_passes_on_a_listener_and_is_critical_when_refused() {
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (state, out) = run(&tcp_spec(port), LOCAL);
        assert_eq!(state, CheckState::Passing, "{out}");
        drop(listener);
        let (state, out) = run(&tcp_spec(closed_port()), LOCAL);
        assert_eq!(state, CheckState::Critical);
        assert!(out.contains("refused"), "{out}");
    }

    #[test]
    fn http_passes_on_2xx_and_sends_the_request_asked_for() {
        let (port, head) = serve_once("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
        let (state, out) = run(&http_spec(port, "HEAD", "/healthz?x=1"), LOCAL);
        assert_eq!(state, CheckState::Passing, "{out}");
        assert_eq!(
            out,
            format!("HEAD http://127.0.0.1:{port}/healthz?x=1: 204 No Content")
        );
        let head = head.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(head[0], "HEAD /healthz?x=1 HTTP/1.1");
        assert!(head.contains(&format!("Host: 127.0.0.1:{port}")), "{head:?}");
        assert!(head.contains(&"X-Probe: yes".to_owned()), "{head:?}");
        assert!(head.contains(&"Connection: close".to_owned()), "{head:?}");
    }

    #[test]
    fn http_is_critical_on_errors_redirects_refusal_timeouts_and_garbage() {
        for (response, expect) in [
            (
                "HTTP/1.1 500 Internal Server Error\r\n\r\n",
                "500 Internal Server Error",
            ),
            (
                "HTTP/1.1 301 Moved Permanently\r\nLocation: /x\r\n\r\n",
                "301 Moved Permanently",
            ),
            ("SSH-2.0-OpenSSH\r\n", "not an HTTP response"),
        ] {
            let (port, _) = serve_once(response);
            let (state, out) = run(&http_spec(port, "GET", "/"), LOCAL);
            assert_eq!(state, CheckState::Critical, "{out}");
            assert!(out.contains(expect), "{out}");
        }
        let (state, out) = run(&http_spec(closed_port(), "GET", "/"), LOCAL);
        assert_eq!(state, CheckState::Critical);
        assert!(out.contains("connect"), "{out}");
        // Accepts, never answers: the timeout ends it.
        let silent = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut spec = http_spec(port, "GET", "/");
        spec.timeout = Duration::from_millis(200);
        let t0 = Instant::now();
        let (state, out) = run(&spec, LOCAL);
        assert_eq!(state, CheckState::Critical);
        assert!(out.contains("timed out after 200ms"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(silent);
    }

    /// What a test https server saw of its one connection.
    #[derive(Debug)]
    struct Seen {
        /// The SNI the client sent.
        sni: Option<String>,
        /// The request head (empty when the handshake failed).
        head: String,
    }

    /// An https server with a self-signed certificate for `app.example.com` only, answering one
    /// connection with `response`.
    fn serve_tls_once(response: &'static str) -> (u16, mpsc::Receiver<Seen>) {
        let config = aloft_testkit::tls::self_signed_server(&["app.example.com"]).unwrap();
        let listener = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let conn = rustls::ServerConnection::new(config).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if !matches!(s.read(&mut b), Ok(1)) {
                    break;
                }
                head.push(b[0]);
            }
            if head.ends_with(b"\r\n\r\n") {
                s.write_all(response.as_bytes()).unwrap();
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            let sni = s.conn.server_name().map(str::to_owned);
            let head = String::from_utf8(head).unwrap_or_default();
            tx.send(Seen { sni, head }).unwrap();
        });
        (port, rx)
    }

    fn https_spec(port: u16, skip_verify: bool, server_name: Option<&str>) -> CheckSpec {
        CheckSpec {
            probe: Probe::Http {
                method: "GET".into(),
                path: "/up".into(),
                headers: Vec::new(),
                tls: Some(Tls {
                    skip_verify,
                    server_name: server_name.map(Into::into),
                }),
            },
            ..tcp_spec(port)
        }
    }

    #[test]
    fn https_passes_when_verification_is_skipped_and_sends_the_server_name() {
        let (port, seen) = serve_tls_once("HTTP/1.1 204 No Content\r\n\r\n");
        let (state, out) = run(&https_spec(port, true, None), LOCAL);
        assert_eq!(state, CheckState::Passing, "{out}");
        assert_eq!(out, format!("GET https://127.0.0.1:{port}/up: 204 No Content"));
        let seen = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen.sni, None, "an address is not sent as SNI");
        assert!(seen.head.starts_with("GET /up HTTP/1.1\r\n"), "{seen:?}");

        let (port, seen) = serve_tls_once("HTTP/1.1 200 OK\r\n\r\n");
        let (state, out) = run(&https_spec(port, true, Some("app.example.com")), LOCAL);
        assert_eq!(state, CheckState::Passing, "{out}");
        let seen = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(seen.sni.as_deref(), Some("app.example.com"));
    }

    #[test]
    fn https_is_critical_on_an_untrusted_certificate_a_500_or_a_plain_http_server() {
        // Verified: a self-signed certificate is refused, saying what to do.
        for name in [None, Some("app.example.com")] {
            let (port, _seen) = serve_tls_once("HTTP/1.1 200 OK\r\n\r\n");
            let (state, out) = run(&https_spec(port, false, name), LOCAL);
            assert_eq!(state, CheckState::Critical, "{out}");
            assert!(
                out.contains(&format!("TLS handshake with 127.0.0.1:{port} failed: ")),
                "{out}"
            );
            assert!(out.contains("tls_skip_verify"), "{out}");
        }
        let (port, _seen) = serve_tls_once("HTTP/1.1 500 Internal Server Error\r\n\r\n");
        let (state, out) = run(&https_spec(port, true, None), LOCAL);
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(out.ends_with(": 500 Internal Server Error"), "{out}");
        // A plain http server answers the ClientHello with a 400: not TLS, said so at once.
        let plain = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = plain.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = plain.accept().unwrap();
            let mut b = [0u8; 512];
            let _ = c.read(&mut b).unwrap();
            c.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                .unwrap();
        });
        let (state, out) = run(&https_spec(port, true, None), LOCAL);
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(out.contains("protocol = \"http\""), "{out}");
        // One that waits for more: the timeout ends it.
        let silent = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = silent.local_addr().unwrap().port();
        let mut spec = https_spec(port, true, None);
        spec.timeout = Duration::from_millis(200);
        let t0 = Instant::now();
        let (state, out) = run(&spec, LOCAL);
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(
            out.contains("TLS handshake with") && out.contains("timed out after 200ms"),
            "{out}"
        );
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(silent);
    }

    #[test]
    fn https_is_cut_off_at_the_timeout_by_a_server_that_dribbles_its_handshake() {
        // The start of a large handshake record, then a byte every 20 ms: every read gets
        // something, but the run must still end at its timeout.
        let l = TcpListener::bind((LOCAL, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let _ = c.write_all(&[0x16, 0x03, 0x03, 0x40, 0x00]);
            for _ in 0..250 {
                std::thread::sleep(Duration::from_millis(20));
                if c.write_all(&[0]).is_err() {
                    return;
                }
            }
        });
        let mut spec = https_spec(port, true, None);
        spec.timeout = Duration::from_millis(300);
        let t0 = Instant::now();
        let (state, out) = run(&spec, LOCAL);
        assert_eq!(state, CheckState::Critical, "{out}");
        assert!(out.contains("timed out after 300ms"), "{out}");
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    }

    #[test]
    fn the_target_is_the_address_the_host_reaches() {
        use aloft_guest_proto::{IpNet, NetConfig};
        assert_eq!(target(None), None);
        assert_eq!(target(Some(&NetInfo::default())), None);
        let v6: IpAddr = "fdaa:0:1::2".parse().unwrap();
        let v4: IpAddr = "172.30.0.3".parse().unwrap();
        let mut net = NetInfo {
            private_ip: v6.to_string(),
            ..NetInfo::default()
        };
        assert_eq!(target(Some(&net)), Some(v6));
        net.net_config = Some(NetConfig {
            addresses: vec![
                IpNet {
                    addr: v6,
                    prefix_len: 64,
                },
                IpNet {
                    addr: v4,
                    prefix_len: 31,
                },
            ],
            gateways: Vec::new(),
            mtu: None,
        });
        assert_eq!(target(Some(&net)), Some(v4));
    }

    fn status(agent: &Agent, id: &MachineId, name: &str) -> Option<CheckStatus> {
        agent.get(id).unwrap().checks.into_iter().find(|c| c.name == name)
    }

    #[test]
    fn an_agent_checks_started_machines_after_their_grace_period() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        fake.network_address(Some(LOCAL));
        let config = AgentConfig {
            poll: Duration::from_millis(10),
            stop_timeout: Duration::from_millis(100),
            ..AgentConfig::new(tmp.path().join("agent.db"))
        };
        let agent = Agent::open(config, Arc::new(fake.clone())).unwrap();
        let up = TcpListener::bind((LOCAL, 0)).unwrap();
        let up_port = up.local_addr().unwrap().port();
        let mut mc = MachineConfig {
            image: Some("busybox".into()),
            ..MachineConfig::default()
        };
        mc.checks.insert(
            "up".into(),
            MachineCheck {
                r#type: Some("tcp".into()),
                port: Some(up_port),
                interval: Some(d(100)),
                grace_period: Some(d(600)),
                ..MachineCheck::default()
            },
        );
        mc.services = vec![MachineService {
            internal_port: Some(closed_port()),
            checks: vec![MachineServiceCheck {
                interval: Some(d(100)),
                grace_period: Some(d(0)),
                timeout: Some(d(200)),
                ..MachineServiceCheck::default()
            }],
            ..MachineService::default()
        }];
        let t0 = Instant::now();
        let h = agent
            .create(CreateMachine {
                app: "a".into(),
                region: "local".into(),
                org: 1,
                config: mc,
                ..CreateMachine::default()
            })
            .unwrap();
        let id = h.machine.clone();
        h.wait(Duration::from_secs(10)).unwrap();
        let service = agent.get(&id).unwrap().checks[1].name.clone();
        assert!(service.starts_with("servicecheck-00-tcp-"), "{service}");
        // In the grace period: warning, and it stays so until the period is over.
        let first = status(&agent, &id, "up").unwrap();
        if t0.elapsed() < Duration::from_millis(500) {
            assert_eq!(first.status, CheckState::Warning, "{first:?}");
            assert!(first.output.contains("grace period"), "{first:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&agent, &id, "up").unwrap();
            if s.status == CheckState::Passing {
                assert!(
                    t0.elapsed() >= Duration::from_millis(600),
                    "passed within the grace period"
                );
                break;
            }
            assert_ne!(s.status, CheckState::Critical, "{s:?}");
            assert!(Instant::now() < deadline, "never passed: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The service check targets a port nothing listens on.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&agent, &id, &service).unwrap();
            if s.status == CheckState::Critical {
                assert!(s.output.contains("127.0.0.1"), "{s:?}");
                break;
            }
            assert!(Instant::now() < deadline, "never critical: {s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        // The API views carry them.
        let m = agent.machine(&id).unwrap();
        assert_eq!(m.checks.len(), 2);
        assert_eq!(agent.list().unwrap()[0].checks.len(), 2);
        // A listener that goes away turns the check critical.
        drop(up);
        let deadline = Instant::now() + Duration::from_secs(10);
        while status(&agent, &id, "up").unwrap().status != CheckState::Critical {
            assert!(Instant::now() < deadline, "still passing with nothing listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Stopped: no checks.
        agent
            .stop(&id, crate::StopOptions::default())
            .unwrap()
            .wait(Duration::from_secs(10))
            .unwrap();
        assert!(agent.get(&id).unwrap().checks.is_empty());
        assert!(agent.machine(&id).unwrap().checks.is_empty());
        // Started again: a new grace period.
        agent.start(&id).unwrap().wait(Duration::from_secs(10)).unwrap();
        agent
            .wait(&id, &[WaitState::Started], None, None, Duration::from_secs(1))
            .unwrap();
        assert_eq!(agent.get(&id).unwrap().checks.len(), 2);
    }

    #[test]
    fn checks_of_an_unreachable_machine_are_critical_and_name_the_address() {
        let tmp = tempfile::tempdir().unwrap();
        let fake = FakeDriver::new();
        let agent = Agent::open(
            AgentConfig {
                poll: Duration::from_millis(10),
                ..AgentConfig::new(tmp.path().join("agent.db"))
            },
            Arc::new(fake.clone()),
        )
        .unwrap();
        let mut mc = MachineConfig {
            image: Some("busybox".into()),
            ..MachineConfig::default()
        };
        mc.checks.insert(
            "up".into(),
            MachineCheck {
                port: Some(80),
                grace_period: Some(d(0)),
                interval: Some(d(100)),
                ..MachineCheck::default()
            },
        );
        let h = agent
            .create(CreateMachine {
                app: "a".into(),
                region: "local".into(),
                org: 1,
                config: mc,
                ..CreateMachine::default()
            })
            .unwrap();
        h.wait(Duration::from_secs(10)).unwrap();
        // The fake gives a 6PN private_ip the host cannot reach (no route, or no answer in time).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = status(&agent, &h.machine, "up").unwrap();
            if s.status == CheckState::Critical {
                assert!(s.output.contains("fdaa:"), "{s:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{s:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
