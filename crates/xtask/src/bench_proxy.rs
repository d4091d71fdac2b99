//! `cargo xtask bench proxy`: what the edge proxy costs a request, against nginx doing the same,
//! and how fast it wakes a suspended machine.
//!
//! * Throughput and latency: `wrk` (Debian's) on loopback with keep-alive, `-t2 -c64 -d10s
//!   --latency -H 'Host: bench.localhost'` by default, against the same small backend three
//!   ways: directly, through nginx as a reverse proxy, and through aloft's edge. The backend is
//!   an nginx process with 1 worker answering `200 ok\n`; the reverse proxy is nginx with
//!   `worker_processes auto`, upstream keep-alive (`keepalive 64`, HTTP/1.1, `Connection ""`),
//!   forwarding the headers aloft's edge adds and no others ([`proxy_conf`]: `Host`,
//!   `X-Forwarded-For/Proto/Port/SSL`, `Fly-Client-IP`, `Fly-Forwarded-Port`, `Fly-Region`, `Via`
//!   and `Fly-Request-Id` on the request, `Via` and `Fly-Request-Id` on the answer; Debian's own
//!   `/etc/nginx/proxy_params` sets four of them), so that both proxies do the same work and the
//!   backend parses the same request from either. The same nginx without those headers
//!   (`nginx-bare`: what a bare `proxy_pass` costs) runs too, loaded only, as a detail
//!   (`nginx_bare_rps`); it was the baseline until 2026-12-05. aloft is
//!   `crates/proxy/examples/edge_static.rs` (release build, the edge's worker threads as aloftd
//!   runs them: one per CPU, each with its own `SO_REUSEPORT` listener; one static route). Access
//!   logs off everywhere. Each target gets a 2 s warm-up, then `--rounds` rounds (default 3) of
//!   direct, nginx, nginx-bare, aloft in turn; medians are reported, so drift on a shared machine
//!   hits all alike. Each round then runs direct, nginx and aloft again with one connection
//!   (`-t1 -c1`, at most 5 s): `added_p50_us` comes from those, what the proxy adds to a request
//!   when nothing queues. At `-c64` every target saturates the 2 cores, and the median there is
//!   queueing (connections ÷ throughput), not what a request costs. The nginx processes run with
//!   their own config, prefix and pid file in a temporary directory and only they are stopped.
//! * `wake_ms`: the real `aloftd` (release) on `--driver vm --network host --machines-netns NS`
//!   with its edge on free loopback ports (`--edge-http`, `--edge-https`); an app with one busybox
//!   httpd machine on port 80, `autostart`, `autostop: suspend`. Each run suspends it through the
//!   API, waits until it is `suspended` (and 3 s more), and times a `GET /` through the edge
//!   (`Host: wake.localhost`, connection already open) to the first response byte.
//! * `resume_ms`, alternating with it in the same run: the boot benchmark's resume
//!   (`bench_boot::machine_resume`: snapshot restored → the guest server's first HTTP answer
//!   byte, on the connection that found its port accepting: what a wake waits for too), its
//!   machine suspended as long before the resume as the woken one is before its wake ([`SETTLE`]).
//!   Right before each timed wake and each timed resume the bench warms the host's free memory
//!   ([`crate::hostmem`]): on a host whose own hypervisor takes freed memory back (ours: free
//!   page reporting in 2 MiB blocks) a restore that lands on such blocks costs ~100 ms more, and
//!   whether it does is a coin toss per restore, which decided S18 run by run before the warming
//!   (`wake_beyond_ms` −4 to +74). Both sides are warmed alike, so the comparison is still what
//!   aloftd and its edge add to a restore; bench boot's own `resume_ms` comes right after its
//!   suspend, on memory the suspend just freed (warm as well). Details:
//!   the same resume until the port accepts (`resume_accept_ms`), and per run `wake_ms` minus
//!   `resume_ms` (`wake_beyond_ms`): what aloftd and its edge add to the guest's own time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aloft_image::RootfsFormat;
use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::aloftd::{Conn, Daemon, build_aloftd, create_app, destroy_all, loadavg, ms, round1, wait_state};
use crate::stats::{median, min};

/// The Host every wrk request carries (the edge routes `bench.localhost` to app `bench`).
const BENCH_HOST: &str = "bench.localhost";
/// The app of the wake measurement.
const WAKE_APP: &str = "wake";
/// Warm-up of each target before the rounds.
const WARMUP_SECS: u32 = 2;
/// Longest one-connection run (the latency pass).
const LATENCY_SECS: u32 = 5;
/// After the API says `suspended`, how long before the timed request: the agent publishes the
/// new state to the catalog and the edge follows it; an edge that still believes the machine
/// started dials it and times out (PC05) instead of waking it.
const SETTLE: Duration = Duration::from_secs(3);
/// The edge's proxy error header (`aloft_proxy::ERROR_HEADER`): an answer carrying it came from
/// the edge, not from the machine.
const PROXY_ERROR_HEADER: &str = "fly-proxy-error-code";

/// What `cargo xtask bench proxy` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct ProxyBench {
    /// Seconds of each wrk run.
    pub(crate) duration_s: u32,
    /// wrk's keep-alive connections.
    pub(crate) connections: u32,
    /// Rounds of direct, nginx, aloft.
    pub(crate) rounds: usize,
    /// Wake and resume samples.
    pub(crate) runs: usize,
    /// Only the wrk part (no VM, no aloftd).
    pub(crate) skip_vm: bool,
}

pub(crate) fn run(args: &ProxyBench) -> anyhow::Result<()> {
    for tool in ["wrk", "nginx"] {
        if !on_path(tool) {
            bail!("bench proxy needs `{tool}` (Debian package {tool}); run scripts/setup.sh to install it");
        }
    }
    let load_before = loadavg();
    let edge_bin = build_edge_example()?;
    let work = tempfile::Builder::new().prefix("aloft-bench-proxy-").tempdir()?;
    eprintln!(
        "bench proxy: wrk -t{} -c{} -d{}s, {} rounds, load {load_before}",
        wrk_threads(args.connections),
        args.connections,
        args.duration_s,
        args.rounds.max(1)
    );
    let wrk = wrk_series(args, &edge_bin, work.path())?;
    let vm = if args.skip_vm {
        None
    } else {
        match vm_series(args.runs.max(1)) {
            Ok(v) => Some(v),
            Err(e) => {
                report(args, &wrk, None, &load_before);
                return Err(e.context("bench proxy: the wake part failed (the wrk part's table is above)"));
            }
        }
    };
    let metrics = report(args, &wrk, vm.as_ref(), &load_before);
    println!("{}", json!({ "bench": "proxy", "metrics": metrics }));
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

fn wrk_threads(connections: u32) -> u32 {
    connections.clamp(1, 2)
}

/// Prints the table; returns the JSON metrics.
fn report(
    args: &ProxyBench,
    wrk: &WrkSeries,
    vm: Option<&VmSeries>,
    load_before: &str,
) -> serde_json::Map<String, Value> {
    let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
    let lo = |v: &[f64]| min(v).unwrap_or(f64::NAN);
    let rps = |v: &[WrkResult]| v.iter().map(|r| r.rps).collect::<Vec<_>>();
    let p50 = |v: &[WrkResult]| v.iter().map(|r| r.p50_ms).collect::<Vec<_>>();
    let p99 = |v: &[WrkResult]| v.iter().map(|r| r.p99_ms).collect::<Vec<_>>();
    let cpu = |v: &[WrkResult]| v.iter().filter_map(|r| r.cpu_us).collect::<Vec<_>>();
    // Per round, so the drift of the machine between rounds cancels out.
    let added = |proxy: &[WrkResult], direct: &[WrkResult]| {
        proxy
            .iter()
            .zip(direct)
            .map(|(p, d)| (p.p50_ms - d.p50_ms) * 1000.0)
            .collect::<Vec<_>>()
    };
    let c = args.connections;
    let mut rows: Vec<(&str, Vec<f64>, &str, String)> = vec![
        (
            "direct_rps",
            rps(&wrk.direct),
            "req/s",
            format!("wrk straight to the backend, {c} keep-alive connections"),
        ),
        (
            "nginx_rps",
            rps(&wrk.nginx),
            "req/s",
            "through nginx (reverse proxy, upstream keep-alive, the edge's headers)".into(),
        ),
        (
            "aloft_rps",
            rps(&wrk.aloft),
            "req/s",
            "through aloft's edge (target ≥ nginx_rps)".into(),
        ),
        (
            "nginx_p99_ms",
            p99(&wrk.nginx),
            "ms",
            "through nginx: 99th percentile latency".into(),
        ),
        (
            "aloft_p99_ms",
            p99(&wrk.aloft),
            "ms",
            "through aloft: 99th percentile (target ≤ nginx_p99_ms)".into(),
        ),
        (
            "added_p50_us",
            added(&wrk.aloft_1, &wrk.direct_1),
            "us",
            "aloft's p50 − direct's p50 on one connection, per round (target ≤ 100)".into(),
        ),
    ];
    if let Some(vm) = vm {
        rows.push((
            "wake_ms",
            vm.wake.clone(),
            "ms",
            "suspended machine → first response byte through aloftd's edge".into(),
        ));
        rows.push((
            "resume_ms",
            vm.resume.clone(),
            "ms",
            "bench boot's resume, same run, suspended as long as the woken machine (target: wake_ms ≤ resume_ms + 30)".into(),
        ));
    }
    println!(
        "{:<16} {:>10} {:>10}  {:<5} what",
        "metric", "median", "min", "unit"
    );
    let mut metrics = serde_json::Map::new();
    for (name, samples, unit, what) in rows {
        let m = med(&samples);
        println!("{name:<16} {m:>10.1} {:>10.1}  {unit:<5} {what}", lo(&samples));
        metrics.insert(name.to_owned(), json!({ "value": round1(m), "unit": unit }));
    }
    println!("details:");
    for (name, samples, unit, what) in [
        (
            "  direct_p50_ms",
            p50(&wrk.direct),
            "ms",
            "straight to the backend: median latency",
        ),
        (
            "  direct_p99_ms",
            p99(&wrk.direct),
            "ms",
            "straight to the backend: 99th percentile",
        ),
        (
            "  nginx_p50_ms",
            p50(&wrk.nginx),
            "ms",
            "through nginx: median latency",
        ),
        (
            "  aloft_p50_ms",
            p50(&wrk.aloft),
            "ms",
            "through aloft: median latency",
        ),
        (
            "  nginx_added_us",
            added(&wrk.nginx_1, &wrk.direct_1),
            "us",
            "nginx's p50 − direct's p50 on one connection, per round",
        ),
        (
            "  direct_p50_1_us",
            wrk.direct_1.iter().map(|r| r.p50_ms * 1000.0).collect(),
            "us",
            "one connection straight to the backend: median latency",
        ),
        (
            "  aloft_p50_1_us",
            wrk.aloft_1.iter().map(|r| r.p50_ms * 1000.0).collect(),
            "us",
            "one connection through aloft: median latency",
        ),
        (
            "  aloft_p99_1_us",
            wrk.aloft_1.iter().map(|r| r.p99_ms * 1000.0).collect(),
            "us",
            "one connection through aloft: 99th percentile",
        ),
        (
            "  loaded_added_us",
            added(&wrk.aloft, &wrk.direct),
            "us",
            "aloft's p50 − direct's p50 at the loaded run (queueing: restates the rps gap)",
        ),
        (
            "  nginx_bare_rps",
            rps(&wrk.nginx_bare),
            "req/s",
            "through nginx forwarding no headers of its own (a bare proxy_pass)",
        ),
        (
            "  nginx_bare_p99_ms",
            p99(&wrk.nginx_bare),
            "ms",
            "through the bare nginx: 99th percentile",
        ),
        (
            "  nginx_bare_cpu_us",
            cpu(&wrk.nginx_bare),
            "us",
            "the bare nginx's workers' CPU time per request",
        ),
        (
            "  nginx_cpu_us",
            cpu(&wrk.nginx),
            "us",
            "nginx's workers' CPU time per request at the loaded run",
        ),
        (
            "  aloft_cpu_us",
            cpu(&wrk.aloft),
            "us",
            "the edge's CPU time per request at the loaded run (what S15 compares, less noisy)",
        ),
        (
            "  cpu_ratio",
            wrk.aloft
                .iter()
                .zip(&wrk.nginx)
                .filter_map(|(a, n)| Some(a.cpu_us? / n.cpu_us?))
                .collect(),
            "x",
            "aloft_cpu_us / nginx_cpu_us per round (below 1: the edge spends less per request)",
        ),
    ] {
        println!(
            "{name:<16} {:>10.1} {:>10.1}  {unit:<5} {what}",
            med(&samples),
            lo(&samples)
        );
    }
    if let Some(vm) = vm {
        let beyond: Vec<f64> = vm.wake.iter().zip(&vm.resume).map(|(w, a)| w - a).collect();
        for (name, samples, what) in [
            (
                "  resume_accept_ms",
                &vm.resume_accept,
                "bench boot's resume → the guest's port accepts (its kernel's SYN-ACK, before any workload code)",
            ),
            (
                "  wake_beyond_ms",
                &beyond,
                "wake_ms − resume_ms, per run: what aloftd and its edge add to the guest's own",
            ),
        ] {
            println!(
                "{name:<16} {:>10.1} {:>10.1}  ms    {what}",
                med(samples),
                lo(samples)
            );
        }
    }
    for (name, v) in [
        ("direct", &wrk.direct),
        ("nginx", &wrk.nginx),
        ("nginx-bare", &wrk.nginx_bare),
        ("aloft", &wrk.aloft),
        ("direct-c1", &wrk.direct_1),
        ("nginx-c1", &wrk.nginx_1),
        ("aloft-c1", &wrk.aloft_1),
    ] {
        let per_round: Vec<String> = v
            .iter()
            .map(|r| {
                let cpu = r
                    .cpu_us
                    .map(|c| format!(" cpu {c:.1} us/req"))
                    .unwrap_or_default();
                format!(
                    "{:.0} req/s p50 {:.3} p99 {:.3} ms{cpu}",
                    r.rps, r.p50_ms, r.p99_ms
                )
            })
            .collect();
        println!("  {name:<9} rounds: {}", per_round.join(" | "));
    }
    println!(
        "wrk -t{} -c{c} -d{}s --latency, then -t1 -c1 -d{}s, {} rounds; {} CPUs; load {load_before} before, {} after",
        wrk_threads(c),
        args.duration_s,
        args.duration_s.min(LATENCY_SECS),
        wrk.direct.len(),
        std::thread::available_parallelism().map_or(0, usize::from),
        loadavg()
    );
    metrics
}

// ---------------------------------------------------------------------------------------------
// wrk: direct, nginx, aloft.

/// One wrk run's figures.
#[derive(Debug, Clone, Copy, PartialEq)]
struct WrkResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests answered in the run.
    requests: u64,
    /// The proxy's CPU time (user + system) per request, µs: loaded runs through a proxy.
    cpu_us: Option<f64>,
}

/// Per target, the loaded runs (`--connections`) and the one-connection runs.
struct WrkSeries {
    direct: Vec<WrkResult>,
    nginx: Vec<WrkResult>,
    /// nginx with [`Forwarding::Bare`]: loaded runs only.
    nginx_bare: Vec<WrkResult>,
    aloft: Vec<WrkResult>,
    direct_1: Vec<WrkResult>,
    nginx_1: Vec<WrkResult>,
    aloft_1: Vec<WrkResult>,
}

/// Builds `edge_static` (release); returns the binary.
fn build_edge_example() -> anyhow::Result<PathBuf> {
    let root = aloft_testkit::workspace_root();
    let started = Instant::now();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "aloft-proxy",
            "--example",
            "edge_static",
        ])
        .status()
        .context("run cargo build for the edge_static example")?;
    if !status.success() {
        bail!("building aloft-proxy's edge_static example failed");
    }
    let bin = root.join("target/release/examples/edge_static");
    if !bin.is_file() {
        bail!("cargo built edge_static but {} is not there", bin.display());
    }
    eprintln!(
        "bench proxy: edge_static built in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

fn wrk_series(args: &ProxyBench, edge_bin: &Path, work: &Path) -> anyhow::Result<WrkSeries> {
    let backend_port = free_port()?;
    let nginx_port = free_port()?;
    let bare_port = free_port()?;
    let aloft_port = free_port()?;
    let backend = Nginx::start(work, "backend", &backend_conf(backend_port))?;
    let proxy = Nginx::start(
        work,
        "proxy",
        &proxy_conf(nginx_port, backend_port, Forwarding::AsTheEdge),
    )?;
    let bare = Nginx::start(
        work,
        "proxy-bare",
        &proxy_conf(bare_port, backend_port, Forwarding::Bare),
    )?;
    let edge = Edge::start(edge_bin, aloft_port, backend_port, work)?;
    // Whose CPU time a loaded run through each proxy counts: nginx's workers, the edge.
    let proxy_workers = children_of(proxy.child.id());
    let bare_workers = children_of(bare.child.id());
    let edge_pid = [edge.child.id()];
    for (what, port) in [
        ("backend", backend_port),
        ("nginx", nginx_port),
        ("nginx-bare", bare_port),
        ("aloft", aloft_port),
    ] {
        check_ok(port).with_context(|| format!("GET / through {what} on port {port}"))?;
    }
    check_forwarded_like_the_edge(edge_bin, &work.join("check"))?;
    let targets = [
        ("direct", backend_port),
        ("nginx", nginx_port),
        ("nginx-bare", bare_port),
        ("aloft", aloft_port),
    ];
    let result = (|| -> anyhow::Result<WrkSeries> {
        for (name, port) in targets {
            wrk(port, args.connections, WARMUP_SECS).with_context(|| format!("warming up {name}"))?;
        }
        let mut s = WrkSeries {
            direct: Vec::new(),
            nginx: Vec::new(),
            nginx_bare: Vec::new(),
            aloft: Vec::new(),
            direct_1: Vec::new(),
            nginx_1: Vec::new(),
            aloft_1: Vec::new(),
        };
        for round in 0..args.rounds.max(1) {
            // Loaded (throughput, tail latency), then one connection (what a request costs in
            // the proxy when nothing queues).
            for connections in [args.connections, 1] {
                for (name, port) in targets {
                    if connections == 1 && name == "nginx-bare" {
                        continue;
                    }
                    let secs = if connections == 1 {
                        args.duration_s.min(LATENCY_SECS)
                    } else {
                        args.duration_s
                    };
                    let pids: &[u32] = match name {
                        "nginx" if connections > 1 => &proxy_workers,
                        "nginx-bare" => &bare_workers,
                        "aloft" if connections > 1 => &edge_pid,
                        _ => &[],
                    };
                    let cpu_before = cpu_seconds(pids);
                    let mut r =
                        wrk(port, connections, secs).with_context(|| format!("wrk against {name}"))?;
                    if !pids.is_empty() && r.requests > 0 {
                        r.cpu_us = Some((cpu_seconds(pids) - cpu_before) * 1e6 / r.requests as f64);
                    }
                    let cpu = r
                        .cpu_us
                        .map(|c| format!("  cpu {c:.1} us/req"))
                        .unwrap_or_default();
                    eprintln!(
                        "bench proxy: round {round}: {name:<6} -c{connections:<3} {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms{cpu}  (load {})",
                        r.rps,
                        r.p50_ms,
                        r.p99_ms,
                        loadavg()
                    );
                    let list = match (name, connections == 1) {
                        ("direct", false) => &mut s.direct,
                        ("nginx", false) => &mut s.nginx,
                        ("nginx-bare", _) => &mut s.nginx_bare,
                        (_, false) => &mut s.aloft,
                        ("direct", true) => &mut s.direct_1,
                        ("nginx", true) => &mut s.nginx_1,
                        (_, true) => &mut s.aloft_1,
                    };
                    list.push(r);
                }
            }
        }
        Ok(s)
    })();
    if result.is_err() {
        for (name, log) in [
            ("backend", backend.log_tail()),
            ("nginx", proxy.log_tail()),
            ("nginx-bare", bare.log_tail()),
            ("aloft", edge.log_tail()),
        ] {
            eprintln!("bench proxy: {name}'s log:\n{log}");
        }
    }
    drop(edge);
    proxy.stop();
    bare.stop();
    backend.stop();
    result
}

/// A loopback port nobody listens on right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The small backend: 1 worker, `200 ok\n`, keep-alive.
fn backend_conf(port: u16) -> String {
    nginx_conf(
        "1",
        &format!("server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }}"),
    )
}

/// What the nginx reverse proxy adds to what it forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Forwarding {
    /// The headers aloft's edge adds (what S15 compares with).
    AsTheEdge,
    /// None: a bare `proxy_pass` (a detail).
    Bare,
}

/// What nginx sets on a request it forwards with [`Forwarding::AsTheEdge`]: the edge's request
/// headers (`aloft_proxy`'s `http::hop`), the same values where nginx has them. `Host` as
/// Debian's `/etc/nginx/proxy_params` sets it (the edge forwards the client's); `Via` appended to
/// the client's own, as the edge does (`$bench_via`, a `map` in the `http` block).
const FORWARDED_HEADERS: &[(&str, &str)] = &[
    ("Host", "$host"),
    ("Fly-Client-IP", "$remote_addr"),
    ("Fly-Forwarded-Port", "$server_port"),
    ("Fly-Region", "local"),
    ("X-Forwarded-For", "$proxy_add_x_forwarded_for"),
    ("X-Forwarded-Proto", "$scheme"),
    ("X-Forwarded-Port", "$server_port"),
    ("X-Forwarded-Ssl", "off"),
    ("Via", "$bench_via"),
    ("Fly-Request-Id", "$request_id"),
];

/// nginx as a tuned reverse proxy to the backend: a worker per CPU, upstream keep-alive; with
/// `forwarding`, the edge's headers both ways.
fn proxy_conf(port: u16, backend: u16, forwarding: Forwarding) -> String {
    let (map, headers) = match forwarding {
        Forwarding::Bare => (String::new(), String::new()),
        Forwarding::AsTheEdge => {
            let mut h: String = FORWARDED_HEADERS
                .iter()
                .map(|(name, value)| format!("proxy_set_header {name} \"{value}\"; "))
                .collect();
            h.push_str("add_header Via \"1.1 nginx\"; add_header Fly-Request-Id $request_id; ");
            (
                "map $http_via $bench_via { \"\" \"1.1 nginx\"; default \"$http_via, 1.1 nginx\"; }\n  "
                    .to_owned(),
                h,
            )
        }
    };
    nginx_conf(
        "auto",
        &format!(
            "{map}upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}\n  \
             server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://backend; \
             proxy_http_version 1.1; proxy_set_header Connection \"\"; {headers}}} }}"
        ),
    )
}

/// A whole nginx config with `server` inside `http`; every path is relative to the prefix
/// (`-p`), so nothing outside the benchmark's directory is touched.
fn nginx_conf(workers: &str, server: &str) -> String {
    format!(
        "daemon off;\nmaster_process on;\nworker_processes {workers};\npid nginx.pid;\n\
         error_log error.log warn;\nevents {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 1000000;\n  keepalive_timeout 60s;\n  \
         client_body_temp_path tmp/body;\n  proxy_temp_path tmp/proxy;\n  \
         fastcgi_temp_path tmp/fastcgi;\n  uwsgi_temp_path tmp/uwsgi;\n  scgi_temp_path tmp/scgi;\n  \
         {server}\n}}\n"
    )
}

/// An nginx master (`daemon off`) this benchmark started, with its own prefix directory.
struct Nginx {
    child: Child,
    prefix: PathBuf,
    port: u16,
}

impl Nginx {
    fn start(work: &Path, name: &str, conf: &str) -> anyhow::Result<Self> {
        let prefix = work.join(name);
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let port = conf
            .split("listen 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|p| p.parse().ok())
            .context("the nginx config has no loopback listen")?;
        let log = std::fs::File::create(prefix.join("stderr.log"))?;
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(&prefix)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start nginx")?;
        let mut n = Self { child, prefix, port };
        wait_listening(port, &mut n.child, Duration::from_secs(10))
            .with_context(|| format!("nginx ({name}): {}", n.log_tail()))?;
        Ok(n)
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["stderr.log", "error.log"] {
            let text = std::fs::read_to_string(self.prefix.join(f)).unwrap_or_default();
            let from = text.len().saturating_sub(2048);
            s.push_str(text.get(from..).unwrap_or_default());
        }
        s
    }

    /// Fast shutdown (SIGTERM to the master, which stops its workers); SIGKILL to it and to its
    /// own workers if it has not exited within 10 s.
    fn stop(mut self) {
        let pid = self.child.id();
        let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "bench proxy: nginx on port {} ignored SIGTERM; killing it and its workers",
            self.port
        );
        for worker in children_of(pid) {
            let _ = Command::new("kill").args(["-KILL", &worker.to_string()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The CPU time (user and system, all threads) the processes `pids` used so far, in seconds.
fn cpu_seconds(pids: &[u32]) -> f64 {
    // /proc/PID/stat counts in USER_HZ ticks, 100 a second on Linux (10 ms: a 5 s run at one
    // core's worth is 500 ticks, ±0.2 %).
    let ticks: u64 = pids
        .iter()
        .filter_map(|pid| stat_cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?))
        .sum();
    ticks as f64 / 100.0
}

/// `utime + stime` from a `/proc/PID/stat` line (fields 14 and 15, counted after the command
/// name, which may hold spaces and parentheses).
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Pids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let child = e.file_name().to_str()?.parse::<u32>().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse::<u32>()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Waits until something accepts on `127.0.0.1:port`, failing early when `child` exits.
fn wait_listening(port: u16, child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("exited with {status} before listening on port {port}");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// aloft's edge with the one static route (`edge_static`), killed on drop.
struct Edge {
    child: Child,
    log: PathBuf,
}

impl Edge {
    fn start(bin: &Path, port: u16, backend: u16, work: &Path) -> anyhow::Result<Self> {
        let log = work.join("edge.log");
        let mut child = Command::new(bin)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--backend",
                &backend.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().context("edge_static's stdout")?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let edge = Self { child, log };
        if !line.starts_with("listening ") {
            bail!(
                "edge_static did not print `listening ADDR` but {line:?}: {}",
                edge.log_tail()
            );
        }
        Ok(edge)
    }

    fn log_tail(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `GET /` with the benchmark's Host must answer 200 `ok\n`.
fn check_ok(port: u16) -> anyhow::Result<()> {
    let mut s = BufReader::new(TcpStream::connect(("127.0.0.1", port))?);
    s.get_ref().set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s.get_mut(), "GET / HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n")?;
    let (status, body, _) = crate::aloftd::read_response(&mut s)?;
    if status != 200 || body != b"ok\n" {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// Fails unless nginx with [`Forwarding::AsTheEdge`] and the edge hand a backend the same
/// header names for the same request and answer with the same added ones: S15 compares two
/// proxies doing the same work, and this keeps [`FORWARDED_HEADERS`] honest when the edge's
/// headers change. Each proxy is pointed at a capture backend of its own for one request.
fn check_forwarded_like_the_edge(edge_bin: &Path, work: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(work)?;
    let (nginx_sent, nginx_answered) = forwarded_through(|port, backend| {
        Nginx::start(work, "nginx", &proxy_conf(port, backend, Forwarding::AsTheEdge))
            .map(|n| StopOnDrop(Some(n)))
    })
    .context("a request through nginx to a capture backend")?;
    let (edge_sent, edge_answered) =
        forwarded_through(|port, backend| Edge::start(edge_bin, port, backend, work))
            .context("a request through the edge to a capture backend")?;
    let sorted = |v: &[String]| {
        let mut v: Vec<String> = v.iter().map(|n| n.to_ascii_lowercase()).collect();
        v.sort();
        v.dedup();
        v
    };
    if sorted(&nginx_sent) != sorted(&edge_sent) {
        bail!(
            "nginx forwards {:?} but the edge {:?}: make FORWARDED_HEADERS the edge's headers again",
            sorted(&nginx_sent),
            sorted(&edge_sent)
        );
    }
    // The backend's own answer has neither; both proxies must add them.
    for name in ["via", "fly-request-id"] {
        for (who, answered) in [("nginx", &nginx_answered), ("the edge", &edge_answered)] {
            if !sorted(answered).iter().any(|n| n == name) {
                bail!("{who} answered without {name}: {answered:?}");
            }
        }
    }
    Ok(())
}

/// Starts a proxy with `start(port, backend port)` in front of a capture backend, sends it one
/// request and returns the header names the backend got and those of the proxy's answer.
fn forwarded_through<G>(
    start: impl FnOnce(u16, u16) -> anyhow::Result<G>,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let backend = TcpListener::bind("127.0.0.1:0")?;
    let backend_port = backend.local_addr()?.port();
    let port = free_port()?;
    let proxy = start(port, backend_port)?;
    // Non-blocking with a deadline, so that a proxy that never connects cannot leave it behind.
    backend.set_nonblocking(true)?;
    let captured = std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut conn = loop {
            match backend.accept() {
                Ok((conn, _)) => break conn,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("the proxy never reached the capture backend"));
                }
            }
        };
        conn.set_nonblocking(false)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let names = head_names(&mut conn)?;
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")?;
        Ok(names)
    });
    let mut client = TcpStream::connect(("127.0.0.1", port))?;
    client.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(client, "GET / HTTP/1.1\r\nHost: {BENCH_HOST}\r\n\r\n")?;
    let answered = head_names(&mut client);
    let forwarded = captured
        .join()
        .map_err(|_| anyhow::anyhow!("the capture backend panicked"))??;
    drop(proxy);
    Ok((forwarded, answered?))
}

/// An [`Nginx`] stopped when dropped.
struct StopOnDrop(Option<Nginx>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(n) = self.0.take() {
            n.stop();
        }
    }
}

/// Reads an HTTP message's head from `conn` (up to its blank line, at most 16 KiB) and returns its
/// header names.
fn head_names(conn: &mut TcpStream) -> anyhow::Result<Vec<String>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte)? == 0 {
            bail!("closed inside the head: {}", String::from_utf8_lossy(&head));
        }
        head.push(byte[0]);
        if head.len() > 16 << 10 {
            bail!("a head over 16 KiB");
        }
    }
    Ok(String::from_utf8_lossy(&head)
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_owned()))
        .collect())
}

/// One wrk run against `127.0.0.1:port`.
fn wrk(port: u16, connections: u32, secs: u32) -> anyhow::Result<WrkResult> {
    let out = Command::new("wrk")
        .arg(format!("-t{}", wrk_threads(connections)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency")
        .args(["-H", &format!("Host: {BENCH_HOST}")])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .output()
        .context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk exited with {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if let Some(errors) = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
    {
        eprintln!("bench proxy: wrk against port {port}: {}", errors.trim());
    }
    parse_wrk(&text).with_context(|| format!("wrk's output: {text}"))
}

/// Requests/sec and the 50 % and 99 % lines of wrk's `--latency` output; refuses runs that got
/// answers other than 2xx/3xx (a proxy answering errors fast is not fast).
fn parse_wrk(text: &str) -> anyhow::Result<WrkResult> {
    if let Some(l) = text.lines().find(|l| l.contains("Non-2xx or 3xx responses")) {
        bail!("wrk got error answers: {}", l.trim());
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec line")?
        .trim()
        .parse::<f64>()?;
    let dist = text
        .split_once("Latency Distribution")
        .context("no Latency Distribution (run wrk with --latency)")?
        .1;
    let pct = |p: &str| -> anyhow::Result<f64> {
        let v = dist
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .with_context(|| format!("no {p} line"))?;
        duration_ms(v.trim())
    };
    let requests = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .context("no `N requests in` line")?
        .0
        .parse::<u64>()?;
    Ok(WrkResult {
        rps,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
        requests,
        cpu_us: None,
    })
}

/// wrk's durations (`812.00us`, `8.22ms`, `1.02s`, `1.50m`) in milliseconds.
fn duration_ms(v: &str) -> anyhow::Result<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        bail!("unknown unit in {v:?}");
    };
    Ok(num
        .parse::<f64>()
        .with_context(|| format!("bad duration {v:?}"))?
        * scale)
}

// ---------------------------------------------------------------------------------------------
// A real machine: wake through aloftd's edge, against bench boot's resume.

struct VmSeries {
    wake: Vec<f64>,
    /// Bench boot's resume until the guest's first HTTP answer byte.
    resume: Vec<f64>,
    /// Bench boot's resume until the guest's port accepts.
    resume_accept: Vec<f64>,
}

/// Memory of the woken machine and of bench boot's resumed one, its baseline: the API's smallest
/// for 1 shared CPU (a snapshot's restore time grows with the memory).
const WAKE_MEMORY_MIB: u32 = 256;

/// The woken machine: busybox httpd on port 80 behind the edge's port 80, started on demand,
/// suspended when idle.
fn wake_machine() -> Value {
    json!({
        "config": {
            "image": "busybox:latest",
            "guest": {"cpus": 1, "memory_mb": WAKE_MEMORY_MIB, "cpu_kind": "shared"},
            "init": {"cmd": ["/bin/httpd", "-f", "-p", "80", "-h", "/"]},
            "services": [{
                "protocol": "tcp",
                "internal_port": 80,
                "ports": [{"port": 80, "handlers": ["http"]}],
                "autostart": true,
                "autostop": "suspend",
                "min_machines_running": 0,
            }],
        }
    })
}

fn vm_series(runs: usize) -> anyhow::Result<VmSeries> {
    let bin = build_aloftd("release")?;
    let help = Command::new(&bin)
        .arg("--help")
        .output()
        .context("run aloftd --help")?;
    if !String::from_utf8_lossy(&help.stdout).contains("--edge-http") {
        bail!(
            "{} has no --edge-http flag: aloftd does not run the edge yet, so there is nothing to \
             wake a machine through; run `cargo xtask bench proxy --skip-vm` for the wrk part",
            bin.display()
        );
    }
    let guest = aloft_testkit::guest_artifacts()?;
    let accel = aloft_vm::accel::probe(&guest.kernel, &guest.initrd);
    // Bench boot's default base: the image store's format (ext4, or erofs for either erofs).
    let (rootfs, fstype) = match RootfsFormat::default() {
        RootfsFormat::Ext4 => (
            aloft_testkit::busybox_rootfs(&aloft_testkit::cache_dir())?,
            RootfsFormat::Ext4.fstype(),
        ),
        RootfsFormat::Erofs | RootfsFormat::ErofsLz4 => (
            aloft_testkit::busybox_erofs(&aloft_testkit::cache_dir())?,
            RootfsFormat::Erofs.fstype(),
        ),
    };
    let guest_dir = guest
        .kernel
        .parent()
        .context("the guest kernel has no directory")?
        .to_str()
        .context("the guest directory is not UTF-8")?
        .to_owned();
    let registry = aloft_testkit::Registry::start()?;
    registry.push_busybox()?;
    let ns = aloft_testkit::NetNs::new()?;
    let ns_path = ns.path();
    let ns_path = ns_path.to_str().context("the namespace path is not UTF-8")?;
    let edge_port = free_port()?;
    let edge_addr = SocketAddr::from(([127, 0, 0, 1], edge_port));
    let https_port = free_port()?;
    let registry_host = registry.host();
    eprintln!("bench proxy: accelerator {accel:?}; aloftd's edge on {edge_addr}; {runs} wakes");
    let daemon = Daemon::start(
        "proxy",
        &bin,
        &[
            "--driver",
            "vm",
            "--network",
            "host",
            "--machines-netns",
            ns_path,
            "--registry",
            &registry_host,
            "--guest-dir",
            &guest_dir,
            "--edge-http",
            &edge_addr.to_string(),
            "--edge-https",
            &format!("127.0.0.1:{https_port}"),
            "--edge-metrics",
            "off",
            "--base-domain",
            "localhost",
        ],
    )?;
    let work = tempfile::Builder::new()
        .prefix("aloft-bench-proxy-vm-")
        .tempdir()?;
    let result = (|| -> anyhow::Result<VmSeries> {
        let mut conn = daemon.conn();
        create_app(&mut conn, WAKE_APP)?;
        let t0 = Instant::now();
        let m = conn.expect(
            "POST",
            &format!("/v1/apps/{WAKE_APP}/machines"),
            Some(&wake_machine()),
            200,
        )?;
        let id = m["id"]
            .as_str()
            .context("create answered without an id")?
            .to_owned();
        wait_state(&mut conn, WAKE_APP, &id, "started")?;
        eprintln!(
            "bench proxy: machine {id} (pull + base build + boot) started in {:.0} ms",
            ms(t0)
        );
        // The edge routes to it once the catalog reached it; then one untimed suspend + wake.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match get_through_edge(edge_addr) {
                Ok(_) => break,
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("the edge never reached the machine"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let warm = suspend_and_wake(&mut conn, &id, edge_addr)?;
        eprintln!("bench proxy: warm-up wake {warm:.0} ms");
        let mut s = VmSeries {
            wake: Vec::new(),
            resume: Vec::new(),
            resume_accept: Vec::new(),
        };
        for i in 0..runs {
            let wake = suspend_and_wake(&mut conn, &id, edge_addr).with_context(|| format!("wake {i}"))?;
            // The edge's own account: when the host took the start, when the machine accepted.
            if let Some(line) = daemon.log_tail().lines().rev().find(|l| l.contains("edge: woke")) {
                eprintln!("bench proxy: run {i}: aloftd: {}", line.trim());
            }
            let resume = crate::bench_boot::machine_resume(
                &guest,
                accel,
                &rootfs,
                fstype,
                &work.path().join(format!("m{i}")),
                WAKE_MEMORY_MIB,
                SETTLE,
            )
            .context("bench boot's resume")?;
            eprintln!(
                "bench proxy: run {i}: wake {wake:.0} ms, resume {:.0} ms (its port accepted at {:.0}) (load {})",
                resume.answer_ms,
                resume.accept_ms,
                loadavg()
            );
            s.wake.push(wake);
            s.resume.push(resume.answer_ms);
            s.resume_accept.push(resume.accept_ms);
        }
        Ok(s)
    })();
    // aloftd leaves machines running when it stops: destroy them first.
    let cleaned = destroy_all(&mut daemon.conn(), WAKE_APP);
    if result.is_err() || cleaned.is_err() {
        eprintln!("bench proxy: aloftd's log:\n{}", daemon.log_tail());
    }
    // Stopping it also kills what machines a failed run left (`Daemon::stop`).
    daemon.stop();
    drop(ns);
    cleaned?;
    result
}

/// Suspends machine `id` through the API, waits until it is `suspended` (and [`SETTLE`] for
/// the catalog to reach the edge), then times a request through the edge: ms to its first byte.
fn suspend_and_wake(conn: &mut Conn, id: &str, edge: SocketAddr) -> anyhow::Result<f64> {
    conn.expect(
        "POST",
        &format!("/v1/apps/{WAKE_APP}/machines/{id}/suspend"),
        None,
        200,
    )?;
    wait_state(conn, WAKE_APP, id, "suspended")?;
    std::thread::sleep(SETTLE);
    let warmed = crate::hostmem::warm(crate::hostmem::WARM_MIB).context("warm the host's free memory")?;
    eprintln!(
        "bench proxy: warmed {} MiB of free memory in {:.0} ms",
        crate::hostmem::WARM_MIB,
        warmed.as_secs_f64() * 1000.0
    );
    let woken = get_through_edge(edge);
    let state = conn
        .expect("GET", &format!("/v1/apps/{WAKE_APP}/machines/{id}"), None, 200)
        .map(|m| m["state"].clone());
    match woken {
        Ok(first_byte) => {
            wait_state(conn, WAKE_APP, id, "started")?;
            Ok(first_byte)
        }
        // What the failure leaves behind tells a wake that never happened from one whose
        // machine is unreachable: its state now, and whether a second request gets through.
        Err(e) => {
            std::thread::sleep(SETTLE);
            let again = get_through_edge(edge).map(|ms| format!("answered in {ms:.0} ms"));
            Err(e.context(format!(
                "the wake failed; the machine's state right after: {state:?}; a second request \
                 3 s later: {again:?}"
            )))
        }
    }
}

/// `GET /` through the edge on an open connection: ms from sending it to the answer's first
/// byte. The answer must come from the machine (no proxy error header).
fn get_through_edge(edge: SocketAddr) -> anyhow::Result<f64> {
    let mut s = TcpStream::connect(edge).with_context(|| format!("connect to the edge on {edge}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let req = format!("GET / HTTP/1.1\r\nHost: {WAKE_APP}.localhost\r\nConnection: close\r\n\r\n");
    let t0 = Instant::now();
    s.write_all(req.as_bytes())?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)
        .context("the edge closed without answering")?;
    let first_byte_ms = ms(t0);
    let mut answer = first.to_vec();
    s.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer);
    let head = text.split("\r\n\r\n").next().unwrap_or_default();
    if !head.starts_with("HTTP/1.1 ") {
        bail!("the edge answered {head:?}");
    }
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with(PROXY_ERROR_HEADER))
    {
        bail!("the edge answered with its own error instead of the machine's: {text}");
    }
    Ok(first_byte_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK_OUT: &str = "Running 10s test @ http://127.0.0.1:18081/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.73ms    3.18ms  26.34ms   70.31%
    Req/Sec     3.67k   823.59     5.41k    67.00%
  Latency Distribution
     50%  812.00us
     75%   10.73ms
     90%   12.88ms
     99%    1.02s
  36640 requests in 5.03s, 6.25MB read
Requests/sec:   7290.03
Transfer/sec:      1.24MB
";

    #[test]
    fn parses_wrk_output() {
        let r = parse_wrk(WRK_OUT).unwrap();
        assert_eq!(r.rps, 7290.03);
        assert!((r.p50_ms - 0.812).abs() < 1e-9, "{}", r.p50_ms);
        assert_eq!(r.p99_ms, 1020.0);
        assert_eq!(r.requests, 36640);
    }

    #[test]
    fn cpu_ticks_are_read_past_a_name_with_spaces_and_parens() {
        let stat = "4242 (nginx: worker (x)) S 4241 4241 4241 0 -1 4194624 310 0 0 0 1234 567 0 0 20 0 1 0";
        assert_eq!(stat_cpu_ticks(stat), Some(1234 + 567));
        assert_eq!(stat_cpu_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn refuses_error_answers_and_missing_latency() {
        let errors = WRK_OUT.replace("Requests/sec", "  Non-2xx or 3xx responses: 36640\nRequests/sec");
        assert!(parse_wrk(&errors).is_err());
        let no_latency = WRK_OUT.replace("Latency Distribution", "");
        assert!(parse_wrk(&no_latency).is_err());
    }

    #[test]
    fn durations_in_ms() {
        assert_eq!(duration_ms("8.22ms").unwrap(), 8.22);
        assert_eq!(duration_ms("1.50m").unwrap(), 90_000.0);
        assert!(duration_ms("3.0h").is_err());
    }

    #[test]
    fn nginx_configs_stay_in_their_prefix() {
        let c = proxy_conf(18082, 18080, Forwarding::AsTheEdge);
        assert!(c.contains("listen 127.0.0.1:18082;"), "{c}");
        assert!(c.contains("server 127.0.0.1:18080; keepalive 64;"), "{c}");
        assert!(c.contains("daemon off;") && c.contains("pid nginx.pid;"), "{c}");
        assert!(c.contains("access_log off;"), "{c}");
        let b = backend_conf(18080);
        assert!(
            b.contains("worker_processes 1;") && b.contains("return 200 \"ok\\n\";"),
            "{b}"
        );
        // No absolute path: everything lands under the prefix the benchmark passes with -p.
        for line in c.lines().chain(b.lines()) {
            let line = line.trim();
            if ["pid ", "error_log ", "client_body_temp_path ", "proxy_temp_path "]
                .iter()
                .any(|d| line.starts_with(d))
            {
                let value = line.split_whitespace().nth(1).unwrap();
                assert!(!value.starts_with('/'), "absolute path in {line:?}");
            }
        }
        assert_eq!(c.matches("_temp_path tmp/").count(), 5, "{c}");
    }

    #[test]
    fn the_forwarding_nginx_sets_each_edge_header_and_the_bare_one_none() {
        let c = proxy_conf(18082, 18080, Forwarding::AsTheEdge);
        for (name, value) in FORWARDED_HEADERS {
            assert!(
                c.contains(&format!("proxy_set_header {name} \"{value}\";")),
                "{name}: {c}"
            );
        }
        // `Via` appends to the client's, through the map the http block defines.
        assert!(c.contains("map $http_via $bench_via {"), "{c}");
        assert!(
            c.contains("add_header Via \"1.1 nginx\";")
                && c.contains("add_header Fly-Request-Id $request_id;"),
            "{c}"
        );
        let bare = proxy_conf(18082, 18080, Forwarding::Bare);
        assert_eq!(
            bare.matches("proxy_set_header").count(),
            1,
            "only Connection: {bare}"
        );
        assert!(!bare.contains("add_header") && !bare.contains("map "), "{bare}");
    }
}
