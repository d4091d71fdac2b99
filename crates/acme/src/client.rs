//! The connection to one CA: its directory, replay nonces, signed POSTs (retried on `badNonce`)
//! and polling that honours `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::AcmeError;
use crate::error::Problem;
use crate::jws::AccountKey;

/// Let's Encrypt's production directory.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory: untrusted certificates, generous rate limits; for trials.
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// How often a request refused with `badNonce` is re-sent with the CA's fresh nonce.
const BAD_NONCE_RETRIES: u32 = 20;
/// Default limit on waiting for a challenge, an order or a certificate.
const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(120);
/// Bounds of the wait between polls: the first wait, and the longest one (also caps Retry-After).
const POLL_FIRST: Duration = Duration::from_millis(250);
const POLL_MAX: Duration = Duration::from_secs(10);

/// The parts of the ACME directory (RFC 8555 §7.1.1) this client uses.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Directory {
    pub(crate) new_nonce: String,
    pub(crate) new_account: String,
    pub(crate) new_order: String,
    #[serde(default)]
    pub(crate) meta: Option<DirectoryMeta>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct DirectoryMeta {
    #[serde(default)]
    pub(crate) terms_of_service: Option<String>,
}

/// A connection to one ACME CA. Cheap to clone (shared inside); safe to use from several tasks.
#[derive(Debug, Clone)]
pub struct AcmeClient {
    inner: Arc<Inner>,
    poll_timeout: Duration,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    directory_url: String,
    directory: Directory,
    /// The freshest unused nonce (each response carries one).
    nonce: Mutex<Option<String>>,
    bad_nonce_retries: AtomicU64,
}

/// A CA response: status, headers and body.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) url: String,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, AcmeError> {
        serde_json::from_slice(&self.body).map_err(|e| AcmeError::Protocol {
            url: self.url.clone(),
            what: format!("unexpected JSON ({e})"),
        })
    }

    pub(crate) fn location(&self) -> Result<String, AcmeError> {
        self.headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| AcmeError::Protocol {
                url: self.url.clone(),
                what: "no Location header".into(),
            })
    }

    /// The wait the CA asked for in `Retry-After` (seconds or an HTTP date), if any.
    pub(crate) fn retry_after(&self) -> Option<Duration> {
        parse_retry_after(self.headers.get(RETRY_AFTER)?.to_str().ok()?, SystemTime::now())
    }
}

fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

impl AcmeClient {
    /// Connects to the CA whose directory is at `directory_url` (e.g.
    /// [`LETS_ENCRYPT_PRODUCTION`]) and reads the directory. HTTPS is checked
    /// against the platform's trust store plus `extra_root_pem` (PEM certificates), for a private
    /// or test CA such as Pebble.
    pub async fn new(directory_url: &str, extra_root_pem: Option<&[u8]>) -> Result<Self, AcmeError> {
        let tls = match extra_root_pem {
            None => aloft_tls::client_config().map_err(|e| AcmeError::Setup(e.to_string()))?,
            Some(pem) => config_with_extra_roots(pem)?,
        };
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("aloft-acme/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| AcmeError::Setup(e.to_string()))?;
        let response = http
            .get(directory_url)
            .send()
            .await
            .map_err(|source| AcmeError::Http {
                url: directory_url.to_owned(),
                source,
            })?;
        let response = read(directory_url, response).await?;
        let directory: Directory = response.json()?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                directory_url: directory_url.to_owned(),
                directory,
                nonce: Mutex::new(None),
                bad_nonce_retries: AtomicU64::new(0),
            }),
            poll_timeout: DEFAULT_POLL_TIMEOUT,
        })
    }

    /// This client with another limit on waiting for the CA (validation, issuance); default 120 s.
    pub fn with_poll_timeout(mut self, timeout: Duration) -> Self {
        self.poll_timeout = timeout;
        self
    }

    /// The directory URL this client was made with.
    pub fn directory_url(&self) -> &str {
        &self.inner.directory_url
    }

    /// The CA's terms of service URL, when its directory names one. Registering an account
    /// agrees to them.
    pub fn terms_of_service(&self) -> Option<&str> {
        self.inner.directory.meta.as_ref()?.terms_of_service.as_deref()
    }

    /// How many requests were re-sent because the CA refused their nonce (`badNonce`); for
    /// metrics.
    pub fn bad_nonce_retries(&self) -> u64 {
        self.inner.bad_nonce_retries.load(Ordering::Relaxed)
    }

    pub(crate) fn directory(&self) -> &Directory {
        &self.inner.directory
    }

    pub(crate) fn poll_timeout(&self) -> Duration {
        self.poll_timeout
    }

    fn keep_nonce(&self, headers: &HeaderMap) {
        if let Some(nonce) = headers.get("replay-nonce").and_then(|v| v.to_str().ok()) {
            *self.inner.nonce.lock().unwrap_or_else(PoisonError::into_inner) = Some(nonce.to_owned());
        }
    }

    async fn nonce(&self) -> Result<String, AcmeError> {
        let kept = self
            .inner
            .nonce
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(nonce) = kept {
            return Ok(nonce);
        }
        let url = &self.inner.directory.new_nonce;
        let response = self
            .inner
            .http
            .head(url)
            .send()
            .await
            .map_err(|source| AcmeError::Http {
                url: url.clone(),
                source,
            })?;
        let response = read(url, response).await?;
        response
            .headers
            .get("replay-nonce")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| AcmeError::Protocol {
                url: url.clone(),
                what: "newNonce gave no Replay-Nonce header".into(),
            })
    }

    /// A signed POST (`payload` `None`: POST-as-GET) identified by `kid` (the account URL) or,
    /// without one, by the key's JWK. Re-sent with a fresh nonce when the CA says `badNonce`.
    pub(crate) async fn post(
        &self,
        url: &str,
        key: &AccountKey,
        kid: Option<&str>,
        payload: Option<&Value>,
        accept: Option<&str>,
    ) -> Result<Response, AcmeError> {
        let mut attempt = 0;
        loop {
            let nonce = self.nonce().await?;
            let mut protected = json!({"alg": "ES256", "nonce": nonce, "url": url});
            match kid {
                Some(kid) => protected["kid"] = Value::from(kid),
                None => protected["jwk"] = key.jwk(),
            }
            let body = key.sign(&protected, payload)?;
            let mut request = self
                .inner
                .http
                .post(url)
                .header(CONTENT_TYPE, "application/jose+json")
                .body(body.to_string());
            if let Some(accept) = accept {
                request = request.header(reqwest::header::ACCEPT, accept);
            }
            let response = request.send().await.map_err(|source| AcmeError::Http {
                url: url.to_owned(),
                source,
            })?;
            self.keep_nonce(response.headers());
            match read(url, response).await {
                Err(AcmeError::Ca { problem, .. })
                    if problem.short_kind() == "badNonce" && attempt < BAD_NONCE_RETRIES =>
                {
                    attempt += 1;
                    self.inner.bad_nonce_retries.fetch_add(1, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    /// POST-as-GET `url` until `done` says the object is settled, waiting as the CA asks
    /// (`Retry-After`) or backing off, for at most the poll timeout.
    pub(crate) async fn poll<T: DeserializeOwned>(
        &self,
        url: &str,
        key: &AccountKey,
        kid: &str,
        what: &str,
        done: impl Fn(&T) -> bool,
    ) -> Result<T, AcmeError> {
        let deadline = tokio::time::Instant::now() + self.poll_timeout();
        let mut backoff = POLL_FIRST;
        loop {
            let response = self.post(url, key, Some(kid), None, None).await?;
            let object: T = response.json()?;
            if done(&object) {
                return Ok(object);
            }
            let wait = response
                .retry_after()
                .unwrap_or(backoff)
                .clamp(POLL_FIRST, POLL_MAX);
            backoff = (backoff * 2).min(POLL_MAX);
            if tokio::time::Instant::now() + wait > deadline {
                return Err(AcmeError::Timeout {
                    what: what.to_owned(),
                    after: self.poll_timeout(),
                });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Reads a response: its body on success, the CA's problem document as [`AcmeError::Ca`]
/// otherwise.
async fn read(url: &str, response: reqwest::Response) -> Result<Response, AcmeError> {
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.bytes().await.map_err(|source| AcmeError::Http {
        url: url.to_owned(),
        source,
    })?;
    if status.is_success() {
        return Ok(Response {
            url: url.to_owned(),
            headers,
            body: body.to_vec(),
        });
    }
    let problem = serde_json::from_slice::<Problem>(&body).unwrap_or_else(|_| Problem {
        kind: String::new(),
        detail: format!(
            "HTTP {status} without a problem document: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        ),
        status: None,
        subproblems: Vec::new(),
        identifier: None,
    });
    Err(AcmeError::Ca {
        url: url.to_owned(),
        status: status.as_u16(),
        problem: Box::new(problem),
    })
}

/// rustls with the ring provider, the platform's roots and the given extra PEM roots.
fn config_with_extra_roots(pem: &[u8]) -> Result<rustls::ClientConfig, AcmeError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let roots = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AcmeError::ExtraRoot(e.to_string()))?;
    if roots.is_empty() {
        return Err(AcmeError::ExtraRoot("no certificate in it".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls_platform_verifier::Verifier::new_with_extra_roots(roots, provider.clone())
        .map_err(|e| AcmeError::ExtraRoot(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AcmeError::Setup(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn extra_roots_must_hold_a_certificate() {
        let err = config_with_extra_roots(b"no pem here").unwrap_err();
        assert!(matches!(err, AcmeError::ExtraRoot(_)), "{err}");
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
    }
}
