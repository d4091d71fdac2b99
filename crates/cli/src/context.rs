//! What every command needs: where the local data lives and which registry to talk to.

use std::path::PathBuf;
use std::time::Duration;

use aloft_image::unpack::UnpackLimits;
use aloft_image::{Puller, Reference, RegistryConfig, RootfsFormat, RootfsStore};
use anyhow::Context as _;
use clap::Args;

/// Flags shared by every command (accepted before or after the subcommand).
#[derive(Debug, Clone, Args)]
pub(crate) struct GlobalArgs {
    /// Local data directory (image cache, embedded registry) [default: ~/.local/share/aloft].
    #[arg(long, global = true, env = "ALOFT_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The platform's registry, HOST or HOST:PORT; names without a registry resolve against it.
    #[arg(
        long,
        global = true,
        env = "ALOFT_REGISTRY",
        default_value = "127.0.0.1:5000",
        value_name = "HOST:PORT"
    )]
    pub(crate) registry: String,
    /// Talk plain HTTP to --registry even though it is not on loopback.
    #[arg(long, global = true)]
    pub(crate) insecure_registry: bool,
}

/// The resolved settings of one invocation.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) data_dir: PathBuf,
    pub(crate) registry: String,
    pub(crate) registry_config: RegistryConfig,
}

impl Context {
    pub(crate) fn new(args: GlobalArgs) -> anyhow::Result<Self> {
        let data_dir = match args.data_dir.filter(|d| !d.as_os_str().is_empty()) {
            Some(dir) => dir,
            None => default_data_dir()?,
        };
        let registry = args.registry.trim().trim_end_matches('/').to_owned();
        // Validates the registry the same way image references do.
        Reference::parse_with_default_registry("x", &registry)
            .with_context(|| format!("invalid --registry {registry:?}: expected HOST[:PORT]"))?;
        let mut registry_config = RegistryConfig {
            // A CLI user waits: fail in seconds, not minutes, when nothing answers.
            connect_timeout: Duration::from_secs(5),
            ..RegistryConfig::default()
        };
        if args.insecure_registry {
            registry_config.insecure.push(registry.clone());
        }
        Ok(Self {
            data_dir,
            registry,
            registry_config,
        })
    }

    /// Image cache root: `blobs/`, `images/` (records) and, with the agent, base root filesystems.
    pub(crate) fn image_dir(&self) -> PathBuf {
        self.data_dir.join("image")
    }

    /// A puller over the local cache.
    pub(crate) fn puller(&self) -> anyhow::Result<Puller> {
        Puller::new(&self.image_dir(), self.registry_config.clone())
            .with_context(|| format!("open the image cache in {}", self.image_dir().display()))
    }

    /// The base root filesystems (`<image dir>/rootfs`), built in the default format.
    pub(crate) fn rootfs(&self) -> anyhow::Result<RootfsStore> {
        RootfsStore::open(
            &self.image_dir(),
            RootfsFormat::default(),
            UnpackLimits::default(),
        )
        .with_context(|| format!("open the base root filesystems in {}", self.image_dir().display()))
    }

    /// `input` as a reference; names without a registry are in `--registry`.
    pub(crate) fn reference(&self, input: &str) -> anyhow::Result<Reference> {
        Ok(Reference::parse_with_default_registry(input, &self.registry)?)
    }
}

fn default_data_dir() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("no data directory: set --data-dir, $ALOFT_DATA_DIR or $HOME")?;
    Ok(PathBuf::from(home).join(".local/share/aloft"))
}
