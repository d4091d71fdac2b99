//! Watches: one streamed `/v3/watch` request per watcher, its events fed into the store's
//! `WatchSender` one batch per revision.
//!
//! The stream is set up before `watch` returns, so a start revision etcd has compacted away is
//! `StoreError::Compacted` right there, as with SQLite. Replayed history (up to the revision the
//! stream was created at) waits for room in the watcher's buffer, as SQLite hands history over
//! whole; only live changes that do not fit cut the watcher off. The stream runs on the
//! store's runtime until the watcher is dropped (noticed at the next change, or within
//! [`GONE_CHECK`]), is cut off for lagging (its buffer full: the stream is cancelled), or the
//! store is dropped (the watcher sees `Closed`). A stream that breaks (etcd restarted, a member
//! went away) is opened again from the first revision not yet delivered, on whichever endpoint
//! answers, so the watcher sees neither a gap nor a duplicate; if etcd compacted that revision
//! meanwhile, the watcher is cut off as lagging and watching again says `Compacted`.

use std::sync::Arc;
use std::time::Duration;

use aloft_store::{Revision, SendOutcome, StoreError, WatchSender, Watcher};
use serde_json::json;

use crate::client::{Client, Failure};
use crate::wire::{self, Streamed, WatchResponse, b64};

/// How often a quiet stream checks whether its watcher was dropped.
const GONE_CHECK: Duration = Duration::from_secs(1);

/// The longest pause between attempts to open a broken stream again.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The messages of one streamed answer, decoded as they arrive.
struct Messages {
    endpoint: String,
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Messages {
    /// The next message; `None` when the stream ended cleanly. Cancel-safe: bytes read are kept
    /// in the buffer before the next await.
    async fn next(&mut self) -> Result<Option<WatchResponse>, Failure> {
        loop {
            if let Some(msg) = self.parse()? {
                return Ok(Some(msg));
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                Ok(None) => {
                    return Err(self.malformed("the stream ended in the middle of a message"));
                }
                Err(e) => return Err(Failure::Unreachable(crate::client::describe(&e))),
            }
        }
    }

    /// One complete message from the front of the buffer, if there is one.
    fn parse(&mut self) -> Result<Option<WatchResponse>, Failure> {
        let mut values = serde_json::Deserializer::from_slice(&self.buf).into_iter::<serde::de::IgnoredAny>();
        let end = match values.next() {
            Some(Ok(_)) => values.byte_offset(),
            Some(Err(e)) if e.is_eof() => return Ok(None),
            Some(Err(e)) => return Err(self.malformed(&e.to_string())),
            None => {
                self.buf.clear();
                return Ok(None);
            }
        };
        let msg = wire::decode::<Streamed<WatchResponse>>(&self.buf[..end]);
        self.buf.drain(..end);
        match msg.map_err(|d| self.malformed(&d))? {
            Streamed { error: Some(e), .. } => Err(Failure::Status {
                endpoint: self.endpoint.clone(),
                code: e.grpc_code,
                message: e.message,
            }),
            Streamed { result: Some(r), .. } => Ok(Some(r)),
            Streamed { .. } => Err(self.malformed("a message with neither result nor error")),
        }
    }

    fn malformed(&self, detail: &str) -> Failure {
        Failure::Malformed {
            endpoint: self.endpoint.clone(),
            detail: format!("watch stream: {detail}"),
        }
    }
}

/// Opens a watch stream on `prefix` from `start` (`None`: from the next change) and reads its
/// first message; the stream and the revision it was created at.
async fn create(
    client: &Client,
    prefix: &str,
    start: Option<Revision>,
) -> Result<(Messages, Revision), Failure> {
    let (key, end) = crate::txn::prefix_interval(prefix);
    let mut create = json!({"key": b64(&key), "range_end": b64(&end)});
    if let Some(start) = start {
        create["start_revision"] = json!(start.0.to_string());
    }
    let (endpoint, resp) = client
        .open_stream("/v3/watch", &json!({ "create_request": create }))
        .await?;
    let mut messages = Messages {
        endpoint,
        resp,
        buf: Vec::new(),
    };
    let first = tokio::time::timeout(client.timeout, messages.next())
        .await
        .map_err(|_| {
            Failure::Unreachable(format!(
                "{} did not confirm the watch within {:?}",
                messages.endpoint, client.timeout
            ))
        })??;
    match first {
        Some(r) if r.created && !r.canceled => {
            let at = r.header.revision().map_err(|d| messages.malformed(&d))?;
            Ok((messages, at))
        }
        Some(r) if r.canceled => Err(Failure::Status {
            endpoint: messages.endpoint.clone(),
            code: 0,
            message: format!("etcd cancelled the watch: {}", r.cancel_reason),
        }),
        _ => Err(messages.malformed("the first message does not confirm the watch")),
    }
}

/// `Store::watch`: sets the stream up, checks that `from` is still in history, and leaves the
/// stream running on the store's runtime.
pub(crate) async fn open(
    client: Arc<Client>,
    prefix: String,
    from: Option<Revision>,
    capacity: usize,
) -> Result<Watcher, StoreError> {
    const OP: &str = "start a watch";
    let (mut messages, current) = create(&client, &prefix, from.map(|r| r.max(Revision(1))))
        .await
        .map_err(|f| client.error(OP, f))?;
    let start = from.map_or(current.next(), |r| r.max(Revision(1)));
    if start <= current {
        // History to replay: is it still there? (etcd would only say so on the stream, later.)
        let probe =
            json!({"key": b64(prefix.as_bytes()), "count_only": true, "revision": start.0.to_string()});
        match client.post("/v3/kv/range", &probe).await {
            Ok(_) => {}
            Err(f) if f.is_compacted() => {
                let compacted = compacted_at(&mut messages, client.timeout).await;
                return Err(match compacted {
                    Some(compacted) => StoreError::Compacted {
                        requested: start,
                        compacted,
                    },
                    None => StoreError::Etcd {
                        endpoint: messages.endpoint,
                        op: OP,
                        detail: format!(
                            "revision {start} has been compacted, but etcd did not say up to which revision; \
                             read the current state and watch from its revision"
                        ),
                    },
                });
            }
            Err(f) => return Err(client.error(OP, f)),
        }
    }
    let (watcher, sender) = Watcher::new(&prefix, Vec::new(), start, capacity);
    let stream = Stream {
        messages,
        history_end: current,
    };
    tokio::spawn(pump(client, prefix, stream, sender.starting_at(start), start));
    Ok(watcher)
}

/// The compaction revision a stream reports for a start revision it no longer has.
async fn compacted_at(messages: &mut Messages, timeout: Duration) -> Option<Revision> {
    let wait = async {
        while let Ok(Some(r)) = messages.next().await {
            if r.compact_revision > 0 {
                return Some(Revision(r.compact_revision));
            }
        }
        None
    };
    tokio::time::timeout(timeout, wait).await.ok().flatten()
}

/// A watch stream, and the last revision it replays from history (the revision it was created
/// at): changes up to there wait for room in the watcher's buffer, later ones are live.
struct Stream {
    messages: Messages,
    history_end: Revision,
}

/// Feeds the stream's events to `sender` until the watcher is gone or cut off; opens the stream
/// again from `next` when it breaks.
async fn pump(
    client: Arc<Client>,
    prefix: String,
    mut stream: Stream,
    sender: WatchSender,
    mut next: Revision,
) {
    let mut check = tokio::time::interval(GONE_CHECK);
    loop {
        let msg = tokio::select! {
            msg = stream.messages.next() => msg,
            _ = check.tick() => {
                if sender.is_gone() {
                    return;
                }
                continue;
            }
        };
        let why = match msg {
            Ok(Some(r)) if r.compact_revision > 0 => {
                // History this watcher still needed is gone: it must start over.
                sender.cut_off(next);
                return;
            }
            Ok(Some(r)) if r.canceled => format!("etcd cancelled it ({})", r.cancel_reason),
            Ok(Some(r)) => match wire::batches(r.events) {
                Ok(batches) => {
                    for b in &batches {
                        let outcome = if b.revision <= stream.history_end {
                            sender.send_history(b).await
                        } else {
                            sender.send(b)
                        };
                        if outcome == SendOutcome::Gone {
                            return;
                        }
                        next = b.revision.next();
                    }
                    continue;
                }
                Err(detail) => format!("a malformed event ({detail})"),
            },
            Ok(None) => "the stream ended".to_owned(),
            Err(f) => format!("{}", client.error("watch", f)),
        };
        eprintln!("aloft-etcd: the watch on {prefix} broke: {why}; watching again from revision {next}");
        match reopen(&client, &prefix, next, &sender).await {
            Some(s) => stream = s,
            None => return,
        }
    }
}

/// Opens the stream again from `next`, backing off while no endpoint answers; `None` once the
/// watcher is gone.
async fn reopen(client: &Client, prefix: &str, next: Revision, sender: &WatchSender) -> Option<Stream> {
    let mut delay = Duration::from_millis(100);
    loop {
        if sender.is_gone() {
            return None;
        }
        tokio::time::sleep(delay).await;
        match create(client, prefix, Some(next)).await {
            Ok((messages, history_end)) => {
                return Some(Stream {
                    messages,
                    history_end,
                });
            }
            Err(_) => delay = (delay * 2).min(MAX_BACKOFF),
        }
    }
}
