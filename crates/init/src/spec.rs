//! What to run and how, decided from the run config: argv, environment, program lookup, stop
//! signal, `/etc/hosts` and `/etc/resolv.conf` contents. Pure except [`find_program`], which
//! looks at the filesystem.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use aloft_guest_proto::RunConfig;

pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The workload's argv: `exec` replaces everything; otherwise entrypoint ++ cmd, where an
/// entrypoint override drops the image's cmd unless cmd is overridden too (as Docker does).
pub(crate) fn workload_argv(cfg: &RunConfig) -> Result<Vec<String>, String> {
    let argv = if let Some(exec) = &cfg.exec {
        exec.clone()
    } else {
        let entrypoint = cfg.entrypoint.as_ref().unwrap_or(&cfg.image.entrypoint);
        let cmd = match (&cfg.cmd, &cfg.entrypoint) {
            (Some(cmd), _) => cmd.as_slice(),
            (None, Some(_)) => &[],
            (None, None) => cfg.image.cmd.as_slice(),
        };
        entrypoint.iter().chain(cmd).cloned().collect()
    };
    if argv.is_empty() {
        return Err("no command to run: the image has no ENTRYPOINT or CMD and none was given".to_owned());
    }
    Ok(argv)
}

/// Sets `key` in an ordered environment, replacing an earlier value in place.
pub(crate) fn set_env(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => value.clone_into(&mut slot.1),
        None => env.push((key.to_owned(), value.to_owned())),
    }
}

pub(crate) fn get_env<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// The workload's environment: image env, then the machine's env, then platform vars (they win);
/// PATH and HOME filled in when unset (`home` from the user's passwd entry, else `/`).
pub(crate) fn build_env(cfg: &RunConfig, home: Option<&str>) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for kv in &cfg.image.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => set_env(&mut env, k, v),
            _ => {}
        }
    }
    for (k, v) in &cfg.env {
        set_env(&mut env, k, v);
    }
    for (k, v) in cfg.runtime.vars() {
        set_env(&mut env, &k, &v);
    }
    if get_env(&env, "PATH").is_none() {
        set_env(&mut env, "PATH", DEFAULT_PATH);
    }
    if get_env(&env, "HOME").is_none() {
        set_env(&mut env, "HOME", home.unwrap_or("/"));
    }
    env
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Finds `prog` like execvp: with a `/` it is taken as is (relative to `workdir`), otherwise each
/// `PATH` entry is tried. The error names what the user asked for.
pub(crate) fn find_program(prog: &str, path_var: &str, workdir: &str) -> Result<PathBuf, String> {
    let not_found = || format!("executable not found: {prog}");
    if prog.is_empty() {
        return Err(not_found());
    }
    if prog.contains('/') {
        let p = Path::new(workdir).join(prog);
        return if is_executable(&p) {
            Ok(p)
        } else {
            Err(not_found())
        };
    }
    path_var
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(prog))
        .map(|p| {
            if p.is_relative() {
                Path::new(workdir).join(p)
            } else {
                p
            }
        })
        .find(|p| is_executable(p))
        .ok_or_else(not_found)
}

/// `SIGTERM`, `TERM` or a number → the signal number.
pub(crate) fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    Some(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "ABRT" => libc::SIGABRT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "PIPE" => libc::SIGPIPE,
        "ALRM" => libc::SIGALRM,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        "PWR" => libc::SIGPWR,
        _ => return None,
    })
}

/// The graceful-stop signal: run config's, else the image's `StopSignal`, else SIGINT (as Fly).
pub(crate) fn stop_signal(cfg: &RunConfig) -> i32 {
    cfg.stop_signal
        .as_deref()
        .and_then(parse_signal)
        .or_else(|| cfg.image.stop_signal.as_deref().and_then(parse_signal))
        .unwrap_or(libc::SIGINT)
}

/// `/etc/hosts`: localhost, the machine's own address → hostname and `fly-global-services`,
/// then the extra lines.
///
/// `fly-global-services` is where apps written for Fly bind their UDP services: the edge sends a
/// UDP service's datagrams to the machine's private address (and takes answers only from
/// there), so the name resolves to that address.
pub(crate) fn hosts_file(cfg: &RunConfig) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    let own = if cfg.runtime.private_ip.is_empty() {
        cfg.network
            .as_ref()
            .and_then(|n| n.addresses.first())
            .map(|a| a.addr.to_string())
    } else {
        Some(cfg.runtime.private_ip.clone())
    };
    if let Some(ip) = own {
        if !cfg.hostname.is_empty() {
            s.push_str(&format!("{ip}\t{}\n", cfg.hostname));
        }
        s.push_str(&format!("{ip}\tfly-global-services\n"));
    }
    for h in &cfg.etc_hosts {
        s.push_str(&format!("{}\t{}\n", h.ip, h.names.join(" ")));
    }
    s
}

/// `/etc/resolv.conf`, or `None` when no nameservers are configured (keep the image's).
pub(crate) fn resolv_conf(cfg: &RunConfig) -> Option<String> {
    if cfg.dns.nameservers.is_empty() {
        return None;
    }
    let mut s = String::new();
    for ns in &cfg.dns.nameservers {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    if !cfg.dns.search.is_empty() {
        s.push_str(&format!("search {}\n", cfg.dns.search.join(" ")));
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use aloft_guest_proto::{EtcHost, NetConfig, RuntimeEnv};

    use super::*;

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    fn image_cfg() -> RunConfig {
        let mut cfg = RunConfig::default();
        cfg.image.entrypoint = v(&["/docker-entrypoint.sh"]);
        cfg.image.cmd = v(&["nginx", "-g", "daemon off;"]);
        cfg
    }

    #[test]
    fn argv_precedence() {
        let mut cfg = image_cfg();
        assert_eq!(
            workload_argv(&cfg).unwrap(),
            v(&["/docker-entrypoint.sh", "nginx", "-g", "daemon off;"])
        );
        cfg.cmd = Some(v(&["sh"]));
        assert_eq!(workload_argv(&cfg).unwrap(), v(&["/docker-entrypoint.sh", "sh"]));
        cfg.entrypoint = Some(v(&["/bin/busybox"]));
        assert_eq!(workload_argv(&cfg).unwrap(), v(&["/bin/busybox", "sh"]));
        cfg.cmd = None;
        assert_eq!(
            workload_argv(&cfg).unwrap(),
            v(&["/bin/busybox"]),
            "entrypoint override drops cmd"
        );
        cfg.exec = Some(v(&["/bin/true"]));
        assert_eq!(workload_argv(&cfg).unwrap(), v(&["/bin/true"]));
    }

    #[test]
    fn no_command_is_an_error() {
        let err = workload_argv(&RunConfig::default()).unwrap_err();
        assert_eq!(
            err,
            "no command to run: the image has no ENTRYPOINT or CMD and none was given"
        );
        let mut cfg = image_cfg();
        cfg.entrypoint = Some(vec![]);
        assert!(workload_argv(&cfg).is_err());
    }

    #[test]
    fn env_layers_and_defaults() {
        let mut cfg = RunConfig::default();
        cfg.image.env = v(&["A=image", "B=image=with=equals", "FLY_REGION=spoofed", "junk"]);
        cfg.env.insert("A".into(), "user".into());
        cfg.env.insert("C".into(), "user".into());
        cfg.runtime = RuntimeEnv {
            region: "ams".into(),
            ..RuntimeEnv::default()
        };
        let env = build_env(&cfg, Some("/home/app"));
        assert_eq!(get_env(&env, "A"), Some("user"));
        assert_eq!(get_env(&env, "B"), Some("image=with=equals"));
        assert_eq!(get_env(&env, "C"), Some("user"));
        assert_eq!(get_env(&env, "FLY_REGION"), Some("ams"));
        assert_eq!(get_env(&env, "ALOFT_REGION"), Some("ams"));
        assert_eq!(get_env(&env, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(get_env(&env, "HOME"), Some("/home/app"));
        assert_eq!(env[0].0, "A", "image order is kept");

        cfg.image.env.push("PATH=/app/bin".into());
        cfg.env.insert("HOME".into(), "/data".into());
        let env = build_env(&cfg, None);
        assert_eq!(get_env(&env, "PATH"), Some("/app/bin"));
        assert_eq!(get_env(&env, "HOME"), Some("/data"));
        assert_eq!(
            get_env(&build_env(&RunConfig::default(), None), "HOME"),
            Some("/")
        );
    }

    #[test]
    fn program_lookup_in_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let exe = bin.join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = bin.join("data");
        std::fs::write(&data, "x").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = format!("/nonexistent:{}", bin.display());
        let root = dir.path().to_str().unwrap();

        assert_eq!(find_program("tool", &path, "/").unwrap(), exe);
        assert_eq!(find_program(exe.to_str().unwrap(), "", "/").unwrap(), exe);
        assert_eq!(
            find_program("bin/tool", "", root).unwrap(),
            dir.path().join("bin/tool")
        );
        assert_eq!(
            find_program("data", &path, "/").unwrap_err(),
            "executable not found: data"
        );
        assert_eq!(
            find_program("bin", root, "/").unwrap_err(),
            "executable not found: bin"
        );
        assert_eq!(
            find_program("/app/x", &path, "/").unwrap_err(),
            "executable not found: /app/x"
        );
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("SIGTERM"), Some(15));
        assert_eq!(parse_signal("TERM"), Some(15));
        assert_eq!(parse_signal("sigint"), Some(2));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal("SIGBOGUS"), None);
        assert_eq!(parse_signal("0"), None);
        let mut cfg = RunConfig::default();
        assert_eq!(stop_signal(&cfg), libc::SIGINT);
        cfg.image.stop_signal = Some("SIGQUIT".into());
        assert_eq!(stop_signal(&cfg), libc::SIGQUIT);
        cfg.stop_signal = Some("TERM".into());
        assert_eq!(stop_signal(&cfg), libc::SIGTERM);
    }

    #[test]
    fn fly_global_services_is_the_machines_private_address() {
        let mut cfg = RunConfig::default();
        assert!(
            !hosts_file(&cfg).contains("fly-global-services"),
            "no address, no line"
        );
        cfg.network = Some(NetConfig {
            addresses: vec!["fdaa::2/64".parse().unwrap()],
            gateways: vec![],
            mtu: None,
        });
        // Without a hostname too.
        assert!(hosts_file(&cfg).contains("fdaa::2\tfly-global-services\n"));
        // The private address the edge sends to wins over the first interface address.
        cfg.runtime.private_ip = "fdaa:0:1::7".into();
        cfg.hostname = "m1".into();
        let hosts = hosts_file(&cfg);
        assert!(hosts.contains("fdaa:0:1::7\tfly-global-services\n"), "{hosts}");
        assert!(!hosts.contains("fdaa::2\tfly-global-services"), "{hosts}");
        assert_eq!(hosts.matches("fly-global-services").count(), 1);
    }

    #[test]
    fn hosts_and_resolv() {
        let mut cfg = RunConfig {
            hostname: "m1".into(),
            ..RunConfig::default()
        };
        cfg.network = Some(NetConfig {
            addresses: vec!["fdaa::2/64".parse().unwrap()],
            gateways: vec![],
            mtu: None,
        });
        cfg.etc_hosts.push(EtcHost {
            ip: "10.0.0.9".parse().unwrap(),
            names: v(&["db", "db.internal"]),
        });
        let hosts = hosts_file(&cfg);
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost"));
        assert!(hosts.contains("fdaa::2\tm1\n"));
        assert!(hosts.ends_with("10.0.0.9\tdb db.internal\n"));
        cfg.runtime.private_ip = "fdaa::3".into();
        assert!(hosts_file(&cfg).contains("fdaa::3\tm1\n"));

        assert_eq!(resolv_conf(&cfg), None);
        cfg.dns.nameservers = vec!["fdaa::3".parse().unwrap(), "1.1.1.1".parse().unwrap()];
        cfg.dns.search = v(&["internal"]);
        assert_eq!(
            resolv_conf(&cfg).unwrap(),
            "nameserver fdaa::3\nnameserver 1.1.1.1\nsearch internal\n"
        );
    }
}
