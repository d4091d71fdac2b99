//! `cargo xtask bench api`: what aloftd's Machines API adds to a machine's start, and how fast it
//! answers.
//!
//! The real `aloftd` binary (built here with `--aloftd-profile`, `release` by default: what users
//! run) is started as a child with a temporary data directory and `XDG_CONFIG_HOME`; the token is
//! read from the CLI config it writes. Requests go over a small HTTP/1.1 keep-alive client on
//! `TcpStream` (no client library between the clock and the socket).
//!
//! * `api_create_to_started_ms`: aloftd `--driver vm --network none` with the busybox image from a
//!   local registry, pulled and built once beforehand; `POST …/machines` →
//!   `GET …/wait?state=started` returns. 1 vCPU, 256 MiB (the API's smallest shared size), httpd.
//! * `vm_start_ms`, alternating with it in the same run: the boot benchmark's machine path
//!   (`bench_boot::machine_start_ms`: `VmSpec` → workload started) with the same guest: 1 vCPU,
//!   256 MiB, busybox erofs base, httpd, no network. `api_overhead_ms` is the difference.
//! * `get_p99_ms`, `list_1000_ms`: an aloftd on `--driver fake` whose host holds 1,002 machines;
//!   `create_rate_per_s`: another one, fresh.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use aloft_image::RootfsFormat;
use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::aloftd::{
    Conn, Daemon, Idle, build_aloftd, create_app, destroy, destroy_all, loadavg, ms, round1, unix_ms,
    wait_state,
};
use crate::stats::{median, min};

/// The API machine's memory: the smallest a shared vCPU may have (Fly's rule, enforced by
/// `aloft-api`); the baseline boots the same.
const MEMORY_MIB: u32 = 256;
/// `get_p99_ms`: requests per second, for how long, over how many keep-alive connections.
const GET_RATE: u32 = 1000;
const GET_SECS: u32 = 3;
const GET_CONNS: u32 = 4;
/// `list_1000_ms`: machines in the listed app, created by this many clients at once.
const LIST_MACHINES: usize = 1000;
const LIST_WORKERS: usize = 8;
/// `create_rate_per_s`: creates at once.
const CREATE_BURST: usize = 20;

/// What `cargo xtask bench api` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct ApiBench {
    pub(crate) runs: usize,
    /// Cargo profile aloftd is built with (`release`, `dev`).
    pub(crate) profile: String,
}

pub(crate) fn run(args: &ApiBench) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    let load_before = loadavg();
    let bin = build_aloftd(&args.profile)?;
    eprintln!(
        "bench api: {} ({} profile), {runs} runs, load {load_before}",
        bin.display(),
        args.profile
    );

    let fake = fake_series(&bin, runs)?;
    let vm = vm_series(&bin, runs)?;
    let load_after = loadavg();

    let api_med = median(&vm.api).unwrap_or(f64::NAN);
    let vm_med = median(&vm.baseline).unwrap_or(f64::NAN);
    let overhead = api_med - vm_med;
    let rows: [(&str, f64, f64, &str, String); 6] = [
        (
            "api_create_to_started_ms",
            api_med,
            min(&vm.api).unwrap_or(f64::NAN),
            "ms",
            "POST create (image cached) → wait?state=started returns".into(),
        ),
        (
            "vm_start_ms",
            vm_med,
            min(&vm.baseline).unwrap_or(f64::NAN),
            "ms",
            "baseline: bench boot's machine path, same guest, VmSpec → started".into(),
        ),
        (
            "api_overhead_ms",
            overhead,
            f64::NAN,
            "ms",
            "api_create_to_started − vm_start (target ≤ 50)".into(),
        ),
        (
            "get_p99_ms",
            median(&fake.get_p99).unwrap_or(f64::NAN),
            min(&fake.get_p99).unwrap_or(f64::NAN),
            "ms",
            format!("GET machine at {GET_RATE}/s for {GET_SECS} s, fake driver (target ≤ 5)"),
        ),
        (
            "list_1000_ms",
            median(&fake.list).unwrap_or(f64::NAN),
            min(&fake.list).unwrap_or(f64::NAN),
            "ms",
            format!("GET an app's {LIST_MACHINES} machines, fake driver (target ≤ 50)"),
        ),
        (
            "create_rate_per_s",
            median(&fake.create_rate).unwrap_or(f64::NAN),
            min(&fake.create_rate).unwrap_or(f64::NAN),
            "1/s",
            format!("{CREATE_BURST} concurrent creates / wall time, fake driver"),
        ),
    ];
    println!(
        "{:<26} {:>10} {:>10}  {:<5} what",
        "metric", "median", "min", "unit"
    );
    let mut metrics = serde_json::Map::new();
    for (name, med, lo, unit, what) in rows {
        println!("{name:<26} {med:>10.1} {lo:>10.1}  {unit:<5} {what}");
        metrics.insert(name.to_owned(), json!({ "value": round1(med), "unit": unit }));
    }
    println!("details:");
    for (name, samples, what) in [
        (
            "  create_post_ms",
            &vm.post,
            "of api_create_to_started: POST create answered",
        ),
        (
            "  paired_overhead_ms",
            &vm.paired,
            "per run: api − baseline of the same pair",
        ),
        (
            "  api_before_boot_ms",
            &vm.before_boot,
            "create sent → Vm::start began (control, agent steps, disk, spec)",
        ),
        (
            "  api_boot_ms",
            &vm.boot,
            "Vm::start → agent recorded started (cf. vm_start_ms)",
        ),
        (
            "  api_after_boot_ms",
            &vm.after_boot,
            "recorded started → client has the answer",
        ),
        (
            "  list_summary_ms",
            &fake.list_summary,
            "GET the 1000 machines with ?summary=true (no configs)",
        ),
        (
            "  list_one_small_ms",
            &fake.list_one_small,
            "GET an app of 1 machine, host has 2 machines",
        ),
        (
            "  list_one_ms",
            &fake.list_one,
            "GET an app of 1 machine, host has 1000 more (per-host cost)",
        ),
        (
            "  get_p50_ms",
            &fake.get_p50,
            "GET machine at the same pace: median latency",
        ),
        (
            "  get_max_ms",
            &fake.get_max,
            "GET machine at the same pace: slowest request",
        ),
    ] {
        println!(
            "{name:<26} {:>10.1} {:>10.1}  ms    {what}",
            median(samples).unwrap_or(f64::NAN),
            min(samples).unwrap_or(f64::NAN)
        );
    }
    println!(
        "list of {LIST_MACHINES}: {} KiB of JSON ({} KiB summarized); {LIST_MACHINES} creates took {:.1} s \
         with {LIST_WORKERS} clients; GETs more than 1 ms behind their schedule: {}",
        fake.list_bytes / 1024,
        fake.list_summary_bytes / 1024,
        fake.populate_s,
        fake.get_late
    );
    println!(
        "GET p99 with 1 machine on the host: {:.1} ms. aloftd idle: {:.1}% of a core and {} threads \
         with ~1 machine, {:.1}% and {} threads with {} machines",
        fake.get_p99_empty,
        fake.idle_empty.cpu_pct,
        fake.idle_empty.threads,
        fake.idle_full.cpu_pct,
        fake.idle_full.threads,
        fake.idle_full.machines,
    );
    println!(
        "aloftd {} profile, access log off; load {load_before} before, {load_after} after",
        args.profile
    );
    println!("{}", json!({ "bench": "api", "metrics": metrics }));
    Ok(())
}

/// The machine every create asks for.
fn machine_request() -> Value {
    json!({
        "config": {
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": MEMORY_MIB, "cpu_kind": "shared"},
            "init": {"cmd": ["/bin/httpd", "-f", "-p", "8080", "-h", "/"]},
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Fake driver: GET latency, list, create rate.

struct FakeResults {
    create_rate: Vec<f64>,
    list: Vec<f64>,
    list_summary: Vec<f64>,
    list_one: Vec<f64>,
    /// `list_one` while the host had 2 machines.
    list_one_small: Vec<f64>,
    list_bytes: usize,
    list_summary_bytes: usize,
    populate_s: f64,
    get_p99: Vec<f64>,
    get_p50: Vec<f64>,
    get_max: Vec<f64>,
    get_late: usize,
    /// One paced series before the host had more than one machine.
    get_p99_empty: f64,
    /// aloftd's own CPU and threads while nobody calls it, with ~1 and with 1,000+ machines.
    idle_empty: Idle,
    idle_full: Idle,
}

/// The fake-driver measurements: the create rate on an aloftd of its own (a fresh store), the
/// rest on a second one, so the host holds the same machines whatever `runs` is.
fn fake_series(bin: &Path, runs: usize) -> anyhow::Result<FakeResults> {
    let create_rate = with_fake_daemon(bin, |daemon| {
        create_app(&mut daemon.conn(), "rate")?;
        let mut rates = Vec::new();
        for _ in 0..runs {
            let wall = create_burst(daemon, "rate", CREATE_BURST)?;
            #[expect(clippy::cast_precision_loss, reason = "small counts")]
            rates.push(CREATE_BURST as f64 / wall.as_secs_f64());
        }
        Ok(rates)
    })?;
    let mut results = with_fake_daemon(bin, |daemon| fake_measure(daemon, runs))?;
    results.create_rate = create_rate;
    Ok(results)
}

/// Runs `f` against a fresh aloftd on the fake driver, then stops it (nothing runs on the fake
/// driver, so nothing is left behind).
fn with_fake_daemon<T>(bin: &Path, f: impl FnOnce(&Daemon) -> anyhow::Result<T>) -> anyhow::Result<T> {
    let daemon = Daemon::start("api", bin, &["--driver", "fake", "--network", "none"])?;
    let result = f(&daemon);
    if result.is_err() {
        eprintln!("bench api: fake aloftd's log:\n{}", daemon.log_tail());
    }
    daemon.stop();
    result
}

fn fake_measure(daemon: &Daemon, runs: usize) -> anyhow::Result<FakeResults> {
    let mut conn = daemon.conn();
    for app in ["list", "one", "get"] {
        create_app(&mut conn, app)?;
    }

    // The GET target, and one paced series while the host has (almost) no machines.
    let id = create_machine(&mut conn, "get")?;
    let get_path = format!("/v1/apps/get/machines/{id}");
    for _ in 0..200 {
        conn.expect("GET", &get_path, None, 200)?;
    }
    let get_p99_empty = percentile(&paced_gets(daemon, &get_path)?.latencies, 0.99);
    let idle_empty = daemon.idle_cpu()?;

    // An app of one machine, listed before and after the host has 1,000 more; then the app of
    // 1,000.
    create_many(daemon, "one", 1, 1)?;
    let (list_one_small, _) = time_list(&mut conn, "/v1/apps/one/machines", 1, runs)?;
    let t0 = Instant::now();
    create_many(daemon, "list", LIST_MACHINES, LIST_WORKERS)?;
    let populate_s = t0.elapsed().as_secs_f64();
    let idle_full = daemon.idle_cpu()?;
    let (list, list_bytes) = time_list(&mut conn, "/v1/apps/list/machines", LIST_MACHINES, runs)?;
    let (list_summary, list_summary_bytes) = time_list(
        &mut conn,
        "/v1/apps/list/machines?summary=true",
        LIST_MACHINES,
        runs,
    )?;
    let (list_one, _) = time_list(&mut conn, "/v1/apps/one/machines", 1, runs)?;

    // GET one machine, paced, with the host full.
    let (mut get_p99, mut get_p50, mut get_max, mut get_late) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..runs {
        let paced = paced_gets(daemon, &get_path)?;
        get_p99.push(percentile(&paced.latencies, 0.99));
        get_p50.push(percentile(&paced.latencies, 0.50));
        get_max.push(percentile(&paced.latencies, 1.0));
        get_late += paced.late;
    }
    Ok(FakeResults {
        create_rate: Vec::new(),
        list,
        list_summary,
        list_one,
        list_one_small,
        list_bytes,
        list_summary_bytes,
        populate_s,
        get_p99,
        get_p50,
        get_max,
        get_late,
        get_p99_empty,
        idle_empty,
        idle_full,
    })
}

/// `POST …/machines`; returns the new machine's id.
fn create_machine(conn: &mut Conn, app: &str) -> anyhow::Result<String> {
    let m = conn.expect(
        "POST",
        &format!("/v1/apps/{app}/machines"),
        Some(&machine_request()),
        200,
    )?;
    m["id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("create answered without an id: {m}"))
}

/// `n` creates at once, each on its own (already open) connection; the wall time from their
/// release to the last answer.
fn create_burst(daemon: &Daemon, app: &str, n: usize) -> anyhow::Result<Duration> {
    let barrier = Arc::new(Barrier::new(n + 1));
    let body = serde_json::to_vec(&machine_request())?;
    let path = format!("/v1/apps/{app}/machines");
    let mut threads = Vec::new();
    for _ in 0..n {
        let mut conn = daemon.conn();
        conn.connect()?;
        let (barrier, body, path) = (barrier.clone(), body.clone(), path.clone());
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            barrier.wait();
            let (status, resp) = conn.request("POST", &path, Some(&body))?;
            if status != 200 {
                bail!("create: HTTP {status}: {}", String::from_utf8_lossy(&resp));
            }
            Ok(())
        }));
    }
    barrier.wait();
    let t0 = Instant::now();
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
    }
    Ok(t0.elapsed())
}

/// `total` creates in `app` by `workers` clients at once.
fn create_many(daemon: &Daemon, app: &str, total: usize, workers: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..workers {
        let mut conn = daemon.conn();
        let (next, app) = (next.clone(), app.to_owned());
        threads.push(std::thread::spawn(move || -> anyhow::Result<()> {
            while next.fetch_add(1, Ordering::Relaxed) < total {
                create_machine(&mut conn, &app)?;
            }
            Ok(())
        }));
    }
    for t in threads {
        t.join()
            .map_err(|_| anyhow::anyhow!("a create thread panicked"))??;
    }
    Ok(())
}

/// Times `GET path` (a machine list of `expect` entries): one untimed request that checks the
/// count, then `max(runs, 5)` timed ones. Returns the samples and the body's size.
fn time_list(conn: &mut Conn, path: &str, expect: usize, runs: usize) -> anyhow::Result<(Vec<f64>, usize)> {
    let (status, body) = conn.request("GET", path, None)?;
    if status != 200 {
        bail!("GET {path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    let list: Value = serde_json::from_slice(&body)?;
    let n = list.as_array().map_or(0, Vec::len);
    if n != expect {
        bail!("GET {path} listed {n} machines, not {expect}");
    }
    let mut samples = Vec::new();
    for _ in 0..runs.max(5) {
        let t0 = Instant::now();
        let (status, _) = conn.request("GET", path, None)?;
        samples.push(ms(t0));
        if status != 200 {
            bail!("GET {path}: HTTP {status}");
        }
    }
    Ok((samples, body.len()))
}

struct Paced {
    latencies: Vec<f64>,
    /// Requests sent more than 1 ms after their scheduled time (the previous answer on that
    /// connection came late).
    late: usize,
}

/// `GET path` at [`GET_RATE`] per second for [`GET_SECS`] seconds over [`GET_CONNS`] keep-alive
/// connections, each on its own schedule (staggered); every request's latency, send → last byte.
fn paced_gets(daemon: &Daemon, path: &str) -> anyhow::Result<Paced> {
    let interval = Duration::from_secs(1) * GET_CONNS / GET_RATE;
    let per_conn = GET_RATE * GET_SECS / GET_CONNS;
    let start = Instant::now() + Duration::from_millis(50);
    let mut threads = Vec::new();
    for c in 0..GET_CONNS {
        let mut conn = daemon.conn();
        conn.connect()?;
        let path = path.to_owned();
        threads.push(std::thread::spawn(move || -> anyhow::Result<Paced> {
            let offset = interval * c / GET_CONNS;
            let mut out = Paced {
                latencies: Vec::new(),
                late: 0,
            };
            for k in 0..per_conn {
                let due = start + offset + interval * k;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                } else if now - due > Duration::from_millis(1) {
                    out.late += 1;
                }
                let t0 = Instant::now();
                let (status, body) = conn.request("GET", &path, None)?;
                out.latencies.push(ms(t0));
                if status != 200 {
                    bail!("GET {path}: HTTP {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Ok(out)
        }));
    }
    let mut all = Paced {
        latencies: Vec::new(),
        late: 0,
    };
    for t in threads {
        let p = t.join().map_err(|_| anyhow::anyhow!("a GET thread panicked"))??;
        all.latencies.extend(p.latencies);
        all.late += p.late;
    }
    Ok(all)
}

/// The `q` quantile (0..=1) by nearest rank; NaN when empty.
fn percentile(samples: &[f64], q: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "an index into a short vector"
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

// ---------------------------------------------------------------------------------------------
// VM driver: create → started against the boot benchmark's machine path.

struct VmResults {
    api: Vec<f64>,
    post: Vec<f64>,
    baseline: Vec<f64>,
    paired: Vec<f64>,
    /// Per API run, from aloftd's files (see [`Split`]).
    before_boot: Vec<f64>,
    boot: Vec<f64>,
    after_boot: Vec<f64>,
}

/// Where one API create → started went, from marks aloftd leaves on disk: the machine's
/// `run/initrd.cpio` is written (cold boot) or linked to the boot template's (restore) first
/// thing in a start (its inode's change time, kernel-clock coarse: a few ms), and the agent logs "machine started" (ms timestamp) when it records the state.
struct Split {
    /// Request sent → `Vm::start` began: control plane, agent steps, pull check, disk, spec.
    before_boot_ms: f64,
    /// `Vm::start` → the agent recorded `started`: what `vm_start_ms` measures.
    boot_ms: f64,
    /// Recorded → the client has the answer.
    after_boot_ms: f64,
}

fn vm_series(bin: &Path, runs: usize) -> anyhow::Result<VmResults> {
    let guest = aloft_testkit::guest_artifacts()?;
    let accel = aloft_vm::accel::probe(&guest.kernel, &guest.initrd);
    let rootfs = aloft_testkit::busybox_erofs(&aloft_testkit::cache_dir())?;
    let registry = aloft_testkit::Registry::start()?;
    registry.push_busybox()?;
    let guest_dir = guest
        .kernel
        .parent()
        .context("the guest kernel has no directory")?
        .to_path_buf();
    eprintln!(
        "bench api: accelerator {accel:?}; machines: 1 vCPU, {MEMORY_MIB} MiB, busybox erofs base, httpd, no network"
    );
    let guest_dir = guest_dir
        .to_str()
        .with_context(|| format!("{} is not UTF-8", guest_dir.display()))?;
    let registry_host = registry.host();
    let daemon = Daemon::start(
        "api",
        bin,
        &[
            "--driver",
            "vm",
            "--network",
            "none",
            "--registry",
            &registry_host,
            "--guest-dir",
            guest_dir,
        ],
    )?;
    let work = tempfile::Builder::new().prefix("aloft-bench-api-vm-").tempdir()?;
    let result = (|| -> anyhow::Result<VmResults> {
        let mut conn = daemon.conn();
        create_app(&mut conn, "vm")?;
        // Pull the image and build its base once: every timed create finds them cached.
        let t0 = Instant::now();
        let id = create_machine(&mut conn, "vm")?;
        wait_state(&mut conn, "vm", &id, "started")?;
        eprintln!(
            "bench api: first machine (pull + base build + boot) started in {:.0} ms",
            ms(t0)
        );
        destroy(&mut conn, "vm", &id)?;

        let mut r = VmResults {
            api: Vec::new(),
            post: Vec::new(),
            baseline: Vec::new(),
            paired: Vec::new(),
            before_boot: Vec::new(),
            boot: Vec::new(),
            after_boot: Vec::new(),
        };
        let data_dir = daemon.data_dir();
        // Both sides start machines from boot templates, as aloftd's agent does: the
        // baseline's first start makes its template, untimed like the API's first machine.
        let templates = aloft_vm::Templates::new(work.path().join("templates"))?;
        bench_boot_start(&guest, accel, &rootfs, &work.path().join("first"), &templates)
            .context("the baseline's first machine (makes its boot template)")?;
        for i in 0..runs {
            let dir = work.path().join(format!("m{i}"));
            let base = || {
                bench_boot_start(&guest, accel, &rootfs, &dir, &templates)
                    .context("the baseline machine (bench boot's path)")
            };
            let (a, baseline) = if i % 2 == 0 {
                let b = base()?;
                (api_start(&mut conn, &data_dir)?, b)
            } else {
                (api_start(&mut conn, &data_dir)?, base()?)
            };
            let (api, post) = (a.total_ms, a.post_ms);
            let split = a.split.as_ref().map_or_else(
                || "no split".to_owned(),
                |s| {
                    format!(
                        "before boot {:.0}, boot {:.0}, after {:.0}",
                        s.before_boot_ms, s.boot_ms, s.after_boot_ms
                    )
                },
            );
            eprintln!(
                "bench api: run {i}: api {api:.0} ms (POST {post:.0}; {split}), baseline {baseline:.0} ms"
            );
            if let Some(s) = a.split {
                r.before_boot.push(s.before_boot_ms);
                r.boot.push(s.boot_ms);
                r.after_boot.push(s.after_boot_ms);
            }
            r.api.push(api);
            r.post.push(post);
            r.baseline.push(baseline);
            r.paired.push(api - baseline);
        }
        Ok(r)
    })();
    // aloftd leaves machines running when it stops: destroy them first.
    let cleaned = destroy_all(&mut daemon.conn(), "vm");
    if result.is_err() || cleaned.is_err() {
        eprintln!("bench api: VM aloftd's log:\n{}", daemon.log_tail());
    }
    // Stopping it also kills what machines a failed run left (`Daemon::stop`).
    daemon.stop();
    cleaned?;
    result
}

fn bench_boot_start(
    guest: &aloft_testkit::GuestArtifacts,
    accel: aloft_vm::accel::Accel,
    rootfs: &Path,
    dir: &Path,
    templates: &aloft_vm::Templates,
) -> anyhow::Result<f64> {
    crate::bench_boot::machine_start_ms(
        guest,
        accel,
        rootfs,
        RootfsFormat::Erofs.fstype(),
        dir,
        MEMORY_MIB,
        crate::bench_boot::Via::Template(templates),
    )
}

struct ApiStart {
    /// Create → `wait?state=started` returned.
    total_ms: f64,
    /// Create → POST answered.
    post_ms: f64,
    split: Option<Split>,
}

/// One timed create → started, then the machine is destroyed (untimed).
fn api_start(conn: &mut Conn, data_dir: &Path) -> anyhow::Result<ApiStart> {
    let wall0 = SystemTime::now();
    let t0 = Instant::now();
    let id = create_machine(conn, "vm")?;
    let post_ms = ms(t0);
    wait_state(conn, "vm", &id, "started")?;
    let total_ms = ms(t0);
    let wall1 = SystemTime::now();
    let split = split(data_dir, &id, wall0, wall1);
    destroy(conn, "vm", &id)?;
    Ok(ApiStart {
        total_ms,
        post_ms,
        split,
    })
}

/// [`Split`] of the create of `id` sent at `sent` and answered at `answered`; `None` when a mark
/// is missing (aloftd's layout changed).
fn split(data_dir: &Path, id: &str, sent: SystemTime, answered: SystemTime) -> Option<Split> {
    let initrd = data_dir
        .join("machines/machines")
        .join(id)
        .join("run/initrd.cpio");
    let changed = std::fs::metadata(initrd).ok()?;
    let boot_began = SystemTime::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(changed.ctime()).ok()?,
            u32::try_from(changed.ctime_nsec()).ok()?,
        );
    let log = std::fs::read_to_string(data_dir.join("logs").join(id).join("log.jsonl")).ok()?;
    let started_ms = log.lines().find_map(|l| {
        let v: Value = serde_json::from_str(l).ok()?;
        (v["message"] == "machine started").then(|| unix_ms(v["timestamp"].as_str()?))?
    })?;
    let unix = |t: SystemTime| -> Option<f64> {
        Some(t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64() * 1000.0)
    };
    let (sent, boot_began, answered) = (unix(sent)?, unix(boot_began)?, unix(answered)?);
    Some(Split {
        before_boot_ms: boot_began - sent,
        boot_ms: started_ms - boot_began,
        after_boot_ms: answered - started_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
