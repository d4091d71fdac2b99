//! Invalid configs and the exact messages aloft gives for them: every `tests/invalid/NAME.toml`
//! has its expected output (errors from loading, else from expansion) in `NAME.expected`, each
//! line `FILE:LINE:COLUMN: KEY: MESSAGE`. Run with `ALOFT_BLESS=1` to rewrite the expectations
//! after a deliberate change, then review the diff.

#[cfg(test)]
mod tests {
    use std::path::Path;

    use aloft_config::{DiskFiles, ExpandOptions, MountPolicy};

    fn outcome(path: &Path) -> Option<String> {
        let loaded = match aloft_config::load(path) {
            Ok(l) => l,
            Err(e) => return Some(e.to_string()),
        };
        let files = DiskFiles::next_to(path);
        let opts = ExpandOptions {
            image: Some("registry.example/app:1"),
            mounts: MountPolicy::Refuse,
            files: &files,
        };
        loaded.config.expand(&opts).err().map(|e| e.to_string())
    }

    #[test]
    fn invalid_configs_fail_with_their_expected_messages() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/invalid");
        let bless = std::env::var_os("ALOFT_BLESS").is_some();
        let mut entries: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "toml"))
            .collect();
        entries.sort();
        assert!(entries.len() >= 30, "the invalid corpus went missing");
        let mut failures = Vec::new();
        for path in entries {
            let Some(message) = outcome(&path) else {
                failures.push(format!("{}: was accepted", path.display()));
                continue;
            };
            let message = message.replace(&format!("{}/", dir.display()), "") + "\n";
            let expected_path = path.with_extension("expected");
            if bless {
                std::fs::write(&expected_path, &message).unwrap();
                continue;
            }
            let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
            if message != expected {
                failures.push(format!(
                    "{}:\n  expected: {expected}  actual:   {message}",
                    path.display()
                ));
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
