//! An edge with one static route, for `cargo xtask bench proxy`: requests for
//! `bench.localhost` on `--listen` go to the backend at `127.0.0.1:--backend`.
//!
//! ```text
//! cargo run --release -p aloft-proxy --example edge_static -- --listen 127.0.0.1:8081 --backend 8080
//! ```
//!
//! Options: `--listen ADDR` (default `127.0.0.1:8081`), `--backend PORT` (the backend's port on
//! 127.0.0.1, default 8080), `--threads N` (the edge's worker threads; default the number of CPUs).
//! Prints `listening ADDR` on stdout once it accepts, then serves until killed. Nothing is ever
//! started or stopped: the machine is always `started` and the control refuses every call.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use aloft_api::{CatalogEntry, MachineId};
use aloft_proxy::{
    ControlError, ControlFuture, DirectDialer, Edge, EdgeConfig, MachineControl, WorkerThreads,
};

/// A control with no machines to start or stop.
#[derive(Debug)]
struct Static;

impl MachineControl for Static {
    fn start(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        refused()
    }
    fn stop(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        refused()
    }
    fn suspend(&self, _app: &str, _id: &MachineId) -> ControlFuture {
        refused()
    }
}

fn refused() -> ControlFuture {
    Box::pin(async { Err(ControlError::Refused("static routes".to_owned())) })
}

struct Args {
    listen: SocketAddr,
    backend: u16,
    threads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
        backend: 8080,
        threads: std::thread::available_parallelism().map_or(1, usize::from),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value:?}: {e}");
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|e| bad(&e))?,
            "--backend" => args.backend = value.parse().map_err(|e| bad(&e))?,
            "--threads" => args.threads = value.parse().map_err(|e| bad(&e))?,
            other => return Err(format!("unknown option {other}; see the example's doc comment")),
        }
    }
    Ok(args)
}

/// The one machine: app `bench` at 127.0.0.1, its http service on public port 80 forwarding to
/// `backend`, with limits far above what the benchmark offers.
fn entry(backend: u16) -> Result<CatalogEntry, serde_json::Error> {
    serde_json::from_value(serde_json::json!({
        "id": "0123456789abcd",
        "app": "bench",
        "host": "local",
        "region": "local",
        "state": "started",
        "version": "1",
        "private_ip": "127.0.0.1",
        "services": [{
            "protocol": "tcp",
            "internal_port": backend,
            "ports": [{"port": 80, "handlers": ["http"]}],
            "concurrency": {"type": "requests", "soft_limit": 10000, "hard_limit": 10000},
        }],
        "updated_at": 0,
    }))
}

/// mimalloc, not glibc's malloc: see the workspace's `Cargo.toml` and docs/perf.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    // As aloftd runs it: traffic on the edge's worker threads, one listener each; the
    // once-per-edge loops on a runtime of their own.
    let threads = WorkerThreads::start(NonZeroUsize::new(args.threads), "edge")?;
    let workers = threads.workers();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let edge = Edge::new(EdgeConfig::new("local"), Arc::new(Static), Arc::new(DirectDialer));
        edge.routes().upsert(entry(args.backend)?);
        // The bench route has no checks, so this only waits.
        tokio::spawn(edge.clone().run_checks());
        let listeners = workers.bind_tcp(args.listen)?;
        if let Some(l) = listeners.first() {
            println!("listening {}", l.local_addr()?);
        }
        for served in workers.spawn_each(listeners, |l| edge.clone().serve_http(l)) {
            served.await?;
        }
        Ok(())
    })
}
