//! The HTTP side: one `reqwest` client, the cluster's endpoints (a request that cannot connect to
//! one goes to the next) and what a failed request means.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aloft_store::StoreError;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::wire::{self, ErrorBody};

/// gRPC status codes etcd's errors carry.
pub(crate) mod code {
    /// `NotFound`: a lease that does not exist (any more).
    pub(crate) const NOT_FOUND: i64 = 5;
    /// `OutOfRange`: a revision compacted away, or in the future.
    pub(crate) const OUT_OF_RANGE: i64 = 11;
}

/// Why a request failed, before it is told as a [`StoreError`] of some operation.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No endpoint answered: why (`connection refused`, `no answer within 5s`, …).
    Unreachable(String),
    /// etcd answered with an error.
    Status {
        endpoint: String,
        code: i64,
        message: String,
    },
    /// The answer is not what etcd's gateway sends.
    Malformed { endpoint: String, detail: String },
}

impl Failure {
    /// Whether etcd said the lease named does not exist.
    pub(crate) fn is_lease_not_found(&self) -> bool {
        matches!(self, Self::Status { code: code::NOT_FOUND, message, .. } if message.contains("lease not found"))
    }

    /// Whether etcd said the revision asked for was compacted away.
    pub(crate) fn is_compacted(&self) -> bool {
        matches!(self, Self::Status { code: code::OUT_OF_RANGE, message, .. } if message.contains("compacted"))
    }
}

/// One answer: the endpoint that gave it and its body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) endpoint: String,
    pub(crate) body: Vec<u8>,
}

impl Answer {
    /// The body as `T`.
    pub(crate) fn decode<T: DeserializeOwned>(&self) -> Result<T, Failure> {
        wire::decode(&self.body).map_err(|detail| self.malformed(detail))
    }

    /// A failure: the answer had `detail` wrong.
    pub(crate) fn malformed(&self, detail: impl Into<String>) -> Failure {
        Failure::Malformed {
            endpoint: self.endpoint.clone(),
            detail: detail.into(),
        }
    }
}

/// The cluster's endpoints and the HTTP client that talks to them.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// The endpoint tried first: the last one that answered.
    preferred: AtomicUsize,
    pub(crate) timeout: Duration,
}

impl Client {
    /// A client of `endpoints` (checked), each request taking at most `timeout`.
    pub(crate) fn new(endpoints: &[String], timeout: Duration) -> Result<Self, StoreError> {
        let endpoints = endpoints
            .iter()
            .map(|e| crate::options::endpoint(e))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(StoreError::InvalidEndpoint {
                endpoint: String::new(),
                reason: "no endpoint given",
            });
        }
        let setup = |detail: String| StoreError::Etcd {
            endpoint: endpoints.join(", "),
            op: "set up the HTTP client",
            detail,
        };
        let tls = aloft_tls::client_config().map_err(|e| setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .connect_timeout(timeout)
            // Watches are long-lived connections: notice a peer that vanished.
            .tcp_keepalive(Some(Duration::from_secs(15)))
            .user_agent(concat!("aloft-etcd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| setup(describe(&e)))?;
        Ok(Self {
            http,
            endpoints,
            preferred: AtomicUsize::new(0),
            timeout,
        })
    }

    /// The endpoints, comma-separated (for messages).
    pub(crate) fn endpoint_list(&self) -> String {
        self.endpoints.join(", ")
    }

    /// The endpoints.
    pub(crate) fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// `failure` as the error of operation `op`.
    pub(crate) fn error(&self, op: &'static str, failure: Failure) -> StoreError {
        match failure {
            Failure::Unreachable(detail) => StoreError::EtcdUnavailable {
                endpoints: self.endpoint_list(),
                op,
                detail,
            },
            Failure::Status {
                endpoint,
                code,
                message,
            } => StoreError::Etcd {
                endpoint,
                op,
                detail: explain(code, &message),
            },
            Failure::Malformed { endpoint, detail } => StoreError::Etcd {
                endpoint,
                op,
                detail: format!(
                    "its answer is not what etcd v3's JSON gateway sends ({detail}); is this etcd 3.4 or newer?"
                ),
            },
        }
    }

    /// One unary request: `body` POSTed to `path`, the whole answer read within the timeout.
    pub(crate) async fn post(&self, path: &str, body: &Value) -> Result<Answer, Failure> {
        let (endpoint, resp) = self.send(path, body, true).await?;
        let status = resp.status();
        let body = match resp.bytes().await {
            Ok(b) => b.to_vec(),
            Err(e) if e.is_timeout() => {
                return Err(Failure::Unreachable(format!(
                    "no answer from {endpoint} within {:?}",
                    self.timeout
                )));
            }
            Err(e) => {
                return Err(Failure::Malformed {
                    endpoint,
                    detail: format!("the answer broke off: {}", describe(&e)),
                });
            }
        };
        let answer = Answer { endpoint, body };
        if status.is_success() {
            Ok(answer)
        } else {
            Err(status_failure(answer, status))
        }
    }

    /// A streamed request (a watch): the response once its head arrived; the body is read as
    /// it comes, with no overall time limit.
    pub(crate) async fn open_stream(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(String, reqwest::Response), Failure> {
        let (endpoint, resp) = self.send(path, body, false).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok((endpoint, resp));
        }
        let body = tokio::time::timeout(self.timeout, resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| b.to_vec())
            .unwrap_or_default();
        Err(status_failure(Answer { endpoint, body }, status))
    }

    /// Sends the request to the preferred endpoint, then to the others while they cannot be
    /// connected to. A request that was sent is never sent again (it may have been applied).
    async fn send(
        &self,
        path: &str,
        body: &Value,
        unary: bool,
    ) -> Result<(String, reqwest::Response), Failure> {
        let body =
            serde_json::to_vec(body).map_err(|e| Failure::Unreachable(format!("encode the request: {e}")))?;
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut failed: Vec<(usize, String)> = Vec::new();
        for i in 0..n {
            let at = (first + i) % n;
            let endpoint = &self.endpoints[at];
            let mut req = self
                .http
                .post(format!("{endpoint}{path}"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            if unary {
                req = req.timeout(self.timeout);
            }
            match req.send().await {
                Ok(resp) => {
                    self.preferred.store(at, Ordering::Relaxed);
                    return Ok((endpoint.clone(), resp));
                }
                Err(e) if e.is_connect() => failed.push((at, describe(&e))),
                Err(e) => {
                    // Sent, or maybe sent: the next call starts with another member.
                    self.preferred.store(at + 1, Ordering::Relaxed);
                    return Err(Failure::Unreachable(if e.is_timeout() {
                        format!("no answer from {endpoint} within {:?}", self.timeout)
                    } else {
                        format!("{endpoint}: {}", describe(&e))
                    }));
                }
            }
        }
        Err(Failure::Unreachable(summarize(&self.endpoints, &failed)))
    }
}

/// What connecting to each endpoint gave: one reason if all agree, else each endpoint's.
fn summarize(endpoints: &[String], failed: &[(usize, String)]) -> String {
    match failed {
        [] => "no endpoint".to_owned(),
        [(_, first), rest @ ..] if rest.iter().all(|(_, r)| r == first) => first.clone(),
        _ => failed
            .iter()
            .map(|(at, why)| format!("{}: {why}", endpoints.get(*at).map_or("?", String::as_str)))
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The failure an HTTP error status means: etcd's error if the body is one, else the status.
fn status_failure(answer: Answer, status: reqwest::StatusCode) -> Failure {
    match wire::decode::<ErrorBody>(&answer.body) {
        Ok(e) if !e.error.is_empty() || !e.message.is_empty() => Failure::Status {
            endpoint: answer.endpoint,
            code: e.code,
            message: if e.message.is_empty() { e.error } else { e.message },
        },
        _ => {
            let text = String::from_utf8_lossy(&answer.body);
            let text: String = text.trim().chars().take(200).collect();
            answer.malformed(format!("HTTP {status}: {text:?}"))
        }
    }
}

/// An etcd error, with what to do about the ones an operator can fix.
fn explain(code: i64, message: &str) -> String {
    let hint = if message.contains("duplicate key given in txn request") {
        "; etcd refuses a transaction that writes one key twice or puts a key it also deletes"
    } else if message.contains("too many operations in txn request") {
        "; raise etcd's --max-txn-ops (default 128)"
    } else if message.contains("request is too large") {
        "; raise etcd's --max-request-bytes (default 1.5 MiB)"
    } else if message.contains("no leader") || message.contains("timed out") {
        "; the cluster has no quorum or is overloaded: check `etcdctl endpoint health`"
    } else {
        ""
    };
    format!("{message} (gRPC code {code}){hint}")
}

/// A reqwest error in words: `connection refused` and the like from the innermost cause.
pub(crate) fn describe(e: &reqwest::Error) -> String {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return "connection refused".to_owned(),
                std::io::ErrorKind::ConnectionReset => return "connection reset".to_owned(),
                std::io::ErrorKind::TimedOut => return "connection timed out".to_owned(),
                _ => {}
            }
        }
        innermost = s.to_string();
        source = s.source();
    }
    innermost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_summarise_per_endpoint_only_when_they_differ() {
        let eps = vec!["http://a:1".to_owned(), "http://b:2".to_owned()];
        let same = [
            (0, "connection refused".to_owned()),
            (1, "connection refused".to_owned()),
        ];
        assert_eq!(summarize(&eps, &same), "connection refused");
        let differ = [(1, "connection refused".to_owned()), (0, "dns error".to_owned())];
        assert_eq!(
            summarize(&eps, &differ),
            "http://b:2: connection refused, http://a:1: dns error"
        );
        assert!(explain(3, "etcdserver: too many operations in txn request").contains("--max-txn-ops"));
    }
}
