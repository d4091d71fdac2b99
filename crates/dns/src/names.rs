//! The `.internal` name grammar (Fly's): what a name asks for, before looking at the zone.

use crate::wire::Name;

/// The zones this server answers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Apex {
    /// `internal`: the private network's names.
    Internal,
    /// `flycast`: Fly's private load-balanced addresses, which aloft has not (every name there
    /// does not exist, rather than being forwarded).
    Flycast,
}

impl Apex {
    /// The zone's name.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Flycast => "flycast",
        }
    }
}

/// Which started machines of an app an `AAAA` name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Select {
    /// `<app>.internal`, `global.<app>.internal`.
    All,
    /// `<region>.<app>.internal`.
    Region(String),
    /// `<machine_id>.vm.<app>.internal`.
    Machine(String),
    /// `<group>.process.<app>.internal`.
    ProcessGroup(String),
    /// `top<N>.nearest.of.<app>.internal`: the N closest.
    Nearest(usize),
}

/// What a name in one of our zones asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Asked {
    /// The zone's apex: only its SOA.
    Apex(Apex),
    /// A name that does not exist.
    Nothing(Apex),
    /// `AAAA`: machines of an app.
    Machines { app: String, select: Select },
    /// `TXT` `vms.<app>.internal` (`all.`: any state): `id region` pairs.
    Vms { app: String, all: bool },
    /// `TXT` `regions.<app>.internal` (`all.`: any state): region codes.
    Regions { app: String, all: bool },
    /// `TXT` `_apps.internal`: the asker's apps.
    Apps,
    /// `TXT` `_instances.internal` (`all.`: any state): the asker's machines.
    Instances { all: bool },
    /// `_peer.internal`: WireGuard peers, of which aloft has none (the name exists, empty).
    Peers,
}

/// What `name` asks for, `None` if it is not under `internal` or `flycast` (not ours: it is
/// forwarded). Case is ignored.
pub(crate) fn parse(name: &Name) -> Option<Asked> {
    let mut labels: Vec<&[u8]> = name.labels().collect();
    let apex = match labels.pop()? {
        l if l.eq_ignore_ascii_case(b"internal") => Apex::Internal,
        l if l.eq_ignore_ascii_case(b"flycast") => Apex::Flycast,
        _ => return None,
    };
    if apex == Apex::Flycast {
        return Some(Asked::Nothing(apex));
    }
    // Every label we look at is text; a name with anything else in it does not exist.
    let Some(labels) = labels
        .iter()
        .map(|l| std::str::from_utf8(l).ok().map(str::to_ascii_lowercase))
        .collect::<Option<Vec<String>>>()
    else {
        return Some(Asked::Nothing(apex));
    };
    Some(internal(labels).unwrap_or(Asked::Nothing(apex)))
}

/// What the labels before `internal` ask for, `None` if nothing.
fn internal(mut labels: Vec<String>) -> Option<Asked> {
    let Some(app) = labels.pop() else {
        return Some(Asked::Apex(Apex::Internal));
    };
    let rest: Vec<&str> = labels.iter().map(String::as_str).collect();
    match (app.as_str(), rest.as_slice()) {
        ("_apps", []) => Some(Asked::Apps),
        ("_instances", []) => Some(Asked::Instances { all: false }),
        ("_instances", ["all"]) => Some(Asked::Instances { all: true }),
        ("_peer", []) => Some(Asked::Peers),
        // No other name under these exists; nor any app's name starts with `_`.
        (special, _) if special.starts_with('_') => None,
        (_, []) | (_, ["global"]) => machines(app, Select::All),
        (_, ["vms"]) => Some(Asked::Vms { app, all: false }),
        (_, ["all", "vms"]) => Some(Asked::Vms { app, all: true }),
        (_, ["regions"]) => Some(Asked::Regions { app, all: false }),
        (_, ["all", "regions"]) => Some(Asked::Regions { app, all: true }),
        (_, [region]) => machines(app, Select::Region((*region).to_owned())),
        (_, [id, "vm"]) => machines(app, Select::Machine((*id).to_owned())),
        (_, [group, "process"]) => machines(app, Select::ProcessGroup((*group).to_owned())),
        (_, [top, "nearest", "of"]) => {
            let n = top.strip_prefix("top")?;
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let n: usize = n.parse().ok().filter(|&n| n >= 1)?;
            machines(app, Select::Nearest(n))
        }
        // `<value>.<key>.kv._metadata.<app>` is Fly's machine metadata look-up: the catalog
        // carries no metadata yet, so it does not exist, like every other name.
        _ => None,
    }
}

fn machines(app: String, select: Select) -> Option<Asked> {
    Some(Asked::Machines { app, select })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use super::*;

    fn asked(text: &str) -> Option<Asked> {
        parse(&Name::from_text(text).unwrap())
    }

    fn m(app: &str, select: Select) -> Option<Asked> {
        Some(Asked::Machines {
            app: app.to_owned(),
            select,
        })
    }

    #[test]
    fn machine_names() {
        assert_eq!(asked("web.internal"), m("web", Select::All));
        assert_eq!(asked("global.web.internal."), m("web", Select::All));
        assert_eq!(asked("ams.web.internal"), m("web", Select::Region("ams".into())));
        assert_eq!(
            asked("3d8d9014b32389.vm.web.internal"),
            m("web", Select::Machine("3d8d9014b32389".into()))
        );
        assert_eq!(
            asked("worker.process.web.internal"),
            m("web", Select::ProcessGroup("worker".into()))
        );
        assert_eq!(
            asked("top3.nearest.of.web.internal"),
            m("web", Select::Nearest(3))
        );
        assert_eq!(
            asked("top10.nearest.of.web.internal"),
            m("web", Select::Nearest(10))
        );
    }

    #[test]
    fn names_ignore_case() {
        assert_eq!(asked("AMS.Web.INTERNAL"), m("web", Select::Region("ams".into())));
        assert_eq!(
            asked("ALL.VMS.web.Internal"),
            Some(Asked::Vms {
                app: "web".into(),
                all: true
            })
        );
        assert_eq!(asked("_APPS.internal"), Some(Asked::Apps));
        assert_eq!(asked("x.FlyCast"), Some(Asked::Nothing(Apex::Flycast)));
    }

    #[test]
    fn txt_names() {
        let web = || "web".to_owned();
        assert_eq!(
            asked("vms.web.internal"),
            Some(Asked::Vms {
                app: web(),
                all: false
            })
        );
        assert_eq!(
            asked("all.vms.web.internal"),
            Some(Asked::Vms {
                app: web(),
                all: true
            })
        );
        assert_eq!(
            asked("regions.web.internal"),
            Some(Asked::Regions {
                app: web(),
                all: false
            })
        );
        assert_eq!(
            asked("all.regions.web.internal"),
            Some(Asked::Regions {
                app: web(),
                all: true
            })
        );
        assert_eq!(asked("_apps.internal"), Some(Asked::Apps));
        assert_eq!(
            asked("_instances.internal"),
            Some(Asked::Instances { all: false })
        );
        assert_eq!(
            asked("all._instances.internal"),
            Some(Asked::Instances { all: true })
        );
        assert_eq!(asked("_peer.internal"), Some(Asked::Peers));
    }

    #[test]
    fn everything_else_under_internal_does_not_exist() {
        let nothing = Some(Asked::Nothing(Apex::Internal));
        for name in [
            "laptop._peer.internal",
            "x._apps.internal",
            "some._instances.internal",
            "a.b.c.web.internal",
            "top0.nearest.of.web.internal",
            "top.nearest.of.web.internal",
            "top+1.nearest.of.web.internal",
            "topx.nearest.of.web.internal",
            "top99999999999999999999999.nearest.of.web.internal",
            "1.nearest.of.web.internal",
            "v.k.kv._metadata.web.internal",
            "x.vm.web.internal.extra.internal",
            "id.vms.web.internal",
            "ams._underscore.internal",
        ] {
            assert_eq!(asked(name), nothing, "{name}");
        }
        assert_eq!(asked("internal"), Some(Asked::Apex(Apex::Internal)));
        assert_eq!(asked("flycast"), Some(Asked::Nothing(Apex::Flycast)));
        assert_eq!(asked("web.flycast"), Some(Asked::Nothing(Apex::Flycast)));
        // A label that is not text.
        let mut wire = vec![1, 0xff];
        wire.extend_from_slice(b"\x08internal\x00");
        let mut q = vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(&wire);
        q.extend_from_slice(&[0, 28, 0, 1]);
        let name = crate::wire::parse_query(&q).unwrap().question.name;
        assert_eq!(parse(&name), nothing);
    }

    #[test]
    fn other_names_are_not_ours() {
        for name in [
            "example.com",
            "internal.example.com",
            ".",
            "com",
            "internal-x",
            "flycast.io",
        ] {
            assert_eq!(asked(name), None, "{name}");
        }
    }
}
