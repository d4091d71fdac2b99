//! The key layout of the control plane. Every key starts with `/`; a record's key ends in its
//! id, so a prefix ending in `/` lists a collection.
//!
//! | prefix | record |
//! |---|---|
//! | `/apps/{app}` | `aloft_api::App` |
//! | `/machines/{app}/{machine_id}` | [`crate::MachineRecord`] |
//! | `/events/{app}/{machine_id}/{event_id}` | `aloft_api::MachineEvent` (ULIDs sort by time) |
//! | `/machine-leases/{app}/{machine_id}` | `aloft_api::Lease`, attached to a store lease |
//! | `/tokens/{token_id}` | [`crate::TokenRecord`] |
//! | `/org-networks/{org_slug}` | the organization's private network number (decimal) |
//! | `/org-networks-next` | the next unallocated network number (decimal) |
//! | `/secrets/{app}` | the app's secrets version ([`crate::SecretsVersion`]) |
//! | `/secrets/{app}/{name}` | [`crate::SecretRecord`]: one secret, sealed (never plaintext) |
//! | `/releases/…` | reserved for its future owner |
//! | `/catalog/{app}/{machine_id}` | `aloft_api::CatalogEntry`, published by the machine's agent |
//! | `/certs/{hostname}` | a TLS certificate of the edge (owned by `aloft-proxy`'s certificate store) |
//! | `/cert-claims/{hostname}` | [`crate::CertClaim`]: the edge issuing that certificate now, on a store lease |
//! | `/volumes/{app}/{volume_id}` | [`crate::VolumeRecord`]: a volume and the host holding its disk |
//! | `/volume-snapshots/{app}/{snapshot_id}` | [`crate::SnapshotRecord`]: a volume snapshot and the host holding its copy (kept after its volume is destroyed) |

use crate::StoreError;

/// Apps.
pub const APPS: &str = "/apps/";
/// Machines, by app.
pub const MACHINES: &str = "/machines/";
/// Machine events, by app and machine.
pub const EVENTS: &str = "/events/";
/// Machine leases, by app and machine.
pub const MACHINE_LEASES: &str = "/machine-leases/";
/// API tokens.
pub const TOKENS: &str = "/tokens/";
/// Organizations' private network numbers, by slug.
pub const ORG_NETWORKS: &str = "/org-networks/";
/// The next organization network number to hand out.
pub const ORG_NETWORKS_NEXT: &str = "/org-networks-next";
/// Reserved: releases.
pub const RELEASES: &str = "/releases/";
/// The service catalog: one `aloft_api::CatalogEntry` per machine, by app.
pub const CATALOG: &str = "/catalog/";
/// The edge's TLS certificates, by hostname.
pub const CERTS: &str = "/certs/";
/// Claims on issuing the edge's certificates, by hostname (one edge issues a hostname at a time).
pub const CERT_CLAIMS: &str = "/cert-claims/";
/// App secrets (sealed) and each app's secrets version.
pub const SECRETS: &str = "/secrets/";
/// Volumes, by app.
pub const VOLUMES: &str = "/volumes/";
/// Volume snapshots, by app (not under [`VOLUMES`]: a snapshot outlives its volume, and an app's
/// volume listing must not read its snapshots).
pub const VOLUME_SNAPSHOTS: &str = "/volume-snapshots/";

/// Checks one path segment of a key: non-empty, no `/`, no control characters, at most 200 bytes.
pub fn segment(s: &str) -> Result<&str, StoreError> {
    let reason = if s.is_empty() {
        "a key segment is empty"
    } else if s.contains('/') {
        "a key segment contains '/'"
    } else if s.len() > 200 {
        "a key segment is longer than 200 bytes"
    } else if s.chars().any(char::is_control) {
        "a key segment contains a control character"
    } else {
        return Ok(s);
    };
    Err(StoreError::InvalidKey {
        key: s.to_owned(),
        reason,
    })
}

/// `/apps/{app}`.
pub fn app(app: &str) -> Result<String, StoreError> {
    Ok(format!("{APPS}{}", segment(app)?))
}

/// `/machines/{app}/`.
pub fn machines(app: &str) -> Result<String, StoreError> {
    Ok(format!("{MACHINES}{}/", segment(app)?))
}

/// `/volumes/{app}/`.
pub fn volumes(app: &str) -> Result<String, StoreError> {
    Ok(format!("{VOLUMES}{}/", segment(app)?))
}

/// `/volumes/{app}/{id}`.
pub fn volume(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{}{}", volumes(app)?, segment(id)?))
}

/// `/volume-snapshots/{app}/`.
pub fn volume_snapshots(app: &str) -> Result<String, StoreError> {
    Ok(format!("{VOLUME_SNAPSHOTS}{}/", segment(app)?))
}

/// `/volume-snapshots/{app}/{id}`.
pub fn volume_snapshot(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{}{}", volume_snapshots(app)?, segment(id)?))
}

/// `/machines/{app}/{id}`.
pub fn machine(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{}{}", machines(app)?, segment(id)?))
}

/// `/events/{app}/{id}/`.
pub fn events(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{EVENTS}{}/{}/", segment(app)?, segment(id)?))
}

/// `/events/{app}/{id}/{event_id}`.
pub fn event(app: &str, id: &str, event_id: &str) -> Result<String, StoreError> {
    Ok(format!("{}{}", events(app, id)?, segment(event_id)?))
}

/// `/machine-leases/{app}/{id}`.
pub fn machine_lease(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{MACHINE_LEASES}{}/{}", segment(app)?, segment(id)?))
}

/// `/org-networks/{slug}`.
pub fn org_network(slug: &str) -> Result<String, StoreError> {
    Ok(format!("{ORG_NETWORKS}{}", segment(slug)?))
}

/// `/secrets/{app}`: the app's secrets version.
pub fn secrets_version(app: &str) -> Result<String, StoreError> {
    Ok(format!("{SECRETS}{}", segment(app)?))
}

/// `/secrets/{app}/`: the app's secrets.
pub fn secrets(app: &str) -> Result<String, StoreError> {
    Ok(format!("{}/", secrets_version(app)?))
}

/// `/secrets/{app}/{name}`.
pub fn secret(app: &str, name: &str) -> Result<String, StoreError> {
    Ok(format!("{}{}", secrets(app)?, segment(name)?))
}

/// `/tokens/{id}`.
pub fn token(id: &str) -> Result<String, StoreError> {
    Ok(format!("{TOKENS}{}", segment(id)?))
}

/// `/catalog/{app}/{machine_id}`.
pub fn catalog_entry(app: &str, id: &str) -> Result<String, StoreError> {
    Ok(format!("{CATALOG}{}/{}", segment(app)?, segment(id)?))
}

/// `/certs/{hostname}`: the hostname's certificate record (give it lowercase).
pub fn cert(hostname: &str) -> Result<String, StoreError> {
    Ok(format!("{CERTS}{}", segment(hostname)?))
}

/// `/cert-claims/{hostname}`: the claim on issuing the hostname's certificate (give it lowercase).
pub fn cert_claim(hostname: &str) -> Result<String, StoreError> {
    Ok(format!("{CERT_CLAIMS}{}", segment(hostname)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(
            machine("web", "3d8d413b29d089").unwrap(),
            "/machines/web/3d8d413b29d089"
        );
        assert_eq!(event("web", "m", "01H").unwrap(), "/events/web/m/01H");
        assert_eq!(machine_lease("web", "m").unwrap(), "/machine-leases/web/m");
        assert!(machine("web", "../x").is_err());
        assert!(app("").is_err());
        assert!(token("a\nb").is_err());
        assert_eq!(secret("web", "DB").unwrap(), "/secrets/web/DB");
        assert_eq!(secrets_version("web").unwrap(), "/secrets/web");
        assert_eq!(
            volume_snapshot("web", "vs_1").unwrap(),
            "/volume-snapshots/web/vs_1"
        );
        // Outside the app's volumes: listing volumes never reads snapshots.
        assert!(
            !volume_snapshot("web", "vs_1")
                .unwrap()
                .starts_with(&volumes("web").unwrap())
        );
        assert_eq!(cert("www.example.com").unwrap(), "/certs/www.example.com");
        assert_eq!(
            cert_claim("www.example.com").unwrap(),
            "/cert-claims/www.example.com"
        );
        // A claim is outside the prefix the edge watches for records.
        assert!(!cert_claim("a.example").unwrap().starts_with(CERTS));
        assert!(
            !secret("webby", "DB")
                .unwrap()
                .starts_with(&secrets("web").unwrap())
        );
        // An app's collection prefix does not select another app whose name extends it.
        assert!(
            !machine("webby", "m")
                .unwrap()
                .starts_with(&machines("web").unwrap())
        );
    }
}
