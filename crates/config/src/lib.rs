//! aloft's app config: `aloft.toml`, with fly.toml's schema and defaults. An existing `fly.toml`
//! is read unchanged when there is no `aloft.toml`.
//!
//! [`load`] finds and reads the file, [`parse`] decodes text with fly.toml's tolerances (see
//! `docs/config.md`), validation reports every problem at once with its line and key, and
//! [`AppConfig::expand`] turns the config into one Machines API `MachineConfig` per process group.
//! Unknown keys are warnings, never errors.
//!
//! ```
//! use std::path::Path;
//! use aloft_config::{DiskFiles, ExpandOptions, MountPolicy};
//!
//! let text = "app = 'demo'\n[http_service]\ninternal_port = '3000'\nauto_stop_machines = true\n";
//! let loaded = aloft_config::parse(text, Path::new("fly.toml")).expect("valid");
//! let files = DiskFiles::next_to(Path::new("fly.toml"));
//! let opts = ExpandOptions { image: Some("registry.local/demo:1"), mounts: MountPolicy::Refuse, files: &files };
//! let groups = loaded.config.expand(&opts).expect("expands");
//! let service = &groups[0].config.services[0];
//! assert_eq!(groups[0].group, "app");
//! assert_eq!(service.internal_port, Some(3000));
//! assert_eq!(service.ports.len(), 2); // 80 (http) and 443 (http + tls)
//! ```
//!
//! Depends on `aloft-api` for the wire types and on nothing else of aloft; it must not depend on
//! the client, the server or any runtime. The only I/O is reading the config file and, during
//! expansion, `[[files]] local_path` through [`ReadFile`]. Synchronous, no threads.

#![warn(missing_docs)]

mod decode;
mod diag;
mod expand;
mod node;
mod schema;
mod validate;

use std::path::{Path, PathBuf};

pub use diag::{ConfigError, Diagnostic, Diagnostics, ExpandError, Origin};
pub use expand::{
    DiskFiles, ExpandOptions, METADATA_PLATFORM_VERSION, METADATA_PROCESS_GROUP, MountPolicy,
    ProcessGroupConfig, RELEASE_COMMAND_GROUP, ReadFile,
};
pub use schema::{
    AppConfig, Build, Compute, DEFAULT_INTERNAL_PORT, DEPLOY_STRATEGIES, Deploy, Experimental, FileConfig,
    FileSource, HttpService, MAX_KILL_TIMEOUT_SECS, Metrics, Mount, Restart, Service, TopLevelCheck,
};
pub use validate::DEFAULT_GROUP;

impl AppConfig {
    /// The config as `aloft.toml` text: normalised (one spelling per key, tables for list
    /// sections, durations as strings), and parsing it again gives the same config.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(ConfigError::Render)
    }
}

/// The file names looked for, in order.
pub const CONFIG_NAMES: [&str; 2] = ["aloft.toml", "fly.toml"];

/// A config that parsed and validated, with its warnings.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The config.
    pub config: AppConfig,
    /// Problems that don't stop it (unknown keys, legacy settings, clamped check durations).
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    /// The warnings, printable as `PATH:LINE:COLUMN: KEY: MESSAGE` lines.
    pub fn warnings(&self) -> Diagnostics {
        Diagnostics {
            path: self.config.path.clone(),
            items: self.warnings.clone(),
        }
    }
}

/// The config file of a directory: `aloft.toml`, else `fly.toml`.
pub fn find(dir: &Path) -> Result<PathBuf, ConfigError> {
    CONFIG_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ConfigError::NotFound {
            dir: dir.to_path_buf(),
        })
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and validates config text; `path` is used in messages and to find `[[files]]`.
pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let (line, column) = node::LineIndex::new(text).locate(text, offset);
        ConfigError::Syntax {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    let root = node::Node::from_document(doc);
    let mut ctx = decode::Ctx::new(text);
    let mut config = schema::decode_app(&mut ctx, &root);
    config.path = path.to_path_buf();
    validate::validate(&mut ctx, &config);
    let by_place = |d: &Diagnostic| (d.origin.line, d.origin.column);
    ctx.errors.sort_by_key(by_place);
    ctx.warnings.sort_by_key(by_place);
    if ctx.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: ctx.warnings,
        })
    } else {
        Err(ConfigError::Invalid(Diagnostics {
            path: path.to_path_buf(),
            items: ctx.errors,
        }))
    }
}
