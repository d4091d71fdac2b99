//! TLS for `https` health checks (`aloft_api::checks::Tls`), the pure pieces the agent's blocking
//! runner and the edge's async prober share: the client configuration, the server name, and a
//! failed handshake told in a user's words.
//!
//! - **Verification**: the policy of [`crate::client_config`] (the platform's trust store); with
//!   `tls_skip_verify` any certificate is accepted, though the handshake's signatures are still
//!   checked (the peer must hold the key of the certificate it shows).
//! - **Server name**: `tls_server_name` is sent as SNI and the certificate must be valid for
//!   it; without one the certificate must be valid for the machine's IP address and no SNI is
//!   sent (rustls sends none for an address).
//! - **ALPN**: `http/1.1`, the only protocol the checks speak.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

static VERIFYING: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
static SKIPPING: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();

/// The client configuration of https checks: verifying certificates, or with `skip_verify`
/// accepting any (see the module docs). Built once per process and kind, then shared (the
/// platform's trust store is read once).
pub fn config(skip_verify: bool) -> Result<Arc<rustls::ClientConfig>, Error> {
    let cell = if skip_verify { &SKIPPING } else { &VERIFYING };
    if let Some(c) = cell.get() {
        return Ok(c.clone());
    }
    let mut c = if skip_verify {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { algorithms }))
            .with_no_client_auth()
    } else {
        crate::client_config()?
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cell.get_or_init(|| Arc::new(c)).clone())
}

/// The name to verify the certificate for and send as SNI: `server_name` (a DNS name, as
/// `aloft_api::checks` validated it), else the machine's address `ip`.
pub fn server_name(server_name: Option<&str>, ip: IpAddr) -> Result<ServerName<'static>, String> {
    match server_name {
        Some(n) => {
            ServerName::try_from(n.to_owned()).map_err(|_| format!("tls_server_name {n:?} is not a DNS name"))
        }
        None => Ok(ServerName::IpAddress(ip.into())),
    }
}

fn name_of(name: &ServerName<'_>) -> String {
    match name {
        ServerName::DnsName(n) => n.as_ref().to_owned(),
        ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
        other => format!("{other:?}"),
    }
}

/// Why a check's TLS handshake with `addr` for `name` failed, for the check's output:
/// `TLS handshake with ADDR failed: REASON`, the reason saying what to change. `e` is the I/O
/// error the handshake ended with (rustls' error inside it when TLS failed). Timeouts are the
/// caller's to tell.
pub fn handshake_failure(addr: SocketAddr, name: &ServerName<'_>, e: &std::io::Error) -> String {
    let reason = match e.get_ref().and_then(|i| i.downcast_ref::<Error>()) {
        Some(tls) => tls_reason(name, tls),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "the server closed the connection during the \
                                                  handshake (does the port speak TLS?)"
                .to_owned(),
            _ => e.to_string(),
        },
    };
    format!("TLS handshake with {addr} failed: {reason}")
}

const SKIP: &str = "set tls_skip_verify = true to accept it";

fn tls_reason(name: &ServerName<'_>, e: &Error) -> String {
    let shown = name_of(name);
    match e {
        Error::InvalidCertificate(CertificateError::NotValidForName) => format!(
            "certificate not valid for name {shown}; set tls_server_name to a name it is valid \
             for, or tls_skip_verify = true"
        ),
        Error::InvalidCertificate(CertificateError::NotValidForNameContext { presented, .. }) => {
            format!(
                "certificate not valid for name {shown} (it is for {}); set tls_server_name to a \
                 name it is valid for, or tls_skip_verify = true",
                if presented.is_empty() {
                    "no name".to_owned()
                } else {
                    presented.join(", ")
                }
            )
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            format!("certificate signed by an authority this host does not trust (self-signed?); {SKIP}")
        }
        Error::InvalidCertificate(CertificateError::Expired | CertificateError::ExpiredContext { .. }) => {
            format!("certificate expired; renew it, or {SKIP}")
        }
        Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => format!("certificate not valid yet (check the clocks); or {SKIP}"),
        Error::InvalidCertificate(other) => format!("certificate refused ({other:?}); {SKIP}"),
        Error::InvalidMessage(_)
        | Error::InappropriateMessage { .. }
        | Error::InappropriateHandshakeMessage { .. } => format!(
            "the server did not answer with TLS ({e}); if the port serves plain http, use \
             protocol = \"http\""
        ),
        Error::AlertReceived(alert) => format!(
            "the server refused the handshake (alert {alert:?}){}",
            match name {
                ServerName::IpAddress(_) => "; if it needs a server name, set tls_server_name",
                _ => "",
            }
        ),
        // The host's trust store could not be loaded (see the crate docs).
        Error::General(why) => format!("{why}; or {SKIP}"),
        other => other.to_string(),
    }
}

/// `tls_skip_verify`: any certificate, the handshake's signatures still checked.
#[derive(Debug)]
struct AnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    /// A server with a self-signed certificate for `names`.
    fn server(names: &[&str]) -> rustls::ServerConnection {
        rustls::ServerConnection::new(aloft_testkit::tls::self_signed_server(names).unwrap()).unwrap()
    }

    /// Runs a handshake in memory: the client's error, if any, and the SNI the server saw.
    fn handshake(skip: bool, name: ServerName<'static>) -> (Result<(), Error>, Option<String>) {
        let mut client = rustls::ClientConnection::new(config(skip).unwrap(), name).unwrap();
        let mut server = server(&["app.example.com", "127.0.0.1"]);
        let mut result = Ok(());
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut &buf[..]).unwrap();
            if server.process_new_packets().is_err() {
                break;
            }
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut &buf[..]).unwrap();
            if let Err(e) = client.process_new_packets() {
                result = Err(e);
                break;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                break;
            }
        }
        if result.is_ok() {
            assert!(!client.is_handshaking(), "the handshake never ended");
        }
        (result, server.server_name().map(str::to_owned))
    }

    #[test]
    fn skipping_verification_accepts_a_self_signed_certificate_and_sends_the_name() {
        let name = server_name(Some("app.example.com"), IpAddr::from([127, 0, 0, 1])).unwrap();
        let (r, sni) = handshake(true, name);
        assert_eq!(r, Ok(()));
        assert_eq!(sni.as_deref(), Some("app.example.com"));
        // By address: no SNI.
        let name = server_name(None, IpAddr::from([127, 0, 0, 1])).unwrap();
        let (r, sni) = handshake(true, name);
        assert_eq!(r, Ok(()));
        assert_eq!(sni, None);
        assert!(Arc::ptr_eq(&config(true).unwrap(), &config(true).unwrap()));
        assert_eq!(config(false).unwrap().alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn verifying_refuses_a_self_signed_certificate_saying_what_to_do() {
        let name = server_name(None, IpAddr::from([127, 0, 0, 1])).unwrap();
        let (r, _) = handshake(false, name.clone());
        let err = r.unwrap_err();
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, err);
        let out = handshake_failure(SocketAddr::from(([127, 0, 0, 1], 8443)), &name, &io);
        assert!(
            out.starts_with("TLS handshake with 127.0.0.1:8443 failed: "),
            "{out}"
        );
        assert!(out.contains("tls_skip_verify"), "{out}");
    }

    #[test]
    fn failures_read_as_what_to_change() {
        let addr = SocketAddr::from(([172, 19, 0, 2], 8443));
        let ip = server_name(None, addr.ip()).unwrap();
        let wrap = |e: Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let out = handshake_failure(
            addr,
            &ip,
            &wrap(Error::InvalidCertificate(
                CertificateError::NotValidForNameContext {
                    expected: ip.clone(),
                    presented: vec!["DnsName(\"app.example.com\")".into()],
                },
            )),
        );
        assert!(
            out.starts_with(
                "TLS handshake with 172.19.0.2:8443 failed: certificate not valid for name 172.19.0.2"
            ),
            "{out}"
        );
        assert!(out.contains("app.example.com"), "{out}");
        assert!(
            out.contains("tls_server_name") && out.contains("tls_skip_verify"),
            "{out}"
        );
        let out = handshake_failure(
            addr,
            &ip,
            &wrap(Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType)),
        );
        assert!(out.contains("protocol = \"http\""), "{out}");
        let out = handshake_failure(
            addr,
            &ip,
            &wrap(Error::General(
                "cannot verify TLS certificates: no CA bundle".into(),
            )),
        );
        assert!(
            out.ends_with("no CA bundle; or set tls_skip_verify = true to accept it"),
            "{out}"
        );
        let eof = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(handshake_failure(addr, &ip, &eof).contains("closed the connection"));
        assert!(server_name(Some("not a name"), addr.ip()).is_err());
    }
}
