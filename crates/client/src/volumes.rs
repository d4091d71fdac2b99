//! Volumes (`/v1/apps/{app}/volumes…`), Fly's Machines API paths and shapes: list, create, get,
//! update (snapshot settings), extend, delete. A machine mounts one through its config
//! (`config.mounts[0].volume`), not through these endpoints. Snapshots are not served yet.

use aloft_api::{
    CreateVolumeRequest, ExtendVolumeRequest, ExtendVolumeResponse, UpdateVolumeRequest, Volume,
};
use reqwest::Method;

use crate::{Client, ClientError, encode};

impl Client {
    /// `GET /v1/apps/{app}/volumes`: the app's volumes.
    pub async fn volumes_list(&self, app: &str) -> Result<Vec<Volume>, ClientError> {
        self.json(Method::GET, &volumes_path(app), None).await
    }

    /// `POST /v1/apps/{app}/volumes`: creates a volume (its disk on a host of the region) and
    /// returns it.
    pub async fn volume_create(
        &self,
        app: &str,
        request: &CreateVolumeRequest,
    ) -> Result<Volume, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, &volumes_path(app), Some(body)).await
    }

    /// `GET /v1/apps/{app}/volumes/{id}`.
    pub async fn volume_get(&self, app: &str, id: &str) -> Result<Volume, ClientError> {
        self.json(Method::GET, &volume_path(app, id), None).await
    }

    /// `PUT /v1/apps/{app}/volumes/{id}`: changes its snapshot settings; returns the volume.
    pub async fn volume_update(
        &self,
        app: &str,
        id: &str,
        request: &UpdateVolumeRequest,
    ) -> Result<Volume, ClientError> {
        let body = self.body(request)?;
        self.json(Method::PUT, &volume_path(app, id), Some(body)).await
    }

    /// `PUT /v1/apps/{app}/volumes/{id}/extend`: grows the volume to `size_gb`; the answer says
    /// whether the machine mounting it must restart to see the new size.
    pub async fn volume_extend(
        &self,
        app: &str,
        id: &str,
        size_gb: u32,
    ) -> Result<ExtendVolumeResponse, ClientError> {
        let body = self.body(&ExtendVolumeRequest {
            size_gb: Some(size_gb),
        })?;
        let path = format!("{}/extend", volume_path(app, id));
        self.json(Method::PUT, &path, Some(body)).await
    }

    /// `DELETE /v1/apps/{app}/volumes/{id}`: destroys the volume and its data; returns it
    /// (state `destroyed`). 412 while a machine mounts it.
    pub async fn volume_delete(&self, app: &str, id: &str) -> Result<Volume, ClientError> {
        self.json(Method::DELETE, &volume_path(app, id), None).await
    }
}

fn volumes_path(app: &str) -> String {
    format!("/v1/apps/{}/volumes", encode(app))
}

fn volume_path(app: &str, id: &str) -> String {
    format!("{}/{}", volumes_path(app), encode(id))
}
