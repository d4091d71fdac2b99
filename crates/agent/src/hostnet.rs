//! [`HostNetwork`]: machines' networks on `aloft-net` (ADR 0007) through its [`HostNetworks`]:
//! a slot per machine, saved before the host changes, so a crashed agent gets the same slot —
//! hence the same tap, MAC and addresses — for the same machine, and `reconcile` at open repairs
//! whatever a crash left half made.

use std::path::{Path, PathBuf};

use aloft_api::MachineId;
use aloft_net::{HostNet, HostNetworks, MachineNet};

use crate::driver::{NetInfo, Network, NetworkError};

/// Machines' networks through `aloft-net`. Needs `CAP_NET_ADMIN` and `nft`.
#[derive(Debug)]
pub struct HostNetwork {
    nets: HostNetworks,
    netns: Option<PathBuf>,
}

fn failed(op: &'static str, machine: &str, e: &dyn std::fmt::Display) -> NetworkError {
    NetworkError::Failed {
        op,
        machine: machine.to_owned(),
        message: e.to_string(),
    }
}

impl HostNetwork {
    /// Installs the host's base network ([`HostNet::setup`]), opens the state at `state_path`
    /// (created on first use) and reconciles the taps with it. `netns`: the namespace `host`
    /// works in, which QEMU must join too (`None`: the agent's own).
    pub fn open(host: HostNet, state_path: &Path, netns: Option<PathBuf>) -> Result<Self, NetworkError> {
        host.setup().map_err(|e| failed("set up", "-", &e))?;
        let nets = HostNetworks::open(host, state_path).map_err(|e| failed("open", "-", &e))?;
        nets.reconcile().map_err(|e| failed("reconcile", "-", &e))?;
        Ok(Self { nets, netns })
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
        let m = self
            .nets
            .attach(id.as_str(), org)
            .map_err(|e| failed("attach", id.as_str(), &e))?;
        Ok(self.info(&m))
    }

    fn detach(&self, id: &MachineId) -> Result<(), NetworkError> {
        self.nets
            .detach(id.as_str())
            .map_err(|e| failed("detach", id.as_str(), &e))
    }

    fn attached(&self) -> Result<Vec<MachineId>, NetworkError> {
        Ok(self
            .nets
            .attached()
            .into_iter()
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
