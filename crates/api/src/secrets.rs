//! App secrets (`/v1/apps/{app}/secrets…`): Fly's request and response shapes, the rules for
//! names and values, and [`SecretEnv`], the decrypted secrets the control plane hands a host.
//!
//! aloft never returns a secret's value: responses carry its name, digest and times only (Fly's
//! `value` field is never sent, `show_secrets=true` is refused). Types that hold values print
//! only names in their `Debug`.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// Longest secret value, bytes.
pub const MAX_SECRET_BYTES: usize = 64 * 1024;

/// Checks a secret name: an environment variable name (`[A-Za-z_][A-Za-z0-9_]*`, at most 200
/// bytes), not starting with `FLY_` (the platform's).
pub fn validate_secret_name(name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 200;
    if !valid {
        return Err(ApiError::bad_request(format!(
            "invalid secret name {name:?}: use an environment variable name (letters, digits and \
             underscores, not starting with a digit, at most 200 characters)"
        )));
    }
    if name.to_ascii_uppercase().starts_with("FLY_") {
        return Err(ApiError::bad_request(format!(
            "invalid secret name {name:?}: names starting with FLY_ are reserved for the platform"
        )));
    }
    Ok(())
}

/// Checks a secret value's size (the value itself never appears in the message).
pub fn validate_secret_value(name: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_SECRET_BYTES {
        return Err(ApiError::bad_request(format!(
            "secret {name} is {} bytes long; values are at most {MAX_SECRET_BYTES} bytes (64 KiB)",
            value.len()
        )));
    }
    Ok(())
}

/// A secret as the API shows it (`AppSecret`, without Fly's `value`: aloft never returns it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AppSecret {
    /// Its name.
    pub name: String,
    /// Hex SHA-256 of the value.
    pub digest: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

/// `GET /apps/{app}/secrets` answer (`AppSecrets`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AppSecrets {
    /// The app's secrets, by name.
    #[serde(default)]
    pub secrets: Vec<AppSecret>,
}

/// `POST /apps/{app}/secrets` body (`AppSecretsUpdateRequest`): values to set, `null` to unset,
/// applied together.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AppSecretsUpdateRequest {
    /// Name → new value, or `null` to remove the secret.
    #[serde(default)]
    pub values: BTreeMap<String, Option<String>>,
}

impl fmt::Debug for AppSecretsUpdateRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: BTreeMap<&str, &str> = self
            .values
            .iter()
            .map(|(k, v)| (k.as_str(), if v.is_some() { "<set>" } else { "<unset>" }))
            .collect();
        f.debug_struct("AppSecretsUpdateRequest")
            .field("values", &names)
            .finish()
    }
}

/// `POST /apps/{app}/secrets` answer (`AppSecretsUpdateResp`): the app's secrets afterwards and
/// the new secrets version.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct AppSecretsUpdateResp {
    /// The app's secrets, by name.
    #[serde(default)]
    pub secrets: Vec<AppSecret>,
    /// The app's secrets version after the change.
    #[serde(default)]
    pub version: u64,
    /// The same (Fly's deprecated spelling, kept for old clients).
    #[serde(rename = "Version", default)]
    pub version_deprecated: u64,
}

/// `POST /apps/{app}/secrets/{name}` body (`SetAppSecretRequest`).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SetAppSecretRequest {
    /// The value.
    pub value: String,
}

impl fmt::Debug for SetAppSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SetAppSecretRequest { value: <redacted> }")
    }
}

/// `POST /apps/{app}/secrets/{name}` answer, 201 (`SetAppSecretResponse`, without `value`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SetAppSecretResponse {
    /// Its name.
    pub name: String,
    /// Hex SHA-256 of the value.
    pub digest: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// The app's secrets version after the change.
    pub version: u64,
    /// The same (Fly's deprecated spelling).
    #[serde(rename = "Version", default)]
    pub version_deprecated: u64,
}

/// `DELETE /apps/{app}/secrets/{name}` answer (`DeleteAppSecretResponse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeleteAppSecretResponse {
    /// The app's secrets version after the change.
    pub version: u64,
    /// The same (Fly's deprecated spelling).
    #[serde(rename = "Version", default)]
    pub version_deprecated: u64,
}

/// Query of `GET /apps/{app}/secrets[/{name}]`: `min_version` (answer 422 until the app's secrets
/// reached it) and `show_secrets` (refused: aloft never returns values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SecretsQuery {
    /// The version the caller needs at least.
    pub min_version: Option<u64>,
}

impl SecretsQuery {
    /// Parses the query pairs.
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
                "min_version" if !v.is_empty() => {
                    q.min_version = Some(v.parse().map_err(|_| {
                        ApiError::bad_request(format!(
                            "invalid min_version {v:?}: use a secrets version number"
                        ))
                    })?);
                }
                "show_secrets" if matches!(v, "" | "1" | "t" | "T" | "true" | "TRUE" | "True") => {
                    return Err(ApiError::bad_request(
                        "show_secrets is not supported: aloft never returns secret values, only their digests",
                    ));
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// An app's secrets, decrypted, as the control plane hands them to a host with a create or an
/// update: the host injects them as environment variables at every boot of that version. Its
/// `Debug` prints names only.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretEnv {
    /// The app's secrets version they come from (0: none set yet).
    pub version: u64,
    /// Name → value.
    pub values: BTreeMap<String, String>,
}

impl fmt::Debug for SecretEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretEnv")
            .field("version", &self.version)
            .field("names", &self.values.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_env_vars_not_fly_ones() {
        for ok in ["A", "_x", "DATABASE_URL", "a1"] {
            validate_secret_name(ok).unwrap();
        }
        for bad in ["", "1A", "A-B", "A B", "FLY_APP_NAME", "fly_x", "ä"] {
            assert_eq!(validate_secret_name(bad).unwrap_err().status(), 400, "{bad}");
        }
        assert!(
            validate_secret_value("A", &"x".repeat(MAX_SECRET_BYTES + 1))
                .unwrap_err()
                .message()
                .contains("64 KiB")
        );
    }

    #[test]
    fn debug_never_shows_values() {
        let env = SecretEnv {
            version: 3,
            values: [("DB".to_owned(), "hunter2".to_owned())].into(),
        };
        let req = AppSecretsUpdateRequest {
            values: [("DB".to_owned(), Some("hunter2".to_owned()))].into(),
        };
        let set = SetAppSecretRequest {
            value: "hunter2".into(),
        };
        for s in [format!("{env:?}"), format!("{req:?}"), format!("{set:?}")] {
            assert!(!s.contains("hunter2"), "{s}");
        }
        assert!(format!("{env:?}").contains("DB"));
    }

    #[test]
    fn query() {
        assert_eq!(
            SecretsQuery::from_query([("min_version", "4")])
                .unwrap()
                .min_version,
            Some(4)
        );
        assert!(SecretsQuery::from_query([("show_secrets", "true")]).is_err());
        SecretsQuery::from_query([("show_secrets", "false")]).unwrap();
        let wire: AppSecretsUpdateRequest =
            serde_json::from_str(r#"{"values": {"A": "1", "B": null}}"#).unwrap();
        assert_eq!(wire.values["B"], None);
    }
}
