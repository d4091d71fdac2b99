//! What every command needs: where the local data lives, which registry to talk to and, for the
//! commands that use it, aloftd's API (URL and token).

use std::path::{Path, PathBuf};
use std::time::Duration;

use aloft_image::unpack::UnpackLimits;
use aloft_image::{Puller, Reference, RegistryConfig, RootfsFormat, RootfsStore};
use anyhow::Context as _;
use clap::Args;

use crate::errors::UserError;

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
    /// aloftd's API token [default: $ALOFT_API_TOKEN, $FLY_API_TOKEN, else the CLI config's].
    #[arg(
        short = 't',
        long,
        global = true,
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub(crate) access_token: Option<String>,
    /// aloftd's API URL [default: $ALOFT_API_URL, else the CLI config's, else
    /// http://127.0.0.1:4280].
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) api_url: Option<String>,
}

/// The resolved settings of one invocation.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) data_dir: PathBuf,
    pub(crate) registry: String,
    pub(crate) registry_config: RegistryConfig,
    /// `--access-token` and `--api-url`, which win over the environment and the config.
    pub(crate) api_flags: ApiFlags,
}

/// The API settings given on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ApiFlags {
    pub(crate) token: Option<String>,
    pub(crate) url: Option<String>,
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
        let non_empty = |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
        Ok(Self {
            data_dir,
            registry,
            registry_config,
            api_flags: ApiFlags {
                token: non_empty(args.access_token),
                url: non_empty(args.api_url),
            },
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

    /// Whether the platform registry speaks plain HTTP: on loopback, or `--insecure-registry`.
    pub(crate) fn registry_insecure(&self) -> bool {
        self.registry_config.insecure.contains(&self.registry) || crate::errors::is_loopback(&self.registry)
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

/// The API URL when neither `$ALOFT_API_URL` nor the config names one (aloftd's default).
pub(crate) const DEFAULT_API_URL: &str = "http://127.0.0.1:4280";

/// Where aloftd's API is and the token to use, with where each came from (for error hints).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiSettings {
    pub(crate) url: String,
    pub(crate) token: String,
    /// `$ALOFT_API_TOKEN`, `$FLY_API_TOKEN` or the config file's path.
    pub(crate) token_source: String,
}

impl Context {
    /// A client of aloftd's API, set up from the environment and the CLI config (see
    /// [`api_settings`]). Resolved per command, so commands that don't use the API (`images`,
    /// `config`) never need a token.
    pub(crate) fn api_client(&self) -> anyhow::Result<(aloft_client::Client, ApiSettings)> {
        let settings = api_settings(&self.api_flags, &|name| std::env::var(name).ok())?;
        let client = aloft_client::Client::new(&settings.url, &settings.token).with_context(|| {
            format!(
                "use the API at {} with the token from {}",
                settings.url, settings.token_source
            )
        })?;
        Ok((client, settings))
    }
}

/// The CLI config aloftd writes on its first start: `$XDG_CONFIG_HOME/aloft/config.toml`, else
/// `~/.config/aloft/config.toml` (only absolute directories count, as in aloftd).
pub(crate) fn cli_config_path(env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let dir = |name: &str| env(name).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(dir) = dir("XDG_CONFIG_HOME") {
        return Some(dir.join("aloft").join("config.toml"));
    }
    dir("HOME").map(|home| home.join(".config").join("aloft").join("config.toml"))
}

/// The API settings: `--api-url` over `$ALOFT_API_URL` over the config's `api_url` over
/// [`DEFAULT_API_URL`]; `--access-token`, then `$ALOFT_API_TOKEN`, then `$FLY_API_TOKEN`, over the
/// config's `token`. Empty values count as unset. A config that exists but can't be read or
/// parsed is an error; no token at all is one that says how to get one.
pub(crate) fn api_settings(
    flags: &ApiFlags,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<ApiSettings> {
    let var = |name: &str| env(name).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let path = cli_config_path(env);
    let file = match &path {
        Some(path) => read_cli_config(path)?,
        None => toml::Table::new(),
    };
    let from_file = |key: &str| -> anyhow::Result<Option<String>> {
        match file.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.trim().to_owned()).filter(|s| !s.is_empty())),
            Some(_) => Err(UserError {
                message: format!(
                    "{key} in {} is not a string",
                    path.as_deref()
                        .map_or_else(String::new, |p| p.display().to_string())
                ),
                hint: Some(format!("write it as {key} = \"...\"")),
                code: 1,
            }
            .into()),
        }
    };
    let url = match flags.url.clone().or_else(|| var("ALOFT_API_URL")) {
        Some(url) => url,
        None => from_file("api_url")?.unwrap_or_else(|| DEFAULT_API_URL.to_owned()),
    };
    let config_name = path.as_deref().map_or_else(
        || "~/.config/aloft/config.toml".to_owned(),
        |p| p.display().to_string(),
    );
    let (token, token_source) = if let Some(t) = flags.token.clone() {
        (t, "--access-token".to_owned())
    } else if let Some(t) = var("ALOFT_API_TOKEN") {
        (t, "$ALOFT_API_TOKEN".to_owned())
    } else if let Some(t) = var("FLY_API_TOKEN") {
        (t, "$FLY_API_TOKEN".to_owned())
    } else if let Some(t) = from_file("token")? {
        (t, config_name)
    } else {
        return Err(UserError {
            message: format!(
                "no API token: start aloftd once (it writes {config_name}) or set ALOFT_API_TOKEN"
            ),
            hint: None,
            code: 1,
        }
        .into());
    };
    Ok(ApiSettings {
        url,
        token,
        token_source,
    })
}

fn read_cli_config(path: &Path) -> anyhow::Result<toml::Table> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse::<toml::Table>()
            .with_context(|| format!("{} is not valid TOML; fix it or move it away", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
        Err(e) => Err(e).with_context(|| format!("read the CLI config {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn settings(vars: &[(&str, &str)]) -> anyhow::Result<ApiSettings> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        api_settings(&ApiFlags::default(), &|name| vars.get(name).cloned())
    }

    #[test]
    fn flags_win_over_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().to_str().unwrap().to_owned();
        let flags = ApiFlags {
            token: Some("flag".into()),
            url: Some("http://flag:1".into()),
        };
        let env = |name: &str| match name {
            "XDG_CONFIG_HOME" => Some(xdg.clone()),
            "ALOFT_API_TOKEN" => Some("env".into()),
            "ALOFT_API_URL" => Some("http://env:1".into()),
            _ => None,
        };
        let s = api_settings(&flags, &env).unwrap();
        assert_eq!(
            (s.url.as_str(), s.token.as_str(), s.token_source.as_str()),
            ("http://flag:1", "flag", "--access-token")
        );
        let s = api_settings(&ApiFlags::default(), &env).unwrap();
        assert_eq!((s.url.as_str(), s.token.as_str()), ("http://env:1", "env"));
    }

    #[test]
    fn the_config_file_is_read_and_env_overrides_it() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().to_str().unwrap();
        std::fs::create_dir(dir.path().join("aloft")).unwrap();
        let path = dir.path().join("aloft/config.toml");
        std::fs::write(
            &path,
            "api_url = \"http://127.0.0.1:9\"\ntoken = \"aloft_file\"\n",
        )
        .unwrap();

        let s = settings(&[("XDG_CONFIG_HOME", xdg), ("HOME", "/nonexistent")]).unwrap();
        assert_eq!(s.url, "http://127.0.0.1:9");
        assert_eq!(s.token, "aloft_file");
        assert_eq!(s.token_source, path.display().to_string());

        let s = settings(&[("XDG_CONFIG_HOME", xdg), ("FLY_API_TOKEN", "fly")]).unwrap();
        assert_eq!(
            (s.token.as_str(), s.token_source.as_str()),
            ("fly", "$FLY_API_TOKEN")
        );
        let s = settings(&[
            ("XDG_CONFIG_HOME", xdg),
            ("FLY_API_TOKEN", "fly"),
            ("ALOFT_API_TOKEN", "env"),
            ("ALOFT_API_URL", "http://h:1"),
        ])
        .unwrap();
        assert_eq!((s.url.as_str(), s.token.as_str()), ("http://h:1", "env"));

        // HOME/.config when XDG_CONFIG_HOME is unset or relative.
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join(".config/aloft")).unwrap();
        std::fs::write(home.path().join(".config/aloft/config.toml"), "token = \"h\"\n").unwrap();
        let s = settings(&[
            ("XDG_CONFIG_HOME", "rel"),
            ("HOME", home.path().to_str().unwrap()),
        ])
        .unwrap();
        assert_eq!((s.url.as_str(), s.token.as_str()), (DEFAULT_API_URL, "h"));
    }

    #[test]
    fn no_token_and_broken_configs_say_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let xdg = dir.path().to_str().unwrap();
        let e = settings(&[("XDG_CONFIG_HOME", xdg), ("ALOFT_API_TOKEN", " ")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "no API token: start aloftd once (it writes {}/aloft/config.toml) or set ALOFT_API_TOKEN",
                dir.path().display()
            )
        );
        let e = settings(&[]).unwrap_err();
        assert!(e.to_string().contains("~/.config/aloft/config.toml"), "{e}");

        std::fs::create_dir(dir.path().join("aloft")).unwrap();
        std::fs::write(dir.path().join("aloft/config.toml"), "token = [").unwrap();
        let e = settings(&[("XDG_CONFIG_HOME", xdg)]).unwrap_err();
        assert!(format!("{e:#}").contains("not valid TOML"), "{e:#}");
        std::fs::write(dir.path().join("aloft/config.toml"), "token = 1").unwrap();
        let e = settings(&[("XDG_CONFIG_HOME", xdg)]).unwrap_err();
        assert!(e.to_string().contains("token in"), "{e}");
    }
}
