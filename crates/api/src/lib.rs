//! Wire types shared by aloft's API server, its client and the CLI: the Fly Machines API shapes.
//!
//! Today: identifiers, durations, `MachineConfig` with everything it contains, and Fly's VM size
//! presets. Field names, optionality and enum spellings follow Fly's OpenAPI spec
//! (`fly.MachineConfig` and friends); unknown fields are ignored on input, as Fly's own API does.
//!
//! This crate must stay free of I/O and of every other aloft crate, so that clients never pull in
//! the server. No threads, no async.

#![warn(missing_docs)]

mod duration;
mod guest;
mod ids;
mod machine_config;
mod serde_util;

pub use duration::{Duration, ParseDurationError};
pub use guest::{
    CPU_KIND_PERFORMANCE, CPU_KIND_SHARED, DEFAULT_GPU_VM_SIZE, DEFAULT_VM_SIZE, GUEST_PRESETS, GuestError,
    GuestPreset, memory_range_mb,
};
pub use ids::{MachineId, ParseIdError};
pub use machine_config::{
    Autostop, CheckKind, ContainerConfig, ContainerDependency, ContainerDependencyCondition,
    ContainerHealthcheck, ContainerHealthcheckKind, ContainerHealthcheckScheme, DnsConfig, DnsForwardRule,
    DnsOption, EnvFrom, ExecHealthcheck, FieldRef, File, HeaderValue, HttpHealthcheck, HttpOptions,
    HttpResponseOptions, MachineCacheDrive, MachineCheck, MachineConfig, MachineGuest, MachineHttpHeader,
    MachineInit, MachineMetrics, MachineMount, MachinePort, MachineProcess, MachineRestart, MachineRootfs,
    MachineSecret, MachineService, MachineServiceCheck, MachineServiceConcurrency, ProxyProtoOptions,
    ReplayCache, ReplayCacheType, RestartPolicy, RootfsPersist, Static, StopConfig, StopSignal,
    TcpHealthcheck, TlsOptions, UnhealthyPolicy,
};
