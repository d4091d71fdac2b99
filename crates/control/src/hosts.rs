//! The hosts whose agents run machines, as the control plane reaches them, and placement: which
//! host a new machine goes to.
//!
//! Every call into a host blocks (an in-process agent, or later a remote one), so handlers make
//! them on the blocking pool like store calls.

use std::fmt;
use std::sync::Arc;

use aloft_api::{ApiError, MachineHost};

/// One host: its name (what placement records store), its region and its agent.
#[derive(Clone)]
pub struct HostHandle {
    /// The host's name, unique in the cluster.
    pub name: String,
    /// Its region.
    pub region: String,
    /// Its agent.
    pub agent: Arc<dyn MachineHost>,
}

impl fmt::Debug for HostHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostHandle")
            .field("name", &self.name)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The hosts the control plane knows.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hosts {
    hosts: Vec<HostHandle>,
}

impl Hosts {
    pub(crate) fn new(hosts: Vec<HostHandle>) -> Self {
        Self { hosts }
    }

    pub(crate) fn all(&self) -> &[HostHandle] {
        &self.hosts
    }

    /// The host named `name` (a placement record's); 503 if the control plane does not know it.
    pub(crate) fn get(&self, name: &str) -> Result<&HostHandle, ApiError> {
        self.hosts.iter().find(|h| h.name == name).ok_or_else(|| {
            ApiError::new(
                503,
                format!("the machine's host {name:?} is not known to this server; it may be offline"),
            )
        })
    }

    /// Where a new machine goes: a host in `region` if one is asked for, else the first host
    /// (the server's own region comes first). 422 `insufficient_capacity` when no host serves the
    /// region, naming the regions there are.
    pub(crate) fn place(&self, region: Option<&str>) -> Result<&HostHandle, ApiError> {
        let found = match region {
            Some(r) => self.hosts.iter().find(|h| h.region == r),
            None => self.hosts.first(),
        };
        found.ok_or_else(|| {
            let mut regions: Vec<&str> = self.hosts.iter().map(|h| h.region.as_str()).collect();
            regions.sort_unstable();
            regions.dedup();
            if regions.is_empty() {
                ApiError::new(
                    503,
                    "this server runs no machines (no agent role): start aloftd with its agent",
                )
            } else {
                ApiError::insufficient_capacity(format!(
                    "no host in region {:?}: choose one of {}",
                    region.unwrap_or_default(),
                    regions.join(", ")
                ))
            }
        })
    }
}

/// `GET /v1/platform/regions` → `{nearest, regions}`: the regions that have a host; the nearest is
/// this server's.
pub(crate) async fn regions(
    axum::extract::State(state): axum::extract::State<crate::ApiState>,
) -> axum::Json<aloft_api::RegionsResponse> {
    let mut codes: Vec<String> = state.hosts().all().iter().map(|h| h.region.clone()).collect();
    codes.sort_unstable();
    codes.dedup();
    axum::Json(aloft_api::RegionsResponse {
        nearest: state.config().region.clone(),
        regions: codes
            .into_iter()
            .map(|code| aloft_api::RegionRow {
                name: format!("aloft region {code}"),
                code,
                ..aloft_api::RegionRow::default()
            })
            .collect(),
    })
}
