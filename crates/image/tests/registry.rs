//! Pull and push against a real registry (Debian's `docker-registry`, started by the testkit
//! fixture) and against a tiny scripted HTTP server for the failures a real registry won't produce
//! on demand (truncated and tampered bodies, flaky statuses, huge manifests, token auth).

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Write as _;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use aloft_image::manifest::{
        DOCKER_CONFIG, DOCKER_LAYER_GZIP, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_CONFIG, OCI_INDEX,
        OCI_LAYER_GZIP, OCI_LAYER_TAR, OCI_MANIFEST,
    };
    use aloft_image::{
        Compression, Credentials, Digest, Progress, PullEvent, Puller, Pusher, Reference, RegistryConfig,
        RegistryError, RetryPolicy,
    };
    use aloft_testkit::Registry;
    use anyhow::{Context as _, Result};
    use bytes::Bytes;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    // ---------------------------------------------------------------------------------------------
    // Building images in the test

    /// A complete single-platform image, as blobs and a manifest.
    #[derive(Clone)]
    struct TestImage {
        config: Vec<u8>,
        layers: Vec<(String, Vec<u8>)>,
        manifest: Vec<u8>,
        media_type: String,
        digest: Digest,
    }

    fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, name, *data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({
            "mediaType": media_type,
            "digest": Digest::of(data).to_string(),
            "size": data.len(),
        })
    }

    /// An image for `arch` with one layer per entry of `layers` (gzip unless `plain`), in Docker
    /// media types when `docker`.
    fn build_image(arch: &str, layers: &[&[(&str, &[u8])]], docker: bool, plain_last: bool) -> TestImage {
        let mut blobs = Vec::new();
        let mut diff_ids = Vec::new();
        for (i, files) in layers.iter().enumerate() {
            let tar = tar_of(files);
            diff_ids.push(Digest::of(&tar).to_string());
            let plain = plain_last && i + 1 == layers.len() && !docker;
            if plain {
                blobs.push((OCI_LAYER_TAR.to_owned(), tar));
            } else {
                let mt = if docker { DOCKER_LAYER_GZIP } else { OCI_LAYER_GZIP };
                blobs.push((mt.to_owned(), gzip(&tar)));
            }
        }
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/bin/app"],
                "Cmd": ["--port", "8080"],
                "Env": ["PATH=/usr/bin:/bin", "MODE=test"],
                "WorkingDir": "/srv",
                "User": "1000:1000",
                "ExposedPorts": {"8080/tcp": {}},
                "StopSignal": "SIGINT",
                "Labels": {"org.example.arch": arch},
            },
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }))
        .unwrap();
        let (manifest_type, config_type) = if docker {
            (DOCKER_MANIFEST, DOCKER_CONFIG)
        } else {
            (OCI_MANIFEST, OCI_CONFIG)
        };
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": descriptor(config_type, &config),
            "layers": blobs.iter().map(|(mt, b)| descriptor(mt, b)).collect::<Vec<_>>(),
        }))
        .unwrap();
        TestImage {
            digest: Digest::of(&manifest),
            config,
            layers: blobs,
            manifest,
            media_type: manifest_type.to_owned(),
        }
    }

    fn small_image(arch: &str) -> TestImage {
        build_image(
            arch,
            &[
                &[("etc/os-release", b"ID=test\n")],
                &[("bin/app", arch.as_bytes()), ("srv/data", b"data")],
            ],
            false,
            false,
        )
    }

    fn index_of(media_type: &str, entries: &[(&TestImage, &str, Option<&str>)]) -> Vec<u8> {
        let manifests: Vec<_> = entries
            .iter()
            .map(|(img, arch, variant)| {
                let mut d = descriptor(&img.media_type, &img.manifest);
                let mut platform = serde_json::json!({"os": "linux", "architecture": arch});
                if let Some(v) = variant {
                    platform["variant"] = serde_json::json!(v);
                }
                d["platform"] = platform;
                d
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": manifests,
        }))
        .unwrap()
    }

    fn config_for(host: &str) -> RegistryConfig {
        RegistryConfig {
            retry: RetryPolicy {
                attempts: 3,
                initial_backoff: Duration::from_millis(5),
                max_backoff: Duration::from_millis(20),
            },
            insecure: vec![host.to_owned()],
            ..RegistryConfig::default()
        }
    }

    fn reference(host: &str, name: &str) -> Reference {
        Reference::parse(&format!("{host}/{name}")).unwrap()
    }

    /// Pushes `img`'s blobs and manifest as `r` (tag or digest).
    async fn push(pusher: &Pusher, r: &Reference, img: &TestImage) -> Result<Digest> {
        let progress = Progress::none();
        pusher
            .push_blob(r, Bytes::from(img.config.clone()), &progress)
            .await?;
        for (_, layer) in &img.layers {
            pusher.push_blob(r, Bytes::from(layer.clone()), &progress).await?;
        }
        Ok(pusher
            .push_manifest(r, &img.media_type, Bytes::from(img.manifest.clone()), &progress)
            .await?)
    }

    /// Temporary blob files left once aborted downloads had a moment to clean up (their writers
    /// run on blocking threads that notice the abort right after the pull returns).
    fn tmp_files(cache: &Path) -> usize {
        let count = || std::fs::read_dir(cache.join("blobs/tmp")).map_or(0, Iterator::count);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while count() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        count()
    }

    fn collect_events() -> (Progress, Arc<Mutex<Vec<PullEvent>>>) {
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        (Progress::new(move |e| sink.lock().unwrap().push(e)), events)
    }

    fn chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            s.push_str(": ");
            s.push_str(&cause.to_string());
            source = cause.source();
        }
        s
    }

    // ---------------------------------------------------------------------------------------------
    // Against the real registry

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_then_pull_by_tag_and_by_digest() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        // One layer larger than the upload chunk size, so chunked (PATCH) uploads are exercised.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let big: Vec<u8> = (0..300_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()[0]
            })
            .collect();
        let img = build_image(
            "amd64",
            &[
                &[("etc/hostname", b"aloft\n")],
                &[("bin/app", &big)],
                &[("srv/readme", b"plain tar layer")],
            ],
            false,
            true,
        );
        let pusher = Pusher::new(config_for(&host))?.with_chunk_size(64 * 1024);
        let tagged = reference(&host, "apps/web:v1");
        let pushed = push(&pusher, &tagged, &img).await?;
        assert_eq!(pushed, img.digest);

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let (progress, events) = collect_events();
        let image = puller.pull(&tagged, &progress).await?;
        assert_eq!(image.digest, img.digest);
        assert_eq!(image.index_digest, None);
        assert_eq!(image.config_digest, Digest::of(&img.config));
        let c = &image.config;
        assert_eq!(c.entrypoint.as_deref(), Some(&["/bin/app".to_owned()][..]));
        assert_eq!(c.cmd.as_ref().map(Vec::len), Some(2));
        assert_eq!(c.env, ["PATH=/usr/bin:/bin", "MODE=test"]);
        assert_eq!(c.working_dir.as_deref(), Some("/srv"));
        assert_eq!(c.user.as_deref(), Some("1000:1000"));
        assert_eq!(c.exposed_ports, ["8080/tcp"]);
        assert_eq!(c.stop_signal.as_deref(), Some("SIGINT"));
        assert_eq!(c.labels["org.example.arch"], "amd64");
        assert_eq!(c.diff_ids.len(), 3);
        assert_eq!(image.layers.len(), 3);
        for (layer, (mt, data)) in image.layers.iter().zip(&img.layers) {
            assert_eq!(&layer.media_type, mt);
            assert_eq!(layer.size, data.len() as u64);
            assert_eq!(&std::fs::read(&layer.path)?, data, "cached blob bytes");
            assert!(layer.path.starts_with(cache.path().join("blobs/sha256")));
        }
        assert_eq!(image.layers[0].compression, Compression::Gzip);
        assert_eq!(image.layers[2].compression, Compression::None);
        {
            let events = events.lock().unwrap();
            assert!(
                matches!(events.first(), Some(PullEvent::Resolved { layers: 3, .. })),
                "{events:?}"
            );
            assert!(
                matches!(events.last(), Some(PullEvent::Done { .. })),
                "{events:?}"
            );
            let done = events
                .iter()
                .filter(|e| matches!(e, PullEvent::BlobDone { .. }))
                .count();
            assert_eq!(done, 4, "config and three layers: {events:?}");
            assert!(events.iter().any(|e| matches!(e, PullEvent::BlobProgress { .. })));
        }
        assert_eq!(tmp_files(cache.path()), 0);

        // Recorded, listable, loadable offline.
        let records = puller.images().list()?;
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].reference, tagged);
        assert_eq!(records[0].digest, img.digest);
        assert_eq!(puller.images().load(&tagged)?.as_ref(), Some(&image));

        // A second pull downloads nothing.
        let (progress, events) = collect_events();
        puller.pull(&tagged, &progress).await?;
        assert!(
            !events
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, PullEvent::BlobDone { .. })),
            "everything was cached"
        );

        // By digest, into a fresh cache.
        let pinned = tagged.with_digest(img.digest.clone());
        let cache2 = tempfile::tempdir()?;
        let puller2 = Puller::new(cache2.path(), config_for(&host))?;
        let by_digest = puller2.pull(&pinned, &Progress::none()).await?;
        assert_eq!(by_digest.digest, img.digest);
        assert_eq!(by_digest.layers.len(), 3);
        assert!(puller2.images().lookup(&pinned)?.is_some());

        // Pinned and cached: served without the registry.
        drop(registry);
        let offline = puller2.pull(&pinned, &Progress::none()).await?;
        assert_eq!(offline.digest, img.digest);
        // A tag needs the registry, which is gone.
        let err = puller2.pull(&tagged, &Progress::none()).await.unwrap_err();
        assert!(matches!(err, RegistryError::Unreachable { .. }), "{err}");

        // Removing the record keeps the blobs for the other reference.
        assert!(puller.images().remove(&tagged)?);
        assert!(puller.images().list()?.is_empty());
        assert!(puller.images().referenced_blobs()?.is_empty());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn index_and_manifest_list_resolve_to_linux_amd64() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let pusher = Pusher::new(config_for(&host))?;
        let repo = reference(&host, "multi/app:latest");
        let amd64 = small_image("amd64");
        let arm64 = small_image("arm64");
        for img in [&amd64, &arm64] {
            push(&pusher, &repo.with_digest(img.digest.clone()), img).await?;
        }
        let oci = index_of(
            OCI_INDEX,
            &[(&arm64, "arm64", Some("v8")), (&amd64, "amd64", None)],
        );
        let oci_ref = reference(&host, "multi/app:oci");
        pusher
            .push_manifest(&oci_ref, OCI_INDEX, Bytes::from(oci.clone()), &Progress::none())
            .await?;
        let docker_amd64 = build_image("amd64", &[&[("x", b"docker")]], true, false);
        push(
            &pusher,
            &repo.with_digest(docker_amd64.digest.clone()),
            &docker_amd64,
        )
        .await?;
        let list = index_of(
            DOCKER_MANIFEST_LIST,
            &[(&arm64, "arm64", None), (&docker_amd64, "amd64", None)],
        );
        let list_ref = reference(&host, "multi/app:list");
        pusher
            .push_manifest(
                &list_ref,
                DOCKER_MANIFEST_LIST,
                Bytes::from(list.clone()),
                &Progress::none(),
            )
            .await?;

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let image = puller.pull(&oci_ref, &Progress::none()).await?;
        assert_eq!(image.digest, amd64.digest);
        assert_eq!(image.index_digest, Some(Digest::of(&oci)));
        assert_eq!(image.config.architecture.as_deref(), Some("amd64"));
        assert_eq!(std::fs::read(&image.layers[1].path)?, amd64.layers[1].1);

        let image = puller.pull(&list_ref, &Progress::none()).await?;
        assert_eq!(image.digest, docker_amd64.digest);
        assert_eq!(image.layers[0].media_type, DOCKER_LAYER_GZIP);
        assert_eq!(image.index_digest, Some(Digest::of(&list)));

        // The index by its own digest resolves the same way (and works offline afterwards).
        let pinned_index = repo.with_digest(Digest::of(&oci));
        assert_eq!(
            puller.pull(&pinned_index, &Progress::none()).await?.digest,
            amd64.digest
        );

        // No amd64 entry.
        let arm_only = index_of(OCI_INDEX, &[(&arm64, "arm64", None)]);
        let arm_ref = reference(&host, "multi/app:arm");
        pusher
            .push_manifest(&arm_ref, OCI_INDEX, Bytes::from(arm_only), &Progress::none())
            .await?;
        let err = puller.pull(&arm_ref, &Progress::none()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("no linux/amd64 image in the index for {host}/multi/app:arm")
        );

        // A single-platform arm64 image.
        let arm_single = reference(&host, "multi/app:arm-single");
        push(&pusher, &arm_single, &arm64).await?;
        let err = puller.pull(&arm_single, &Progress::none()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("image {host}/multi/app:arm-single is for linux/arm64, not linux/amd64")
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_blob_in_the_registry_never_lands_in_the_cache() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let img = small_image("amd64");
        let r = reference(&host, "apps/corrupt:v1");
        push(&Pusher::new(config_for(&host))?, &r, &img).await?;

        // Flip bytes of the second layer in the registry's storage, keeping its length.
        let victim = Digest::of(&img.layers[1].1);
        let data_path = registry.blob_data_path(victim.hex());
        let original = std::fs::read(&data_path).context("registry blob file")?;
        let mut tampered = original.clone();
        for b in tampered.iter_mut().skip(10).take(8) {
            *b ^= 0xff;
        }
        std::fs::write(&data_path, &tampered)?;

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let err = puller.pull(&r, &Progress::none()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("digest mismatch for blob {victim}: got {}", Digest::of(&tampered))
        );
        assert!(
            puller.blobs().size(&victim).is_none(),
            "the bad blob is not cached"
        );
        assert_eq!(tmp_files(cache.path()), 0, "no temporary file left");
        assert!(puller.images().lookup(&r)?.is_none(), "no record");
        assert!(puller.blobs().size(&img.digest).is_none(), "no manifest");

        // Repaired upstream: the same cache pulls it fine.
        std::fs::write(&data_path, &original)?;
        let image = puller.pull(&r, &Progress::none()).await?;
        assert_eq!(std::fs::read(&image.layers[1].path)?, img.layers[1].1);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_images_unsupported_types_and_limits_are_clear_errors() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let pusher = Pusher::new(config_for(&host))?;
        let img = small_image("amd64");
        let r = reference(&host, "apps/known:v1");
        push(&pusher, &r, &img).await?;

        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let err = puller
            .pull(&reference(&host, "nope/nothing"), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("image not found: nope/nothing:latest in {host}")
        );
        let err = puller
            .pull(&reference(&host, "apps/known:v2"), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("image not found: apps/known:v2 in {host}")
        );
        let missing = Digest::of(b"missing");
        let err = puller
            .pull(&r.with_digest(missing.clone()), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("image not found: apps/known@{missing} in {host}")
        );

        // An artifact whose config is not an image config.
        let helm_config = br#"{"name":"chart"}"#.to_vec();
        let artifact = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.cncf.helm.config.v1+json", &helm_config),
            "layers": [descriptor(OCI_LAYER_GZIP, &img.layers[0].1)],
        }))?;
        let chart = reference(&host, "apps/chart:1");
        pusher
            .push_blob(&chart, Bytes::from(helm_config), &Progress::none())
            .await?;
        pusher
            .push_blob(&chart, Bytes::from(img.layers[0].1.clone()), &Progress::none())
            .await?;
        pusher
            .push_manifest(&chart, OCI_MANIFEST, Bytes::from(artifact), &Progress::none())
            .await?;
        let err = puller.pull(&chart, &Progress::none()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "unsupported media type application/vnd.cncf.helm.config.v1+json for image config of {chart}"
            )
        );

        // A blob over the limit is refused before it is downloaded.
        let mut small = config_for(&host);
        small.limits.max_blob_bytes = 10;
        small.max_concurrent_downloads = 1; // the first layer is the one reported
        let cache = tempfile::tempdir()?;
        let err = Puller::new(cache.path(), small)?
            .pull(&r, &Progress::none())
            .await
            .unwrap_err();
        let first = Digest::of(&img.layers[0].1);
        assert_eq!(
            err.to_string(),
            format!(
                "blob {first} exceeds the size limit of 10 bytes ({} bytes)",
                img.layers[0].1.len()
            )
        );
        assert_eq!(tmp_files(cache.path()), 0);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_down_is_retried_then_reported() -> Result<()> {
        // A port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let host = format!("127.0.0.1:{port}");
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let (progress, events) = collect_events();
        let started = std::time::Instant::now();
        let err = puller
            .pull(&reference(&host, "apps/web:v1"), &progress)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("registry {host} unreachable after 3 attempts")),
            "{err}"
        );
        assert!(chain(&err).to_lowercase().contains("connect"), "{}", chain(&err));
        let retries = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, PullEvent::Retrying { .. }))
            .count();
        assert_eq!(retries, 2);
        assert!(started.elapsed() < Duration::from_secs(5));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skopeo_interoperates_both_ways() -> Result<()> {
        let registry = Registry::start()?;
        let host = registry.host();
        let img = small_image("amd64");

        // An OCI layout written by hand, copied in by skopeo, pulled by aloft.
        let layout = tempfile::tempdir()?;
        write_layout(layout.path(), &img, "v1")?;
        let out = std::process::Command::new("skopeo")
            .args(["--insecure-policy", "copy", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:v1", layout.path().display()))
            .arg(format!("docker://{host}/from/skopeo:v1"))
            .output()
            .context("run skopeo (scripts/setup.sh installs it)")?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let image = puller
            .pull(&reference(&host, "from/skopeo:v1"), &Progress::none())
            .await?;
        assert_eq!(image.digest, img.digest, "skopeo copies the manifest unchanged");

        // Pushed by aloft from the same layout, inspected by skopeo.
        let r = reference(&host, "from/aloft:v1");
        let digest = Pusher::new(config_for(&host))?
            .push_oci_layout(layout.path(), &r, &Progress::none())
            .await?;
        assert_eq!(digest, img.digest);
        let out = std::process::Command::new("skopeo")
            .args(["--insecure-policy", "inspect", "--tls-verify=false", "--raw"])
            .arg(format!("docker://{host}/from/aloft:v1"))
            .output()?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(Digest::of(&out.stdout), img.digest);
        Ok(())
    }

    fn write_layout(dir: &Path, img: &TestImage, tag: &str) -> Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        for data in std::iter::once(&img.config)
            .chain(img.layers.iter().map(|(_, b)| b))
            .chain(std::iter::once(&img.manifest))
        {
            std::fs::write(blobs.join(Digest::of(data).hex()), data)?;
        }
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let mut entry = descriptor(&img.media_type, &img.manifest);
        entry["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": tag});
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": [entry]}))?,
        )?;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------------
    // A scripted registry for failures on demand

    #[derive(Clone, Default)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// Announce the whole body but send only this many bytes, then close.
        cut_at: Option<usize>,
    }

    fn ok(content_type: &str, body: &[u8]) -> Reply {
        Reply {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.to_vec(),
            cut_at: None,
        }
    }

    fn status(code: u16) -> Reply {
        Reply {
            status: code,
            ..Reply::default()
        }
    }

    struct Seen {
        path: String,
        headers: HashMap<String, String>,
    }

    type Handler = dyn Fn(&Seen, usize) -> Reply + Send + Sync;

    /// Serves `handler(request, n)` where n counts requests to the same path, one per connection.
    async fn fake_registry(handler: Arc<Handler>) -> Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let host = listener.local_addr()?.to_string();
        let counts = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let handler = handler.clone();
                let counts = counts.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    let mut lines = text.lines();
                    let request_line = lines.next().unwrap_or_default();
                    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
                    let headers = lines
                        .take_while(|l| !l.is_empty())
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let n = {
                        let mut counts = counts.lock().unwrap();
                        let n = counts.entry(path.clone()).or_insert(0);
                        *n += 1;
                        *n
                    };
                    let reply = handler(&Seen { path, headers }, n);
                    let mut head = format!(
                        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
                        reply.status,
                        reply.body.len()
                    );
                    for (k, v) in &reply.headers {
                        head.push_str(&format!("{k}: {v}\r\n"));
                    }
                    head.push_str("\r\n");
                    let body = &reply.body[..reply.cut_at.unwrap_or(reply.body.len())];
                    let _ = stream.write_all(head.as_bytes()).await;
                    let _ = stream.write_all(body).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Ok(host)
    }

    /// Serves `img` at `repo` (tag `v1`); `layer` overrides the reply for the first layer's blob.
    fn serve_image(
        img: &TestImage,
        layer: impl Fn(&[u8], usize) -> Reply + Send + Sync + 'static,
    ) -> Arc<Handler> {
        let img = img.clone();
        let first_layer = Digest::of(&img.layers[0].1);
        Arc::new(move |req: &Seen, n: usize| {
            let p = req.path.as_str();
            if p.ends_with("/manifests/v1") || p.ends_with(&format!("/manifests/{}", img.digest)) {
                ok(&img.media_type, &img.manifest)
            } else if p.ends_with(&format!("/blobs/{}", Digest::of(&img.config))) {
                ok("application/octet-stream", &img.config)
            } else if p.ends_with(&format!("/blobs/{first_layer}")) {
                layer(&img.layers[0].1, n)
            } else if let Some((_, data)) = img
                .layers
                .iter()
                .find(|(_, d)| p.ends_with(&format!("/blobs/{}", Digest::of(d))))
            {
                ok("application/octet-stream", data)
            } else {
                status(404)
            }
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn truncated_blobs_are_retried_then_reported() -> Result<()> {
        let img = small_image("amd64");
        let first = Digest::of(&img.layers[0].1);
        let size = img.layers[0].1.len();

        // The connection closes before the announced length.
        let host = fake_registry(serve_image(&img, |data, _| Reply {
            cut_at: Some(data.len() / 2),
            ..ok("application/octet-stream", data)
        }))
        .await?;
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let r = reference(&host, "apps/web:v1");
        let err = puller.pull(&r, &Progress::none()).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "blob {first} truncated: got {} of {size} bytes after 3 attempts",
                size / 2
            )
        );
        assert!(puller.blobs().size(&first).is_none());
        assert_eq!(tmp_files(cache.path()), 0);
        assert!(puller.images().lookup(&r)?.is_none());

        // A well-formed but short body.
        let host = fake_registry(serve_image(&img, |data, _| {
            ok("application/octet-stream", &data[..data.len() - 3])
        }))
        .await?;
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let err = puller
            .pull(&reference(&host, "apps/web:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Truncated { got, .. } if got == size as u64 - 3),
            "{err}"
        );
        assert_eq!(tmp_files(cache.path()), 0);

        // Truncated once, then whole: the retry succeeds.
        let host = fake_registry(serve_image(&img, |data, n| Reply {
            cut_at: (n == 1).then_some(7),
            ..ok("application/octet-stream", data)
        }))
        .await?;
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let (progress, events) = collect_events();
        let image = puller.pull(&reference(&host, "apps/web:v1"), &progress).await?;
        assert_eq!(std::fs::read(&image.layers[0].path)?, img.layers[0].1);
        assert!(
            events
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, PullEvent::Retrying { attempt: 1, .. }))
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tampered_and_oversized_blobs_are_rejected() -> Result<()> {
        let img = small_image("amd64");
        let first = Digest::of(&img.layers[0].1);
        let host = fake_registry(serve_image(&img, |data, _| {
            let mut evil = data.to_vec();
            evil[0] ^= 1;
            ok("application/octet-stream", &evil)
        }))
        .await?;
        let cache = tempfile::tempdir()?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let err = puller
            .pull(&reference(&host, "apps/web:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("digest mismatch for blob {first}: got sha256:")),
            "{err}"
        );
        assert!(puller.blobs().size(&first).is_none());
        assert_eq!(tmp_files(cache.path()), 0);

        // More bytes than the descriptor says: refused from the Content-Length.
        let host = fake_registry(serve_image(&img, |data, _| {
            ok("application/octet-stream", &[data, b"extra"].concat())
        }))
        .await?;
        let err = Puller::new(cache.path(), config_for(&host))?
            .pull(&reference(&host, "apps/web:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("larger than its descriptor says"),
            "{err}"
        );
        assert_eq!(tmp_files(cache.path()), 0);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_manifests_and_flaky_registries() -> Result<()> {
        let img = small_image("amd64");

        // 503 twice (and a 429), then the manifest: retried to success.
        let inner = serve_image(&img, |data, _| ok("application/octet-stream", data));
        let host = fake_registry(Arc::new(move |req: &Seen, n: usize| {
            if req.path.ends_with("/manifests/v1") && n <= 2 {
                return if n == 1 {
                    Reply {
                        headers: vec![("Retry-After".into(), "0".into())],
                        ..status(429)
                    }
                } else {
                    status(503)
                };
            }
            inner(req, n)
        }))
        .await?;
        let cache = tempfile::tempdir()?;
        let (progress, events) = collect_events();
        Puller::new(cache.path(), config_for(&host))?
            .pull(&reference(&host, "apps/web:v1"), &progress)
            .await?;
        let retries = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, PullEvent::Retrying { .. }))
            .count();
        assert_eq!(retries, 2);

        // Always 500: the status after the attempts.
        let host = fake_registry(Arc::new(|_: &Seen, _| status(500))).await?;
        let err = Puller::new(cache.path(), config_for(&host))?
            .pull(&reference(&host, "apps/web:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("registry {host} answered HTTP 500 to GET /v2/apps/web/manifests/v1 after 3 attempts")
        );

        // Schema 1, a huge manifest, garbage JSON.
        let schema1 = br#"{"schemaVersion":1,"name":"apps/web","tag":"v1","fsLayers":[]}"#.to_vec();
        let huge = vec![b' '; 5 << 20];
        let host = fake_registry(Arc::new(move |req: &Seen, _| match req.path.as_str() {
            "/v2/apps/old/manifests/v1" => ok(
                "application/vnd.docker.distribution.manifest.v1+prettyjws",
                &schema1,
            ),
            "/v2/apps/huge/manifests/v1" => ok(OCI_MANIFEST, &huge),
            "/v2/apps/junk/manifests/v1" => ok(OCI_MANIFEST, b"{\"schemaVersion\":2,\"config\":"),
            _ => status(404),
        }))
        .await?;
        let puller = Puller::new(cache.path(), config_for(&host))?;
        let err = puller
            .pull(&reference(&host, "apps/old:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "unsupported media type application/vnd.docker.distribution.manifest.v1+prettyjws \
                 for manifest of {host}/apps/old:v1"
            )
        );
        let err = puller
            .pull(&reference(&host, "apps/huge:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("manifest of {host}/apps/huge:v1 exceeds the size limit of 4194304 bytes")
        );
        let err = puller
            .pull(&reference(&host, "apps/junk:v1"), &Progress::none())
            .await
            .unwrap_err();
        assert!(matches!(err, RegistryError::Manifest { .. }), "{err}");

        // A manifest pinned by digest whose body hashes differently.
        let wrong = Digest::of(b"not this");
        let body = img.manifest.clone();
        let media_type = img.media_type.clone();
        let host = fake_registry(Arc::new(move |_: &Seen, _| ok(&media_type, &body))).await?;
        let err = Puller::new(cache.path(), config_for(&host))?
            .pull(
                &reference(&host, "apps/web").with_digest(wrong.clone()),
                &Progress::none(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("digest mismatch for manifest {wrong}: got {}", img.digest)
        );
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bearer_token_flow_with_basic_credentials() -> Result<()> {
        let img = small_image("amd64");
        let inner = serve_image(&img, |data, _| ok("application/octet-stream", data));
        let token_requests = Arc::new(AtomicUsize::new(0));
        let seen_tokens = token_requests.clone();
        let realm = Arc::new(Mutex::new(String::new()));
        let realm_in = realm.clone();
        let host = fake_registry(Arc::new(move |req: &Seen, n| {
            if req.path.starts_with("/token?") {
                seen_tokens.fetch_add(1, Ordering::SeqCst);
                // "alice:secret"
                let good =
                    req.headers.get("authorization").map(String::as_str) == Some("Basic YWxpY2U6c2VjcmV0");
                let scoped = req.path.contains("scope=repository%3Aapps%2Fweb%3Apull");
                return if good && scoped {
                    ok("application/json", br#"{"token":"t0ken","expires_in":300}"#)
                } else {
                    status(401)
                };
            }
            if req.headers.get("authorization").map(String::as_str) != Some("Bearer t0ken") {
                let challenge = format!(
                    r#"Bearer realm="{}",service="fake",scope="repository:apps/web:pull""#,
                    realm_in.lock().unwrap()
                );
                return Reply {
                    headers: vec![("WWW-Authenticate".into(), challenge)],
                    ..status(401)
                };
            }
            inner(req, n)
        }))
        .await?;
        *realm.lock().unwrap() = format!("http://{host}/token");

        let r = reference(&host, "apps/web:v1");
        let cache = tempfile::tempdir()?;
        let err = Puller::new(cache.path(), config_for(&host))?
            .pull(&r, &Progress::none())
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("registry {host} denied access to apps/web:v1")),
            "{err}"
        );

        let mut config = config_for(&host);
        config.credentials.insert(
            host.clone(),
            Credentials::Basic {
                username: "alice".into(),
                password: "secret".into(),
            },
        );
        let image = Puller::new(cache.path(), config.clone())?
            .pull(&r, &Progress::none())
            .await?;
        assert_eq!(image.digest, img.digest);
        // One token for the whole pull: it is cached per repository.
        assert_eq!(token_requests.load(Ordering::SeqCst), 2);

        config.credentials.insert(
            host.clone(),
            Credentials::Basic {
                username: "alice".into(),
                password: "wrong".into(),
            },
        );
        let err = Puller::new(tempfile::tempdir()?.path(), config)?
            .pull(&r, &Progress::none())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("token service answered HTTP 401"),
            "{err}"
        );
        Ok(())
    }
}
