//! [`ControlStore`]: typed control-plane records over any [`Store`], with the layout of
//! [`crate::keys`]. Records are JSON; every read returns the record's revision so updates can be
//! compare-and-swap.

use std::sync::Arc;
use std::time::Duration;

use aloft_api::{ApiError, App, Lease, Machine, MachineEvent, SnapshotId, Volume, VolumeId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{
    Expect, KeyValue, LeaseGrant, LeaseId, Op, OpResult, RangeOptions, Revision, Store, StoreError, Txn, keys,
};

/// A record and the revision that last changed it (pass it back as [`Expect::Revision`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    /// The record.
    pub value: T,
    /// Its `mod_revision`.
    pub revision: Revision,
}

/// A machine as the control plane sees it: the API object plus where it lives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// The app it belongs to.
    pub app: String,
    /// The agent (host) that owns it and answers for its lifecycle.
    pub host: String,
    /// The machine as its agent answered the create. The agent stays authoritative for its
    /// state and config: read those from the agent, not from here.
    pub machine: Machine,
    /// Kept out of the proxy's pool (`POST …/cordon`, or created with
    /// `skip_service_registration`).
    #[serde(default)]
    pub cordoned: bool,
}

/// A volume as the control plane sees it: the API object plus the host holding its disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// The app it belongs to.
    pub app: String,
    /// The host (agent) holding its disk; a machine mounting it runs there.
    pub host: String,
    /// The volume as created, with the size and settings changed since. The machine it is
    /// attached to is not kept here: the host answers that (`attached_machine_id` is `None`).
    pub volume: Volume,
}

/// Where a snapshot is in its life ([`SnapshotRecord::state`]). Only `created` snapshots are
/// listed and restored; the others are the record of an intent that a later pass finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotState {
    /// Recorded before its host is asked to take it: the host may or may not hold a copy of
    /// this id yet. The taker marks it `created` once the host answered; a record left pending
    /// (the taker crashed) is discarded by a later pass, which deletes the copy if there is one.
    Pending,
    /// Taken: the host holds the copy; `size`, `volume_size` and `digest` are the host's.
    Created,
    /// Being deleted: the copy is deleted on its host, then the record. A taker that finds its
    /// pending record changed to this deletes the copy it made.
    Deleting,
}

/// A volume snapshot as the control plane sees it, at `/volume-snapshots/{app}/{id}`: the API's
/// `VolumeSnapshot` fields plus the volume it was taken of and the host holding the copy. It is
/// kept after its volume is destroyed, until its retention runs out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// The id.
    pub id: SnapshotId,
    /// The app it belongs to (a restore takes only its own app's snapshots).
    pub app: String,
    /// The volume it was taken of (which may be destroyed since).
    pub volume_id: VolumeId,
    /// That volume's name (a restore's default name).
    pub volume_name: String,
    /// That volume's region: a restore is made there.
    pub region: String,
    /// The host holding the copy: a restore is made there.
    pub host: String,
    /// When it was taken, unix milliseconds.
    pub created_at_ms: i64,
    /// Bytes the copy takes on its host (0 while pending).
    pub size: u64,
    /// The volume's size when taken, bytes (0 while pending).
    pub volume_size: u64,
    /// The host's digest of the copy (empty while pending).
    pub digest: String,
    /// Days it is kept from `created_at_ms`: the volume's `snapshot_retention` when it was taken.
    pub retention_days: u32,
    /// Where it is in its life.
    pub state: SnapshotState,
}

/// An API token. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Token id (the public part).
    pub id: String,
    /// Human name.
    pub name: String,
    /// The organization it acts for.
    pub org_slug: String,
    /// What it may do (`org` for org-wide tokens).
    pub scope: String,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it stops working, unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<i64>,
}

/// One app secret as stored: sealed by the control plane (AEAD, its key kept outside the store),
/// never in plaintext. `nonce` and `ciphertext` are base64; `key_id` names the key that sealed it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The secret's name.
    pub name: String,
    /// The AEAD nonce, base64.
    pub nonce: String,
    /// The sealed value with its tag, base64.
    pub ciphertext: String,
    /// The id of the secrets key that sealed it (hex); `None` for records sealed before key ids
    /// were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The hex SHA-256 of the value that records written before 2026-12-03 carried. Next to the
    /// ciphertext it let anyone holding the store alone guess a weak value, so it is read, never
    /// written: any write of the record (aloftd re-seals such records when it starts) drops it.
    /// The API's digest is computed from the opened value instead.
    #[serde(default, rename = "digest", skip_serializing)]
    pub legacy_digest: Option<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .field("updated_at", &self.updated_at)
            .finish_non_exhaustive()
    }
}

/// An app's secrets version: bumped by every change of its secrets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct SecretsVersion {
    /// The version (0 before the first change).
    pub version: u64,
}

/// An app's secrets read at one revision: the base of a change ([`ControlStore::apply_secrets`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SecretsSnapshot {
    /// The app's secrets version.
    pub version: u64,
    /// The revision of the version record (`None`: never written).
    pub revision: Option<Revision>,
    /// The secrets, by name.
    pub secrets: std::collections::BTreeMap<String, SecretRecord>,
}

/// A claim on issuing one hostname's certificate, at `/cert-claims/{hostname}` on a store lease:
/// while it lives, other edges leave the hostname alone ([`ControlStore::claim_cert`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertClaim {
    /// The edge issuing it.
    pub owner: String,
    /// When the claim ends unless released before, unix milliseconds (the store's clock).
    pub expires_at_ms: i64,
}

/// A claim this edge holds: keep it alive with [`ControlStore::renew_cert_claim`] while issuing,
/// pass it to [`ControlStore::release_cert_claim`] when done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCertClaim {
    /// The hostname.
    pub hostname: String,
    /// The store lease the claim hangs on.
    pub lease: LeaseId,
    /// The claim as written.
    pub claim: CertClaim,
    /// The claim key's `mod_revision` as this edge last wrote it: while the key is still at it,
    /// the claim is this edge's (a write can compare it to act only while holding the claim).
    pub revision: Revision,
}

/// What [`ControlStore::claim_cert`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertClaimOutcome {
    /// The claim is this edge's: issue, write the result, release it.
    Claimed(HeldCertClaim),
    /// Not claimed: another edge holds the claim (`holder`), or the record is no longer at the
    /// revision given (`None`: read it again).
    NotClaimed {
        /// The other edge's claim.
        holder: Option<CertClaim>,
    },
}

/// What `ControlStore::put_on_new_lease` did.
enum LeasedPut {
    /// Written on this lease, at this revision.
    Written(LeaseGrant, Revision),
    /// An expectation failed: the key as it is now, at the store's revision.
    Refused {
        current: Option<KeyValue>,
        revision: Revision,
    },
}

/// A new machine lease. The caller supplies the nonce (random) and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLeaseRequest {
    /// Proof of holding the lease.
    pub nonce: String,
    /// Who takes it.
    pub owner: String,
    /// Why.
    pub description: String,
    /// How long it lasts.
    pub ttl: Duration,
    /// The machine's version.
    pub version: String,
}

/// Why a control-store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The store failed (including [`StoreError::Conflict`] for stale revisions).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An app with this name exists.
    #[error("app {name} already exists; pick another name")]
    AppExists {
        /// The name.
        name: String,
    },
    /// A machine with this id exists.
    #[error("machine {id} already exists in app {app}")]
    MachineExists {
        /// The app.
        app: String,
        /// The id.
        id: String,
    },
    /// A volume with this id exists.
    #[error("volume {id} already exists in app {app}")]
    VolumeExists {
        /// The app.
        app: String,
        /// The id.
        id: String,
    },
    /// A snapshot with this id exists.
    #[error("snapshot {id} already exists in app {app}")]
    SnapshotExists {
        /// The app.
        app: String,
        /// The id.
        id: String,
    },
    /// A snapshot was to be recorded of a volume (or app) that has no record (any more).
    #[error("volume {id} not found in app {app}")]
    VolumeNotFound {
        /// The app.
        app: String,
        /// The volume's id.
        id: String,
    },
    /// A token with this id exists.
    #[error("token {id} already exists")]
    TokenExists {
        /// The id.
        id: String,
    },
    /// Someone else holds the machine's lease.
    #[error("lease currently held by {owner}, expires at unix time {expires_at}")]
    LeaseHeld {
        /// Its owner.
        owner: String,
        /// Unix seconds.
        expires_at: i64,
    },
    /// No lease is held on the machine.
    #[error("lease not found on machine {id}; it expired or was released")]
    LeaseNotFound {
        /// The machine.
        id: String,
    },
    /// An edge's claim on issuing a certificate is no longer its own.
    #[error(
        "the claim on issuing {hostname}'s certificate was lost ({}); this edge stops issuing it and \
         leaves the result to the claim's holder, or to a later pass once the store answers again",
        match holder { Some(h) => format!("edge {h} holds it now"), None => "it expired or was removed".to_owned() }
    )]
    CertClaimLost {
        /// The hostname.
        hostname: String,
        /// The edge holding the claim now, if any.
        holder: Option<String>,
    },
}

impl ControlError {
    /// The API error a handler answers with: 422 `name_taken` for app names, 409 for leases and
    /// concurrent changes, 404 for a missing lease, 500 (safe message) for the rest.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::AppExists { name } => ApiError::name_taken(name),
            Self::MachineExists { .. }
            | Self::VolumeExists { .. }
            | Self::SnapshotExists { .. }
            | Self::TokenExists { .. }
            | Self::CertClaimLost { .. } => ApiError::conflict(self.to_string()),
            Self::LeaseHeld { owner, expires_at } => ApiError::lease_held(owner, *expires_at),
            Self::LeaseNotFound { id } => ApiError::not_found(format!("lease on machine {id}")),
            Self::VolumeNotFound { id, .. } => ApiError::not_found(format!("volume {id}")),
            Self::Store(StoreError::Conflict { .. }) => {
                ApiError::conflict("the resource was changed by another request at the same time; retry")
            }
            Self::Store(StoreError::InvalidKey { key, .. }) => {
                ApiError::bad_request(format!("invalid name {key:?}"))
            }
            Self::Store(_) => ApiError::internal(),
        }
    }
}

/// Typed records of the control plane over a [`Store`].
#[derive(Debug, Clone)]
pub struct ControlStore {
    store: Arc<dyn Store>,
}

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        key: key.to_owned(),
        source,
    })
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<Versioned<T>, StoreError> {
    let value = serde_json::from_slice(&kv.value).map_err(|source| StoreError::Decode {
        key: kv.key.clone(),
        source,
    })?;
    Ok(Versioned {
        value,
        revision: kv.mod_revision,
    })
}

fn parse_network(kv: &KeyValue) -> Result<u32, ControlError> {
    let text = String::from_utf8_lossy(&kv.value);
    Ok(text.trim().parse::<u32>().map_err(|e| StoreError::Decode {
        key: kv.key.clone(),
        source: serde::de::Error::custom(format!("not a network number: {e}")),
    })?)
}

fn unix_secs(ms: i64) -> i64 {
    ms.div_euclid(1000)
}

impl ControlStore {
    /// Typed access to `store`.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// The underlying key space (for watches and for other records such as releases).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<Versioned<T>>, StoreError> {
        self.store.get(key)?.as_ref().map(decode).transpose()
    }

    fn list<T: DeserializeOwned>(
        &self,
        prefix: &str,
        options: &RangeOptions,
    ) -> Result<Vec<Versioned<T>>, StoreError> {
        self.store
            .range(prefix, options)?
            .kvs
            .iter()
            .map(decode)
            .collect()
    }

    fn create<T: Serialize>(&self, key: &str, value: &T) -> Result<Option<Revision>, StoreError> {
        match self.store.put_if(key, encode(key, value)?, Expect::Absent, None) {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::Conflict { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates an app; [`ControlError::AppExists`] if the name is taken.
    pub fn create_app(&self, app: &App) -> Result<Revision, ControlError> {
        self.create(&keys::app(&app.name)?, app)?
            .ok_or_else(|| ControlError::AppExists {
                name: app.name.clone(),
            })
    }

    /// An app by name.
    pub fn get_app(&self, name: &str) -> Result<Option<Versioned<App>>, ControlError> {
        Ok(self.get(&keys::app(name)?)?)
    }

    /// Every app, by name.
    pub fn list_apps(&self) -> Result<Vec<Versioned<App>>, ControlError> {
        Ok(self.list(keys::APPS, &RangeOptions::default())?)
    }

    /// Replaces an app if it is still at `expect`.
    pub fn update_app(&self, app: &App, expect: Expect) -> Result<Revision, ControlError> {
        let key = keys::app(&app.name)?;
        Ok(self.store.put_if(&key, encode(&key, app)?, expect, None)?)
    }

    /// Deletes an app with every machine record, event, lease, secret, volume record and
    /// snapshot record of it, and its custom domains' certificate records with their issuance
    /// claims; `false` if there was no such app. (Delete the disks and snapshot copies on their
    /// hosts first: a record dropped here leaves nothing that names them.)
    pub fn delete_app(&self, name: &str) -> Result<bool, ControlError> {
        let key = keys::app(name)?;
        let mut txn = Txn::new()
            .expect(&key, Expect::Present)
            .then(Op::delete(key.clone()))
            .then(Op::DeletePrefix(keys::machines(name)?))
            .then(Op::DeletePrefix(format!("{}{name}/", keys::EVENTS)))
            .then(Op::DeletePrefix(format!("{}{name}/", keys::MACHINE_LEASES)))
            .then(Op::DeletePrefix(keys::secrets(name)?))
            .then(Op::DeletePrefix(keys::volumes(name)?))
            // Another app of the same name (another organization's) must not find them.
            .then(Op::DeletePrefix(keys::volume_snapshots(name)?))
            .then(Op::delete(keys::secrets_version(name)?));
        // Its custom domains (`/certs/{hostname}`, keyed by hostname, not by app): left behind,
        // they would keep routing to an app that is gone and block another app from adding them.
        // Claims on issuing them go too: a claim outliving its record would hold up the
        // hostname's next owner until it expired.
        for hostname in self.app_certs(name)? {
            txn = txn
                .then(Op::delete(keys::cert(&hostname)?))
                .then(Op::delete(keys::cert_claim(&hostname)?));
        }
        let resp = self.store.txn(txn)?;
        Ok(resp.succeeded)
    }

    /// The hostnames of the certificate records (custom domains) of app `name`.
    fn app_certs(&self, name: &str) -> Result<Vec<String>, ControlError> {
        #[derive(Deserialize)]
        struct Owner {
            app: String,
        }
        let mut out = Vec::new();
        for kv in self.store.range(keys::CERTS, &RangeOptions::default())?.kvs {
            if decode::<Owner>(&kv)?.value.app == name
                && let Some(hostname) = kv.key.strip_prefix(keys::CERTS)
            {
                out.push(hostname.to_owned());
            }
        }
        Ok(out)
    }

    /// The app's secrets and secrets version, read at one revision.
    pub fn secrets(&self, app: &str) -> Result<SecretsSnapshot, ControlError> {
        let version_key = keys::secrets_version(app)?;
        let prefix = keys::secrets(app)?;
        let mut out = SecretsSnapshot::default();
        // `/secrets/{app}` and `/secrets/{app}/…` in one read (other apps' keys are skipped).
        for kv in self.store.range(&version_key, &RangeOptions::default())?.kvs {
            if kv.key == version_key {
                let v: Versioned<SecretsVersion> = decode(&kv)?;
                out.version = v.value.version;
                out.revision = Some(v.revision);
            } else if kv.key.starts_with(&prefix) {
                let v: Versioned<SecretRecord> = decode(&kv)?;
                out.secrets.insert(v.value.name.clone(), v.value);
            }
        }
        Ok(out)
    }

    /// Applies `changes` (name → new record, or `None` to delete) to the app's secrets read as
    /// `base`, bumping the secrets version, in one transaction that also requires the app to
    /// exist. `Ok(None)` if the secrets (or the app) changed since `base` was read: read again and
    /// retry. Returns the new version.
    pub fn apply_secrets(
        &self,
        app: &str,
        base: &SecretsSnapshot,
        changes: Vec<(String, Option<SecretRecord>)>,
    ) -> Result<Option<u64>, ControlError> {
        let version_key = keys::secrets_version(app)?;
        let version = base.version.saturating_add(1);
        let mut txn = Txn::new()
            .expect(&keys::app(app)?, Expect::Present)
            .expect(
                &version_key,
                base.revision.map_or(Expect::Absent, Expect::Revision),
            )
            .then(Op::put(
                version_key.clone(),
                encode(&version_key, &SecretsVersion { version })?,
            ));
        for (name, record) in changes {
            let key = keys::secret(app, &name)?;
            txn = match record {
                Some(r) => {
                    let value = encode(&key, &r)?;
                    txn.then(Op::put(key, value))
                }
                None => txn.then(Op::delete(key)),
            };
        }
        Ok(self.store.txn(txn)?.succeeded.then_some(version))
    }

    /// Writes `records` (the same secrets with the same values, sealed again with another key)
    /// over the app's secrets read as `base`, without bumping the secrets version (no value
    /// changed, so machines are not out of date). `false` (nothing written) if the secrets or the
    /// app changed since `base` was read: every change bumps the version record, which the
    /// transaction compares. Read again and retry.
    pub fn reseal_secrets(
        &self,
        app: &str,
        base: &SecretsSnapshot,
        records: Vec<SecretRecord>,
    ) -> Result<bool, ControlError> {
        let version_key = keys::secrets_version(app)?;
        let mut txn = Txn::new().expect(&keys::app(app)?, Expect::Present).expect(
            &version_key,
            base.revision.map_or(Expect::Absent, Expect::Revision),
        );
        for r in records {
            let key = keys::secret(app, &r.name)?;
            let value = encode(&key, &r)?;
            txn = txn.then(Op::put(key, value));
        }
        Ok(self.store.txn(txn)?.succeeded)
    }

    /// Records a new machine; [`ControlError::MachineExists`] if the id is taken.
    pub fn create_machine(&self, record: &MachineRecord) -> Result<Revision, ControlError> {
        let id = record.machine.id.as_str();
        self.create(&keys::machine(&record.app, id)?, record)?
            .ok_or_else(|| ControlError::MachineExists {
                app: record.app.clone(),
                id: id.to_owned(),
            })
    }

    /// Writes a machine record if `expect` holds ([`StoreError::Conflict`] otherwise).
    pub fn put_machine(&self, record: &MachineRecord, expect: Expect) -> Result<Revision, ControlError> {
        let key = keys::machine(&record.app, record.machine.id.as_str())?;
        Ok(self.store.put_if(&key, encode(&key, record)?, expect, None)?)
    }

    /// A machine record.
    pub fn get_machine(&self, app: &str, id: &str) -> Result<Option<Versioned<MachineRecord>>, ControlError> {
        Ok(self.get(&keys::machine(app, id)?)?)
    }

    /// Every machine record of an app, by id.
    pub fn list_machines(&self, app: &str) -> Result<Vec<Versioned<MachineRecord>>, ControlError> {
        Ok(self.list(&keys::machines(app)?, &RangeOptions::default())?)
    }

    /// Deletes a machine record with its events and lease; `false` if there was none.
    pub fn delete_machine(&self, app: &str, id: &str) -> Result<bool, ControlError> {
        let key = keys::machine(app, id)?;
        let resp = self.store.txn(
            Txn::new()
                .expect(&key, Expect::Present)
                .then(Op::delete(key.clone()))
                .then(Op::DeletePrefix(keys::events(app, id)?))
                .then(Op::delete(keys::machine_lease(app, id)?)),
        )?;
        Ok(resp.succeeded)
    }

    /// Records a new volume; [`ControlError::VolumeExists`] if the id is taken.
    pub fn create_volume(&self, record: &VolumeRecord) -> Result<Revision, ControlError> {
        let id = record.volume.id.as_str();
        self.create(&keys::volume(&record.app, id)?, record)?
            .ok_or_else(|| ControlError::VolumeExists {
                app: record.app.clone(),
                id: id.to_owned(),
            })
    }

    /// Writes a volume record if `expect` holds ([`StoreError::Conflict`] otherwise).
    pub fn put_volume(&self, record: &VolumeRecord, expect: Expect) -> Result<Revision, ControlError> {
        let key = keys::volume(&record.app, record.volume.id.as_str())?;
        Ok(self.store.put_if(&key, encode(&key, record)?, expect, None)?)
    }

    /// A volume record.
    pub fn get_volume(&self, app: &str, id: &str) -> Result<Option<Versioned<VolumeRecord>>, ControlError> {
        Ok(self.get(&keys::volume(app, id)?)?)
    }

    /// Every volume record of an app, by id.
    pub fn list_volumes(&self, app: &str) -> Result<Vec<Versioned<VolumeRecord>>, ControlError> {
        Ok(self.list(&keys::volumes(app)?, &RangeOptions::default())?)
    }

    /// Deletes a volume record if `expect` holds ([`StoreError::Conflict`] otherwise); `false`
    /// if there was none.
    pub fn delete_volume(&self, app: &str, id: &str, expect: Expect) -> Result<bool, ControlError> {
        Ok(self.store.delete_if(&keys::volume(app, id)?, expect)?)
    }

    /// Records a new snapshot, in one transaction that requires its app and its volume's record
    /// to exist: [`ControlError::VolumeNotFound`] if either is gone (so a snapshot taken while
    /// its app is destroyed leaves no record behind), [`ControlError::SnapshotExists`] if the id
    /// is taken.
    pub fn create_snapshot(&self, record: &SnapshotRecord) -> Result<Revision, ControlError> {
        let key = keys::volume_snapshot(&record.app, record.id.as_str())?;
        let resp = self.store.txn(
            Txn::new()
                .expect(&keys::app(&record.app)?, Expect::Present)
                .expect(
                    &keys::volume(&record.app, record.volume_id.as_str())?,
                    Expect::Present,
                )
                .expect(&key, Expect::Absent)
                .then(Op::put(key.clone(), encode(&key, record)?))
                .or_else(Op::get(key.clone())),
        )?;
        if resp.succeeded {
            return Ok(resp.revision);
        }
        match resp.results.first() {
            Some(OpResult::Get(Some(_))) => Err(ControlError::SnapshotExists {
                app: record.app.clone(),
                id: record.id.to_string(),
            }),
            _ => Err(ControlError::VolumeNotFound {
                app: record.app.clone(),
                id: record.volume_id.to_string(),
            }),
        }
    }

    /// Writes a snapshot record if `expect` holds ([`StoreError::Conflict`] otherwise).
    pub fn put_snapshot(&self, record: &SnapshotRecord, expect: Expect) -> Result<Revision, ControlError> {
        let key = keys::volume_snapshot(&record.app, record.id.as_str())?;
        Ok(self.store.put_if(&key, encode(&key, record)?, expect, None)?)
    }

    /// A snapshot record.
    pub fn get_snapshot(
        &self,
        app: &str,
        id: &str,
    ) -> Result<Option<Versioned<SnapshotRecord>>, ControlError> {
        Ok(self.get(&keys::volume_snapshot(app, id)?)?)
    }

    /// Every snapshot record of an app (of all its volumes, destroyed ones included), by id.
    pub fn list_snapshots(&self, app: &str) -> Result<Vec<Versioned<SnapshotRecord>>, ControlError> {
        Ok(self.list(&keys::volume_snapshots(app)?, &RangeOptions::default())?)
    }

    /// Deletes a snapshot record if `expect` holds ([`StoreError::Conflict`] otherwise); `false`
    /// if there was none.
    pub fn delete_snapshot(&self, app: &str, id: &str, expect: Expect) -> Result<bool, ControlError> {
        Ok(self.store.delete_if(&keys::volume_snapshot(app, id)?, expect)?)
    }

    /// Appends an event (keyed by its id, a ULID, so keys sort by time).
    pub fn append_event(&self, app: &str, id: &str, event: &MachineEvent) -> Result<Revision, ControlError> {
        let key = keys::event(app, id, &event.id)?;
        Ok(self.store.put(&key, encode(&key, event)?)?)
    }

    /// The newest `limit` events of a machine, newest first.
    pub fn list_events(&self, app: &str, id: &str, limit: usize) -> Result<Vec<MachineEvent>, ControlError> {
        let options = RangeOptions {
            limit: Some(limit),
            descending: true,
            after: None,
        };
        Ok(self
            .list::<MachineEvent>(&keys::events(app, id)?, &options)?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    /// The machine's lease, if one is held.
    pub fn get_lease(&self, app: &str, id: &str) -> Result<Option<Lease>, ControlError> {
        Ok(self
            .get::<Lease>(&keys::machine_lease(app, id)?)?
            .map(|v| v.value))
    }

    /// Whether a mutating call may go ahead: no lease is held, or `nonce` is its nonce.
    /// [`ControlError::LeaseHeld`] otherwise (the API's 409).
    pub fn check_lease(&self, app: &str, id: &str, nonce: Option<&str>) -> Result<(), ControlError> {
        match self.get_lease(app, id)? {
            Some(l) if Some(l.nonce.as_str()) != nonce => Err(ControlError::LeaseHeld {
                owner: l.owner,
                expires_at: l.expires_at,
            }),
            _ => Ok(()),
        }
    }

    /// Takes a new lease on a machine; [`ControlError::LeaseHeld`] while someone holds one.
    /// The lease record disappears by itself when its TTL runs out.
    pub fn acquire_lease(
        &self,
        app: &str,
        id: &str,
        req: &MachineLeaseRequest,
    ) -> Result<Lease, ControlError> {
        let key = keys::machine_lease(app, id)?;
        let lease = |grant: &LeaseGrant| Lease {
            nonce: req.nonce.clone(),
            expires_at: unix_secs(grant.expires_at_ms),
            owner: req.owner.clone(),
            description: req.description.clone(),
            version: req.version.clone(),
        };
        match self.put_on_new_lease(&key, req.ttl, &[(key.as_str(), Expect::Absent)], |g| {
            encode(&key, &lease(g))
        })? {
            LeasedPut::Written(grant, _) => Ok(lease(&grant)),
            LeasedPut::Refused {
                current: Some(kv), ..
            } => {
                let held: Versioned<Lease> = decode(&kv)?;
                Err(ControlError::LeaseHeld {
                    owner: held.value.owner,
                    expires_at: held.value.expires_at,
                })
            }
            // Released between the two steps: the caller may simply retry.
            LeasedPut::Refused {
                current: None,
                revision,
            } => Err(StoreError::Conflict {
                key,
                expected: Expect::Absent,
                found: revision,
            }
            .into()),
        }
    }

    /// Writes `key` on a fresh store lease of `ttl` (its value made from the grant) if every
    /// expectation of `expects` holds, in one transaction. The lease is revoked again when the
    /// write does not happen: nothing is left behind either way.
    fn put_on_new_lease(
        &self,
        key: &str,
        ttl: Duration,
        expects: &[(&str, Expect)],
        value: impl FnOnce(&LeaseGrant) -> Result<Vec<u8>, StoreError>,
    ) -> Result<LeasedPut, StoreError> {
        let grant = self.store.grant_lease(ttl)?;
        let attempt = value(&grant).and_then(|value| {
            let txn = expects
                .iter()
                .fold(Txn::new(), |txn, (k, e)| txn.expect(k, *e))
                .then(Op::Put {
                    key: key.to_owned(),
                    value,
                    lease: Some(grant.id),
                })
                .or_else(Op::get(key));
            self.store.txn(txn)
        });
        let resp = match attempt {
            Ok(resp) if resp.succeeded => return Ok(LeasedPut::Written(grant, resp.revision)),
            Ok(resp) => resp,
            Err(e) => {
                let _ = self.store.revoke_lease(grant.id);
                return Err(e);
            }
        };
        self.store.revoke_lease(grant.id)?;
        let current = match resp.results.into_iter().next() {
            Some(OpResult::Get(kv)) => kv,
            _ => None,
        };
        Ok(LeasedPut::Refused {
            current,
            revision: resp.revision,
        })
    }

    fn held_lease(
        &self,
        app: &str,
        id: &str,
        nonce: &str,
    ) -> Result<(String, Versioned<Lease>, LeaseId), ControlError> {
        let key = keys::machine_lease(app, id)?;
        let Some(kv) = self.store.get(&key)? else {
            return Err(ControlError::LeaseNotFound { id: id.to_owned() });
        };
        let held: Versioned<Lease> = decode(&kv)?;
        if held.value.nonce != nonce {
            return Err(ControlError::LeaseHeld {
                owner: held.value.owner,
                expires_at: held.value.expires_at,
            });
        }
        let Some(store_lease) = kv.lease else {
            return Err(ControlError::LeaseNotFound { id: id.to_owned() });
        };
        Ok((key, held, store_lease))
    }

    /// Extends the lease whose nonce is `nonce` to `ttl` from now.
    pub fn refresh_lease(
        &self,
        app: &str,
        id: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<Lease, ControlError> {
        let (key, held, old) = self.held_lease(app, id, nonce)?;
        let grant = self.store.grant_lease(ttl)?;
        let lease = Lease {
            expires_at: unix_secs(grant.expires_at_ms),
            ..held.value
        };
        let value = encode(&key, &lease)?;
        let moved = self
            .store
            .put_if(&key, value, Expect::Revision(held.revision), Some(grant.id));
        if let Err(e) = moved {
            let _ = self.store.revoke_lease(grant.id);
            return Err(e.into());
        }
        // The record now hangs on the new lease; ending the old one deletes nothing.
        self.store.revoke_lease(old)?;
        Ok(lease)
    }

    /// Releases the lease whose nonce is `nonce`.
    pub fn release_lease(&self, app: &str, id: &str, nonce: &str) -> Result<(), ControlError> {
        let (_, _, store_lease) = self.held_lease(app, id, nonce)?;
        self.store.revoke_lease(store_lease)?;
        Ok(())
    }

    /// Claims issuing `hostname`'s certificate for the edge named `owner`, for `ttl`, if its
    /// record (`/certs/{hostname}`) is still at `record`, the revision the edge read, and no other
    /// edge holds a claim. The claim (`/cert-claims/{hostname}`, [`CertClaim`]) hangs on a store
    /// lease: an edge that dies while issuing blocks the hostname for `ttl` at most. A claim of
    /// the same `owner` (left by an earlier run of that edge) is taken over, so edge names must
    /// be unique. Release it with [`Self::release_cert_claim`] once the result is written.
    pub fn claim_cert(
        &self,
        hostname: &str,
        owner: &str,
        ttl: Duration,
        record: Revision,
    ) -> Result<CertClaimOutcome, ControlError> {
        let key = keys::cert_claim(hostname)?;
        let record_key = keys::cert(hostname)?;
        let claim = |grant: &LeaseGrant| CertClaim {
            owner: owner.to_owned(),
            expires_at_ms: grant.expires_at_ms,
        };
        let mut expect = Expect::Absent;
        let mut earlier = None;
        loop {
            let put = self.put_on_new_lease(
                &key,
                ttl,
                &[
                    (record_key.as_str(), Expect::Revision(record)),
                    (key.as_str(), expect),
                ],
                |g| encode(&key, &claim(g)),
            )?;
            let kv = match put {
                LeasedPut::Written(grant, revision) => {
                    // Our earlier run's claim now hangs on the new lease: ending the old one
                    // deletes nothing.
                    if let Some(old) = earlier {
                        let _ = self.store.revoke_lease(old);
                    }
                    return Ok(CertClaimOutcome::Claimed(HeldCertClaim {
                        hostname: hostname.to_owned(),
                        lease: grant.id,
                        claim: claim(&grant),
                        revision,
                    }));
                }
                LeasedPut::Refused {
                    current: Some(kv), ..
                } => kv,
                // No claim, so the record is what changed.
                LeasedPut::Refused { current: None, .. } => {
                    return Ok(CertClaimOutcome::NotClaimed { holder: None });
                }
            };
            let held: Versioned<CertClaim> = decode(&kv)?;
            if held.value.owner != owner {
                return Ok(CertClaimOutcome::NotClaimed {
                    holder: Some(held.value),
                });
            }
            if expect == Expect::Revision(held.revision) {
                // Our own claim was not what failed the write: the record changed.
                return Ok(CertClaimOutcome::NotClaimed { holder: None });
            }
            expect = Expect::Revision(held.revision);
            earlier = kv.lease;
        }
    }

    /// The claim on issuing `hostname`'s certificate, if an edge holds one.
    pub fn cert_claim(&self, hostname: &str) -> Result<Option<CertClaim>, ControlError> {
        Ok(self
            .get::<CertClaim>(&keys::cert_claim(hostname)?)?
            .map(|v| v.value))
    }

    /// Keeps a claim taken with [`Self::claim_cert`] alive: its store lease is kept alive (its
    /// TTL again from now) and the claim rewritten on it with the new `expires_at_ms`, only while
    /// the claim key is still at `held.revision` (`held` is updated). Call it at a fraction of the
    /// TTL while issuing. [`ControlError::CertClaimLost`] once the claim is no longer this edge's
    /// (its lease ended, it was removed with its record, or another edge claimed the hostname
    /// after it expired); other errors are the store's and leave the claim as it was.
    pub fn renew_cert_claim(&self, held: &mut HeldCertClaim) -> Result<(), ControlError> {
        let lost = |holder: Option<CertClaim>| ControlError::CertClaimLost {
            hostname: held.hostname.clone(),
            holder: holder.map(|c| c.owner),
        };
        let grant = match self.store.keep_alive(held.lease) {
            Ok(grant) => grant,
            Err(StoreError::LeaseNotFound { .. }) => {
                let holder = self.cert_claim(&held.hostname)?;
                return Err(lost(holder));
            }
            Err(e) => return Err(e.into()),
        };
        let key = keys::cert_claim(&held.hostname)?;
        let claim = CertClaim {
            owner: held.claim.owner.clone(),
            expires_at_ms: grant.expires_at_ms,
        };
        let rewritten = self.store.txn(
            Txn::new()
                .expect(&key, Expect::Revision(held.revision))
                .then(Op::Put {
                    key: key.clone(),
                    value: encode(&key, &claim)?,
                    lease: Some(held.lease),
                })
                .or_else(Op::get(key.clone())),
        );
        let resp = match rewritten {
            Ok(resp) => resp,
            // The lease ran out between the two calls.
            Err(StoreError::LeaseNotFound { .. }) => {
                let holder = self.cert_claim(&held.hostname)?;
                return Err(lost(holder));
            }
            Err(e) => return Err(e.into()),
        };
        if !resp.succeeded {
            let holder = match resp.results.into_iter().next() {
                Some(OpResult::Get(Some(kv))) => Some(decode::<CertClaim>(&kv)?.value),
                _ => None,
            };
            return Err(lost(holder));
        }
        held.claim = claim;
        held.revision = resp.revision;
        Ok(())
    }

    /// Ends a claim taken with [`Self::claim_cert`] (its key goes with its lease). A claim that
    /// expired meanwhile, or was taken over, is left alone.
    pub fn release_cert_claim(&self, held: &HeldCertClaim) -> Result<(), ControlError> {
        self.store.revoke_lease(held.lease)?;
        Ok(())
    }

    /// Deletes `hostname`'s certificate record if `expect` holds ([`StoreError::Conflict`]
    /// otherwise), with any claim on issuing it; returns whether the record existed.
    pub fn delete_cert(&self, hostname: &str, expect: Expect) -> Result<bool, ControlError> {
        let key = keys::cert(hostname)?;
        let resp = self.store.txn(
            Txn::new()
                .expect(&key, expect)
                .then(Op::delete(key.clone()))
                .then(Op::delete(keys::cert_claim(hostname)?))
                .or_else(Op::get(key.clone())),
        )?;
        if resp.succeeded {
            return Ok(matches!(
                resp.results.first(),
                Some(OpResult::Delete { deleted }) if *deleted > 0
            ));
        }
        let found = match resp.results.first() {
            Some(OpResult::Get(Some(kv))) => kv.mod_revision,
            _ => Revision::ZERO,
        };
        Err(StoreError::Conflict {
            key,
            expected: expect,
            found,
        }
        .into())
    }

    /// The private network number of organization `slug` (its 6PN prefix), allocated on first
    /// use: numbers start at 1 (0 is the platform's) and are never reused, so two organizations
    /// never share a network.
    pub fn org_network(&self, slug: &str) -> Result<u32, ControlError> {
        let key = keys::org_network(slug)?;
        loop {
            if let Some(kv) = self.store.get(&key)? {
                return parse_network(&kv);
            }
            let next = self.store.get(keys::ORG_NETWORKS_NEXT)?;
            let (number, expect) = match &next {
                Some(kv) => (parse_network(kv)?, Expect::Revision(kv.mod_revision)),
                None => (1, Expect::Absent),
            };
            let following = number.checked_add(1).ok_or_else(|| StoreError::Decode {
                key: keys::ORG_NETWORKS_NEXT.to_owned(),
                source: serde::de::Error::custom("all organization network numbers are taken"),
            })?;
            let resp = self.store.txn(
                Txn::new()
                    .expect(keys::ORG_NETWORKS_NEXT, expect)
                    .expect(&key, Expect::Absent)
                    .then(Op::put(keys::ORG_NETWORKS_NEXT, following.to_string()))
                    .then(Op::put(key.clone(), number.to_string())),
            )?;
            if resp.succeeded {
                return Ok(number);
            }
            // Another request allocated at the same time: look again.
        }
    }

    /// Records a new token; [`ControlError::TokenExists`] if the id is taken.
    pub fn create_token(&self, token: &TokenRecord) -> Result<Revision, ControlError> {
        self.create(&keys::token(&token.id)?, token)?
            .ok_or_else(|| ControlError::TokenExists { id: token.id.clone() })
    }

    /// A token by id.
    pub fn get_token(&self, id: &str) -> Result<Option<TokenRecord>, ControlError> {
        Ok(self.get::<TokenRecord>(&keys::token(id)?)?.map(|v| v.value))
    }

    /// Every token, by id.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, ControlError> {
        Ok(self
            .list::<TokenRecord>(keys::TOKENS, &RangeOptions::default())?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }

    /// Deletes a token; `false` if there was none.
    pub fn delete_token(&self, id: &str) -> Result<bool, ControlError> {
        Ok(self.store.delete(&keys::token(id)?)?)
    }
}
