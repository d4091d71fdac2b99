//! The agent role: this host's machines. Opens the agent (recovering whatever a previous aloftd
//! left in flight) on the driver the flags choose, and hands it to the control plane as a host.
//! Its secrets keys: `<data dir>/agent-secrets.key` and the previous key files of
//! `--agent-secrets-key-previous` (what they sealed the agent seals again when it opens).

use std::path::PathBuf;
use std::sync::Arc;

use aloft_agent::{
    Agent, AgentConfig, Driver, FakeDriver, HostNetwork, Network, NoNetwork, SecretsReseal, VmDriver,
    VmDriverConfig,
};
use aloft_control::HostHandle;
use aloft_image::registry::RegistryConfig;
use aloft_net::{HostNet, Namespace, Plan, PlanConfig};
use aloft_secretbox::{Key, Keyring};
use anyhow::{Context as _, bail};
use clap::ValueEnum;

use crate::keys;

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
    /// Previous agent secrets key files (`--agent-secrets-key-previous`): they open the
    /// secrets the agent keeps that they sealed, which the agent seals again with
    /// `<data dir>/agent-secrets.key` when it opens.
    pub(crate) secrets_key_previous: Vec<PathBuf>,
    /// How machines' QEMU is jailed (`None`: `--no-jail`).
    pub(crate) jail: Option<aloft_vm::JailSpec>,
    /// Start machines from boot templates (`--no-boot-templates` turns it off).
    pub(crate) boot_templates: bool,
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
                cfg.boot_templates = self.boot_templates;
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

    /// The agent's secrets keys: `<data dir>/agent-secrets.key` (created on first use) seals,
    /// the previous key files open.
    fn secrets_keys(&self, config: &AgentConfig) -> anyhow::Result<Keyring> {
        let path = config.secrets_key_path();
        let current = Key::load_or_create(&path)
            .with_context(|| format!("open the agent secrets key {}", path.display()))?;
        keys::AGENT_SECRETS.keyring(current, &self.secrets_key_previous)
    }

    /// Opens the agent: re-seals the secrets it keeps that a previous key sealed, recovers
    /// operations in flight, reattaches running machines.
    pub(crate) fn open(&self) -> anyhow::Result<AgentRole> {
        let driver = self.driver()?;
        let db = self.data_dir.join("agent.db");
        let mut config = AgentConfig::new(&db);
        let secrets_keys = Arc::new(self.secrets_keys(&config)?);
        keys::AGENT_SECRETS.log_keys(&secrets_keys);
        config.secrets_keys = Some(Arc::clone(&secrets_keys));
        let agent = Agent::open(config, driver)
            .with_context(|| format!("open the agent's database {}", db.display()))?;
        log_resealed(&secrets_keys, agent.secrets_resealed());
        let agent = Arc::new(agent);
        let handle = HostHandle {
            name: host_name(self.host_number),
            region: self.region.clone(),
            agent: agent.clone(),
        };
        Ok(AgentRole { agent, handle })
    }
}

/// Tells what the agent's re-sealing did: counts, machine ids, key ids; never a value.
fn log_resealed(keys: &Keyring, report: &SecretsReseal) {
    if report.forgotten > 0 {
        eprintln!(
            "aloftd: agent secrets: forgot {} copy(ies) of secrets in finished operations that another key sealed (nothing reads them again)",
            report.forgotten
        );
    }
    keys::AGENT_SECRETS.log_reseal(
        keys,
        (report.resealed > 0).then(|| {
            format!(
                "{} sealed value(s) of {} machine(s)",
                report.resealed, report.machines
            )
        }),
        &report.unreadable,
        &[],
    );
}

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

/// The name placement records use for host number `n`.
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
            secrets_key_previous: Vec::new(),
            jail: None,
            boot_templates: true,
        };
        let e = format!("{:#}", s.open().err().unwrap());
        assert!(e.contains("vmlinux") && e.contains("--guest-dir"), "{e}");
    }

    fn fake_settings(dir: &std::path::Path, previous: &[PathBuf]) -> AgentSettings {
        AgentSettings {
            data_dir: dir.to_owned(),
            region: "local".into(),
            driver: DriverKind::Fake,
            guest_dir: None,
            registry: None,
            insecure_registries: Vec::new(),
            network: NetworkKind::None,
            host_number: 1,
            machines_netns: None,
            secrets_key_previous: previous.to_vec(),
            jail: None,
            boot_templates: true,
        }
    }

    /// A machine created with secret `DB`, through the agent role.
    fn machine_with_secret(role: &AgentRole) -> aloft_api::MachineId {
        let req = aloft_agent::CreateMachine {
            app: "web".into(),
            region: "local".into(),
            org: 1,
            config: aloft_api::MachineConfig {
                image: Some("busybox".into()),
                ..aloft_api::MachineConfig::default()
            },
            ..aloft_agent::CreateMachine::default()
        };
        let secrets = aloft_api::SecretEnv {
            version: 1,
            values: [("DB".to_owned(), "hunter2".to_owned())].into(),
        };
        let handle = role.agent.create_with_secrets(req, &secrets).unwrap();
        handle.wait(std::time::Duration::from_secs(10)).unwrap();
        handle.machine
    }

    /// Boots machine `id` once more (once whatever the agent resumed on opening settled).
    fn boot(role: &AgentRole, id: &aloft_api::MachineId) -> Result<(), String> {
        let t = std::time::Duration::from_secs(10);
        let settled = role
            .agent
            .wait(id, &[aloft_api::WaitState::Settled], None, None, t)
            .unwrap();
        let op = if settled.state == aloft_api::MachineState::Started {
            role.agent.restart(id, aloft_agent::StopOptions::default())
        } else {
            role.agent.start(id)
        };
        op.unwrap().wait(t).map(drop).map_err(|e| e.to_string())
    }

    #[test]
    fn the_agent_secrets_key_rotates_with_the_previous_key_flag() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("agent-secrets.key");
        let role = fake_settings(dir.path(), &[]).open().unwrap();
        let id = machine_with_secret(&role);
        drop(role);
        let old = dir.path().join("agent-secrets.key.old");
        std::fs::rename(&key, &old).unwrap();
        let a_id = crate::keys::key_id_line(&old).unwrap();
        let a_id = a_id.split_once("  ").unwrap().0;

        // The old key not given: the agent opens, reports the value, and a boot of the machine
        // fails naming A's id, the flag and the command that prints key files' ids.
        let role = fake_settings(dir.path(), &[]).open().unwrap();
        let report = role.agent.secrets_resealed().clone();
        assert_eq!(report.unreadable.len(), 1, "{report:?}");
        let e = boot(&role, &id).unwrap_err();
        for part in [a_id, "--agent-secrets-key-previous", "aloftd key-id"] {
            assert!(
                report.unreadable[0].contains(part),
                "{part:?} missing: {report:?}"
            );
            assert!(e.contains(part), "{part:?} missing: {e}");
        }
        drop(role);

        // Given as previous key: re-sealed with the new key, and the machine boots again.
        let role = fake_settings(dir.path(), std::slice::from_ref(&old))
            .open()
            .unwrap();
        let report = role.agent.secrets_resealed().clone();
        assert_eq!((report.resealed, report.machines), (1, 1), "{report:?}");
        assert!(report.unreadable.is_empty(), "{report:?}");
        boot(&role, &id).unwrap();
        drop(role);

        // The new key alone opens everything; a previous key file that does not exist is refused.
        let role = fake_settings(dir.path(), &[]).open().unwrap();
        assert_eq!(role.agent.secrets_resealed(), &SecretsReseal::default());
        boot(&role, &id).unwrap();
        drop(role);
        let missing = dir.path().join("missing.key");
        let e = format!(
            "{:#}",
            fake_settings(dir.path(), &[missing]).open().err().unwrap()
        );
        assert!(e.contains("--agent-secrets-key-previous"), "{e}");
    }

    #[test]
    fn host_names_are_stable() {
        assert_eq!(host_name(1), "host-1");
    }
}
