//! The machine endpoints of Fly's Machines API, under the same paths below `/v1`
//! (`/apps/{app}/machines…`; see `docs/api-compat.md`).
//!
//! Mutations of a leased machine need the lease's nonce: make them through
//! [`Client::with_lease_nonce`]. Waits longer than the API's 60 s per request are several
//! requests, as fly-go does ([`Client::machine_wait_for`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aloft_api::{
    CreateLeaseRequest, CreateMachineRequest, ExecRequest, ExecResponse, LeaseEnvelope, Machine,
    MachineEvent, MachineState, MachineVersion, MetadataValueResponse, ProcessStat, Signal, SignalRequest,
    StartResponse, StopRequest, StopSignal, UpdateMachineRequest, UpdateMetadataRequest,
    UpsertMetadataKeyRequest, WaitResponse, WaitState,
};
use reqwest::Method;

use crate::{Client, ClientError, REQUEST_TIMEOUT, encode};

/// `GET /apps/{app}/machines` filters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListMachinesParams {
    /// Also list destroyed machines.
    pub include_deleted: bool,
    /// Only this region.
    pub region: Option<String>,
    /// Only these states (empty: all).
    pub states: Vec<MachineState>,
    /// Leave out config, checks, events, host status and nonce.
    pub summary: bool,
    /// `metadata.KEY=VALUE` filters; all must match.
    pub metadata: BTreeMap<String, String>,
}

impl ListMachinesParams {
    /// The query string, `?…` or empty.
    fn query(&self) -> String {
        let mut q = Query::default();
        if self.include_deleted {
            q.push("include_deleted", "true");
        }
        if let Some(region) = &self.region {
            q.push("region", region);
        }
        if !self.states.is_empty() {
            let states: Vec<&str> = self.states.iter().map(|s| s.as_str()).collect();
            q.push("state", &states.join(","));
        }
        if self.summary {
            q.push("summary", "true");
        }
        for (k, v) in &self.metadata {
            q.push(&format!("metadata.{k}"), v);
        }
        q.finish()
    }
}

/// `POST …/restart` options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestartParams {
    /// Signal sent first (default: the machine's stop signal).
    pub signal: Option<StopSignal>,
    /// Time between the signal and the forced stop.
    pub timeout: Option<Duration>,
    /// Stop forcibly right away (fly-go's `force_stop`).
    pub force_stop: bool,
}

/// What a wait waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitParams {
    /// Any of these ends the wait (empty: `started`).
    pub states: Vec<WaitState>,
    /// Only this version (`instance_id`) counts.
    pub version: Option<String>,
    /// Only events after this one count.
    pub from_event_id: Option<String>,
}

impl WaitParams {
    /// A wait for one state of any version.
    pub fn state(state: WaitState) -> Self {
        Self {
            states: vec![state],
            version: None,
            from_event_id: None,
        }
    }

    /// The query of one request lasting `timeout` (whole seconds, clamped to 1–60 as fly-go
    /// does).
    fn query(&self, timeout: Duration) -> String {
        let mut q = Query::default();
        for state in &self.states {
            q.push("state", wait_state_str(*state));
        }
        // Whole seconds, rounded up: 29.99 s left is a 30 s request.
        let secs = (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).clamp(1, MAX_WAIT.as_secs());
        q.push("timeout", &secs.to_string());
        if let Some(v) = &self.version {
            q.push("version", v);
        }
        if let Some(e) = &self.from_event_id {
            q.push("from_event_id", e);
        }
        q.finish()
    }
}

/// The longest one wait request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Extra time the client gives a request beyond what the server holds it.
const SLACK: Duration = Duration::from_secs(15);

fn wait_state_str(state: WaitState) -> &'static str {
    match state {
        WaitState::Started => "started",
        WaitState::Stopped => "stopped",
        WaitState::Suspended => "suspended",
        WaitState::Destroyed => "destroyed",
        WaitState::Failed => "failed",
        WaitState::Settled => "settled",
    }
}

/// A query string under construction; keys and values are percent-encoded.
#[derive(Debug, Default)]
struct Query(Vec<String>);

impl Query {
    fn push(&mut self, key: &str, value: &str) {
        self.0.push(format!("{}={}", encode(key), encode(value)));
    }

    fn finish(self) -> String {
        if self.0.is_empty() {
            String::new()
        } else {
            format!("?{}", self.0.join("&"))
        }
    }
}

/// `/v1/apps/{app}/machines`.
fn machines_path(app: &str) -> String {
    format!("/v1/apps/{}/machines", encode(app))
}

/// `/v1/apps/{app}/machines/{id}` followed by `rest` (`""`, `"/start"` …).
pub(crate) fn machine_path(app: &str, id: &str, rest: &str) -> String {
    format!("/v1/apps/{}/machines/{}{rest}", encode(app), encode(id))
}

impl Client {
    /// `GET /v1/apps/{app}/machines`: the app's machines (destroyed ones only on request).
    pub async fn machines_list(
        &self,
        app: &str,
        params: &ListMachinesParams,
    ) -> Result<Vec<Machine>, ClientError> {
        let path = format!("{}{}", machines_path(app), params.query());
        self.json(Method::GET, &path, None).await
    }

    /// `POST /v1/apps/{app}/machines`: creates (and, unless `skip_launch`, starts) a machine.
    pub async fn machine_create(
        &self,
        app: &str,
        request: &CreateMachineRequest,
    ) -> Result<Machine, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, &machines_path(app), Some(body)).await
    }

    /// `GET /v1/apps/{app}/machines/{id}`.
    pub async fn machine_get(&self, app: &str, id: &str) -> Result<Machine, ClientError> {
        self.json(Method::GET, &machine_path(app, id, ""), None).await
    }

    /// `POST /v1/apps/{app}/machines/{id}`: replaces the machine's config (the whole config, as
    /// Fly's update does; get it first and change what should change).
    pub async fn machine_update(
        &self,
        app: &str,
        id: &str,
        request: &UpdateMachineRequest,
    ) -> Result<Machine, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, &machine_path(app, id, ""), Some(body))
            .await
    }

    /// `DELETE /v1/apps/{app}/machines/{id}[?force=true]`: destroys a machine (a running one
    /// only with `force`).
    pub async fn machine_delete(&self, app: &str, id: &str, force: bool) -> Result<(), ClientError> {
        let query = if force { "?force=true" } else { "" };
        self.send(
            Method::DELETE,
            &format!("{}{query}", machine_path(app, id, "")),
            None,
        )
        .await
        .map(drop)
    }

    /// `POST …/start`: starts a created, stopped, suspended or failed machine.
    pub async fn machine_start(&self, app: &str, id: &str) -> Result<StartResponse, ClientError> {
        self.json(Method::POST, &machine_path(app, id, "/start"), None)
            .await
    }

    /// `POST …/stop` with an optional signal and timeout.
    pub async fn machine_stop(&self, app: &str, id: &str, request: &StopRequest) -> Result<(), ClientError> {
        let body = self.body(request)?;
        self.send(Method::POST, &machine_path(app, id, "/stop"), Some(body))
            .await
            .map(drop)
    }

    /// `POST …/suspend`.
    pub async fn machine_suspend(&self, app: &str, id: &str) -> Result<(), ClientError> {
        self.send(Method::POST, &machine_path(app, id, "/suspend"), None)
            .await
            .map(drop)
    }

    /// `POST …/restart?signal=&timeout=&force_stop=`.
    pub async fn machine_restart(
        &self,
        app: &str,
        id: &str,
        params: &RestartParams,
    ) -> Result<(), ClientError> {
        let mut q = Query::default();
        if let Some(signal) = params.signal {
            q.push("signal", signal.as_str());
        }
        if let Some(timeout) = params.timeout {
            q.push("timeout", &format!("{}s", timeout.as_secs()));
        }
        if params.force_stop {
            q.push("force_stop", "true");
        }
        let path = format!("{}{}", machine_path(app, id, "/restart"), q.finish());
        self.send(Method::POST, &path, None).await.map(drop)
    }

    /// `POST …/signal`: sends a signal to the workload.
    pub async fn machine_signal(&self, app: &str, id: &str, signal: Signal) -> Result<(), ClientError> {
        let body = self.body(&SignalRequest { signal })?;
        self.send(Method::POST, &machine_path(app, id, "/signal"), Some(body))
            .await
            .map(drop)
    }

    /// `GET …/wait`: one request, held by the server for up to `timeout` (clamped to 1–60 s). A
    /// 408 ([`ClientError::is_wait_timeout`]) means the state was not reached in time.
    pub async fn machine_wait(
        &self,
        app: &str,
        id: &str,
        params: &WaitParams,
        timeout: Duration,
    ) -> Result<WaitResponse, ClientError> {
        let path = format!("{}{}", machine_path(app, id, "/wait"), params.query(timeout));
        let limit = timeout.clamp(Duration::from_secs(1), MAX_WAIT) + SLACK;
        self.json_within(Method::GET, &path, None, limit).await
    }

    /// Waits up to `timeout` in all, in requests of at most 60 s, repeating on 408 as fly-go
    /// does. When the time runs out, the last 408 is returned.
    pub async fn machine_wait_for(
        &self,
        app: &str,
        id: &str,
        params: &WaitParams,
        timeout: Duration,
    ) -> Result<WaitResponse, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.machine_wait(app, id, params, left.min(MAX_WAIT)).await {
                Err(e) if e.is_wait_timeout() && left > MAX_WAIT => {}
                other => return other,
            }
        }
    }

    /// `POST …/cordon`: the proxy stops routing to the machine.
    pub async fn machine_cordon(&self, app: &str, id: &str) -> Result<(), ClientError> {
        self.send(Method::POST, &machine_path(app, id, "/cordon"), None)
            .await
            .map(drop)
    }

    /// `POST …/uncordon`.
    pub async fn machine_uncordon(&self, app: &str, id: &str) -> Result<(), ClientError> {
        self.send(Method::POST, &machine_path(app, id, "/uncordon"), None)
            .await
            .map(drop)
    }

    /// `GET …/lease`: the lease held on the machine (404 when none).
    pub async fn lease_get(&self, app: &str, id: &str) -> Result<LeaseEnvelope, ClientError> {
        self.json(Method::GET, &machine_path(app, id, "/lease"), None)
            .await
    }

    /// `POST …/lease`: takes a lease, or refreshes the one whose nonce this client carries
    /// ([`Client::with_lease_nonce`]).
    pub async fn lease_create(
        &self,
        app: &str,
        id: &str,
        request: &CreateLeaseRequest,
    ) -> Result<LeaseEnvelope, ClientError> {
        let body = self.body(request)?;
        self.json(Method::POST, &machine_path(app, id, "/lease"), Some(body))
            .await
    }

    /// `DELETE …/lease` with `nonce` in `fly-machine-lease-nonce`.
    pub async fn lease_release(&self, app: &str, id: &str, nonce: &str) -> Result<(), ClientError> {
        self.with_lease_nonce(Some(nonce))
            .send(Method::DELETE, &machine_path(app, id, "/lease"), None)
            .await
            .map(drop)
    }

    /// `GET …/metadata`.
    pub async fn metadata_get(&self, app: &str, id: &str) -> Result<BTreeMap<String, String>, ClientError> {
        self.json(Method::GET, &machine_path(app, id, "/metadata"), None)
            .await
    }

    /// `PUT …/metadata`: sets keys, deletes those given as `None`.
    pub async fn metadata_update(
        &self,
        app: &str,
        id: &str,
        request: &UpdateMetadataRequest,
    ) -> Result<(), ClientError> {
        let body = self.body(request)?;
        self.send(Method::PUT, &machine_path(app, id, "/metadata"), Some(body))
            .await
            .map(drop)
    }

    /// `GET …/metadata/{key}`: the value (404 when unset).
    pub async fn metadata_key_get(&self, app: &str, id: &str, key: &str) -> Result<String, ClientError> {
        let path = machine_path(app, id, &format!("/metadata/{}", encode(key)));
        let value: MetadataValueResponse = self.json(Method::GET, &path, None).await?;
        Ok(value.value)
    }

    /// `POST …/metadata/{key}`.
    pub async fn metadata_key_set(
        &self,
        app: &str,
        id: &str,
        key: &str,
        value: &str,
    ) -> Result<(), ClientError> {
        let path = machine_path(app, id, &format!("/metadata/{}", encode(key)));
        let body = self.body(&UpsertMetadataKeyRequest {
            value: value.to_owned(),
            updated_at: None,
        })?;
        self.send(Method::POST, &path, Some(body)).await.map(drop)
    }

    /// `DELETE …/metadata/{key}`.
    pub async fn metadata_key_delete(&self, app: &str, id: &str, key: &str) -> Result<(), ClientError> {
        let path = machine_path(app, id, &format!("/metadata/{}", encode(key)));
        self.send(Method::DELETE, &path, None).await.map(drop)
    }

    /// `GET …/events[?limit=N]`: newest first.
    pub async fn machine_events(
        &self,
        app: &str,
        id: &str,
        limit: Option<usize>,
    ) -> Result<Vec<MachineEvent>, ClientError> {
        let query = limit.map_or_else(String::new, |n| format!("?limit={n}"));
        let path = format!("{}{query}", machine_path(app, id, "/events"));
        self.json(Method::GET, &path, None).await
    }

    /// `GET …/versions`: newest first.
    pub async fn machine_versions(&self, app: &str, id: &str) -> Result<Vec<MachineVersion>, ClientError> {
        self.json(Method::GET, &machine_path(app, id, "/versions"), None)
            .await
    }

    /// `GET …/ps`: the processes of a started machine.
    pub async fn machine_ps(&self, app: &str, id: &str) -> Result<Vec<ProcessStat>, ClientError> {
        self.json(Method::GET, &machine_path(app, id, "/ps"), None).await
    }

    /// `POST …/exec`: runs a command in a started machine and returns its output and exit code.
    /// The request may take the command's `timeout` (default 60 s) and a little more.
    pub async fn machine_exec(
        &self,
        app: &str,
        id: &str,
        request: &ExecRequest,
    ) -> Result<ExecResponse, ClientError> {
        let body = self.body(request)?;
        let limit = request
            .timeout
            .map_or(REQUEST_TIMEOUT, Duration::from_secs)
            .max(REQUEST_TIMEOUT)
            + SLACK;
        self.json_within(Method::POST, &machine_path(app, id, "/exec"), Some(body), limit)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries() {
        assert_eq!(ListMachinesParams::default().query(), "");
        let q = ListMachinesParams {
            include_deleted: true,
            region: Some("ams".into()),
            states: vec![MachineState::Started, MachineState::Stopped],
            summary: true,
            metadata: BTreeMap::from([("fly_process_group".to_owned(), "app x".to_owned())]),
        };
        assert_eq!(
            q.query(),
            "?include_deleted=true&region=ams&state=started%2Cstopped&summary=true&metadata.fly_process_group=app%20x"
        );
    }

    #[test]
    fn wait_queries_repeat_state_and_clamp_the_timeout() {
        let p = WaitParams {
            states: vec![WaitState::Started, WaitState::Settled],
            version: Some("01H".into()),
            from_event_id: Some("01J".into()),
        };
        assert_eq!(
            p.query(Duration::from_secs(300)),
            "?state=started&state=settled&timeout=60&version=01H&from_event_id=01J"
        );
        assert_eq!(
            WaitParams::state(WaitState::Stopped).query(Duration::from_millis(10)),
            "?state=stopped&timeout=1"
        );
    }
}
