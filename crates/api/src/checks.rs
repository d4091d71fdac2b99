//! Health checks as a machine's config defines them, resolved with their defaults and names: the
//! one definition both the agent (which checks a machine from its host and reports the statuses
//! in `Machine.checks`) and the edge proxy (which checks a machine's services from the edge and
//! routes by the result) run. Pure: no I/O; each side runs the probes its own way.
//!
//! - **Names**: a top-level check is named by its key; a service check
//!   `servicecheck-NN-TYPE-PORT` as Fly names them (`servicecheck-00-tcp-8080`), `NN` counting
//!   the service checks of the machine in config order from 00.
//! - **Defaults** (Fly's documented `tcp_checks` defaults): `interval` 15 s, `timeout` 2 s,
//!   `grace_period` 1 s; `type` tcp; http checks `method` GET and `path` `/`; a service check's
//!   `port` is the service's `internal_port`. Intervals below 100 ms are raised to 100 ms.
//! - **Semantics** (the reference's §5.5): tcp passes when a connection is accepted within the
//!   timeout; http sends one HTTP/1.1 request ([`http_request`]: `Connection: close`, the check's
//!   headers) and passes on a 2xx status line ([`parse_status_line`], [`http_state`]) within the
//!   timeout; redirects are not followed (a 3xx is critical). Unknown types and checks without a
//!   port resolve to [`Probe::Invalid`]: critical, with the reason as output.
//! - **https** (`protocol = "https"`, any case): the same request over TLS ([`Tls`]), the TLS
//!   handshake counted in the timeout. The certificate is verified (against the trust store of
//!   the side that checks) for `tls_server_name`, which is also sent as SNI; without one, for the
//!   machine's address (and no SNI is sent: an IP address is not a server name). A failed
//!   handshake is critical. `tls_skip_verify = true` accepts any certificate. A
//!   `tls_server_name` that is not a DNS name makes the check [`Probe::Invalid`]; an empty one
//!   counts as unset. The `Host` header stays the machine's address unless the check's headers
//!   give one, as for http. How a side speaks TLS is its own (the agent's and the edge's share
//!   `aloft-tls`); this crate only resolves the settings.

use std::time::Duration;

use crate::{CheckState, MachineConfig, MachineHttpHeader, MachineService};

/// Time between checks when the config gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);
/// Longest a check may take when the config gives no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
/// Wait after the machine started before the first check, when the config gives none.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(1);
/// Shortest interval honoured.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes an http check reads looking for the status line.
pub const MAX_STATUS_LINE: usize = 8 * 1024;
/// How every service check's name starts.
pub const SERVICE_CHECK_PREFIX: &str = "servicecheck-";

/// Whether `name` names a service check (`servicecheck-NN-TYPE-PORT`).
pub fn is_service_check(name: &str) -> bool {
    name.starts_with(SERVICE_CHECK_PREFIX)
}

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Connect.
    Tcp,
    /// One HTTP/1.1 request.
    Http {
        /// Upper-cased method.
        method: String,
        /// Path (with its query), starting with `/`.
        path: String,
        /// Headers, one pair per value.
        headers: Vec<(String, String)>,
        /// Over TLS (`protocol = "https"`): how; `None` for plain http.
        tls: Option<Tls>,
    },
    /// The config cannot be checked: why (reported as the check's critical output).
    Invalid(String),
}

/// The TLS settings of an https check (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tls {
    /// Accept any certificate (`tls_skip_verify = true`).
    pub skip_verify: bool,
    /// The name sent as SNI and the certificate must be valid for (`tls_server_name`, a valid
    /// DNS name); `None`: no SNI, the certificate must be valid for the machine's address.
    pub server_name: Option<String>,
}

/// One check, resolved from the config with its defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    /// Its name (see the module docs).
    pub name: String,
    /// What it does.
    pub probe: Probe,
    /// The machine's port it probes (0 when it has none: the probe is then invalid).
    pub port: u16,
    /// Time between runs.
    pub interval: Duration,
    /// Longest a run may take.
    pub timeout: Duration,
    /// Wait after the machine started before the first run.
    pub grace: Duration,
}

/// The fields both kinds of check share.
struct Fields<'a> {
    kind: Option<&'a str>,
    port: Option<u16>,
    interval: Option<&'a crate::Duration>,
    timeout: Option<&'a crate::Duration>,
    grace: Option<&'a crate::Duration>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    protocol: Option<&'a str>,
    tls_skip_verify: Option<bool>,
    tls_server_name: Option<&'a str>,
    headers: &'a [MachineHttpHeader],
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `name` is a DNS name a TLS client may send as SNI: labels of letters, digits, `_`
/// and inner `-`, at most 63 bytes each and 253 in all, an optional trailing dot, the last label
/// not all digits (that would read as an IPv4 address). The rules rustls applies, so a name
/// accepted here is one both sides can send.
pub fn is_server_name(name: &str) -> bool {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() || name.len() > 253 {
        return false;
    }
    let labels_ok = trimmed.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    labels_ok
        && trimmed
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// Why `name` cannot be an https check's `tls_server_name` (an IP address, or not a DNS name:
/// [`is_server_name`]); `None` when it can. Empty (after trimming) counts as unset: fine.
pub fn server_name_problem(name: &str) -> Option<String> {
    let n = name.trim();
    if n.is_empty() || is_server_name(n) {
        None
    } else if n.parse::<std::net::IpAddr>().is_ok() {
        Some(format!(
            "tls_server_name {n:?} is an IP address, not a server name: leave it unset to verify \
             the certificate for the machine's address"
        ))
    } else {
        Some(format!(
            "tls_server_name {n:?} is not a DNS name: give the name the certificate is for (like \
             app.example.com)"
        ))
    }
}

fn tls_settings(f: &Fields<'_>) -> Result<Tls, String> {
    let server_name = match f.tls_server_name.map(str::trim) {
        None | Some("") => None,
        Some(n) => match server_name_problem(n) {
            Some(why) => return Err(why),
            None => Some(n.to_owned()),
        },
    };
    Ok(Tls {
        skip_verify: f.tls_skip_verify.unwrap_or(false),
        server_name,
    })
}

fn http_probe(f: &Fields<'_>) -> Probe {
    let tls = match f.protocol {
        None => None,
        Some(p) if p.eq_ignore_ascii_case("http") => None,
        Some(p) if p.eq_ignore_ascii_case("https") => match tls_settings(f) {
            Ok(tls) => Some(tls),
            Err(why) => return Probe::Invalid(why),
        },
        Some(p) => return Probe::Invalid(format!("unknown protocol {p:?}: use http or https")),
    };
    let method = f.method.unwrap_or("GET").to_ascii_uppercase();
    if !is_token(&method) {
        return Probe::Invalid(format!("invalid method {method:?}: use GET or HEAD"));
    }
    let path = f.path.unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    if path
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Probe::Invalid(format!("invalid path {path:?}: no spaces or control characters"));
    }
    let mut headers = Vec::new();
    for h in f.headers {
        let name = h.name.clone().unwrap_or_default();
        if !is_token(&name) {
            return Probe::Invalid(format!("invalid header name {name:?}"));
        }
        for v in &h.values {
            if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
                return Probe::Invalid(format!("invalid value of header {name}: no line breaks"));
            }
            headers.push((name.clone(), v.clone()));
        }
    }
    Probe::Http {
        method,
        path,
        headers,
        tls,
    }
}

fn spec(name: String, f: &Fields<'_>, default_port: Option<u16>) -> CheckSpec {
    let kind = f.kind.unwrap_or("tcp");
    let probe = match kind {
        "tcp" => Probe::Tcp,
        "http" => http_probe(f),
        other => Probe::Invalid(format!("unsupported check type {other:?}: use tcp or http")),
    };
    let port = f.port.or(default_port);
    let probe = match (port, probe) {
        (None, Probe::Tcp | Probe::Http { .. }) => {
            Probe::Invalid("the check has no port: set its port (or the service's internal_port)".into())
        }
        (_, p) => p,
    };
    CheckSpec {
        name,
        probe,
        port: port.unwrap_or(0),
        interval: f.interval.map_or(DEFAULT_INTERVAL, |d| d.0).max(MIN_INTERVAL),
        timeout: f
            .timeout
            .map_or(DEFAULT_TIMEOUT, |d| d.0)
            .max(Duration::from_millis(1)),
        grace: f.grace.map_or(DEFAULT_GRACE_PERIOD, |d| d.0),
    }
}

/// The checks of a config: top-level ones (by name), then its service checks in order
/// ([`service_specs`]).
pub fn specs(config: &MachineConfig) -> Vec<CheckSpec> {
    let mut out: Vec<CheckSpec> = config
        .checks
        .iter()
        .map(|(name, c)| {
            let f = Fields {
                kind: c.r#type.as_deref(),
                port: c.port,
                interval: c.interval.as_ref(),
                timeout: c.timeout.as_ref(),
                grace: c.grace_period.as_ref(),
                method: c.method.as_deref(),
                path: c.path.as_deref(),
                protocol: c.protocol.as_deref(),
                tls_skip_verify: c.tls_skip_verify,
                tls_server_name: c.tls_server_name.as_deref(),
                headers: &c.headers,
            };
            spec(name.clone(), &f, None)
        })
        .collect();
    out.extend(service_specs(&config.services));
    out
}

/// The service checks of a machine's services (in config order, as the catalog carries them):
/// `servicecheck-NN-TYPE-PORT`, `NN` counting every service's checks from 00.
pub fn service_specs(services: &[MachineService]) -> Vec<CheckSpec> {
    let mut out = Vec::new();
    for service in services {
        for c in &service.checks {
            let f = Fields {
                kind: c.r#type.as_deref(),
                port: c.port,
                interval: c.interval.as_ref(),
                timeout: c.timeout.as_ref(),
                grace: c.grace_period.as_ref(),
                method: c.method.as_deref(),
                path: c.path.as_deref(),
                protocol: c.protocol.as_deref(),
                tls_skip_verify: c.tls_skip_verify,
                tls_server_name: c.tls_server_name.as_deref(),
                headers: &c.headers,
            };
            let port = c.port.or(service.internal_port);
            let kind = c.r#type.as_deref().unwrap_or("tcp");
            let name = format!(
                "{SERVICE_CHECK_PREFIX}{:02}-{kind}-{}",
                out.len(),
                port.unwrap_or(0)
            );
            out.push(spec(name, &f, service.internal_port));
        }
    }
    out
}

/// Whether any of `services` has a check (cheap: nothing is resolved).
pub fn has_service_checks(services: &[MachineService]) -> bool {
    services.iter().any(|s| !s.checks.is_empty())
}

/// The request head an http check sends to `host` (the `Host` header unless the check gives
/// one): `Connection: close`, a `User-Agent` unless the check gives one, then its headers.
pub fn http_request(method: &str, path: &str, headers: &[(String, String)], host: &str) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {host}\r\n"));
    }
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("user-agent")) {
        req.push_str("User-Agent: aloft-health-check\r\n");
    }
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("Connection: close\r\n\r\n");
    req
}

/// Parses a response's status line (without its CRLF): the status code and the text after the
/// version (`"204 No Content"`); an error that says what came instead.
pub fn parse_status_line(line: &str) -> Result<(u16, String), String> {
    let mut parts = line.splitn(2, ' ');
    let version = parts.next().unwrap_or_default();
    let rest = parts.next().unwrap_or_default().trim().to_owned();
    let code = rest.get(..3).and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(code) if version.starts_with("HTTP/") => Ok((code, rest)),
        _ => Err(format!("not an HTTP response: {line:?}")),
    }
}

/// An http check's verdict on status `code`: passing on a 2xx, critical otherwise (redirects are
/// not followed).
pub fn http_state(code: u16) -> CheckState {
    if (200..300).contains(&code) {
        CheckState::Passing
    } else {
        CheckState::Critical
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;
    use crate::{MachineCheck, MachineServiceCheck};

    fn d(ms: u64) -> crate::Duration {
        crate::Duration(Duration::from_millis(ms))
    }

    #[test]
    fn specs_resolve_names_defaults_and_ports() {
        let mut config = MachineConfig::default();
        config.checks.insert(
            "alive".into(),
            MachineCheck {
                r#type: Some("http".into()),
                port: Some(9000),
                path: Some("ready".into()),
                interval: Some(d(5)),
                ..MachineCheck::default()
            },
        );
        config.checks.insert(
            "secure".into(),
            MachineCheck {
                r#type: Some("http".into()),
                port: Some(443),
                protocol: Some("https".into()),
                ..MachineCheck::default()
            },
        );
        config.checks.insert("portless".into(), MachineCheck::default());
        config.services = vec![
            MachineService {
                internal_port: Some(8080),
                checks: vec![
                    MachineServiceCheck::default(),
                    MachineServiceCheck {
                        r#type: Some("http".into()),
                        timeout: Some(d(3000)),
                        grace_period: Some(d(0)),
                        ..MachineServiceCheck::default()
                    },
                ],
                ..MachineService::default()
            },
            MachineService {
                internal_port: Some(5432),
                checks: vec![MachineServiceCheck {
                    r#type: Some("udp".into()),
                    port: Some(5433),
                    ..MachineServiceCheck::default()
                }],
                ..MachineService::default()
            },
        ];
        let s = specs(&config);
        let names: Vec<&str> = s.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "alive",
                "portless",
                "secure",
                "servicecheck-00-tcp-8080",
                "servicecheck-01-http-8080",
                "servicecheck-02-udp-5433"
            ]
        );
        assert_eq!(
            s[0].probe,
            Probe::Http {
                method: "GET".into(),
                path: "/ready".into(),
                headers: Vec::new(),
                tls: None,
            }
        );
        assert_eq!(
            (s[0].port, s[0].interval, s[0].timeout),
            (9000, MIN_INTERVAL, DEFAULT_TIMEOUT)
        );
        assert!(matches!(&s[1].probe, Probe::Invalid(w) if w.contains("no port")));
        assert_eq!(
            s[2].probe,
            Probe::Http {
                method: "GET".into(),
                path: "/".into(),
                headers: Vec::new(),
                tls: Some(Tls::default()),
            }
        );
        assert_eq!(s[3].probe, Probe::Tcp);
        assert_eq!(
            (s[3].port, s[3].interval, s[3].grace),
            (8080, DEFAULT_INTERVAL, DEFAULT_GRACE_PERIOD)
        );
        assert_eq!(
            (s[4].timeout, s[4].grace),
            (Duration::from_secs(3), Duration::ZERO)
        );
        assert!(matches!(&s[5].probe, Probe::Invalid(w) if w.contains("unsupported check type")));
        // The service checks alone resolve the same, from the services only.
        assert_eq!(service_specs(&config.services), s[3..]);
        assert!(has_service_checks(&config.services));
        assert!(!has_service_checks(&[MachineService::default()]));
        assert!(s[3..].iter().all(|c| is_service_check(&c.name)));
        assert!(!is_service_check(&s[0].name));
    }

    fn https_check(protocol: &str, skip: Option<bool>, name: Option<&str>) -> Probe {
        let services = [MachineService {
            internal_port: Some(8443),
            checks: vec![MachineServiceCheck {
                r#type: Some("http".into()),
                protocol: Some(protocol.into()),
                tls_skip_verify: skip,
                tls_server_name: name.map(Into::into),
                ..MachineServiceCheck::default()
            }],
            ..MachineService::default()
        }];
        service_specs(&services).remove(0).probe
    }

    fn tls_of(p: &Probe) -> Option<&Tls> {
        match p {
            Probe::Http { tls, .. } => tls.as_ref(),
            _ => None,
        }
    }

    #[test]
    fn https_checks_carry_their_tls_settings() {
        // Any case; verification on unless skipped; the server name as given.
        let p = https_check("HTTPS", Some(true), Some("app.example.com"));
        assert_eq!(
            tls_of(&p),
            Some(&Tls {
                skip_verify: true,
                server_name: Some("app.example.com".into())
            })
        );
        let p = https_check("https", None, None);
        assert_eq!(tls_of(&p), Some(&Tls::default()));
        // An empty name is no name.
        let p = https_check("https", Some(false), Some(""));
        assert_eq!(tls_of(&p), Some(&Tls::default()));
        // Plain http ignores the TLS keys.
        let p = https_check("http", Some(true), Some("app.example.com"));
        assert!(matches!(p, Probe::Http { tls: None, .. }), "{p:?}");
        // Service checks of https are named as http ones (the type is http).
        let services = [MachineService {
            internal_port: Some(8443),
            checks: vec![MachineServiceCheck {
                r#type: Some("http".into()),
                protocol: Some("https".into()),
                ..MachineServiceCheck::default()
            }],
            ..MachineService::default()
        }];
        assert_eq!(service_specs(&services)[0].name, "servicecheck-00-http-8443");
        let p = https_check("spdy", None, None);
        assert!(
            matches!(&p, Probe::Invalid(w) if w.contains("use http or https")),
            "{p:?}"
        );
    }

    #[test]
    fn an_https_checks_server_name_must_be_a_dns_name() {
        for bad in [
            "10.0.0.1",
            "fdaa::2",
            "not a name",
            "-lead.example.com",
            "trail-.example.com",
            "a..b",
            "example.123",
            "under/slash",
            "ünïcode.example",
        ] {
            assert!(!is_server_name(bad), "{bad}");
            assert!(server_name_problem(bad).is_some(), "{bad}");
            let p = https_check("https", None, Some(bad));
            assert!(
                matches!(&p, Probe::Invalid(w) if w.contains("tls_server_name") && w.contains(bad)),
                "{bad}: {p:?}"
            );
        }
        let p = https_check("https", None, Some("10.0.0.1"));
        assert!(
            matches!(&p, Probe::Invalid(w) if w.contains("IP address")),
            "{p:?}"
        );
        let long = format!("{}.com", "a".repeat(64));
        assert!(!is_server_name(&long));
        let too_long = vec!["a".repeat(60); 5].join(".");
        assert!(!is_server_name(&too_long));
        for good in [
            "localhost",
            "app.example.com",
            "app.example.com.",
            "my_app.internal",
            "x-1.fly.dev",
            "1.example.com",
        ] {
            assert!(is_server_name(good), "{good}");
            assert_eq!(server_name_problem(good), None, "{good}");
            let p = https_check("https", None, Some(good));
            assert_eq!(tls_of(&p).and_then(|t| t.server_name.as_deref()), Some(good));
        }
    }

    #[test]
    fn http_requests_and_status_lines() {
        let req = http_request(
            "HEAD",
            "/healthz?x=1",
            &[("X-Probe".into(), "yes".into())],
            "10.0.0.2:80",
        );
        assert_eq!(
            req,
            "HEAD /healthz?x=1 HTTP/1.1\r\nHost: 10.0.0.2:80\r\nUser-Agent: aloft-health-check\r\n\
             X-Probe: yes\r\nConnection: close\r\n\r\n"
        );
        let own = http_request(
            "GET",
            "/",
            &[("host".into(), "app.internal".into())],
            "10.0.0.2:80",
        );
        assert!(!own.contains("Host: 10.0.0.2"), "{own}");
        assert!(own.contains("host: app.internal\r\n"), "{own}");
        assert_eq!(
            parse_status_line("HTTP/1.1 204 No Content"),
            Ok((204, "204 No Content".to_owned()))
        );
        assert!(parse_status_line("SSH-2.0-OpenSSH").is_err());
        assert!(parse_status_line("HTTP/1.1 abc").is_err());
        assert_eq!(http_state(200), CheckState::Passing);
        assert_eq!(http_state(299), CheckState::Passing);
        assert_eq!(http_state(301), CheckState::Critical);
        assert_eq!(http_state(500), CheckState::Critical);
    }
}
