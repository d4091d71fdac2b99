//! Parses and expands config files, printing warnings, errors and each group's machine config
//! as JSON (mounts described, local files replaced by a placeholder).

use aloft_config::{ExpandOptions, MountPolicy, ReadFile};

struct Placeholder;

impl ReadFile for Placeholder {
    fn read(&self, _: &str) -> std::io::Result<Vec<u8>> {
        Ok(b"placeholder".to_vec())
    }
}

fn main() {
    for arg in std::env::args().skip(1) {
        let path = std::path::Path::new(&arg);
        let loaded = match aloft_config::load(path) {
            Ok(l) => l,
            Err(e) => {
                println!("{e}");
                continue;
            }
        };
        if std::env::var_os("SHOW_TOML").is_some() {
            match loaded.config.to_toml() {
                Ok(t) => println!("{t}"),
                Err(e) => println!("{e}"),
            }
        }
        if !loaded.warnings.is_empty() {
            println!("{}", loaded.warnings());
        }
        let opts = ExpandOptions {
            image: None,
            mounts: MountPolicy::Describe,
            files: &Placeholder,
        };
        match loaded.config.expand(&opts) {
            Ok(groups) => {
                for g in groups {
                    match serde_json::to_string(&g.config) {
                        Ok(json) => println!("{arg} [{}] {json}", g.group),
                        Err(e) => println!("{arg} [{}] {e}", g.group),
                    }
                }
            }
            Err(e) => println!("{e}"),
        }
    }
}
