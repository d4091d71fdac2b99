//! The proxy's own error answers: Fly's proxy error codes, in a header and a short page.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::http::{Body, full};

/// The header naming the proxy error code of an answer the proxy made itself.
pub const ERROR_HEADER: &str = "fly-proxy-error-code";

/// Fly's proxy error codes the edge answers with (see the platform reference, §5.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyCode {
    /// PC01: the machine refused the connection (app not listening, or bound to 127.0.0.1).
    PC01,
    /// PC05: connecting to the machine timed out.
    PC05,
    /// PC07: every connect attempt failed.
    PC07,
    /// PU02: the request to the machine was started but could not be completed.
    PU02,
    /// PU01: the HTTP/2 handshake with the machine failed (`h2_backend`).
    PU01,
    /// PM03: waking a machine timed out.
    PM03,
    /// PM07: the machine could not be started.
    PM07,
    /// PA01: the request body is too large to be replayed.
    PA01,
    /// PA02: more than 10 replays.
    PA02,
    /// PA03: the app's fly-replay could not be understood.
    PA03,
    /// PA04: the replay's target app does not exist.
    PA04,
    /// PA05: the replay's target app is in another organization.
    PA05,
    /// PR01: no healthy machine.
    PR01,
    /// PR02: the machine asked for does not exist.
    PR02,
    /// PR03: no candidate machine after retries, with the last cause.
    PR03,
    /// PR04: no app answers at this hostname (aloft's use: an unknown Host or SNI).
    PR04,
    /// PL01: the app's machines are all at their hard limit and the queue is full or timed out.
    PL01,
    /// PL02: this client has too many connections open.
    PL02,
}

impl ProxyCode {
    /// The code, e.g. `PR01`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PC01 => "PC01",
            Self::PC05 => "PC05",
            Self::PC07 => "PC07",
            Self::PU01 => "PU01",
            Self::PU02 => "PU02",
            Self::PM03 => "PM03",
            Self::PM07 => "PM07",
            Self::PA01 => "PA01",
            Self::PA02 => "PA02",
            Self::PA03 => "PA03",
            Self::PA04 => "PA04",
            Self::PA05 => "PA05",
            Self::PR01 => "PR01",
            Self::PR02 => "PR02",
            Self::PR03 => "PR03",
            Self::PR04 => "PR04",
            Self::PL01 => "PL01",
            Self::PL02 => "PL02",
        }
    }

    /// The status the client gets.
    pub fn status(self) -> StatusCode {
        match self {
            Self::PR04 | Self::PR02 => StatusCode::NOT_FOUND,
            Self::PA01 => StatusCode::PAYLOAD_TOO_LARGE,
            Self::PL02 => StatusCode::TOO_MANY_REQUESTS,
            Self::PR01 | Self::PL01 | Self::PM03 | Self::PM07 => StatusCode::SERVICE_UNAVAILABLE,
            Self::PC05 => StatusCode::GATEWAY_TIMEOUT,
            Self::PC01
            | Self::PC07
            | Self::PU01
            | Self::PU02
            | Self::PA02
            | Self::PA03
            | Self::PA04
            | Self::PA05
            | Self::PR03 => StatusCode::BAD_GATEWAY,
        }
    }

    /// What it means, for the page.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::PC01 => {
                "the app's machine refused the connection: is the app listening on 0.0.0.0 and the service's internal_port?"
            }
            Self::PC05 => "connecting to the app's machine timed out",
            Self::PC07 => "could not connect to any of the app's machines",
            Self::PU01 => {
                "the HTTP/2 handshake with the app's machine failed (h2_backend is set: does the app speak h2c?)"
            }
            Self::PU02 => "the app's machine closed the connection before answering completely",
            Self::PM03 => "the app's machine did not start in time",
            Self::PM07 => "the app's machine could not be started",
            Self::PA01 => "the request body is too large to be replayed (limit 1 MiB)",
            Self::PA02 => "the request was replayed too many times (limit 10)",
            Self::PA03 => "the app answered with a fly-replay the edge could not understand",
            Self::PA04 => "the app asked to replay the request to an app that does not exist",
            Self::PA05 => "the app asked to replay the request to an app of another organization",
            Self::PR01 => "the app has no healthy machine to serve the request",
            Self::PR02 => "the machine the request asked for does not exist",
            Self::PR03 => "no machine could take the request",
            Self::PR04 => "no app answers at this hostname",
            Self::PL01 => "every machine of the app is at its concurrency hard limit",
            Self::PL02 => "too many connections from this client",
        }
    }
}

/// The edge's own answer for `code`: the status, the code in [`ERROR_HEADER`], a short page.
pub(crate) fn response(code: ProxyCode, detail: Option<&str>, request_id: &str) -> Response<Body> {
    let mut page = format!(
        "<!doctype html><title>{status}</title><h1>{status}</h1><p>{meaning}</p>",
        status = code.status(),
        meaning = code.meaning(),
    );
    if let Some(d) = detail {
        page.push_str("<p>");
        page.push_str(&escape(d));
        page.push_str("</p>");
    }
    page.push_str(&format!(
        "<p><small>{} · request {}</small></p>\n",
        code.as_str(),
        escape(request_id)
    ));
    let mut resp = Response::new(full(Bytes::from(page)));
    *resp.status_mut() = code.status();
    let h = resp.headers_mut();
    h.insert(ERROR_HEADER, HeaderValue::from_static(code.as_str()));
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}
