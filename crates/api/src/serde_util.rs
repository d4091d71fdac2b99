//! Small serde helpers for Fly's JSON, which uses `null` and absent interchangeably.

use serde::{Deserialize, Deserializer};

/// Deserializes `null` as the type's default (an empty list or map), so clients that send
/// `"env": null` are accepted like clients that omit the field.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}
