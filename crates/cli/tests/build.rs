//! `aloft deploy --build-only` runs buildah for real: a Dockerfile FROM the busybox of a test
//! registry (testkit's `docker-registry` on a free loopback port) is built and pushed to that
//! registry, which must then list the tag; a failing step is named with its output.
//!
//! buildah comes from `scripts/setup.sh` (Debian's package); a missing buildah fails these tests.
//! Its storage is the CLI's data directory in a temporary directory (vfs: nothing stays mounted),
//! removed afterwards. No aloftd is needed: `--build-only` deploys nothing.

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
        let (dir, registry) = setup("FROM REGISTRY/busybox:latest\nRUN echo hi > /hi\n");
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
        assert!(
            error.contains("output of the step:\n  about to fail\n  oops"),
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
}
