//! [`SqliteStore`]: the embedded [`Store`] on one SQLite file (WAL mode, one writer).

mod schema;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{
    Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::watch::{SendOutcome, WatchSender};
use crate::{
    Clock, EventKind, KeyValue, LeaseGrant, LeaseId, Op, OpResult, Range, RangeOptions, Revision, Store,
    StoreError, SystemClock, Txn, TxnResponse, WatchBatch, WatchEvent, Watcher, lease_ttl_ms, prefix_end,
    validate_key, validate_txn_keys,
};

/// How hard commits are pushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit is on disk when `txn` returns (`synchronous=FULL`). The default.
    #[default]
    Full,
    /// Commits survive a crash of the process but the last ones may be lost on power failure
    /// (`synchronous=NORMAL`); never corrupts.
    Normal,
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// How long to wait for a lock held by another connection before failing with
    /// [`StoreError::Busy`]. Default 5 s.
    pub busy_timeout: Duration,
    /// Default [`Durability::Full`].
    pub durability: Durability,
    /// Changes buffered per watcher before it is cut off as lagging. Default 1024.
    pub watch_capacity: usize,
    /// How often a background thread ends expired leases (`None`: only on store calls).
    /// Default 250 ms.
    pub reaper_interval: Option<Duration>,
    /// The clock leases expire by. Default the system clock.
    pub clock: Arc<dyn Clock>,
    /// Check the whole file (`PRAGMA quick_check`) on open. Default true.
    pub check_on_open: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            busy_timeout: Duration::from_secs(5),
            durability: Durability::Full,
            watch_capacity: 1024,
            reaper_interval: Some(Duration::from_millis(250)),
            clock: Arc::new(SystemClock),
            check_on_open: true,
        }
    }
}

/// The embedded store: one SQLite database file in WAL mode, owned by one process.
///
/// Writes go through a single connection behind a mutex (SQLite allows one writer anyway);
/// reads use a small pool of read-only connections and see a consistent snapshot. Every write
/// transaction appends its changes to a change log in the same SQLite transaction, so watches
/// resume from any revision after the last compaction, and a crash leaves either all of a
/// transaction or none of it. A `<file>.lock` next to the database is held with `flock` while
/// the store is open: a second process gets [`StoreError::Locked`].
#[derive(Debug)]
pub struct SqliteStore {
    inner: Arc<Inner>,
    reaper: Option<Reaper>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    watchers: Mutex<Vec<WatchSender>>,
    /// Earliest lease expiry (unix ms), `i64::MAX` when there is no lease.
    next_expiry: AtomicI64,
    _lock: File,
}

#[derive(Debug)]
struct Reaper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves the connection usable: an open rusqlite
    // transaction rolls back when dropped.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteStore {
    /// Opens (creating if needed) the store at `path` with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(path, SqliteOptions::default())
    }

    /// Opens (creating if needed) the store at `path`: takes the lock file, switches to WAL,
    /// checks the file and applies migrations.
    pub fn open_with(path: impl AsRef<Path>, options: SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let lock_path = {
            let mut p = path.clone().into_os_string();
            p.push(".lock");
            PathBuf::from(p)
        };
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        match rustix::fs::flock(&lock_file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => return Err(StoreError::Locked { path }),
            Err(e) => {
                return Err(StoreError::Open {
                    path,
                    source: e.into(),
                });
            }
        }

        let err = |op| {
            let path = path.clone();
            let timeout = options.busy_timeout;
            move |e| classify(&path, op, timeout, e)
        };
        let mut conn = Connection::open(&path).map_err(err("open the database"))?;
        conn.busy_timeout(options.busy_timeout)
            .map_err(err("set the busy timeout"))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
            .map_err(err("switch to WAL mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Corrupt {
                path,
                detail: format!("journal mode stays {mode:?}, WAL needed"),
            });
        }
        let sync = match options.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        };
        conn.pragma_update(None, "synchronous", sync)
            .map_err(err("set synchronous"))?;
        if options.check_on_open {
            let result: String = conn
                .query_row("PRAGMA quick_check", [], |r| r.get(0))
                .map_err(err("check the database"))?;
            if result != "ok" {
                return Err(StoreError::Corrupt { path, detail: result });
            }
        }
        match schema::migrate(&mut conn).map_err(err("migrate the schema"))? {
            schema::Migrated::Ok { .. } => {}
            schema::Migrated::TooNew { found } => {
                return Err(StoreError::TooNew {
                    path,
                    found,
                    supported: schema::latest(),
                });
            }
        }
        let next_expiry = next_expiry(&conn).map_err(err("read leases"))?;

        let inner = Arc::new(Inner {
            path,
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            watchers: Mutex::new(Vec::new()),
            next_expiry: AtomicI64::new(next_expiry),
            _lock: lock_file,
            options,
        });
        let reaper = inner
            .options
            .reaper_interval
            .map(|every| spawn_reaper(Arc::downgrade(&inner), every));
        Ok(Self { inner, reaper })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops the background reaper (tests with a manual clock).
    #[doc(hidden)]
    pub fn stop_reaper(&mut self) {
        self.reaper.take();
    }
}

fn spawn_reaper(inner: Weak<Inner>, every: Duration) -> Reaper {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("store-reaper".into())
        .spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                let Some(inner) = inner.upgrade() else { break };
                // Errors surface on the next store call; the reaper just tries again later.
                let _ = inner.reap_due();
            }
        })
        .ok();
    Reaper {
        stop: Some(stop),
        thread,
    }
}

fn next_expiry(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT MIN(expires_at_ms) FROM leases", [], |r| {
        r.get::<_, Option<i64>>(0)
    })
    .map(|v| v.unwrap_or(i64::MAX))
}

fn classify(path: &Path, op: &'static str, timeout: Duration, e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy {
            path: path.to_path_buf(),
            op,
            timeout_ms: timeout.as_millis(),
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: e.to_string(),
        },
        _ => StoreError::Sqlite {
            path: path.to_path_buf(),
            op,
            source: e,
        },
    }
}

const KV_COLUMNS: &str = "key, value, create_revision, mod_revision, version, lease";

fn row_to_kv(row: &rusqlite::Row<'_>) -> rusqlite::Result<KeyValue> {
    let key: Vec<u8> = row.get(0)?;
    let key = String::from_utf8(key).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })?;
    Ok(KeyValue {
        key,
        value: row.get(1)?,
        create_revision: Revision(row.get(2)?),
        mod_revision: Revision(row.get(3)?),
        version: row.get(4)?,
        lease: row.get::<_, Option<i64>>(5)?.map(LeaseId),
    })
}

fn get_kv(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    conn.prepare_cached(&format!("SELECT {KV_COLUMNS} FROM kv WHERE key = ?1"))?
        .query_row([key.as_bytes()], row_to_kv)
        .optional()
}

fn range_kv(conn: &Connection, prefix: &str, opts: &RangeOptions) -> rusqlite::Result<(Vec<KeyValue>, bool)> {
    let end = prefix_end(prefix.as_bytes());
    let mut sql = format!("SELECT {KV_COLUMNS} FROM kv WHERE key >= ?1");
    if end.is_some() {
        sql.push_str(" AND key < ?2");
    }
    if opts.after.is_some() {
        sql.push_str(if opts.descending {
            " AND key < ?3"
        } else {
            " AND key > ?3"
        });
    }
    sql.push_str(if opts.descending {
        " ORDER BY key DESC"
    } else {
        " ORDER BY key ASC"
    });
    if opts.limit.is_some() {
        sql.push_str(" LIMIT ?4");
    }
    let limit = opts
        .limit
        .map(|l| i64::try_from(l.saturating_add(1)).unwrap_or(i64::MAX));
    let mut stmt = conn.prepare_cached(&sql)?;
    let prefix_bytes = prefix.as_bytes();
    let mut params: Vec<(&str, &dyn rusqlite::ToSql)> = vec![("?1", &prefix_bytes)];
    let end_ref;
    if let Some(e) = &end {
        end_ref = e.as_slice();
        params.push(("?2", &end_ref));
    }
    let after_ref;
    if let Some(a) = &opts.after {
        after_ref = a.as_bytes();
        params.push(("?3", &after_ref));
    }
    if let Some(l) = &limit {
        params.push(("?4", l));
    }
    let mut kvs = stmt
        .query_map(params.as_slice(), row_to_kv)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let more = opts.limit.is_some_and(|l| kvs.len() > l);
    if let Some(l) = opts.limit {
        kvs.truncate(l);
    }
    Ok((kvs, more))
}

fn current_revision(conn: &Connection) -> rusqlite::Result<(Revision, Revision)> {
    conn.query_row(
        "SELECT revision, compact_revision FROM meta WHERE id = 1",
        [],
        |r| Ok((Revision(r.get(0)?), Revision(r.get(1)?))),
    )
}

/// A write transaction in progress: applies operations at `revision` and records the changes.
struct Write<'a> {
    tx: &'a Transaction<'a>,
    revision: Revision,
    now_ms: i64,
    events: Vec<WatchEvent>,
}

/// Why a write stopped: SQLite failed, or the caller's rules did (rolls back either way).
enum WriteError {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for WriteError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sql(e)
    }
}

impl Write<'_> {
    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Option<KeyValue>, WriteError> {
        if let Some(id) = lease {
            let alive = self
                .tx
                .prepare_cached("SELECT 1 FROM leases WHERE id = ?1 AND expires_at_ms > ?2")?
                .exists(params![id.0, self.now_ms])?;
            if !alive {
                return Err(WriteError::Store(StoreError::LeaseNotFound { id }));
            }
        }
        let prev = get_kv(self.tx, key)?;
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.as_ref().map_or(self.revision, |p| p.create_revision),
            mod_revision: self.revision,
            version: prev.as_ref().map_or(1, |p| p.version.saturating_add(1)),
            lease,
        };
        self.tx
            .prepare_cached(&format!(
                "INSERT OR REPLACE INTO kv ({KV_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
            ))?
            .execute(params![
                kv.key.as_bytes(),
                kv.value,
                kv.create_revision.0,
                kv.mod_revision.0,
                kv.version,
                kv.lease.map(|l| l.0)
            ])?;
        self.events.push(WatchEvent {
            kind: EventKind::Put,
            kv,
        });
        Ok(prev)
    }

    fn delete_kv(&mut self, prev: KeyValue) -> Result<(), WriteError> {
        self.tx
            .prepare_cached("DELETE FROM kv WHERE key = ?1")?
            .execute([prev.key.as_bytes()])?;
        self.events.push(WatchEvent {
            kind: EventKind::Delete,
            kv: KeyValue {
                key: prev.key,
                value: Vec::new(),
                create_revision: prev.create_revision,
                mod_revision: self.revision,
                version: 0,
                lease: None,
            },
        });
        Ok(())
    }

    fn delete(&mut self, key: &str) -> Result<u64, WriteError> {
        match get_kv(self.tx, key)? {
            Some(prev) => {
                self.delete_kv(prev)?;
                Ok(1)
            }
            None => Ok(0),
        }
    }

    fn delete_prefix(&mut self, prefix: &str) -> Result<u64, WriteError> {
        let (kvs, _) = range_kv(self.tx, prefix, &RangeOptions::default())?;
        let n = u64::try_from(kvs.len()).unwrap_or(u64::MAX);
        for kv in kvs {
            self.delete_kv(kv)?;
        }
        Ok(n)
    }

    fn delete_lease_keys(&mut self, id: LeaseId) -> Result<(), WriteError> {
        let kvs = self
            .tx
            .prepare_cached(&format!(
                "SELECT {KV_COLUMNS} FROM kv WHERE lease = ?1 ORDER BY key"
            ))?
            .query_map([id.0], row_to_kv)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for kv in kvs {
            self.delete_kv(kv)?;
        }
        self.tx
            .prepare_cached("DELETE FROM leases WHERE id = ?1")?
            .execute([id.0])?;
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Result<OpResult, WriteError> {
        Ok(match op {
            Op::Get(key) => OpResult::Get(get_kv(self.tx, &key)?),
            Op::Range(prefix, opts) => {
                let (kvs, more) = range_kv(self.tx, &prefix, &opts)?;
                OpResult::Range(Range {
                    kvs,
                    more,
                    revision: Revision(self.revision.0 - 1),
                })
            }
            Op::Put { key, value, lease } => OpResult::Put {
                prev: self.put(&key, value, lease)?,
            },
            Op::Delete(key) => OpResult::Delete {
                deleted: self.delete(&key)?,
            },
            Op::DeletePrefix(prefix) => OpResult::Delete {
                deleted: self.delete_prefix(&prefix)?,
            },
        })
    }

    /// Appends the recorded changes to the log and advances the revision.
    fn finish(&self) -> rusqlite::Result<()> {
        if self.events.is_empty() {
            return Ok(());
        }
        let mut stmt = self.tx.prepare_cached(
            "INSERT INTO changes (revision, seq, kind, key, value, create_revision, version, lease)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for (seq, e) in self.events.iter().enumerate() {
            stmt.execute(params![
                self.revision.0,
                i64::try_from(seq).unwrap_or(i64::MAX),
                match e.kind {
                    EventKind::Put => 0,
                    EventKind::Delete => 1,
                },
                e.kv.key.as_bytes(),
                e.kv.value,
                e.kv.create_revision.0,
                e.kv.version,
                e.kv.lease.map(|l| l.0)
            ])?;
        }
        self.tx
            .prepare_cached("UPDATE meta SET revision = ?1 WHERE id = 1")?
            .execute([self.revision.0])?;
        Ok(())
    }
}

impl Inner {
    fn err(&self, op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError + '_ {
        move |e| classify(&self.path, op, self.options.busy_timeout, e)
    }

    /// Runs `f` in one IMMEDIATE transaction at the next revision; commits, then tells the
    /// watchers (still under the writer lock, so they see revisions in order).
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Write<'_>) -> Result<T, WriteError>,
    ) -> Result<(T, Revision), StoreError> {
        let mut conn = lock(&self.writer);
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(self.err(op))?;
        let (current, _) = current_revision(&tx).map_err(self.err(op))?;
        let mut w = Write {
            tx: &tx,
            revision: current.next(),
            now_ms: self.options.clock.now_ms(),
            events: Vec::new(),
        };
        let out = match f(&mut w) {
            Ok(out) => out,
            Err(WriteError::Sql(e)) => return Err(self.err(op)(e)),
            Err(WriteError::Store(e)) => return Err(e),
        };
        w.finish().map_err(self.err(op))?;
        let Write { revision, events, .. } = w;
        let changed = !events.is_empty();
        tx.commit().map_err(self.err(op))?;
        if !changed {
            return Ok((out, current));
        }
        let batch = WatchBatch { revision, events };
        lock(&self.watchers).retain(|w| w.send(&batch) == SendOutcome::Live);
        Ok((out, revision))
    }

    /// Runs `f` on a pooled read-only connection inside one read transaction (a snapshot).
    fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let pooled = lock(&self.readers).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(self.err(op))?;
                c.busy_timeout(self.options.busy_timeout).map_err(self.err(op))?;
                c
            }
        };
        let result = conn.transaction().and_then(|tx| {
            let out = f(&tx)?;
            tx.finish()?;
            Ok(out)
        });
        lock(&self.readers).push(conn);
        result.map_err(self.err(op))
    }

    fn reap_due(&self) -> Result<(), StoreError> {
        if self.next_expiry.load(Ordering::SeqCst) <= self.options.clock.now_ms() {
            self.expire()?;
        }
        Ok(())
    }

    fn expire(&self) -> Result<(), StoreError> {
        let ((), _) = self.write("expire leases", |w| {
            let due =
                w.tx.prepare_cached("SELECT id FROM leases WHERE expires_at_ms <= ?1 ORDER BY id")?
                    .query_map([w.now_ms], |r| r.get::<_, i64>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
            for id in due {
                w.delete_lease_keys(LeaseId(id))?;
            }
            Ok(())
        })?;
        self.refresh_next_expiry()
    }

    fn refresh_next_expiry(&self) -> Result<(), StoreError> {
        let conn = lock(&self.writer);
        let next = next_expiry(&conn).map_err(self.err("read leases"))?;
        self.next_expiry.store(next, Ordering::SeqCst);
        Ok(())
    }
}

impl Store for SqliteStore {
    fn revision(&self) -> Result<Revision, StoreError> {
        self.inner.reap_due()?;
        self.inner
            .read("read the revision", |tx| current_revision(tx).map(|(r, _)| r))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        validate_key(key)?;
        self.inner.reap_due()?;
        self.inner.read("get a key", |tx| get_kv(tx, key))
    }

    fn range(&self, prefix: &str, options: &RangeOptions) -> Result<Range, StoreError> {
        validate_key(prefix)?;
        self.inner.reap_due()?;
        self.inner.read("read a range", |tx| {
            let (revision, _) = current_revision(tx)?;
            let (kvs, more) = range_kv(tx, prefix, options)?;
            Ok(Range { kvs, more, revision })
        })
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        validate_txn_keys(&txn)?;
        self.inner.reap_due()?;
        let ((succeeded, results), revision) = self.inner.write("run a transaction", |w| {
            let mut succeeded = true;
            for c in &txn.compare {
                if !c.holds(get_kv(w.tx, &c.key)?.as_ref()) {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { txn.success } else { txn.failure };
            let results = ops
                .into_iter()
                .map(|op| w.apply(op))
                .collect::<Result<Vec<_>, _>>()?;
            Ok((succeeded, results))
        })?;
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }

    fn watch(&self, prefix: &str, from: Option<Revision>) -> Result<Watcher, StoreError> {
        validate_key(prefix)?;
        self.inner.reap_due()?;
        let inner = &self.inner;
        // The writer lock keeps commits out while history is read and the watcher registered:
        // no change is missed or delivered twice.
        let conn = lock(&inner.writer);
        let (current, compacted) = current_revision(&conn).map_err(inner.err("start a watch"))?;
        let start = from.unwrap_or(current.next()).max(Revision(1));
        if start < compacted {
            return Err(StoreError::Compacted {
                requested: start,
                compacted,
            });
        }
        let mut history: Vec<WatchBatch> = Vec::new();
        if start <= current {
            let end = prefix_end(prefix.as_bytes());
            let rows = conn
                .prepare_cached(
                    "SELECT revision, kind, key, value, create_revision, version, lease FROM changes
                     WHERE revision >= ?1 AND key >= ?2 AND (?3 IS NULL OR key < ?3)
                     ORDER BY revision, seq",
                )
                .and_then(|mut stmt| {
                    stmt.query_map(params![start.0, prefix.as_bytes(), end], |r| {
                        let kind: i64 = r.get(1)?;
                        let key: Vec<u8> = r.get(2)?;
                        let key = String::from_utf8(key).map_err(|e| {
                            rusqlite::Error::FromSqlConversionFailure(
                                2,
                                rusqlite::types::Type::Blob,
                                Box::new(e),
                            )
                        })?;
                        let revision = Revision(r.get(0)?);
                        Ok((
                            revision,
                            WatchEvent {
                                kind: if kind == 0 {
                                    EventKind::Put
                                } else {
                                    EventKind::Delete
                                },
                                kv: KeyValue {
                                    key,
                                    value: r.get(3)?,
                                    create_revision: Revision(r.get(4)?),
                                    mod_revision: revision,
                                    version: r.get(5)?,
                                    lease: r.get::<_, Option<i64>>(6)?.map(LeaseId),
                                },
                            },
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(inner.err("read the change log"))?;
            for (revision, event) in rows {
                match history.last_mut() {
                    Some(b) if b.revision == revision => b.events.push(event),
                    _ => history.push(WatchBatch {
                        revision,
                        events: vec![event],
                    }),
                }
            }
        }
        let (watcher, sender) = Watcher::new(prefix, history, start, inner.options.watch_capacity);
        let sender = sender.starting_at(current.next().max(start));
        lock(&inner.watchers).push(sender);
        drop(conn);
        Ok(watcher)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, StoreError> {
        let ttl_ms = lease_ttl_ms(ttl)?;
        let (grant, _) = self.inner.write("grant a lease", |w| {
            let id: i64 =
                w.tx.query_row("SELECT next_lease_id FROM meta WHERE id = 1", [], |r| r.get(0))?;
            let expires_at_ms = w.now_ms.saturating_add(ttl_ms);
            w.tx.execute(
                "INSERT INTO leases (id, ttl_ms, expires_at_ms) VALUES (?1, ?2, ?3)",
                params![id, ttl_ms, expires_at_ms],
            )?;
            w.tx.execute("UPDATE meta SET next_lease_id = ?1 WHERE id = 1", [id + 1])?;
            Ok(LeaseGrant {
                id: LeaseId(id),
                ttl_ms,
                expires_at_ms,
            })
        })?;
        self.inner
            .next_expiry
            .fetch_min(grant.expires_at_ms, Ordering::SeqCst);
        Ok(grant)
    }

    fn keep_alive(&self, id: LeaseId) -> Result<LeaseGrant, StoreError> {
        self.inner.reap_due()?;
        let (grant, _) = self.inner.write("keep a lease alive", |w| {
            let ttl_ms: Option<i64> =
                w.tx.query_row(
                    "SELECT ttl_ms FROM leases WHERE id = ?1 AND expires_at_ms > ?2",
                    params![id.0, w.now_ms],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(ttl_ms) = ttl_ms else {
                return Err(WriteError::Store(StoreError::LeaseNotFound { id }));
            };
            let expires_at_ms = w.now_ms.saturating_add(ttl_ms);
            w.tx.execute(
                "UPDATE leases SET expires_at_ms = ?2 WHERE id = ?1",
                params![id.0, expires_at_ms],
            )?;
            Ok(LeaseGrant {
                id,
                ttl_ms,
                expires_at_ms,
            })
        })?;
        self.inner.refresh_next_expiry()?;
        Ok(grant)
    }

    fn revoke_lease(&self, id: LeaseId) -> Result<bool, StoreError> {
        self.inner.reap_due()?;
        let (existed, _) = self.inner.write("revoke a lease", |w| {
            let existed =
                w.tx.prepare_cached("SELECT 1 FROM leases WHERE id = ?1")?
                    .exists([id.0])?;
            if existed {
                w.delete_lease_keys(id)?;
            }
            Ok(existed)
        })?;
        self.inner.refresh_next_expiry()?;
        Ok(existed)
    }

    fn expire_leases(&self) -> Result<(), StoreError> {
        self.inner.expire()
    }

    fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut conn = lock(&self.inner.writer);
        let err = || self.inner.err("compact history");
        // The log trim and the new lower bound commit together: a watch never gets a history
        // with a silent hole.
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(err())?;
        let (current, compacted) = current_revision(&tx).map_err(err())?;
        let target = revision.min(current.next());
        if target <= compacted {
            return Ok(());
        }
        tx.execute("DELETE FROM changes WHERE revision < ?1", [target.0])
            .and_then(|_| tx.execute("UPDATE meta SET compact_revision = ?1 WHERE id = 1", [target.0]))
            .and_then(|_| tx.commit())
            .map_err(err())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a"), Some(b"/b".to_vec()));
        assert_eq!(prefix_end(b"/a\xff"), Some(b"/b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn migrations_apply_once_and_newer_schemas_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut conn = Connection::open(&path).unwrap();
        assert!(matches!(
            schema::migrate(&mut conn).unwrap(),
            schema::Migrated::Ok { from: 0 }
        ));
        assert!(matches!(
            schema::migrate(&mut conn).unwrap(),
            schema::Migrated::Ok { from: 1 }
        ));
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
        assert!(err.to_string().contains("newer aloft"));
    }
}
