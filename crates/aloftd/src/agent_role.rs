//! The agent role: this host's machines. Opens the agent (recovering whatever a previous aloftd
//! left in flight) on the driver the flags choose, and hands it to the control plane as a host.

use std::path::PathBuf;
use std::sync::Arc;

use aloft_agent::{
    Agent, AgentConfig, Driver, FakeDriver, HostNetwork, Network, NoNetwork, VmDriver, VmDriverConfig,
};
use aloft_control::HostHandle;
use aloft_image::registry::RegistryConfig;
use aloft_net::{HostNet, Namespace, Plan, PlanConfig};
use anyhow::{Context as _, bail};
use clap::ValueEnum;

/// What runs machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DriverKind {
    /// QEMU microVMs (KVM where the host has it, TCG emulation otherwise).
    Vm,
    /// In memory: machines go through every state but nothing runs. For tests and benchmarks of
    /// the API; never for workloads.
    Fake,
}

/// Machines' networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum NetworkKind {
    /// Taps, 6PN addresses and nftables isolation (needs CAP_NET_ADMIN and `nft`).
    Host,
    /// No interface but loopback.
    None,
}

/// The agent role's settings (from aloftd's flags).
#[derive(Debug, Clone)]
pub(crate) struct AgentSettings {
    pub(crate) data_dir: PathBuf,
    pub(crate) region: String,
    pub(crate) driver: DriverKind,
    pub(crate) guest_dir: Option<PathBuf>,
    pub(crate) registry: Option<String>,
    pub(crate) insecure_registries: Vec<String>,
    pub(crate) network: NetworkKind,
    pub(crate) host_number: u32,
    pub(crate) machines_netns: Option<PathBuf>,
    /// How machines' QEMU is jailed (`None`: `--no-jail`).
    pub(crate) jail: Option<aloft_vm::JailSpec>,
}

/// A running agent and its handle for the control plane.
pub(crate) struct AgentRole {
    pub(crate) agent: Arc<Agent>,
    pub(crate) handle: HostHandle,
}

impl AgentSettings {
    /// Where the guest kernel and initramfs are: `--guest-dir`, else `<data dir>/guest`.
    fn guest_dir(&self) -> PathBuf {
        self.guest_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("guest"))
    }

    fn driver(&self) -> anyhow::Result<Arc<dyn Driver>> {
        match self.driver {
            DriverKind::Fake => Ok(Arc::new(FakeDriver::new())),
            DriverKind::Vm => {
                let guest = self.guest_dir();
                let kernel = guest.join("vmlinux");
                let initrd = guest.join("initramfs.cpio");
                for f in [&kernel, &initrd] {
                    if !f.is_file() {
                        bail!(
                            "the guest kernel and initramfs are needed to run machines, and {} is missing: \
                             run scripts/setup.sh and pass --guest-dir <checkout>/target/guest (or set ALOFT_GUEST_DIR)",
                            f.display()
                        );
                    }
                }
                if let Some(jail) = &self.jail {
                    check_jail(jail)?;
                }
                let mut cfg = VmDriverConfig::new(
                    self.data_dir.join("machines"),
                    self.data_dir.join("image"),
                    kernel,
                    initrd,
                );
                let mut insecure = self.insecure_registries.clone();
                if let Some(r) = &self.registry
                    && (r.starts_with("127.") || r.starts_with("localhost"))
                    && !insecure.contains(r)
                {
                    // The embedded registry listens on loopback over plain HTTP.
                    insecure.push(r.clone());
                }
                cfg.registry = RegistryConfig {
                    insecure,
                    ..RegistryConfig::default()
                };
                cfg.default_registry.clone_from(&self.registry);
                cfg.network = self.network()?;
                cfg.jail.clone_from(&self.jail);
                let driver = VmDriver::new(cfg).context("start the VM driver")?;
                Ok(Arc::new(driver))
            }
        }
    }

    fn network(&self) -> anyhow::Result<Arc<dyn Network>> {
        match self.network {
            NetworkKind::None => Ok(Arc::new(NoNetwork)),
            NetworkKind::Host => {
                let plan = Plan::new(&PlanConfig::new(self.host_number))
                    .with_context(|| format!("the address plan for host number {}", self.host_number))?;
                let mut host = HostNet::new(plan);
                if let Some(jail) = &self.jail {
                    host = host
                        .with_tap_owner(&jail.user)
                        .context("give machines' taps to the jail user")?;
                }
                if let Some(ns) = &self.machines_netns {
                    host = host.with_namespace(Namespace::Path(ns.clone()));
                }
                let net =
                    HostNetwork::open(host, &self.data_dir.join("net.json"), self.machines_netns.clone())
                        .context(
                            "set up machines' networking (needs root or CAP_NET_ADMIN, and nft); \
                         pass --network none to run machines without a network",
                        )?;
                Ok(Arc::new(net))
            }
        }
    }

    /// Opens the agent: recovers operations in flight, reattaches running machines.
    pub(crate) fn open(&self) -> anyhow::Result<AgentRole> {
        let driver = self.driver()?;
        let db = self.data_dir.join("agent.db");
        let agent = Agent::open(AgentConfig::new(&db), driver)
            .with_context(|| format!("open the agent's database {}", db.display()))?;
        let agent = Arc::new(agent);
        let handle = HostHandle {
            name: host_name(self.host_number),
            region: self.region.clone(),
            agent: agent.clone(),
        };
        Ok(AgentRole { agent, handle })
    }
}

/// The name placement records use for host number `n`.
/// Whether machines can be jailed as `jail` says: aloftd runs as root (QEMU drops privileges
/// and gets a cgroup), the user exists and the cgroup parent is a relative path. Checked at
/// start-up so that a host that cannot jail says so before any machine is asked for.
fn check_jail(jail: &aloft_vm::JailSpec) -> anyhow::Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!(
            "machines are jailed (QEMU drops to user {} and gets a cgroup of its own), which needs root: \
             run aloftd as root, or pass --no-jail to run them unjailed (development only)",
            jail.user
        );
    }
    jail.check().with_context(|| {
        format!(
            "jail machines as user {} under cgroup {}",
            jail.user, jail.cgroup_parent
        )
    })
}

pub(crate) fn host_name(n: u32) -> String {
    format!("host-{n}")
}

/// Stops the agent: operations in flight get `deadline` to finish (the rest resume at the next
/// start); machines keep running.
pub(crate) fn shutdown(agent: Arc<Agent>, deadline: std::time::Duration) {
    match Arc::try_unwrap(agent) {
        Ok(agent) => agent.shutdown(deadline),
        // A request cut off by the shutdown deadline still holds it: dropping the last handle
        // halts it as a crash would, and the next start resumes.
        Err(shared) => drop(shared),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_guest_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let s = AgentSettings {
            data_dir: dir.path().to_owned(),
            region: "local".into(),
            driver: DriverKind::Vm,
            guest_dir: Some(dir.path().join("nowhere")),
            registry: None,
            insecure_registries: Vec::new(),
            network: NetworkKind::None,
            host_number: 1,
            machines_netns: None,
            jail: None,
        };
        let e = format!("{:#}", s.open().err().unwrap());
        assert!(e.contains("vmlinux") && e.contains("--guest-dir"), "{e}");
    }

    #[test]
    fn host_names_are_stable() {
        assert_eq!(host_name(1), "host-1");
    }
}
