//! A cgroup parent of one's own for jailed machines, removed with everything under it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A cgroup parent (a name relative to each hierarchy's root, for `JailSpec::cgroup_parent` or
/// aloftd's `--cgroup-parent`) unique to this process and fixture. Dropping it removes the
/// machines' cgroups left under it (their processes must have ended: kill them first) and the
/// parent itself, in every hierarchy (cgroup v2's root, v1's `cpu` and `memory`).
#[derive(Debug)]
pub struct CgroupParent {
    name: String,
}

impl CgroupParent {
    /// A new name, `aloft-test-<pid>-<n>`; nothing is created until a machine is jailed under it.
    pub fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        Self {
            name: format!(
                "aloft-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ),
        }
    }

    /// Adopts the fixed parent `name` (one a benchmark reuses from run to run): dropping it removes
    /// what is left under it and itself, as for [`CgroupParent::new`]'s.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    /// The parent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where machine `name`'s cgroup is (or would be) under this parent, in every hierarchy a
    /// jailed machine joins (cgroup v2's root, v1's `cpu` and `memory`): a test can check that
    /// none is left.
    pub fn machine_dirs(&self, name: &str) -> Vec<PathBuf> {
        self.hierarchy_dirs().into_iter().map(|d| d.join(name)).collect()
    }

    fn hierarchy_dirs(&self) -> Vec<PathBuf> {
        ["/sys/fs/cgroup", "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory"]
            .iter()
            .map(|root| PathBuf::from(root).join(&self.name))
            .collect()
    }

    fn dirs(&self) -> Vec<PathBuf> {
        self.hierarchy_dirs().into_iter().filter(|d| d.is_dir()).collect()
    }
}

impl Default for CgroupParent {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        // Machines' cgroups are directories of their own under the parent; a cgroup is removed
        // with rmdir once no process is in it. A process killed just before leaves it as it
        // exits: give that a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            let mut left = false;
            for dir in self.dirs() {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.file_type().is_ok_and(|t| t.is_dir()) && std::fs::remove_dir(e.path()).is_err() {
                            left = true;
                        }
                    }
                }
                if std::fs::remove_dir(&dir).is_err() {
                    left = true;
                }
            }
            if !left || std::time::Instant::now() > deadline {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}
