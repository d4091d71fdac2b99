//! The `aloft` CLI's config file, which aloftd writes on its first start.
//!
//! `config.toml` under `$XDG_CONFIG_HOME/aloft/` (else `~/.config/aloft/`), mode 0600, with
//! `api_url` and `token`. Other keys already in the file are kept.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

/// Where the CLI's config lives for this user.
pub(crate) fn path() -> anyhow::Result<PathBuf> {
    let from_env = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
    };
    if let Some(dir) = from_env("XDG_CONFIG_HOME") {
        return Ok(dir.join("aloft").join("config.toml"));
    }
    match from_env("HOME") {
        Some(home) => Ok(home.join(".config").join("aloft").join("config.toml")),
        None => bail!("neither XDG_CONFIG_HOME nor HOME is set to an absolute path"),
    }
}

/// Sets `api_url` and `token` in the config at `path`, keeping its other keys; the file is
/// replaced atomically and readable by its owner only.
pub(crate) fn write(path: &Path, api_url: &str, token: &str) -> anyhow::Result<()> {
    let mut table = match fs::read_to_string(path) {
        Ok(text) => text
            .parse::<toml::Table>()
            .with_context(|| format!("{} is not valid TOML; fix it or move it away", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => toml::Table::new(),
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    table.insert("api_url".to_owned(), api_url.into());
    table.insert("token".to_owned(), token.into());
    let text = toml::to_string(&table).context("encode the CLI config")?;

    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent directory", path.display()))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let tmp = dir.join(".config.toml.tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writes_owner_only_and_keeps_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("aloft").join("config.toml");
        write(&path, "http://127.0.0.1:1", "aloft_a").unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        fs::write(&path, "app = \"web\"\ntoken = \"old\"\n").unwrap();
        write(&path, "http://127.0.0.1:2", "aloft_b").unwrap();
        let table: toml::Table = fs::read_to_string(&path).unwrap().parse().unwrap();
        assert_eq!(table["app"].as_str(), Some("web"));
        assert_eq!(table["token"].as_str(), Some("aloft_b"));
        assert_eq!(table["api_url"].as_str(), Some("http://127.0.0.1:2"));
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn broken_configs_are_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        fs::write(&path, "this is [ not toml").unwrap();
        let e = write(&path, "http://x", "t").unwrap_err();
        assert!(format!("{e:#}").contains("not valid TOML"));
        assert_eq!(fs::read_to_string(&path).unwrap(), "this is [ not toml");
    }
}
