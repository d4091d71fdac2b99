//! The `Store` trait: a versioned key space with compare-and-swap transactions, watches and
//! leases, in the shape of etcd's v3 API.

use std::fmt;
use std::time::Duration;

use crate::{
    Expect, KeyValue, LeaseGrant, LeaseId, Op, OpResult, Range, RangeOptions, Revision, StoreError, Txn,
    TxnResponse, Watcher,
};

/// Control-plane state: a key space where every change has a revision.
///
/// Keys are UTF-8 strings starting with `/` (see [`crate::keys`] for the layout); values are
/// bytes. Writes are transactions ([`Store::txn`]): a list of comparisons, then one of two lists
/// of operations, applied atomically at one new revision. Compare-and-swap is a transaction that
/// compares a key's `mod_revision`. Changes can be watched from any revision still in history.
/// Leases expire by themselves and take the keys attached to them along.
///
/// The API is synchronous: implementations block the calling thread (SQLite does I/O, etcd does
/// network round trips). Async callers use `spawn_blocking`; watchers can be awaited directly
/// ([`Watcher::recv_async`]). See `docs/adr/0006-store.md`.
///
/// Implementations are shared between threads (`Send + Sync`) and used as `Arc<dyn Store>`.
pub trait Store: Send + Sync + fmt::Debug {
    /// The revision of the last committed change (0 for an empty store).
    fn revision(&self) -> Result<Revision, StoreError>;

    /// One key, if it exists.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Keys starting with `prefix` (all keys for `/`), in byte order (or reversed), at one
    /// consistent revision.
    fn range(&self, prefix: &str, options: &RangeOptions) -> Result<Range, StoreError>;

    /// Runs a transaction. A transaction that writes nothing leaves the revision unchanged.
    /// Fails with [`StoreError::LeaseNotFound`] (and changes nothing) if a put names a lease
    /// that is not alive.
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;

    /// Watches changes under `prefix`: from `from` (inclusive; history back to the last
    /// compaction) or, with `None`, from the next change on. Delivery is in revision order,
    /// one batch per revision, with no gap between history and live changes.
    fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watcher, StoreError>;

    /// Grants a lease that ends `ttl` from now unless kept alive.
    fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, StoreError>;

    /// Extends a live lease by its TTL from now; [`StoreError::LeaseNotFound`] once it ended.
    fn keep_alive(&self, id: LeaseId) -> Result<LeaseGrant, StoreError>;

    /// Ends a lease now, deleting its keys (one revision); `false` if it had already ended.
    fn revoke_lease(&self, id: LeaseId) -> Result<bool, StoreError>;

    /// Ends every lease whose time is up, deleting their keys. Implementations also do this on
    /// their own; callers need it only with a manual clock.
    fn expire_leases(&self) -> Result<(), StoreError>;

    /// Forgets history before `revision`: watches can no longer start earlier. Current keys are
    /// untouched.
    fn compact(&self, revision: Revision) -> Result<(), StoreError>;

    /// Writes `key` if `expect` holds, else fails with [`StoreError::Conflict`]. Returns the new
    /// revision (the key's `mod_revision`).
    fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let txn = Txn::new()
            .expect(key, expect)
            .then(Op::Put {
                key: key.to_owned(),
                value,
                lease,
            })
            .or_else(Op::get(key));
        let resp = self.txn(txn)?;
        if resp.succeeded {
            Ok(resp.revision)
        } else {
            Err(conflict(key, expect, &resp))
        }
    }

    /// Writes `key` unconditionally.
    fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision, StoreError> {
        self.put_if(key, value, Expect::Any, None)
    }

    /// Deletes `key` if `expect` holds, else fails with [`StoreError::Conflict`]. Returns whether
    /// it existed.
    fn delete_if(&self, key: &str, expect: Expect) -> Result<bool, StoreError> {
        let txn = Txn::new()
            .expect(key, expect)
            .then(Op::delete(key))
            .or_else(Op::get(key));
        let resp = self.txn(txn)?;
        if !resp.succeeded {
            return Err(conflict(key, expect, &resp));
        }
        Ok(matches!(resp.results.first(), Some(OpResult::Delete { deleted }) if *deleted > 0))
    }

    /// Deletes `key` unconditionally; returns whether it existed.
    fn delete(&self, key: &str) -> Result<bool, StoreError> {
        self.delete_if(key, Expect::Any)
    }
}

fn conflict(key: &str, expected: Expect, resp: &TxnResponse) -> StoreError {
    let found = match resp.results.first() {
        Some(OpResult::Get(Some(kv))) => kv.mod_revision,
        _ => Revision::ZERO,
    };
    StoreError::Conflict {
        key: key.to_owned(),
        expected,
        found,
    }
}

/// Revisions of history aloftd keeps for watches (ADR 0006): older ones are compacted away.
pub const KEEP_REVISIONS: i64 = 10_000;

/// Compacts `store`'s history so that at most `keep` revisions remain; returns the revision
/// compacted to, or `None` when the history is still shorter than that.
pub fn compact_history(store: &dyn Store, keep: i64) -> Result<Option<Revision>, StoreError> {
    let now = store.revision()?.get();
    let to = now.saturating_sub(keep.max(1));
    if to <= 0 {
        return Ok(None);
    }
    store.compact(Revision(to))?;
    Ok(Some(Revision(to)))
}

/// The smallest byte string greater than every string starting with `prefix` (`None`: there is
/// none, every string from `prefix` on is in range): the exclusive end of a prefix range.
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Checks a lease TTL (at least 1 ms, at most a year); the TTL in milliseconds.
pub fn lease_ttl_ms(ttl: Duration) -> Result<i64, StoreError> {
    const YEAR_MS: i64 = 366 * 24 * 3600 * 1000;
    match i64::try_from(ttl.as_millis()) {
        Ok(ms) if (1..=YEAR_MS).contains(&ms) => Ok(ms),
        _ => Err(StoreError::InvalidTtl {
            ttl_ms: i128::try_from(ttl.as_millis()).unwrap_or(i128::MAX),
        }),
    }
}

/// Checks every key a transaction names (its comparisons and both branches) with
/// [`validate_key`]: what every backend refuses before it runs one.
pub fn validate_txn_keys(txn: &Txn) -> Result<(), StoreError> {
    for c in &txn.compare {
        validate_key(&c.key)?;
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Get(k) | Op::Delete(k) | Op::DeletePrefix(k) | Op::Range(k, _) | Op::Put { key: k, .. } => {
                validate_key(k)?;
            }
        }
    }
    Ok(())
}

/// Checks a key: starts with `/`, at most 1024 bytes, no NUL or control characters.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let reason = if !key.starts_with('/') {
        "keys start with '/'"
    } else if key.len() > 1024 {
        "keys are at most 1024 bytes"
    } else if key.chars().any(char::is_control) {
        "keys contain no control characters"
    } else {
        return Ok(());
    };
    Err(StoreError::InvalidKey {
        key: key.to_owned(),
        reason,
    })
}
