//! Keeping the zone in step with the store: [`Zone`] is an [`aloft_store::Follower`] of
//! [`PREFIXES`].

use aloft_api::{App, CatalogEntry, MachineId};
use aloft_store::{EventKind, Follower, KeyValue, keys};

use crate::Zone;
use crate::zone::View;

/// The store prefixes the zone follows: the service catalog, apps (for their organization) and
/// organizations' private network numbers. Give them to [`aloft_store::follow`] with the zone.
pub const PREFIXES: &[&str] = &[keys::CATALOG, keys::APPS, keys::ORG_NETWORKS];

impl Follower for Zone {
    fn load(&self, kvs: &[KeyValue]) {
        let mut view = View::default();
        for kv in kvs {
            apply(&mut view, EventKind::Put, kv);
        }
        self.replace(view);
    }

    fn apply(&self, kind: EventKind, kv: &KeyValue) {
        self.update(|view| apply(view, kind, kv));
    }
}

/// Applies one change of a followed key to `view`; other keys, and malformed ones (logged),
/// are ignored.
fn apply(view: &mut View, kind: EventKind, kv: &KeyValue) {
    let key = kv.key.as_str();
    if let Some(rest) = key.strip_prefix(keys::CATALOG) {
        let Some((app, id)) = rest.split_once('/') else {
            return;
        };
        match kind {
            EventKind::Put => match serde_json::from_slice::<CatalogEntry>(&kv.value) {
                Ok(e) if e.app == app && e.id.as_str() == id => view.upsert_machine(e),
                Ok(e) => eprintln!(
                    "dns: ignoring the catalog entry at {key}: it is for machine {} of app {}",
                    e.id, e.app
                ),
                Err(e) => eprintln!("dns: ignoring a malformed catalog entry at {key}: {e}"),
            },
            EventKind::Delete => {
                if let Ok(id) = id.parse::<MachineId>() {
                    view.remove_machine(app, &id);
                }
            }
        }
    } else if let Some(app) = key.strip_prefix(keys::APPS) {
        // `/apps/{app}/…` holds other records of the app.
        if app.is_empty() || app.contains('/') {
            return;
        }
        match kind {
            EventKind::Put => match serde_json::from_slice::<App>(&kv.value) {
                Ok(a) => view.set_app_org(app, Some(&a.organization.slug)),
                Err(e) => eprintln!("dns: ignoring a malformed app record at {key}: {e}"),
            },
            EventKind::Delete => view.set_app_org(app, None),
        }
    } else if let Some(slug) = key.strip_prefix(keys::ORG_NETWORKS) {
        if slug.is_empty() {
            return;
        }
        match kind {
            EventKind::Put => match std::str::from_utf8(&kv.value).map(|v| v.trim().parse::<u32>()) {
                Ok(Ok(n)) => view.set_org_network(slug, Some(n)),
                _ => eprintln!(
                    "dns: ignoring a malformed network number at {key}: {:?}",
                    String::from_utf8_lossy(&kv.value)
                ),
            },
            EventKind::Delete => view.set_org_network(slug, None),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests: a failed step fails the test")]

    use std::net::IpAddr;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use aloft_api::{AppOrganizationInfo, MachineState};
    use aloft_store::{SqliteStore, Store};

    use super::*;
    use crate::wire::{Name, RData, Rcode, TYPE_AAAA, TYPE_TXT};

    const WEB1: &str = "3d8d9014b32389";
    const WEB2: &str = "e784079b449483";

    fn app(name: &str, org: &str) -> Vec<u8> {
        serde_json::to_vec(&App {
            name: name.to_owned(),
            organization: AppOrganizationInfo {
                slug: org.to_owned(),
                ..AppOrganizationInfo::default()
            },
            ..App::default()
        })
        .unwrap()
    }

    fn machine(app: &str, id: &str, ip: &str) -> Vec<u8> {
        serde_json::to_vec(&CatalogEntry {
            id: id.parse().unwrap(),
            app: app.to_owned(),
            host: "h1".to_owned(),
            region: "ams".to_owned(),
            state: MachineState::Started,
            version: "v1".to_owned(),
            private_ip: ip.to_owned(),
            services: Vec::new(),
            checks: Vec::new(),
            suspendable: false,
            process_group: String::new(),
            primary_region: String::new(),
            updated_at: 0,
        })
        .unwrap()
    }

    /// What `name` answers to a machine of network 5: its rcode and the records' data.
    fn ask(zone: &Zone, name: &str, qtype: u16) -> (Rcode, Vec<RData>) {
        let source: IpAddr = "fdaa:0:5:1::2".parse().unwrap();
        let reply = zone
            .resolve(source, &Name::from_text(name).unwrap(), qtype)
            .unwrap();
        (reply.rcode, reply.answers)
    }

    fn wait_for(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "the zone did not follow the store");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_zone_follows_the_catalog_apps_and_org_networks() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(dir.path().join("s.db")).unwrap());
        store.put("/apps/web", app("web", "acme")).unwrap();
        store.put("/org-networks/acme", b"5".to_vec()).unwrap();
        store
            .put(
                &format!("/catalog/web/{WEB1}"),
                machine("web", WEB1, "fdaa:0:5:1::2"),
            )
            .unwrap();
        // Ignored: another record under the app, a malformed entry, an entry at the wrong key.
        store.put("/apps/web/secrets", b"{}".to_vec()).unwrap();
        store
            .put("/catalog/web/aaaaaaaaaaaaaa", b"not json".to_vec())
            .unwrap();
        store
            .put(
                &format!("/catalog/db/{WEB2}"),
                machine("web", WEB2, "fdaa:0:5:1::3"),
            )
            .unwrap();

        let zone = Arc::new(Zone::new("ams"));
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stopped);
        let handle = aloft_store::follow(
            Arc::clone(&store),
            PREFIXES,
            Arc::clone(&zone) as Arc<dyn Follower>,
            "dns-test-follow",
            Arc::new(move || flag.load(Ordering::Relaxed)),
        )
        .unwrap();
        // Loaded when `follow` returns.
        let web1 = RData::Aaaa("fdaa:0:5:1::2".parse().unwrap());
        assert_eq!(
            ask(&zone, "web.internal", TYPE_AAAA),
            (Rcode::NoError, vec![web1.clone()])
        );
        assert_eq!(ask(&zone, "db.internal", TYPE_AAAA).0, Rcode::NxDomain);

        // A new machine appears; a destroyed one goes.
        store
            .put(
                &format!("/catalog/web/{WEB2}"),
                machine("web", WEB2, "fdaa:0:5:1::3"),
            )
            .unwrap();
        wait_for(|| ask(&zone, "web.internal", TYPE_AAAA).1.len() == 2);
        store.delete(&format!("/catalog/web/{WEB1}")).unwrap();
        let web2 = RData::Aaaa("fdaa:0:5:1::3".parse().unwrap());
        wait_for(|| ask(&zone, "web.internal", TYPE_AAAA).1 == [web2.clone()]);
        // A malformed network number is ignored (the old one stays) …
        store.put("/org-networks/acme", b"five".to_vec()).unwrap();
        store.put("/apps/db", app("db", "acme")).unwrap();
        wait_for(|| ask(&zone, "_apps.internal", TYPE_TXT).1 == [RData::Txt(b"db,web".to_vec())]);
        // … and the organization's network moving makes its apps vanish for network 5.
        store.put("/org-networks/acme", b"6".to_vec()).unwrap();
        wait_for(|| ask(&zone, "web.internal", TYPE_AAAA).0 == Rcode::NxDomain);
        store.put("/org-networks/acme", b"5".to_vec()).unwrap();
        wait_for(|| ask(&zone, "web.internal", TYPE_AAAA).0 == Rcode::NoError);
        store.delete("/apps/web").unwrap();
        wait_for(|| ask(&zone, "web.internal", TYPE_AAAA).0 == Rcode::NxDomain);

        // Loading again replaces everything.
        zone.load(&[]);
        assert_eq!(ask(&zone, "db.internal", TYPE_AAAA).0, Rcode::NxDomain);
        stopped.store(true, Ordering::Relaxed);
        handle.join().unwrap();
    }
}
