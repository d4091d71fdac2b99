//! [`HostNetworks`]: machine id → network, for an agent. Combines the [`Plan`], the
//! [`SlotAllocator`] and [`HostNet`], and keeps [`NetState`] in a JSON file written (atomically)
//! before the host is changed, so a crash at any point is repaired by the next `attach`, `detach`
//! or `reconcile`. An agent that keeps its state elsewhere (its SQLite) can hold a [`NetState`]
//! itself and call [`NetState::assign`] / [`NetState::release`] and [`HostNet`] directly.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

use crate::plan::{MachineNet, Plan, PlanError, SlotAllocator, SlotState};
use crate::{HostNet, NetError, ReconcileReport};

/// What is persisted: the allocator's state and each machine's network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// Slot allocation.
    pub slots: SlotState,
    /// Machine id → its network.
    pub machines: BTreeMap<String, MachineNet>,
}

impl NetState {
    /// The network of `machine` in `org`: the one it has, or one in a new slot. Fails when the
    /// pool is exhausted or the machine has its network in another organization; then the state
    /// is unchanged.
    pub fn assign(&mut self, plan: &Plan, machine: &str, org: u32) -> Result<MachineNet, NetError> {
        if let Some(m) = self.machines.get(machine) {
            if m.org != org {
                return Err(NetError::OrgMismatch {
                    machine: machine.to_owned(),
                    has: m.org,
                    asked: org,
                });
            }
            return Ok(m.clone());
        }
        let mut slots = SlotAllocator::new(plan.max_slot(), self.slots.clone())?;
        let slot = slots.allocate(machine)?;
        let m = plan.machine(org, slot)?;
        self.slots = slots.state().clone();
        self.machines.insert(machine.to_owned(), m.clone());
        Ok(m)
    }

    /// Forgets `machine`'s network and frees its slot; returns what it had.
    pub fn release(&mut self, plan: &Plan, machine: &str) -> Result<Option<MachineNet>, PlanError> {
        let Some(m) = self.machines.remove(machine) else {
            return Ok(None);
        };
        let mut slots = SlotAllocator::new(plan.max_slot(), self.slots.clone())?;
        slots.free(machine);
        self.slots = slots.state().clone();
        Ok(Some(m))
    }
}

/// File-backed machine networks on one host. Methods block; one at a time.
#[derive(Debug)]
pub struct HostNetworks {
    net: HostNet,
    path: PathBuf,
    state: Mutex<NetState>,
}

impl HostNetworks {
    /// Loads the state from `path` (none yet: empty) and checks it against the plan. Changes
    /// nothing on the host: call [`Self::reconcile`] at start.
    pub fn open(net: HostNet, path: impl Into<PathBuf>) -> Result<Self, NetError> {
        let path = path.into();
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<NetState>(&bytes).map_err(|e| NetError::StateParse {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => NetState::default(),
            Err(source) => return Err(NetError::State { path, source }),
        };
        SlotAllocator::new(net.plan().max_slot(), state.slots.clone())?;
        for m in state.machines.values() {
            m.validate()?;
        }
        Ok(Self {
            net,
            path,
            state: Mutex::new(state),
        })
    }

    /// The machine's network in `org`, created if needed (and repaired if it was half made).
    /// Idempotent. On failure nothing is left: no tap, no rule, no slot.
    pub fn attach(&self, machine: &str, org: u32) -> Result<MachineNet, NetError> {
        let mut state = self.lock();
        let mut next = state.clone();
        let m = next.assign(self.net.plan(), machine, org)?;
        let new = next != *state;
        if new {
            save(&self.path, &next)?;
            *state = next;
        }
        if let Err(e) = self.net.ensure_machine(&m) {
            if new {
                let _ = self.net.remove_machine(&m.tap);
                let mut back = state.clone();
                if back.release(self.net.plan(), machine).is_ok() && save(&self.path, &back).is_ok() {
                    *state = back;
                }
            }
            return Err(e);
        }
        Ok(m)
    }

    /// Removes the machine's network and frees its slot. Succeeds if it has none.
    pub fn detach(&self, machine: &str) -> Result<(), NetError> {
        let mut state = self.lock();
        let Some(m) = state.machines.get(machine).cloned() else {
            return Ok(());
        };
        self.net.remove_machine(&m.tap)?;
        let mut next = state.clone();
        next.release(self.net.plan(), machine)?;
        save(&self.path, &next)?;
        *state = next;
        Ok(())
    }

    /// The machine's network, if it has one.
    pub fn get(&self, machine: &str) -> Option<MachineNet> {
        self.lock().machines.get(machine).cloned()
    }

    /// Machines that have a network here.
    pub fn attached(&self) -> Vec<String> {
        self.lock().machines.keys().cloned().collect()
    }

    /// [`HostNet::reconcile`] against the recorded machines (after an agent start or a crash).
    pub fn reconcile(&self) -> Result<ReconcileReport, NetError> {
        let state = self.lock();
        let expected: Vec<MachineNet> = state.machines.values().cloned().collect();
        self.net.reconcile(&expected)
    }

    /// A copy of the state.
    pub fn state(&self) -> NetState {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Writes `state` to `path` atomically (temporary file, fsync, rename).
fn save(path: &Path, state: &NetState) -> Result<(), NetError> {
    let err = |source| NetError::State {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(state).map_err(|e| err(std::io::Error::other(e)))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(&json).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanConfig;

    #[test]
    fn assign_is_idempotent_release_frees_and_orgs_do_not_change() {
        let plan = Plan::new(&PlanConfig::new(1)).unwrap();
        let mut s = NetState::default();
        let a = s.assign(&plan, "m-a", 1).unwrap();
        let b = s.assign(&plan, "m-b", 2).unwrap();
        assert_ne!(a.slot, b.slot);
        assert_eq!(s.assign(&plan, "m-a", 1).unwrap(), a);
        let e = s.assign(&plan, "m-a", 2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "machine m-a has its network in org 1, not 2: detach it first"
        );
        assert_eq!(s.release(&plan, "m-a").unwrap(), Some(a.clone()));
        assert_eq!(s.release(&plan, "m-a").unwrap(), None);
        assert!(!s.slots.used.contains_key(&a.slot));
        assert_eq!(s.machines.len(), 1);
    }

    #[test]
    fn exhaustion_changes_nothing() {
        let mut c = PlanConfig::new(1);
        c.ipv4_pool = "10.0.0.0/30".parse().unwrap();
        let plan = Plan::new(&c).unwrap();
        let mut s = NetState::default();
        s.assign(&plan, "one", 1).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.assign(&plan, "two", 1),
            Err(NetError::Plan(PlanError::Exhausted { max_slot: 1 }))
        ));
        assert_eq!(s, before);
    }

    #[test]
    fn state_is_saved_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("net.json");
        let plan = Plan::new(&PlanConfig::new(1)).unwrap();
        let mut s = NetState::default();
        s.assign(&plan, "m1", 3).unwrap();
        save(&path, &s).unwrap();
        let back: NetState = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(!dir.path().join("net.json.tmp").exists());

        std::fs::write(&path, "{ not json").unwrap();
        let net = HostNet::new(plan);
        let e = HostNetworks::open(net, &path).unwrap_err();
        assert!(e.to_string().contains("net.json"), "{e}");
    }
}
