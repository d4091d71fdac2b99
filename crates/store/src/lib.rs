//! Control-plane state behind the [`Store`] trait.
//!
//! The model is etcd's: a key space where every change has a revision, writes are
//! compare-and-swap transactions ([`Txn`]), changes can be watched from a revision
//! ([`Store::watch`]) and leases expire and take their keys along ([`Store::grant_lease`]).
//! [`SqliteStore`] implements it on one SQLite file for the embedded single-host aloftd; an etcd
//! implementation for clusters (`aloft-etcd`, which needs an async runtime and so lives in a crate
//! of its own) fits the same trait; both pass the same checks (`aloft_store::conformance`, cargo
//! feature `conformance`). On top, [`ControlStore`] keeps the typed
//! records of the control plane (apps, machines as the control plane sees them, machine events,
//! machine leases, tokens, edges' claims on issuing certificates, volumes, volume snapshots) under the layout of
//! [`keys`]; later users (releases, secrets) take their own prefixes of the same key space.
//!
//! ```
//! use aloft_store::{Expect, SqliteStore, Store, StoreError};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = SqliteStore::open(dir.path().join("control.db"))?;
//! let mut changes = store.watch("/apps/", None)?;
//! let created = store.put_if("/apps/web", b"{}".to_vec(), Expect::Absent, None)?;
//! // A second creator loses the race with a conflict, not a silent overwrite.
//! let lost = store.put_if("/apps/web", b"{}".to_vec(), Expect::Absent, None);
//! assert!(matches!(lost, Err(StoreError::Conflict { .. })));
//! // Updates compare the revision they read.
//! let updated = store.put_if("/apps/web", b"{\"v\":2}".to_vec(), Expect::Revision(created), None)?;
//! assert_eq!(changes.recv()?.revision, created);
//! assert_eq!(changes.recv()?.revision, updated);
//! # Ok(())
//! # }
//! ```
//!
//! Threading: the API is synchronous and thread-safe; async callers wrap calls in
//! `spawn_blocking` and can await watchers directly. Design notes: `docs/adr/0006-store.md`.
//!
//! Depends on `aloft-api` for the wire types it stores and on no other aloft crate; it must not
//! depend on the VM, image or network crates, nor on an async runtime.

#![warn(missing_docs)]

mod clock;
#[cfg(feature = "conformance")]
pub mod conformance;
mod control;
mod error;
mod follow;
pub mod keys;
mod sqlite;
mod store;
mod types;
mod watch;

pub use clock::{Clock, ManualClock, SystemClock};
pub use control::{
    CertClaim, CertClaimOutcome, ControlError, ControlStore, HeldCertClaim, MachineLeaseRequest,
    MachineRecord, SecretRecord, SecretsSnapshot, SecretsVersion, SnapshotRecord, SnapshotState, TokenRecord,
    Versioned, VolumeRecord,
};
pub use error::{StoreError, WatchError};
pub use follow::{Follower, follow};
pub use sqlite::{Durability, SqliteOptions, SqliteStore};
pub use store::{
    KEEP_REVISIONS, Store, compact_history, lease_ttl_ms, prefix_end, validate_key, validate_txn_keys,
};
pub use types::{
    CmpOp, Compare, EventKind, Expect, KeyValue, LeaseGrant, LeaseId, Op, OpResult, Range, RangeOptions,
    Revision, Target, Txn, TxnResponse, WatchBatch, WatchEvent,
};
pub use watch::{SendOutcome, WatchSender, Watcher};
