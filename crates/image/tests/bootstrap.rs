//! Base images built on this host, pushed to a real registry (Debian's `docker-registry` from the
//! testkit), pulled back and unpacked: they must be ordinary, runnable OCI images.
//!
//! The debian test runs debootstrap against Debian's mirror the first time (about a minute on two
//! cores; needs root) and keeps the layer in `target/testkit/bootstrap/`, so later runs only push
//! and pull. Run it alone with `cargo nextest run -p aloft-image --test bootstrap debian`.

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    use aloft_image::bootstrap::{self, BootstrapOptions, DEFAULT_PATH};
    use aloft_image::unpack::{UnpackLimits, Unpacker};
    use aloft_image::{PulledImage, Puller, Reference, RegistryConfig, guest_image_config};
    use aloft_testkit::Registry;
    use anyhow::{Context as _, Result};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Applies every layer of `image` onto `<private tempdir>/root`.
    fn unpack(image: &PulledImage, dir: &Path) -> Result<std::path::PathBuf> {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
        let root = dir.join("root");
        fs::create_dir(&root)?;
        let mut unpacker = Unpacker::new(&root, UnpackLimits::default())?;
        for layer in &image.layers {
            let file = fs::File::open(&layer.path)?;
            unpacker
                .apply_layer(file, layer.compression)
                .with_context(|| format!("apply {}", layer.digest))?;
        }
        Ok(root)
    }

    #[test]
    fn busybox_bootstrap_pulls_and_unpacks_to_a_shell() -> Result<()> {
        let registry = Registry::start()?;
        let rt = runtime();
        let config = RegistryConfig::default();
        let target = Reference::parse(&format!("{}/busybox:latest", registry.host()))?;
        let pushed = rt.block_on(bootstrap::bootstrap_busybox(
            &config,
            &target,
            &BootstrapOptions::default(),
        ))?;
        assert!(!pushed.cached);

        // The same tree built again gives the same image.
        let again = rt.block_on(bootstrap::bootstrap_busybox(
            &config,
            &target,
            &BootstrapOptions::default(),
        ))?;
        assert_eq!(again.digest, pushed.digest, "bootstrap is deterministic");

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config)?;
        let image = rt.block_on(puller.pull(&target, &aloft_image::Progress::none()))?;
        assert_eq!(image.digest, pushed.digest);
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.layers[0].digest, pushed.layer);
        assert_eq!(image.config.cmd, Some(vec!["/bin/sh".to_owned()]));
        assert_eq!(image.config.env, vec![DEFAULT_PATH.to_owned()]);
        let guest = guest_image_config(&image.config);
        assert!(guest.warnings.is_empty());
        assert_eq!(guest.image.cmd, vec!["/bin/sh".to_owned()]);

        let dir = tempfile::tempdir()?;
        let root = unpack(&image, dir.path())?;
        assert_eq!(fs::read_link(root.join("bin/sh"))?, Path::new("busybox"));
        let busybox = fs::metadata(root.join("bin/busybox"))?;
        assert!(busybox.is_file() && busybox.mode() & 0o111 != 0);
        assert_eq!(
            (busybox.uid(), busybox.gid()),
            (0, 0),
            "files belong to root in the image"
        );
        assert_eq!(fs::metadata(root.join("tmp"))?.mode() & 0o7777, 0o1777);
        // The unpacked busybox runs.
        let out = std::process::Command::new(root.join("bin/busybox"))
            .arg("true")
            .status()?;
        assert!(out.success());
        Ok(())
    }

    #[test]
    fn bootstrap_into_a_registry_that_is_down_fails_clearly() -> Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let config = RegistryConfig {
            retry: aloft_image::RetryPolicy {
                attempts: 2,
                initial_backoff: std::time::Duration::from_millis(10),
                max_backoff: std::time::Duration::from_millis(10),
            },
            ..RegistryConfig::default()
        };
        let target = Reference::parse(&format!("127.0.0.1:{port}/busybox:latest"))?;
        let err = runtime()
            .block_on(bootstrap::bootstrap_busybox(
                &config,
                &target,
                &BootstrapOptions::default(),
            ))
            .unwrap_err();
        let source = std::error::Error::source(&err)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(
            matches!(
                err,
                bootstrap::BootstrapError::Registry(aloft_image::RegistryError::Unreachable { .. })
            ),
            "{err}: {source}"
        );
        Ok(())
    }

    #[test]
    fn debian_bootstrap_pulls_and_unpacks_to_bash() -> Result<()> {
        let registry = Registry::start()?;
        let rt = runtime();
        let config = RegistryConfig::default();
        let target = Reference::parse(&format!("{}/debian:bookworm", registry.host()))?;
        let cache_dir = aloft_testkit::cache_dir();
        let pushed = rt.block_on(bootstrap::bootstrap_debian(
            &config,
            &target,
            &cache_dir,
            &BootstrapOptions::default(),
        ))?;
        // A second bootstrap comes from the cache and gives the same image.
        let again = rt.block_on(bootstrap::bootstrap_debian(
            &config,
            &target,
            &cache_dir,
            &BootstrapOptions::default(),
        ))?;
        assert!(again.cached);
        assert_eq!(again.digest, pushed.digest);

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config)?;
        let image = rt.block_on(puller.pull(&target, &aloft_image::Progress::none()))?;
        assert_eq!(image.digest, pushed.digest);
        assert_eq!(image.config.cmd, Some(vec!["/bin/bash".to_owned()]));

        let dir = tempfile::tempdir()?;
        let root = unpack(&image, dir.path())?;
        for path in [
            "bin/bash",
            "usr/bin/apt-get",
            "etc/debian_version",
            "usr/bin/perl",
        ] {
            assert!(root.join(path).exists(), "{path} missing");
        }
        assert!(fs::read_to_string(root.join("etc/debian_version"))?.starts_with("12."));
        // Host details debootstrap copies in are not in the image; neither are package caches.
        assert_eq!(fs::read(root.join("etc/resolv.conf"))?, b"");
        assert_eq!(fs::read_dir(root.join("var/lib/apt/lists"))?.count(), 0);
        assert_eq!(fs::read_dir(root.join("var/cache/apt/archives"))?.count(), 0);
        // Owners and hardlinks survive (perl and perl5.36.0 are one inode in Debian).
        let perl = fs::metadata(root.join("usr/bin/perl"))?;
        assert_eq!(perl.uid(), 0);
        assert_eq!(perl.ino(), fs::metadata(root.join("usr/bin/perl5.36.0"))?.ino());
        // setuid bits survive (su is in util-linux, which minbase has).
        assert_ne!(fs::metadata(root.join("bin/su"))?.mode() & 0o4000, 0);
        Ok(())
    }
}
