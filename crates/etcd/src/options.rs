//! How to reach etcd: its members' client URLs and the timeouts.

use std::time::Duration;

use aloft_store::StoreError;

/// How [`EtcdStore::connect`](crate::EtcdStore::connect) reaches etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client URLs of the cluster's members (`http://HOST:PORT`), tried in order: a request that
    /// cannot connect to one goes to the next, and later requests start from the one that
    /// answered.
    pub endpoints: Vec<String>,
    /// How long one request may take, connecting included (watches: until they are set up).
    /// Default 5 s.
    pub timeout: Duration,
    /// Revisions a watcher buffers before it is cut off as lagging. Default 1024, as SQLite's.
    pub watch_capacity: usize,
}

impl EtcdOptions {
    /// Options for `endpoints` with the default timeout and watch buffer (endpoints are checked
    /// when connecting).
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            timeout: Duration::from_secs(5),
            watch_capacity: 1024,
        }
    }

    /// Options for a comma-separated list of client URLs (`--etcd`'s value), checked.
    pub fn parse(list: &str) -> Result<Self, StoreError> {
        let endpoints = list
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(endpoint)
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(StoreError::InvalidEndpoint {
                endpoint: list.to_owned(),
                reason: "no endpoint given",
            });
        }
        Ok(Self::new(endpoints))
    }
}

/// Checks one client URL; it without a trailing `/`.
pub(crate) fn endpoint(given: &str) -> Result<String, StoreError> {
    let invalid = |reason| StoreError::InvalidEndpoint {
        endpoint: given.to_owned(),
        reason,
    };
    let url = reqwest::Url::parse(given.trim()).map_err(|_| invalid("not a URL"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("use http:// (or https://)"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("user names and passwords are not supported"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("give only the scheme, host and port, no path"));
    }
    Ok(url.as_str().trim_end_matches('/').to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    #[test]
    fn endpoints_are_checked_and_normalised() {
        let o = EtcdOptions::parse(" http://127.0.0.1:2379/ ,http://[::1]:2379").unwrap();
        assert_eq!(o.endpoints, ["http://127.0.0.1:2379", "http://[::1]:2379"]);
        assert_eq!(o.timeout, Duration::from_secs(5));
        for bad in [
            "",
            ",",
            "127.0.0.1:2379",
            "ftp://h:1",
            "http://h:1/v3",
            "http://u:p@h:1",
            "http://h:1?x",
        ] {
            let err = EtcdOptions::parse(bad).unwrap_err();
            assert!(matches!(err, StoreError::InvalidEndpoint { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("--etcd http://HOST:PORT"), "{err}");
        }
    }
}
