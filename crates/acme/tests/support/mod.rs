//! A real Pebble (Let's Encrypt's test CA) on loopback for the tests, with what it needs around
//! it: an HTTPS certificate for its API (from a throwaway CA the client is told to trust), a DNS
//! responder answering 127.0.0.1 for every name, and the HTTP-01 and TLS-ALPN-01 responders on
//! the ports Pebble validates against, both answering from one `ChallengeStore`.
//!
//! Pebble is the `pebble` binary of the Debian package (scripts/setup.sh installs it). Without
//! it the tests skip, unless `CI` is set: there it must be installed.

use std::fs::File;
use std::io::Read as _;
use std::net::{SocketAddr, TcpListener as StdTcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aloft_acme::{ACME_TLS_ALPN_PROTOCOL, ChallengeStore, Issued};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;

/// A running Pebble and the responders it validates against. Dropping it kills Pebble (the
/// child this test started, and only it) and stops the responders.
pub(crate) struct Harness {
    pebble: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    tasks: Vec<JoinHandle<()>>,
    /// Pebble's ACME directory.
    pub(crate) directory_url: String,
    /// Pebble's management API (roots, intermediates).
    management_url: String,
    /// The root of Pebble's own HTTPS certificate: what `AcmeClient::new` must trust.
    pub(crate) api_root_pem: Vec<u8>,
    /// Where the responders look up challenges.
    pub(crate) store: Arc<ChallengeStore>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.pebble.kill();
        let _ = self.pebble.wait();
        for task in &self.tasks {
            task.abort();
        }
        if std::thread::panicking() {
            let mut log = String::new();
            let _ = File::open(&self.log).and_then(|mut f| f.read_to_string(&mut log));
            eprintln!("---- pebble's log ----\n{log}---- end of pebble's log ----");
        }
    }
}

fn pebble_binary() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("pebble"))
        .find(|p| p.is_file())
}

/// A port free right now (Pebble binds it itself a moment later).
fn free_port() -> u16 {
    StdTcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Harness {
    /// Starts Pebble rejecting `nonce_reject_percent` of valid nonces as `badNonce`. `None` (the
    /// test skips) when Pebble is not installed and `CI` is not set.
    pub(crate) async fn start(nonce_reject_percent: u8) -> Option<Self> {
        let Some(pebble) = pebble_binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "the pebble binary is not on PATH but CI is set: scripts/setup.sh installs the Debian package pebble"
            );
            eprintln!(
                "SKIPPED: the pebble binary is not installed (apt-get install pebble, or scripts/setup.sh)"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let api_root_pem = write_api_certificate(dir.path());

        let store = Arc::new(ChallengeStore::new());
        let dns = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (dns_addr, http_port, tls_port) = (
            dns.local_addr().unwrap(),
            http.local_addr().unwrap().port(),
            tls.local_addr().unwrap().port(),
        );
        let tasks = vec![
            tokio::spawn(serve_dns(dns)),
            tokio::spawn(serve_http01(http, store.clone())),
            tokio::spawn(serve_tls_alpn01(tls, store.clone())),
        ];

        let (api_port, management_port) = (free_port(), free_port());
        let config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{api_port}"),
            "managementListenAddress": format!("127.0.0.1:{management_port}"),
            "certificate": dir.path().join("api-cert.pem"),
            "privateKey": dir.path().join("api-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        let config_path = dir.path().join("pebble-config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let log = dir.path().join("pebble.log");
        let out = File::create(&log).unwrap();
        let child = Command::new(pebble)
            .arg("-config")
            .arg(&config_path)
            .arg("-dnsserver")
            .arg(dns_addr.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_VA_ALWAYS_VALID", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .env("PEBBLE_WFE_NONCEREJECT", nonce_reject_percent.to_string())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut harness = Self {
            pebble: child,
            log,
            _dir: dir,
            tasks,
            directory_url: format!("https://127.0.0.1:{api_port}/dir"),
            management_url: format!("https://127.0.0.1:{management_port}"),
            api_root_pem,
            store,
        };
        harness.wait_until_listening([api_port, management_port]);
        Some(harness)
    }

    fn wait_until_listening(&mut self, ports: [u16; 2]) {
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if let Some(status) = self.pebble.try_wait().unwrap() {
                    panic!("pebble exited with {status} before listening on {port}");
                }
                assert!(
                    Instant::now() < deadline,
                    "pebble did not listen on {port} within 20 s"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Pebble's root for the certificates it issues, from its management API.
    async fn issuing_root(&self) -> CertificateDer<'static> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&self.api_root_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .build()
            .unwrap();
        let pem = http
            .get(format!("{}/roots/0", self.management_url))
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .bytes()
            .await
            .unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap()
    }

    /// Checks `issued` as a TLS client would: its chain verifies for `name` against Pebble's
    /// issuing root, and its key is the leaf's.
    pub(crate) async fn verify(&self, issued: &Issued, name: &str) -> Result<(), rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.issuing_root().await).unwrap();
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .unwrap();
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let (leaf, intermediates) = chain.split_first().unwrap();
        verifier.verify_server_cert(
            leaf,
            intermediates,
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )?;
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let signer = provider.key_provider.load_private_key(key)?;
        rustls::sign::CertifiedKey::new(chain, signer).keys_match()
    }
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, written where the Pebble config
/// points; returns the CA in PEM.
fn write_api_certificate(dir: &Path) -> Vec<u8> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "aloft-acme test CA for Pebble's API");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("api-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("api-key.pem"), key.serialize_pem()).unwrap();
    ca.pem().into_bytes()
}

/// Answers every DNS query: A records with 127.0.0.1, any other type with no record.
async fn serve_dns(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        if let Some(answer) = dns_answer(&buf[..n]) {
            let _ = socket.send_to(&answer, from).await;
        }
    }
}

/// The response to one query (header, one question), or `None` for something else.
fn dns_answer(query: &[u8]) -> Option<Vec<u8>> {
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
        out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
    }
    Some(out)
}

/// HTTP-01: `GET /.well-known/acme-challenge/{token}` answered from the store, 404 otherwise.
async fn serve_http01(listener: TcpListener, store: Arc<ChallengeStore>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split(' ').nth(1).unwrap_or_default();
            let response = match store.http01_response(path) {
                Some(body) => format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                ),
                None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_owned(),
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The resolver a TLS-ALPN-01 responder uses: the challenge certificate for handshakes offering
/// `acme-tls/1`, nothing (a failed handshake) otherwise.
#[derive(Debug)]
struct AlpnResolver(Arc<ChallengeStore>);

impl rustls::server::ResolvesServerCert for AlpnResolver {
    fn resolve(
        &self,
        client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.resolve_tls_alpn01(&client_hello)
    }
}

/// TLS-ALPN-01: a rustls server negotiating `acme-tls/1` with the store's challenge certificates.
async fn serve_tls_alpn01(listener: TcpListener, store: Arc<ChallengeStore>) {
    let mut config =
        rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(AlpnResolver(store)));
    config.alpn_protocols = vec![ACME_TLS_ALPN_PROTOCOL.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(mut tls) = acceptor.accept(stream).await {
                let _ = tls.shutdown().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::dns_answer;

    #[test]
    fn the_dns_responder_answers_a_with_loopback_and_aaaa_with_nothing() {
        // ID 0xabcd, RD, one question: app.aloft.test A IN, plus an EDNS0 OPT record.
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1];
        for label in ["app", "aloft", "test"] {
            q.push(u8::try_from(label.len()).unwrap());
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        q.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        let a = dns_answer(&q).unwrap();
        assert_eq!(&a[..4], &[0xab, 0xcd, 0x85, 0x80]);
        assert_eq!(&a[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&a[a.len() - 4..], &[127, 0, 0, 1]);
        let qlen = q.len() - 11;
        let mut aaaa = q[..qlen].to_vec();
        aaaa[qlen - 3] = 28;
        let r = dns_answer(&aaaa).unwrap();
        assert_eq!(&r[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.len(), qlen);
    }
}
