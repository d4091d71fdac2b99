//! `aloft certs …` end to end: the real `aloftd` with its edge on free loopback ports, a temporary
//! data directory and config home, and the real `aloft`. A custom domain is added, the edge issues
//! it with its local CA, `aloft certs root` prints that CA's root, and curl (when installed) trusts
//! the edge's HTTPS for the app's name and the custom domain through that root alone.
//!
//! `aloftd` is a binary of another package: build the workspace first (see `tests/common`).

mod common;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::common::{FakeAloftd as Env, free_port};

    /// aloftd with its edge: plain HTTP on a free port, HTTPS on `https_port`.
    fn start(https_port: u16) -> Env {
        Env::start_with(&[
            "--edge-http",
            &format!("127.0.0.1:{}", free_port()),
            "--edge-https",
            &format!("127.0.0.1:{https_port}"),
            "--edge-metrics",
            "off",
        ])
    }

    /// `curl https://{host}:{port}/` resolved to loopback, trusting only `cacert` (or the system's
    /// roots with `None`); its exit code, or `None` when curl is not installed.
    fn curl(host: &str, port: u16, cacert: Option<&PathBuf>) -> Option<i32> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-o", "/dev/null", "--max-time", "10", "--resolve"])
            .arg(format!("{host}:{port}:127.0.0.1"))
            .arg(format!("https://{host}:{port}/"))
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(ca) = cacert {
            cmd.arg("--cacert").arg(ca);
        }
        cmd.status().ok().map(|s| s.code().unwrap_or(-1))
    }

    #[test]
    fn add_show_list_root_check_remove() {
        let https = free_port();
        let env = start(https);
        env.ok(&["apps", "create", "web"]);

        let out = env.ok(&["certs", "add", "www.example.test", "-a", "web"]);
        assert!(out.contains("Added www.example.test to app web"), "{out}");
        assert!(out.contains("CNAME www.example.test -> web.localhost"), "{out}");

        // The edge issues it with its local CA.
        let deadline = Instant::now() + Duration::from_secs(30);
        let shown: Value = loop {
            let json = env.ok(&["certs", "show", "www.example.test", "-a", "web", "--json"]);
            let v: Value = serde_json::from_str(&json).unwrap();
            if v["status"] == "ready" {
                break v;
            }
            assert!(Instant::now() < deadline, "never ready: {v}");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(shown["source"], "local");
        assert!(
            shown["issuer"].as_str().unwrap().starts_with("aloft local CA "),
            "{shown}"
        );
        let list = env.ok(&["certs", "list", "-a", "web"]);
        assert!(
            list.lines()
                .any(|l| l.starts_with("www.example.test") && l.contains("ready")),
            "{list}"
        );

        // The root is the edge's file.
        let root = env.ok(&["certs", "root"]);
        assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
        let on_disk =
            std::fs::read_to_string(env.path("data").join("edge").join("ca").join("ca.pem")).unwrap();
        assert_eq!(root, on_disk);
        let ca = env.path("ca.pem");
        std::fs::write(&ca, &root).unwrap();

        // curl trusts the edge through that root, for the app's name and the custom domain.
        match curl("web.localhost", https, Some(&ca)) {
            None => eprintln!("curl is not installed: the HTTPS checks are skipped"),
            Some(code) => {
                assert_eq!(code, 0, "curl --cacert to web.localhost");
                assert_eq!(curl("www.example.test", https, Some(&ca)), Some(0));
                // Without the root: an unknown issuer (60); a name the edge has none for fails too.
                assert_eq!(curl("web.localhost", https, None), Some(60));
                assert_ne!(curl("unknown.example.test", https, Some(&ca)), Some(0));
            }
        }

        // check on a ready certificate leaves it ready; unknown hostnames say so; remove.
        let out = env.ok(&["certs", "check", "www.example.test", "-a", "web"]);
        assert!(out.contains("Status    ready"), "{out}");
        let out = env.aloft(&["certs", "show", "nope.example.test", "-a", "web"]);
        assert_eq!(out.status.code(), Some(3));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("app web has no certificate for nope.example.test"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = env.aloft(&["certs", "add", "web.localhost", "-a", "web"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("base domain"));
        env.ok(&["certs", "remove", "www.example.test", "-a", "web"]);
        let list = env.ok(&["certs", "list", "-a", "web", "--json"]);
        assert_eq!(
            serde_json::from_str::<Value>(&list).unwrap(),
            Value::Array(vec![])
        );
    }
}
