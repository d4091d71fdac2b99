//! A real OCI registry for tests and benchmarks: Debian's `docker-registry` (CNCF distribution)
//! on 127.0.0.1 with a free port and filesystem storage in a temporary directory.
//!
//! The fixture owns exactly one process: it kills and reaps that child on drop (by its handle,
//! never by name), and removes the storage.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use crate::{FixtureError, process};

/// Where Debian installs the registry (package `docker-registry`, installed by `scripts/setup.sh`).
pub(crate) const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `/v2/`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running `docker-registry` on loopback.
#[derive(Debug)]
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Registry {
    /// Starts a registry with storage in a fresh temporary directory and waits until `/v2/`
    /// answers. Fails (loudly) when the binary is missing: `scripts/setup.sh` installs it.
    pub fn start() -> Result<Self, FixtureError> {
        if !Path::new(REGISTRY_BIN).is_file() {
            return Err(FixtureError::MissingTool {
                path: PathBuf::from(REGISTRY_BIN),
                package: "docker-registry",
            });
        }
        let dir = std::env::temp_dir().join(format!("aloft-registry-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(dir.join("storage")).map_err(|source| FixtureError::Io {
            what: "create registry directory",
            path: dir.clone(),
            source,
        })?;
        // The port is found by binding :0 and released before the registry binds it; another
        // process may take it in between, so a registry that dies at start is retried.
        let mut last = None;
        for _ in 0..5 {
            match Self::start_in(&dir) {
                Ok(registry) => return Ok(registry),
                Err(e) => last = Some(e),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last.unwrap_or_else(|| FixtureError::Command {
            command: REGISTRY_BIN.to_owned(),
            stderr: "did not start".to_owned(),
        }))
    }

    /// How aloft's registry client reaches this registry (plain HTTP on loopback).
    pub fn client_config(&self) -> aloft_image::RegistryConfig {
        aloft_image::RegistryConfig {
            insecure: vec![self.host()],
            ..aloft_image::RegistryConfig::default()
        }
    }

    /// Pushes the busybox base image (`aloft images bootstrap busybox`) as `HOST/busybox:latest`.
    pub fn push_busybox(&self) -> Result<aloft_image::bootstrap::Bootstrapped, FixtureError> {
        use aloft_image::bootstrap::{BootstrapOptions, bootstrap_busybox};
        let target =
            aloft_image::Reference::parse(&format!("{}/busybox:latest", self.host())).map_err(|e| {
                FixtureError::Command {
                    command: "push busybox".to_owned(),
                    stderr: e.to_string(),
                }
            })?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| FixtureError::Io {
                what: "start a tokio runtime to push busybox",
                path: PathBuf::new(),
                source,
            })?;
        rt.block_on(bootstrap_busybox(
            &self.client_config(),
            &target,
            &BootstrapOptions::default(),
        ))
        .map_err(FixtureError::Bootstrap)
    }

    fn start_in(dir: &Path) -> Result<Self, FixtureError> {
        let addr = free_port()?;
        let config = dir.join("config.yml");
        let storage = dir.join("storage");
        let yaml = format!(
            "version: 0.1\n\
             log:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  \
             maintenance:\n    uploadpurging:\n      enabled: false\n\
             http:\n  addr: {addr}\n",
            storage.display()
        );
        std::fs::write(&config, yaml).map_err(|source| FixtureError::Io {
            what: "write registry config",
            path: config.clone(),
            source,
        })?;
        let log_path = dir.join("registry.log");
        let mut cmd = Command::new(REGISTRY_BIN);
        cmd.arg("serve").arg(&config).env_remove("REGISTRY_HTTP_ADDR");
        process::log_into(&mut cmd, &log_path)?;
        let child = cmd.spawn().map_err(|source| FixtureError::Io {
            what: "spawn",
            path: PathBuf::from(REGISTRY_BIN),
            source,
        })?;
        // On failure, dropping `registry` kills and reaps it.
        let mut registry = Self {
            child,
            addr,
            dir: dir.to_path_buf(),
        };
        process::wait_ready(
            &mut registry.child,
            &format!("{REGISTRY_BIN} serve {}", config.display()),
            &log_path,
            READY_TIMEOUT,
            "/v2/ did not answer",
            || v2_answers(addr),
        )?;
        Ok(registry)
    }

    /// `127.0.0.1:PORT`: the registry part of image references.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The storage root (distribution's filesystem driver layout under `docker/registry/v2`).
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.join("storage")
    }

    /// Where the registry keeps the bytes of blob `sha256:<hex>` (tests corrupt it on purpose).
    pub fn blob_data_path(&self, hex: &str) -> PathBuf {
        let prefix = hex.get(..2).unwrap_or(hex);
        self.storage_dir()
            .join("docker/registry/v2/blobs/sha256")
            .join(prefix)
            .join(hex)
            .join("data")
    }

    /// The registry's own log (stdout and stderr).
    pub fn log(&self) -> String {
        process::read_log(&self.dir.join("registry.log"))
    }

    /// The process id of the registry this fixture started.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Exactly the child we spawned, through its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A loopback address with a port nobody listens on right now.
fn free_port() -> Result<SocketAddr, FixtureError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|source| FixtureError::Io {
        what: "bind a free port",
        path: PathBuf::from("127.0.0.1:0"),
        source,
    })?;
    listener.local_addr().map_err(|source| FixtureError::Io {
        what: "read the bound address",
        path: PathBuf::from("127.0.0.1:0"),
        source,
    })
}

/// Whether `GET /v2/` answers with HTTP 200.
fn v2_answers(addr: SocketAddr) -> bool {
    process::http_get_200(addr, "/v2/", Duration::from_secs(1)).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_answers_and_stops() {
        let registry = Registry::start().expect("docker-registry starts (scripts/setup.sh)");
        assert!(v2_answers(registry.addr()));
        let pid = registry.pid();
        let addr = registry.addr();
        let dir = registry.storage_dir();
        assert!(dir.is_dir());
        drop(registry);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                // A zombie would still be listed; wait() reaped it, so only pid reuse remains.
                let stat = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                !stat.contains("docker-registry")
            }
        );
        assert!(!v2_answers(addr));
        assert!(!dir.exists());
    }
}
