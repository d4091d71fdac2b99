//! What the routes that take over their HTTP/1.1 connection share (`…/console`, `console.rs`;
//! `…/proxy`, `tunnel.rs`): the [`Upgradable`] extractor and the checks of the upgrade a request
//! asks for ([`Protocol::accept`]): 426 without `Connection: upgrade` and `Upgrade`, naming the
//! protocol as RFC 9110 asks; 400 for another protocol, or a connection that cannot be upgraded
//! (HTTP/2, a server that does not serve upgrades). Then the `101 Switching Protocols` answer
//! ([`Protocol::switching`]).

use std::convert::Infallible;

use aloft_api::ApiError;
use axum::body::Body;
use axum::extract::FromRequestParts;
use axum::http::header::{CONNECTION, UPGRADE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;

use crate::HttpError;

/// The connection's upgrade, when hyper offers one (an HTTP/1.1 request with `Upgrade`).
pub(crate) struct Upgradable(pub(crate) Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for Upgradable {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(parts.extensions.remove::<OnUpgrade>()))
    }
}

/// A protocol a route upgrades its connection to.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Protocol {
    /// The `Upgrade` token (`aloft-console`).
    pub(crate) token: &'static str,
    /// What the route gives, for messages (`the console`).
    pub(crate) what: &'static str,
    /// The client that calls it right (`aloft ssh console`).
    pub(crate) client: &'static str,
}

/// Whether a comma-separated header `name` lists `token` (case-insensitive).
fn lists(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl Protocol {
    /// What a request without the upgrade is told.
    fn how_to_call(&self) -> String {
        format!(
            "{} is an upgrade of the HTTP/1.1 connection: send `Connection: upgrade` and \
             `Upgrade: {}` ({} does)",
            self.what, self.token, self.client
        )
    }

    /// 426 with the protocol to upgrade to, as RFC 9110 asks.
    fn upgrade_required(&self) -> Response {
        let mut response = HttpError::from(ApiError::new(426, self.how_to_call())).into_response();
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static(self.token));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        response
    }

    /// The connection's upgrade when the request asks for this protocol on a connection that can
    /// be upgraded; otherwise the answer to give (426 without the upgrade headers, 400 for
    /// another protocol or a connection that cannot be upgraded), boxed: it is large.
    pub(crate) fn accept(
        &self,
        headers: &HeaderMap,
        upgrade: Option<OnUpgrade>,
    ) -> Result<OnUpgrade, Box<Response>> {
        if !headers.contains_key(UPGRADE) || !lists(headers, &CONNECTION, "upgrade") {
            return Err(Box::new(self.upgrade_required()));
        }
        if !lists(headers, &UPGRADE, self.token) {
            let asked = headers
                .get(UPGRADE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            return Err(Box::new(
                HttpError::from(ApiError::bad_request(format!(
                    "upgrade to {asked:?} is not served here: {}",
                    self.how_to_call()
                )))
                .into_response(),
            ));
        }
        upgrade.ok_or_else(|| {
            Box::new(
                HttpError::from(ApiError::bad_request(format!(
                    "this connection cannot be upgraded: {}",
                    self.how_to_call()
                )))
                .into_response(),
            )
        })
    }

    /// `101 Switching Protocols` to this protocol.
    pub(crate) fn switching(&self) -> Response {
        let mut response = Response::new(Body::empty());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static(self.token));
        response
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    const P: Protocol = Protocol {
        token: "aloft-x",
        what: "the x",
        client: "aloft x",
    };

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn the_upgrade_headers_are_checked_before_the_connection() {
        // Without both headers: 426 naming the protocol (the connection is not looked at).
        for h in [
            headers(&[]),
            headers(&[("upgrade", "aloft-x")]),
            headers(&[("connection", "upgrade")]),
            headers(&[("connection", "keep-alive"), ("upgrade", "aloft-x")]),
        ] {
            let r = P.accept(&h, None).unwrap_err();
            assert_eq!(r.status(), 426);
            assert_eq!(r.headers()[UPGRADE], "aloft-x");
            assert_eq!(r.headers()[CONNECTION], "upgrade");
        }
        // Another protocol: 400.
        let r = P
            .accept(
                &headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]),
                None,
            )
            .unwrap_err();
        assert_eq!(r.status(), 400);
        // Listed among others, any case: accepted, but this connection cannot be upgraded.
        let h = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "h2c, ALOFT-X")]);
        assert_eq!(P.accept(&h, None).unwrap_err().status(), 400);
        let r = P.switching();
        assert_eq!(r.status(), 101);
        assert_eq!(r.headers()[UPGRADE], "aloft-x");
    }
}
