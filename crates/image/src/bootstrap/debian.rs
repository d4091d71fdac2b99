//! `debian:bookworm` from debootstrap (minbase), cached as a finished layer.
//!
//! Cache layout under `CACHE_DIR/bootstrap/`:
//!
//! ```text
//! debian-bookworm-minbase-v1.tar.gz     the layer
//! debian-bookworm-minbase-v1.json       {"digest":"sha256:…","diff_id":"sha256:…","size":N,"entries":N}
//! .work-XXXXXX/                         a build in progress (private, deleted afterwards)
//! .lock                                 held (flock) by the one build running
//! ```
//!
//! A build left behind by a killed process is deleted by the next build (under the lock, and only
//! if nothing is mounted beneath it).
//!
//! A cached layer is used only when its bytes hash to the recorded digest. Bump the version in the
//! name when the tree or the layer format changes.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use super::{
    BootstrapError, BootstrapOptions, Bootstrapped, ImageSpec, LayerBlob, LayerOptions, check_target,
    push_image, write_layer,
};
use crate::digest::{Digest, Sha256};
use crate::reference::Reference;
use crate::registry::RegistryConfig;

/// Debian's main mirror (a CDN); [`BootstrapOptions::mirror`] overrides it.
pub const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
const CACHE_NAME: &str = "debian-bookworm-minbase-v1";
const DEBOOTSTRAP: &str = "/usr/sbin/debootstrap";
const UNSHARE: &str = "/usr/bin/unshare";
const UMOUNT: &str = "/usr/bin/umount";
/// Lines of debootstrap output kept for an error message.
const TAIL_LINES: usize = 25;

/// Directories whose contents stay out of the image: downloaded packages and package lists (apt
/// fetches them again), device nodes (the guest mounts devtmpfs, as Debian's own images ship an
/// empty `/dev`), and API filesystems' mount points.
const EMPTY_DIRS: [&str; 5] = [
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "dev",
    "proc",
    "sys",
];

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    digest: Digest,
    diff_id: Digest,
    size: u64,
    entries: u64,
}

/// Builds `debian:bookworm` with `debootstrap --variant=minbase` (or takes the layer cached under
/// `cache_dir/bootstrap/`) and pushes it as `target` (e.g. `127.0.0.1:5000/debian:bookworm`),
/// with `Env PATH=…` and `Cmd ["/bin/bash"]`. Returns the pushed image's digest and layer.
///
/// Needs root and the `debootstrap` package for a build (not for a cached layer), and Debian's
/// mirror ([`BootstrapOptions::mirror`], default [`DEBIAN_MIRROR`]) reachable. A build takes about
/// a minute on two cores; with the cache, only the push remains. Nothing is left behind on failure
/// (see the module doc of [`crate::bootstrap`] for how mounts are handled).
///
/// `cache_dir` is normally [`super::default_cache_dir`].
pub async fn bootstrap_debian(
    registry: &RegistryConfig,
    target: &Reference,
    cache_dir: &Path,
    options: &BootstrapOptions,
) -> Result<Bootstrapped, BootstrapError> {
    check_target(target)?;
    let dir = cache_dir.join("bootstrap");
    let opts = options.clone();
    let (blob, cached) = tokio::task::spawn_blocking(move || cached_or_built(&dir, &opts))
        .await
        .map_err(BootstrapError::Task)??;
    let image = ImageSpec {
        name: "debian",
        cmd: &["/bin/bash"],
        labels: BTreeMap::from([("org.opencontainers.image.version".to_owned(), SUITE.to_owned())]),
    };
    let digest = push_image(registry, target, &blob, &image, options).await?;
    Ok(Bootstrapped {
        reference: target.clone(),
        digest,
        layer: blob.digest,
        layer_size: blob.size,
        cached,
    })
}

/// The cached layer if it is intact, else a fresh build stored in the cache.
fn cached_or_built(dir: &Path, options: &BootstrapOptions) -> Result<(LayerBlob, bool), BootstrapError> {
    let layer_path = dir.join(format!("{CACHE_NAME}.tar.gz"));
    let record_path = dir.join(format!("{CACHE_NAME}.json"));
    if !options.rebuild
        && let Some(blob) = load_cached(&layer_path, &record_path)
    {
        options.say(&format!("using the cached debian layer {}", layer_path.display()));
        return Ok((blob, true));
    }
    check_host()?;
    fs::create_dir_all(dir).map_err(BootstrapError::io("create directory", dir))?;
    // One build per cache directory at a time: a concurrent caller waits here, then takes the
    // layer the first one stored. The lock goes with the file handle, however this ends.
    let lock_path = dir.join(".lock");
    let lock = fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(BootstrapError::io("open", &lock_path))?;
    lock.lock().map_err(BootstrapError::io("lock", &lock_path))?;
    if !options.rebuild
        && let Some(blob) = load_cached(&layer_path, &record_path)
    {
        options.say(&format!(
            "using the debian layer just built: {}",
            layer_path.display()
        ));
        return Ok((blob, true));
    }
    remove_stale_work_dirs(dir, options);
    let mut work = WorkDir::create(dir)?;
    let built = build(&work.path, options);
    let stored = built.and_then(|blob| store(&blob, &layer_path, &record_path));
    let cleaned = work.remove();
    let blob = stored?;
    cleaned?;
    Ok((blob, false))
}

/// Removes build directories that an interrupted build left behind (the caller holds the lock,
/// so none is in use). One with a mount beneath it stays, and is reported.
fn remove_stale_work_dirs(dir: &Path, options: &BootstrapOptions) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let stale = entry.file_name().to_string_lossy().starts_with(".work-")
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if stale {
            let mut work = WorkDir {
                path: entry.path(),
                removed: false,
            };
            match work.remove() {
                Ok(()) => options.say(&format!(
                    "removed an interrupted build: {}",
                    entry.path().display()
                )),
                Err(e) => options.say(&format!("kept an interrupted build: {e}")),
            }
        }
    }
}

fn check_host() -> Result<(), BootstrapError> {
    for (tool, package) in [
        (DEBOOTSTRAP, "debootstrap"),
        (UNSHARE, "util-linux"),
        (UMOUNT, "mount"),
    ] {
        if !Path::new(tool).is_file() {
            return Err(BootstrapError::MissingTool {
                path: tool.into(),
                package,
            });
        }
    }
    let euid = fs::metadata("/proc/self")
        .map_err(BootstrapError::io("stat", Path::new("/proc/self")))?
        .uid();
    if euid != 0 {
        return Err(BootstrapError::NeedsRoot {
            what: "debian:bookworm",
            why: "debootstrap creates root-owned files and chroots into the new tree",
        });
    }
    Ok(())
}

/// The cached layer, when its record is readable and its bytes match it.
fn load_cached(layer_path: &Path, record_path: &Path) -> Option<LayerBlob> {
    let record: CacheRecord = serde_json::from_slice(&fs::read(record_path).ok()?).ok()?;
    let mut file = fs::File::open(layer_path).ok()?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).ok()?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        size = size.saturating_add(u64::try_from(n).ok()?);
    }
    (hash.finish() == record.digest && size == record.size).then(|| LayerBlob {
        path: layer_path.to_path_buf(),
        digest: record.digest,
        diff_id: record.diff_id,
        size: record.size,
        entries: record.entries,
    })
}

/// Runs debootstrap into `work/rootfs`, tidies the tree and writes `work/layer.tar.gz`.
fn build(work: &Path, options: &BootstrapOptions) -> Result<LayerBlob, BootstrapError> {
    let mirror = options.mirror.as_deref().unwrap_or(DEBIAN_MIRROR);
    let rootfs = work.join("rootfs");
    options.say(&format!(
        "debootstrap --variant=minbase {SUITE} from {mirror} (about a minute)"
    ));
    debootstrap(&rootfs, mirror, options)?;
    // debootstrap copies the host's name and resolver into the target: the guest gets its own.
    for name in ["etc/hostname", "etc/resolv.conf"] {
        let path = rootfs.join(name);
        fs::write(&path, "").map_err(BootstrapError::io("write", &path))?;
    }
    options.say("writing the debian layer");
    let layer_options = LayerOptions {
        empty_dirs: EMPTY_DIRS.iter().map(PathBuf::from).collect(),
        ..LayerOptions::default()
    };
    write_layer(&rootfs, &work.join("layer.tar.gz"), &layer_options)
}

/// `unshare --mount debootstrap …`: the mounts debootstrap makes live in a namespace that dies
/// with it.
fn debootstrap(rootfs: &Path, mirror: &str, options: &BootstrapOptions) -> Result<(), BootstrapError> {
    let mut command = Command::new(UNSHARE);
    command
        .args(["--mount", "--propagation", "private", "--", DEBOOTSTRAP])
        .args(["--variant=minbase", SUITE])
        .arg(rootfs)
        .arg(mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("LC_ALL", "C");
    // debootstrap downloads with wget, which knows `http_proxy` but not apt's configuration: hand
    // it apt's proxy, so the mirror is reached the way apt reaches it.
    if std::env::var_os("http_proxy").is_none()
        && let Some(proxy) = apt_http_proxy()
    {
        options.say(&format!("using apt's HTTP proxy {proxy}"));
        command.env("http_proxy", proxy);
    }
    let (status, tail) = run_logged(command, options)?;
    if status.success() {
        return Ok(());
    }
    // debootstrap's own log says why a package failed to install.
    let log = fs::read_to_string(rootfs.join("debootstrap/debootstrap.log")).unwrap_or_default();
    let log_tail: Vec<&str> = log.lines().rev().take(TAIL_LINES).collect();
    let mut output: Vec<String> = tail.into_iter().collect();
    if !log_tail.is_empty() {
        output.push("--- debootstrap.log (end) ---".into());
        output.extend(log_tail.into_iter().rev().map(str::to_owned));
    }
    Err(BootstrapError::Debootstrap {
        status: status.to_string(),
        mirror: mirror.to_owned(),
        output: output.join("\n"),
    })
}

/// Runs `command` with stdin closed and stdout and stderr, merged, passed line by line to the
/// status callback; returns its exit status and its last [`TAIL_LINES`] lines. Returns once the
/// command and everything it started have closed the output.
fn run_logged(
    mut command: Command,
    options: &BootstrapOptions,
) -> Result<(std::process::ExitStatus, VecDeque<String>), BootstrapError> {
    let program = PathBuf::from(command.get_program());
    let (reader, writer) = std::io::pipe().map_err(BootstrapError::io("create a pipe for", &program))?;
    let writer2 = writer
        .try_clone()
        .map_err(BootstrapError::io("create a pipe for", &program))?;
    command.stdin(Stdio::null()).stdout(writer).stderr(writer2);
    let mut child = command.spawn().map_err(BootstrapError::io("run", &program))?;
    // The Command holds our copies of the pipe's write end: until they are gone the read below
    // never sees EOF.
    drop(command);
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    for line in BufReader::new(reader).lines() {
        let Ok(line) = line else { break };
        options.say(&line);
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    let status = child.wait().map_err(BootstrapError::io("wait for", &program))?;
    Ok((status, tail))
}

/// apt's `Acquire::http::Proxy`, if set (`apt-config shell` prints `P='http://proxy:3128/'`).
fn apt_http_proxy() -> Option<String> {
    let out = Command::new("apt-config")
        .args(["shell", "P", "Acquire::http::Proxy"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    parse_apt_shell(&String::from_utf8_lossy(&out.stdout))
}

/// The value of `P='…'` in `apt-config shell` output; `None` when unset, empty or `DIRECT`.
fn parse_apt_shell(out: &str) -> Option<String> {
    let value = out.lines().find_map(|l| l.trim().strip_prefix("P="))?;
    let value = value.trim_matches('\'').trim();
    (!value.is_empty() && !value.eq_ignore_ascii_case("DIRECT") && !value.contains('\''))
        .then(|| value.to_owned())
}

/// Moves the built layer into the cache: record first, then the layer (a layer without a
/// matching record is never used).
fn store(blob: &LayerBlob, layer_path: &Path, record_path: &Path) -> Result<LayerBlob, BootstrapError> {
    let record = CacheRecord {
        digest: blob.digest.clone(),
        diff_id: blob.diff_id.clone(),
        size: blob.size,
        entries: blob.entries,
    };
    let tmp = record_path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec(&record).unwrap_or_default())
        .map_err(BootstrapError::io("write", &tmp))?;
    fs::rename(&tmp, record_path).map_err(BootstrapError::io("rename", record_path))?;
    fs::rename(&blob.path, layer_path).map_err(BootstrapError::io("rename", layer_path))?;
    Ok(LayerBlob {
        path: layer_path.to_path_buf(),
        ..blob.clone()
    })
}

/// A private build directory, deleted on drop unless something is mounted beneath it.
#[derive(Debug)]
struct WorkDir {
    path: PathBuf,
    removed: bool,
}

impl WorkDir {
    fn create(parent: &Path) -> Result<Self, BootstrapError> {
        let dir = tempfile::Builder::new()
            .prefix(".work-")
            .permissions(fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)
            .map_err(BootstrapError::io("create temporary directory in", parent))?;
        // Kept from here on: `remove` deletes it, but only after checking the mounts.
        let path = dir.keep();
        Ok(Self { path, removed: false })
    }

    /// Unmounts anything left beneath the directory (there should be nothing: debootstrap ran in
    /// its own mount namespace), then deletes it. Refuses to delete through a mount.
    fn remove(&mut self) -> Result<(), BootstrapError> {
        self.removed = true;
        let mut mounts = mounts_under(&self.path)?;
        // Deepest first.
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for mount in &mounts {
            let _ = Command::new(UMOUNT).arg("--lazy").arg(mount).status();
        }
        let left = mounts_under(&self.path)?.len();
        if left > 0 {
            return Err(BootstrapError::StillMounted {
                path: self.path.clone(),
                mounts: left,
            });
        }
        fs::remove_dir_all(&self.path).map_err(BootstrapError::io("remove", &self.path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove();
        }
    }
}

/// Mount points at or beneath `dir` in this process's mount namespace.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>, BootstrapError> {
    let dir = fs::canonicalize(dir).map_err(BootstrapError::io("resolve", dir))?;
    let info_path = Path::new("/proc/self/mountinfo");
    let info = fs::read_to_string(info_path).map_err(BootstrapError::io("read", info_path))?;
    Ok(parse_mount_points(&info)
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect())
}

/// The mount point column of `/proc/self/mountinfo` (octal escapes decoded).
fn parse_mount_points(info: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let raw = field.as_bytes();
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                let octal = raw
                    .get(i + 1..i + 4)
                    .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
                match (raw[i], octal) {
                    (b'\\', Some(d)) => {
                        let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                        out.push(u8::try_from(value).unwrap_or(b'?'));
                        i += 4;
                    }
                    (b, _) => {
                        out.push(b);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_proxy_is_read_from_apt_config_shell_output() {
        assert_eq!(
            parse_apt_shell("P='http://proxy.example:3128/'\n").as_deref(),
            Some("http://proxy.example:3128/")
        );
        assert_eq!(parse_apt_shell(""), None);
        assert_eq!(parse_apt_shell("P=''\n"), None);
        assert_eq!(parse_apt_shell("P='DIRECT'\n"), None);
    }

    #[test]
    fn logged_commands_end_with_their_process_and_keep_the_tail() {
        // Run on a thread so a read that never ends fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let seen = std::sync::Arc::clone(&lines);
            let options = BootstrapOptions {
                status: Some(std::sync::Arc::new(move |l: &str| {
                    seen.lock().unwrap().push(l.to_owned())
                })),
                ..BootstrapOptions::default()
            };
            let mut command = Command::new("sh");
            command.args([
                "-c",
                "for i in $(seq 1 40); do echo out $i; done; echo err >&2; exit 3",
            ]);
            let result = run_logged(command, &options).map(|(status, tail)| (status.code(), tail));
            let _ = tx.send((result, lines.lock().unwrap().len()));
        });
        let (result, seen) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("run_logged returns once the command exits");
        let (code, tail) = result.unwrap();
        assert_eq!(code, Some(3));
        assert_eq!(seen, 41, "every line reaches the status callback");
        assert_eq!(tail.len(), TAIL_LINES);
        assert_eq!(tail.back().map(String::as_str), Some("err"));
        assert_eq!(tail.front().map(String::as_str), Some("out 17"));
    }

    #[test]
    fn mount_points_are_decoded() {
        let info = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    40 22 0:35 / /tmp/a\\040b/x\\134y rw - tmpfs tmpfs rw\n\
                    bad line\n";
        assert_eq!(
            parse_mount_points(info),
            vec![PathBuf::from("/proc"), PathBuf::from("/tmp/a b/x\\y")]
        );
    }

    #[test]
    fn work_dir_is_private_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let mut work = WorkDir::create(parent.path()).unwrap();
        let mode = fs::metadata(&work.path).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        fs::create_dir_all(work.path.join("rootfs/etc")).unwrap();
        std::os::unix::fs::symlink("/etc", work.path.join("rootfs/host-etc")).unwrap();
        assert!(mounts_under(&work.path).unwrap().is_empty());
        let path = work.path.clone();
        work.remove().unwrap();
        assert!(!path.exists());
        assert!(
            Path::new("/etc/passwd").exists(),
            "a symlink out is removed, not followed"
        );
        // Dropping a work directory removes it too.
        let path = WorkDir::create(parent.path()).unwrap().path.clone();
        assert!(!path.exists());
    }

    #[test]
    fn work_dir_with_a_mount_beneath_is_left_alone_when_unmounting_fails() {
        // Needs root for the mount; everything else is checked above.
        if fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(1) != 0 {
            eprintln!("skipped: mounting needs root");
            return;
        }
        let parent = tempfile::tempdir().unwrap();
        let mut work = WorkDir::create(parent.path()).unwrap();
        let mnt = work.path.join("rootfs/proc");
        fs::create_dir_all(&mnt).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "aloft-test"])
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(mounted.success());
        fs::write(mnt.join("inside-the-mount"), "x").unwrap();
        assert_eq!(mounts_under(&work.path).unwrap(), vec![mnt.clone()]);
        // remove() unmounts (lazily) first, then deletes.
        let path = work.path.clone();
        work.remove().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn interrupted_builds_are_removed_but_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let stale = WorkDir::create(dir.path()).unwrap();
        let stale_path = stale.path.clone();
        std::mem::forget(stale); // as if the process had been killed
        fs::create_dir_all(stale_path.join("rootfs/usr")).unwrap();
        fs::write(dir.path().join(format!("{CACHE_NAME}.json")), "{}").unwrap();
        fs::create_dir(dir.path().join("other")).unwrap();
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = std::sync::Arc::clone(&lines);
        let options = BootstrapOptions {
            status: Some(std::sync::Arc::new(move |l: &str| {
                seen.lock().unwrap().push(l.to_owned())
            })),
            ..BootstrapOptions::default()
        };
        remove_stale_work_dirs(dir.path(), &options);
        assert!(!stale_path.exists());
        assert!(dir.path().join("other").is_dir() && dir.path().join(format!("{CACHE_NAME}.json")).is_file());
        assert_eq!(lines.lock().unwrap().len(), 1);
    }

    #[test]
    fn cache_is_used_only_when_it_matches_its_record() {
        let dir = tempfile::tempdir().unwrap();
        let (layer, record) = (dir.path().join("l.tar.gz"), dir.path().join("l.json"));
        assert!(load_cached(&layer, &record).is_none());
        fs::write(&layer, b"layer bytes").unwrap();
        let good = CacheRecord {
            digest: Digest::of(b"layer bytes"),
            diff_id: Digest::of(b"tar"),
            size: 11,
            entries: 3,
        };
        fs::write(&record, serde_json::to_vec(&good).unwrap()).unwrap();
        let blob = load_cached(&layer, &record).unwrap();
        assert_eq!((blob.size, blob.entries), (11, 3));
        fs::write(&layer, b"layer bytez").unwrap();
        assert!(
            load_cached(&layer, &record).is_none(),
            "a corrupted layer is rebuilt"
        );
        fs::write(&record, b"{not json").unwrap();
        assert!(load_cached(&layer, &record).is_none());
    }

    #[test]
    fn pinned_target_fails_before_any_work() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let cache = tempfile::tempdir().unwrap();
        let target = Reference::parse("127.0.0.1:1/debian:bookworm")
            .unwrap()
            .with_digest(Digest::of(b"x"));
        let result = rt.block_on(bootstrap_debian(
            &RegistryConfig::default(),
            &target,
            cache.path(),
            &BootstrapOptions::default(),
        ));
        assert!(matches!(result, Err(BootstrapError::Target { .. })));
        assert!(!cache.path().join("bootstrap").exists());
    }
}
