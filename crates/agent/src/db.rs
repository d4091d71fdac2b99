//! The agent's own SQLite database (WAL, `synchronous=FULL`: a committed step survives a power
//! cut). One connection behind a mutex; every write is one transaction.
//!
//! Schema (version 3, `PRAGMA user_version`; version 2 adds the index `machines_by_app`, version 3
//! the table `machine_secrets`):
//!
//! | table | holds |
//! |---|---|
//! | `machines` | one row per machine: state, current version and config, resources (JSON), restart count, the operation in flight |
//! | `versions` | every config version of every machine, and when it was replaced |
//! | `operations` | one row per operation: kind, source, status, params (plans, JSON), scratch (JSON), error |
//! | `steps` | one row per (operation, phase, index): step, status, attempts, error |
//! | `events` | Fly-shaped machine events, in order (`seq`) |
//! | `machine_secrets` | the current version's app secrets, sealed with the agent's key (JSON of [`crate::SealedSecrets`]); version 3 |

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use aloft_api::{EventSource, MachineConfig, MachineEvent, MachineEventRequest, MachineId};
use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::AgentError;
use crate::model::{MachineRecord, OpParams, OpRecord, Phase, SealedSecrets, StepRecord};

const MIGRATIONS: &[&str] = &[
    r"
CREATE TABLE machines (
    id TEXT PRIMARY KEY,
    app TEXT NOT NULL,
    name TEXT NOT NULL,
    region TEXT NOT NULL,
    org INTEGER NOT NULL,
    state TEXT NOT NULL,
    version TEXT NOT NULL,
    config TEXT NOT NULL,
    resources TEXT NOT NULL,
    restart_count INTEGER NOT NULL DEFAULT 0,
    op_id TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE versions (
    machine_id TEXT NOT NULL,
    version TEXT NOT NULL,
    config TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    replaced_at INTEGER,
    PRIMARY KEY (machine_id, version)
);
CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    machine_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    scratch TEXT NOT NULL,
    error TEXT,
    created_at INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX operations_by_machine ON operations (machine_id, created_at);
CREATE INDEX operations_unfinished ON operations (status) WHERE status IN ('running', 'undoing');
CREATE TABLE steps (
    op_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    idx INTEGER NOT NULL,
    step TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    error TEXT,
    started_at INTEGER NOT NULL,
    finished_at INTEGER,
    PRIMARY KEY (op_id, phase, idx)
);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    machine_id TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    source TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    request TEXT
);
CREATE INDEX events_by_machine ON events (machine_id, seq);
",
    r"
CREATE INDEX machines_by_app ON machines (app, created_at, id);
",
    r"
CREATE TABLE machine_secrets (
    machine_id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    sealed TEXT NOT NULL
);
",
];

/// The database. Writes are refused once `halted` is set (a killed agent writes nothing more).
#[derive(Debug)]
pub(crate) struct Db {
    conn: Mutex<Connection>,
    halted: Arc<AtomicBool>,
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serializing these plain data types cannot fail (no maps with non-string keys, no
    // fallible Serialize impls); an empty object is a safe fallback that parses as defaults.
    serde_json::to_string(v).unwrap_or_else(|_| "{}".to_owned())
}

fn from_json<T: DeserializeOwned>(what: impl FnOnce() -> String, s: &str) -> Result<T, AgentError> {
    serde_json::from_str(s).map_err(|source| AgentError::Corrupt { what: what(), source })
}

fn enum_str<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

fn enum_from<T: DeserializeOwned>(what: &str, s: &str) -> Result<T, AgentError> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|source| AgentError::Corrupt {
        what: format!("{what} {s:?}"),
        source,
    })
}

/// A machine row as read, before its JSON columns are parsed.
struct RawMachine {
    id: String,
    app: String,
    name: String,
    region: String,
    org: i64,
    state: String,
    version: String,
    config: String,
    resources: String,
    restart_count: i64,
    op_id: Option<String>,
    created_at: i64,
    updated_at: i64,
}

const MACHINE_COLS: &str = "id, app, name, region, org, state, version, config, resources, restart_count, op_id, created_at, updated_at";

fn raw_machine(r: &Row<'_>) -> rusqlite::Result<RawMachine> {
    Ok(RawMachine {
        id: r.get(0)?,
        app: r.get(1)?,
        name: r.get(2)?,
        region: r.get(3)?,
        org: r.get(4)?,
        state: r.get(5)?,
        version: r.get(6)?,
        config: r.get(7)?,
        resources: r.get(8)?,
        restart_count: r.get(9)?,
        op_id: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

impl RawMachine {
    fn parse(self) -> Result<MachineRecord, AgentError> {
        let id_str = self.id.clone();
        let id = self.id.parse::<MachineId>().map_err(|e| AgentError::Corrupt {
            what: format!("machine id {:?}", self.id),
            source: serde::de::Error::custom(e),
        })?;
        Ok(MachineRecord {
            state: enum_from("machine state", &self.state)?,
            config: from_json(|| format!("config of machine {id_str}"), &self.config)?,
            resources: from_json(|| format!("resources of machine {id_str}"), &self.resources)?,
            id,
            app: self.app,
            name: self.name,
            region: self.region,
            org: u32::try_from(self.org).unwrap_or(0),
            version: self.version,
            restart_count: u32::try_from(self.restart_count).unwrap_or(0),
            op_id: self.op_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            checks: Vec::new(),
        })
    }
}

const OP_COLS: &str = "id, machine_id, kind, source, status, params, scratch, error, created_at, finished_at";

type RawOp = (
    String,
    String,
    String,
    String,
    String,
    String,
    String,
    Option<String>,
    i64,
    Option<i64>,
);

fn raw_op(r: &Row<'_>) -> rusqlite::Result<RawOp> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
    ))
}

fn parse_op(raw: RawOp) -> Result<OpRecord, AgentError> {
    let (id, machine, kind, source, status, params, scratch, error, created_at, finished_at) = raw;
    let machine = machine.parse::<MachineId>().map_err(|e| AgentError::Corrupt {
        what: format!("machine id of operation {id}"),
        source: serde::de::Error::custom(e),
    })?;
    Ok(OpRecord {
        kind: enum_from("operation kind", &kind)?,
        source: enum_from("event source", &source)?,
        status: enum_from("operation status", &status)?,
        params: from_json(|| format!("params of operation {id}"), &params)?,
        scratch: from_json(|| format!("scratch of operation {id}"), &scratch)?,
        id,
        machine,
        error,
        created_at,
        finished_at,
    })
}

/// A write transaction with the agent's record operations.
pub(crate) struct Tx<'a> {
    tx: Transaction<'a>,
}

impl Tx<'_> {
    pub(crate) fn insert_machine(&self, m: &MachineRecord) -> Result<(), AgentError> {
        self.tx
            .execute(
                &format!("INSERT INTO machines ({MACHINE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"),
                params![
                    m.id.as_str(),
                    m.app,
                    m.name,
                    m.region,
                    i64::from(m.org),
                    m.state.as_str(),
                    m.version,
                    to_json(&m.config),
                    to_json(&m.resources),
                    i64::from(m.restart_count),
                    m.op_id,
                    m.created_at,
                    m.updated_at,
                ],
            )
            .map_err(AgentError::db("insert machine"))?;
        Ok(())
    }

    /// Writes every mutable column of `m`.
    pub(crate) fn update_machine(&self, m: &MachineRecord) -> Result<(), AgentError> {
        self.tx
            .execute(
                "UPDATE machines SET state = ?2, version = ?3, config = ?4, resources = ?5, restart_count = ?6, op_id = ?7, updated_at = ?8 WHERE id = ?1",
                params![
                    m.id.as_str(),
                    m.state.as_str(),
                    m.version,
                    to_json(&m.config),
                    to_json(&m.resources),
                    i64::from(m.restart_count),
                    m.op_id,
                    m.updated_at,
                ],
            )
            .map_err(AgentError::db("update machine"))?;
        Ok(())
    }

    pub(crate) fn insert_version(
        &self,
        id: &MachineId,
        version: &str,
        config: &MachineConfig,
        at: i64,
    ) -> Result<(), AgentError> {
        self.tx
            .execute(
                "INSERT OR IGNORE INTO versions (machine_id, version, config, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id.as_str(), version, to_json(config), at],
            )
            .map_err(AgentError::db("insert version"))?;
        Ok(())
    }

    /// Keeps `sealed` as the secrets of `version` of machine `id` (none: forgets them).
    pub(crate) fn put_secrets(
        &self,
        id: &MachineId,
        version: &str,
        sealed: Option<&SealedSecrets>,
    ) -> Result<(), AgentError> {
        match sealed {
            Some(s) => self.tx.execute(
                "INSERT OR REPLACE INTO machine_secrets (machine_id, version, sealed) VALUES (?1, ?2, ?3)",
                params![id.as_str(), version, to_json(s)],
            ),
            None => self
                .tx
                .execute("DELETE FROM machine_secrets WHERE machine_id = ?1", [id.as_str()]),
        }
        .map_err(AgentError::db("record secrets"))?;
        Ok(())
    }

    /// Replaces the parameters of operation `id` (re-sealing the secrets they carry).
    pub(crate) fn set_op_params(&self, id: &str, params: &OpParams) -> Result<(), AgentError> {
        self.tx
            .execute(
                "UPDATE operations SET params = ?2 WHERE id = ?1",
                params![id, to_json(params)],
            )
            .map_err(AgentError::db("update operation parameters"))?;
        Ok(())
    }

    pub(crate) fn replace_version(&self, id: &MachineId, version: &str, at: i64) -> Result<(), AgentError> {
        self.tx
            .execute(
                "UPDATE versions SET replaced_at = ?3 WHERE machine_id = ?1 AND version = ?2 AND replaced_at IS NULL",
                params![id.as_str(), version, at],
            )
            .map_err(AgentError::db("mark version replaced"))?;
        Ok(())
    }

    pub(crate) fn insert_op(&self, op: &OpRecord) -> Result<(), AgentError> {
        self.tx
            .execute(
                &format!(
                    "INSERT INTO operations ({OP_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)"
                ),
                params![
                    op.id,
                    op.machine.as_str(),
                    op.kind.as_str(),
                    enum_str(&op.source),
                    enum_str(&op.status),
                    to_json(&op.params),
                    to_json(&op.scratch),
                    op.error,
                    op.created_at,
                    op.finished_at,
                ],
            )
            .map_err(AgentError::db("insert operation"))?;
        Ok(())
    }

    pub(crate) fn update_op(&self, op: &OpRecord) -> Result<(), AgentError> {
        self.tx
            .execute(
                "UPDATE operations SET status = ?2, params = ?3, scratch = ?4, error = ?5, finished_at = ?6 WHERE id = ?1",
                params![
                    op.id,
                    enum_str(&op.status),
                    to_json(&op.params),
                    to_json(&op.scratch),
                    op.error,
                    op.finished_at,
                ],
            )
            .map_err(AgentError::db("update operation"))?;
        Ok(())
    }

    /// Records that a step is about to act (before it acts); counts the attempt.
    pub(crate) fn step_started(
        &self,
        op_id: &str,
        phase: Phase,
        idx: usize,
        step: crate::model::Step,
        at: i64,
    ) -> Result<(), AgentError> {
        let idx = i64::try_from(idx).unwrap_or(i64::MAX);
        self.tx
            .execute(
                "INSERT INTO steps (op_id, phase, idx, step, status, attempts, started_at) VALUES (?1, ?2, ?3, ?4, 'started', 1, ?5)
                 ON CONFLICT (op_id, phase, idx) DO UPDATE SET status = 'started', attempts = attempts + 1, started_at = ?5, finished_at = NULL",
                params![op_id, enum_str(&phase), idx, step.as_str(), at],
            )
            .map_err(AgentError::db("record step start"))?;
        Ok(())
    }

    /// Records a step's outcome: `done`, or `failed` with its error.
    pub(crate) fn step_finished(
        &self,
        op_id: &str,
        phase: Phase,
        idx: usize,
        error: Option<&str>,
        at: i64,
    ) -> Result<(), AgentError> {
        let idx = i64::try_from(idx).unwrap_or(i64::MAX);
        let status = if error.is_some() { "failed" } else { "done" };
        self.tx
            .execute(
                "UPDATE steps SET status = ?4, error = ?5, finished_at = ?6 WHERE op_id = ?1 AND phase = ?2 AND idx = ?3",
                params![op_id, enum_str(&phase), idx, status, error, at],
            )
            .map_err(AgentError::db("record step outcome"))?;
        Ok(())
    }

    /// Keeps the newest `keep` events and finished operations (with their steps) of `machine`;
    /// older ones go, so a machine restarting for months does not grow the database forever.
    pub(crate) fn prune(&self, machine: &MachineId, keep: usize) -> Result<(), AgentError> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        self.tx
            .execute(
                "DELETE FROM events WHERE machine_id = ?1 AND seq NOT IN
                   (SELECT seq FROM events WHERE machine_id = ?1 ORDER BY seq DESC LIMIT ?2)",
                params![machine.as_str(), keep],
            )
            .map_err(AgentError::db("prune events"))?;
        self.tx
            .execute(
                "DELETE FROM steps WHERE op_id IN
                   (SELECT id FROM operations WHERE machine_id = ?1 AND status NOT IN ('running', 'undoing')
                    AND id NOT IN (SELECT id FROM operations WHERE machine_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2))",
                params![machine.as_str(), keep],
            )
            .map_err(AgentError::db("prune steps"))?;
        self.tx
            .execute(
                "DELETE FROM operations WHERE machine_id = ?1 AND status NOT IN ('running', 'undoing')
                   AND id NOT IN (SELECT id FROM operations WHERE machine_id = ?1 ORDER BY created_at DESC, id DESC LIMIT ?2)",
                params![machine.as_str(), keep],
            )
            .map_err(AgentError::db("prune operations"))?;
        Ok(())
    }

    /// Appends an event.
    pub(crate) fn insert_event(&self, id: &MachineId, event: &MachineEvent) -> Result<(), AgentError> {
        self.tx
            .execute(
                "INSERT INTO events (id, machine_id, type, status, source, timestamp, request) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    event.id,
                    id.as_str(),
                    event.kind,
                    event.status,
                    event.source.map(|s| enum_str(&s)).unwrap_or_default(),
                    event.timestamp,
                    event.request.as_ref().map(to_json),
                ],
            )
            .map_err(AgentError::db("insert event"))?;
        Ok(())
    }
}

fn machine_in(conn: &Connection, id: &MachineId) -> Result<Option<MachineRecord>, AgentError> {
    conn.query_row(
        &format!("SELECT {MACHINE_COLS} FROM machines WHERE id = ?1"),
        [id.as_str()],
        raw_machine,
    )
    .optional()
    .map_err(AgentError::db("read machine"))?
    .map(RawMachine::parse)
    .transpose()
}

fn parse_event(
    (id, kind, status, source, timestamp, request): (String, String, String, String, i64, Option<String>),
) -> Result<MachineEvent, AgentError> {
    Ok(MachineEvent {
        source: if source.is_empty() {
            None
        } else {
            Some(enum_from::<EventSource>("event source", &source)?)
        },
        request: request
            .map(|r| from_json::<MachineEventRequest>(|| format!("request of event {id}"), &r))
            .transpose()?,
        id,
        kind,
        status,
        timestamp,
    })
}

impl Db {
    pub(crate) fn open(path: &Path, halted: Arc<AtomicBool>) -> Result<Self, AgentError> {
        let conn = Connection::open(path).map_err(AgentError::db("open"))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(AgentError::db("set busy timeout"))?;
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", "wal", |r| r.get(0))
            .map_err(AgentError::db("enable WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(AgentError::Database {
                op: "enable WAL",
                source: rusqlite::Error::InvalidParameterName(format!("journal_mode is {mode}")),
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(AgentError::db("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(AgentError::db("enable foreign keys"))?;
        let mut conn = conn;
        let from: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(AgentError::db("read schema version"))?;
        let from = usize::try_from(from).unwrap_or(usize::MAX);
        if from > MIGRATIONS.len() {
            return Err(AgentError::Database {
                op: "check schema version",
                source: rusqlite::Error::InvalidParameterName(format!(
                    "schema version {from} is newer than this agent's {}: run a newer aloftd",
                    MIGRATIONS.len()
                )),
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from) {
            let tx = conn.transaction().map_err(AgentError::db("begin migration"))?;
            tx.execute_batch(sql).map_err(AgentError::db("migrate schema"))?;
            tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))
                .map_err(AgentError::db("record schema version"))?;
            tx.commit().map_err(AgentError::db("commit migration"))?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            halted,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` in one immediate transaction and commits. Refused once the agent is halted.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&Tx<'_>) -> Result<T, AgentError>) -> Result<T, AgentError> {
        let mut conn = self.lock();
        if self.halted.load(Ordering::SeqCst) {
            return Err(AgentError::Halted);
        }
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(AgentError::db("begin"))?;
        let tx = Tx { tx };
        let out = f(&tx)?;
        if self.halted.load(Ordering::SeqCst) {
            return Err(AgentError::Halted);
        }
        tx.tx.commit().map_err(AgentError::db("commit"))?;
        Ok(out)
    }

    pub(crate) fn machine(&self, id: &MachineId) -> Result<Option<MachineRecord>, AgentError> {
        machine_in(&self.lock(), id)
    }

    pub(crate) fn machines(&self) -> Result<Vec<MachineRecord>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {MACHINE_COLS} FROM machines ORDER BY created_at, id"
            ))
            .map_err(AgentError::db("list machines"))?;
        let rows = stmt
            .query_map([], raw_machine)
            .map_err(AgentError::db("list machines"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list machines"))?;
        rows.into_iter().map(RawMachine::parse).collect()
    }

    /// The machines of one app, oldest first (through `machines_by_app`).
    pub(crate) fn machines_of(&self, app: &str) -> Result<Vec<MachineRecord>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {MACHINE_COLS} FROM machines WHERE app = ?1 ORDER BY created_at, id"
            ))
            .map_err(AgentError::db("list an app's machines"))?;
        let rows = stmt
            .query_map([app], raw_machine)
            .map_err(AgentError::db("list an app's machines"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list an app's machines"))?;
        rows.into_iter().map(RawMachine::parse).collect()
    }

    /// The sealed secrets kept for machine `id`: (version, secrets).
    pub(crate) fn secrets(&self, id: &MachineId) -> Result<Option<(String, SealedSecrets)>, AgentError> {
        let row = self
            .lock()
            .query_row(
                "SELECT version, sealed FROM machine_secrets WHERE machine_id = ?1",
                [id.as_str()],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(AgentError::db("read secrets"))?;
        row.map(|(v, s)| Ok((v, from_json(|| format!("secrets of machine {id}"), &s)?)))
            .transpose()
    }

    /// The secrets kept for machines' versions that record a key id other than `key_id`, or
    /// none: (machine, version, secrets).
    pub(crate) fn machine_secrets_not_sealed_by(
        &self,
        key_id: &str,
    ) -> Result<Vec<(MachineId, String, SealedSecrets)>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(
                "SELECT machine_id, version, sealed FROM machine_secrets \
                 WHERE coalesce(json_extract(sealed, '$.sealed.key_id'), '') <> ?1 ORDER BY machine_id",
            )
            .map_err(AgentError::db("list sealed secrets"))?;
        let rows = stmt
            .query_map([key_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(AgentError::db("list sealed secrets"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list sealed secrets"))?;
        rows.into_iter()
            .map(|(id, version, sealed)| {
                let sealed = from_json(|| format!("secrets of machine {id}"), &sealed)?;
                let id = id.parse::<MachineId>().map_err(|e| AgentError::Corrupt {
                    what: format!("machine id {id:?} of sealed secrets"),
                    source: serde::de::Error::custom(e),
                })?;
                Ok((id, version, sealed))
            })
            .collect()
    }

    /// Operations whose parameters carry secrets that record a key id other than `key_id`, or
    /// none.
    pub(crate) fn ops_with_secrets_not_sealed_by(&self, key_id: &str) -> Result<Vec<OpRecord>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {OP_COLS} FROM operations WHERE json_extract(params, '$.secrets') IS NOT NULL \
                 AND coalesce(json_extract(params, '$.secrets.sealed.key_id'), '') <> ?1 ORDER BY created_at, id"
            ))
            .map_err(AgentError::db("list operations with secrets"))?;
        let rows = stmt
            .query_map([key_id], raw_op)
            .map_err(AgentError::db("list operations with secrets"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list operations with secrets"))?;
        rows.into_iter().map(parse_op).collect()
    }

    pub(crate) fn op(&self, id: &str) -> Result<Option<OpRecord>, AgentError> {
        self.lock()
            .query_row(
                &format!("SELECT {OP_COLS} FROM operations WHERE id = ?1"),
                [id],
                raw_op,
            )
            .optional()
            .map_err(AgentError::db("read operation"))?
            .map(parse_op)
            .transpose()
    }

    pub(crate) fn ops(&self, machine: &MachineId) -> Result<Vec<OpRecord>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {OP_COLS} FROM operations WHERE machine_id = ?1 ORDER BY created_at, id"
            ))
            .map_err(AgentError::db("list operations"))?;
        let rows = stmt
            .query_map([machine.as_str()], raw_op)
            .map_err(AgentError::db("list operations"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list operations"))?;
        rows.into_iter().map(parse_op).collect()
    }

    pub(crate) fn steps(&self, op_id: &str) -> Result<Vec<StepRecord>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT phase, idx, step, status, attempts, error FROM steps WHERE op_id = ?1 ORDER BY phase = 'undo', idx",
            )
            .map_err(AgentError::db("list steps"))?;
        let rows = stmt
            .query_map([op_id], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })
            .map_err(AgentError::db("list steps"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list steps"))?;
        rows.into_iter()
            .map(|(phase, idx, step, status, attempts, error)| {
                Ok(StepRecord {
                    phase: enum_from("step phase", &phase)?,
                    idx: usize::try_from(idx).unwrap_or(0),
                    step: enum_from("step", &step)?,
                    status,
                    attempts: u32::try_from(attempts).unwrap_or(0),
                    error,
                })
            })
            .collect()
    }

    /// Events of `machine`, newest first, at most `limit`.
    pub(crate) fn events(&self, machine: &MachineId, limit: usize) -> Result<Vec<MachineEvent>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, type, status, source, timestamp, request FROM events WHERE machine_id = ?1 ORDER BY seq DESC LIMIT ?2",
            )
            .map_err(AgentError::db("list events"))?;
        let rows = stmt
            .query_map(
                params![machine.as_str(), i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
            )
            .map_err(AgentError::db("list events"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list events"))?;
        rows.into_iter().map(parse_event).collect()
    }

    /// The sequence number of event `event_id` of `machine`.
    pub(crate) fn event_seq(&self, machine: &MachineId, event_id: &str) -> Result<Option<i64>, AgentError> {
        self.lock()
            .query_row(
                "SELECT seq FROM events WHERE machine_id = ?1 AND id = ?2",
                params![machine.as_str(), event_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(AgentError::db("find event"))
    }

    /// Events of `machine` after sequence number `seq`, oldest first, with their sequence numbers.
    pub(crate) fn events_after(
        &self,
        machine: &MachineId,
        seq: i64,
    ) -> Result<Vec<(i64, MachineEvent)>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, id, type, status, source, timestamp, request FROM events WHERE machine_id = ?1 AND seq > ?2 ORDER BY seq",
            )
            .map_err(AgentError::db("list events"))?;
        let rows = stmt
            .query_map(params![machine.as_str(), seq], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?),
                ))
            })
            .map_err(AgentError::db("list events"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list events"))?;
        rows.into_iter()
            .map(|(seq, raw)| Ok((seq, parse_event(raw)?)))
            .collect()
    }

    /// Versions of `machine`, oldest first: (version, config, replaced).
    pub(crate) fn versions(
        &self,
        machine: &MachineId,
    ) -> Result<Vec<(String, MachineConfig, bool)>, AgentError> {
        let conn = self.lock();
        let mut stmt = conn
            .prepare_cached(
                "SELECT version, config, replaced_at IS NOT NULL FROM versions WHERE machine_id = ?1 ORDER BY created_at, version",
            )
            .map_err(AgentError::db("list versions"))?;
        let rows = stmt
            .query_map([machine.as_str()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            })
            .map_err(AgentError::db("list versions"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(AgentError::db("list versions"))?;
        rows.into_iter()
            .map(|(v, c, replaced)| {
                let config = from_json(|| format!("config of version {v}"), &c)?;
                Ok((v, config, replaced))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_migrates_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let halted = Arc::new(AtomicBool::new(false));
        drop(Db::open(&path, halted.clone()).unwrap());
        let db = Db::open(&path, halted.clone()).unwrap();
        assert!(db.machines().unwrap().is_empty());
        halted.store(true, Ordering::SeqCst);
        assert!(matches!(db.write(|_| Ok(())), Err(AgentError::Halted)));
    }
}
