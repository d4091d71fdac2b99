//! Following the store: the routing table tracks the service catalog (`/catalog/…`), cordons
//! (`/machines/…`), apps' organizations (`/apps/…`) and custom domains (`/certs/…`) live. A
//! watcher that falls behind or loses the store re-reads everything and carries on; routing
//! goes on from the last good table meanwhile.

use std::sync::Arc;
use std::thread;
use std::time::Duration;

use aloft_api::{App, CatalogEntry, MachineId};
use aloft_store::{EventKind, KeyValue, MachineRecord, RangeOptions, Revision, Store, WatchError, keys};

use crate::RoutingTable;

/// Follows `store` into `table` on a thread of its own until `stop` returns true (checked at
/// least every second). The table is filled before this returns.
pub fn follow(
    store: Arc<dyn Store>,
    table: Arc<RoutingTable>,
    stop: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<thread::JoinHandle<()>> {
    let mut from = load_all(&*store, &table);
    thread::Builder::new()
        .name("edge-catalog".to_owned())
        .spawn(move || {
            while !stop() {
                let watch = match from {
                    Some(rev) => store.watch("/", Some(rev)),
                    None => {
                        thread::sleep(Duration::from_secs(1));
                        from = load_all(&*store, &table);
                        continue;
                    }
                };
                let mut watcher = match watch {
                    Ok(w) => w,
                    Err(e) => {
                        eprintln!("edge: cannot watch the store ({e}); re-reading it");
                        from = None;
                        continue;
                    }
                };
                loop {
                    if stop() {
                        return;
                    }
                    match watcher.recv_timeout(Duration::from_secs(1)) {
                        Ok(Some(batch)) => {
                            for ev in &batch.events {
                                apply(&table, ev.kind, &ev.kv);
                            }
                        }
                        Ok(None) => {}
                        Err(WatchError::Lagged { .. } | WatchError::Closed { .. }) => {
                            from = load_all(&*store, &table);
                            break;
                        }
                    }
                }
            }
        })
}

/// Reads every prefix the edge follows; the revision to watch from next.
fn load_all(store: &dyn Store, table: &RoutingTable) -> Option<Revision> {
    let read = |prefix: &str| store.range(prefix, &RangeOptions::default());
    let catalog = match read(keys::CATALOG) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edge: cannot read the service catalog: {e}");
            return None;
        }
    };
    let entries: Vec<CatalogEntry> = catalog
        .kvs
        .iter()
        .filter_map(|kv| serde_json::from_slice(&kv.value).ok())
        .collect();
    table.reset(entries);
    let mut rev = catalog.revision;
    for prefix in [keys::MACHINES, keys::APPS, keys::CERTS] {
        match read(prefix) {
            Ok(r) => {
                rev = rev.min(r.revision);
                for kv in &r.kvs {
                    apply(table, EventKind::Put, kv);
                }
            }
            Err(e) => {
                eprintln!("edge: cannot read {prefix}: {e}");
                return None;
            }
        }
    }
    Some(rev.next())
}

/// Applies one change of a followed key; others are ignored.
pub(crate) fn apply(table: &RoutingTable, kind: EventKind, kv: &KeyValue) {
    let key = kv.key.as_str();
    if let Some(rest) = key.strip_prefix(keys::CATALOG) {
        match kind {
            EventKind::Put => match serde_json::from_slice::<CatalogEntry>(&kv.value) {
                Ok(e) => table.upsert(e),
                Err(e) => eprintln!("edge: ignoring a malformed catalog entry at {key}: {e}"),
            },
            EventKind::Delete => {
                if let Some((app, id)) = rest.split_once('/')
                    && let Ok(id) = id.parse::<MachineId>()
                {
                    table.remove(app, &id);
                }
            }
        }
    } else if let Some(rest) = key.strip_prefix(keys::MACHINES) {
        let Some((app, id)) = rest.split_once('/') else {
            return;
        };
        let Ok(id) = id.parse::<MachineId>() else {
            return;
        };
        let cordoned = kind == EventKind::Put
            && serde_json::from_slice::<MachineRecord>(&kv.value).is_ok_and(|r| r.cordoned);
        table.set_cordoned(app, &id, cordoned);
    } else if let Some(app) = key.strip_prefix(keys::APPS) {
        if app.contains('/') {
            return;
        }
        let org = match kind {
            EventKind::Put => serde_json::from_slice::<App>(&kv.value)
                .ok()
                .map(|a| a.organization.slug),
            EventKind::Delete => None,
        };
        table.set_org(app, org);
    } else if let Some(host) = key.strip_prefix(keys::CERTS) {
        // Any certificate record names its hostname's app; the edge routes the name to it.
        let app = match kind {
            EventKind::Put => serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()
                .and_then(|v| v.get("app").and_then(|a| a.as_str()).map(str::to_owned)),
            EventKind::Delete => None,
        };
        table.set_domain(host, app.as_deref());
    }
}
