//! Base root filesystems and writable disks: push → pull → base against the real registry started
//! by the testkit, contents checked without mounting (`debugfs` for ext4, `fsck.erofs --extract`
//! for erofs), no partial base after failures, one base for concurrent builders, garbage
//! collection within a budget, and writable disks that are clean ext4.

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::fs;
    use std::io::Write as _;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant, SystemTime};

    use aloft_image::gc::{self, GcKind, GcOptions};
    use aloft_image::manifest::{OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST};
    use aloft_image::rootfs::{CloneMethod, RootfsError};
    use aloft_image::unpack::UnpackLimits;
    use aloft_image::{
        Digest, Progress, PulledImage, Puller, Pusher, Reference, RegistryConfig, RootfsFormat, RootfsStore,
        WritableDisks,
    };
    use aloft_testkit::Registry;
    use anyhow::{Context as _, Result, bail};
    use bytes::Bytes;

    // ---------------------------------------------------------------------------------------------
    // Images

    enum Entry<'a> {
        File(&'a str, &'a [u8], u32, u64, u64),
        Dir(&'a str, u32, u64, u64),
        Symlink(&'a str, &'a str),
        Char(&'a str, u32, u32),
    }

    fn tar_of(entries: &[Entry<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let (name, data): (&str, &[u8]) = match *e {
                Entry::File(name, data, mode, uid, gid) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(mode);
                    h.set_uid(uid);
                    h.set_gid(gid);
                    h.set_size(data.len() as u64);
                    (name, data)
                }
                Entry::Dir(name, mode, uid, gid) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(mode);
                    h.set_uid(uid);
                    h.set_gid(gid);
                    h.set_size(0);
                    (name, &[])
                }
                Entry::Symlink(name, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    h.set_link_name(target).unwrap();
                    (name, &[])
                }
                Entry::Char(name, major, minor) => {
                    h.set_entry_type(tar::EntryType::Char);
                    h.set_mode(0o666);
                    h.set_device_major(major).unwrap();
                    h.set_device_minor(minor).unwrap();
                    h.set_size(0);
                    (name, &[])
                }
            };
            h.set_cksum();
            b.append_data(&mut h, name, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn descriptor(media_type: &str, data: &[u8]) -> serde_json::Value {
        serde_json::json!({"mediaType": media_type, "digest": Digest::of(data).to_string(), "size": data.len()})
    }

    struct TestImage {
        config: Vec<u8>,
        layers: Vec<Vec<u8>>,
        manifest: Vec<u8>,
    }

    fn image_of(layers: &[&[Entry<'_>]]) -> TestImage {
        let tars: Vec<Vec<u8>> = layers.iter().map(|l| tar_of(l)).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": tars.iter().map(|t| Digest::of(t).to_string()).collect::<Vec<_>>()},
        }))
        .unwrap();
        let layers: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect();
        let manifest = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| descriptor(OCI_LAYER_GZIP, l)).collect::<Vec<_>>(),
        }))
        .unwrap();
        TestImage {
            config,
            layers,
            manifest,
        }
    }

    /// Two layers: owners, modes, setuid, a device node, a symlink; then whiteouts of a file, a
    /// directory, and an opaque directory refilled by the upper layer.
    fn layered_image() -> TestImage {
        image_of(&[
            &[
                Entry::Dir("bin", 0o755, 0, 0),
                Entry::File("bin/su", b"#!su\n", 0o4755, 0, 0),
                Entry::File("bin/busybox", b"bb", 0o755, 0, 0),
                Entry::Symlink("bin/sh", "busybox"),
                Entry::Dir("etc", 0o755, 0, 0),
                Entry::File("etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42),
                Entry::File("etc/motd", b"old motd\n", 0o644, 0, 0),
                Entry::Dir("home", 0o755, 0, 0),
                Entry::Dir("home/app", 0o750, 1000, 1000),
                Entry::File("home/app/notes", b"mine\n", 0o600, 1000, 1000),
                Entry::Dir("dev", 0o755, 0, 0),
                Entry::Char("dev/null", 1, 3),
                Entry::Dir("opt", 0o755, 0, 0),
                Entry::Dir("opt/gone", 0o755, 0, 0),
                Entry::File("opt/gone/file", b"x", 0o644, 0, 0),
                Entry::Dir("opt/keep", 0o755, 0, 0),
                Entry::Dir("var", 0o755, 0, 0),
                Entry::Dir("var/opq", 0o755, 0, 0),
                Entry::File("var/opq/a", b"a", 0o644, 0, 0),
                Entry::File("var/opq/b", b"b", 0o644, 0, 0),
            ],
            &[
                Entry::File("etc/.wh.motd", b"", 0o644, 0, 0),
                Entry::File("opt/.wh.gone", b"", 0o644, 0, 0),
                Entry::File("var/opq/.wh..wh..opq", b"", 0o644, 0, 0),
                Entry::File("var/opq/c", b"upper\n", 0o644, 0, 0),
                Entry::File("etc/hostname", b"aloft\n", 0o644, 0, 0),
            ],
        ])
    }

    fn config_for(host: &str) -> RegistryConfig {
        RegistryConfig {
            insecure: vec![host.to_owned()],
            ..RegistryConfig::default()
        }
    }

    async fn push(pusher: &Pusher, r: &Reference, img: &TestImage) -> Result<Digest> {
        let p = Progress::none();
        pusher.push_blob(r, Bytes::from(img.config.clone()), &p).await?;
        for layer in &img.layers {
            pusher.push_blob(r, Bytes::from(layer.clone()), &p).await?;
        }
        Ok(pusher
            .push_manifest(r, OCI_MANIFEST, Bytes::from(img.manifest.clone()), &p)
            .await?)
    }

    /// Pushes `img` as `name` to a fresh registry and pulls it into `cache`.
    async fn push_and_pull(
        registry: &Registry,
        cache: &Path,
        name: &str,
        img: &TestImage,
    ) -> Result<(Puller, PulledImage)> {
        let host = registry.host();
        let r = Reference::parse(&format!("{host}/{name}"))?;
        let pushed = push(&Pusher::new(config_for(&host))?, &r, img).await?;
        let puller = Puller::new(cache, config_for(&host))?;
        let pulled = puller.pull(&r, &Progress::none()).await?;
        assert_eq!(pulled.digest, pushed);
        Ok((puller, pulled))
    }

    fn private_cache() -> tempfile::TempDir {
        let dir = tempfile::Builder::new()
            .prefix("aloft-rootfs-")
            .tempdir()
            .unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn entries(dir: &Path) -> usize {
        fs::read_dir(dir).map_or(0, Iterator::count)
    }

    /// Nothing but finished bases in `<cache>/rootfs`: staging and tmp are empty, and no build
    /// directory of this process is left in memory (`/dev/shm`).
    fn assert_no_partial(cache: &Path) {
        let rootfs = cache.join("rootfs");
        assert_eq!(entries(&rootfs.join("staging")), 0, "staging left behind");
        assert_eq!(
            entries(&rootfs.join("tmp")),
            0,
            "temporary filesystem left behind"
        );
        let ours = format!(".{}.", std::process::id());
        let in_memory = fs::read_dir("/dev/shm").map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.starts_with("aloft-rootfs-") && name.contains(&ours)
                })
                .count()
        });
        assert_eq!(in_memory, 0, "staging left behind in /dev/shm");
    }

    fn output(cmd: &mut Command) -> Result<String> {
        let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `debugfs -R "ls -l DIR"` as (name → (mode, uid, gid)).
    fn ext4_ls(image: &Path, dir: &str) -> Result<Vec<(String, u32, u32, u32)>> {
        let out = output(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("ls -l {dir}"))
                .arg(image),
        )?;
        let mut list = Vec::new();
        for line in out.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            // inode mode (links) uid gid size date time name
            if f.len() < 9 {
                continue;
            }
            let mode = u32::from_str_radix(f[1], 8)?;
            let (uid, gid) = (f[3].parse()?, f[4].parse()?);
            list.push((f[f.len() - 1].to_owned(), mode, uid, gid));
        }
        Ok(list)
    }

    fn find<'a>(list: &'a [(String, u32, u32, u32)], name: &str) -> Option<&'a (String, u32, u32, u32)> {
        list.iter().find(|e| e.0 == name)
    }

    /// The full mode of `path` in an erofs image, read from its on-disk inode: `dump.erofs` prints
    /// only the permission bits and `fsck.erofs --extract` loses setuid bits (it chowns after
    /// chmod), so the inode's `i_mode` (offset 4) is read at `meta_blkaddr * 4096 + nid * 32`.
    fn erofs_mode(image: &Path, path: &str) -> Result<u32> {
        let out = output(
            Command::new("dump.erofs")
                .arg(format!("--path={path}"))
                .arg(image),
        )?;
        let nid: u64 = out
            .split("NID:")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .context("dump.erofs prints the NID")?
            .parse()?;
        let data = fs::read(image)?;
        let sb = 1024;
        let meta_blkaddr = u64::from(u32::from_le_bytes(data[sb + 0x28..sb + 0x2c].try_into()?));
        let at = usize::try_from(meta_blkaddr * 4096 + nid * 32 + 4)?;
        Ok(u32::from(u16::from_le_bytes(data[at..at + 2].try_into()?)))
    }

    fn ext4_cat(image: &Path, path: &str) -> Result<String> {
        output(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("cat {path}"))
                .arg(image),
        )
    }

    // ---------------------------------------------------------------------------------------------
    // Tests

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn push_pull_build_ext4_keeps_owners_modes_and_whiteouts() -> Result<()> {
        let registry = Registry::start()?;
        let cache = private_cache();
        let (_, pulled) = push_and_pull(&registry, cache.path(), "apps/layered:v1", &layered_image()).await?;
        // Staged on disk here; the other tests stage in memory (the default when it fits). A
        // "memory" directory that is not a tmpfs is not used.
        let not_tmpfs = cache.path().join("not-tmpfs");
        fs::create_dir(&not_tmpfs)?;
        let store = RootfsStore::open(cache.path(), RootfsFormat::Ext4, UnpackLimits::default())?
            .with_memory_staging(Some(not_tmpfs.clone()));
        let (base, stats) = store.build(&pulled)?;
        assert!(!stats.staged_in_memory);
        assert_eq!(entries(&not_tmpfs), 0);
        assert!(!stats.reused);
        assert_eq!(
            base.path,
            cache.path().join(format!("rootfs/{}.ext4", pulled.digest.hex()))
        );
        assert_eq!(fs::metadata(&base.path)?.mode() & 0o777, 0o444);
        assert_no_partial(cache.path());
        // A clean filesystem without a journal.
        output(Command::new("e2fsck").arg("-fn").arg(&base.path))?;
        let features = output(Command::new("dumpe2fs").arg("-h").arg(&base.path))?;
        assert!(!features.contains("has_journal"), "{features}");

        let bin = ext4_ls(&base.path, "/bin")?;
        assert_eq!(find(&bin, "su").map(|e| (e.1, e.2, e.3)), Some((0o104_755, 0, 0)));
        assert_eq!(find(&bin, "sh").map(|e| e.1 & 0o170_000), Some(0o120_000));
        let etc = ext4_ls(&base.path, "/etc")?;
        assert_eq!(
            find(&etc, "shadow").map(|e| (e.1, e.2, e.3)),
            Some((0o100_640, 0, 42))
        );
        assert!(find(&etc, "motd").is_none(), "whiteout of a file: {etc:?}");
        assert!(find(&etc, ".wh.motd").is_none(), "whiteout files are not kept");
        let home = ext4_ls(&base.path, "/home")?;
        assert_eq!(
            find(&home, "app").map(|e| (e.1, e.2, e.3)),
            Some((0o040_750, 1000, 1000))
        );
        let dev = ext4_ls(&base.path, "/dev")?;
        assert_eq!(find(&dev, "null").map(|e| e.1 & 0o170_000), Some(0o020_000));
        let opt = ext4_ls(&base.path, "/opt")?;
        assert!(
            find(&opt, "gone").is_none() && find(&opt, "keep").is_some(),
            "{opt:?}"
        );
        let opq = ext4_ls(&base.path, "/var/opq")?;
        assert!(
            find(&opq, "a").is_none() && find(&opq, "b").is_none(),
            "opaque: {opq:?}"
        );
        assert_eq!(ext4_cat(&base.path, "/var/opq/c")?, "upper\n");
        assert_eq!(ext4_cat(&base.path, "/etc/hostname")?, "aloft\n");

        // Built once: the second call reuses it.
        let (again, stats) = store.build(&pulled)?;
        assert!(stats.reused);
        assert_eq!(again.path, base.path);
        assert_eq!(store.list()?.len(), 1);
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn erofs_bases_keep_owners_modes_and_whiteouts() -> Result<()> {
        let registry = Registry::start()?;
        let cache = private_cache();
        let (_, pulled) = push_and_pull(&registry, cache.path(), "apps/layered:v1", &layered_image()).await?;
        for format in [RootfsFormat::Erofs, RootfsFormat::ErofsLz4] {
            let store = RootfsStore::open(cache.path(), format, UnpackLimits::default())?;
            let (base, stats) = store.build(&pulled)?;
            // /dev/shm is a tmpfs on our machines and CI; elsewhere the disk path is taken.
            let shm_is_tmpfs = Command::new("stat")
                .args(["-f", "-c", "%T", "/dev/shm"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "tmpfs");
            assert_eq!(stats.staged_in_memory, shm_is_tmpfs);
            assert_no_partial(cache.path());
            let out = cache.path().join(format!("extract-{}", format.extension()));
            // Extracted as root with --preserve, into a directory of our private cache.
            output(
                Command::new("fsck.erofs")
                    .arg(format!("--extract={}", out.display()))
                    .arg("--preserve")
                    .arg(&base.path),
            )?;
            let meta = |p: &str| fs::symlink_metadata(out.join(p));
            let su = meta("bin/su")?;
            assert_eq!((su.uid(), su.gid()), (0, 0), "{format:?}");
            assert_eq!(erofs_mode(&base.path, "/bin/su")?, 0o104_755, "{format:?}");
            assert_eq!(erofs_mode(&base.path, "/home/app")?, 0o040_750, "{format:?}");
            let shadow = meta("etc/shadow")?;
            assert_eq!((shadow.mode(), shadow.gid()), (0o100_640, 42));
            let app = meta("home/app")?;
            assert_eq!((app.mode(), app.uid(), app.gid()), (0o040_750, 1000, 1000));
            assert!(meta("bin/sh")?.file_type().is_symlink());
            assert_eq!(fs::read_link(out.join("bin/sh"))?, Path::new("busybox"));
            assert!(meta("etc/motd").is_err() && meta("etc/.wh.motd").is_err());
            assert!(meta("opt/gone").is_err() && meta("opt/keep").is_ok());
            assert!(meta("var/opq/a").is_err() && meta("var/opq/b").is_err());
            assert_eq!(fs::read_to_string(out.join("var/opq/c"))?, "upper\n");
            fs::remove_dir_all(&out)?;
        }
        // Both formats are listed (whatever the store's own), and removing the digest frees both.
        let store = RootfsStore::open(cache.path(), RootfsFormat::Ext4, UnpackLimits::default())?;
        let listed = store.list()?;
        assert_eq!(listed.len(), 2, "{listed:?}");
        let freed = store.remove(&pulled.digest)?.context("something to remove")?;
        assert_eq!(freed, listed.iter().map(|b| b.disk_bytes).sum::<u64>());
        assert!(store.list()?.is_empty());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_blob_or_size_limit_leaves_no_partial_rootfs() -> Result<()> {
        let registry = Registry::start()?;
        let cache = private_cache();
        let big = vec![7u8; 64 * 1024];
        let img = image_of(&[
            &[
                Entry::Dir("etc", 0o755, 0, 0),
                Entry::File("etc/a", b"a", 0o644, 0, 0),
            ],
            &[Entry::File("big", &big, 0o644, 0, 0)],
        ]);
        let (_, pulled) = push_and_pull(&registry, cache.path(), "apps/big:v1", &img).await?;

        // Over the limit: the 64 KiB file does not fit in 16 KiB.
        let limits = UnpackLimits {
            max_bytes: 16 * 1024,
            ..UnpackLimits::default()
        };
        let small = RootfsStore::open(cache.path(), RootfsFormat::Ext4, limits)?;
        let err = small.build(&pulled).unwrap_err();
        assert!(matches!(err, RootfsError::Unpack { .. }), "{err:?}");
        assert!(!small.path(&pulled.digest).exists());
        assert_no_partial(cache.path());

        // A corrupted layer blob: detected while unpacking, removed from the cache.
        let store = RootfsStore::open(cache.path(), RootfsFormat::Ext4, UnpackLimits::default())?;
        let victim = &pulled.layers[1];
        fs::set_permissions(&victim.path, fs::Permissions::from_mode(0o644))?;
        let mut bytes = fs::read(&victim.path)?;
        let last = bytes.len() - 6; // inside the gzip trailer's CRC
        bytes[last] ^= 0xff;
        fs::write(&victim.path, &bytes)?;
        let err = store.build(&pulled).unwrap_err();
        assert!(matches!(err, RootfsError::CorruptLayer { .. }), "{err:?}");
        assert!(err.to_string().contains("pull the image again"), "{err}");
        assert!(
            !victim.path.exists(),
            "the corrupt blob is dropped from the cache"
        );
        assert!(!store.path(&pulled.digest).exists());
        assert_no_partial(cache.path());

        // A missing blob.
        let err = store.build(&pulled).unwrap_err();
        assert!(matches!(err, RootfsError::MissingLayer { .. }), "{err:?}");
        assert_no_partial(cache.path());
        assert!(store.list()?.is_empty());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_builds_of_one_digest_make_one_base() -> Result<()> {
        let registry = Registry::start()?;
        let cache = private_cache();
        let (_, pulled) = push_and_pull(&registry, cache.path(), "apps/layered:v1", &layered_image()).await?;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                // Separate stores, as separate processes would open them.
                let store = RootfsStore::open(cache.path(), RootfsFormat::Ext4, UnpackLimits::default());
                let pulled = pulled.clone();
                std::thread::spawn(move || {
                    store
                        .map_err(anyhow::Error::from)?
                        .build(&pulled)
                        .map_err(anyhow::Error::from)
                })
            })
            .collect();
        // Every builder has finished before any result is looked at, so a failure does not leave
        // builders writing into the cache while the test deletes it.
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mut built = 0;
        for result in results {
            let (base, stats) = result?;
            assert!(base.path.is_file());
            built += usize::from(!stats.reused);
        }
        assert_eq!(built, 1, "exactly one builder made the filesystem");
        let bases: Vec<_> = fs::read_dir(cache.path().join("rootfs"))?
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .collect();
        assert_eq!(bases.len(), 1);
        assert_no_partial(cache.path());
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gc_respects_records_in_use_set_and_budget() -> Result<()> {
        let registry = Registry::start()?;
        let cache = private_cache();
        let img_a = image_of(&[&[Entry::File("a", b"image a", 0o644, 0, 0)]]);
        let img_b = image_of(&[&[Entry::File("b", b"image b", 0o644, 0, 0)]]);
        let (puller, a) = push_and_pull(&registry, cache.path(), "apps/a:v1", &img_a).await?;
        let (_, b) = push_and_pull(&registry, cache.path(), "apps/b:v1", &img_b).await?;
        let store = RootfsStore::open(cache.path(), RootfsFormat::Erofs, UnpackLimits::default())?;
        store.build(&a)?;
        store.build(&b)?;
        let images = puller.images();
        let now = GcOptions {
            budget_bytes: 0,
            grace: Duration::ZERO,
        };
        let none = BTreeSet::new();

        // Both recorded: nothing goes, even with no budget at all.
        let report = gc::collect(images, &store, &none, &now)?;
        assert!(report.removed.is_empty() && report.over_budget, "{report:?}");

        // B's record removed: B's base, manifest, config and layer go; A's stay.
        assert!(images.remove(&b.reference)?);
        let report = gc::collect(images, &store, &none, &now)?;
        let removed: BTreeSet<_> = report
            .removed
            .iter()
            .map(|r| (r.kind, r.digest.clone()))
            .collect();
        let expected: BTreeSet<_> = [
            (GcKind::Base, b.digest.clone()),
            (GcKind::Blob, b.digest.clone()),
            (GcKind::Blob, b.config_digest.clone()),
            (GcKind::Blob, b.layers[0].digest.clone()),
        ]
        .into_iter()
        .collect();
        assert_eq!(removed, expected);
        assert_eq!(report.freed, report.used_before - report.used_after);
        assert!(store.get(&a.digest).is_some());
        assert!(images.blobs().contains(&a.layers[0].digest, a.layers[0].size));

        // A's record removed but a machine runs A: nothing goes.
        assert!(images.remove(&a.reference)?);
        let in_use: BTreeSet<_> = [a.digest.clone()].into_iter().collect();
        let report = gc::collect(images, &store, &in_use, &now)?;
        assert!(report.removed.is_empty() && report.over_budget, "{report:?}");

        // Not in use, one byte over the budget: the least recently used item goes, and only it;
        // young items are spared by the grace period.
        let base = store.path(&a.digest);
        fs::File::open(&base)?.set_modified(SystemTime::now() - Duration::from_secs(3600))?;
        let used = gc::collect(images, &store, &in_use, &now)?.used_before;
        let options = GcOptions {
            budget_bytes: used - 1,
            grace: Duration::from_secs(600),
        };
        let report = gc::collect(images, &store, &none, &options)?;
        assert_eq!(report.removed.len(), 1, "{report:?}");
        assert_eq!(
            (report.removed[0].kind, &report.removed[0].digest),
            (GcKind::Base, &a.digest)
        );
        assert!(!report.over_budget);
        assert!(!base.exists());
        // With no grace and no budget, everything unreferenced goes.
        let report = gc::collect(images, &store, &none, &now)?;
        assert!(!report.over_budget, "{report:?}");
        assert_eq!(images.blobs().list()?.len(), 0);
        Ok(())
    }

    #[test]
    fn writable_disk_is_clean_ext4_and_resets() -> Result<()> {
        let cache = private_cache();
        let disks = WritableDisks::open(cache.path())?;
        let disk = cache.path().join("machine-rw.img");
        let method = disks.create(&disk, 64)?;
        assert!(matches!(method, CloneMethod::Reflink | CloneMethod::SparseCopy));
        assert_eq!(fs::metadata(&disk)?.len(), 64 << 20);
        output(Command::new("e2fsck").arg("-fn").arg(&disk))?;
        let header = output(Command::new("dumpe2fs").arg("-h").arg(&disk))?;
        assert!(header.contains("Filesystem state:         clean"), "{header}");
        assert!(!header.contains("has_journal"), "{header}");
        // Sparse: a small fraction of the size is allocated.
        assert!(fs::metadata(&disk)?.blocks() * 512 < 16 << 20);

        // Scribble over the superblock, as a guest could never do but a bug might; reset.
        let mut junk = fs::OpenOptions::new().write(true).open(&disk)?;
        junk.write_all(&vec![0xa5; 1 << 20])?;
        drop(junk);
        assert!(
            Command::new("e2fsck")
                .arg("-fn")
                .arg(&disk)
                .output()?
                .status
                .code()
                != Some(0)
        );
        let started = Instant::now();
        disks.reset(&disk, 64)?;
        let elapsed = started.elapsed();
        output(Command::new("e2fsck").arg("-fn").arg(&disk))?;
        // The SPECIFICATION promise (≤ 50 ms) is measured by `cargo xtask bench image`; here only a
        // bound loose enough for a loaded CI machine.
        assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
        // Nothing but the disk next to it.
        assert_eq!(
            fs::read_dir(cache.path())?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("machine-rw"))
                .count(),
            1
        );
        Ok(())
    }
}
