//! App secrets (`/v1/apps/{app}/secrets…`): list (names and digests only: the server never
//! returns values), set and unset in one change, set one, delete one.

use std::collections::BTreeMap;

use aloft_api::{
    AppSecret, AppSecrets, AppSecretsUpdateRequest, AppSecretsUpdateResp, DeleteAppSecretResponse,
    SetAppSecretRequest, SetAppSecretResponse,
};
use reqwest::Method;

use crate::{Client, ClientError, encode};

impl Client {
    /// `GET /v1/apps/{app}/secrets`: the app's secrets, by name (no values).
    pub async fn secrets_list(&self, app: &str) -> Result<Vec<AppSecret>, ClientError> {
        let list: AppSecrets = self.json(Method::GET, &secrets_path(app), None).await?;
        Ok(list.secrets)
    }

    /// `POST /v1/apps/{app}/secrets`: sets (`Some`) and unsets (`None`) in one change; returns
    /// the secrets afterwards and the new secrets version.
    pub async fn secrets_update(
        &self,
        app: &str,
        values: BTreeMap<String, Option<String>>,
    ) -> Result<AppSecretsUpdateResp, ClientError> {
        let body = self.body(&AppSecretsUpdateRequest { values })?;
        self.json(Method::POST, &secrets_path(app), Some(body)).await
    }

    /// `POST /v1/apps/{app}/secrets/{name}`: sets one secret.
    pub async fn secret_set(
        &self,
        app: &str,
        name: &str,
        value: String,
    ) -> Result<SetAppSecretResponse, ClientError> {
        let body = self.body(&SetAppSecretRequest { value })?;
        let path = format!("{}/{}", secrets_path(app), encode(name));
        self.json(Method::POST, &path, Some(body)).await
    }

    /// `DELETE /v1/apps/{app}/secrets/{name}`: removes one secret; returns the new version.
    pub async fn secret_delete(&self, app: &str, name: &str) -> Result<DeleteAppSecretResponse, ClientError> {
        let path = format!("{}/{}", secrets_path(app), encode(name));
        self.json(Method::DELETE, &path, None).await
    }
}

fn secrets_path(app: &str) -> String {
    format!("/v1/apps/{}/secrets", encode(app))
}
