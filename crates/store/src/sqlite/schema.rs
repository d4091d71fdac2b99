//! The SQLite schema and its migrations, versioned in code (`PRAGMA user_version`).

use rusqlite::Connection;

/// Migration `i` brings the schema from version `i` to `i + 1`. Append only: never edit a
/// migration that has shipped.
pub(super) const MIGRATIONS: &[&str] = &[
    // 1: the key space, its change log, leases.
    r"
    CREATE TABLE meta (
        id               INTEGER PRIMARY KEY CHECK (id = 1),
        revision         INTEGER NOT NULL,
        compact_revision INTEGER NOT NULL,
        next_lease_id    INTEGER NOT NULL
    );
    INSERT INTO meta (id, revision, compact_revision, next_lease_id) VALUES (1, 0, 0, 1);

    CREATE TABLE kv (
        key             BLOB PRIMARY KEY,
        value           BLOB NOT NULL,
        create_revision INTEGER NOT NULL,
        mod_revision    INTEGER NOT NULL,
        version         INTEGER NOT NULL,
        lease           INTEGER
    ) WITHOUT ROWID;
    CREATE INDEX kv_by_lease ON kv (lease) WHERE lease IS NOT NULL;

    CREATE TABLE changes (
        revision        INTEGER NOT NULL,
        seq             INTEGER NOT NULL,
        kind            INTEGER NOT NULL CHECK (kind IN (0, 1)),
        key             BLOB NOT NULL,
        value           BLOB NOT NULL,
        create_revision INTEGER NOT NULL,
        version         INTEGER NOT NULL,
        lease           INTEGER,
        PRIMARY KEY (revision, seq)
    ) WITHOUT ROWID;

    CREATE TABLE leases (
        id            INTEGER PRIMARY KEY,
        ttl_ms        INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX leases_by_expiry ON leases (expires_at_ms);
    ",
];

/// The schema version this build writes.
pub(super) fn latest() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// What [`migrate`] found.
pub(super) enum Migrated {
    /// The schema is current (`from` is the version found).
    Ok {
        /// Version before migrating.
        #[cfg_attr(not(test), expect(dead_code, reason = "read by tests"))]
        from: i64,
    },
    /// The database is newer than this build.
    TooNew {
        /// Its version.
        found: i64,
    },
}

/// Applies the missing migrations, each in its own transaction together with the version bump.
pub(super) fn migrate(conn: &mut Connection) -> rusqlite::Result<Migrated> {
    let from: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if from > latest() {
        return Ok(Migrated::TooNew { found: from });
    }
    let start = usize::try_from(from).unwrap_or(0);
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(start) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))?;
        tx.commit()?;
    }
    Ok(Migrated::Ok { from })
}
