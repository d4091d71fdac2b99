//! Custom domains' certificates (`/v1/apps/{app}/certificates…`) and the root of the edge's
//! local CA (`/v1/platform/edge-ca`).

use aloft_api::{Certificate, CreateCertificateRequest, EdgeCaResponse, ListCertificatesResponse};
use reqwest::Method;

use crate::{Client, ClientError, encode};

impl Client {
    /// `POST /v1/apps/{app}/certificates`: adds `hostname` to the app; the edge issues its
    /// certificate (the answer is `pending`, or the app's existing certificate for it).
    pub async fn cert_add(&self, app: &str, hostname: &str) -> Result<Certificate, ClientError> {
        let body = self.body(&CreateCertificateRequest {
            hostname: hostname.to_owned(),
        })?;
        self.json(Method::POST, &certs_path(app), Some(body)).await
    }

    /// `GET /v1/apps/{app}/certificates`: the app's certificates, by hostname.
    pub async fn certs_list(&self, app: &str) -> Result<Vec<Certificate>, ClientError> {
        let list: ListCertificatesResponse = self.json(Method::GET, &certs_path(app), None).await?;
        Ok(list.certificates)
    }

    /// `GET /v1/apps/{app}/certificates/{hostname}`.
    pub async fn cert_get(&self, app: &str, hostname: &str) -> Result<Certificate, ClientError> {
        self.json(Method::GET, &cert_path(app, hostname), None).await
    }

    /// `POST /v1/apps/{app}/certificates/{hostname}/check`: queues a failed certificate again
    /// and returns it.
    pub async fn cert_check(&self, app: &str, hostname: &str) -> Result<Certificate, ClientError> {
        let path = format!("{}/check", cert_path(app, hostname));
        self.json(Method::POST, &path, None).await
    }

    /// `DELETE /v1/apps/{app}/certificates/{hostname}`: removes the hostname from the app.
    pub async fn cert_delete(&self, app: &str, hostname: &str) -> Result<(), ClientError> {
        self.send(Method::DELETE, &cert_path(app, hostname), None)
            .await
            .map(drop)
    }

    /// `GET /v1/platform/edge-ca`: the edge's local CA root, PEM.
    pub async fn edge_ca(&self) -> Result<String, ClientError> {
        let r: EdgeCaResponse = self.json(Method::GET, "/v1/platform/edge-ca", None).await?;
        Ok(r.pem)
    }
}

fn certs_path(app: &str) -> String {
    format!("/v1/apps/{}/certificates", encode(app))
}

fn cert_path(app: &str, hostname: &str) -> String {
    format!("{}/{}", certs_path(app), encode(hostname))
}
