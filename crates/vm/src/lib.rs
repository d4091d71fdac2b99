//! The VM driver: turns a [`VmSpec`] into a running, jailed, detached QEMU `microvm` and controls it
//! from a process that may crash and restart.
//!
//! * **Launch** ([`Vm::start`]): validate the spec, compose the machine's initramfs (base image +
//!   run config, [`initramfs`]), pick the accelerator ([`accel`]), spawn QEMU in its own session
//!   (and, when jailed, its own cgroup, as an unprivileged user under `-sandbox`), wait until its
//!   monitor answers, connect the host↔guest channel.
//! * **Start from a boot template** ([`Templates::start`]): restore a snapshot of a guest booted
//!   up to init's wait for its config, made once per shape, and send it the machine's config
//!   instead of booting a kernel (ADR 0022); a cold [`Vm::start`] when that is not possible.
//! * **Control**: graceful stop, kill, signals, exec, interactive exec sessions ([`Vm::exec_session`]:
//!   stdin, a terminal, flow-controlled output), process list, workload logs and exit status over
//!   the channel ([`aloft_guest_proto::Frame`]); snapshot/restore over QMP.
//! * **Survive restarts**: everything needed to reattach is in the run dir (`state.json`, sockets,
//!   `console.log`); [`Vm::attach`] picks a VM up again, including one that ended meanwhile (its exit
//!   then comes from the console log's init markers).
//!
//! Threading model: synchronous, std only. Each [`Vm`] has one channel reader thread and, when this
//! process launched the QEMU, one reaper thread waiting on it. Methods block the calling thread (an
//! async caller wraps them in `spawn_blocking`); a `Vm` is `Send + Sync`.
//!
//! Must not depend on tokio or any control-plane crate (api, store, agent, control): only
//! `aloft-guest-proto` and the standard library plus libc/serde/thiserror.

#![warn(missing_docs)]

mod argv;
mod cgroup;
mod channel;
mod console;
mod error;
mod proc;
mod qmp;
mod session;
mod spec;
mod sys;
mod template;
mod vm;

pub mod accel;
pub mod initramfs;

pub use argv::{PAGE_REPORTING_ORDER, QEMU, disk_serial};
pub use channel::LogChunk;
pub use error::VmError;
pub use proc::processes_mentioning;
pub use qmp::QmpError;
pub use session::{ExecEvent, ExecSession};
pub use spec::{
    Accel, AccelChoice, DiskFormat, DiskSpec, JailSpec, MAX_VCPUS, MIN_MEMORY_MIB, NetSpec, VmSpec,
    default_qemu,
};
pub use template::{MAX_TEMPLATES, TemplateStart, Templates};
pub use vm::{ExecOutput, QemuStatus, STOP_GRACE, Vm, VmExit};

#[cfg(test)]
mod tests {
    #[test]
    fn vm_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::Vm>();
        check::<crate::VmError>();
        check::<crate::ExecSession>();
        fn outlives_the_vm<T: 'static>() {}
        outlives_the_vm::<crate::ExecSession>();
    }
}
