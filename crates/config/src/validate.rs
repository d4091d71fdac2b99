//! Checks that span sections: process group references, one volume per group, strategy versus
//! volumes, service check durations. Runs after decoding; reports into the same [`Ctx`].

use std::time::Duration as StdDuration;

use aloft_api::MachineServiceCheck;

use crate::decode::Ctx;
use crate::diag::Origin;
use crate::schema::AppConfig;

/// The process group used when `[processes]` is absent or doesn't name `app`.
pub const DEFAULT_GROUP: &str = "app";

impl AppConfig {
    /// Process group names: the keys of `[processes]`, sorted, or `["app"]` without one.
    pub fn process_groups(&self) -> Vec<String> {
        if self.processes.is_empty() {
            vec![DEFAULT_GROUP.to_owned()]
        } else {
            self.processes.keys().cloned().collect()
        }
    }

    /// The group that sections without `processes` belong to: `app` if it exists, else the
    /// first group by name (flyctl's rule).
    pub fn default_group(&self) -> String {
        let groups = self.process_groups();
        if groups.iter().any(|g| g == DEFAULT_GROUP) {
            DEFAULT_GROUP.to_owned()
        } else {
            groups
                .into_iter()
                .next()
                .unwrap_or_else(|| DEFAULT_GROUP.to_owned())
        }
    }
}

pub(crate) fn validate(ctx: &mut Ctx<'_>, cfg: &AppConfig) {
    let groups = cfg.process_groups();
    let check_refs = |ctx: &mut Ctx<'_>, section: &str, processes: &[String], origin: &Origin| {
        for p in processes {
            if !groups.contains(p) {
                ctx.error_at(
                    origin,
                    format!(
                        "{section} names process group {p:?}, which [processes] does not define; add it to [processes] or remove it from `processes` (groups: {})",
                        groups.join(", ")
                    ),
                );
            }
        }
    };

    let defined = cfg.processes.len();
    if let Some(h) = &cfg.http_service {
        check_refs(ctx, "[http_service]", &h.processes, &h.origin);
        if h.processes.is_empty() && defined > 1 {
            ctx.error_at(
                &h.origin,
                format!("[http_service] has no `processes` but the app has {defined} process groups; set `processes` to say which groups serve it"),
            );
        }
        check_durations(ctx, &h.checks, &h.origin);
    }
    for s in &cfg.services {
        check_refs(ctx, "[[services]]", &s.processes, &s.origin);
        if s.processes.is_empty() && defined > 1 {
            ctx.error_at(
                &s.origin,
                format!("this service has no `processes` but the app has {defined} process groups; set `processes` to say which groups serve it"),
            );
        }
        if s.ports.is_empty() {
            ctx.warn_at(
                &s.origin,
                "this service exposes no ports, so the proxy sends it nothing; add a [[services.ports]] section",
            );
        }
        check_durations(ctx, &s.tcp_checks, &s.origin);
        check_durations(ctx, &s.http_checks, &s.origin);
    }
    for c in cfg.checks.values() {
        check_refs(ctx, "this check", &c.processes, &c.origin);
    }
    for m in &cfg.mounts {
        check_refs(ctx, "this mount", &m.processes, &m.origin);
    }
    for v in &cfg.vm {
        check_refs(ctx, "this [[vm]]", &v.processes, &v.origin);
    }
    for r in &cfg.restart {
        check_refs(ctx, "this [[restart]]", &r.processes, &r.origin);
    }
    for m in &cfg.metrics {
        check_refs(ctx, "these [[metrics]]", &m.processes, &m.origin);
    }
    for f in &cfg.files {
        check_refs(ctx, "this file", &f.processes, &f.origin);
    }

    // One volume per machine.
    let default = cfg.default_group();
    for g in &groups {
        let mounts: Vec<_> = cfg
            .mounts
            .iter()
            .filter(|m| applies(&m.processes, g, &default))
            .collect();
        if let [_, second, ..] = mounts.as_slice() {
            ctx.error_at(
                &second.origin,
                format!("process group {g:?} has more than one mount; a machine can mount one volume"),
            );
        }
    }

    if let Some(deploy) = &cfg.deploy
        && let Some(strategy @ ("canary" | "bluegreen")) = deploy.strategy.as_deref()
        && let Some(m) = cfg.mounts.first()
    {
        let origin = cfg.origins.get("deploy").unwrap_or(&m.origin);
        ctx.error_at(
            origin,
            format!(
                "the {strategy} strategy can't be used with mounts (it runs a new machine beside the one it replaces, and a volume is mounted by one machine at a time); use rolling or immediate"
            ),
        );
    }
}

/// Service checks under 1 s or over 1 minute are clamped by the platform; say so.
fn check_durations(ctx: &mut Ctx<'_>, checks: &[MachineServiceCheck], origin: &Origin) {
    for c in checks {
        for (what, d, zero_ok) in [
            ("interval", c.interval, false),
            ("timeout", c.timeout, false),
            ("grace_period", c.grace_period, true),
        ] {
            let Some(d) = d else { continue };
            let d_std = d.get();
            if (zero_ok && d_std.is_zero())
                || (StdDuration::from_secs(1)..=StdDuration::from_secs(60)).contains(&d_std)
            {
                continue;
            }
            let (limit, verb) = if d_std < StdDuration::from_secs(1) {
                ("1s", "raised")
            } else {
                ("1m0s", "lowered")
            };
            ctx.warn_at(
                origin,
                format!("a check's {what} of {d} will be {verb} to {limit}"),
            );
        }
    }
}

/// Whether a section with these `processes` applies to `group` (flyctl's `matchesGroups`:
/// no processes means the default group only).
pub(crate) fn applies(processes: &[String], group: &str, default: &str) -> bool {
    if processes.is_empty() {
        group == default
    } else {
        processes.iter().any(|p| p == group)
    }
}
