//! Releases (aloft's deploys, executed by aloftd as durable jobs; see `aloft_api::release`):
//! create, list, get, follow the events of, and roll back.

use aloft_api::{CreateReleaseRequest, Release, ReleaseEvent, RollbackRequest};
use reqwest::Method;

use crate::logs::{FOLLOW_TIMEOUT, NdjsonStream};
use crate::{Client, ClientError, REQUEST_TIMEOUT, encode};

/// A release's events as they arrive; see [`Client::release_events`].
pub type ReleaseEventStream = NdjsonStream<ReleaseEvent>;

impl Client {
    /// `POST /v1/apps/{app}/releases`: starts a release (201 with the release, `pending`).
    pub async fn release_create(
        &self,
        app: &str,
        request: &CreateReleaseRequest,
    ) -> Result<Release, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, &releases_path(app), Some(body)).await
    }

    /// `GET /v1/apps/{app}/releases`: the app's releases, newest first.
    pub async fn releases_list(&self, app: &str) -> Result<Vec<Release>, ClientError> {
        self.json(Method::GET, &releases_path(app), None).await
    }

    /// `GET /v1/apps/{app}/releases?limit=1`: the app's newest release, if it has one.
    pub async fn release_latest(&self, app: &str) -> Result<Option<Release>, ClientError> {
        let path = format!("{}?limit=1", releases_path(app));
        let list: Vec<Release> = self.json(Method::GET, &path, None).await?;
        Ok(list.into_iter().next())
    }

    /// `GET /v1/apps/{app}/releases/{version}`.
    pub async fn release_get(&self, app: &str, version: u64) -> Result<Release, ClientError> {
        let path = format!("{}/{version}", releases_path(app));
        self.json(Method::GET, &path, None).await
    }

    /// `GET /v1/apps/{app}/releases/{version}/events?follow=`: the release's events from the
    /// first; with `follow` the stream ends when the release is final (or is dropped).
    pub async fn release_events(
        &self,
        app: &str,
        version: u64,
        follow: bool,
    ) -> Result<ReleaseEventStream, ClientError> {
        let path = format!("{}/{version}/events?follow={follow}", releases_path(app));
        let timeout = if follow { FOLLOW_TIMEOUT } else { REQUEST_TIMEOUT };
        let response = self
            .start(Method::GET, &path, None, timeout, "application/x-ndjson")
            .await?;
        Ok(NdjsonStream::new(response, self.base.to_string()))
    }

    /// `POST /v1/apps/{app}/releases/rollback`: redeploys `version`, else the last complete
    /// release before the current one (201 with the new release).
    pub async fn release_rollback(
        &self,
        app: &str,
        request: &RollbackRequest,
    ) -> Result<Release, ClientError> {
        let body = self.body(request)?;
        let path = format!("{}/rollback", releases_path(app));
        self.json(Method::POST, &path, Some(body)).await
    }
}

fn releases_path(app: &str) -> String {
    format!("/v1/apps/{}/releases", encode(app))
}
