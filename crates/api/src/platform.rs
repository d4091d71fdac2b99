//! `GET /platform/regions` (`main.regionResponse`): the regions this platform runs machines in.

use serde::{Deserialize, Serialize};

/// One region (`main.regionRow`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RegionRow {
    /// The region's code (`local`, `ams` …).
    pub code: String,
    /// A human name.
    pub name: String,
    /// Retired, kept for old machines.
    #[serde(default)]
    pub deprecated: bool,
    /// Whether WireGuard gateways exist there (none in aloft).
    #[serde(default)]
    pub gateway_available: bool,
    /// Continent-level grouping.
    #[serde(default)]
    pub geo_region: String,
    /// Latitude, degrees.
    #[serde(default)]
    pub latitude: f64,
    /// Longitude, degrees.
    #[serde(default)]
    pub longitude: f64,
    /// Needs a paid plan (never in aloft).
    #[serde(default)]
    pub requires_paid_plan: bool,
}

/// The answer (`main.regionResponse`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct RegionsResponse {
    /// The region closest to the caller (the server's own).
    pub nearest: String,
    /// Every region with at least one host.
    pub regions: Vec<RegionRow>,
}
