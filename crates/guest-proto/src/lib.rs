//! The contract between the host and `aloft-init`, the guest's PID 1.
//!
//! Two things cross the host↔guest boundary:
//!
//! * the [`RunConfig`], written by the host as JSON at [`RUN_CONFIG_PATH`] inside the machine's
//!   initramfs, read once by init at boot (so a guest boots without waiting for the host);
//! * [`Frame`]s on the control channel, a virtio-serial port named [`CHANNEL_NAME`] that only this VM
//!   can reach. The channel is one byte stream; frames multiplex exec sessions on it by a `chan` id.
//!
//! The frame codec is sans-IO ([`Frame::encode`], [`Decoder`]) so the same code runs in init (sync,
//! static binary) and on the host. Everything the guest sends is untrusted by the host: the decoder
//! bounds frame sizes and rejects unknown tags instead of panicking.
//!
//! Must not depend on tokio, on any other aloft crate, or on anything that does I/O.

mod frame;
mod run_config;

pub use frame::{
    BootRequest, DataStream, DecodeError, Decoder, ExecExit, ExecRequest, Frame, GuestStatus, ListenSocket,
    MAX_FRAME_LEN, PROTOCOL_VERSION, ProcessInfo, TtySize, WorkloadExit, WorkloadState,
};
pub use run_config::{
    DnsConfig, EtcHost, ExposedPort, FileSpec, ImageConfig, IpNet, MountSpec, NetConfig,
    ParseExposedPortError, ParseIpNetError, PortProtocol, RootConfig, RunConfig, RuntimeEnv,
};

/// Where the host puts the run config inside the initramfs.
pub const RUN_CONFIG_PATH: &str = "/aloft/run.json";

/// Name of the virtio-serial port that carries [`Frame`]s (`/sys/class/virtio-ports/*/name`).
pub const CHANNEL_NAME: &str = "aloft.0";

/// Prefix of the line init writes on the serial console with the workload's exit, as JSON
/// ([`WorkloadExit`]). The host falls back to it when the channel was down when the workload exited.
pub const CONSOLE_EXIT_MARKER: &str = "aloft-init: exit ";

/// Prefix of the line init writes on the serial console when it cannot start the workload; the rest
/// of the line is the message for the user ("executable not found: /app/x").
pub const CONSOLE_ERROR_MARKER: &str = "aloft-init: error: ";

/// First line init prints on the console, as soon as it runs (the boot benchmark's "init is up").
pub const CONSOLE_HELLO: &str = "aloft-init: hello";

/// Kernel command line flag that makes init print [`CONSOLE_HELLO`] and power off at once (the
/// accelerator probe and the raw boot baseline).
pub const PROBE_CMDLINE_FLAG: &str = "aloft.probe=1";

/// Kernel command line flag of a template boot: init comes up (console, `/proc`, `/sys`, `/dev`,
/// the channel) and then, instead of reading [`RUN_CONFIG_PATH`], reports
/// [`GuestStatus::awaiting_boot`] and waits for [`Frame::Boot`]. The host snapshots it there
/// and restores that snapshot for each new machine of the same shape, which skips the kernel's
/// boot.
pub const TEMPLATE_CMDLINE_FLAG: &str = "aloft.template=1";

/// Kernel command line flag that makes init print each boot step on the console with the
/// milliseconds since the kernel started (`aloft-init: +812.4ms root mounted`): where a slow start
/// goes.
pub const TRACE_CMDLINE_FLAG: &str = "aloft.trace=1";
