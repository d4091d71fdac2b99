//! A real Pebble (Let's Encrypt's test ACME CA) on loopback, with what it needs around it: an
//! HTTPS certificate for its API from a throwaway CA (the client under test trusts
//! [`Pebble::api_root_pem`]) and a DNS responder that answers one IPv4 address for every name.
//! Pebble validates challenges against `http_port` (HTTP-01) and `tls_port` (TLS-ALPN-01) of that
//! address: the test decides what listens there (its own responders, or aloftd's edge).
//!
//! Pebble is the `pebble` binary of the Debian package (scripts/setup.sh installs it). Without it
//! [`Pebble::start`] returns `None` (the test skips), unless `CI` is set: there it must be
//! installed.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::{FixtureError, process};

/// How a [`Pebble`] is started.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// The port Pebble fetches HTTP-01 answers from (on the address DNS answers).
    pub http_port: u16,
    /// The port Pebble makes TLS-ALPN-01 handshakes to.
    pub tls_port: u16,
    /// What the DNS responder answers for every name (A records; AAAA get no record).
    pub dns_answer: Ipv4Addr,
    /// The share of valid nonces Pebble rejects as `badNonce`, in percent.
    pub nonce_reject_percent: u8,
}

impl PebbleOptions {
    /// Validation against `127.0.0.1:http_port` and `127.0.0.1:tls_port`, no nonce rejection.
    pub fn new(http_port: u16, tls_port: u16) -> Self {
        Self {
            http_port,
            tls_port,
            dns_answer: Ipv4Addr::LOCALHOST,
            nonce_reject_percent: 0,
        }
    }
}

/// A running Pebble and its DNS responder. Dropping it kills Pebble (the child this fixture
/// started, and only it) and stops the responder; when the thread is panicking it prints
/// Pebble's log.
#[derive(Debug)]
pub struct Pebble {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    dns_stop: Arc<AtomicBool>,
    dns_thread: Option<JoinHandle<()>>,
    directory_url: String,
    management_addr: SocketAddr,
    api_root_pem: String,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.dns_stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.dns_thread.take() {
            let _ = t.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- pebble's log ----\n{}---- end of pebble's log ----",
                self.log()
            );
        }
    }
}

/// The `pebble` binary on `PATH`.
fn pebble_binary() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("pebble"))
        .find(|p| p.is_file())
}

/// A loopback TCP port free right now (its user binds it a moment later).
pub fn free_port() -> Result<u16, FixtureError> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| FixtureError::Io {
            what: "find a free loopback port",
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> FixtureError {
    let path = path.to_path_buf();
    move |source| FixtureError::Io { what, path, source }
}

fn spawn_pebble(
    binary: &Path,
    config_path: &Path,
    dns_addr: SocketAddr,
    options: &PebbleOptions,
    log: &Path,
) -> Result<Child, FixtureError> {
    let mut cmd = Command::new(binary);
    cmd.arg("-config")
        .arg(config_path)
        .arg("-dnsserver")
        .arg(dns_addr.to_string())
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_VA_ALWAYS_VALID", "0")
        .env("PEBBLE_AUTHZREUSE", "0")
        .env("PEBBLE_WFE_NONCEREJECT", options.nonce_reject_percent.to_string());
    process::log_into(&mut cmd, log)?;
    cmd.spawn().map_err(io("start pebble", binary))
}

fn wait_until_listening(
    child: &mut Child,
    binary: &Path,
    log: &Path,
    ports: &[u16],
) -> Result<(), FixtureError> {
    process::wait_ready(
        child,
        &binary.display().to_string(),
        log,
        Duration::from_secs(20),
        &format!("it did not listen on ports {ports:?}"),
        || {
            ports.iter().all(|&port| {
                TcpStream::connect_timeout(
                    &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    Duration::from_millis(200),
                )
                .is_ok()
            })
        },
    )
}

fn stop_dns(stop: &AtomicBool, thread: JoinHandle<()>) {
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
}

fn pebble_err(what: impl std::fmt::Display) -> FixtureError {
    FixtureError::Pebble(what.to_string())
}

impl Pebble {
    /// Starts Pebble (`PEBBLE_VA_NOSLEEP=1`, `PEBBLE_VA_ALWAYS_VALID=0`, `PEBBLE_AUTHZREUSE=0`)
    /// and its DNS responder, and waits until its API listens. `Ok(None)` (skip the test, a
    /// message says so) when Pebble is not installed and `CI` is not set.
    pub fn start(options: &PebbleOptions) -> Result<Option<Self>, FixtureError> {
        let Some(binary) = pebble_binary() else {
            if std::env::var_os("CI").is_some() {
                return Err(FixtureError::MissingTool {
                    path: PathBuf::from("pebble"),
                    package: "pebble",
                });
            }
            eprintln!(
                "SKIPPED: the pebble binary is not installed (apt-get install pebble, or scripts/setup.sh)"
            );
            return Ok(None);
        };
        let dir = tempfile::tempdir().map_err(io("create a temporary directory", Path::new("/tmp")))?;
        let api_root_pem = write_api_certificate(dir.path())?;

        let dns =
            UdpSocket::bind("127.0.0.1:0").map_err(io("bind the DNS responder", Path::new("127.0.0.1:0")))?;
        let dns_addr = dns
            .local_addr()
            .map_err(io("read the DNS responder's address", Path::new("127.0.0.1:0")))?;
        dns.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io("set the DNS responder's timeout", Path::new("127.0.0.1:0")))?;
        let dns_stop = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&dns_stop);
        let answer = options.dns_answer;
        let dns_thread = std::thread::spawn(move || serve_dns(&dns, answer, &stop));

        // Its ports are picked free, then bound by Pebble a moment later: another process may
        // take one in between. Pebble then exits ("address already in use"): try new ports.
        let mut tries = 0;
        let (child, log, api_port, management_port) = loop {
            let (api_port, management_port) = (free_port()?, free_port()?);
            let config = serde_json::json!({"pebble": {
                "listenAddress": format!("127.0.0.1:{api_port}"),
                "managementListenAddress": format!("127.0.0.1:{management_port}"),
                "certificate": dir.path().join("api-cert.pem"),
                "privateKey": dir.path().join("api-key.pem"),
                "httpPort": options.http_port,
                "tlsPort": options.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false,
            }});
            let config_path = dir.path().join("pebble-config.json");
            let log = dir.path().join(format!("pebble-{tries}.log"));
            let spawned = std::fs::write(&config_path, config.to_string())
                .map_err(io("write Pebble's config", &config_path))
                .and_then(|()| spawn_pebble(&binary, &config_path, dns_addr, options, &log));
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    stop_dns(&dns_stop, dns_thread);
                    return Err(e);
                }
            };
            match wait_until_listening(&mut child, &binary, &log, &[api_port, management_port]) {
                Ok(()) => break (child, log, api_port, management_port),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if tries < 4 && process::read_log(&log).contains("address already in use") {
                        tries += 1;
                        continue;
                    }
                    stop_dns(&dns_stop, dns_thread);
                    return Err(e);
                }
            }
        };
        Ok(Some(Self {
            child,
            log,
            _dir: dir,
            dns_stop,
            dns_thread: Some(dns_thread),
            directory_url: format!("https://127.0.0.1:{api_port}/dir"),
            management_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, management_port)),
            api_root_pem,
        }))
    }

    /// Pebble's ACME directory (`https://127.0.0.1:PORT/dir`).
    pub fn directory_url(&self) -> &str {
        &self.directory_url
    }

    /// The root of Pebble's own HTTPS certificate (PEM): what an ACME client must trust.
    pub fn api_root_pem(&self) -> &str {
        &self.api_root_pem
    }

    /// What Pebble logged so far.
    pub fn log(&self) -> String {
        process::read_log(&self.log)
    }

    /// The root Pebble issues certificates under (PEM), from its management API. Pebble makes a
    /// new one every start.
    pub fn roots_pem(&self) -> Result<String, FixtureError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.api_root_pem.as_bytes()) {
            roots.add(cert.map_err(pebble_err)?).map_err(pebble_err)?;
        }
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(pebble_err)?
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = ServerName::try_from("127.0.0.1").map_err(pebble_err)?;
        let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(pebble_err)?;
        let sock = TcpStream::connect_timeout(&self.management_addr, Duration::from_secs(5))
            .map_err(io("connect to Pebble's management API", Path::new("127.0.0.1")))?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io("set a timeout", Path::new("127.0.0.1")))?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        // HTTP/1.0: no chunked encoding, the body ends with the connection.
        tls.write_all(b"GET /roots/0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .map_err(io("ask Pebble for its root", Path::new("/roots/0")))?;
        let mut response = Vec::new();
        match tls.read_to_end(&mut response) {
            Ok(_) => {}
            // Go closes without close_notify at times; the body is complete by then.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
            Err(e) => return Err(io("read Pebble's root", Path::new("/roots/0"))(e)),
        }
        let response = String::from_utf8_lossy(&response);
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| pebble_err(format!("a malformed answer for /roots/0: {response}")))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            return Err(pebble_err(format!("/roots/0 answered {head}")));
        }
        Ok(body.to_owned())
    }

    /// [`Self::roots_pem`] as a rustls root store.
    pub fn roots(&self) -> Result<rustls::RootCertStore, FixtureError> {
        let pem = self.roots_pem()?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.map_err(pebble_err)?).map_err(pebble_err)?;
        }
        if roots.is_empty() {
            return Err(pebble_err(format!("no certificate in Pebble's root: {pem}")));
        }
        Ok(roots)
    }
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, written where the Pebble config
/// points; returns the CA in PEM.
fn write_api_certificate(dir: &Path) -> Result<String, FixtureError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(pebble_err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aloft test CA for Pebble's API");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(pebble_err)?)
        .map_err(pebble_err)?;
    let key = KeyPair::generate().map_err(pebble_err)?;
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).map_err(pebble_err)?;
    let cert = params.signed_by(&key, &ca).map_err(pebble_err)?;
    let cert_path = dir.join("api-cert.pem");
    std::fs::write(&cert_path, cert.pem()).map_err(io("write Pebble's API certificate", &cert_path))?;
    let key_path = dir.join("api-key.pem");
    std::fs::write(&key_path, key.serialize_pem()).map_err(io("write Pebble's API key", &key_path))?;
    Ok(ca.pem())
}

/// Answers every DNS query on `socket` until `stop`: A records with `answer`, any other type
/// with no record.
fn serve_dns(socket: &UdpSocket, answer: Ipv4Addr, stop: &AtomicBool) {
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue; // the read timeout: look at `stop` again
        };
        if let Some(reply) = dns_answer(&buf[..n], answer) {
            let _ = socket.send_to(&reply, from);
        }
    }
}

/// The response to one query (header, one question), or `None` for something else.
fn dns_answer(query: &[u8], answer: Ipv4Addr) -> Option<Vec<u8>> {
    let header = query.get(..12)?;
    if header[2] & 0x80 != 0 || u16::from_be_bytes([header[4], header[5]]) != 1 {
        return None; // a response, or not exactly one question
    }
    // The question: labels up to the root label, then QTYPE and QCLASS.
    let mut end = 12;
    loop {
        let len = usize::from(*query.get(end)?);
        end += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None; // no compression in a question
        }
        end += len;
    }
    let question = query.get(12..end + 4)?;
    let qtype = u16::from_be_bytes([query[end], query[end + 1]]);
    let is_a = qtype == 1;
    let mut out = Vec::with_capacity(question.len() + 32);
    out.extend_from_slice(&header[..2]); // ID
    // QR, opcode copied, AA, RD copied; RA; RCODE 0.
    out.push(0x80 | (header[2] & 0x78) | 0x04 | (header[2] & 0x01));
    out.push(0x80);
    out.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    out.extend_from_slice(question);
    if is_a {
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        out.extend_from_slice(&answer.octets());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    #[test]
    fn the_dns_responder_answers_a_with_its_address_and_aaaa_with_nothing() {
        // ID 0xabcd, RD, one question: app.aloft.test A IN, plus an EDNS0 OPT record.
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in ["app", "aloft", "test"] {
            q.push(u8::try_from(label.len()).unwrap());
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        let a = dns_answer(&q, Ipv4Addr::new(127, 0, 0, 2)).unwrap();
        assert_eq!(&a[..4], &[0xab, 0xcd, 0x85, 0x80]);
        assert_eq!(&a[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 2]);
        let qlen = q.len() - 11;
        let mut aaaa = q[..qlen].to_vec();
        aaaa[qlen - 3] = 28;
        let r = dns_answer(&aaaa, Ipv4Addr::LOCALHOST).unwrap();
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.len(), qlen);
        assert!(
            dns_answer(&a, Ipv4Addr::LOCALHOST).is_none(),
            "a response is no query"
        );
    }

    #[test]
    fn pebble_starts_and_hands_out_its_issuing_root() {
        let Some(pebble) =
            Pebble::start(&PebbleOptions::new(free_port().unwrap(), free_port().unwrap())).unwrap()
        else {
            return;
        };
        assert!(pebble.directory_url().starts_with("https://127.0.0.1:"));
        assert!(pebble.api_root_pem().contains("BEGIN CERTIFICATE"));
        let roots = pebble.roots().unwrap();
        assert_eq!(roots.len(), 1);
        // The API's root is not the issuing root.
        assert_ne!(pebble.roots_pem().unwrap(), pebble.api_root_pem());
    }
}
