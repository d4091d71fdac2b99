//! `aloft-net`: the host side of every machine's network.
//!
//! - [`plan`]: the addressing plan (pure): a 6PN-style IPv6 address per machine inside its
//!   organization's prefix, a host-local IPv4 `/31` for egress and the proxy, the guest's
//!   `NetConfig`/`DnsConfig`/`/etc/hosts`, and a slot allocator whose state the caller persists.
//! - [`HostNet`]: taps (persistent, owned by the jail user), their addresses and routes, the
//!   service link holding the internal DNS address, forwarding, and aloft's nftables table
//!   `inet aloft` (organization isolation, anti-spoofing, IPv4 egress masquerade); teardown and
//!   `reconcile` after a crash. See `docs/adr/0007-host-networking.md`.
//! - [`HostNetworks`]: machine id → network for the agent (attach, detach, reconcile), its
//!   [`NetState`] saved to a file before the host is changed.
//!
//! It touches only interfaces named `aloft-m<slot>` and `aloft-svc` and the table `inet aloft`.
//!
//! Used by the agent (and tests). Among aloft crates it depends on `aloft-netlink` and
//! `aloft-guest-proto` only; it must not depend on `aloft-vm`, the store or an async runtime. Every
//! call blocks the caller's thread (the agent runs them in `spawn_blocking`); work in a named
//! namespace runs on a short-lived thread that joined it. Needs `CAP_NET_ADMIN` and the `nft`
//! command (Debian package `nftables`).

#![warn(missing_docs)]

mod host;
mod nft;
mod ns;
pub mod plan;
mod registry;
mod tap;

pub use host::{HostNet, ReconcileReport, SERVICE_LINK, is_tap_name};
pub use ns::Namespace;
pub use plan::{MachineNet, Plan, PlanConfig, PlanError, SlotAllocator, SlotState};
pub use registry::{HostNetworks, NetState};

/// A failed host networking operation. Messages name the interface or command; the source says
/// why.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A name that is not aloft's: nothing else is ever changed.
    #[error("refusing to touch interface {name}: aloft manages only taps named aloft-m<slot>")]
    NotAloftName {
        /// The rejected name.
        name: String,
    },
    /// The tap to create exists already.
    #[error("tap {name} already exists: run reconcile to adopt or remove it, or use another slot")]
    TapExists {
        /// The tap.
        name: String,
    },
    /// The machine's network is in another organization.
    #[error("machine {machine} has its network in org {has}, not {asked}: detach it first")]
    OrgMismatch {
        /// The machine.
        machine: String,
        /// Its org.
        has: u32,
        /// The org asked for.
        asked: u32,
    },
    /// Saving or reading the network state file failed.
    #[error("network state {path}")]
    State {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The network state file is not valid.
    #[error(
        "network state {path} is not valid ({reason}): restore it from a backup, or remove it and run reconcile (machines lose their networks)"
    )]
    StateParse {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Two expected machines share a tap.
    #[error("two machines are given tap {name}: each needs its own slot")]
    DuplicateTap {
        /// The tap.
        name: String,
    },
    /// A machine network that does not hang together.
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Creating the tap through `/dev/net/tun` failed.
    #[error("create tap {name} (needs root or CAP_NET_ADMIN and /dev/net/tun)")]
    CreateTap {
        /// The tap.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink step on an interface failed.
    #[error("configure {name}")]
    Configure {
        /// The interface.
        name: String,
        /// What netlink said.
        #[source]
        source: aloft_netlink::NetlinkError,
    },
    /// The network namespace could not be entered.
    #[error("enter network namespace {ns}")]
    Namespace {
        /// The namespace.
        ns: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` is not installed.
    #[error("nft not found: install the Debian package nftables (scripts/setup.sh does)")]
    NftMissing,
    /// `nft` could not be run.
    #[error("run nft")]
    NftRun {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` failed.
    #[error("{command} failed: {stderr}")]
    Nft {
        /// The command line.
        command: String,
        /// What nft printed.
        stderr: String,
    },
    /// `nft -j` printed something unexpected.
    #[error("unexpected nft JSON output: {reason}")]
    NftOutput {
        /// What was wrong.
        reason: String,
    },
    /// Writing a sysctl failed.
    #[error("set sysctl {key}")]
    Sysctl {
        /// The key, `net/ipv4/ip_forward`.
        key: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tap owner is not a local user.
    #[error("tap owner {user} is not in /etc/passwd: create it (scripts/setup.sh creates aloft-vm)")]
    UnknownUser {
        /// The user.
        user: String,
    },
}
