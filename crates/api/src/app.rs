//! Apps: the `App` object, create requests and the list shape.

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// An app (`App`; fly-go adds `cname_target` and `app_role`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct App {
    /// Opaque id.
    #[serde(default)]
    pub id: String,
    /// Unique name (also its DNS label).
    pub name: String,
    /// Numeric id.
    #[serde(default)]
    pub internal_numeric_id: u64,
    /// Machines that are not destroyed.
    #[serde(default)]
    pub machine_count: u64,
    /// Volumes.
    #[serde(default)]
    pub volume_count: u64,
    /// The private network it lives in (`default` unless created with another).
    #[serde(default)]
    pub network: String,
    /// `pending`, `deployed`, `suspended` …
    #[serde(default)]
    pub status: String,
    /// The owning organization.
    #[serde(default)]
    pub organization: AppOrganizationInfo,
    /// DNS target for custom domains.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cname_target: String,
    /// The app's role, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_role: String,
}

/// The organization part of an app (`AppOrganizationInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AppOrganizationInfo {
    /// Display name.
    #[serde(default)]
    pub name: String,
    /// Slug (`personal` for a user's own).
    #[serde(default)]
    pub slug: String,
    /// Numeric id.
    #[serde(default)]
    pub internal_numeric_id: u64,
}

/// `POST /apps` body (`CreateAppRequest`; fly-go adds `app_role_id` and posts `?wait=true`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateAppRequest {
    /// App name.
    #[serde(default)]
    pub name: String,
    /// Organization slug.
    #[serde(default)]
    pub org_slug: String,
    /// Private network name (`default` when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Give the app per-machine subdomains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_subdomains: Option<bool>,
    /// fly-go's role id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub app_role_id: Option<String>,
}

impl CreateAppRequest {
    /// Checks the name (a DNS label: 1–63 of `a-z`, `0-9`, `-`, not starting or ending with
    /// `-`) and that an organization is named.
    pub fn validate(&self) -> Result<(), ApiError> {
        validate_app_name(&self.name)?;
        if self.org_slug.trim().is_empty() {
            return Err(ApiError::bad_request(
                "org_slug is required: name the organization, e.g. \"personal\"",
            ));
        }
        Ok(())
    }
}

/// Checks an app name: a DNS label of lowercase letters, digits and inner hyphens.
pub fn validate_app_name(name: &str) -> Result<(), ApiError> {
    let b = name.as_bytes();
    let ok = (1..=63).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.first() != Some(&b'-')
        && b.last() != Some(&b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid app name {name:?}: use 1 to 63 lowercase letters, digits and hyphens, not starting or ending with a hyphen"
        )))
    }
}

/// `GET /apps` answer (`ListAppsResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ListAppsResponse {
    /// Number of apps.
    pub total_apps: u64,
    /// The apps.
    #[serde(default)]
    pub apps: Vec<App>,
}

/// `GET /apps` query: `org_slug` (required), `app_role`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListAppsQuery {
    /// Organization slug.
    pub org_slug: String,
    /// Only apps with this role.
    pub app_role: Option<String>,
}

impl ListAppsQuery {
    /// Parses decoded query pairs; 400 without `org_slug`.
    pub fn from_query<I, K, V>(pairs: I) -> Result<Self, ApiError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        let mut q = Self::default();
        for (k, v) in pairs {
            let v = v.as_ref().trim();
            match k.as_ref() {
                "org_slug" => q.org_slug = v.to_owned(),
                "app_role" if !v.is_empty() => q.app_role = Some(v.to_owned()),
                _ => {}
            }
        }
        if q.org_slug.is_empty() {
            return Err(ApiError::bad_request(
                "org_slug is required: list apps with ?org_slug=personal (or your organization)",
            ));
        }
        Ok(q)
    }
}

/// `POST /apps/{app}/deploy_token` body (`CreateAppDeployTokenRequest`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CreateDeployTokenRequest {
    /// Lifetime as a Go duration (`"720h"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
}

/// `POST /apps/{app}/deploy_token` answer (`CreateAppResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TokenResponse {
    /// The token.
    pub token: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn app_round_trips() {
        let input = json!({
            "id": "my-app", "name": "my-app", "internal_numeric_id": 1234,
            "machine_count": 2, "volume_count": 0, "network": "default", "status": "deployed",
            "organization": {"name": "Alice", "slug": "personal", "internal_numeric_id": 7}
        });
        let app: App = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(app.organization.slug, "personal");
        assert_eq!(serde_json::to_value(&app).unwrap(), input);
        let list = ListAppsResponse {
            total_apps: 1,
            apps: vec![app],
        };
        let v = serde_json::to_value(&list).unwrap();
        assert_eq!(v["total_apps"], 1);
        assert_eq!(serde_json::from_value::<ListAppsResponse>(v).unwrap(), list);
    }

    #[test]
    fn create_app_like_fly_go() {
        let req: CreateAppRequest = serde_json::from_value(json!({
            "name": "my-app", "org_slug": "personal", "network": "", "app_role_id": "", "enable_subdomains": false
        }))
        .unwrap();
        req.validate().unwrap();
        for bad in ["", "My-App", "-app", "app-", "a_b", &"a".repeat(64)] {
            assert_eq!(validate_app_name(bad).unwrap_err().status(), 400, "{bad}");
        }
        let no_org = CreateAppRequest {
            name: "ok".into(),
            ..Default::default()
        };
        assert!(no_org.validate().unwrap_err().message().contains("org_slug"));
    }

    #[test]
    fn list_query_needs_org() {
        let q = ListAppsQuery::from_query([("org_slug", "personal"), ("app_role", "")]).unwrap();
        assert_eq!(q.org_slug, "personal");
        assert_eq!(q.app_role, None);
        assert_eq!(
            ListAppsQuery::from_query([("app_role", "x")])
                .unwrap_err()
                .status(),
            400
        );
    }
}
