//! `aloft deploy --build-only` runs buildah for real: a Dockerfile FROM the busybox of a test
//! registry (testkit's `docker-registry` on a free loopback port) is built and pushed to that
//! registry, which must then list the tag; a failing step is named with its output.
//!
//! buildah comes from `scripts/setup.sh` (Debian's package); a missing buildah fails these tests.
//! Its storage is the CLI's data directory in a temporary directory (vfs: nothing stays mounted),
//! removed afterwards. `--build-only` needs no aloftd; the last test deploys the build on a real
//! VM through the aloftd built next to `aloft` (`cargo build --workspace`).

mod common;

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};
    use std::net::TcpStream;
    use std::path::Path;
    use std::process::{Command, Output, Stdio};

    use aloft_testkit::Registry;

    fn aloft(dir: &Path, registry: &Registry, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_aloft"))
            .args(args)
            .current_dir(dir.join("app"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .env("HOME", dir.join("home"))
            .env("ALOFT_DATA_DIR", dir.join("data"))
            .env("ALOFT_REGISTRY", registry.host())
            .env_remove("ALOFT_API_URL")
            .env_remove("ALOFT_API_TOKEN")
            .env_remove("FLY_API_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn setup(dockerfile: &str) -> (tempfile::TempDir, Registry) {
        assert!(
            Command::new("buildah")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success()),
            "buildah is not installed: scripts/setup.sh installs it (apt-get install buildah)"
        );
        let registry = Registry::start().unwrap();
        registry.push_busybox().unwrap();
        let dir = tempfile::tempdir().unwrap();
        for d in ["app", "config", "home", "data"] {
            std::fs::create_dir(dir.path().join(d)).unwrap();
        }
        let dockerfile = dockerfile.replace("REGISTRY", &registry.host());
        std::fs::write(dir.path().join("app/Dockerfile"), dockerfile).unwrap();
        std::fs::write(
            dir.path().join("app/aloft.toml"),
            "app = 'web'\n[http_service]\ninternal_port = 8080\n",
        )
        .unwrap();
        (dir, registry)
    }

    /// `GET /v2/NAME/tags/list` of the registry, the body.
    fn tags(registry: &Registry, name: &str) -> String {
        let mut conn = TcpStream::connect(registry.addr()).unwrap();
        write!(
            conn,
            "GET /v2/{name}/tags/list HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            registry.host()
        )
        .unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).unwrap();
        response
    }

    fn text(out: &Output) -> String {
        format!(
            "status {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    #[test]
    fn build_only_builds_with_buildah_and_pushes_the_tag() {
        // A short name: it resolves to the platform registry, not to the host's short-name
        // aliases (Debian's containers-common maps `busybox` to Docker Hub).
        let (dir, registry) = setup("FROM busybox\nRUN echo hi > /hi\n");
        let out = aloft(
            dir.path(),
            &registry,
            &["deploy", "--build-only", "--build-arg", "X=1"],
        );
        assert!(out.status.success(), "{}", text(&out));
        let image = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let prefix = format!("{}/web:deployment-", registry.host());
        assert!(image.starts_with(&prefix), "{image}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("STEP 2/2: RUN echo hi > /hi"), "{stderr}");
        let tag = image.rsplit_once(':').unwrap().1;
        let listed = tags(&registry, "web");
        assert!(listed.starts_with("HTTP/1.1 200"), "{listed}");
        assert!(listed.contains(tag), "{tag} not in {listed}");

        // aloft's own registry client pulls what buildah pushed, with the file the RUN wrote.
        let pulled = aloft(
            dir.path(),
            &registry,
            &["images", "pull", &image, "--no-rootfs", "--json"],
        );
        assert!(pulled.status.success(), "{}", text(&pulled));
    }

    #[test]
    fn a_failing_step_is_named_with_its_output() {
        let (dir, registry) =
            setup("FROM REGISTRY/busybox:latest\nRUN echo about to fail; echo oops >&2; exit 3\n");
        let out = aloft(dir.path(), &registry, &["deploy", "--build-only"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let error = stderr
            .split_once("error: ")
            .map(|(_, e)| e)
            .unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            error.starts_with("the image build failed at STEP 2/2: RUN echo about to fail"),
            "{error}"
        );
        // The step's stdout and stderr both show; their order between the two streams is not
        // fixed.
        let output = error
            .split_once("output of the step:\n")
            .map(|(_, o)| o)
            .unwrap_or_else(|| panic!("{error}"));
        assert!(
            output.contains("  about to fail\n") && output.contains("  oops\n"),
            "{error}"
        );
        assert!(stderr.contains("hint: fix the Dockerfile step above"), "{stderr}");
        assert!(!tags(&registry, "web").contains("deployment-"));

        // No Dockerfile and no image: says what to do.
        std::fs::remove_file(dir.path().join("app/Dockerfile")).unwrap();
        let out = aloft(dir.path(), &registry, &["deploy", "--build-only"]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--image"),
            "{}",
            text(&out)
        );
    }

    /// Kills, by pid, the QEMU processes whose command line names `dir` (this test's machines).
    struct Vms<'a>(&'a Path);

    impl Drop for Vms<'_> {
        fn drop(&mut self) {
            for pid in aloft_vm::processes_mentioning(self.0) {
                let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            }
        }
    }

    /// The whole path on a real VM: `aloft deploy` builds the Dockerfile with buildah, pushes it,
    /// and the release's machine runs the built image.
    #[test]
    fn deploy_builds_the_dockerfile_and_the_machine_runs_it() {
        let (dir, registry) = setup(
            "FROM REGISTRY/busybox:latest\nRUN echo built-by-buildah > /built\nCMD [\"sleep\", \"3600\"]\n",
        );
        // A worker without services: one machine, no health checks to wait for.
        std::fs::write(dir.path().join("app/aloft.toml"), "app = 'web'\n").unwrap();
        // Dropped after `_vms` killed the machines: their cgroups go with it.
        let cgroups = aloft_testkit::CgroupParent::new();
        let _vms = Vms(dir.path());
        let guest = aloft_testkit::guest_artifacts().unwrap();
        let port = crate::common::free_port();
        let mut daemon = Command::new(crate::common::aloftd_bin())
            .args(["--driver", "vm", "--network", "none", "--no-access-log"])
            .args(["--cgroup-parent", cgroups.name()])
            .arg("--guest-dir")
            .arg(guest.kernel.parent().unwrap())
            .arg("--registry")
            .arg(registry.host())
            .arg("--data-dir")
            .arg(dir.path().join("aloftd"))
            .arg("--no-edge")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("HOME", dir.path().join("home"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("aloftd.log")).unwrap())
            .spawn()
            .expect("aloftd is built next to aloft (cargo build --workspace)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || !dir.path().join("config/aloft/config.toml").is_file()
        {
            assert!(std::time::Instant::now() < deadline, "aloftd did not start");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let run = |args: &[&str]| {
            let out = aloft(dir.path(), &registry, args);
            assert!(out.status.success(), "{args:?}: {}", text(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&["apps", "create", "web"]);
        run(&["deploy"]);
        let machines: serde_json::Value = serde_json::from_str(&run(&["machine", "list", "--json"])).unwrap();
        let machines = machines.as_array().unwrap();
        assert_eq!(machines.len(), 1);
        let image = machines[0]["config"]["image"].as_str().unwrap();
        assert!(
            image.starts_with(&format!("{}/web:deployment-", registry.host())),
            "{image}"
        );
        let id = machines[0]["id"].as_str().unwrap();
        assert_eq!(
            run(&["machine", "exec", id, "cat /built"]).trim(),
            "built-by-buildah"
        );
        run(&["machine", "destroy", id, "--force"]);
        let _ = daemon.kill();
        let _ = daemon.wait();
    }
}
