//! The agent's secrets keys: what seals the app secrets it keeps per machine version, and
//! re-sealing them with the current key after a rotation.
//!
//! The agent seals with the current key of its [`Keyring`] (by default the key file
//! `<db dir>/agent-secrets.key` alone; its caller may add previous keys, see
//! [`crate::AgentConfig::secrets_keys`]). When the agent opens, before it recovers anything,
//! [`reseal`] goes through every sealed value it holds that the current key did not seal (a
//! previous key did, or it records no key id): the secrets kept for a machine's version
//! (`machine_secrets`) and the copy an unfinished create or update carries in its parameters are
//! opened and sealed again with the current key; the copy a finished operation still carries is
//! forgotten (it is never read again). A value no configured key opens is left as it is and
//! reported (its error names the key id it needs and the caller's hint).
//!
//! Nothing else runs while it does (the agent holds its database's lock and has started no
//! thread yet), so the writes need no compare-and-swap.

use aloft_api::MachineId;
use aloft_secretbox::{Keyring, Sealed};

use crate::db::Db;
use crate::error::AgentError;
use crate::model::{OpStatus, SealedSecrets};

/// What the agent's re-sealing did when it opened ([`crate::Agent::secrets_resealed`]). Counts
/// and machine ids only: never a value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecretsReseal {
    /// Sealed values sealed again with the current key: a machine version's secrets, or the
    /// copy an unfinished create or update carries.
    pub resealed: usize,
    /// Machines at least one of whose values was sealed again.
    pub machines: usize,
    /// Copies of secrets in finished operations that were sealed with another key: forgotten,
    /// as nothing reads them again.
    pub forgotten: usize,
    /// Values no configured key opens, each as `machine ID (version V): why` (the reason names
    /// the key id the value needs): left as they are; the machine cannot boot that version
    /// until the key is given.
    pub unreadable: Vec<String>,
}

/// The associated data of a version's sealed secrets: they open only for that machine and
/// version.
pub(crate) fn secrets_ad(id: &MachineId, version: &str) -> Vec<u8> {
    format!("aloft-agent-secrets\0{id}\0{version}").into_bytes()
}

/// `sealed` (of `version` of machine `id`) sealed again with the current key.
fn reseal_one(
    keys: &Keyring,
    id: &MachineId,
    version: &str,
    sealed: &SealedSecrets,
) -> Result<Result<SealedSecrets, String>, AgentError> {
    let ad = secrets_ad(id, version);
    let plain = match keys.open(&sealed.sealed, &ad) {
        Ok(plain) => plain,
        Err(e) => return Ok(Err(format!("machine {id} (version {version}): {e}"))),
    };
    let again: Sealed = keys.seal(&plain, &ad)?;
    Ok(Ok(SealedSecrets {
        version: sealed.version,
        sealed: again,
    }))
}

/// Seals every value the agent holds that `keys`' current key did not seal again with it (see
/// the module docs).
pub(crate) fn reseal(db: &Db, keys: &Keyring) -> Result<SecretsReseal, AgentError> {
    let current = keys.current().id().to_string();
    let mut report = SecretsReseal::default();
    let mut machines = std::collections::BTreeSet::new();
    for (id, version, sealed) in db.machine_secrets_not_sealed_by(&current)? {
        if !keys.needs_reseal(&sealed.sealed) {
            continue;
        }
        match reseal_one(keys, &id, &version, &sealed)? {
            Ok(again) => {
                db.write(|tx| tx.put_secrets(&id, &version, Some(&again)))?;
                report.resealed += 1;
                machines.insert(id);
            }
            Err(why) => report.unreadable.push(why),
        }
    }
    for mut op in db.ops_with_secrets_not_sealed_by(&current)? {
        let Some(sealed) = op.params.secrets.clone() else {
            continue;
        };
        if !keys.needs_reseal(&sealed.sealed) {
            continue;
        }
        if !matches!(op.status, OpStatus::Running | OpStatus::Undoing) {
            op.params.secrets = None;
            db.write(|tx| tx.set_op_params(&op.id, &op.params))?;
            report.forgotten += 1;
            continue;
        }
        // A create or update seals its secrets for the version it makes.
        let version = op.params.new_version.clone().unwrap_or_default();
        match reseal_one(keys, &op.machine, &version, &sealed)? {
            Ok(again) => {
                op.params.secrets = Some(again);
                db.write(|tx| tx.set_op_params(&op.id, &op.params))?;
                report.resealed += 1;
                machines.insert(op.machine.clone());
            }
            Err(why) => report.unreadable.push(why),
        }
    }
    report.machines = machines.len();
    Ok(report)
}
