//! [`ControlStore`]: typed control-plane records over any [`Store`], with the layout of
//! [`crate::keys`]. Records are JSON; every read returns the record's revision so updates can be
//! compare-and-swap.

use std::sync::Arc;
use std::time::Duration;

use aloft_api::{ApiError, App, Lease, Machine, MachineEvent};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{Expect, KeyValue, LeaseId, Op, RangeOptions, Revision, Store, StoreError, Txn, keys};

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
/// never in plaintext. `nonce` and `ciphertext` are base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The secret's name.
    pub name: String,
    /// The AEAD nonce, base64.
    pub nonce: String,
    /// The sealed value with its tag, base64.
    pub ciphertext: String,
    /// Hex SHA-256 of the value (what the API shows).
    pub digest: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("digest", &self.digest)
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
}

impl ControlError {
    /// The API error a handler answers with: 422 `name_taken` for app names, 409 for leases and
    /// concurrent changes, 404 for a missing lease, 500 (safe message) for the rest.
    pub fn to_api(&self) -> ApiError {
        match self {
            Self::AppExists { name } => ApiError::name_taken(name),
            Self::MachineExists { .. } | Self::TokenExists { .. } => ApiError::conflict(self.to_string()),
            Self::LeaseHeld { owner, expires_at } => ApiError::lease_held(owner, *expires_at),
            Self::LeaseNotFound { id } => ApiError::not_found(format!("lease on machine {id}")),
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

    /// Deletes an app with every machine record, event, lease and secret of it; `false` if there
    /// was no such app.
    pub fn delete_app(&self, name: &str) -> Result<bool, ControlError> {
        let key = keys::app(name)?;
        let mut txn = Txn::new()
            .expect(&key, Expect::Present)
            .then(Op::delete(key.clone()))
            .then(Op::DeletePrefix(keys::machines(name)?))
            .then(Op::DeletePrefix(format!("{}{name}/", keys::EVENTS)))
            .then(Op::DeletePrefix(format!("{}{name}/", keys::MACHINE_LEASES)))
            .then(Op::DeletePrefix(keys::secrets(name)?))
            .then(Op::delete(keys::secrets_version(name)?));
        // Its custom domains (`/certs/{hostname}`, keyed by hostname, not by app): left behind,
        // they would keep routing to an app that is gone and block another app from adding them.
        for cert in self.app_certs(name)? {
            txn = txn.then(Op::delete(cert));
        }
        let resp = self.store.txn(txn)?;
        Ok(resp.succeeded)
    }

    /// The keys of the certificate records (custom domains) of app `name`.
    fn app_certs(&self, name: &str) -> Result<Vec<String>, ControlError> {
        #[derive(Deserialize)]
        struct Owner {
            app: String,
        }
        let mut out = Vec::new();
        for kv in self.store.range(keys::CERTS, &RangeOptions::default())?.kvs {
            if decode::<Owner>(&kv)?.value.app == name {
                out.push(kv.key);
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
        let grant = self.store.grant_lease(req.ttl)?;
        let lease = Lease {
            nonce: req.nonce.clone(),
            expires_at: unix_secs(grant.expires_at_ms),
            owner: req.owner.clone(),
            description: req.description.clone(),
            version: req.version.clone(),
        };
        let put = self.store.txn(
            Txn::new()
                .expect(&key, Expect::Absent)
                .then(Op::Put {
                    key: key.clone(),
                    value: encode(&key, &lease)?,
                    lease: Some(grant.id),
                })
                .or_else(Op::get(key.clone())),
        );
        let resp = match put {
            Ok(resp) => resp,
            Err(e) => {
                let _ = self.store.revoke_lease(grant.id);
                return Err(e.into());
            }
        };
        if resp.succeeded {
            return Ok(lease);
        }
        self.store.revoke_lease(grant.id)?;
        match resp.results.first() {
            Some(crate::OpResult::Get(Some(kv))) => {
                let held: Versioned<Lease> = decode(kv)?;
                Err(ControlError::LeaseHeld {
                    owner: held.value.owner,
                    expires_at: held.value.expires_at,
                })
            }
            // Released between the two steps: the caller may simply retry.
            _ => Err(StoreError::Conflict {
                key,
                expected: Expect::Absent,
                found: resp.revision,
            }
            .into()),
        }
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
