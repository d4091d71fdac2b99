//! TCP connections to a port of a machine from outside its network (`aloft proxy`, flyctl's
//! `fly proxy`): a local port on the user's computer reaches a database or an admin port that the
//! app does not publish.
//!
//! aloft's extension to Fly's API (flyctl dials the machine's 6PN address over its WireGuard
//! tunnel; aloft has no tunnel and needs none). The client asks
//! `GET /v1/apps/{app}/machines/{id}/proxy?port=N` ([`ProxyQuery`]) with `Connection: upgrade` and
//! `Upgrade: aloft-tcp` ([`PROXY_UPGRADE`]). The server connects to the machine's port first and
//! answers every failure as a normal Fly error body (404, 412 not started, 422 no network, 502
//! refused or timed out); once connected it answers `101 Switching Protocols`, and from then on
//! the connection carries the TCP stream's bytes as they are, both ways. Either side's end of
//! stream is passed on as a half-close; the proxy ends when both directions have ended or
//! either side fails.
//!
//! The control plane reaches the machine's host through [`crate::MachineHost::connect`].

use crate::ApiError;

/// The `Upgrade` token of a TCP proxy connection.
pub const PROXY_UPGRADE: &str = "aloft-tcp";

/// The query of `GET …/machines/{id}/proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyQuery {
    /// The machine's port to connect to (1–65535).
    pub port: u16,
}

impl ProxyQuery {
    /// Reads the query's pairs; 400 naming a missing or bad `port`. Other keys are ignored.
    pub fn from_query(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, ApiError> {
        let mut port = None;
        for (k, v) in pairs {
            if k == "port" {
                let p = v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                    ApiError::bad_request(format!("port={v:?}: use a port from 1 to 65535"))
                })?;
                port = Some(p);
            }
        }
        let port = port.ok_or_else(|| {
            ApiError::bad_request("port is required: the machine's port to connect to, e.g. ?port=5432")
        })?;
        Ok(Self { port })
    }

    /// The query string (without `?`).
    pub fn to_query(&self) -> String {
        format!("port={}", self.port)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_port_is_required_and_in_range() {
        let q = ProxyQuery::from_query(pairs(&[("port", "5432"), ("x", "y")])).unwrap();
        assert_eq!(q, ProxyQuery { port: 5432 });
        assert_eq!(q.to_query(), "port=5432");
        for bad in ["0", "65536", "-1", "", "http"] {
            let e = ProxyQuery::from_query(pairs(&[("port", bad)])).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.message().contains("1 to 65535"), "{}", e.message());
        }
        let e = ProxyQuery::from_query(pairs(&[])).unwrap_err();
        assert!(e.message().contains("port is required"), "{}", e.message());
    }
}
