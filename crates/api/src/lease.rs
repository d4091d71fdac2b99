//! Machine leases: the `Lease` object, its envelope and the create request.

use serde::{Deserialize, Serialize};

/// The request header that proves a lease is held (and refreshes it on `POST …/lease`).
pub const LEASE_NONCE_HEADER: &str = "fly-machine-lease-nonce";

/// A lease on a machine (the spec's `Lease`; the inner `data` of the envelope).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Lease {
    /// Proof of holding the lease: send it in [`LEASE_NONCE_HEADER`].
    pub nonce: String,
    /// Unix seconds after which the lease is void.
    pub expires_at: i64,
    /// Who took it (the token's user).
    #[serde(default)]
    pub owner: String,
    /// Why.
    #[serde(default)]
    pub description: String,
    /// The machine version at the time.
    #[serde(default)]
    pub version: String,
}

/// What `POST`/`GET …/lease` return: `{"status": "success", "data": {…}}`. fly-go's
/// `MachineLease` also reads `message` and `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LeaseEnvelope {
    /// `success`.
    pub status: String,
    /// The lease.
    pub data: Lease,
    /// Extra text, on errors.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Error code, on errors.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub code: String,
}

impl LeaseEnvelope {
    /// The success envelope around `lease`.
    pub fn success(lease: Lease) -> Self {
        Self {
            status: "success".to_owned(),
            data: lease,
            message: String::new(),
            code: String::new(),
        }
    }
}

/// `POST …/lease` body (`CreateLeaseRequest`). fly-go also sends the TTL as `?ttl=`; the query
/// wins when both are given.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateLeaseRequest {
    /// Seconds the lease lasts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<u64>,
    /// Why the lease is taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

impl CreateLeaseRequest {
    /// Default lease length when neither body nor query names one.
    pub const DEFAULT_TTL_SECS: u64 = 30;
    /// Longest lease aloft grants.
    pub const MAX_TTL_SECS: u64 = 3600;

    /// The TTL to grant: `?ttl=` (if given), else the body's, else the default; 400 for zero,
    /// non-numbers or more than an hour.
    pub fn ttl_secs(&self, query_ttl: Option<&str>) -> Result<u64, crate::ApiError> {
        let ttl = match query_ttl.map(str::trim).filter(|t| !t.is_empty()) {
            Some(t) => t.parse::<u64>().ok(),
            None => Some(self.ttl.unwrap_or(Self::DEFAULT_TTL_SECS)),
        };
        match ttl {
            Some(t) if (1..=Self::MAX_TTL_SECS).contains(&t) => Ok(t),
            _ => Err(crate::ApiError::bad_request(format!(
                "invalid lease ttl: give whole seconds from 1 to {}",
                Self::MAX_TTL_SECS
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn envelope_is_what_fly_returns() {
        let input = json!({
            "status": "success",
            "data": {
                "nonce": "a7e1f4b3c2d9",
                "expires_at": 1_700_000_013i64,
                "owner": "alice@example.com",
                "description": "flyctl deploy",
                "version": "01HBZ8QEXHS0YR4R1N6S1XGEE2"
            }
        });
        let env: LeaseEnvelope = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(env.data.expires_at, 1_700_000_013);
        assert_eq!(serde_json::to_value(&env).unwrap(), input);
        assert_eq!(LeaseEnvelope::success(env.data.clone()), env);
    }

    #[test]
    fn ttl_from_body_or_query() {
        let body: CreateLeaseRequest =
            serde_json::from_value(json!({"ttl": 13, "description": "deploy"})).unwrap();
        assert_eq!(body.ttl_secs(None).unwrap(), 13);
        assert_eq!(body.ttl_secs(Some("20")).unwrap(), 20);
        assert_eq!(CreateLeaseRequest::default().ttl_secs(None).unwrap(), 30);
        for bad in ["0", "x", "-5", "3601"] {
            assert_eq!(body.ttl_secs(Some(bad)).unwrap_err().status(), 400, "{bad}");
        }
    }
}
