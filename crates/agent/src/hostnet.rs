//! [`HostNetwork`]: machines' networks on `aloft-net` (ADR 0007): a slot per machine from
//! `SlotAllocator`, its state persisted (written and fsynced) *before* the tap is made, so a
//! crashed agent gets the same slot — hence the same tap, MAC and addresses — for the same machine.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aloft_api::MachineId;
use aloft_net::{HostNet, MachineNet, NetError, SlotAllocator, SlotState};
use serde::{Deserialize, Serialize};

use crate::driver::{NetInfo, Network, NetworkError};

/// What is persisted: the allocator's state and each machine's organization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    slots: SlotState,
    orgs: BTreeMap<String, u32>,
}

/// Machines' networks through `aloft-net`'s [`HostNet`]. Needs `CAP_NET_ADMIN` and `nft`.
#[derive(Debug)]
pub struct HostNetwork {
    host: HostNet,
    netns: Option<PathBuf>,
    path: PathBuf,
    state: Mutex<(SlotAllocator, BTreeMap<String, u32>)>,
}

fn failed(op: &'static str, machine: &str, e: &dyn std::fmt::Display) -> NetworkError {
    NetworkError::Failed {
        op,
        machine: machine.to_owned(),
        message: e.to_string(),
    }
}

impl HostNetwork {
    /// Opens the state at `state_path` (created on first use), installs the host's base network
    /// ([`HostNet::setup`]) and reconciles the taps with the state. `netns`: the namespace
    /// `host` works in, which QEMU must join too (`None`: the agent's own).
    pub fn open(host: HostNet, state_path: &Path, netns: Option<PathBuf>) -> Result<Self, NetworkError> {
        let state: State = match fs::read(state_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| failed("open", "-", &e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(failed("open", "-", &e)),
        };
        let alloc =
            SlotAllocator::new(host.plan().max_slot(), state.slots).map_err(|e| failed("open", "-", &e))?;
        host.setup().map_err(|e| failed("set up", "-", &e))?;
        let me = Self {
            host,
            netns,
            path: state_path.to_owned(),
            state: Mutex::new((alloc, state.orgs)),
        };
        me.reconcile()?;
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (SlotAllocator, BTreeMap<String, u32>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn expected(&self, alloc: &SlotAllocator, orgs: &BTreeMap<String, u32>) -> Vec<MachineNet> {
        alloc
            .state()
            .used
            .iter()
            .filter_map(|(slot, owner)| {
                let org = orgs.get(owner).copied()?;
                self.host.plan().machine(org, *slot).ok()
            })
            .collect()
    }

    fn reconcile(&self) -> Result<(), NetworkError> {
        let g = self.lock();
        let expected = self.expected(&g.0, &g.1);
        drop(g);
        self.host
            .reconcile(&expected)
            .map(drop)
            .map_err(|e| failed("reconcile", "-", &e))
    }

    fn persist(&self, alloc: &SlotAllocator, orgs: &BTreeMap<String, u32>) -> Result<(), NetworkError> {
        let state = State {
            slots: alloc.state().clone(),
            orgs: orgs.clone(),
        };
        let json = serde_json::to_vec_pretty(&state).map_err(|e| failed("persist", "-", &e))?;
        let tmp = self.path.with_extension("tmp");
        fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(&json)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, &self.path))
            .map_err(|e| failed("persist", "-", &e))
    }

    fn info(&self, m: &MachineNet) -> NetInfo {
        NetInfo {
            tap: Some(m.tap.clone()),
            mac: Some(m.mac.clone()),
            netns: self.netns.clone(),
            private_ip: m.ip6.to_string(),
            net_config: Some(m.net_config()),
            dns: m.dns_config(),
            etc_hosts: m.etc_hosts(),
        }
    }
}

impl Network for HostNetwork {
    fn attach(&self, id: &MachineId, org: u32) -> Result<NetInfo, NetworkError> {
        let mut g = self.lock();
        let (alloc, orgs) = &mut *g;
        let slot = alloc
            .allocate(id.as_str())
            .map_err(|e| failed("attach", id.as_str(), &e))?;
        let org = *orgs.entry(id.to_string()).or_insert(org);
        self.persist(alloc, orgs)?;
        let m = self
            .host
            .plan()
            .machine(org, slot)
            .map_err(|e| failed("attach", id.as_str(), &e))?;
        match self.host.add_machine(&m) {
            Ok(()) => {}
            // Made before a crash: bring it (and every other tap) in line with the state.
            Err(NetError::TapExists { .. }) => {
                let expected = self.expected(alloc, orgs);
                self.host
                    .reconcile(&expected)
                    .map_err(|e| failed("attach", id.as_str(), &e))?;
            }
            Err(e) => return Err(failed("attach", id.as_str(), &e)),
        }
        Ok(self.info(&m))
    }

    fn detach(&self, id: &MachineId) -> Result<(), NetworkError> {
        let mut g = self.lock();
        let (alloc, orgs) = &mut *g;
        let Some(slot) = alloc.slot_of(id.as_str()) else {
            return Ok(());
        };
        self.host
            .remove_machine(&format!("aloft-m{slot}"))
            .map_err(|e| failed("detach", id.as_str(), &e))?;
        alloc.free(id.as_str());
        orgs.remove(id.as_str());
        self.persist(alloc, orgs)
    }

    fn attached(&self) -> Result<Vec<MachineId>, NetworkError> {
        let g = self.lock();
        Ok(g.0
            .state()
            .used
            .values()
            .filter_map(|owner| owner.parse().ok())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use aloft_net::{Namespace, Plan, PlanConfig};

    use super::*;

    #[test]
    #[cfg_attr(
        not(feature = "vm-tests"),
        ignore = "creates network namespaces and taps (root); enable feature vm-tests"
    )]
    fn slots_persist_and_taps_follow_them() {
        let ns = aloft_testkit::NetNs::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("net.json");
        let host = || {
            HostNet::new(Plan::new(&PlanConfig::new(1)).unwrap()).with_namespace(Namespace::Path(ns.path()))
        };
        let id: MachineId = "0123456789abcd".parse().unwrap();
        let other: MachineId = "0123456789abce".parse().unwrap();
        let net = HostNetwork::open(host(), &state, Some(ns.path())).unwrap();
        let a = net.attach(&id, 7).unwrap();
        assert_eq!(net.attach(&id, 7).unwrap(), a, "attach is idempotent");
        let tap = a.tap.clone().unwrap();
        assert!(host().taps().unwrap().contains(&tap));
        assert!(a.private_ip.starts_with("fdaa:0:7:"), "{}", a.private_ip);
        assert_eq!(a.netns.as_deref(), Some(ns.path().as_path()));
        let b = net.attach(&other, 7).unwrap();
        assert_ne!(a.tap, b.tap);
        drop(net);
        // A new agent finds the same slots, and reconciles a tap removed behind its back.
        host().remove_machine(&tap).unwrap();
        let net = HostNetwork::open(host(), &state, Some(ns.path())).unwrap();
        assert!(host().taps().unwrap().contains(&tap));
        assert_eq!(net.attach(&id, 7).unwrap(), a);
        let mut attached = net.attached().unwrap();
        attached.sort();
        assert_eq!(attached, [id.clone(), other.clone()]);
        net.detach(&id).unwrap();
        net.detach(&id).unwrap();
        net.detach(&other).unwrap();
        assert!(host().taps().unwrap().is_empty());
        assert!(net.attached().unwrap().is_empty());
        host().remove_all().unwrap();
    }
}
