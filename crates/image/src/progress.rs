//! Progress reports of pulls and pushes, for the CLI's progress bars and the agent's events.
//!
//! A [`Progress`] is a cheap, cloneable sink: a callback, a channel, or nothing. Events arrive
//! from whichever task is transferring; byte progress is throttled (one event per 256 KiB and
//! one at the end of each blob).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::digest::Digest;

/// Bytes between two [`PullEvent::BlobProgress`] events of one blob.
pub(crate) const PROGRESS_STEP: u64 = 256 * 1024;

/// One step of a pull or push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent {
    /// The manifest is known: what will be transferred.
    Resolved {
        /// The reference as given.
        reference: String,
        /// The image manifest's digest (the linux/amd64 one for an index).
        digest: Digest,
        /// Number of layers.
        layers: usize,
        /// Bytes of config and layers together.
        total_bytes: u64,
    },
    /// A blob was already in the cache (pull) or the registry (push): nothing to transfer.
    BlobCached { digest: Digest, size: u64 },
    /// Bytes of a blob transferred so far.
    BlobProgress {
        digest: Digest,
        transferred: u64,
        size: u64,
    },
    /// A blob is transferred and verified.
    BlobDone { digest: Digest, size: u64 },
    /// A transient failure; the operation is tried again after `delay`.
    Retrying {
        /// What was being done (`GET …/manifests/latest`, `blob sha256:…`).
        what: String,
        /// The attempt that failed (1-based).
        attempt: u32,
        /// The wait before the next attempt.
        delay: Duration,
        /// Why it failed.
        error: String,
    },
    /// The image is complete (pull: cached and recorded; push: manifest stored).
    Done { digest: Digest },
}

type Callback = dyn Fn(PullEvent) + Send + Sync;

/// Where progress events go. `Progress::default()` discards them.
#[derive(Clone, Default)]
pub struct Progress(Option<Arc<Callback>>);

impl Progress {
    /// Discards every event.
    pub fn none() -> Self {
        Self(None)
    }

    /// Calls `f` for every event (from the transferring task: keep it quick).
    pub fn new(f: impl Fn(PullEvent) + Send + Sync + 'static) -> Self {
        Self(Some(Arc::new(f)))
    }

    /// Sends every event into an unbounded channel.
    pub fn channel() -> (Self, tokio::sync::mpsc::UnboundedReceiver<PullEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Self::new(move |event| {
                // A receiver that went away just stops listening.
                let _ = tx.send(event);
            }),
            rx,
        )
    }

    pub(crate) fn emit(&self, event: PullEvent) {
        if let Some(f) = &self.0 {
            f(event);
        }
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Progress(callback)"
        } else {
            "Progress(none)"
        })
    }
}
