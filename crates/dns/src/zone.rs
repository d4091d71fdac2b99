//! The zone: machines, apps' organizations and organizations' networks, as the store has them,
//! and the answers to `.internal` names from them, seen from the asker's organization.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{PoisonError, RwLock, RwLockWriteGuard};

use aloft_api::{CatalogEntry, MachineId, MachineState};

use crate::TTL_SECS;
use crate::names::{self, Apex, Asked, Select};
use crate::wire::{Name, RData, Rcode, Reply, Soa, TYPE_AAAA, TYPE_ANY, TYPE_SOA, TYPE_TXT};

/// The `.internal` zone: what the service catalog, `/apps` and `/org-networks` say, kept in
/// step with the store by [`aloft_store::follow`] (or set directly), and answered from.
#[derive(Debug)]
pub struct Zone {
    /// This host's region (lowercase): `top<N>.nearest` names start there.
    region: String,
    view: RwLock<View>,
}

/// What the zone knows.
#[derive(Debug, Default)]
pub(crate) struct View {
    /// Apps by name: known from `/apps` (their organization) or the catalog (their machines).
    apps: HashMap<String, AppView>,
    /// Organizations' private network numbers, by slug.
    networks: HashMap<String, u32>,
    /// Changes with every change: the SOA's serial.
    serial: u32,
}

#[derive(Debug, Default)]
struct AppView {
    /// The organization's slug, from `/apps` (`None`: no record yet).
    org: Option<String>,
    /// Its machines that have a private address, by id.
    machines: BTreeMap<MachineId, Machine>,
}

#[derive(Debug)]
struct Machine {
    /// Lowercase.
    region: String,
    /// Lowercase, empty when none.
    process_group: String,
    started: bool,
    ip: Ipv6Addr,
}

/// Whose view a query gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asker {
    /// The host itself: every organization.
    Operator,
    /// A machine of the organization with this private network number.
    Network(u32),
}

impl Asker {
    fn of(source: IpAddr) -> Self {
        match source.to_canonical() {
            IpAddr::V6(ip) => match network(ip) {
                Some(n) if n != 0 => Self::Network(n),
                _ => Self::Operator,
            },
            IpAddr::V4(_) => Self::Operator,
        }
    }
}

/// The private network number of a 6PN address (`fdaa:<network 32 bits>:…`), `None` for any
/// other address.
fn network(ip: Ipv6Addr) -> Option<u32> {
    let s = ip.segments();
    (s[0] == 0xfdaa).then(|| u32::from(s[1]) << 16 | u32::from(s[2]))
}

impl Zone {
    /// An empty zone for a host in `region`.
    pub fn new(region: impl Into<String>) -> Self {
        Self {
            region: region.into().to_ascii_lowercase(),
            view: RwLock::default(),
        }
    }

    /// Adds or replaces a machine (as its catalog entry says). One without a private address is
    /// forgotten: it is never answered.
    pub fn upsert_machine(&self, entry: CatalogEntry) {
        self.update(|v| v.upsert_machine(entry));
    }

    /// Forgets a machine (destroyed).
    pub fn remove_machine(&self, app: &str, id: &MachineId) {
        self.update(|v| v.remove_machine(app, id));
    }

    /// Records an app's organization (`None`: the app is gone, or its record is).
    pub fn set_app_org(&self, app: &str, org_slug: Option<&str>) {
        self.update(|v| v.set_app_org(app, org_slug));
    }

    /// Records an organization's private network number (`None`: it has none any more).
    pub fn set_org_network(&self, slug: &str, network: Option<u32>) {
        self.update(|v| v.set_org_network(slug, network));
    }

    /// The answer to `name` of type `qtype` for a query from `source`, `None` if the name is
    /// not in one of our zones (`internal`, `flycast`): it is someone else's to answer.
    pub fn resolve(&self, source: IpAddr, name: &Name, qtype: u16) -> Option<Reply> {
        let asked = names::parse(name)?;
        let view = self.view.read().unwrap_or_else(PoisonError::into_inner);
        Some(view.answer(&self.region, Asker::of(source), asked, qtype))
    }

    /// Changes the view.
    pub(crate) fn update(&self, change: impl FnOnce(&mut View)) {
        let mut view = self.write();
        change(&mut view);
        view.serial = view.serial.wrapping_add(1);
    }

    /// Replaces the whole view.
    pub(crate) fn replace(&self, mut new: View) {
        let mut view = self.write();
        new.serial = view.serial.wrapping_add(1);
        *view = new;
    }

    fn write(&self) -> RwLockWriteGuard<'_, View> {
        self.view.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a name has, before the query's type is looked at.
enum Found {
    /// The name does not exist.
    NoName,
    /// The zone's apex: its SOA.
    Soa,
    /// Addresses (possibly none).
    Aaaa(Vec<Ipv6Addr>),
    /// Text.
    Txt(String),
    /// The name exists and has nothing.
    Empty,
}

impl View {
    pub(crate) fn upsert_machine(&mut self, entry: CatalogEntry) {
        let CatalogEntry {
            id,
            app,
            region,
            state,
            private_ip,
            process_group,
            ..
        } = entry;
        let Ok(ip) = private_ip.parse::<Ipv6Addr>() else {
            self.remove_machine(&app, &id);
            return;
        };
        let machine = Machine {
            region: region.to_ascii_lowercase(),
            process_group: process_group.to_ascii_lowercase(),
            started: state == MachineState::Started,
            ip,
        };
        self.apps.entry(app).or_default().machines.insert(id, machine);
    }

    pub(crate) fn remove_machine(&mut self, app: &str, id: &MachineId) {
        if let Some(a) = self.apps.get_mut(app) {
            a.machines.remove(id);
            self.forget_if_empty(app);
        }
    }

    pub(crate) fn set_app_org(&mut self, app: &str, org_slug: Option<&str>) {
        match org_slug {
            Some(slug) => self.apps.entry(app.to_owned()).or_default().org = Some(slug.to_owned()),
            None => {
                if let Some(a) = self.apps.get_mut(app) {
                    a.org = None;
                    self.forget_if_empty(app);
                }
            }
        }
    }

    pub(crate) fn set_org_network(&mut self, slug: &str, network: Option<u32>) {
        match network {
            Some(n) => self.networks.insert(slug.to_owned(), n),
            None => self.networks.remove(slug),
        };
    }

    fn forget_if_empty(&mut self, app: &str) {
        if self
            .apps
            .get(app)
            .is_some_and(|a| a.org.is_none() && a.machines.is_empty())
        {
            self.apps.remove(app);
        }
    }

    /// Whether `asker` may see `app`.
    fn visible(&self, app: &AppView, asker: Asker) -> bool {
        match asker {
            Asker::Operator => true,
            Asker::Network(n) => app.org.as_ref().and_then(|o| self.networks.get(o)) == Some(&n),
        }
    }

    /// The app if `asker` may see it.
    fn app(&self, name: &str, asker: Asker) -> Option<&AppView> {
        self.apps.get(name).filter(|a| self.visible(a, asker))
    }

    /// The apps `asker` may see, by name.
    fn apps_of(&self, asker: Asker) -> BTreeMap<&str, &AppView> {
        self.apps
            .iter()
            .filter(|(_, a)| self.visible(a, asker))
            .map(|(name, a)| (name.as_str(), a))
            .collect()
    }

    fn answer(&self, region: &str, asker: Asker, asked: Asked, qtype: u16) -> Reply {
        let apex = match &asked {
            Asked::Apex(apex) | Asked::Nothing(apex) => *apex,
            _ => Apex::Internal,
        };
        let found = self.find(region, asker, asked);
        let answers = match (found, qtype) {
            (Found::NoName, _) => return self.negative(apex, Rcode::NxDomain),
            (Found::Soa, TYPE_SOA | TYPE_ANY) => vec![RData::Soa(self.soa(apex))],
            (Found::Aaaa(ips), TYPE_AAAA | TYPE_ANY) => ips.into_iter().map(RData::Aaaa).collect(),
            (Found::Txt(text), TYPE_TXT | TYPE_ANY) => vec![RData::Txt(text.into_bytes())],
            _ => Vec::new(),
        };
        if answers.is_empty() {
            return self.negative(apex, Rcode::NoError);
        }
        Reply {
            rcode: Rcode::NoError,
            authoritative: true,
            answers,
            soa: None,
            ttl: TTL_SECS,
        }
    }

    fn find(&self, region: &str, asker: Asker, asked: Asked) -> Found {
        // Machines the asker may be given: only its own network's, whatever the app says.
        let reachable = |m: &&Machine| match asker {
            Asker::Operator => true,
            Asker::Network(n) => network(m.ip) == Some(n),
        };
        let machines = |app: &str, all: bool| -> Option<Vec<(&MachineId, &Machine)>> {
            let app = self.app(app, asker)?;
            Some(
                app.machines
                    .iter()
                    .filter(|(_, m)| reachable(m) && (all || m.started))
                    .collect(),
            )
        };
        match asked {
            Asked::Apex(_) => Found::Soa,
            Asked::Nothing(_) => Found::NoName,
            Asked::Peers => Found::Empty,
            Asked::Machines { app, select } => {
                let Some(mut ms) = machines(&app, false) else {
                    return Found::NoName;
                };
                match &select {
                    Select::All | Select::Nearest(_) => {}
                    Select::Region(r) => ms.retain(|(_, m)| m.region == *r),
                    Select::Machine(id) => ms.retain(|(i, _)| i.as_str() == id),
                    Select::ProcessGroup(g) => ms.retain(|(_, m)| m.process_group == *g),
                }
                shuffle(&mut ms);
                if let Select::Nearest(n) = select {
                    // This region first, then the others by name; random within a region.
                    ms.sort_by_key(|&(_, m)| (m.region != region, m.region.as_str()));
                    ms.truncate(n);
                }
                Found::Aaaa(ms.into_iter().map(|(_, m)| m.ip).collect())
            }
            Asked::Vms { app, all } => match machines(&app, all) {
                None => Found::NoName,
                Some(ms) => text(ms.iter().map(|(id, m)| format!("{id} {}", m.region)), ","),
            },
            Asked::Regions { app, all } => match machines(&app, all) {
                None => Found::NoName,
                Some(ms) => {
                    let regions: BTreeSet<&str> = ms.iter().map(|(_, m)| m.region.as_str()).collect();
                    text(regions.into_iter().map(str::to_owned), ",")
                }
            },
            Asked::Apps => text(self.apps_of(asker).into_keys().map(str::to_owned), ","),
            Asked::Instances { all } => {
                let lines = self.apps_of(asker).into_iter().flat_map(|(name, app)| {
                    app.machines
                        .iter()
                        .filter(move |(_, m)| reachable(m) && (all || m.started))
                        .map(move |(id, m)| {
                            format!("instance={id},app={name},ip={},region={}", m.ip, m.region)
                        })
                });
                text(lines, ";")
            }
        }
    }

    /// A name that does not exist (`NXDOMAIN`) or has nothing of the type (`NOERROR`): the
    /// zone's SOA in the authority section, for negative caching.
    fn negative(&self, apex: Apex, rcode: Rcode) -> Reply {
        Reply {
            rcode,
            authoritative: true,
            answers: Vec::new(),
            soa: Some(self.soa(apex)),
            ttl: TTL_SECS,
        }
    }

    fn soa(&self, apex: Apex) -> Soa {
        let zone = apex.label();
        Soa {
            zone: our_name(zone),
            mname: our_name(&format!("ns.{zone}")),
            rname: our_name(&format!("hostmaster.{zone}")),
            serial: self.serial,
            refresh: 3600,
            retry: 600,
            expire: 86_400,
            minimum: TTL_SECS,
        }
    }
}

/// A name of our own: short constant labels, always valid.
fn our_name(text: &str) -> Name {
    Name::from_text(text).unwrap_or_else(|_| Name::root())
}

/// `items` joined by `sep` as a name's text; nothing (NODATA) if there are none.
fn text(items: impl Iterator<Item = String>, sep: &str) -> Found {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        Found::Empty
    } else {
        Found::Txt(items.join(sep))
    }
}

/// Shuffles `items` (Fisher–Yates, from one random seed): answers in a new order each time
/// spread askers over the machines. Left as is if the system has no randomness to give.
fn shuffle<T>(items: &mut [T]) {
    let Ok(mut state) = getrandom::u64() else {
        return;
    };
    for i in (1..items.len()).rev() {
        // SplitMix64.
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let bound = u64::try_from(i + 1).unwrap_or(u64::MAX);
        let j = usize::try_from(z % bound).unwrap_or(0);
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::collections::HashSet;

    use super::*;

    const ACME: u32 = 5;
    const RIVAL: u32 = 0x0001_0006;

    /// A machine of the acme organization (network 5).
    fn acme_ip(n: u16) -> String {
        format!("fdaa:0:5:a7b:7d:{n:x}:0:2")
    }

    fn entry(app: &str, id: &str, region: &str, state: MachineState, ip: &str) -> CatalogEntry {
        CatalogEntry {
            id: id.parse().unwrap(),
            app: app.to_owned(),
            host: "h1".to_owned(),
            region: region.to_owned(),
            state,
            version: "v1".to_owned(),
            private_ip: ip.to_owned(),
            services: Vec::new(),
            checks: Vec::new(),
            suspendable: false,
            process_group: "app".to_owned(),
            primary_region: String::new(),
            updated_at: 0,
        }
    }

    fn id(n: u8) -> String {
        format!("{n:02x}00000000000a")
    }

    /// `web` (acme): 1 and 2 started in ams, 3 started in fra (process `worker`), 4 stopped in
    /// iad; `db` (acme): none; `rival` (org rival, network 0x10006): 7 started in ams; `orphan`
    /// (no /apps record): 8 started in ams.
    fn zone() -> Zone {
        let z = Zone::new("AMS");
        z.set_org_network("acme", Some(ACME));
        z.set_org_network("rival", Some(RIVAL));
        z.set_app_org("web", Some("acme"));
        z.set_app_org("db", Some("acme"));
        z.set_app_org("rival", Some("rival"));
        z.upsert_machine(entry("web", &id(1), "ams", MachineState::Started, &acme_ip(1)));
        z.upsert_machine(entry("web", &id(2), "ams", MachineState::Started, &acme_ip(2)));
        let mut worker = entry("web", &id(3), "fra", MachineState::Started, &acme_ip(3));
        worker.process_group = "Worker".to_owned();
        z.upsert_machine(worker);
        z.upsert_machine(entry("web", &id(4), "iad", MachineState::Stopped, &acme_ip(4)));
        z.upsert_machine(entry(
            "rival",
            &id(7),
            "ams",
            MachineState::Started,
            "fdaa:1:6:1::2",
        ));
        z.upsert_machine(entry(
            "orphan",
            &id(8),
            "ams",
            MachineState::Started,
            "fdaa:0:9:1::2",
        ));
        z
    }

    fn operator() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    fn acme() -> IpAddr {
        "fdaa:0:5:a7b:7d:1:0:2".parse().unwrap()
    }

    fn ask(z: &Zone, source: IpAddr, name: &str, qtype: u16) -> Reply {
        z.resolve(source, &Name::from_text(name).unwrap(), qtype).unwrap()
    }

    /// The sorted addresses of a positive `AAAA` answer.
    fn ips(reply: &Reply) -> Vec<String> {
        assert_eq!(reply.rcode, Rcode::NoError);
        let mut ips: Vec<String> = reply
            .answers
            .iter()
            .map(|a| match a {
                RData::Aaaa(ip) => ip.to_string(),
                other => panic!("not AAAA: {other:?}"),
            })
            .collect();
        ips.sort();
        ips
    }

    fn txt(reply: &Reply) -> String {
        assert_eq!(reply.rcode, Rcode::NoError);
        match reply.answers.as_slice() {
            [RData::Txt(t)] => String::from_utf8(t.clone()).unwrap(),
            other => panic!("not one TXT: {other:?}"),
        }
    }

    fn assert_nodata(reply: &Reply) {
        assert_eq!(
            (reply.rcode, reply.answers.len()),
            (Rcode::NoError, 0),
            "{reply:?}"
        );
        assert_negative(reply);
    }

    fn assert_nxdomain(reply: &Reply) {
        assert_eq!(
            (reply.rcode, reply.answers.len()),
            (Rcode::NxDomain, 0),
            "{reply:?}"
        );
        assert_negative(reply);
    }

    fn assert_negative(reply: &Reply) {
        let soa = reply.soa.as_ref().unwrap();
        assert_eq!(soa.minimum, TTL_SECS);
        assert!(reply.authoritative);
    }

    fn ip(n: u16) -> String {
        acme_ip(n).parse::<Ipv6Addr>().unwrap().to_string()
    }

    #[test]
    fn app_names_answer_started_machines_with_addresses() {
        let z = zone();
        for name in ["web.internal", "global.web.internal", "WEB.Internal."] {
            let reply = ask(&z, acme(), name, TYPE_AAAA);
            assert_eq!(ips(&reply), [ip(1), ip(2), ip(3)], "{name}");
            assert!(reply.authoritative && reply.soa.is_none());
            assert_eq!(reply.ttl, TTL_SECS);
        }
        assert_eq!(
            ips(&ask(&z, acme(), "ams.web.internal", TYPE_AAAA)),
            [ip(1), ip(2)]
        );
        assert_eq!(ips(&ask(&z, acme(), "FRA.web.internal", TYPE_AAAA)), [ip(3)]);
        let vm = format!("{}.vm.web.internal", id(2));
        assert_eq!(ips(&ask(&z, acme(), &vm, TYPE_AAAA)), [ip(2)]);
        assert_eq!(
            ips(&ask(&z, acme(), "worker.process.web.internal", TYPE_AAAA)),
            [ip(3)]
        );
        assert_eq!(
            ips(&ask(&z, acme(), "app.process.web.internal", TYPE_AAAA)),
            [ip(1), ip(2)]
        );
        // The stopped machine is never an address, and its region has none.
        assert_nodata(&ask(&z, acme(), "iad.web.internal", TYPE_AAAA));
        assert_nodata(&ask(&z, acme(), &format!("{}.vm.web.internal", id(4)), TYPE_AAAA));
        assert_nodata(&ask(&z, acme(), "syd.web.internal", TYPE_AAAA));
        assert_nodata(&ask(&z, acme(), "db.internal", TYPE_AAAA));
    }

    #[test]
    fn organizations_see_only_their_apps_and_networks() {
        let z = zone();
        // Another organization's app, an unknown app and an app without an /apps record do
        // not exist for acme, whatever is asked.
        for name in [
            "rival.internal",
            "vms.rival.internal",
            "nope.internal",
            "orphan.internal",
        ] {
            for qtype in [TYPE_AAAA, TYPE_TXT] {
                assert_nxdomain(&ask(&z, acme(), name, qtype));
            }
        }
        assert_eq!(txt(&ask(&z, acme(), "_apps.internal", TYPE_TXT)), "db,web");
        let rival: IpAddr = "fdaa:1:6:1::2".parse().unwrap();
        assert_eq!(txt(&ask(&z, rival, "_apps.internal", TYPE_TXT)), "rival");
        assert_nxdomain(&ask(&z, rival, "web.internal", TYPE_AAAA));
        // The host (IPv4, loopback, the platform's network 0) sees everything.
        for source in ["127.0.0.1", "::1", "fdaa::3", "10.1.2.3", "::ffff:10.0.0.1"] {
            let source = source.parse().unwrap();
            assert_eq!(
                txt(&ask(&z, source, "_apps.internal", TYPE_TXT)),
                "db,orphan,rival,web"
            );
            assert_eq!(
                ips(&ask(&z, source, "rival.internal", TYPE_AAAA)),
                ["fdaa:1:6:1::2"]
            );
            assert_eq!(
                ips(&ask(&z, source, "orphan.internal", TYPE_AAAA)),
                ["fdaa:0:9:1::2"]
            );
        }
        // A machine of web on another organization's network is never given to acme.
        z.upsert_machine(entry(
            "web",
            &id(9),
            "ams",
            MachineState::Started,
            "fdaa:1:6:2::2",
        ));
        assert_eq!(
            ips(&ask(&z, acme(), "ams.web.internal", TYPE_AAAA)),
            [ip(1), ip(2)]
        );
        assert_eq!(ips(&ask(&z, operator(), "ams.web.internal", TYPE_AAAA)).len(), 3);
        assert!(!txt(&ask(&z, acme(), "all._instances.internal", TYPE_TXT)).contains("fdaa:1:6"));
        // An organization that loses its network, or an app its record, disappears.
        z.set_org_network("rival", None);
        assert_nxdomain(&ask(&z, rival, "rival.internal", TYPE_AAAA));
        z.set_app_org("web", None);
        assert_nxdomain(&ask(&z, acme(), "web.internal", TYPE_AAAA));
        assert_eq!(txt(&ask(&z, acme(), "_apps.internal", TYPE_TXT)), "db");
        assert_eq!(ips(&ask(&z, operator(), "web.internal", TYPE_AAAA)).len(), 4);
    }

    #[test]
    fn txt_names_list_machines_and_regions_in_fly_formats() {
        let z = zone();
        let (i1, i2, i3, i4) = (id(1), id(2), id(3), id(4));
        assert_eq!(
            txt(&ask(&z, acme(), "vms.web.internal", TYPE_TXT)),
            format!("{i1} ams,{i2} ams,{i3} fra")
        );
        assert_eq!(
            txt(&ask(&z, acme(), "all.vms.web.internal", TYPE_TXT)),
            format!("{i1} ams,{i2} ams,{i3} fra,{i4} iad")
        );
        assert_eq!(txt(&ask(&z, acme(), "regions.web.internal", TYPE_TXT)), "ams,fra");
        assert_eq!(
            txt(&ask(&z, acme(), "all.regions.web.internal", TYPE_TXT)),
            "ams,fra,iad"
        );
        let inst =
            |n: u8, region: &str| format!("instance={},app=web,ip={},region={region}", id(n), ip(n.into()));
        assert_eq!(
            txt(&ask(&z, acme(), "_instances.internal", TYPE_TXT)),
            [inst(1, "ams"), inst(2, "ams"), inst(3, "fra")].join(";")
        );
        assert_eq!(
            txt(&ask(&z, acme(), "all._instances.internal", TYPE_TXT)),
            [inst(1, "ams"), inst(2, "ams"), inst(3, "fra"), inst(4, "iad")].join(";")
        );
        // The operator's instances span organizations, by app then machine.
        let all = txt(&ask(&z, operator(), "_instances.internal", TYPE_TXT));
        assert!(
            all.starts_with(&format!("instance={},app=orphan,", id(8))),
            "{all}"
        );
        assert_eq!(all.matches("instance=").count(), 5);
        // An app with nothing to list has no TXT.
        assert_nodata(&ask(&z, acme(), "vms.db.internal", TYPE_TXT));
        assert_nodata(&ask(&z, acme(), "all.regions.db.internal", TYPE_TXT));
        // Many machines: one record of the whole list (the codec splits it into strings).
        for n in 10..70 {
            z.upsert_machine(entry(
                "db",
                &id(n),
                "ams",
                MachineState::Started,
                &acme_ip(n.into()),
            ));
        }
        let vms = txt(&ask(&z, acme(), "vms.db.internal", TYPE_TXT));
        assert_eq!((vms.len(), vms.matches(',').count()), (60 * 18 + 59, 59));
    }

    #[test]
    fn the_wrong_type_is_nodata_and_any_gets_what_the_name_has() {
        let z = zone();
        for qtype in [crate::wire::TYPE_A, TYPE_TXT, 15, TYPE_SOA] {
            assert_nodata(&ask(&z, acme(), "web.internal", qtype));
        }
        for qtype in [TYPE_AAAA, crate::wire::TYPE_A] {
            assert_nodata(&ask(&z, acme(), "vms.web.internal", qtype));
            assert_nodata(&ask(&z, acme(), "_apps.internal", qtype));
        }
        assert_eq!(ips(&ask(&z, acme(), "web.internal", TYPE_ANY)).len(), 3);
        assert_eq!(txt(&ask(&z, acme(), "regions.web.internal", TYPE_ANY)), "ams,fra");
    }

    #[test]
    fn special_names() {
        let z = zone();
        // The apex has its SOA and nothing else.
        let soa = ask(&z, acme(), "internal", TYPE_SOA);
        match soa.answers.as_slice() {
            [RData::Soa(s)] => {
                assert_eq!(s.zone.to_string(), "internal.");
                assert_eq!(s.mname.to_string(), "ns.internal.");
                assert_eq!(s.minimum, TTL_SECS);
            }
            other => panic!("{other:?}"),
        }
        assert_nodata(&ask(&z, acme(), "internal", TYPE_AAAA));
        assert_nodata(&ask(&z, acme(), "_peer.internal", TYPE_TXT));
        for name in [
            "laptop._peer.internal",
            "v.k.kv._metadata.web.internal",
            "a.b.c.web.internal",
            "top0.nearest.of.web.internal",
        ] {
            assert_nxdomain(&ask(&z, acme(), name, TYPE_AAAA));
        }
        // Flycast names do not exist, and carry flycast's SOA.
        let flycast = ask(&z, acme(), "web.flycast", TYPE_AAAA);
        assert_nxdomain(&flycast);
        assert_eq!(flycast.soa.unwrap().zone.to_string(), "flycast.");
        // Other names are not ours.
        let other = Name::from_text("example.com").unwrap();
        assert_eq!(z.resolve(acme(), &other, TYPE_AAAA), None);
    }

    #[test]
    fn nearest_starts_in_this_region() {
        let z = zone();
        z.upsert_machine(entry("web", &id(5), "fra", MachineState::Started, &acme_ip(5)));
        z.upsert_machine(entry("web", &id(6), "bos", MachineState::Started, &acme_ip(6)));
        let near = |n: usize| -> Vec<String> {
            let reply = ask(&z, acme(), &format!("top{n}.nearest.of.web.internal"), TYPE_AAAA);
            reply.answers.iter().map(|a| format!("{a:?}")).collect()
        };
        let ams: HashSet<String> = [1, 2]
            .into_iter()
            .map(|n| format!("{:?}", RData::Aaaa(acme_ip(n).parse().unwrap())))
            .collect();
        for _ in 0..20 {
            assert!(ams.contains(&near(1)[0]));
            let three = near(3);
            assert_eq!(three[..2].iter().cloned().collect::<HashSet<_>>(), ams);
            // Then the other regions by name: bos before fra.
            assert_eq!(
                three[2],
                format!("{:?}", RData::Aaaa(acme_ip(6).parse().unwrap()))
            );
        }
        assert_eq!(near(99).len(), 5);
    }

    #[test]
    fn addresses_come_in_a_new_order_each_time() {
        let z = zone();
        for n in 10..16 {
            z.upsert_machine(entry(
                "web",
                &id(n),
                "ams",
                MachineState::Started,
                &acme_ip(n.into()),
            ));
        }
        let orders: HashSet<Vec<RData>> = (0..30)
            .map(|_| ask(&z, acme(), "web.internal", TYPE_AAAA).answers)
            .collect();
        // 9 addresses: 30 draws all alike would be a broken shuffle.
        assert!(orders.len() > 1);
    }

    #[test]
    fn machines_change_and_those_without_an_address_are_never_answered() {
        let z = zone();
        let id1: MachineId = id(1).parse().unwrap();
        z.remove_machine("web", &id1);
        assert_eq!(ips(&ask(&z, acme(), "ams.web.internal", TYPE_AAAA)), [ip(2)]);
        // Stopping takes a machine out of the addresses.
        z.upsert_machine(entry("web", &id(2), "ams", MachineState::Stopped, &acme_ip(2)));
        assert_nodata(&ask(&z, acme(), "ams.web.internal", TYPE_AAAA));
        // Losing its address takes it out of everything.
        z.upsert_machine(entry("web", &id(3), "fra", MachineState::Started, ""));
        assert_nodata(&ask(&z, acme(), "web.internal", TYPE_AAAA));
        let all = txt(&ask(&z, acme(), "all.vms.web.internal", TYPE_TXT));
        assert_eq!(all, format!("{} ams,{} iad", id(2), id(4)));
        // An app known only from the catalog is forgotten with its last machine.
        z.remove_machine("orphan", &id(8).parse().unwrap());
        assert!(!txt(&ask(&z, operator(), "_apps.internal", TYPE_TXT)).contains("orphan"));
    }

    #[test]
    fn the_serial_follows_changes() {
        let z = zone();
        let serial = |z: &Zone| ask(z, acme(), "nope.internal", TYPE_AAAA).soa.unwrap().serial;
        let before = serial(&z);
        z.set_org_network("x", Some(1));
        assert_eq!(serial(&z), before.wrapping_add(1));
    }
}
