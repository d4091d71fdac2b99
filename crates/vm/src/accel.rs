//! Choosing the accelerator: KVM only when a real guest boots on it, TCG otherwise.
//!
//! `/dev/kvm` existing proves little: on the team's dev machines it is a software PVM layer on which
//! ordinary guests die in the instruction emulator. So the probe boots our kernel and initramfs with
//! [`aloft_guest_proto::PROBE_CMDLINE_FLAG`] under `-accel kvm` and waits ~5 s for init's
//! [`aloft_guest_proto::CONSOLE_HELLO`], with the QEMU the machine runs on (a spec's
//! [`crate::VmSpec::qemu`]; [`probe`] takes [`crate::default_qemu`]). The answer is cached per
//! QEMU and kernel (paths + mtimes) and host boot (`/proc/sys/kernel/random/boot_id`) in
//! `$ALOFT_CACHE/accel.json` (default `~/.cache/aloft/accel.json`), and remembered in the process
//! by the same key (a launch then costs two `stat`s). `ALOFT_ACCEL=kvm|tcg` overrides everything.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use crate::spec::Accel;
use crate::spec::AccelChoice;

/// How long the probe guest gets to print its hello line.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The accelerator for `kernel` + `initrd` on this host with the QEMU machines booting that kernel
/// get ([`crate::default_qemu`]); see the module docs. Never fails: anything unexpected means TCG.
pub fn probe(kernel: &Path, initrd: &Path) -> Accel {
    probe_with(&crate::default_qemu(kernel), kernel, initrd)
}

/// [`probe`] with `qemu` (a path, or a name looked up on `PATH`).
pub fn probe_with(qemu: &Path, kernel: &Path, initrd: &Path) -> Accel {
    if let Some(a) = env_override() {
        return a;
    }
    let key = cache_key(qemu, kernel);
    if let Some(a) = key.as_deref().and_then(remembered) {
        return a;
    }
    let cache = cache_file();
    let a = match (&key, &cache) {
        (Some(key), Some(cache)) => read_cache(cache, key),
        _ => None,
    }
    .unwrap_or_else(|| {
        let a = probe_uncached(qemu, kernel, initrd);
        if let (Some(key), Some(cache)) = (&key, &cache) {
            write_cache(cache, key.clone(), a);
        }
        a
    });
    if let Some(key) = key {
        remember(key, a);
    }
    a
}

/// Answers this process already has, by [`cache_key`]: every launch resolves its accelerator
/// (a template start twice), and the key's two `stat`s are all a known QEMU and kernel cost then,
/// not the cache file's read and parse. Another process's later probe of the same key would find
/// the same answer, so nothing here goes stale that the file would have refreshed.
fn memo() -> &'static Mutex<HashMap<String, Accel>> {
    static MEMO: OnceLock<Mutex<HashMap<String, Accel>>> = OnceLock::new();
    MEMO.get_or_init(Mutex::default)
}

fn remembered(key: &str) -> Option<Accel> {
    memo().lock().ok()?.get(key).copied()
}

fn remember(key: String, accel: Accel) {
    if let Ok(mut m) = memo().lock() {
        m.insert(key, accel);
    }
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`), read once: it cannot change under a
/// running process.
fn boot_id() -> Option<&'static str> {
    static BOOT_ID: OnceLock<Option<String>> = OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .ok()
                .map(|s| s.trim().to_owned())
        })
        .as_deref()
}

/// Resolves a spec's choice: probing with the spec's own QEMU.
pub fn resolve(spec: &crate::VmSpec) -> Accel {
    match spec.accel {
        AccelChoice::Kvm => Accel::Kvm,
        AccelChoice::Tcg => Accel::Tcg,
        AccelChoice::Auto => probe_with(&spec.qemu, &spec.kernel, &spec.initrd),
    }
}

fn env_override() -> Option<Accel> {
    match std::env::var("ALOFT_ACCEL").ok()?.to_ascii_lowercase().as_str() {
        "kvm" => Some(Accel::Kvm),
        "tcg" => Some(Accel::Tcg),
        _ => None,
    }
}

fn cache_file() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("ALOFT_CACHE") {
        return Some(PathBuf::from(dir).join("accel.json"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/aloft/accel.json"))
}

/// `qemu path | mtime ns | kernel path | mtime ns | boot id`: another QEMU (or the same one
/// rebuilt) may well boot where this one does not.
fn cache_key(qemu: &Path, kernel: &Path) -> Option<String> {
    let stamp = |p: &Path| -> Option<String> {
        let mtime = std::fs::metadata(p).ok()?.modified().ok()?;
        let ns = mtime.duration_since(UNIX_EPOCH).ok()?.as_nanos();
        Some(format!("{}|{ns}", p.display()))
    };
    let qemu = stamp(&crate::spec::resolve_qemu(qemu)?)?;
    let kernel = stamp(kernel)?;
    Some(format!("{qemu}|{kernel}|{}", boot_id()?))
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheEntry {
    key: String,
    accel: Accel,
}

fn read_cache(path: &Path, key: &str) -> Option<Accel> {
    let entries: Vec<CacheEntry> = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    entries.into_iter().find(|e| e.key == key).map(|e| e.accel)
}

fn write_cache(path: &Path, key: String, accel: Accel) {
    let mut entries: Vec<CacheEntry> = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    entries.retain(|e| e.key != key);
    entries.push(CacheEntry { key, accel });
    // Keep the file small: the last few kernels are enough.
    let excess = entries.len().saturating_sub(16);
    entries.drain(..excess);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(json) = serde_json::to_vec_pretty(&entries) {
        let _ = std::fs::write(path, json);
    }
}

fn probe_uncached(qemu: &Path, kernel: &Path, initrd: &Path) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    if boots_with(qemu, kernel, initrd, Accel::Kvm, PROBE_TIMEOUT) {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Boots the probe guest on `qemu` under `accel` and says whether init's hello appeared within
/// `timeout`.
pub(crate) fn boots_with(qemu: &Path, kernel: &Path, initrd: &Path, accel: Accel, timeout: Duration) -> bool {
    let argv = crate::argv::probe_argv(qemu, kernel, initrd, accel, crate::argv::host_tsc_khz());
    let Ok(mut child) = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                if String::from_utf8_lossy(&line).contains(aloft_guest_proto::CONSOLE_HELLO) {
                    let _ = tx.send(());
                    break;
                }
            }
        });
    }
    let ok = rx.recv_timeout(timeout).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trips_and_is_keyed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("sub/accel.json");
        assert_eq!(read_cache(&f, "k1"), None);
        write_cache(&f, "k1".into(), Accel::Tcg);
        write_cache(&f, "k2".into(), Accel::Kvm);
        write_cache(&f, "k1".into(), Accel::Kvm);
        assert_eq!(read_cache(&f, "k1"), Some(Accel::Kvm));
        assert_eq!(read_cache(&f, "k2"), Some(Accel::Kvm));
        assert_eq!(read_cache(&f, "k3"), None);
    }

    #[test]
    fn cache_key_changes_with_the_kernel_and_the_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let q1 = dir.path().join("qemu-a");
        let q2 = dir.path().join("qemu-b");
        for f in [&k, &q1, &q2] {
            std::fs::write(f, b"x").unwrap();
        }
        let a = cache_key(&q1, &k).unwrap();
        assert!(a.contains("vmlinux|") && a.contains("qemu-a|"), "{a}");
        assert_ne!(
            a,
            cache_key(&q2, &k).unwrap(),
            "another QEMU is probed on its own"
        );
        // Rebuilt in place: a new mtime, a new probe.
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&q1)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_ne!(a, cache_key(&q1, &k).unwrap());
        assert_eq!(cache_key(&q1, &dir.path().join("missing")), None);
        assert_eq!(cache_key(&dir.path().join("no-qemu"), &k), None);
    }

    #[test]
    fn a_key_this_process_resolved_is_answered_without_the_cache_file() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let q = dir.path().join("qemu");
        for f in [&k, &q] {
            std::fs::write(f, b"x").unwrap();
        }
        let key = cache_key(&q, &k).unwrap();
        assert_eq!(remembered(&key), None);
        remember(key.clone(), Accel::Kvm);
        assert_eq!(remembered(&key), Some(Accel::Kvm));
        // Neither the QEMU nor the kernel can boot (they are not real), nor is `ALOFT_CACHE` read:
        // the answer can only be the remembered one (or the environment's override).
        let expected = env_override().unwrap_or(Accel::Kvm);
        assert_eq!(probe_with(&q, &k, &dir.path().join("initrd")), expected);
        // A rebuilt QEMU is another key, not remembered.
        let later = std::time::SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&q)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(remembered(&cache_key(&q, &k).unwrap()), None);
    }

    #[test]
    fn missing_kernel_probes_as_tcg() {
        // No QEMU boot can succeed without a kernel: whatever /dev/kvm says, the answer is TCG.
        assert!(!boots_with(
            Path::new("qemu-system-x86_64"),
            Path::new("/nonexistent/vmlinux"),
            Path::new("/nonexistent/initrd"),
            Accel::Kvm,
            Duration::from_secs(2)
        ));
    }
}
