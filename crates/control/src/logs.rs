//! `GET /v1/apps/{app}/logs` (an aloft extension; Fly serves logs from a separate service): the
//! output of an app's machines as newline-delimited JSON ([`aloft_api::LogEntry`] per line).
//!
//! Query: `instance` (alias `machine`) and `region` narrow it down; `limit` (default 100, at most
//! 10,000) is how many of the newest lines come first; `follow=true` keeps the response open and
//! streams new lines as the machines write them, including machines created meanwhile, until the
//! client goes away.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aloft_api::{ApiError, LogEntry, MachineHost, MachineId};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use crate::apps::visible_app;
use crate::auth::Caller;
use crate::error::blocking;
use crate::extract::AppName;
use crate::{ApiState, HttpError};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// How often a follow looks for machines created since it began.
const RESCAN: Duration = Duration::from_secs(2);
/// How long a follower waits for a line before it checks whether the client is still there.
const POLL: Duration = Duration::from_secs(1);
/// Lines buffered per follow between the machines and a slow client.
const BUFFER: usize = 1024;

/// The parsed query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LogsQuery {
    instance: Option<String>,
    region: Option<String>,
    limit: usize,
    follow: bool,
}

impl LogsQuery {
    fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut q = Self {
            instance: None,
            region: None,
            limit: DEFAULT_LIMIT,
            follow: false,
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let v = v.trim();
            match &*k {
                "instance" | "machine" if !v.is_empty() => q.instance = Some(v.to_owned()),
                "region" if !v.is_empty() => q.region = Some(v.to_owned()),
                "limit" if !v.is_empty() => {
                    q.limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|n| *n <= MAX_LIMIT)
                        .ok_or_else(|| {
                            ApiError::bad_request(format!(
                                "invalid limit {v:?}: give a number from 0 to {MAX_LIMIT}"
                            ))
                        })?;
                }
                "follow" => {
                    q.follow = match v {
                        "" | "1" | "true" | "t" | "True" | "TRUE" => true,
                        "0" | "false" | "f" | "False" | "FALSE" => false,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "invalid value {v:?} for follow: use true or false"
                            )));
                        }
                    };
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// One machine whose log is read.
#[derive(Clone)]
struct Source {
    id: MachineId,
    host: Arc<dyn MachineHost>,
}

/// The app's machines the query selects (placement records: machines of other apps never show).
fn sources(state: &ApiState, app: &str, q: &LogsQuery) -> Result<Vec<Source>, HttpError> {
    let mut out = Vec::new();
    for p in state.control().list_machines(app)? {
        let m = &p.value.machine;
        if q.instance.as_ref().is_some_and(|i| i != m.id.as_str())
            || q.region.as_ref().is_some_and(|r| *r != m.region)
        {
            continue;
        }
        let Ok(host) = state.hosts().get(&p.value.host) else {
            continue;
        };
        out.push(Source {
            id: m.id.clone(),
            host: host.agent.clone(),
        });
    }
    Ok(out)
}

/// The newest `limit` lines of the sources, oldest first, and where each machine's log is now
/// (the seq of its last line, 0 for an empty log).
fn tail(sources: &[Source], limit: usize) -> Result<(Vec<LogEntry>, HashMap<MachineId, u64>), HttpError> {
    let mut lines = Vec::new();
    let mut last = HashMap::new();
    for s in sources {
        // At least one line, to learn where the log is: a follow goes on from exactly there.
        let mut got = match s.host.log_tail(&s.id, limit.max(1)) {
            Ok(got) => got,
            // Destroyed meanwhile: nothing to show.
            Err(e) if e.status() == 404 => continue,
            Err(e) => return Err(e.into()),
        };
        last.insert(s.id.clone(), got.last().map_or(0, |l| l.seq));
        let skip = got.len().saturating_sub(limit);
        got.drain(..skip);
        lines.extend(got);
    }
    lines.sort_by(|a, b| a.timestamp.cmp(&b.timestamp).then(a.seq.cmp(&b.seq)));
    let skip = lines.len().saturating_sub(limit);
    lines.drain(..skip);
    Ok((lines, last))
}

fn ndjson(entry: &LogEntry) -> Bytes {
    let mut line = serde_json::to_vec(entry).unwrap_or_default();
    line.push(b'\n');
    Bytes::from(line)
}

/// `GET /v1/apps/{app}/logs` → `application/x-ndjson`.
pub(crate) async fn logs(
    State(state): State<ApiState>,
    caller: Caller,
    AppName(app): AppName,
    RawQuery(query): RawQuery,
) -> Result<Response, HttpError> {
    let q = LogsQuery::parse(query.as_deref())?;
    let (lines, last, selected) = {
        let (state, app, q) = (state.clone(), app.clone(), q.clone());
        blocking(move || {
            visible_app(state.control(), &caller, &app)?;
            let selected = sources(&state, &app, &q)?;
            if let Some(i) = &q.instance
                && selected.is_empty()
            {
                return Err(ApiError::not_found(format_args!("machine {i} in app {app}")).into());
            }
            let (lines, last) = tail(&selected, q.limit)?;
            Ok((lines, last, selected))
        })
        .await?
    };
    let body = if q.follow {
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(follow(state, app, q, lines, last, selected, tx));
        Body::from_stream(Lines(rx))
    } else {
        let mut out = Vec::new();
        for l in &lines {
            out.extend_from_slice(&ndjson(l));
        }
        Body::from(out)
    };
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    Ok(response)
}

/// Sends the tail, then follows every selected machine (and machines created later) until the
/// client goes away (the receiver is dropped).
async fn follow(
    state: ApiState,
    app: String,
    q: LogsQuery,
    tail: Vec<LogEntry>,
    mut last: HashMap<MachineId, u64>,
    selected: Vec<Source>,
    tx: mpsc::Sender<Bytes>,
) {
    for l in &tail {
        if tx.send(ndjson(l)).await.is_err() {
            return;
        }
    }
    let mut followed = HashSet::new();
    let mut pending = selected;
    loop {
        for s in pending.drain(..) {
            if !followed.insert(s.id.clone()) {
                continue;
            }
            // Machines found after the tail are followed from their first line, so nothing
            // they wrote before the follow saw them is lost.
            let after = Some(last.remove(&s.id).unwrap_or(0));
            let tx = tx.clone();
            tokio::task::spawn_blocking(move || follow_one(&s, after, &tx));
        }
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(RESCAN) => {}
        }
        let (state, app, q) = (state.clone(), app.clone(), q.clone());
        match tokio::task::spawn_blocking(move || sources(&state, &app, &q)).await {
            Ok(Ok(now)) => pending = now,
            // The app is gone (or the store failed): end the stream.
            _ => return,
        }
    }
}

/// Forwards one machine's new lines until the client goes away or the machine is gone.
fn follow_one(s: &Source, after: Option<u64>, tx: &mpsc::Sender<Bytes>) {
    let Ok(mut f) = s.host.follow_logs(&s.id, after) else {
        return;
    };
    while !tx.is_closed() {
        match f.next(POLL) {
            Ok(Some(entry)) => {
                if tx.blocking_send(ndjson(&entry)).is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(_) => return,
        }
    }
}

/// The response body of a follow: lines as they come.
pub(crate) struct Lines(pub(crate) mpsc::Receiver<Bytes>);

impl futures_core::Stream for Lines {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|line| line.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parses_and_refuses_bad_values() {
        let q = LogsQuery::parse(Some("machine=3d8d413b29d089&region=local&limit=5&follow")).unwrap();
        assert_eq!(q.instance.as_deref(), Some("3d8d413b29d089"));
        assert_eq!(q.region.as_deref(), Some("local"));
        assert_eq!(q.limit, 5);
        assert!(q.follow);
        let q = LogsQuery::parse(None).unwrap();
        assert_eq!((q.limit, q.follow), (DEFAULT_LIMIT, false));
        assert_eq!(LogsQuery::parse(Some("limit=-1")).unwrap_err().status(), 400);
        assert_eq!(LogsQuery::parse(Some("limit=10001")).unwrap_err().status(), 400);
        assert_eq!(LogsQuery::parse(Some("follow=maybe")).unwrap_err().status(), 400);
    }
}
