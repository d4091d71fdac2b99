//! Choosing a machine for a request or connection (platform reference §5.1): started, not
//! cordoned, service checks not critical (the edge's results, the catalog's until it has one;
//! undecided ones rank a machine after decided ones); least loaded, then closest; at or over the
//! soft limit only when every other candidate is too (then a stopped machine is woken instead,
//! when there is one); never at the hard limit.

use std::sync::Arc;

use aloft_api::{MachineId, MachineService};

use crate::Edge;
use crate::load::{LoadGuard, MachineLoad};
use crate::routes::{AppRoutes, ChecksVerdict, MachineRoute, Protocol};

/// Which machines a choice may take.
#[derive(Debug, Default, Clone)]
pub(crate) struct Want<'a> {
    /// The public port whose service is asked for.
    pub(crate) port: u16,
    /// Only this machine (`fly-force-instance-id`, a replay's `instance`).
    pub(crate) force_instance: Option<&'a str>,
    /// This machine first when it can take the request.
    pub(crate) prefer_instance: Option<&'a str>,
    /// Only these regions (a replay's `region`, `fly-force-region`); empty: any.
    pub(crate) regions: &'a [String],
    /// These regions first, in order (`fly-prefer-region`).
    pub(crate) prefer_regions: &'a [String],
    /// Never these (already tried, or a replay's `elsewhere`).
    pub(crate) exclude: &'a [MachineId],
}

/// What the balancer decided.
#[derive(Debug)]
pub(crate) enum Choice {
    /// Serve it here; the guard counts the load.
    Ready(Arc<MachineRoute>, LoadGuard),
    /// Wake this stopped or suspended machine and serve it there.
    Wake(Arc<MachineRoute>),
    /// Machines exist but all are at their hard limit: wait for capacity.
    Full,
    /// No machine can take it (none started and healthy, none to wake).
    NoneHealthy,
    /// The forced instance does not exist.
    NotFound,
}

/// The limits of `service` (Fly's defaults when it sets none).
pub(crate) fn limits(edge: &Edge, service: &MachineService) -> (u32, u32) {
    let c = service.concurrency.as_ref();
    let hard = c
        .and_then(|c| c.hard_limit)
        .unwrap_or(edge.config.default_hard_limit)
        .max(1);
    let soft = c
        .and_then(|c| c.soft_limit)
        .unwrap_or(edge.config.default_soft_limit.min(hard))
        .min(hard);
    (soft, hard)
}

struct Candidate {
    route: Arc<MachineRoute>,
    load: Arc<MachineLoad>,
    soft: u32,
    hard: u32,
    rank: (bool, u32, bool, u32),
}

thread_local! {
    /// Turns among equally good machines; per thread, so edge workers share no counter.
    static TIE: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn region_rank(edge: &Edge, want: &Want<'_>, region: &str) -> u32 {
    if let Some(i) = want.prefer_regions.iter().position(|r| r == region) {
        return u32::try_from(i).unwrap_or(0);
    }
    let base = u32::try_from(want.prefer_regions.len()).unwrap_or(0);
    base.saturating_add(edge.config.rtt.get(&edge.config.region, region).saturating_add(1))
}

/// Chooses for `app` among machines whose TCP service has `want.port`. See the module docs.
pub(crate) fn choose(edge: &Edge, app: &AppRoutes, want: &Want<'_>) -> Choice {
    choose_for(edge, app, want, Protocol::Tcp)
}

/// Chooses for `app` among machines whose `proto` service has `want.port`.
pub(crate) fn choose_for(edge: &Edge, app: &AppRoutes, want: &Want<'_>, proto: Protocol) -> Choice {
    for _ in 0..8 {
        if let Some(choice) = try_choose(edge, app, want, proto) {
            return choice;
        }
        // Lost a race for the last unit of capacity: look again.
    }
    Choice::Full
}

fn try_choose(edge: &Edge, app: &AppRoutes, want: &Want<'_>, proto: Protocol) -> Option<Choice> {
    let loads = &edge.loads;
    let mut found_forced = want.force_instance.is_none();
    let mut at_hard = false;
    let mut routable: Vec<Candidate> = Vec::new();
    let mut backoff: Vec<Candidate> = Vec::new();
    let mut wakeable: Vec<(u32, Arc<MachineRoute>)> = Vec::new();
    for m in &app.machines {
        let id = m.entry.id.as_str();
        if let Some(f) = want.force_instance {
            if f != id {
                continue;
            }
            found_forced = true;
        }
        if want.exclude.iter().any(|e| e.as_str() == id) {
            continue;
        }
        if !want.regions.is_empty() && !want.regions.iter().any(|r| *r == m.entry.region) {
            continue;
        }
        let Some(service) = m.service_for(want.port, proto) else {
            continue;
        };
        if m.cordoned || m.ip.is_none() {
            continue;
        }
        let load = loads.machine(&m.entry.id);
        let started = m.is_started() || loads.recently_woken(&load, &m.entry);
        if !started {
            if m.is_wakeable() && service.autostart != Some(false) {
                wakeable.push((region_rank(edge, want, &m.entry.region), m.clone()));
            }
            continue;
        }
        // The edge's own check results where it has them, the catalog's until then.
        let checks = edge.health.verdict(m);
        if checks == ChecksVerdict::Critical {
            continue;
        }
        let (soft, hard) = limits(edge, service);
        let inflight = load.inflight();
        if inflight >= hard {
            at_hard = true;
            continue;
        }
        let preferred = want.prefer_instance == Some(id);
        // A machine a connect just failed to is kept apart: tried again only when nothing else
        // can take the request, so an app whose only machine refused answers why (PC01) instead
        // of "no healthy machine" for the whole backoff.
        let list = if loads.recently_failed(&load) {
            &mut backoff
        } else {
            &mut routable
        };
        list.push(Candidate {
            rank: (
                inflight >= soft,
                if preferred {
                    0
                } else {
                    region_rank(edge, want, &m.entry.region).saturating_add(1)
                },
                // Undecided checks (grace period) after decided ones.
                checks == ChecksVerdict::Undecided,
                inflight,
            ),
            route: m.clone(),
            load,
            soft,
            hard,
        });
    }
    if !found_forced {
        return Some(Choice::NotFound);
    }
    if routable.is_empty() && wakeable.is_empty() {
        routable = backoff;
    }
    let best_rank = routable.iter().map(|c| c.rank).min();
    let best = best_rank.and_then(|r| {
        let ties = routable.iter().filter(|c| c.rank == r);
        let pick = TIE.replace(TIE.get().wrapping_add(1)) % ties.clone().count().max(1);
        ties.clone().nth(pick)
    });
    let under_soft = best.is_some_and(|c| c.load.inflight() < c.soft);
    if !under_soft && let Some((_, m)) = wakeable.iter().min_by_key(|(rank, _)| *rank) {
        return Some(Choice::Wake(m.clone()));
    }
    if let Some(c) = best {
        let app_load = loads.app(&app.name);
        // Take the unit of load only if the hard limit still allows it (another request may
        // have taken the last one since we looked); else look again.
        let guard = loads.try_acquire(c.load.clone(), app_load, c.hard)?;
        return Some(Choice::Ready(c.route.clone(), guard));
    }
    Some(if at_hard {
        Choice::Full
    } else {
        Choice::NoneHealthy
    })
}
