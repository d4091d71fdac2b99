//! Releases (an aloft extension of the Machines API; Fly keeps them in its GraphQL API): a deploy
//! is a release that aloftd executes as a durable server-side job, so a CLI that goes away or an
//! aloftd that restarts never leaves a half-deployed app or a stale lease.
//!
//! `POST /v1/apps/{app}/releases` ([`CreateReleaseRequest`] → [`Release`], 201) starts one;
//! `GET /v1/apps/{app}/releases` lists them (newest first), `GET …/releases/{version}` shows one,
//! `GET …/releases/{version}/events?follow=true` streams its progress (newline-delimited
//! [`ReleaseEvent`]s), `POST …/releases/rollback` ([`RollbackRequest`]) redeploys an earlier one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::MachineConfig;

/// How a release replaces an app's machines (fly.toml's `[deploy] strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum DeployStrategy {
    /// Update `max_unavailable` machines at a time, each healthy before the next (the default).
    #[default]
    Rolling,
    /// Update every machine at once.
    Immediate,
    /// One machine first; the rest (rolling) once it is healthy.
    Canary,
    /// New machines beside the old ones, kept out of the proxy until healthy, then swapped.
    Bluegreen,
}

impl DeployStrategy {
    /// The spelling in fly.toml and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rolling => "rolling",
            Self::Immediate => "immediate",
            Self::Canary => "canary",
            Self::Bluegreen => "bluegreen",
        }
    }
}

/// Where a release is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReleaseStatus {
    /// Accepted, not started yet.
    Pending,
    /// Running its release command.
    ReleaseCommand,
    /// Replacing machines.
    Running,
    /// Every machine runs it.
    Complete,
    /// A step failed; the machines it had changed went back to the previous release.
    RolledBack,
    /// A step failed and there was nothing to go back to (or going back failed too).
    Failed,
}

impl ReleaseStatus {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Complete | Self::RolledBack | Self::Failed)
    }
}

/// One process group of a release: its machine config (fly.toml expanded) and how many machines
/// it should have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReleaseGroup {
    /// The process group (`app` by default).
    pub group: String,
    /// The config every machine of the group gets (`metadata.fly_process_group` is set to the
    /// group by the server).
    pub config: MachineConfig,
    /// Machines wanted; `None`: keep the count there is (a first deploy makes two for a group
    /// with services, one otherwise, as Fly does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
}

/// `POST /v1/apps/{app}/releases`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateReleaseRequest {
    /// The image every group runs (overrides the configs' `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The process groups. Groups the app has that are missing here are left alone.
    pub groups: Vec<ReleaseGroup>,
    /// How machines are replaced.
    #[serde(default)]
    pub strategy: DeployStrategy,
    /// Rolling: machines updated at once (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    /// How long each machine may take to be started and pass its checks (`"5m"`), default 5
    /// minutes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_timeout: Option<crate::Duration>,
    /// Run first in an ephemeral machine with the new image and config; a failure aborts the
    /// release before any machine changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_command: Option<MachineConfig>,
    /// Free-form labels (who, from where, git commit …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// A release as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Release {
    /// 1, 2, 3 … per app.
    pub version: u64,
    /// The app.
    pub app: String,
    /// Where it is.
    pub status: ReleaseStatus,
    /// The image.
    #[serde(default)]
    pub image: String,
    /// How it replaces machines.
    pub strategy: DeployStrategy,
    /// Its process groups.
    pub groups: Vec<ReleaseGroup>,
    /// The token that created it.
    #[serde(default)]
    pub user: String,
    /// When it was created (RFC 3339).
    pub created_at: String,
    /// When it ended (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// Why it failed or was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The release this one rolled back to, or (for a rollback) the release it redeploys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// Labels given at creation.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// One line of a release's progress (`GET …/releases/{version}/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ReleaseEvent {
    /// Position in the release's log, from 1.
    pub seq: u64,
    /// RFC 3339 with milliseconds.
    pub timestamp: String,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// The machine it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
    /// What happened, for humans.
    pub message: String,
    /// The release's status after it.
    pub status: ReleaseStatus,
}

/// `POST /v1/apps/{app}/releases/rollback`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RollbackRequest {
    /// The release to go back to; the last complete one before the current one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}
