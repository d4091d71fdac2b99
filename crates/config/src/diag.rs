//! Where a problem is (line, column, key) and the errors this crate returns.

use std::fmt;
use std::path::PathBuf;

/// A place in the config file: 1-based line and column, and the key path (`services[0].ports[1].port`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Origin {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub column: usize,
    /// The key path, e.g. `http_service.internal_port` or `mounts[0]`.
    pub key: String,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.key)
    }
}

/// A problem found in a config file (an error or a warning).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where.
    pub origin: Origin,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `LINE:COLUMN: KEY: MESSAGE`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.origin, self.message)
    }
}

/// A list of diagnostics, each printed as `PATH:LINE:COLUMN: KEY: MESSAGE` on its own line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    /// The file they are about.
    pub path: PathBuf,
    /// The problems, in file order.
    pub items: Vec<Diagnostic>,
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.items.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{d}", self.path.display())?;
        }
        Ok(())
    }
}

/// Why a config could not be found, read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Neither `aloft.toml` nor `fly.toml` is in the directory.
    #[error(
        "no aloft.toml or fly.toml in {}; run `aloft launch` to create one, or pass --config PATH",
        dir.display()
    )]
    NotFound {
        /// The directory searched.
        dir: PathBuf,
    },
    /// The file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("{}:{line}:{column}: not valid TOML: {message}", path.display())]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file is TOML but not a valid app config.
    #[error("{0}")]
    Invalid(Diagnostics),
    /// The config could not be written out as TOML.
    #[error("render the config as TOML")]
    Render(#[source] toml::ser::Error),
}

/// Why a config could not be turned into machine configs.
#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    /// One or more keys can't be expanded (mounts before volumes exist, unreadable files …).
    #[error("{0}")]
    Invalid(Diagnostics),
}

impl ExpandError {
    /// The problems.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            Self::Invalid(d) => &d.items,
        }
    }
}
