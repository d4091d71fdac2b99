//! `aloft images …` end to end: the real binary against a real registry (Debian's
//! `docker-registry`, started by the testkit) and a throwaway data directory.

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::process::{Command, Output};
    use std::time::{Duration, Instant};

    use aloft_testkit::Registry;
    use anyhow::{Context as _, Result, ensure};
    use serde_json::Value;

    /// Runs `aloft --data-dir DATA --registry REGISTRY ARGS…` with no `ALOFT_*` from outside.
    fn aloft(data: &Path, registry: &str, args: &[&str]) -> Result<Output> {
        let out = Command::new(env!("CARGO_BIN_EXE_aloft"))
            .arg("--data-dir")
            .arg(data)
            .args(["--registry", registry])
            .args(args)
            .env_remove("ALOFT_REGISTRY")
            .env_remove("ALOFT_DATA_DIR")
            .env("ALOFT_CACHE", data.join("cache"))
            .output()
            .with_context(|| format!("run aloft {args:?}"))?;
        Ok(out)
    }

    fn ok(out: &Output) -> Result<String> {
        ensure!(
            out.status.success(),
            "aloft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout.clone())?)
    }

    fn json(out: &Output) -> Result<Value> {
        let stdout = ok(out)?;
        serde_json::from_str(&stdout).with_context(|| format!("stdout is not JSON: {stdout}"))
    }

    fn stderr(out: &Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    #[test]
    fn bootstrap_list_pull_and_rm_with_json() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let data = tempfile::tempdir()?;
        let d = data.path();

        let pushed = json(&aloft(d, &host, &["images", "bootstrap", "busybox", "--json"])?)?;
        let pushed = &pushed.as_array().context("bootstrap --json prints an array")?[0];
        assert_eq!(pushed["name"], "busybox");
        assert_eq!(pushed["reference"], format!("{host}/busybox:latest"));
        let digest = pushed["digest"].as_str().context("digest")?.to_owned();
        assert!(digest.starts_with("sha256:"));

        // Bootstrapping pushes; nothing is pulled yet.
        assert_eq!(
            json(&aloft(d, &host, &["images", "list", "--json"])?)?,
            Value::Array(vec![])
        );

        let out = aloft(d, &host, &["images", "pull", "busybox", "--json"])?;
        let pulled = json(&out)?;
        assert!(
            stderr(&out).contains(&format!("pulling {host}/busybox:latest")),
            "{}",
            stderr(&out)
        );
        assert_eq!(pulled["reference"], format!("{host}/busybox:latest"));
        assert_eq!(pulled["digest"], digest.as_str());
        assert_eq!(pulled["layers"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            pulled["layers"][0]["media_type"],
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(pulled["config"]["cmd"], serde_json::json!(["/bin/sh"]));
        assert_eq!(pulled["warnings"], serde_json::json!([]));
        let base = pulled["rootfs"]["path"]
            .as_str()
            .context("rootfs path")?
            .to_owned();
        assert!(Path::new(&base).is_file(), "{base}");
        assert!(pulled["rootfs"]["disk_bytes"].as_u64() > Some(0));

        // Pulling again finds everything cached, the base included.
        let again = json(&aloft(d, &host, &["images", "pull", "busybox", "--json"])?)?;
        assert_eq!(again["rootfs"]["reused"], true);

        let listed = json(&aloft(d, &host, &["images", "list", "--json"])?)?;
        let listed = listed.as_array().context("list --json prints an array")?;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0]["reference"], format!("{host}/busybox:latest"));
        assert_eq!(listed[0]["repository"], "busybox");
        assert_eq!(listed[0]["tag"], "latest");
        assert_eq!(listed[0]["digest"], digest.as_str());
        assert_eq!(listed[0]["complete"], true);
        assert_eq!(listed[0]["rootfs"], base.as_str());
        assert_eq!(listed[0]["size"], pulled["size"]);

        let table = ok(&aloft(d, &host, &["images", "list"])?)?;
        assert!(table.starts_with("REPOSITORY"), "{table}");
        assert!(
            table.contains(&format!("{host}/busybox")) && table.contains("latest"),
            "{table}"
        );

        // What a cached image needs survives garbage collection, whatever the budget.
        let gc = ["images", "gc", "--grace", "0", "--json"];
        let kept = json(&aloft(d, &host, &gc)?)?;
        assert_eq!(kept["freed"], 0, "{kept}");
        assert_eq!(kept["over_budget"], true, "{kept}");
        assert!(Path::new(&base).is_file(), "gc kept the base of a cached image");

        let removed = ok(&aloft(d, &host, &["images", "rm", "busybox"])?)?;
        assert!(
            removed.contains(&format!("removed {host}/busybox:latest")),
            "{removed}"
        );
        // Its blobs (manifest, config, layer) are garbage now; a second pass finds nothing.
        let collected = json(&aloft(d, &host, &gc)?)?;
        let kinds: Vec<_> = collected["removed"]
            .as_array()
            .context("removed is an array")?
            .iter()
            .map(|r| r["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(kinds, ["blob", "blob", "blob"], "{collected}");
        assert!(collected["freed"].as_u64() > Some(0), "{collected}");
        assert_eq!(collected["used_after"], 0, "{collected}");
        assert_eq!(json(&aloft(d, &host, &gc)?)?["freed"], 0);
        let bad = aloft(d, &host, &["images", "gc", "--budget", "lots"])?;
        assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
        assert!(stderr(&bad).contains("invalid size"), "{}", stderr(&bad));
        assert!(!Path::new(&base).exists(), "the base goes with the image");
        assert_eq!(
            json(&aloft(d, &host, &["images", "list", "--json"])?)?,
            Value::Array(vec![])
        );

        let twice = aloft(d, &host, &["images", "rm", "busybox"])?;
        assert_eq!(twice.status.code(), Some(3));
        assert!(
            stderr(&twice).contains("image not found locally"),
            "{}",
            stderr(&twice)
        );
        Ok(())
    }

    #[test]
    fn unknown_tag_and_repository_name_the_image_and_registry() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let data = tempfile::tempdir()?;
        ok(&aloft(data.path(), &host, &["images", "bootstrap", "busybox"])?)?;

        let out = aloft(data.path(), &host, &["images", "pull", "busybox:nope"])?;
        assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("image not found: busybox:nope in {host}")),
            "{}",
            stderr(&out)
        );
        let out = aloft(data.path(), &host, &["images", "pull", "no/such-repo"])?;
        assert_eq!(out.status.code(), Some(3));
        assert!(stderr(&out).contains(&format!("image not found: no/such-repo:latest in {host}")));
        // Nothing was recorded.
        assert_eq!(
            json(&aloft(data.path(), &host, &["images", "list", "--json"])?)?,
            Value::Array(vec![])
        );
        Ok(())
    }

    #[test]
    fn registry_that_is_down_fails_after_retries_without_hanging() -> Result<()> {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let host = format!("127.0.0.1:{port}");
        let data = tempfile::tempdir()?;
        let started = Instant::now();
        let out = aloft(data.path(), &host, &["images", "pull", "busybox"])?;
        let took = started.elapsed();
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "registry {host} is not reachable (is it running? scripts/registry.sh start)"
            )),
            "{err}"
        );
        assert!(err.contains("attempt 1 failed"), "retries are shown: {err}");
        assert!(took < Duration::from_secs(30), "gave up after {took:?}");

        let out = aloft(data.path(), &host, &["images", "bootstrap", "busybox"])?;
        assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
        assert!(stderr(&out).contains("is not reachable"));
        Ok(())
    }

    #[test]
    fn bad_input_is_a_clear_error() -> Result<()> {
        let data = tempfile::tempdir()?;
        let out = aloft(data.path(), "127.0.0.1:1", &["images", "pull", "Not/Lowercase"])?;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("invalid repository"), "{}", stderr(&out));

        let out = aloft(data.path(), "bad registry!", &["images", "list"])?;
        assert_eq!(out.status.code(), Some(1));
        assert!(stderr(&out).contains("invalid --registry"), "{}", stderr(&out));

        let out = aloft(data.path(), "127.0.0.1:1", &["images", "bootstrap", "windows"])?;
        assert_eq!(out.status.code(), Some(2), "clap usage error");

        // An empty data directory lists nothing, as an empty JSON array.
        assert_eq!(
            json(&aloft(data.path(), "127.0.0.1:1", &["images", "list", "--json"])?)?,
            Value::Array(vec![])
        );
        Ok(())
    }
}
