//! Fly's VM size presets (`shared-cpu-1x` … `performance-16x`, GPU presets) and the limits on
//! memory per CPU.

use crate::MachineGuest;

/// CPU kind `shared`: a share of a vCPU with a burst balance.
pub const CPU_KIND_SHARED: &str = "shared";
/// CPU kind `performance`: dedicated vCPUs.
pub const CPU_KIND_PERFORMANCE: &str = "performance";
/// The preset used when nothing is said about the size.
pub const DEFAULT_VM_SIZE: &str = "shared-cpu-1x";
/// The preset used when a GPU kind is given without a size.
pub const DEFAULT_GPU_VM_SIZE: &str = "performance-8x";

/// A named VM size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestPreset {
    /// Preset name, e.g. `shared-cpu-2x`.
    pub name: &'static str,
    /// `shared` or `performance`.
    pub cpu_kind: &'static str,
    /// vCPUs.
    pub cpus: u32,
    /// Memory, MiB.
    pub memory_mb: u32,
    /// GPUs (0 for CPU-only presets).
    pub gpus: u32,
    /// GPU model, for GPU presets.
    pub gpu_kind: Option<&'static str>,
}

const fn cpu(name: &'static str, cpu_kind: &'static str, cpus: u32, per_cpu_mb: u32) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind,
        cpus,
        memory_mb: cpus * per_cpu_mb,
        gpus: 0,
        gpu_kind: None,
    }
}

const fn gpu(name: &'static str, gpu_kind: &'static str) -> GuestPreset {
    GuestPreset {
        name,
        cpu_kind: CPU_KIND_PERFORMANCE,
        cpus: 8,
        memory_mb: 32 * 1024,
        gpus: 1,
        gpu_kind: Some(gpu_kind),
    }
}

/// Every preset Fly knows, in the order `fly platform vm-sizes` lists them.
pub const GUEST_PRESETS: &[GuestPreset] = &[
    cpu("shared-cpu-1x", CPU_KIND_SHARED, 1, 256),
    cpu("shared-cpu-2x", CPU_KIND_SHARED, 2, 256),
    cpu("shared-cpu-4x", CPU_KIND_SHARED, 4, 256),
    cpu("shared-cpu-6x", CPU_KIND_SHARED, 6, 256),
    cpu("shared-cpu-8x", CPU_KIND_SHARED, 8, 256),
    cpu("performance-1x", CPU_KIND_PERFORMANCE, 1, 2048),
    cpu("performance-2x", CPU_KIND_PERFORMANCE, 2, 2048),
    cpu("performance-4x", CPU_KIND_PERFORMANCE, 4, 2048),
    cpu("performance-6x", CPU_KIND_PERFORMANCE, 6, 2048),
    cpu("performance-8x", CPU_KIND_PERFORMANCE, 8, 2048),
    cpu("performance-10x", CPU_KIND_PERFORMANCE, 10, 2048),
    cpu("performance-12x", CPU_KIND_PERFORMANCE, 12, 2048),
    cpu("performance-14x", CPU_KIND_PERFORMANCE, 14, 2048),
    cpu("performance-16x", CPU_KIND_PERFORMANCE, 16, 2048),
    gpu("a100-40gb", "a100-pcie-40gb"),
    gpu("a100-80gb", "a100-sxm4-80gb"),
    gpu("l40s", "l40s"),
    gpu("a10", "a10"),
];

impl GuestPreset {
    /// Looks a preset up by name (exact, lowercase).
    pub fn find(name: &str) -> Option<&'static GuestPreset> {
        GUEST_PRESETS.iter().find(|p| p.name == name)
    }

    /// The preset as a `guest` value.
    pub fn to_guest(&self) -> MachineGuest {
        MachineGuest {
            cpu_kind: Some(self.cpu_kind.to_owned()),
            cpus: Some(self.cpus),
            memory_mb: Some(self.memory_mb),
            gpus: (self.gpus > 0).then_some(self.gpus),
            gpu_kind: self.gpu_kind.map(str::to_owned),
            ..MachineGuest::default()
        }
    }
}

/// Memory a machine of `cpus` vCPUs of `cpu_kind` may have, in MiB (inclusive), or `None` for an
/// unknown CPU kind. Shared: 256–2048 MiB per vCPU; performance: 2048–8192 MiB per vCPU.
pub fn memory_range_mb(cpu_kind: &str, cpus: u32) -> Option<(u32, u32)> {
    let (min, max): (u32, u32) = match cpu_kind {
        CPU_KIND_SHARED => (256, 2048),
        CPU_KIND_PERFORMANCE => (2048, 8192),
        _ => return None,
    };
    let cpus = cpus.max(1);
    Some((min.saturating_mul(cpus), max.saturating_mul(cpus)))
}

/// Why a guest is not a size Fly would run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestError {
    /// `cpu_kind` is neither `shared` nor `performance`.
    #[error("unknown cpu_kind {0:?}; use \"shared\" or \"performance\"")]
    CpuKind(String),
    /// Zero vCPUs.
    #[error("cpus must be at least 1")]
    NoCpus,
    /// Memory outside what the CPUs allow.
    #[error(
        "{memory_mb} MiB of memory is outside {min}–{max} MiB allowed for {cpus} {cpu_kind} cpu(s); change memory or cpus"
    )]
    Memory {
        /// Memory asked for.
        memory_mb: u32,
        /// vCPUs.
        cpus: u32,
        /// CPU kind.
        cpu_kind: String,
        /// Least allowed.
        min: u32,
        /// Most allowed.
        max: u32,
    },
}

impl MachineGuest {
    /// Checks cpu kind, cpu count and memory against Fly's limits. Missing fields take the
    /// defaults of `shared-cpu-1x`.
    pub fn check(&self) -> Result<(), GuestError> {
        let kind = self.cpu_kind.as_deref().unwrap_or(CPU_KIND_SHARED);
        let cpus = self.cpus.unwrap_or(1);
        if cpus == 0 {
            return Err(GuestError::NoCpus);
        }
        let (min, max) = memory_range_mb(kind, cpus).ok_or_else(|| GuestError::CpuKind(kind.to_owned()))?;
        if let Some(memory_mb) = self.memory_mb
            && !(min..=max).contains(&memory_mb)
        {
            return Err(GuestError::Memory {
                memory_mb,
                cpus,
                cpu_kind: kind.to_owned(),
                min,
                max,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_fly_sizes() {
        let p = GuestPreset::find("shared-cpu-4x").unwrap();
        assert_eq!((p.cpus, p.memory_mb, p.cpu_kind), (4, 1024, "shared"));
        let p = GuestPreset::find("performance-16x").unwrap();
        assert_eq!((p.cpus, p.memory_mb), (16, 32768));
        let g = GuestPreset::find("a100-40gb").unwrap().to_guest();
        assert_eq!(g.gpu_kind.as_deref(), Some("a100-pcie-40gb"));
        assert_eq!(g.gpus, Some(1));
        assert!(GuestPreset::find("shared-cpu-3x").is_none());
        assert!(GuestPreset::find(DEFAULT_VM_SIZE).is_some());
        assert!(GuestPreset::find(DEFAULT_GPU_VM_SIZE).is_some());
        for p in GUEST_PRESETS {
            p.to_guest().check().unwrap();
        }
    }

    #[test]
    fn memory_limits_follow_cpus() {
        let guest = |kind: &str, cpus, mem| MachineGuest {
            cpu_kind: Some(kind.to_owned()),
            cpus: Some(cpus),
            memory_mb: Some(mem),
            ..MachineGuest::default()
        };
        assert!(guest("shared", 1, 2048).check().is_ok());
        assert!(guest("shared", 1, 4096).check().is_err());
        assert!(guest("performance", 2, 2048).check().is_err());
        assert!(guest("performance", 2, 4096).check().is_ok());
        assert!(matches!(
            guest("turbo", 1, 256).check(),
            Err(GuestError::CpuKind(_))
        ));
        assert_eq!(guest("shared", 0, 256).check(), Err(GuestError::NoCpus));
    }
}
