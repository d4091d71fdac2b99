//! `aloftd`, the aloft daemon: one binary whose roles (the control API, this host's agent and its
//! edge proxy) run together on a host.
//!
//! With no flags it is the embedded single-host setup: state in SQLite under `/var/lib/aloft`
//! (`--etcd URL,…` keeps the control store in etcd instead: `aloft-etcd`),
//! the Fly-compatible API on `127.0.0.1:4280`, region `local`. The first start mints an admin
//! token for organization `personal`, prints it once and writes the `aloft` CLI's config
//! (`$XDG_CONFIG_HOME/aloft/config.toml`, else `~/.config/aloft/config.toml`, mode 0600) so the
//! CLI works at once. SIGTERM or SIGINT stops it gracefully: no new connections, in-flight
//! requests finish (up to `--shutdown-timeout`), then the store is closed.
//!
//! The agent role opens this host's machines (`<data dir>/agent.db`, recovering operations a
//! previous aloftd left in flight and reattaching running VMs) on the driver `--driver` picks:
//! QEMU microVMs, or `fake` (in memory, for tests and benchmarks of the API). Machines' QEMU
//! processes are jailed (`--jail-user`, default `aloft-vm`: an unprivileged user, seccomp, a
//! cgroup per machine with its memory and CPU limits), which needs root; `--no-jail` is for
//! development only. SIGTERM leaves machines running; the next start takes them over again.
//!
//! Sealing keys (docs/keys.md): app secrets (`<data dir>/secrets.key`), the agent's copy of
//! machines' secrets (`<data dir>/agent-secrets.key`) and custom domains' private keys
//! (`--edge-cert-key`), each rotated with a previous-key flag (`keys.rs`); `aloftd key-id FILE…`
//! prints key files' ids, which errors about a missing key name.
//!
//! This crate only wires roles together: the API lives in `aloft-control`, state in
//! `aloft-store`, machines in `aloft-agent`. Anything with logic of its own belongs in one of those crates, not here.
//! Threading: a multi-threaded tokio runtime; blocking store calls use its blocking pool.

mod acme_issuer;
mod agent_role;
mod catalog_role;
mod cli_config;
mod dns_role;
mod edge_role;
mod keys;
mod registry_role;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aloft_control::{ApiConfig, ApiState, NewToken};
use aloft_etcd::{EtcdOptions, EtcdStore};
use aloft_store::{ControlStore, SqliteStore, Store};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

/// The organization the first admin token acts for.
const BOOTSTRAP_ORG: &str = "personal";

/// The aloft daemon: the Fly-compatible Machines API and (later) this host's machines.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Without a command, aloftd runs (with the flags below).
    #[command(subcommand)]
    command: Option<Command>,
    /// Where aloftd keeps its state (the control store `control.db` unless --etcd, this host's
    /// `agent.db`, …).
    #[arg(
        long,
        env = "ALOFT_DATA_DIR",
        default_value = "/var/lib/aloft",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
    /// Keep the control store in etcd (v3.4 or newer) instead of `<data dir>/control.db`: the
    /// client URLs of its members, comma-separated (the foundation of clusters of aloftd hosts
    /// sharing one control plane). This host's own state stays in the data directory.
    #[arg(long, env = "ALOFT_ETCD", value_name = "URL[,URL…]")]
    etcd: Option<String>,
    /// Address the API listens on (port 0 picks a free one).
    #[arg(
        long,
        env = "ALOFT_LISTEN",
        default_value = "127.0.0.1:4280",
        value_name = "ADDR:PORT"
    )]
    listen: SocketAddr,
    /// This host's region (a label: lowercase letters, digits, hyphens).
    #[arg(long, env = "ALOFT_REGION", default_value = "local")]
    region: String,
    /// How long in-flight requests may take to finish after SIGTERM, in seconds.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    shutdown_timeout: u64,
    /// Don't write one line per request to stderr.
    #[arg(long)]
    no_access_log: bool,
    /// What runs machines: `vm` (QEMU microVMs) or `fake` (in memory, nothing runs: for tests
    /// and benchmarks of the API only).
    #[arg(long, env = "ALOFT_DRIVER", value_enum, default_value = "vm")]
    driver: agent_role::DriverKind,
    /// Directory with the guest kernel (`vmlinux`) and initramfs (`initramfs.cpio`) that
    /// `scripts/setup.sh` builds into `target/guest`. Default: `<data dir>/guest`.
    #[arg(long, env = "ALOFT_GUEST_DIR", value_name = "DIR")]
    guest_dir: Option<PathBuf>,
    /// An external registry that image names without one resolve to (e.g. `127.0.0.1:5000`);
    /// no embedded registry is started then. A loopback registry is spoken to over plain HTTP.
    #[arg(long, env = "ALOFT_REGISTRY", value_name = "HOST:PORT")]
    registry: Option<String>,
    /// Where the embedded registry (started when no --registry is given and machines run on
    /// VMs) listens.
    #[arg(
        long,
        env = "ALOFT_EMBEDDED_REGISTRY",
        default_value = "127.0.0.1:5000",
        value_name = "ADDR:PORT"
    )]
    embedded_registry: SocketAddr,
    /// Start no embedded registry: image names without a registry then mean Docker Hub.
    #[arg(long)]
    no_embedded_registry: bool,
    /// A registry to speak plain HTTP to (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    insecure_registries: Vec<String>,
    /// Machines' networks: `host` (taps, private 6PN addresses, nftables isolation; needs
    /// CAP_NET_ADMIN) or `none` (loopback only).
    #[arg(long, env = "ALOFT_NETWORK", value_enum, default_value = "host")]
    network: agent_role::NetworkKind,
    /// This host's number in the cluster's address plan (from 1).
    #[arg(long, default_value_t = 1, value_name = "N")]
    host_number: u32,
    /// The unprivileged user machines' QEMU processes drop to once they have opened their files
    /// (they also run under seccomp, `-sandbox on`, each in a cgroup of its own with the
    /// machine's memory and CPU limits). Jailing needs root; `scripts/setup.sh` creates the user.
    #[arg(
        long,
        env = "ALOFT_JAIL_USER",
        default_value = "aloft-vm",
        value_name = "USER"
    )]
    jail_user: String,
    /// The cgroup (relative to each hierarchy's root, e.g. `/sys/fs/cgroup`) under which each
    /// machine's cgroup is made.
    #[arg(long, default_value = "aloft", value_name = "PATH")]
    cgroup_parent: String,
    /// Run machines' QEMU unjailed: as aloftd's own user, without seccomp or cgroup limits. For
    /// development without root only: a guest that escapes QEMU then has aloftd's privileges.
    #[arg(long, env = "ALOFT_NO_JAIL")]
    no_jail: bool,
    /// Boot every machine's kernel instead of restoring its shape's boot template
    /// (`<data dir>/image/templates`: a snapshot of a guest booted up to init's wait for its
    /// config, made by the first machine of each shape). Templates start machines several times
    /// faster; this is for comparing and for debugging a guest's boot.
    #[arg(long, env = "ALOFT_NO_BOOT_TEMPLATES")]
    no_boot_templates: bool,
    /// Put machines' taps, routes and nftables rules in this network namespace
    /// (`/run/netns/NAME`) instead of aloftd's own: several hosts on one machine, or tests.
    #[arg(long, value_name = "PATH")]
    machines_netns: Option<PathBuf>,
    /// Where the edge proxy serves apps over HTTP (`http://<app>.<base domain>:PORT`).
    #[arg(
        long,
        env = "ALOFT_EDGE_HTTP",
        default_value = "127.0.0.1:8080",
        value_name = "ADDR:PORT"
    )]
    edge_http: SocketAddr,
    /// Where the edge proxy serves apps over HTTPS (certificates from the local CA, see `aloft
    /// certs root`, or issued for custom domains).
    #[arg(
        long,
        env = "ALOFT_EDGE_HTTPS",
        default_value = "127.0.0.1:8443",
        value_name = "ADDR:PORT"
    )]
    edge_https: SocketAddr,
    /// How many threads the edge proxy serves traffic on, each a single-threaded runtime with
    /// its own listener of every public port; default: one per CPU.
    #[arg(long, env = "ALOFT_EDGE_THREADS", value_name = "N")]
    edge_threads: Option<std::num::NonZeroUsize>,
    /// Where the edge serves Prometheus metrics (`/metrics`); `off` for nowhere.
    #[arg(long, default_value = "127.0.0.1:9091", value_name = "ADDR:PORT|off")]
    edge_metrics: String,
    /// Apps answer at `<app>.<base domain>`; the default resolves to loopback everywhere.
    #[arg(long, env = "ALOFT_BASE_DOMAIN", default_value = "localhost")]
    base_domain: String,
    /// How often the edge stops or suspends idle machines (autostop), in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    edge_autostop_interval: u64,
    /// A machine without requests for this long is idle (autostop), in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    edge_idle_after: u64,
    /// Run no edge proxy on this host.
    #[arg(long)]
    no_edge: bool,
    /// Run no internal DNS for this host's machines (it runs with `--network host`, on the
    /// address their `/etc/resolv.conf` names, `fdaa::3`): they then resolve no names at all.
    #[arg(long, env = "ALOFT_NO_DNS")]
    no_dns: bool,
    /// Where the internal DNS sends names outside `.internal` (repeatable; ADDR or ADDR:PORT,
    /// port 53 by default). Default: the `nameserver`s of `/etc/resolv.conf`.
    #[arg(long = "dns-upstream", value_name = "ADDR[:PORT]", value_parser = dns_role::parse_upstream)]
    dns_upstreams: Vec<std::net::SocketAddr>,
    /// The key file the edge seals custom domains' private keys with in the control store
    /// (32 bytes, mode 0600, created on first use). Edges sharing one store need the same file.
    /// Default: `<data dir>/edge/cert-seal.key`.
    #[arg(long, env = "ALOFT_EDGE_CERT_KEY", value_name = "FILE")]
    edge_cert_key: Option<PathBuf>,
    /// A previous edge certificate key file, during a rotation (repeatable; in the environment,
    /// files separated by `:`). It only opens: custom domains' private keys it sealed are sealed
    /// again with --edge-cert-key when the edge loads them, after which it can be dropped.
    #[arg(
        long,
        env = "ALOFT_EDGE_CERT_KEY_PREVIOUS",
        value_name = "FILE",
        value_delimiter = ':'
    )]
    edge_cert_key_previous: Vec<PathBuf>,
    /// A previous app secrets key file, during a rotation (repeatable; in the environment, files
    /// separated by `:`). It only opens: secrets it sealed are sealed again with
    /// `<data dir>/secrets.key` when aloftd starts, after which it can be dropped.
    #[arg(
        long,
        env = "ALOFT_SECRETS_KEY_PREVIOUS",
        value_name = "FILE",
        value_delimiter = ':'
    )]
    secrets_key_previous: Vec<PathBuf>,
    /// A previous agent secrets key file, during a rotation (repeatable; in the environment,
    /// files separated by `:`). It only opens: the secrets the agent keeps for machines' boots
    /// that it sealed are sealed again with `<data dir>/agent-secrets.key` when aloftd starts,
    /// after which it can be dropped.
    #[arg(
        long,
        env = "ALOFT_AGENT_SECRETS_KEY_PREVIOUS",
        value_name = "FILE",
        value_delimiter = ':'
    )]
    agent_secrets_key_previous: Vec<PathBuf>,
    // ACME for custom domains (acme_issuer.rs).
    /// Get custom domains' certificates from this ACME CA (e.g.
    /// https://acme-v02.api.letsencrypt.org/directory); without it they come from the local CA.
    #[arg(long, env = "ALOFT_ACME_DIRECTORY", value_name = "URL")]
    acme_directory: Option<String>,
    /// An extra trusted root (PEM) for the ACME CA's API: a private CA such as Pebble.
    #[arg(long, value_name = "FILE", requires = "acme_directory")]
    acme_ca_root: Option<PathBuf>,
    /// The ACME account's contact address (optional).
    #[arg(long, value_name = "ADDR", requires = "acme_directory")]
    acme_email: Option<String>,
    /// How the ACME CA validates domains: `http-01` (it must reach --edge-http on port 80) or
    /// `tls-alpn-01` (it must reach --edge-https on port 443).
    #[arg(long, value_enum, default_value = "http-01", value_name = "TYPE")]
    acme_challenge: acme_issuer::AcmeChallenge,
}

/// aloftd's commands (without one, it runs).
#[derive(Debug, Subcommand)]
enum Command {
    /// Print each key file's id (`ID  FILE`).
    ///
    /// The id is what sealed values record and what errors about a key that is not configured
    /// name (docs/keys.md): it tells which file to give with a `--*-key-previous` flag.
    KeyId {
        /// Key files: `secrets.key`, `agent-secrets.key`, `edge/cert-seal.key` or copies of
        /// previous ones (32 bytes, mode 0600).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

impl Args {
    fn edge_settings(&self) -> anyhow::Result<edge_role::EdgeSettings> {
        let metrics = match self.edge_metrics.as_str() {
            "off" | "" => None,
            a => Some(a.parse().with_context(|| {
                format!("invalid --edge-metrics {a:?}: give ADDR:PORT (e.g. 127.0.0.1:9091) or off")
            })?),
        };
        Ok(edge_role::EdgeSettings {
            name: agent_role::host_name(self.host_number),
            region: self.region.clone(),
            data_dir: self.data_dir.clone(),
            cert_key: self
                .edge_cert_key
                .clone()
                .unwrap_or_else(|| self.data_dir.join("edge").join("cert-seal.key")),
            cert_key_previous: self.edge_cert_key_previous.clone(),
            http: self.edge_http,
            https: self.edge_https,
            threads: self.edge_threads,
            metrics,
            base_domain: self.base_domain.trim_matches('.').to_ascii_lowercase(),
            autostop_interval: Duration::from_secs(self.edge_autostop_interval.max(1)),
            idle_after: Duration::from_secs(self.edge_idle_after),
            machines_netns: self.machines_netns.clone(),
            acme: self
                .acme_directory
                .clone()
                .map(|directory| acme_issuer::AcmeSettings {
                    directory,
                    ca_root: self.acme_ca_root.clone(),
                    email: self.acme_email.clone(),
                    challenge: self.acme_challenge,
                }),
        })
    }

    /// The internal DNS's settings, `None` when it does not run: machines have no host network
    /// (or do not run at all), or `--no-dns`.
    fn dns_settings(&self) -> anyhow::Result<Option<dns_role::DnsSettings>> {
        if self.no_dns
            || self.driver != agent_role::DriverKind::Vm
            || self.network != agent_role::NetworkKind::Host
        {
            return Ok(None);
        }
        let plan = aloft_net::Plan::new(&aloft_net::PlanConfig::new(self.host_number))
            .with_context(|| format!("the address plan for host number {}", self.host_number))?;
        Ok(Some(dns_role::DnsSettings {
            region: self.region.clone(),
            address: plan.dns(),
            netns: self.machines_netns.clone(),
            upstreams: self.dns_upstreams.clone(),
        }))
    }

    fn agent_settings(&self) -> agent_role::AgentSettings {
        agent_role::AgentSettings {
            data_dir: self.data_dir.clone(),
            region: self.region.clone(),
            driver: self.driver,
            guest_dir: self.guest_dir.clone(),
            registry: self.registry.clone(),
            insecure_registries: self.insecure_registries.clone(),
            network: self.network,
            host_number: self.host_number,
            machines_netns: self.machines_netns.clone(),
            secrets_key_previous: self.agent_secrets_key_previous.clone(),
            jail: (!self.no_jail).then(|| aloft_vm::JailSpec {
                user: self.jail_user.clone(),
                cgroup_parent: self.cgroup_parent.clone(),
            }),
            boot_templates: !self.no_boot_templates,
        }
    }
}

/// mimalloc, not glibc's malloc: see the workspace's `Cargo.toml` and docs/perf.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::KeyId { files }) = &args.command {
        return keys::print_key_ids(files);
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("aloftd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_region(region: &str) -> anyhow::Result<()> {
    let ok = (1..=63).contains(&region.len())
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        bail!(
            "invalid --region {region:?}: use 1 to 63 lowercase letters, digits and hyphens (e.g. \"local\", \"ams\")"
        );
    }
    Ok(())
}

fn create_data_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| {
            format!(
                "create the data directory {}; run as a user who may, or pick another with --data-dir",
                dir.display()
            )
        })
}

fn run(args: &Args) -> anyhow::Result<()> {
    check_region(&args.region)?;
    create_data_dir(&args.data_dir)?;
    let store = open_control_store(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("aloftd")
        .build()
        .context("start the tokio runtime")?;
    let mut settings = args.agent_settings();
    let registry =
        if args.driver == agent_role::DriverKind::Vm && args.registry.is_none() && !args.no_embedded_registry
        {
            let r = registry_role::EmbeddedRegistry::start(&args.data_dir, args.embedded_registry)?;
            eprintln!("aloftd: embedded registry on {}", r.host());
            settings.registry = Some(r.host());
            Some(r)
        } else {
            None
        };
    let role = settings.open()?;
    let agent = role.agent.clone();
    // This host's machines, published for the edges (`/catalog/` in the store).
    let catalog = catalog_role::start(&agent, Arc::clone(&store), &role.handle.name);
    // The resolver machines are given; after the agent, which set up the address it listens on.
    let dns = match args.dns_settings()? {
        Some(dns) => Some(dns_role::start(&dns, Arc::clone(&store), runtime.handle())?),
        None => None,
    };
    let result = runtime.block_on(serve(args, Arc::clone(&store), vec![role.handle]));
    // Blocking store calls of requests cut off by the shutdown deadline get a moment to end.
    drop(dns);
    runtime.shutdown_timeout(Duration::from_secs(1));
    // Operations in flight get the shutdown timeout to finish; machines keep running.
    agent_role::shutdown(agent, Duration::from_secs(args.shutdown_timeout));
    drop(catalog);
    drop(registry);
    // The last handle: SQLite checkpoints and closes, the store's lock file is released (etcd:
    // the store's client thread stops).
    drop(store);
    result?;
    eprintln!("aloftd: stopped");
    Ok(())
}

/// The control store: on etcd with `--etcd`, else `<data dir>/control.db`. Says which.
fn open_control_store(args: &Args) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(list) = &args.etcd {
        let store = EtcdOptions::parse(list)
            .and_then(EtcdStore::connect)
            .context("connect to the control store on etcd")?;
        eprintln!(
            "aloftd: control store: etcd {} at {}",
            store.server_version(),
            store.endpoints().join(", ")
        );
        return Ok(Arc::new(store));
    }
    let db = args.data_dir.join("control.db");
    let store = SqliteStore::open(&db).with_context(|| format!("open the control store {}", db.display()))?;
    eprintln!("aloftd: control store: {} (SQLite)", db.display());
    Ok(Arc::new(store))
}

/// On the first start (no token in the store): mints the admin token, writes the CLI's config
/// and prints the token. Later starts change nothing.
fn bootstrap(control: &ControlStore, api_url: &str) -> anyhow::Result<()> {
    if !control.list_tokens().context("read the tokens")?.is_empty() {
        return Ok(());
    }
    let new = NewToken::generate(BOOTSTRAP_ORG, "admin")?;
    // The config first: a crash before the record is stored leaves a token that does not work
    // yet, and the next start mints another and overwrites it.
    let written = cli_config::path().and_then(|path| {
        cli_config::write(&path, api_url, &new.token)?;
        Ok(path)
    });
    control
        .create_token(&new.record)
        .context("store the admin token")?;
    println!(
        "aloftd: created an admin token for organization {BOOTSTRAP_ORG:?}. It is shown only this once:\n\n    {}\n",
        new.token
    );
    match written {
        Ok(path) => println!(
            "aloftd: wrote it with the API URL {api_url} to {}; the aloft CLI uses it from there",
            path.display()
        ),
        Err(e) => eprintln!(
            "aloftd: warning: could not write the aloft CLI's config ({e:#}); \
             set ALOFT_API_URL={api_url} and ALOFT_API_TOKEN to the token above instead"
        ),
    }
    Ok(())
}

/// How often the control store's change history is trimmed.
const COMPACT_EVERY: Duration = Duration::from_secs(300);

/// Keeps the control store's change log bounded (ADR 0006): every [`COMPACT_EVERY`], history
/// older than the newest [`aloft_store::KEEP_REVISIONS`] revisions goes.
async fn compact_periodically(store: Arc<dyn Store>) {
    let mut every = tokio::time::interval(COMPACT_EVERY);
    loop {
        every.tick().await;
        let store = Arc::clone(&store);
        let done = tokio::task::spawn_blocking(move || {
            aloft_store::compact_history(&*store, aloft_store::KEEP_REVISIONS)
        })
        .await;
        match done {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("aloftd: warning: compacting the control store's history: {e}"),
            Err(e) => {
                eprintln!("aloftd: warning: compacting the control store's history did not finish: {e}")
            }
        }
    }
}

/// How often the volume snapshot schedule runs ([`aloft_control::run_snapshot_schedule`]): each
/// pass takes the daily snapshots that are due and deletes the expired ones.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(3600);
/// The first pass runs this long after start (not during the agent's recovery), then every
/// [`SNAPSHOT_EVERY`].
const SNAPSHOT_FIRST: Duration = Duration::from_secs(60);

/// Runs the volume snapshot schedule every [`SNAPSHOT_EVERY`] on the blocking pool (it calls the
/// store and the hosts, which block), and logs what each pass did. A pass that is still running
/// when the next is due delays it (`MissedTickBehavior::Delay`), so passes never overlap.
async fn snapshot_periodically(state: ApiState) {
    let mut every = tokio::time::interval_at(tokio::time::Instant::now() + SNAPSHOT_FIRST, SNAPSHOT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let state = state.clone();
        let done = tokio::task::spawn_blocking(move || {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            aloft_control::run_snapshot_schedule(&state, now_ms)
        })
        .await;
        match done {
            Ok(report) => log_snapshot_pass(&report),
            Err(e) => eprintln!("aloftd: warning: the volume snapshot pass did not finish: {e}"),
        }
    }
}

/// One line per snapshot a pass took or deleted, one warning per failure.
fn log_snapshot_pass(report: &aloft_control::ScheduleReport) {
    for s in &report.taken {
        eprintln!(
            "aloftd: took daily snapshot {} of volume {} (app {})",
            s.snapshot, s.volume, s.app
        );
    }
    for s in &report.deleted {
        eprintln!(
            "aloftd: deleted snapshot {} of volume {} (app {}): past its retention, or left unfinished",
            s.snapshot, s.volume, s.app
        );
    }
    for failure in &report.failures {
        eprintln!("aloftd: warning: volume snapshot pass: {failure}; the next pass tries again");
    }
}

/// Resolves on the first SIGTERM or SIGINT, with the signal's name.
/// Listens for SIGTERM and SIGINT from now on (registered at once, not when first awaited, so a
/// signal that comes right after "listening" stops aloftd gracefully); resolves with its name.
fn stop_signal() -> anyhow::Result<impl Future<Output = &'static str>> {
    let mut term = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

async fn serve(
    args: &Args,
    store: Arc<dyn Store>,
    hosts: Vec<aloft_control::HostHandle>,
) -> anyhow::Result<()> {
    let stop = stop_signal()?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "listen on {}; is another aloftd running? Pick another address with --listen",
            args.listen
        )
    })?;
    let addr = listener.local_addr().context("read the listening address")?;
    let api_url = format!("http://{addr}");
    let control = ControlStore::new(Arc::clone(&store));
    let url = api_url.clone();
    tokio::task::spawn_blocking(move || bootstrap(&control, &url))
        .await
        .context("first-start setup did not finish")??;
    // App secrets are sealed with a key kept in its own file, apart from control.db; previous
    // key files open what they sealed, which is sealed again with the current key now.
    let secrets_key = args.data_dir.join("secrets.key");
    let current = aloft_secretbox::Key::load_or_create(&secrets_key)
        .with_context(|| format!("open the secrets key {}", secrets_key.display()))?;
    let secrets_keys = Arc::new(keys::SECRETS.keyring(current, &args.secrets_key_previous)?);
    let control = ControlStore::new(Arc::clone(&store));
    let keys = Arc::clone(&secrets_keys);
    let resealed = tokio::task::spawn_blocking(move || {
        aloft_control::reseal_secrets(&control, &keys)
            .context("re-seal app secrets with the current secrets key")
    })
    .await
    .context("re-sealing app secrets did not finish")??;
    log_resealed(&secrets_keys, &resealed);
    let edge = if args.no_edge {
        None
    } else {
        Some(edge_role::start(args.edge_settings()?, Arc::clone(&store), hosts.clone()).await?)
    };
    let state = ApiState::with_hosts(
        store,
        ApiConfig {
            region: args.region.clone(),
            access_log: !args.no_access_log,
        },
        hosts,
    )
    .with_secrets_keys(secrets_keys)
    .with_edge(aloft_control::EdgeSettings {
        base_domain: args.base_domain.trim_matches('.').to_ascii_lowercase(),
        addresses: Vec::new(),
        ca_root: (!args.no_edge).then(|| args.data_dir.join("edge").join("ca").join("ca.pem")),
    });
    eprintln!(
        "aloftd: listening on {api_url} (region {}, data {})",
        args.region,
        args.data_dir.display()
    );
    // Releases an earlier aloftd left unfinished go on.
    let resumed = state.clone();
    tokio::task::spawn_blocking(move || aloft_control::resume_releases(&resumed));
    let compactor = tokio::spawn(compact_periodically(Arc::clone(state.control().store())));
    let snapshotter = tokio::spawn(snapshot_periodically(state.clone()));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(
        axum::serve(listener, aloft_control::router(state))
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .into_future(),
    );
    tokio::select! {
        signal = stop => {
            eprintln!("aloftd: {signal}: stopping; finishing requests in flight");
        }
        ended = &mut server => {
            ended.context("the API server task failed")?.context("serve the API")?;
            bail!("the API server stopped by itself");
        }
    }
    compactor.abort();
    snapshotter.abort();
    drop(edge);
    let _ = stop_tx.send(());
    let deadline = Duration::from_secs(args.shutdown_timeout);
    match tokio::time::timeout(deadline, &mut server).await {
        Ok(ended) => ended
            .context("the API server task failed")?
            .context("serve the API")?,
        Err(_) => {
            server.abort();
            eprintln!(
                "aloftd: requests still running after {}s were cut off",
                args.shutdown_timeout
            );
        }
    }
    Ok(())
}

/// Tells what [`aloft_control::reseal_secrets`] did: counts, app and secret names, key ids;
/// never a value.
fn log_resealed(keys: &aloft_secretbox::Keyring, report: &aloft_control::ResealReport) {
    keys::SECRETS.log_keys(keys);
    let busy: Vec<String> = report
        .busy
        .iter()
        .map(|app| {
            format!("app {app}'s secrets kept changing while being re-sealed; the next start tries again")
        })
        .collect();
    keys::SECRETS.log_reseal(
        keys,
        (report.resealed > 0).then(|| format!("{} secret(s) of {} app(s)", report.resealed, report.apps)),
        &report.unreadable,
        &busy,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_labels() {
        for ok in ["local", "ams", "eu-west-1"] {
            check_region(ok).unwrap();
        }
        for bad in ["", "AMS", "a b", "x/y", &"a".repeat(64)] {
            assert!(check_region(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_are_the_embedded_setup() {
        let args = Args::try_parse_from(["aloftd"]).unwrap();
        assert_eq!(args.listen, "127.0.0.1:4280".parse().unwrap());
        assert_eq!(args.region, "local");
        if std::env::var_os("ALOFT_DATA_DIR").is_none() {
            assert_eq!(args.data_dir, Path::new("/var/lib/aloft"));
        }
    }

    #[test]
    fn the_edge_cert_key_defaults_under_the_data_dir() {
        let args = Args::try_parse_from(["aloftd", "--data-dir", "/d", "--host-number", "2"]).unwrap();
        let edge = args.edge_settings().unwrap();
        if std::env::var_os("ALOFT_EDGE_CERT_KEY").is_none() {
            assert_eq!(edge.cert_key, Path::new("/d/edge/cert-seal.key"));
        }
        assert_eq!(edge.name, "host-2");
        let args = Args::try_parse_from(["aloftd", "--edge-cert-key", "/shared/edge.key"]).unwrap();
        assert_eq!(
            args.edge_settings().unwrap().cert_key,
            Path::new("/shared/edge.key")
        );
    }

    #[test]
    fn previous_key_files_are_repeatable() {
        let args = Args::try_parse_from([
            "aloftd",
            "--edge-cert-key-previous",
            "/old/a.key",
            "--edge-cert-key-previous",
            "/old/b.key",
            "--secrets-key-previous",
            "/old/s.key",
            "--agent-secrets-key-previous",
            "/old/agent.key",
        ])
        .unwrap();
        assert_eq!(
            args.edge_settings().unwrap().cert_key_previous,
            [Path::new("/old/a.key"), Path::new("/old/b.key")]
        );
        assert_eq!(args.secrets_key_previous, [Path::new("/old/s.key")]);
        assert_eq!(
            args.agent_settings().secrets_key_previous,
            [Path::new("/old/agent.key")]
        );
    }

    #[test]
    fn key_id_is_a_command_that_needs_files() {
        let args = Args::try_parse_from(["aloftd", "key-id", "/a.key", "/b.key"]).unwrap();
        assert!(
            matches!(&args.command, Some(Command::KeyId { files }) if files == &[Path::new("/a.key"), Path::new("/b.key")]),
            "{args:?}"
        );
        assert!(Args::try_parse_from(["aloftd", "key-id"]).is_err());
        assert!(Args::try_parse_from(["aloftd"]).unwrap().command.is_none());
    }
}
