//! The per-host agent: the source of truth for the machines on this host (as Fly's flyd is).
//!
//! Every lifecycle verb — create, start, stop, suspend, restart, update, destroy — is an
//! **operation**: a plan of idempotent [`Step`]s fixed when the verb is accepted. Each step is
//! recorded in the agent's own SQLite database *before* it acts and again with its outcome, so an
//! agent killed at any point ([`Agent::open`] again) resumes every operation at its first
//! unfinished step, or continues its rollback; reattaches to the QEMU processes that kept running;
//! applies the restart policy to exits that happened while it was away; and removes whatever the
//! host holds for machines that do not exist. See `docs/adr/0008-agent-lifecycle.md`.
//!
//! - [`Agent`]: the verbs (what the Machines API server calls), `wait`, events, versions.
//! - Logs ([`Agent::log_tail`], [`Agent::follow_logs`]): each machine's stdout, stderr and
//!   platform lines, captured from its VM by one thread per boot into bounded, rotated JSON-lines
//!   files under `<db dir>/logs/<machine id>/` (removed with the machine).
//! - Health checks: the config's tcp, http and https checks run against each started machine,
//!   their statuses in [`MachineRecord::checks`] and `Machine.checks` (names, defaults and
//!   semantics are `aloft_api::checks`'s, shared with the edge proxy; `checks.rs` runs them).
//! - Service catalog ([`Agent::catalog`], [`Agent::publish_catalog`]): one
//!   `aloft_api::CatalogEntry` per machine (state, version, address, services, check statuses,
//!   whether it can suspend), and a publisher thread that hands a [`CatalogSink`] only what
//!   changed (see `catalog.rs`). The sink (aloftd's writes the control store) is the caller's.
//! - Secrets: the app's secrets come with a create or an update ([`Agent::create_with_secrets`],
//!   [`Agent::update_with_secrets`]), are kept sealed (ChaCha20-Poly1305, key in
//!   `<db dir>/agent-secrets.key`) per machine version, and are injected as environment variables at
//!   every boot of that version, over `config.env`. They never appear in the config, events,
//!   versions or logs. The key can be rotated: [`AgentConfig::secrets_keys`] adds previous keys
//!   (they only open), and [`Agent::open`] seals what they sealed again with the current key
//!   before it recovers anything ([`Agent::secrets_resealed`] says what it did; `keys.rs`).
//! - Volumes ([`Agent::create_volume`], [`Agent::volume`], [`Agent::extend_volume`],
//!   [`Agent::destroy_volume`]): each volume's disk is an ext4 filesystem in a sparse file on this
//!   host (`volumes.rs`; the file is the record). A machine's `config.mounts` (one at most)
//!   names a volume of this host that no other machine (not destroyed) mounts, checked when the
//!   config is accepted; each boot attaches the disk read-write and init mounts it at the
//!   mount's path. An extend grows the filesystem at once when no VM can have it open, else
//!   before the machine's next cold boot (`needs_restart`); a mounted volume cannot be destroyed.
//! - Consoles ([`Agent::console`], `aloft ssh console`): an interactive command in a started
//!   machine through [`Driver::exec_session`] (a [`DriverSession`]: stdin, terminal size,
//!   signals, output as it comes), under `exec`'s rules; no command runs `/bin/bash`, else
//!   `/bin/sh`. Not an operation: nothing is recorded, and dropping the session kills it.
//! - Connections ([`Agent::connect`], `aloft proxy`): a TCP connection from the host to a port
//!   of a started machine through [`Driver::connect`] (its private address, in its network's
//!   namespace; a [`FakeDriver`] machine's ports are the host's loopback), under `exec`'s rules.
//!   Not an operation either: the caller owns the connection.
//! - [`Driver`]: the world the steps act on (images, disks, volumes, network, VMs), with [`VmDriver`]
//!   (`aloft-image` + `aloft-vm`, networking through the [`Network`] trait: [`HostNetwork`] on
//!   `aloft-net`, or [`NoNetwork`]) and [`FakeDriver`] (in memory, with injectable failures and
//!   crash points).
//! - States and allowed transitions are `aloft-api`'s ([`aloft_api::Verb::transition`]): a verb
//!   not allowed in the current state is [`AgentError::State`] (412), a second verb while an
//!   operation runs is refused by the same rule, or [`AgentError::Busy`] (409).
//!
//! Threading model: synchronous. Each operation runs on its own thread (one at a time per
//! machine, many machines in parallel), each started machine has a monitor thread waiting for its
//! VM to exit; calls block the caller (an async server wraps them in `spawn_blocking`).
//!
//! Must not depend on the control plane (`aloft-store`, leases, apps, tokens) or on HTTP: the API
//! server calls the agent, never the other way round.

#![warn(missing_docs)]

mod agent;
mod catalog;
mod checks;
mod db;
mod driver;
mod error;
mod fake;
mod host;
mod hostnet;
mod ids;
mod keys;
mod logs;
mod model;
mod plan;
mod vmdriver;
mod volumes;

pub use agent::{
    Agent, AgentConfig, CONNECT_TIMEOUT, CreateMachine, Killswitch, OpHandle, StopOptions, UpdateMachine,
    WaitOutcome,
};
pub use aloft_api::checks::{DEFAULT_GRACE_PERIOD, DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
pub use catalog::{
    CatalogChange, CatalogOptions, CatalogPublisher, CatalogSink, CatalogStats, SUSPEND_MAX_MEMORY_MB,
};
pub use driver::{
    BaseInfo, Driver, DriverError, DriverOp, DriverSession, ExecResult, ExitInfo, FIRST_VOLUME_DISK,
    ImageInfo, LaunchSpec, LogChunk, LogReceiver, NetInfo, Network, NetworkError, NoNetwork, OutputStream,
    SessionEvent, SnapshotInfo, VmStatus, VolumeAttachment, VolumeDisk,
};
pub use error::AgentError;
pub use fake::{CrashPhase, FakeDriver, FakeSession, FakeSnapshot, FakeVm, FakeVolume, World};
pub use hostnet::HostNetwork;
pub use keys::SecretsReseal;
pub use logs::{LogFollow, MAX_LINE_BYTES, RECENT_BYTES};
pub use model::{
    MachineRecord, OpKind, OpParams, OpRecord, OpStatus, Phase, Resources, Scratch, SealedSecrets, Step,
    StepRecord, Undo,
};
pub use plan::{DEFAULT_MAX_RETRIES, RestartBackoff};
pub use vmdriver::{VmDriver, VmDriverConfig};
pub use volumes::VolumeError;

#[cfg(test)]
mod tests;
