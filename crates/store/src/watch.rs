//! Watchers: a stream of changes under a prefix, in revision order, without gaps.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use crate::{Revision, WatchBatch, WatchError};

/// The store side of a watcher (used by implementations).
#[derive(Debug)]
pub struct WatchSender {
    prefix: String,
    from: Revision,
    tx: flume::Sender<WatchBatch>,
    lagged: Arc<AtomicBool>,
    /// The revision that did not fit, once lagged.
    resume_at: Arc<AtomicI64>,
}

/// Whether a watcher still listens after [`WatchSender::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOutcome {
    /// Delivered (or nothing for this watcher).
    Live,
    /// The watcher is gone or fell behind: drop the sender.
    Gone,
}

impl WatchSender {
    /// The prefix the watcher selects.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Skip live revisions before `from` (they were replayed from history, or the watch starts
    /// in the future).
    pub fn starting_at(mut self, from: Revision) -> Self {
        self.from = from;
        self
    }

    /// Whether the watcher is gone (dropped): a store that holds a connection per watcher (etcd)
    /// checks this to let the connection go without waiting for the next change.
    pub fn is_gone(&self) -> bool {
        self.tx.is_disconnected()
    }

    /// Cuts the watcher off as if it had fallen behind: once it has received what is buffered it
    /// gets [`WatchError::Lagged`] with `resume_from` (or its next revision, if later). For
    /// history the store can no longer deliver (etcd compacted it under a running watch).
    pub fn cut_off(self, resume_from: Revision) {
        self.resume_at.store(resume_from.0, Ordering::SeqCst);
        self.lagged.store(true, Ordering::SeqCst);
    }

    /// Offers one revision's changes; keeps the events under the prefix and sends them if any.
    /// Never blocks: a full buffer cuts the watcher off ([`WatchError::Lagged`]).
    pub fn send(&self, batch: &WatchBatch) -> SendOutcome {
        let Some(selected) = self.select(batch) else {
            return self.outcome_of_nothing();
        };
        match self.tx.try_send(selected) {
            Ok(()) => SendOutcome::Live,
            Err(flume::TrySendError::Full(_)) => {
                self.resume_at.store(batch.revision.0, Ordering::SeqCst);
                self.lagged.store(true, Ordering::SeqCst);
                SendOutcome::Gone
            }
            Err(flume::TrySendError::Disconnected(_)) => SendOutcome::Gone,
        }
    }

    /// Offers one revision of replayed history: like [`send`](Self::send), but waits for room
    /// instead of cutting the watcher off. History is finite, and does not count against the
    /// buffer ([`Watcher::new`] takes it whole); a store that streams it in (etcd) uses this.
    pub async fn send_history(&self, batch: &WatchBatch) -> SendOutcome {
        let Some(selected) = self.select(batch) else {
            return self.outcome_of_nothing();
        };
        match self.tx.send_async(selected).await {
            Ok(()) => SendOutcome::Live,
            Err(_) => SendOutcome::Gone,
        }
    }

    /// The part of `batch` this watcher selects, if any.
    fn select(&self, batch: &WatchBatch) -> Option<WatchBatch> {
        if batch.revision < self.from {
            return None;
        }
        let events: Vec<_> = batch
            .events
            .iter()
            .filter(|e| e.kv.key.starts_with(&self.prefix))
            .cloned()
            .collect();
        (!events.is_empty()).then_some(WatchBatch {
            revision: batch.revision,
            events,
        })
    }

    fn outcome_of_nothing(&self) -> SendOutcome {
        if self.tx.is_disconnected() {
            SendOutcome::Gone
        } else {
            SendOutcome::Live
        }
    }
}

/// Receives the changes under a prefix, one revision at a time, oldest first.
///
/// Blocking ([`recv`](Self::recv), [`recv_timeout`](Self::recv_timeout)) and async
/// ([`recv_async`](Self::recv_async), runtime-agnostic) receiving both work. A watcher that does
/// not keep up is cut off with [`WatchError::Lagged`]; watching again from
/// [`next_revision`](Self::next_revision) continues without a gap or a duplicate.
pub struct Watcher {
    history: VecDeque<WatchBatch>,
    rx: flume::Receiver<WatchBatch>,
    lagged: Arc<AtomicBool>,
    resume_at: Arc<AtomicI64>,
    next_revision: Revision,
}

impl fmt::Debug for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watcher")
            .field("history", &self.history.len())
            .field("buffered", &self.rx.len())
            .field("next_revision", &self.next_revision)
            .finish()
    }
}

impl Watcher {
    /// A watcher on `prefix` that first replays `history` (revisions up to the store's current
    /// one) and then receives live changes; `capacity` bounds the live buffer. Returns the
    /// store's half.
    pub fn new(
        prefix: &str,
        history: Vec<WatchBatch>,
        start: Revision,
        capacity: usize,
    ) -> (Self, WatchSender) {
        let (tx, rx) = flume::bounded(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(false));
        let resume_at = Arc::new(AtomicI64::new(0));
        (
            Self {
                history: history.into(),
                rx,
                lagged: lagged.clone(),
                resume_at: resume_at.clone(),
                next_revision: start,
            },
            WatchSender {
                prefix: prefix.to_owned(),
                from: Revision::ZERO,
                tx,
                lagged,
                resume_at,
            },
        )
    }

    /// The first revision not yet received: watch from here to resume.
    pub fn next_revision(&self) -> Revision {
        self.next_revision
    }

    /// Batches the store has handed over and this watcher has not received yet.
    pub fn buffered(&self) -> usize {
        self.history.len() + self.rx.len()
    }

    /// Whether the store's side has stopped: the watcher was cut off or the store closed. What
    /// is buffered is still received first, then the error that says why.
    pub fn is_ended(&self) -> bool {
        self.rx.is_disconnected()
    }

    fn deliver(&mut self, batch: WatchBatch) -> WatchBatch {
        self.next_revision = batch.revision.next();
        batch
    }

    fn ended(&self) -> WatchError {
        if self.lagged.load(Ordering::SeqCst) {
            // Everything before the revision that did not fit was delivered or not selected.
            let at = Revision(self.resume_at.load(Ordering::SeqCst));
            WatchError::Lagged {
                resume_from: self.next_revision.max(at),
            }
        } else {
            WatchError::Closed {
                resume_from: self.next_revision,
            }
        }
    }

    /// The next batch, waiting as long as it takes.
    pub fn recv(&mut self) -> Result<WatchBatch, WatchError> {
        if let Some(b) = self.history.pop_front() {
            return Ok(self.deliver(b));
        }
        match self.rx.recv() {
            Ok(b) => Ok(self.deliver(b)),
            Err(flume::RecvError::Disconnected) => Err(self.ended()),
        }
    }

    /// The next batch, or `None` if none came within `timeout`.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<WatchBatch>, WatchError> {
        if let Some(b) = self.history.pop_front() {
            return Ok(Some(self.deliver(b)));
        }
        match self.rx.recv_timeout(timeout) {
            Ok(b) => Ok(Some(self.deliver(b))),
            Err(flume::RecvTimeoutError::Timeout) => Ok(None),
            Err(flume::RecvTimeoutError::Disconnected) => Err(self.ended()),
        }
    }

    /// The next batch if one is ready.
    pub fn try_recv(&mut self) -> Result<Option<WatchBatch>, WatchError> {
        if let Some(b) = self.history.pop_front() {
            return Ok(Some(self.deliver(b)));
        }
        match self.rx.try_recv() {
            Ok(b) => Ok(Some(self.deliver(b))),
            Err(flume::TryRecvError::Empty) => Ok(None),
            Err(flume::TryRecvError::Disconnected) => Err(self.ended()),
        }
    }

    /// The next batch, awaiting it (works on any async runtime).
    pub async fn recv_async(&mut self) -> Result<WatchBatch, WatchError> {
        if let Some(b) = self.history.pop_front() {
            return Ok(self.deliver(b));
        }
        match self.rx.recv_async().await {
            Ok(b) => Ok(self.deliver(b)),
            Err(flume::RecvError::Disconnected) => Err(self.ended()),
        }
    }
}
