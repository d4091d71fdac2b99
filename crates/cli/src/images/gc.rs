//! `aloft images gc [--budget SIZE] [--grace DURATION] [--json]`.

use std::collections::BTreeSet;
use std::time::Duration;

use aloft_image::gc::{self, GcKind, GcOptions};
use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use crate::context::Context;
use crate::progress::{bytes, short};

#[derive(Debug, Args)]
pub(crate) struct GcArgs {
    /// How much the cache's bases and blobs may use, e.g. 20G, 512M, 0 (the default: keep only what
    /// cached images need).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    budget: u64,
    /// Unreferenced items younger than this are kept (pulls in progress), e.g. 10m, 30s, 0.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    grace: Duration,
    /// Print what was removed as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct GcJson {
    used_before: u64,
    used_after: u64,
    freed: u64,
    over_budget: bool,
    removed: Vec<RemovedJson>,
}

#[derive(Debug, Serialize)]
struct RemovedJson {
    kind: &'static str,
    digest: String,
    bytes: u64,
}

pub(crate) async fn run(ctx: &Context, args: &GcArgs) -> anyhow::Result<()> {
    let puller = ctx.puller()?;
    let images = puller.images().clone();
    let rootfs = ctx.rootfs()?;
    let options = GcOptions {
        budget_bytes: args.budget,
        grace: args.grace,
    };
    // Until aloftd runs machines, no image is in use beyond what the cache's records name.
    let report =
        tokio::task::spawn_blocking(move || gc::collect(&images, &rootfs, &BTreeSet::new(), &options))
            .await?
            .context("collect the image cache's garbage")?;
    if args.json {
        let out = GcJson {
            used_before: report.used_before,
            used_after: report.used_after,
            freed: report.freed,
            over_budget: report.over_budget,
            removed: report
                .removed
                .iter()
                .map(|r| RemovedJson {
                    kind: kind(r.kind),
                    digest: r.digest.to_string(),
                    bytes: r.bytes,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    for r in &report.removed {
        println!(
            "removed {} {} ({})",
            kind(r.kind),
            short(&r.digest),
            bytes(r.bytes)
        );
    }
    println!(
        "freed {}; the cache uses {} (was {})",
        bytes(report.freed),
        bytes(report.used_after),
        bytes(report.used_before)
    );
    if report.over_budget {
        eprintln!(
            "still over the budget of {}: what is left is needed by cached images (aloft images rm NAME frees it)",
            bytes(args.budget)
        );
    }
    Ok(())
}

fn kind(k: GcKind) -> &'static str {
    match k {
        GcKind::Base => "base",
        GcKind::Blob => "blob",
    }
}

/// `512M`, `20G`, `1.5G`, `4096` (bytes); K, M, G, T are powers of 1024, an optional trailing `B`
/// or `iB` is ignored.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (number, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}: write e.g. 20G, 512M or 0"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("invalid size {s:?}: it must be zero or more"));
    }
    let bytes = value * 2f64.powi(shift);
    if bytes >= 2f64.powi(63) {
        return Err(format!("size {s:?} is too large"));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "checked finite, non-negative and below 2^63 above"
    )]
    Ok(bytes as u64)
}

/// `10m`, `30s`, `2h`, `0`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, unit) = match t.chars().last() {
        Some('s') => (&t[..t.len() - 1], 1),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('h') => (&t[..t.len() - 1], 3600),
        _ => (t, 1),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: write e.g. 10m, 30s or 0"))?;
    n.checked_mul(unit)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("duration {s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("20GiB").unwrap(), 20 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        for bad in ["", "G", "-1G", "ten", "1X", "NaN", "1e30T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "m", "-1s", "1.5m", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
