//! From an image's config to what `aloft-init` runs: the OCI `config` section (Entrypoint, Cmd,
//! Env, WorkingDir, User, ExposedPorts, StopSignal, Labels) mapped onto guest-proto's
//! [`aloft_guest_proto::ImageConfig`].
//!
//! Images come from strangers and old tools, so the mapping is lenient where Docker is: an unset
//! Entrypoint or Cmd is empty, an empty WorkingDir or User is unset, a bare `80` in ExposedPorts is
//! `80/tcp`. What cannot be used is dropped and reported as a [`RunConfigWarning`] rather than
//! making the image unrunnable: malformed Env entries, unparsable ports, a relative WorkingDir
//! (made absolute, as Docker resolves it against `/`). Pure: no I/O.

use std::fmt;

use aloft_guest_proto::{ExposedPort, ImageConfig as GuestImageConfig};

use crate::manifest::ImageConfig;

/// Something in an image config that was dropped or adjusted on the way to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunConfigWarning {
    /// An `Env` entry that is not `KEY=VALUE` with a non-empty key; dropped.
    BadEnv { entry: String },
    /// An `ExposedPorts` key that is not `PORT[/tcp|udp|sctp]`; dropped.
    BadPort { key: String },
    /// A relative `WorkingDir`; resolved against `/`.
    RelativeWorkingDir { working_dir: String },
}

impl fmt::Display for RunConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadEnv { entry } => write!(f, "ignored Env entry {entry:?}: expected KEY=VALUE"),
            Self::BadPort { key } => {
                write!(
                    f,
                    "ignored ExposedPorts key {key:?}: expected PORT/PROTO such as 8080/tcp"
                )
            }
            Self::RelativeWorkingDir { working_dir } => {
                write!(f, "WorkingDir {working_dir:?} is relative; using /{working_dir}")
            }
        }
    }
}

/// The guest's image config for `config`, and what had to be dropped or adjusted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestConfig {
    /// What init receives as `RunConfig::image`.
    pub image: GuestImageConfig,
    /// Parts of the image config that were not usable as they were.
    pub warnings: Vec<RunConfigWarning>,
}

/// Maps an image config onto the run config's image section (see the module doc).
pub fn guest_image_config(config: &ImageConfig) -> GuestConfig {
    let mut warnings = Vec::new();
    let non_empty = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };

    let env = config
        .env
        .iter()
        .filter(|entry| {
            let ok = entry
                .split_once('=')
                .is_some_and(|(k, _)| !k.is_empty() && !k.contains('\0'));
            if !ok {
                warnings.push(RunConfigWarning::BadEnv {
                    entry: (*entry).clone(),
                });
            }
            ok
        })
        .cloned()
        .collect();

    let working_dir = non_empty(&config.working_dir).map(|dir| {
        if dir.starts_with('/') {
            dir
        } else {
            warnings.push(RunConfigWarning::RelativeWorkingDir {
                working_dir: dir.clone(),
            });
            format!("/{dir}")
        }
    });

    let mut exposed_ports: Vec<ExposedPort> = config
        .exposed_ports
        .iter()
        .filter_map(|key| match key.parse() {
            Ok(port) => Some(port),
            Err(_) => {
                warnings.push(RunConfigWarning::BadPort { key: key.clone() });
                None
            }
        })
        .collect();
    exposed_ports.sort();
    exposed_ports.dedup();

    GuestConfig {
        image: GuestImageConfig {
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
            env,
            working_dir,
            user: non_empty(&config.user),
            stop_signal: non_empty(&config.stop_signal),
            exposed_ports,
            labels: config.labels.clone(),
        },
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use aloft_guest_proto::PortProtocol;

    use super::*;
    use crate::manifest::parse_config;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn full_config_maps_every_field() {
        let body = br#"{
            "architecture": "amd64", "os": "linux",
            "config": {
                "Entrypoint": ["/docker-entrypoint.sh"],
                "Cmd": ["nginx", "-g", "daemon off;"],
                "Env": ["PATH=/usr/local/sbin:/usr/bin", "NGINX_VERSION=1.25.3", "EMPTY="],
                "WorkingDir": "/srv",
                "User": "101:101",
                "ExposedPorts": {"80/tcp": {}, "53/udp": {}, "8080": {}},
                "StopSignal": "SIGQUIT",
                "Labels": {"maintainer": "NGINX <docker-maint@nginx.com>"}
            },
            "rootfs": {"type": "layers", "diff_ids": []}
        }"#;
        let out = guest_image_config(&parse_config(body).unwrap());
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let image = out.image;
        assert_eq!(image.entrypoint, strings(&["/docker-entrypoint.sh"]));
        assert_eq!(image.cmd, strings(&["nginx", "-g", "daemon off;"]));
        assert_eq!(
            image.env,
            strings(&["PATH=/usr/local/sbin:/usr/bin", "NGINX_VERSION=1.25.3", "EMPTY="])
        );
        assert_eq!(image.working_dir.as_deref(), Some("/srv"));
        assert_eq!(image.user.as_deref(), Some("101:101"));
        assert_eq!(image.stop_signal.as_deref(), Some("SIGQUIT"));
        let ports: Vec<String> = image.exposed_ports.iter().map(ToString::to_string).collect();
        assert_eq!(ports, strings(&["53/udp", "80/tcp", "8080/tcp"]));
        assert_eq!(image.exposed_ports[0].protocol, PortProtocol::Udp);
        assert_eq!(image.labels["maintainer"], "NGINX <docker-maint@nginx.com>");
    }

    #[test]
    fn missing_config_section_and_fields_give_an_empty_config() {
        for body in [
            &br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#[..],
            br#"{"config":null}"#,
            br#"{"config":{}}"#,
            br#"{"config":{"Entrypoint":null,"Cmd":null,"Env":null,"ExposedPorts":null,"Labels":null}}"#,
            br#"{"config":{"WorkingDir":"","User":"","StopSignal":""}}"#,
        ] {
            let out = guest_image_config(&parse_config(body).unwrap());
            assert_eq!(out, GuestConfig::default(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn empty_entrypoint_is_kept_distinct_from_cmd() {
        let out =
            guest_image_config(&parse_config(br#"{"config":{"Entrypoint":[],"Cmd":["/bin/sh"]}}"#).unwrap());
        assert!(out.image.entrypoint.is_empty());
        assert_eq!(out.image.cmd, strings(&["/bin/sh"]));
    }

    #[test]
    fn odd_ports_env_and_working_dir_are_dropped_or_fixed_with_warnings() {
        let body = br#"{"config":{
            "ExposedPorts": {"8080/tcp": {}, "8080/TCP": {}, "53/udp": {}, "0/tcp": {}, "70000/tcp": {},
                             "http": {}, "80/icmp": {}, "8000-8010/tcp": {}, "": {}},
            "Env": ["GOOD=1", "junk", "=novalue", "ALSO_GOOD=a=b"],
            "WorkingDir": "app",
            "User": "  nobody  "
        }}"#;
        let out = guest_image_config(&parse_config(body).unwrap());
        let ports: Vec<String> = out.image.exposed_ports.iter().map(ToString::to_string).collect();
        assert_eq!(
            ports,
            strings(&["53/udp", "8080/tcp"]),
            "duplicates merged, bad ones dropped"
        );
        assert_eq!(out.image.env, strings(&["GOOD=1", "ALSO_GOOD=a=b"]));
        assert_eq!(out.image.working_dir.as_deref(), Some("/app"));
        assert_eq!(out.image.user.as_deref(), Some("nobody"));
        let bad_ports: Vec<&str> = out
            .warnings
            .iter()
            .filter_map(|w| match w {
                RunConfigWarning::BadPort { key } => Some(key.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            bad_ports,
            ["", "0/tcp", "70000/tcp", "80/icmp", "8000-8010/tcp", "http"]
        );
        assert!(
            out.warnings
                .contains(&RunConfigWarning::BadEnv { entry: "junk".into() })
        );
        assert!(out.warnings.contains(&RunConfigWarning::BadEnv {
            entry: "=novalue".into()
        }));
        assert!(out.warnings.contains(&RunConfigWarning::RelativeWorkingDir {
            working_dir: "app".into()
        }));
        assert!(out.warnings.iter().all(|w| !w.to_string().is_empty()));
    }

    #[test]
    fn mapped_config_reaches_init_as_json() {
        let body = br#"{"config":{"Cmd":["/bin/sh"],"ExposedPorts":{"80/tcp":{}},"Labels":{"a":"b"}}}"#;
        let image = guest_image_config(&parse_config(body).unwrap()).image;
        let json = serde_json::to_string(&image).unwrap();
        assert!(json.contains(r#""exposed_ports":["80/tcp"]"#) && json.contains(r#""labels":{"a":"b"}"#));
        let back: GuestImageConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, image);
    }
}
