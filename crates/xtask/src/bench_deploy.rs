//! `cargo xtask bench deploy`: what a deploy costs beyond the machines' own restarts.
//!
//! The real `aloftd` (release profile by default, `--aloftd-profile`) on `--driver vm --network
//! host --machines-netns NS`, NS a network namespace the benchmark creates (and deletes): the
//! machines get taps and addresses there, and the agent runs their health checks from inside it,
//! so "checks passing" means the guest's httpd answered. Images: the busybox image pushed to a
//! local registry as `busybox:latest`, then tagged `busybox:a` and `busybox:b` (same manifest).
//! Workload `httpd -f -p 8080`, one service on internal port 8080, one tcp check on 8080
//! (interval 1 s, timeout 1 s, grace 1 s: releases also require the app to listen on the
//! internal port within the grace period, and with 0 s they fail at once); 1 vCPU, 256 MiB.
//!
//! * `machine_update_ms`: `POST …/machines/{id}` with the other image → the machine shows the new
//!   `instance_id` `started` with every check passing (`GET` every 20 ms).
//! * `deploy_rolling_3_ms`: an app of 3 machines; `POST …/releases` with the other image,
//!   `rolling`, `max_unavailable` 1 → `GET …/releases/{v}` (every 20 ms) says `complete`.
//! * `deploy_immediate_3_ms`: the same with `immediate`.
//!
//! Every image is pulled and its base built before the clock runs (one untimed update and two
//! untimed releases, one of each image). Each run does the three measurements in turn, each
//! switching to the image its machines do not run.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::aloftd::{
    Conn, Daemon, build_aloftd, create_app, destroy_all, loadavg, ms, read_response, round1,
};
use crate::stats::{median, min};

/// The two tags every change alternates between.
const IMAGES: [&str; 2] = ["busybox:a", "busybox:b"];
/// Machines of the deployed app.
const APP_MACHINES: u32 = 3;
/// Time between status polls.
const POLL: Duration = Duration::from_millis(20);
/// Longest any one change may take before the benchmark gives up.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(180);

/// What `cargo xtask bench deploy` was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct DeployBench {
    pub(crate) runs: usize,
    /// Cargo profile aloftd is built with (`release`, `dev`).
    pub(crate) profile: String,
}

/// The config of every machine: `image`, httpd on 8080, a service and a tcp check on it.
fn machine_config(image: &str) -> Value {
    json!({
        "image": image,
        "guest": {"cpus": 1, "memory_mb": 256, "cpu_kind": "shared"},
        "init": {"cmd": ["/bin/httpd", "-f", "-p", "8080", "-h", "/"]},
        "services": [{
            "protocol": "tcp",
            "internal_port": 8080,
            "ports": [{"port": 80, "handlers": ["http"]}],
        }],
        "checks": {"tcp8080": {
            "type": "tcp", "port": 8080, "interval": "1s", "timeout": "1s", "grace_period": "1s",
        }},
        "stop_config": {"signal": "SIGTERM", "timeout": "5s"},
    })
}

fn other(image: &str) -> &'static str {
    if image == IMAGES[0] { IMAGES[1] } else { IMAGES[0] }
}

pub(crate) fn run(args: &DeployBench) -> anyhow::Result<()> {
    let runs = args.runs.max(1);
    let load_before = loadavg();
    let bin = build_aloftd(&args.profile)?;
    eprintln!(
        "bench deploy: {} ({} profile), {runs} runs, load {load_before}",
        bin.display(),
        args.profile
    );
    let guest = aloft_testkit::guest_artifacts()?;
    let guest_dir = guest
        .kernel
        .parent()
        .context("the guest kernel has no directory")?
        .to_str()
        .context("the guest directory is not UTF-8")?
        .to_owned();
    let registry = aloft_testkit::Registry::start()?;
    registry.push_busybox()?;
    for tag in IMAGES {
        let (_, tag) = tag.split_once(':').context("an image without a tag")?;
        tag_manifest(registry.addr(), "busybox", "latest", tag)?;
    }
    let ns = aloft_testkit::NetNs::new()?;
    let ns_path = ns.path();
    let ns_path = ns_path.to_str().context("the namespace path is not UTF-8")?;
    let registry_host = registry.host();
    let daemon = Daemon::start(
        "deploy",
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
        ],
    )?;
    let result = measure(&daemon, runs);
    // aloftd leaves machines running when it stops: destroy them first.
    let mut conn = daemon.conn();
    let cleaned = destroy_all(&mut conn, "upd").and(destroy_all(&mut conn, "dep"));
    if result.is_err() || cleaned.is_err() {
        eprintln!("bench deploy: aloftd's log:\n{}", daemon.log_tail());
    }
    // Stopping it also kills what machines a failed run left (`Daemon::stop`).
    daemon.stop();
    drop(ns);
    cleaned?;
    let r = result?;
    report(&r, &args.profile, &load_before, &loadavg());
    Ok(())
}

/// Copies `repo:from`'s manifest to `repo:to` in the registry at `addr` (the blobs are shared).
fn tag_manifest(addr: SocketAddr, repo: &str, from: &str, to: &str) -> anyhow::Result<()> {
    let accept = "application/vnd.oci.image.manifest.v1+json, \
                  application/vnd.docker.distribution.manifest.v2+json, \
                  application/vnd.oci.image.index.v1+json";
    let stream = TcpStream::connect(addr).with_context(|| format!("connect to the registry {addr}"))?;
    let mut r = BufReader::new(stream);
    write!(
        r.get_mut(),
        "GET /v2/{repo}/manifests/{from} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )?;
    let (status, manifest, _) = read_response(&mut r)?;
    if status != 200 {
        bail!("GET manifest {repo}:{from}: HTTP {status}");
    }
    let parsed: Value = serde_json::from_slice(&manifest)?;
    let media_type = parsed["mediaType"]
        .as_str()
        .unwrap_or("application/vnd.oci.image.manifest.v1+json")
        .to_owned();
    write!(
        r.get_mut(),
        "PUT /v2/{repo}/manifests/{to} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {media_type}\r\n\
         Content-Length: {}\r\n\r\n",
        manifest.len()
    )?;
    r.get_mut().write_all(&manifest)?;
    let (status, body, _) = read_response(&mut r)?;
    if status != 201 {
        bail!(
            "PUT manifest {repo}:{to}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(())
}

/// One timed machine update.
struct Update {
    total_ms: f64,
    /// Update sent → the new version seen `started`.
    started_ms: f64,
}

/// One timed release and where its time went, from its events and its machines' events.
struct Deploy {
    total_ms: f64,
    /// Release sent → its first event.
    first_event_ms: f64,
    /// Per machine: "updating machine" event → the machine's new version `started` (agent
    /// event): stop + boot.
    restart_ms: Vec<f64>,
    /// Per machine, of `restart_ms`: "updating machine" → the agent's `replaced` event (old
    /// version stopped, new one's disk and spec written; its boot begins).
    stop_ms: Vec<f64>,
    /// First "updating machine" event → the last one (immediate: how close together the
    /// updates went out).
    spread_ms: f64,
    /// Per machine: `started` → "started and healthy" event: checks + the job's check polling.
    started_to_healthy_ms: Vec<f64>,
    /// Rolling: "healthy" of one machine → "updating" of the next (lease, record, update call).
    between_ms: Vec<f64>,
    /// Last machine healthy → the release's last event.
    finish_ms: f64,
    /// Last event → the client saw `complete`.
    seen_ms: f64,
}

struct Results {
    update: Vec<Update>,
    rolling: Vec<Deploy>,
    immediate: Vec<Deploy>,
}

fn measure(daemon: &Daemon, runs: usize) -> anyhow::Result<Results> {
    let mut conn = daemon.conn();
    create_app(&mut conn, "upd")?;
    create_app(&mut conn, "dep")?;

    // Warm-up, untimed: each image pulled and its base built; the apps in place.
    let t0 = Instant::now();
    let m = conn.expect(
        "POST",
        "/v1/apps/upd/machines",
        Some(&json!({"config": machine_config(IMAGES[0])})),
        200,
    )?;
    let id = m["id"]
        .as_str()
        .context("create answered without an id")?
        .to_owned();
    let instance = m["instance_id"].as_str().unwrap_or_default().to_owned();
    wait_healthy(&mut conn, "upd", &id, &instance, Instant::now())?;
    eprintln!(
        "bench deploy: first machine (pull + base build + boot + check) in {:.0} ms",
        ms(t0)
    );
    let mut upd_image = IMAGES[0];
    let warm = update(&mut conn, &id, other(upd_image))?;
    upd_image = other(upd_image);
    eprintln!(
        "bench deploy: warm-up update to {upd_image}: {:.0} ms",
        warm.total_ms
    );
    let mut dep_image = IMAGES[0];
    let first = deploy(&mut conn, dep_image, "rolling", Some(APP_MACHINES))?;
    eprintln!(
        "bench deploy: first release ({APP_MACHINES} machines created): {:.0} ms",
        first.total_ms
    );
    dep_image = other(dep_image);
    let warm = deploy(&mut conn, dep_image, "rolling", None)?;
    eprintln!(
        "bench deploy: warm-up rolling release to {dep_image}: {:.0} ms",
        warm.total_ms
    );

    let mut r = Results {
        update: Vec::new(),
        rolling: Vec::new(),
        immediate: Vec::new(),
    };
    for i in 0..runs {
        upd_image = other(upd_image);
        let u = update(&mut conn, &id, upd_image)?;
        dep_image = other(dep_image);
        let rolling = deploy(&mut conn, dep_image, "rolling", None)?;
        dep_image = other(dep_image);
        let immediate = deploy(&mut conn, dep_image, "immediate", None)?;
        eprintln!(
            "bench deploy: run {i}: update {:.0} ms (started at {:.0}), rolling {:.0} ms, immediate {:.0} ms; load {}",
            u.total_ms,
            u.started_ms,
            rolling.total_ms,
            immediate.total_ms,
            loadavg()
        );
        for (name, d) in [("rolling", &rolling), ("immediate", &immediate)] {
            eprintln!(
                "bench deploy:   {name}: first event {:.0}, updates sent within {:.0}, stops {:?}, restarts {:?}, started→healthy {:?}, between {:?}, finish {:.0}, seen {:.0}",
                d.first_event_ms,
                d.spread_ms,
                rounded(&d.stop_ms),
                rounded(&d.restart_ms),
                rounded(&d.started_to_healthy_ms),
                rounded(&d.between_ms),
                d.finish_ms,
                d.seen_ms
            );
        }
        r.update.push(u);
        r.rolling.push(rolling);
        r.immediate.push(immediate);
    }
    Ok(r)
}

fn rounded(v: &[f64]) -> Vec<i64> {
    #[expect(clippy::cast_possible_truncation, reason = "milliseconds for a log line")]
    v.iter().map(|x| x.round() as i64).collect()
}

/// Updates machine `id` of app `upd` to `image`; waits until the new version is started and
/// passing its checks.
fn update(conn: &mut Conn, id: &str, image: &str) -> anyhow::Result<Update> {
    let t0 = Instant::now();
    let m = conn.expect(
        "POST",
        &format!("/v1/apps/upd/machines/{id}"),
        Some(&json!({"config": machine_config(image)})),
        200,
    )?;
    let instance = m["instance_id"]
        .as_str()
        .context("update answered without an instance_id")?
        .to_owned();
    let started_ms = wait_healthy(conn, "upd", id, &instance, t0)?;
    Ok(Update {
        total_ms: ms(t0),
        started_ms,
    })
}

/// Polls the machine until version `instance` is started with every check passing; returns
/// when (ms after `t0`) it was first seen started.
fn wait_healthy(conn: &mut Conn, app: &str, id: &str, instance: &str, t0: Instant) -> anyhow::Result<f64> {
    let mut started = None;
    loop {
        let m = conn.expect("GET", &format!("/v1/apps/{app}/machines/{id}"), None, 200)?;
        if m["instance_id"] == instance && m["state"] == "started" {
            let started = *started.get_or_insert_with(|| ms(t0));
            let checks = m["checks"].as_array().map(Vec::as_slice).unwrap_or_default();
            if !checks.is_empty() && checks.iter().all(|c| c["status"] == "passing") {
                return Ok(started);
            }
        }
        if t0.elapsed() > CHANGE_TIMEOUT {
            bail!("machine {id} of {app}: version {instance} not started and passing in time: {m}");
        }
        std::thread::sleep(POLL);
    }
}

/// Releases `image` onto app `dep` with `strategy` (and `count` machines when given); waits
/// until it is complete.
fn deploy(conn: &mut Conn, image: &str, strategy: &str, count: Option<u32>) -> anyhow::Result<Deploy> {
    let mut group = json!({"group": "app", "config": machine_config(image)});
    if let Some(n) = count {
        group["count"] = json!(n);
    }
    let req = json!({
        "image": image,
        "groups": [group],
        "strategy": strategy,
        "max_unavailable": 1,
        "wait_timeout": "2m",
    });
    let sent = unix_now_ms();
    let t0 = Instant::now();
    let rel = conn.expect("POST", "/v1/apps/dep/releases", Some(&req), 201)?;
    let version = rel["version"].as_u64().context("release without a version")?;
    let path = format!("/v1/apps/dep/releases/{version}");
    let status = loop {
        let rel = conn.expect("GET", &path, None, 200)?;
        let status = rel["status"].as_str().unwrap_or_default().to_owned();
        if matches!(status.as_str(), "complete" | "rolled_back" | "failed") {
            if status != "complete" {
                bail!("release v{version} ended {status}: {rel}");
            }
            break status;
        }
        if t0.elapsed() > CHANGE_TIMEOUT {
            bail!("release v{version} not final in time: {rel}");
        }
        std::thread::sleep(POLL);
    };
    let total_ms = ms(t0);
    let seen = unix_now_ms();
    debug_assert_eq!(status, "complete");
    breakdown(conn, version, sent, seen, total_ms)
}

fn unix_now_ms() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
}

/// Where release `version`'s time went (see [`Deploy`]); untimed calls after it ended.
fn breakdown(conn: &mut Conn, version: u64, sent: f64, seen: f64, total_ms: f64) -> anyhow::Result<Deploy> {
    let (status, body) = conn.request("GET", &format!("/v1/apps/dep/releases/{version}/events"), None)?;
    if status != 200 {
        bail!("release v{version}'s events: HTTP {status}");
    }
    let events: Vec<Value> = String::from_utf8_lossy(&body)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ts = |e: &Value| e["timestamp"].as_str().and_then(crate::aloftd::unix_ms);
    let first = events.first().and_then(ts).unwrap_or(f64::NAN);
    let last = events.last().and_then(ts).unwrap_or(f64::NAN);
    let at = |machine: &str, prefix: &str| {
        events
            .iter()
            .find(|e| e["machine"] == machine && e["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
            .and_then(ts)
    };
    // Machines in the order the job changed them.
    let mut machines: Vec<String> = Vec::new();
    for e in &events {
        if let Some(m) = e["machine"].as_str()
            && !machines.iter().any(|x| x == m)
        {
            machines.push(m.to_owned());
        }
    }
    let mut d = Deploy {
        total_ms,
        first_event_ms: first - sent,
        restart_ms: Vec::new(),
        stop_ms: Vec::new(),
        spread_ms: f64::NAN,
        started_to_healthy_ms: Vec::new(),
        between_ms: Vec::new(),
        finish_ms: f64::NAN,
        seen_ms: seen - last,
    };
    let updates: Vec<f64> = machines
        .iter()
        .filter_map(|m| at(m, "updating machine"))
        .collect();
    if let (Some(a), Some(b)) = (
        updates.iter().copied().reduce(f64::min),
        updates.iter().copied().reduce(f64::max),
    ) {
        d.spread_ms = b - a;
    }
    let mut prev_healthy: Option<f64> = None;
    let mut last_healthy = f64::NAN;
    for m in &machines {
        // Machines the release created (the first release) were started when their event was
        // written: only updates have a restart to split.
        let updating = at(m, "updating machine");
        let healthy = at(m, &format!("machine {m} is started and healthy"));
        let (Some(u), Some(h)) = (updating, healthy) else {
            continue;
        };
        // The agent's record of the new version starting (the newest `started` event).
        let (stopped, started) = machine_marks_after(conn, m, u)?;
        if let Some(s) = stopped {
            d.stop_ms.push(s - u);
        }
        if let Some(s) = started {
            d.restart_ms.push(s - u);
            d.started_to_healthy_ms.push(h - s);
        }
        if let Some(p) = prev_healthy
            && u >= p
        {
            d.between_ms.push(u - p);
        }
        prev_healthy = Some(h);
        last_healthy = if last_healthy.is_nan() {
            h
        } else {
            last_healthy.max(h)
        };
    }
    d.finish_ms = last - last_healthy;
    Ok(d)
}

/// The times (Unix ms) of machine `id`'s first `replaced` (the update's version switch, after
/// the old version stopped) and last `started` events at or after `after`.
fn machine_marks_after(conn: &mut Conn, id: &str, after: f64) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let events = conn.expect("GET", &format!("/v1/apps/dep/machines/{id}/events"), None, 200)?;
    let list = events.as_array().map(Vec::as_slice).unwrap_or_default();
    let times = |status: &str| -> Vec<f64> {
        #[expect(clippy::cast_precision_loss, reason = "Unix milliseconds fit in f64 exactly")]
        list.iter()
            .filter(|e| e["status"] == status)
            .filter_map(|e| e["timestamp"].as_i64().map(|t| t as f64))
            .filter(|t| *t >= after - 5.0)
            .collect()
    };
    Ok((
        times("replaced").into_iter().reduce(f64::min),
        times("started").into_iter().reduce(f64::max),
    ))
}

fn med(v: impl IntoIterator<Item = f64>) -> f64 {
    median(&v.into_iter().collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

fn lo(v: impl IntoIterator<Item = f64>) -> f64 {
    min(&v.into_iter().collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

fn report(r: &Results, profile: &str, load_before: &str, load_after: &str) {
    let update = med(r.update.iter().map(|u| u.total_ms));
    let rolling = med(r.rolling.iter().map(|d| d.total_ms));
    let immediate = med(r.immediate.iter().map(|d| d.total_ms));
    let rolling_budget = 3.0 * update + 500.0;
    let immediate_budget = 1.5 * update + 300.0;
    let verdict = |v: f64, budget: f64| if v <= budget { "met" } else { "MISSED" };
    let rows = [
        (
            "machine_update_ms",
            update,
            lo(r.update.iter().map(|u| u.total_ms)),
            "POST update (other image) → new version started, tcp check passing".to_owned(),
        ),
        (
            "deploy_rolling_3_ms",
            rolling,
            lo(r.rolling.iter().map(|d| d.total_ms)),
            format!(
                "release onto 3 machines, rolling, 1 at a time → complete ({} the budget)",
                verdict(rolling, rolling_budget)
            ),
        ),
        (
            "deploy_immediate_3_ms",
            immediate,
            lo(r.immediate.iter().map(|d| d.total_ms)),
            format!(
                "the same, immediate ({} the budget)",
                verdict(immediate, immediate_budget)
            ),
        ),
        (
            "rolling_budget_ms",
            rolling_budget,
            f64::NAN,
            "3 × machine_update + 500".to_owned(),
        ),
        (
            "immediate_budget_ms",
            immediate_budget,
            f64::NAN,
            "1.5 × machine_update + 300".to_owned(),
        ),
    ];
    println!("{:<24} {:>10} {:>10}  what", "metric", "median", "min");
    let mut metrics = serde_json::Map::new();
    for (name, m, l, what) in rows {
        println!("{name:<24} {m:>10.1} {l:>10.1}  {what}");
        metrics.insert(name.to_owned(), json!({"value": round1(m), "unit": "ms"}));
    }
    println!("details (medians over runs; per-machine values pooled):");
    let all = |ds: &[Deploy], f: fn(&Deploy) -> &Vec<f64>| -> Vec<f64> {
        ds.iter().flat_map(|d| f(d).iter().copied()).collect()
    };
    let detail = [
        (
            "  update_to_started_ms",
            med(r.update.iter().map(|u| u.started_ms)),
            "of machine_update: the new version seen started",
        ),
        (
            "  update_check_ms",
            med(r.update.iter().map(|u| u.total_ms - u.started_ms)),
            "of machine_update: started → check seen passing",
        ),
    ];
    for (name, v, what) in detail {
        println!("{name:<24} {v:>10.1}             {what}");
    }
    for (strategy, ds) in [("rolling", &r.rolling), ("immediate", &r.immediate)] {
        for (name, v, what) in [
            (
                "first_event_ms",
                med(ds.iter().map(|d| d.first_event_ms)),
                "release sent → its job's first event",
            ),
            (
                "spread_ms",
                med(ds.iter().map(|d| d.spread_ms)),
                "first 'updating' event → last one",
            ),
            (
                "stop_ms",
                med(all(ds, |d| &d.stop_ms)),
                "per machine: 'updating' event → agent's replaced event (old one down, disk ready)",
            ),
            (
                "restart_ms",
                med(all(ds, |d| &d.restart_ms)),
                "per machine: 'updating' event → agent's started event (stop + boot)",
            ),
            (
                "started_to_healthy_ms",
                med(all(ds, |d| &d.started_to_healthy_ms)),
                "per machine: started → job's 'healthy' event (check + job's poll)",
            ),
            (
                "between_ms",
                med(all(ds, |d| &d.between_ms)),
                "per machine: 'healthy' → next 'updating' (lease, record, update call)",
            ),
            (
                "finish_ms",
                med(ds.iter().map(|d| d.finish_ms)),
                "last machine healthy → release complete",
            ),
            (
                "seen_ms",
                med(ds.iter().map(|d| d.seen_ms)),
                "complete → client saw it (20 ms poll)",
            ),
        ] {
            println!("  {strategy}_{name:<21} {v:>10.1}             {what}");
        }
    }
    println!("aloftd {profile} profile; load {load_before} before, {load_after} after");
    println!("{}", json!({"bench": "deploy", "metrics": metrics}));
}
