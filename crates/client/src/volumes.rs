//! Volumes (`/v1/apps/{app}/volumes…`), Fly's Machines API paths and shapes: list, create
//! (empty, restored from a snapshot or forked from another volume), get, update (snapshot
//! settings), extend, delete, and a volume's snapshots (list, take one). A machine mounts one
//! through its config (`config.mounts[0].volume`), not through these endpoints.

use std::time::Duration;

use aloft_api::{
    CreateVolumeRequest, ExtendVolumeRequest, ExtendVolumeResponse, UpdateVolumeRequest, Volume,
    VolumeSnapshot,
};
use reqwest::Method;

use crate::{Client, ClientError, REQUEST_TIMEOUT, encode};

/// How long a request that copies a volume's disk may take: taking a snapshot, restoring one, or
/// forking a volume answers once the copy is made, and a large disk takes a while to copy.
pub(crate) const VOLUME_COPY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

impl Client {
    /// `GET /v1/apps/{app}/volumes`: the app's volumes.
    pub async fn volumes_list(&self, app: &str) -> Result<Vec<Volume>, ClientError> {
        self.json(Method::GET, &volumes_path(app), None).await
    }

    /// `POST /v1/apps/{app}/volumes`: creates a volume (its disk on a host of the region) and
    /// returns it. With `snapshot_id` it is restored from that snapshot (in the snapshot's
    /// region), with `source_volume_id` it is a fork of that volume (a copy of its disk now, on
    /// its host); either answers once the copy is made, so such a request may take up to
    /// half an hour rather than a minute.
    pub async fn volume_create(
        &self,
        app: &str,
        request: &CreateVolumeRequest,
    ) -> Result<Volume, ClientError> {
        let body = self.body(request)?;
        let timeout = if request.snapshot_id.is_some() || request.source_volume_id.is_some() {
            VOLUME_COPY_TIMEOUT
        } else {
            REQUEST_TIMEOUT
        };
        self.json_within(Method::POST, &volumes_path(app), Some(body), timeout)
            .await
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

    /// `GET /v1/apps/{app}/volumes/{id}/snapshots`: the volume's snapshots, newest first (also
    /// those of a destroyed volume, which are kept until their retention runs out).
    pub async fn volume_snapshots(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<Vec<VolumeSnapshot>, ClientError> {
        self.json(Method::GET, &snapshots_path(app, volume_id), None)
            .await
    }

    /// `POST /v1/apps/{app}/volumes/{id}/snapshots`: takes a snapshot of the volume now and
    /// returns it once it is taken (which may take a while for a large disk).
    pub async fn create_volume_snapshot(
        &self,
        app: &str,
        volume_id: &str,
    ) -> Result<VolumeSnapshot, ClientError> {
        self.json_within(
            Method::POST,
            &snapshots_path(app, volume_id),
            None,
            VOLUME_COPY_TIMEOUT,
        )
        .await
    }
}

fn volumes_path(app: &str) -> String {
    format!("/v1/apps/{}/volumes", encode(app))
}

fn volume_path(app: &str, id: &str) -> String {
    format!("{}/{}", volumes_path(app), encode(id))
}

fn snapshots_path(app: &str, volume_id: &str) -> String {
    format!("{}/snapshots", volume_path(app, volume_id))
}
