//! Following the store: the routing table tracks the service catalog (`/catalog/…`), cordons
//! (`/machines/…`), apps' organizations (`/apps/…`) and custom domains (`/certs/…`) live. A
//! watcher that falls behind or loses the store re-reads everything and carries on; routing
//! goes on from the last good table meanwhile.

use std::sync::Arc;
use std::thread;

use aloft_api::{App, CatalogEntry, MachineId};
use aloft_store::{EventKind, Follower, KeyValue, MachineRecord, Store, keys};

use crate::RoutingTable;

/// The prefixes the edge follows; the catalog first, so a load resets the table before the
/// cordons, organizations and domains are applied to it.
const PREFIXES: &[&str] = &[keys::CATALOG, keys::MACHINES, keys::APPS, keys::CERTS];

/// Follows `store` into `table` on a thread of its own until `stop` returns true (checked at
/// least every second). The table is filled before this returns.
pub fn follow(
    store: Arc<dyn Store>,
    table: Arc<RoutingTable>,
    stop: Arc<dyn Fn() -> bool + Send + Sync>,
) -> std::io::Result<thread::JoinHandle<()>> {
    aloft_store::follow(store, PREFIXES, table, "edge-catalog", stop)
}

impl Follower for RoutingTable {
    fn load(&self, kvs: &[KeyValue]) {
        let (catalog, rest): (Vec<&KeyValue>, Vec<&KeyValue>) =
            kvs.iter().partition(|kv| kv.key.starts_with(keys::CATALOG));
        self.reset(
            catalog
                .iter()
                .filter_map(|kv| serde_json::from_slice::<CatalogEntry>(&kv.value).ok())
                .collect(),
        );
        for kv in rest {
            apply(self, EventKind::Put, kv);
        }
    }

    fn apply(&self, kind: EventKind, kv: &KeyValue) {
        apply(self, kind, kv);
    }
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
