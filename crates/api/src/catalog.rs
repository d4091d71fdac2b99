//! The service catalog: what the edge needs to know about each machine to route to it.
//!
//! Agents publish one [`CatalogEntry`] per machine into the control store (`/catalog/{app}/{id}`,
//! see `aloft_store::keys`) whenever something the edge cares about changes (state, version,
//! services, check statuses, address); edges watch that prefix and keep their routing tables in
//! memory. An entry is deleted when its machine is destroyed. The agent stays the source of truth:
//! an entry is a published copy, possibly a moment old, never written by anyone else.

use serde::{Deserialize, Serialize};

use crate::{CheckStatus, MachineId, MachineService, MachineState};

/// One machine as the edge sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// The machine.
    pub id: MachineId,
    /// Its app.
    pub app: String,
    /// The host (agent) that owns it.
    pub host: String,
    /// Its region.
    pub region: String,
    /// Its state, as its agent last recorded it.
    pub state: MachineState,
    /// Its current version (Fly's `instance_id`).
    pub version: String,
    /// The address the edge dials (the machine's private 6PN address); empty when the machine
    /// has no network the host can reach.
    pub private_ip: String,
    /// The services of its current config (ports, handlers, limits, autostart/autostop).
    #[serde(default)]
    pub services: Vec<MachineService>,
    /// Statuses of its checks while it is started (service checks are named
    /// `servicecheck-NN-…` as on Fly; others are informational).
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// Whether it can be suspended (autostop `suspend` falls back to stop otherwise): at most
    /// 2 GiB of memory, no schedule, and a driver that can snapshot.
    #[serde(default)]
    pub suspendable: bool,
    /// The process group (`config.metadata.fly_process_group`), empty when none.
    #[serde(default)]
    pub process_group: String,
    /// The app's primary region (the config's `PRIMARY_REGION` env), empty when unset: autostop
    /// counts `min_machines_running` there only.
    #[serde(default)]
    pub primary_region: String,
    /// When its agent published this (Unix milliseconds).
    pub updated_at: i64,
}
