//! Wire types shared by aloft's API server, its client and the CLI: the Fly Machines API shapes.
//!
//! Identifiers, durations, `MachineConfig` with everything it contains, Fly's VM size presets, the
//! `Machine` object with its events and versions, machine states and the transitions lifecycle
//! verbs may take ([`Verb::transition`], the source of the API's 412s), request and response
//! bodies of the machine, lease and app endpoints, query parameters, the `Authorization` header
//! forms ([`parse_authorization`]), Fly's error body ([`ApiError`]), [`MachineHost`], the
//! interface through which the control plane reaches a host's agent, and the health checks a
//! config defines, resolved with their defaults and names ([`checks`]: the agent and the edge
//! proxy both run them). Field names, optionality and enum spellings follow Fly's OpenAPI spec;
//! unknown fields are ignored on input, as Fly's own API does, and the quirks of Fly's clients
//! (fly-go, flyctl) are accepted.
//!
//! This crate must stay free of I/O and of every other aloft crate, so that clients never pull in
//! the server. No threads, no async.

#![warn(missing_docs)]

mod app;
mod auth;
mod catalog;
mod certs;
pub mod checks;
mod console;
mod duration;
mod error;
mod guest;
mod host;
mod ids;
mod lease;
mod machine;
mod machine_config;
mod platform;
mod release;
mod requests;
#[cfg(feature = "schema")]
mod schema;
mod secrets;
mod serde_util;
mod signal;
#[cfg(test)]
mod spec_tests;
mod state;
mod time;
mod tunnel;
mod ulid;
mod volume;

pub use app::{
    App, AppOrganizationInfo, CreateAppRequest, CreateDeployTokenRequest, ListAppsQuery, ListAppsResponse,
    TokenResponse, validate_app_name,
};
pub use auth::parse_authorization;
pub use catalog::CatalogEntry;
pub use certs::{
    Certificate, CertificateRecord, CertificateSource, CertificateStatus, CreateCertificateRequest,
    DnsRequirements, EdgeCaResponse, ListCertificatesResponse, is_under_domain, validate_cert_hostname,
};
pub use console::{
    CONSOLE_UPGRADE, ConsoleEvent, ConsoleExit, ConsoleFrame, ConsoleFrameError, ConsoleQuery,
    ConsoleRequest, ConsoleSession, MAX_CONSOLE_PAYLOAD, TtySize,
};
pub use error::{ApiError, ErrorResponse, ErrorStatus, error_chain};
pub use lease::{CreateLeaseRequest, LEASE_NONCE_HEADER, Lease, LeaseEnvelope};
pub use machine::{
    CheckState, CheckStatus, ContainerStatus, EventSource, ExitEvent, HostStatus, ImageRef, Machine,
    MachineEvent, MachineEventRequest, MachineVersion, MonitorEvent,
};
pub use platform::{RegionRow, RegionsResponse};
pub use release::{
    CreateReleaseRequest, DeployStrategy, Release, ReleaseEvent, ReleaseGroup, ReleaseStatus, RollbackRequest,
};
pub use requests::{
    CreateMachineRequest, DestroyQuery, EventsQuery, ExecRequest, ExecResponse, ListMachinesQuery,
    ListenSocket, MetadataValueResponse, OkResponse, ProcessStat, RestartQuery, StartResponse, StopRequest,
    UpdateMachineRequest, UpdateMetadataRequest, UpsertMetadataKeyRequest, WaitQuery, WaitResponse,
    WaitState, validate_machine_name,
};
pub use secrets::{
    AppSecret, AppSecrets, AppSecretsUpdateRequest, AppSecretsUpdateResp, DeleteAppSecretResponse,
    MAX_SECRET_BYTES, SecretEnv, SecretsQuery, SetAppSecretRequest, SetAppSecretResponse,
    validate_secret_name, validate_secret_value,
};
pub use signal::{Signal, SignalRequest};
pub use state::{MachineState, ParseStateError, StateClass, StateError, Transition, Verb};
pub use time::rfc3339;
pub use tunnel::{PROXY_UPGRADE, ProxyQuery};
pub use ulid::UlidGenerator;
pub use volume::{
    CreateVolumeRequest, DEFAULT_SNAPSHOT_RETENTION_DAYS, DEFAULT_VOLUME_SIZE_GB, ExtendVolumeRequest,
    ExtendVolumeResponse, MAX_VOLUME_SIZE_GB, SNAPSHOT_CREATED, SnapshotId, UpdateVolumeRequest,
    VOLUME_FSTYPE, Volume, VolumeId, VolumeSnapshot, VolumeState, validate_volume_name, volume_size_problem,
};

pub use duration::{Duration, ParseDurationError};
pub use guest::{
    CPU_KIND_PERFORMANCE, CPU_KIND_SHARED, DEFAULT_GPU_VM_SIZE, DEFAULT_VM_SIZE, GUEST_PRESETS, GuestError,
    GuestPreset, memory_range_mb,
};
pub use host::{
    HostCreate, HostSnapshot, HostStop, HostUpdate, HostVolume, HostVolumeStatus, HostWait, LogEntry,
    LogEvent, LogFollower, LogMeta, LogStream, MachineHost, VolumeSource, VolumeUsage,
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
