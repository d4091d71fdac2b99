//! Errors of the store.

use std::path::PathBuf;

use crate::{Expect, LeaseId, Revision};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database file could not be opened or created.
    #[error("open store {path}: check that the directory exists and is writable")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process has the store open.
    #[error(
        "store {path} is in use by another process; stop the other aloftd or give this one another data directory"
    )]
    Locked {
        /// The database file.
        path: PathBuf,
    },
    /// SQLite stayed busy (another connection held a lock) longer than the busy timeout.
    #[error(
        "store {path} stayed locked by another connection for {timeout_ms} ms while trying to {op}; \
         close other programs using the database (e.g. an open sqlite3 shell) and retry"
    )]
    Busy {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The busy timeout.
        timeout_ms: u128,
    },
    /// The file is not a database or is damaged.
    #[error(
        "store {path} is corrupt ({detail}); restore it from a backup, or move it away to start with an empty store"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// The database was written by a newer aloft.
    #[error(
        "store {path} has schema version {found} but this aloft knows only up to {supported}; run a newer aloft"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        supported: i64,
    },
    /// Any other SQLite failure.
    #[error("store {path}: {op}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// No etcd endpoint could be reached (connection refused, no answer in time, …).
    #[error("etcd at {endpoints}: {detail}; start etcd or fix --etcd (while trying to {op})")]
    EtcdUnavailable {
        /// The endpoints tried, comma-separated.
        endpoints: String,
        /// What was being done.
        op: &'static str,
        /// Why none answered (`connection refused`, `no answer within 5s`, …).
        detail: String,
    },
    /// etcd answered, but with an error, or with something that is not etcd v3's JSON gateway's
    /// answer (then `detail` names what was wrong with it).
    #[error("etcd at {endpoint} could not {op}: {detail}")]
    Etcd {
        /// The endpoint that answered.
        endpoint: String,
        /// What was being done.
        op: &'static str,
        /// etcd's error, or what was wrong with its answer, and what to do about it.
        detail: String,
    },
    /// An etcd endpoint that is not a usable URL.
    #[error("invalid etcd endpoint {endpoint:?}: {reason}; give --etcd http://HOST:PORT[,http://HOST:PORT…]")]
    InvalidEndpoint {
        /// The endpoint as given.
        endpoint: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A key that cannot be stored.
    #[error("invalid store key {key:?}: {reason}")]
    InvalidKey {
        /// The key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A compare-and-swap whose expectation did not hold.
    #[error(
        "{key} was changed concurrently (expected {expected}, found revision {found}); read it again and retry"
    )]
    Conflict {
        /// The key.
        key: String,
        /// What the write expected.
        expected: Expect,
        /// The key's `mod_revision` (0: absent).
        found: Revision,
    },
    /// The lease expired or was revoked.
    #[error("lease {id} not found: it expired or was revoked; grant a new one")]
    LeaseNotFound {
        /// The lease.
        id: LeaseId,
    },
    /// A watch asked for history that compaction removed.
    #[error(
        "revision {requested} has been compacted (history starts at {compacted}); read the current state and watch from its revision"
    )]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision still in history.
        compacted: Revision,
    },
    /// A lease TTL out of range.
    #[error("invalid lease ttl {ttl_ms} ms: give at least 1 ms and at most a year")]
    InvalidTtl {
        /// The TTL asked for.
        ttl_ms: i128,
    },
    /// A value in the store that does not decode (typed layer).
    #[error("stored record {key} is not valid; it was written by an incompatible aloft or edited by hand")]
    Decode {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A value that does not encode (typed layer).
    #[error("encode record {key}")]
    Encode {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Why a watcher stopped delivering changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The watcher fell behind (its buffer filled up) and was cut off; watch again from
    /// `resume_from` to continue without a gap. (An etcd-backed watcher is also cut off this way
    /// when etcd compacts history it had yet to deliver: watching again then fails with
    /// [`StoreError::Compacted`].)
    #[error("watcher fell behind; watch again from revision {resume_from}")]
    Lagged {
        /// The first revision not delivered.
        resume_from: Revision,
    },
    /// The store was closed (dropped).
    #[error("store closed; reopen it and watch again from revision {resume_from}")]
    Closed {
        /// The first revision not delivered.
        resume_from: Revision,
    },
}
