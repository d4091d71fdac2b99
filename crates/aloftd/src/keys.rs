//! The sealing keys aloftd is given (app secrets, the agent's secrets, the edge's certificate
//! keys; docs/keys.md): one [`KeyKind`] per kind says how its messages name it and which flag
//! gives its previous keys; [`KeyKind::keyring`] builds its ring from the key files, with the
//! hint its errors end with; [`KeyKind::log_reseal`] tells what re-sealing did; and
//! [`print_key_ids`] is `aloftd key-id FILE…`, which prints the id of each key file (the id sealed
//! values record and errors about a missing key name).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aloft_secretbox::{Key, Keyring};
use anyhow::Context as _;

/// One kind of sealing key.
#[derive(Debug)]
pub(crate) struct KeyKind {
    /// How messages name it (`secrets key`); its log lines start with `aloftd: {log}:`.
    pub(crate) name: &'static str,
    /// Its log lines' label.
    pub(crate) log: &'static str,
    /// The (repeatable) flag that gives a previous key file.
    pub(crate) previous_flag: &'static str,
    /// The flag's environment variable (files separated by `:`).
    pub(crate) previous_env: &'static str,
    /// Who is given the key file (`aloftd`, `this edge`).
    pub(crate) given_to: &'static str,
    /// Another way out, after the flag (empty: none).
    pub(crate) otherwise: &'static str,
}

/// App secrets in the control store (`<data dir>/secrets.key`).
pub(crate) const SECRETS: KeyKind = KeyKind {
    name: "secrets key",
    log: "secrets",
    previous_flag: "--secrets-key-previous",
    previous_env: "ALOFT_SECRETS_KEY_PREVIOUS",
    given_to: "aloftd",
    otherwise: "",
};

/// The copy of machines' secrets the agent keeps for their boots (`<data dir>/agent-secrets.key`).
pub(crate) const AGENT_SECRETS: KeyKind = KeyKind {
    name: "agent secrets key",
    log: "agent secrets",
    previous_flag: "--agent-secrets-key-previous",
    previous_env: "ALOFT_AGENT_SECRETS_KEY_PREVIOUS",
    given_to: "aloftd",
    otherwise: ", or update the machine so that it gets the app's secrets again",
};

/// Custom domains' private keys in the control store (`--edge-cert-key`).
pub(crate) const EDGE_CERT: KeyKind = KeyKind {
    name: "edge certificate key",
    log: "edge certificate",
    previous_flag: "--edge-cert-key-previous",
    previous_env: "ALOFT_EDGE_CERT_KEY_PREVIOUS",
    given_to: "this edge",
    otherwise: ", or re-issue the certificate with `aloft certs check`",
};

impl KeyKind {
    /// What an error about a value whose key is not configured ends with: the flag that gives
    /// it, and the command that tells which file has that id.
    pub(crate) fn hint(&self) -> String {
        format!(
            "give {} the key file with that id with {} FILE ({}; `aloftd key-id FILE…` prints key files' ids){}",
            self.given_to, self.previous_flag, self.previous_env, self.otherwise
        )
    }

    /// The ring: `current` seals, the `previous` key files (which must exist: they are never
    /// created) only open; errors about a missing key end with [`KeyKind::hint`].
    pub(crate) fn keyring(&self, current: Key, previous: &[PathBuf]) -> anyhow::Result<Keyring> {
        let mut ring = Keyring::new(current).with_hint(self.hint());
        for p in previous {
            let key = Key::load(p).with_context(|| {
                format!(
                    "open the previous {} {} ({})",
                    self.name,
                    p.display(),
                    self.previous_flag
                )
            })?;
            ring = ring.with_previous(key);
        }
        Ok(ring)
    }

    /// Logs the ring when it has previous keys (`aloftd: {log} keys: current ID (FILE),
    /// previous ID (FILE)`).
    pub(crate) fn log_keys(&self, keys: &Keyring) {
        if !keys.previous().is_empty() {
            eprintln!("aloftd: {} keys: {}", self.log, keys.describe());
        }
    }

    /// Tells what re-sealing did: `resealed` (e.g. `2 secret(s) of 1 app(s)`; `None`: nothing),
    /// the values no key opened, and `left` (values left for the next start, said as given);
    /// with previous keys and nothing unopened or left, that the previous key files can go.
    /// Counts, names and key ids only: never a value.
    pub(crate) fn log_reseal(
        &self,
        keys: &Keyring,
        resealed: Option<String>,
        unreadable: &[String],
        left: &[String],
    ) {
        let current = keys.current().id();
        if let Some(what) = resealed {
            eprintln!(
                "aloftd: {}: re-sealed {what} with the current {} {current}",
                self.log, self.name
            );
        }
        for problem in unreadable {
            eprintln!("aloftd: {}: cannot open {problem}", self.log);
        }
        for line in left {
            eprintln!("aloftd: {}: {line}", self.log);
        }
        if !keys.previous().is_empty() && unreadable.is_empty() && left.is_empty() {
            eprintln!(
                "aloftd: {}: everything is sealed with the current key {current}; the previous key files can be dropped",
                self.log
            );
        }
    }
}

/// `ID  FILE`: the id of the key in `path` (which must be a key file: 32 bytes, mode 0600).
pub(crate) fn key_id_line(path: &Path) -> Result<String, aloft_secretbox::SecretboxError> {
    let key = Key::load(path)?;
    Ok(format!("{}  {}", key.id(), path.display()))
}

/// `aloftd key-id FILE…`: prints `ID  FILE` for each key file; a file that is no key file is
/// an error on stderr, and the exit code says whether any was.
pub(crate) fn print_key_ids(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for f in files {
        match key_id_line(f) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("aloftd: key-id: {e}");
                ok = false;
            }
        }
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_flag_and_the_key_id_command() {
        for kind in [&SECRETS, &AGENT_SECRETS, &EDGE_CERT] {
            let hint = kind.hint();
            for part in [kind.previous_flag, kind.previous_env, "aloftd key-id FILE"] {
                assert!(hint.contains(part), "{part:?} missing: {hint}");
            }
        }
    }

    #[test]
    fn a_missing_previous_key_file_is_refused_naming_its_flag() {
        let dir = tempfile::tempdir().unwrap();
        let current = Key::load_or_create(&dir.path().join("a.key")).unwrap();
        let missing = dir.path().join("old.key");
        let e = format!(
            "{:#}",
            AGENT_SECRETS
                .keyring(current, std::slice::from_ref(&missing))
                .unwrap_err()
        );
        assert!(
            e.contains("previous agent secrets key") && e.contains("--agent-secrets-key-previous"),
            "{e}"
        );
        assert!(!missing.exists(), "a previous key file is never created");
    }

    #[test]
    fn key_id_prints_the_id_a_missing_key_error_names() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.key"), dir.path().join("b.key"));
        let sealed = Key::load_or_create(&a).unwrap().seal(b"v", b"ad").unwrap();
        let ring = SECRETS.keyring(Key::load_or_create(&b).unwrap(), &[]).unwrap();
        let e = ring.open(&sealed, b"ad").unwrap_err().to_string();
        assert!(e.contains("aloftd key-id"), "{e}");
        let line = key_id_line(&a).unwrap();
        let (id, file) = line.split_once("  ").unwrap();
        assert_eq!(file, a.display().to_string());
        assert!(e.contains(&format!("sealed with key {id}")), "{id} not in: {e}");
        // With A as previous key it opens, and the ring names both files.
        let ring = SECRETS
            .keyring(Key::load(&b).unwrap(), std::slice::from_ref(&a))
            .unwrap();
        assert_eq!(ring.open(&sealed, b"ad").unwrap(), b"v");
        assert!(
            ring.describe()
                .contains(&format!("previous {id} ({})", a.display()))
        );
        // Not a key file: an error, not an id.
        std::fs::write(dir.path().join("short.key"), b"abc").unwrap();
        assert!(key_id_line(&dir.path().join("short.key")).is_err());
        assert!(key_id_line(&dir.path().join("none.key")).is_err());
    }
}
