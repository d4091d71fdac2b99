//! The control store on etcd: [`EtcdStore`] implements `aloft_store::Store` over a real etcd
//! (v3.4 or newer), so that many aloftd hosts can share one control plane (`aloftd --etcd`).
//!
//! It speaks etcd v3's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`, `/v3/watch`,
//! `/v3/lease/…` with JSON bodies, 64-bit integers as strings and bytes as base64) over plain
//! HTTP/1.1 with `reqwest`, not gRPC: no protobuf code generation, no `protoc`, one HTTP client
//! for the whole workspace. The `Store` trait is synchronous; the store owns a current-thread
//! tokio runtime on a thread of its own, hands each call to it over a channel and waits for the
//! answer, so callers may be plain threads or tokio's blocking pool (where blocking on another
//! runtime would panic). Each watcher is one streamed `/v3/watch` request on that runtime feeding
//! the same `Watcher` the SQLite store hands out. Design and the differences from SQLite that
//! cannot be hidden: `docs/adr/0021-etcd-store.md`.
//!
//! ```no_run
//! use aloft_etcd::{EtcdOptions, EtcdStore};
//! use aloft_store::{Expect, Store};
//! # fn main() -> Result<(), aloft_store::StoreError> {
//! let store = EtcdStore::connect(EtcdOptions::parse("http://127.0.0.1:2379")?)?;
//! let rev = store.put_if("/apps/web", b"{}".to_vec(), Expect::Absent, None)?;
//! assert_eq!(store.get("/apps/web")?.map(|kv| kv.mod_revision), Some(rev));
//! # Ok(())
//! # }
//! ```
//!
//! Depends on `aloft-store` (the trait, its types and errors) and `aloft-tls` (the one TLS client
//! policy, for `https://` endpoints); it must not depend on the VM, image, network, control or
//! agent crates. `aloft-store` itself stays free of any async runtime, which is why this is a
//! crate of its own.

#![warn(missing_docs)]

mod client;
mod options;
mod store;
mod txn;
mod watch;
mod wire;

pub use options::EtcdOptions;
pub use store::EtcdStore;
