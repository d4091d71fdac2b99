//! `GET /v1/apps/{app}/logs`: an app's log lines as newline-delimited JSON
//! ([`aloft_api::LogEntry`] per line, `application/x-ndjson`). Without `follow` the answer ends
//! after the lines there are; with it the response stays open and lines arrive as they are
//! written, until the client drops the [`LogStream`].
//!
//! [`NdjsonStream`] decodes any such newline-delimited JSON response (release events use it too).

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::time::Duration;

use aloft_api::LogEntry;
use reqwest::Method;
use serde::de::DeserializeOwned;

use crate::{Client, ClientError, encode};

/// A followed log has no time limit worth the name (a request must have one).
pub(crate) const FOLLOW_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Time for a log request that does not follow.
const TAIL_TIMEOUT: Duration = Duration::from_secs(60);
/// A line longer than this is not a log entry.
const MAX_LINE: usize = 1 << 20;

/// Which log lines to get.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsQuery {
    /// Only this machine (`instance=`).
    pub instance: Option<String>,
    /// Only machines in this region.
    pub region: Option<String>,
    /// At most this many of the lines already written (the server's default when `None`).
    pub limit: Option<usize>,
    /// Keep the response open and send new lines as they come.
    pub follow: bool,
}

impl LogsQuery {
    fn query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(i) = &self.instance {
            parts.push(format!("instance={}", encode(i)));
        }
        if let Some(r) = &self.region {
            parts.push(format!("region={}", encode(r)));
        }
        if let Some(n) = self.limit {
            parts.push(format!("limit={n}"));
        }
        parts.push(format!("follow={}", self.follow));
        format!("?{}", parts.join("&"))
    }
}

/// Log lines as they arrive; see [`Client::logs`].
pub type LogStream = NdjsonStream<LogEntry>;

/// Objects of a newline-delimited JSON response as they arrive.
#[derive(Debug)]
pub struct NdjsonStream<T> {
    response: reqwest::Response,
    url: String,
    status: u16,
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    /// Entries decoded and not yet returned.
    ready: VecDeque<T>,
    done: bool,
    _item: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> NdjsonStream<T> {
    /// Reads `response`'s body as newline-delimited `T`s.
    pub(crate) fn new(response: reqwest::Response, url: String) -> Self {
        Self {
            status: response.status().as_u16(),
            response,
            url,
            partial: Vec::new(),
            ready: VecDeque::new(),
            done: false,
            _item: PhantomData,
        }
    }

    /// The next object; `Ok(None)` when the server ended the response. Blank lines are skipped;
    /// a line that is not a `T` is a [`ClientError::Decode`].
    pub async fn next(&mut self) -> Result<Option<T>, ClientError> {
        loop {
            if let Some(entry) = self.ready.pop_front() {
                return Ok(Some(entry));
            }
            if self.done {
                return Ok(None);
            }
            let chunk = self
                .response
                .chunk()
                .await
                .map_err(|source| ClientError::Transport {
                    url: self.url.clone(),
                    source,
                })?;
            match chunk {
                Some(bytes) => self.feed(&bytes)?,
                None => {
                    self.done = true;
                    let rest = std::mem::take(&mut self.partial);
                    self.line(&rest)?;
                }
            }
        }
    }

    /// Splits `bytes` into lines and decodes the complete ones.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), ClientError> {
        while let Some(end) = bytes.iter().position(|b| *b == b'\n') {
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&bytes[..end]);
            self.line(&line)?;
            bytes = &bytes[end + 1..];
        }
        self.partial.extend_from_slice(bytes);
        if self.partial.len() > MAX_LINE {
            return Err(self.decode_error(serde::de::Error::custom(format!(
                "a line longer than {MAX_LINE} bytes"
            ))));
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8]) -> Result<(), ClientError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let entry = serde_json::from_slice(line).map_err(|e| self.decode_error(e))?;
        self.ready.push_back(entry);
        Ok(())
    }

    fn decode_error(&self, source: serde_json::Error) -> ClientError {
        ClientError::Decode {
            url: self.url.clone(),
            status: self.status,
            source,
        }
    }
}

impl Client {
    /// `GET /v1/apps/{app}/logs?instance=&region=&limit=&follow=`: the app's log lines, oldest
    /// first, as a stream. With `follow` it ends only when the server ends it or the stream is
    /// dropped.
    pub async fn logs(&self, app: &str, query: &LogsQuery) -> Result<LogStream, ClientError> {
        let path = format!("/v1/apps/{}/logs{}", encode(app), query.query());
        let timeout = if query.follow {
            FOLLOW_TIMEOUT
        } else {
            TAIL_TIMEOUT
        };
        let response = self
            .start(Method::GET, &path, None, timeout, "application/x-ndjson")
            .await?;
        Ok(NdjsonStream::new(response, self.base.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_queries() {
        assert_eq!(LogsQuery::default().query(), "?follow=false");
        let q = LogsQuery {
            instance: Some("3d8d413b29d089".into()),
            region: Some("ams".into()),
            limit: Some(100),
            follow: true,
        };
        assert_eq!(
            q.query(),
            "?instance=3d8d413b29d089&region=ams&limit=100&follow=true"
        );
    }
}
