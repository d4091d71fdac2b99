//! The jailed QEMU's cgroup: memory and CPU limits, on cgroup v2 or on v1 (hybrid hosts).
//!
//! What to create and write is computed by pure functions ([`plan`]); [`Cgroup::create`] performs it.
//! QEMU joins the cgroup before it runs any guest code: the driver opens each hierarchy's
//! `cgroup.procs` before spawning; a QEMU that boots writes "0" (itself) to them between fork and
//! exec, and one that waits for an incoming stream (a resume, a template start) is moved by the
//! driver while it initialises, before the stream is sent (`Vm::launch`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::VmError;
use crate::spec::Accel;

const MIB: u64 = 1024 * 1024;
const CPU_PERIOD_US: u64 = 100_000;

/// QEMU's own memory on top of the guest's: TCG's translation cache plus QEMU itself (binary,
/// libraries, the kernel image it keeps for reset, device buffers, migration).
pub(crate) fn overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Tcg => crate::argv::TCG_TB_SIZE_MIB + 96,
        Accel::Kvm => 64,
    }
}

/// Limits for one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: u64,
    pub(crate) cpu_quota_us: u64,
    pub(crate) cpu_period_us: u64,
}

/// Pure: guest memory + overhead, `vcpus` × 100 % CPU.
pub(crate) fn limits(memory_mib: u32, vcpus: u32, accel: Accel) -> Limits {
    Limits {
        memory_bytes: (u64::from(memory_mib) + overhead_mib(accel)) * MIB,
        cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
        cpu_period_us: CPU_PERIOD_US,
    }
}

/// The cgroup layout of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Unified hierarchy at this root.
    V2 { root: PathBuf },
    /// Separate `memory` and `cpu` hierarchies.
    V1 { memory: PathBuf, cpu: PathBuf },
}

impl Layout {
    /// Detects the layout under `/sys/fs/cgroup`.
    pub(crate) fn detect() -> Self {
        let root = Path::new("/sys/fs/cgroup");
        if root.join("cgroup.controllers").exists() {
            Self::V2 {
                root: root.to_owned(),
            }
        } else {
            Self::V1 {
                memory: root.join("memory"),
                cpu: root.join("cpu"),
            }
        }
    }
}

/// One step of creating the cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Mkdir(PathBuf),
    Write(PathBuf, String),
}

/// What to do, and what the result is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) steps: Vec<Step>,
    /// The leaf directories (removed when the VM is gone).
    pub(crate) dirs: Vec<PathBuf>,
    /// The `cgroup.procs` files QEMU writes itself into.
    pub(crate) procs: Vec<PathBuf>,
}

/// Pure: the steps for `<parent>/<name>` with `limits`.
pub(crate) fn plan(layout: &Layout, parent: &str, name: &str, l: Limits) -> Plan {
    let mut steps = Vec::new();
    match layout {
        Layout::V2 { root } => {
            // Controllers must be enabled in every ancestor's subtree_control.
            let mut cur = root.clone();
            steps.push(Step::Write(
                cur.join("cgroup.subtree_control"),
                "+memory +cpu".into(),
            ));
            for comp in parent.split('/') {
                cur = cur.join(comp);
                steps.push(Step::Mkdir(cur.clone()));
                steps.push(Step::Write(
                    cur.join("cgroup.subtree_control"),
                    "+memory +cpu".into(),
                ));
            }
            let leaf = cur.join(name);
            steps.push(Step::Mkdir(leaf.clone()));
            steps.push(Step::Write(leaf.join("memory.max"), l.memory_bytes.to_string()));
            steps.push(Step::Write(leaf.join("memory.swap.max"), "0".into()));
            steps.push(Step::Write(
                leaf.join("cpu.max"),
                format!("{} {}", l.cpu_quota_us, l.cpu_period_us),
            ));
            Plan {
                steps,
                procs: vec![leaf.join("cgroup.procs")],
                dirs: vec![leaf],
            }
        }
        Layout::V1 { memory, cpu } => {
            let mem = memory.join(parent).join(name);
            let cpu = cpu.join(parent).join(name);
            steps.push(Step::Mkdir(mem.clone()));
            steps.push(Step::Write(
                mem.join("memory.limit_in_bytes"),
                l.memory_bytes.to_string(),
            ));
            steps.push(Step::Mkdir(cpu.clone()));
            steps.push(Step::Write(
                cpu.join("cpu.cfs_period_us"),
                l.cpu_period_us.to_string(),
            ));
            steps.push(Step::Write(
                cpu.join("cpu.cfs_quota_us"),
                l.cpu_quota_us.to_string(),
            ));
            Plan {
                steps,
                procs: vec![mem.join("cgroup.procs"), cpu.join("cgroup.procs")],
                dirs: vec![mem, cpu],
            }
        }
    }
}

/// A created cgroup (one leaf per hierarchy). Not removed on drop: call [`Cgroup::remove`] once the
/// QEMU in it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Cgroup {
    pub(crate) dirs: Vec<PathBuf>,
    pub(crate) procs: Vec<PathBuf>,
}

impl Cgroup {
    /// Performs `plan`. On failure, removes what it created.
    pub(crate) fn create(plan: Plan) -> Result<Self, VmError> {
        let cg = Self {
            dirs: plan.dirs,
            procs: plan.procs,
        };
        for step in plan.steps {
            let res = match &step {
                Step::Mkdir(p) => fs::create_dir_all(p).map_err(|e| (p.clone(), e)),
                Step::Write(p, v) => {
                    // memory.swap.max is absent without swap accounting: that is fine.
                    if p.ends_with("memory.swap.max") && !p.exists() {
                        Ok(())
                    } else {
                        fs::write(p, v).map_err(|e| (p.clone(), e))
                    }
                }
            };
            if let Err((path, source)) = res {
                // subtree_control of the root may be managed by systemd; a failure there is
                // only fatal if the leaf then lacks the controller files (caught below).
                if path.ends_with("cgroup.subtree_control") {
                    continue;
                }
                cg.remove();
                return Err(VmError::Cgroup { path, source });
            }
        }
        Ok(cg)
    }

    /// Removes the leaf directories, retrying while the last task is still exiting. Best effort.
    pub(crate) fn remove(&self) {
        for d in &self.dirs {
            for _ in 0..50 {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_add_overhead_and_scale_cpu() {
        let l = limits(256, 2, Accel::Tcg);
        assert_eq!(l.memory_bytes, (256 + 112) * MIB);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.cpu_period_us, 100_000);
        assert_eq!(limits(256, 1, Accel::Kvm).memory_bytes, (256 + 64) * MIB);
    }

    #[test]
    fn v1_plan() {
        let layout = Layout::V1 {
            memory: "/cg/memory".into(),
            cpu: "/cg/cpu".into(),
        };
        let p = plan(&layout, "aloft", "m1", limits(128, 1, Accel::Tcg));
        assert_eq!(
            p.steps,
            vec![
                Step::Mkdir("/cg/memory/aloft/m1".into()),
                Step::Write(
                    "/cg/memory/aloft/m1/memory.limit_in_bytes".into(),
                    "251658240".into()
                ),
                Step::Mkdir("/cg/cpu/aloft/m1".into()),
                Step::Write("/cg/cpu/aloft/m1/cpu.cfs_period_us".into(), "100000".into()),
                Step::Write("/cg/cpu/aloft/m1/cpu.cfs_quota_us".into(), "100000".into()),
            ]
        );
        assert_eq!(
            p.procs,
            [
                PathBuf::from("/cg/memory/aloft/m1/cgroup.procs"),
                PathBuf::from("/cg/cpu/aloft/m1/cgroup.procs")
            ]
        );
    }

    #[test]
    fn v2_plan_enables_controllers_on_the_way_down() {
        let layout = Layout::V2 { root: "/cg".into() };
        let p = plan(&layout, "aloft", "m1", limits(256, 2, Accel::Kvm));
        assert_eq!(
            p.steps[0],
            Step::Write("/cg/cgroup.subtree_control".into(), "+memory +cpu".into())
        );
        assert!(p.steps.contains(&Step::Write(
            "/cg/aloft/cgroup.subtree_control".into(),
            "+memory +cpu".into()
        )));
        assert!(p.steps.contains(&Step::Write(
            "/cg/aloft/m1/memory.max".into(),
            (320 * MIB).to_string()
        )));
        assert!(p.steps.contains(&Step::Write(
            "/cg/aloft/m1/cpu.max".into(),
            "200000 100000".into()
        )));
        assert_eq!(p.dirs, [PathBuf::from("/cg/aloft/m1")]);
    }
}
