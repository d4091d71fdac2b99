//! The data model shared by every [`Store`](crate::Store) implementation: revisions, key-values,
//! compare-and-swap transactions, watch events and leases. It follows etcd's v3 model so that an
//! etcd implementation maps one to one.

use std::fmt;

/// A point in the store's history. Every write transaction that changes something advances the
/// store's revision by exactly one; every key remembers the revision that created it and the one
/// that last changed it. Revision 0 means "never" (a key that does not exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Revision(pub i64);

impl Revision {
    /// No revision: an empty store, an absent key.
    pub const ZERO: Self = Self(0);

    /// The revision as a number.
    pub fn get(self) -> i64 {
        self.0
    }

    /// The revision after this one.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A store lease: keys attached to it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted (or refreshed) lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    /// The lease.
    pub id: LeaseId,
    /// Its time to live, milliseconds.
    pub ttl_ms: i64,
    /// When it expires unless kept alive, unix milliseconds (by the store's clock).
    pub expires_at_ms: i64,
}

/// A key with its value and history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value (opaque bytes; the typed layer stores JSON).
    pub value: Vec<u8>,
    /// The revision that created the key (since its last deletion).
    pub create_revision: Revision,
    /// The revision that last changed it: what compare-and-swap compares.
    pub mod_revision: Revision,
    /// Number of changes since creation (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// What a conditional write expects of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Nothing: write unconditionally.
    Any,
    /// The key does not exist.
    Absent,
    /// The key exists, whatever its revision.
    Present,
    /// The key was last changed at exactly this revision.
    Revision(Revision),
}

impl Expect {
    /// The comparisons that check `self` on `key` (none for [`Expect::Any`]).
    pub fn compare(self, key: &str) -> Option<Compare> {
        match self {
            Self::Any => None,
            Self::Absent => Some(Compare::absent(key)),
            Self::Present => Some(Compare::new(
                key,
                Target::CreateRevision(Revision::ZERO),
                CmpOp::Greater,
            )),
            Self::Revision(r) => Some(Compare::mod_revision(key, r)),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any revision"),
            Self::Absent => f.write_str("no such key"),
            Self::Present => f.write_str("an existing key"),
            Self::Revision(r) => write!(f, "revision {r}"),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    /// `==`
    Equal,
    /// `!=`
    NotEqual,
    /// `<`
    Less,
    /// `>`
    Greater,
}

impl CmpOp {
    pub(crate) fn holds<T: Ord + ?Sized>(self, actual: &T, expected: &T) -> bool {
        match self {
            Self::Equal => actual == expected,
            Self::NotEqual => actual != expected,
            Self::Less => actual < expected,
            Self::Greater => actual > expected,
        }
    }
}

/// What of a key a comparison looks at. An absent key has revisions and version 0, an empty
/// value and no lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The revision that created it.
    CreateRevision(Revision),
    /// The revision that last changed it.
    ModRevision(Revision),
    /// Its number of changes.
    Version(i64),
    /// Its value.
    Value(Vec<u8>),
    /// Its lease.
    Lease(Option<LeaseId>),
}

/// One condition of a transaction: `key`'s `target` compared with `op`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The key.
    pub key: String,
    /// What to compare, with the expected value.
    pub target: Target,
    /// How.
    pub op: CmpOp,
}

impl Compare {
    /// A comparison.
    pub fn new(key: impl Into<String>, target: Target, op: CmpOp) -> Self {
        Self {
            key: key.into(),
            target,
            op,
        }
    }

    /// The key does not exist (etcd's `create_revision == 0`).
    pub fn absent(key: impl Into<String>) -> Self {
        Self::new(key, Target::CreateRevision(Revision::ZERO), CmpOp::Equal)
    }

    /// The key was last changed at `revision`.
    pub fn mod_revision(key: impl Into<String>, revision: Revision) -> Self {
        Self::new(key, Target::ModRevision(revision), CmpOp::Equal)
    }

    /// Whether the comparison holds for `kv` (`None`: the key is absent).
    pub fn holds(&self, kv: Option<&KeyValue>) -> bool {
        match &self.target {
            Target::CreateRevision(r) => self
                .op
                .holds(&kv.map_or(Revision::ZERO, |kv| kv.create_revision), r),
            Target::ModRevision(r) => self.op.holds(&kv.map_or(Revision::ZERO, |kv| kv.mod_revision), r),
            Target::Version(v) => self.op.holds(&kv.map_or(0, |kv| kv.version), v),
            Target::Value(v) => self
                .op
                .holds(kv.map_or(&[][..], |kv| kv.value.as_slice()), v.as_slice()),
            Target::Lease(l) => self.op.holds(&kv.and_then(|kv| kv.lease), l),
        }
    }
}

/// How to read a range of keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeOptions {
    /// At most this many keys (`None`: all).
    pub limit: Option<usize>,
    /// Newest key first (keys in descending byte order).
    pub descending: bool,
    /// Continue after this key (exclusive), in the chosen order: the cursor of paged listings.
    pub after: Option<String>,
}

/// A range read's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The keys, in order.
    pub kvs: Vec<KeyValue>,
    /// Whether more keys matched than `limit` allowed.
    pub more: bool,
    /// The store's revision the read saw.
    pub revision: Revision,
}

/// One operation of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read one key.
    Get(String),
    /// Read keys under a prefix.
    Range(String, RangeOptions),
    /// Write a key, attached to a lease or not.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: Vec<u8>,
        /// Delete the key when this lease ends.
        lease: Option<LeaseId>,
    },
    /// Delete one key.
    Delete(String),
    /// Delete every key under a prefix.
    DeletePrefix(String),
}

impl Op {
    /// A put without lease.
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Self::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    /// A delete.
    pub fn delete(key: impl Into<String>) -> Self {
        Self::Delete(key.into())
    }

    /// A get.
    pub fn get(key: impl Into<String>) -> Self {
        Self::Get(key.into())
    }
}

/// The result of one operation, in the order of the branch that ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// The key, if present (as of this point of the transaction).
    Get(Option<KeyValue>),
    /// The keys.
    Range(Range),
    /// The key's previous state, if it existed.
    Put {
        /// Before the put.
        prev: Option<KeyValue>,
    },
    /// How many keys were deleted.
    Delete {
        /// Count.
        deleted: u64,
    },
}

/// A transaction: if every comparison holds, run `success`, else `failure`; atomically, at one
/// revision. Operations run in order and see the writes before them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Txn {
    /// Conditions (all must hold).
    pub compare: Vec<Compare>,
    /// Run when they hold.
    pub success: Vec<Op>,
    /// Run when one does not.
    pub failure: Vec<Op>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a condition.
    pub fn when(mut self, compare: Compare) -> Self {
        self.compare.push(compare);
        self
    }

    /// Adds the condition `expect` on `key` (nothing for [`Expect::Any`]).
    pub fn expect(mut self, key: &str, expect: Expect) -> Self {
        self.compare.extend(expect.compare(key));
        self
    }

    /// Adds an operation to the success branch.
    pub fn then(mut self, op: Op) -> Self {
        self.success.push(op);
        self
    }

    /// Adds an operation to the failure branch.
    pub fn or_else(mut self, op: Op) -> Self {
        self.failure.push(op);
        self
    }
}

/// What a transaction did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the comparisons held (and `success` ran).
    pub succeeded: bool,
    /// The store's revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
    /// One result per operation of the branch that ran.
    pub results: Vec<OpResult>,
}

/// The kind of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Created or changed.
    Put,
    /// Deleted (explicitly or by its lease ending).
    Delete,
}

/// One key's change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// Put or delete.
    pub kind: EventKind,
    /// The key after a put; for a delete the key with an empty value, `mod_revision` = the
    /// deleting revision, version 0 and no lease (`create_revision` is the deleted key's with
    /// [`SqliteStore`](crate::SqliteStore), 0 with etcd, whose delete events carry only the key
    /// and the revision).
    pub kv: KeyValue,
}

/// Every change of one revision that a watcher's prefix selects, in the order they were made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    /// The revision.
    pub revision: Revision,
    /// The changes.
    pub events: Vec<WatchEvent>,
}
