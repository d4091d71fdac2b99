//! How machines look on a terminal: flyctl's `fly m list` table, `fly m status` details with the
//! event log, the leases table, and a line diff of configs for `update`.

use aloft_api::{LeaseEnvelope, Machine, MachineConfig, MachineEvent, rfc3339};

use crate::api::table;

/// The image as flyctl shows it: `repository:tag` of the resolved image, else the config's.
pub(crate) fn image(m: &Machine) -> String {
    match &m.image_ref {
        Some(r) if !r.repository.is_empty() => {
            if r.tag.is_empty() {
                r.repository.clone()
            } else {
                format!("{}:{}", r.repository, r.tag)
            }
        }
        _ => config(m).and_then(|c| c.image.clone()).unwrap_or_default(),
    }
}

fn config(m: &Machine) -> Option<&MachineConfig> {
    m.config.as_ref().or(m.incomplete_config.as_ref())
}

/// `shared-cpu-1x:256MB`-style size, from the guest.
pub(crate) fn size(m: &Machine) -> String {
    let Some(guest) = config(m).and_then(|c| c.guest.as_ref()) else {
        return String::new();
    };
    let kind = guest.cpu_kind.as_deref().unwrap_or("shared");
    let kind = if kind == "performance" {
        "performance"
    } else {
        "shared-cpu"
    };
    let cpus = guest.cpus.unwrap_or(1);
    match guest.memory_mb {
        Some(mb) => format!("{kind}-{cpus}x:{mb}MB"),
        None => format!("{kind}-{cpus}x"),
    }
}

/// The list table: ID, NAME, STATE, REGION, IMAGE, IP ADDRESS, VOLUME, CREATED, LAST UPDATED,
/// PROCESS GROUP, SIZE.
pub(crate) fn list_table(machines: &[Machine]) -> String {
    let rows: Vec<Vec<String>> = machines
        .iter()
        .map(|m| {
            let cfg = config(m);
            let volume = cfg
                .and_then(|c| c.mounts.first())
                .and_then(|mount| mount.volume.clone())
                .unwrap_or_default();
            let group = cfg
                .and_then(|c| c.metadata.get("fly_process_group"))
                .cloned()
                .unwrap_or_default();
            let mut state = m.state.to_string();
            if m.cordoned == Some(true) {
                state.push_str(" (cordoned)");
            }
            vec![
                m.id.to_string(),
                m.name.clone(),
                state,
                m.region.clone(),
                image(m),
                m.private_ip.clone(),
                volume,
                m.created_at.clone(),
                m.updated_at.clone(),
                group,
                size(m),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "NAME",
            "STATE",
            "REGION",
            "IMAGE",
            "IP ADDRESS",
            "VOLUME",
            "CREATED",
            "LAST UPDATED",
            "PROCESS GROUP",
            "SIZE",
        ],
        &rows,
    )
}

/// `fly m status`: the machine, its VM details and its event log.
pub(crate) fn status(m: &Machine) -> String {
    let cfg = config(m);
    let guest = cfg.and_then(|c| c.guest.as_ref());
    let init = cfg.and_then(|c| c.init.as_ref());
    let join = |v: Option<&Vec<String>>| v.map(|v| v.join(" ")).unwrap_or_default();
    let dash = |s: String| if s.is_empty() { "-".to_owned() } else { s };
    let fields: Vec<(&str, String)> = vec![
        ("ID", m.id.to_string()),
        ("Instance ID", m.instance_id.clone()),
        ("State", m.state.to_string()),
        ("Image", image(m)),
        ("Name", m.name.clone()),
        ("Private IP", m.private_ip.clone()),
        ("Region", m.region.clone()),
        (
            "Process Group",
            cfg.and_then(|c| c.metadata.get("fly_process_group"))
                .cloned()
                .unwrap_or_default(),
        ),
        (
            "CPU Kind",
            guest.and_then(|g| g.cpu_kind.clone()).unwrap_or_default(),
        ),
        (
            "vCPUs",
            guest
                .and_then(|g| g.cpus)
                .map(|c| c.to_string())
                .unwrap_or_default(),
        ),
        (
            "Memory",
            guest
                .and_then(|g| g.memory_mb)
                .map(|mb| mb.to_string())
                .unwrap_or_default(),
        ),
        ("Created", m.created_at.clone()),
        ("Updated", m.updated_at.clone()),
        ("Entrypoint", join(init.map(|i| &i.entrypoint))),
        ("Command", join(init.map(|i| &i.cmd))),
        (
            "Volume",
            cfg.and_then(|c| c.mounts.first())
                .and_then(|mount| mount.volume.clone())
                .unwrap_or_default(),
        ),
        ("Cordoned", m.cordoned.unwrap_or(false).to_string()),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!(
        "Machine ID: {}\nInstance ID: {}\nState: {}\n\nVM\n",
        m.id, m.instance_id, m.state
    );
    for (k, v) in fields {
        out.push_str(&format!("  {k:<width$} = {}\n", dash(v)));
    }
    out.push_str("\nEvent Logs\n");
    out.push_str(&events_table(&m.events));
    out
}

/// STATE, EVENT, SOURCE, TIMESTAMP, INFO (exit code, OOM, restarts), newest first as the API
/// gives them.
pub(crate) fn events_table(events: &[MachineEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let source = match e.source {
                Some(aloft_api::EventSource::User) => "user",
                Some(aloft_api::EventSource::Flyd) => "flyd",
                None => "",
            };
            vec![
                e.status.clone(),
                e.kind.clone(),
                source.to_owned(),
                rfc3339(e.timestamp),
                event_info(e),
            ]
        })
        .collect();
    table(&["STATE", "EVENT", "SOURCE", "TIMESTAMP", "INFO"], &rows)
}

fn event_info(e: &MachineEvent) -> String {
    let Some(request) = &e.request else {
        return String::new();
    };
    let mut parts = Vec::new();
    let exit = request
        .exit_event
        .as_ref()
        .or_else(|| request.monitor_event.as_ref().and_then(|m| m.exit_event.as_ref()));
    if let Some(exit) = exit {
        parts.push(format!("exit_code={}", exit.guest_exit_code.max(exit.exit_code)));
        if exit.guest_signal != 0 {
            parts.push(format!("signal={}", exit.guest_signal));
        }
        if exit.oom_killed {
            parts.push("oom_killed=true".to_owned());
        }
        if exit.requested_stop {
            parts.push("requested_stop=true".to_owned());
        }
    }
    if let Some(n) = request.restart_count.filter(|n| *n > 0) {
        parts.push(format!("restarts={n}"));
    }
    parts.join(",")
}

/// MACHINE ID, OWNER, EXPIRES AT, DESCRIPTION, NONCE; machines without a lease are left out.
pub(crate) fn leases_table(leases: &[(String, LeaseEnvelope)]) -> String {
    let rows: Vec<Vec<String>> = leases
        .iter()
        .map(|(id, l)| {
            vec![
                id.clone(),
                l.data.owner.clone(),
                rfc3339(l.data.expires_at.saturating_mul(1000)),
                l.data.description.clone(),
                l.data.nonce.clone(),
            ]
        })
        .collect();
    table(
        &["MACHINE ID", "OWNER", "EXPIRES AT", "DESCRIPTION", "NONCE"],
        &rows,
    )
}

/// A unified line diff of two configs as pretty JSON (`-` old, `+` new, two lines of context);
/// empty when they are the same.
pub(crate) fn config_diff(old: &MachineConfig, new: &MachineConfig) -> String {
    let pretty = |c: &MachineConfig| serde_json::to_string_pretty(c).unwrap_or_default();
    let (a, b) = (pretty(old), pretty(new));
    let a: Vec<&str> = a.lines().collect();
    let b: Vec<&str> = b.lines().collect();
    // Longest common subsequence table (configs are small).
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let mut ops: Vec<(char, &str)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            ops.push((' ', a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            // Old lines go out before new ones come in.
            ops.push(('-', a[i]));
            i += 1;
        } else {
            ops.push(('+', b[j]));
            j += 1;
        }
    }
    const CONTEXT: usize = 2;
    let changed: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| *op != ' ')
        .map(|(n, _)| n)
        .collect();
    let mut out = String::new();
    let mut last_shown: Option<usize> = None;
    for (n, (op, line)) in ops.iter().enumerate() {
        let near = changed.iter().any(|c| n + CONTEXT >= *c && n <= c + CONTEXT);
        if !near {
            continue;
        }
        if last_shown.is_some_and(|l| n > l + 1) {
            out.push_str("  ...\n");
        }
        out.push_str(&format!("{op} {line}\n"));
        last_shown = Some(n);
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn machine() -> Machine {
        serde_json::from_value(json!({
            "id": "3d8d413b29d089",
            "name": "web-1",
            "state": "started",
            "region": "local",
            "instance_id": "01HBZ8QEXHS0YR4R1N6S1XGEE2",
            "private_ip": "fdaa:0:1::2",
            "created_at": "2026-12-02T07:00:00Z",
            "updated_at": "2026-12-02T07:00:01Z",
            "config": {
                "image": "127.0.0.1:5000/busybox:latest",
                "guest": {"cpu_kind": "shared", "cpus": 1, "memory_mb": 256},
                "init": {"cmd": ["sleep", "inf"]},
                "metadata": {"fly_process_group": "app"}
            },
            "events": [
                {"id": "01J2", "type": "exit", "status": "stopped", "source": "flyd", "timestamp": 1_796_194_801_000i64,
                 "request": {"exit_event": {"exit_code": 0, "guest_exit_code": 3, "oom_killed": true}, "restart_count": 2}},
                {"id": "01J1", "type": "start", "status": "started", "source": "user", "timestamp": 1_796_194_800_000i64}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn the_list_table_has_flyctls_columns() {
        let mut cordoned = machine();
        cordoned.cordoned = Some(true);
        cordoned.config.as_mut().unwrap().metadata.clear();
        let out = list_table(&[machine(), cordoned]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "ID               NAME    STATE                REGION   IMAGE                           IP ADDRESS    VOLUME   CREATED                LAST UPDATED           PROCESS GROUP   SIZE"
        );
        assert_eq!(
            lines[1],
            "3d8d413b29d089   web-1   started              local    127.0.0.1:5000/busybox:latest   fdaa:0:1::2   -        2026-12-02T07:00:00Z   2026-12-02T07:00:01Z   app             shared-cpu-1x:256MB"
        );
        assert!(lines[2].contains(" started (cordoned) "), "{out}");
        assert!(
            lines[2].contains("   -               shared-cpu-1x:256MB"),
            "{out}"
        );
    }

    #[test]
    fn the_image_prefers_the_resolved_reference() {
        let mut m = machine();
        m.image_ref = Some(aloft_api::ImageRef {
            repository: "library/busybox".into(),
            tag: "1.36".into(),
            ..Default::default()
        });
        assert_eq!(image(&m), "library/busybox:1.36");
    }

    #[test]
    fn status_shows_details_and_events() {
        let out = status(&machine());
        assert!(
            out.starts_with(
                "Machine ID: 3d8d413b29d089\nInstance ID: 01HBZ8QEXHS0YR4R1N6S1XGEE2\nState: started\n\nVM\n"
            ),
            "{out}"
        );
        assert!(out.contains("\n  Command       = sleep inf\n"), "{out}");
        assert!(out.contains("\n  Entrypoint    = -\n"), "{out}");
        assert!(out.contains("\n  Memory        = 256\n"), "{out}");
        let events = out.split("Event Logs\n").nth(1).unwrap();
        let lines: Vec<&str> = events.lines().collect();
        assert_eq!(lines[0], "STATE     EVENT   SOURCE   TIMESTAMP              INFO");
        assert_eq!(
            lines[1],
            "stopped   exit    flyd     2026-12-02T07:00:01Z   exit_code=3,oom_killed=true,restarts=2"
        );
        assert_eq!(lines[2], "started   start   user     2026-12-02T07:00:00Z   -");
    }

    #[test]
    fn config_diffs_show_changed_lines_with_context() {
        let old = machine().config.unwrap();
        let mut new = old.clone();
        assert_eq!(config_diff(&old, &new), "");
        new.image = Some("127.0.0.1:5000/busybox:2".into());
        new.env.insert("A".into(), "1".into());
        let diff = config_diff(&old, &new);
        assert!(diff.contains("-   \"image\": \"127.0.0.1:5000/busybox:latest\",\n+   \"image\": \"127.0.0.1:5000/busybox:2\",\n"), "{diff}");
        assert!(
            diff.contains("+   \"env\": {\n+     \"A\": \"1\"\n+   },\n"),
            "{diff}"
        );
        assert!(!diff.contains("\"sleep\""), "far from any change: {diff}");
        assert!(diff.contains("\n  ...\n"), "gaps are marked: {diff}");
    }

    #[test]
    fn leases_table() {
        let lease: LeaseEnvelope = serde_json::from_value(json!({
            "status": "success",
            "data": {"nonce": "abc", "expires_at": 1_796_194_800i64, "owner": "me", "description": "deploy", "version": "01H"}
        }))
        .unwrap();
        assert_eq!(
            super::leases_table(&[("3d8d413b29d089".into(), lease)]),
            "MACHINE ID       OWNER   EXPIRES AT             DESCRIPTION   NONCE\n\
             3d8d413b29d089   me      2026-12-02T07:00:00Z   deploy        abc\n"
        );
    }
}
