//! The edge's settings.

use std::collections::HashMap;
use std::time::Duration;

/// Round-trip times from this edge to regions, in milliseconds: "closest" in balancing. The
/// edge's own region is 0; a region missing from the table is ranked after every known one.
#[derive(Debug, Clone, Default)]
pub struct RegionRtt {
    rtt_ms: HashMap<String, u32>,
}

impl RegionRtt {
    /// Sets the round-trip time to `region`.
    pub fn set(&mut self, region: impl Into<String>, ms: u32) {
        self.rtt_ms.insert(region.into(), ms);
    }

    /// The round-trip time to `region` from an edge in `local`.
    pub fn get(&self, local: &str, region: &str) -> u32 {
        if region == local {
            0
        } else {
            self.rtt_ms.get(region).copied().unwrap_or(u32::MAX / 2)
        }
    }
}

/// How an [`crate::Edge`] behaves. [`EdgeConfig::new`] gives the defaults aloftd uses.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// The edge's region (`Fly-Region`, closeness).
    pub region: String,
    /// Apps answer at `<app>.<base_domain>` (default `localhost`, which resolves to loopback).
    pub base_domain: String,
    /// The public port the plain HTTP listener stands for: services with this port and the
    /// `http` handler are served there (80), whatever port the listener really binds.
    pub http_port: u16,
    /// The public port the HTTPS listener stands for (443).
    pub https_port: u16,
    /// Round-trip times to other regions.
    pub rtt: RegionRtt,
    /// Connecting to a machine gives up after this long (then another machine is tried).
    pub connect_timeout: Duration,
    /// How many machines a request tries when connects fail before anything was sent.
    pub connect_attempts: usize,
    /// Requests an app may have waiting for capacity (every machine at its hard limit) before
    /// more are refused with 503.
    pub queue_limit: usize,
    /// How long a request waits in that queue.
    pub queue_timeout: Duration,
    /// How long a request waits for a stopped or suspended machine to start and accept.
    pub wake_timeout: Duration,
    /// How often the autostop loop runs (Fly: every few minutes).
    pub autostop_interval: Duration,
    /// A machine is idle when it had no request or connection for this long.
    pub idle_after: Duration,
    /// Idle keep-alive connections to machines are closed after this long.
    pub pool_idle_timeout: Duration,
    /// A client must send its request headers within this long (slow clients get 408).
    pub header_read_timeout: Duration,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Open connections one client address may hold; more are closed at once.
    pub max_conns_per_client: usize,
    /// Default `concurrency` for services that set none (Fly's: connections, soft 20, hard 25).
    pub default_soft_limit: u32,
    /// See [`EdgeConfig::default_soft_limit`].
    pub default_hard_limit: u32,
    /// A machine a connect failed to is skipped for this long (passive health).
    pub failed_backoff: Duration,
    /// A UDP flow (one client address on one public UDP port, stuck to one machine) ends after
    /// this long without a datagram either way; the client's next datagram picks again.
    pub udp_flow_idle_timeout: Duration,
    /// UDP flows the edge keeps at once, over all ports; datagrams that would open more are
    /// dropped (and counted).
    pub udp_max_flows: usize,
    /// UDP flows one client IP address may have open at once (over all its ports).
    pub udp_max_flows_per_client: usize,
    /// Largest UDP datagram relayed (at most 65 535); longer ones are dropped and counted.
    pub udp_max_datagram: usize,
    /// Datagrams a UDP flow holds while its machine is picked or woken; more are dropped.
    pub udp_flow_queue: usize,
}

impl EdgeConfig {
    /// Defaults for an edge in `region`.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into(),
            base_domain: "localhost".to_owned(),
            http_port: 80,
            https_port: 443,
            rtt: RegionRtt::default(),
            connect_timeout: Duration::from_secs(2),
            connect_attempts: 3,
            queue_limit: 256,
            queue_timeout: Duration::from_secs(10),
            wake_timeout: Duration::from_secs(60),
            autostop_interval: Duration::from_secs(60),
            idle_after: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(4),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            max_conns_per_client: 512,
            default_soft_limit: 20,
            default_hard_limit: 25,
            failed_backoff: Duration::from_millis(500),
            udp_flow_idle_timeout: Duration::from_secs(60),
            udp_max_flows: 16_384,
            udp_max_flows_per_client: 256,
            udp_max_datagram: 65_535,
            udp_flow_queue: 64,
        }
    }
}
