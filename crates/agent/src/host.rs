//! The agent as the control plane reaches it: `impl aloft_api::MachineHost for Agent`, the
//! in-process implementation used by the embedded single-host setup. It maps the agent's verbs
//! and errors onto the Machines API's (`AgentError::to_api`); nothing here decides anything.

use std::time::Duration;

use aloft_api::{
    ApiError, ConsoleEvent, ConsoleExit, ConsoleRequest, ConsoleSession, ExecResponse, HostCreate,
    HostSnapshot, HostStop, HostUpdate, HostVolume, HostVolumeStatus, HostWait, LogEntry, LogFollower,
    Machine, MachineEvent, MachineHost, MachineId, MachineState, MachineVersion, ProcessStat, Signal,
    SnapshotId, TtySize, UpdateMetadataRequest, VolumeId, WaitResponse,
};

use crate::agent::{Agent, CreateMachine, StopOptions, UpdateMachine};
use crate::driver::{DriverError, DriverSession, OutputStream, SessionEvent};
use crate::error::AgentError;

/// How long a create may hold its request while the image is resolved and the disk made; after
/// that the machine is returned as recorded (`creating`) and the client waits for a state.
const CREATE_HOLD: Duration = Duration::from_secs(50);

/// How long a create that ended badly may take to report why (its rollback is short).
const CREATE_FAILURE_REPORT: Duration = Duration::from_secs(10);

#[expect(clippy::needless_pass_by_value, reason = "used as `map_err(api)`")]
/// The API error for `e`. A 500 hides the details from the client ("the server's log has the
/// details"), so they go to the log here.
fn api(e: AgentError) -> ApiError {
    let api = e.to_api();
    if api.status() >= 500 {
        eprintln!("aloft-agent: {}", aloft_api::error_chain(&e));
    }
    api
}

impl MachineHost for Agent {
    fn create(&self, req: HostCreate) -> Result<Machine, ApiError> {
        let id = req.id.clone();
        let op = self
            .create_with_secrets(
                CreateMachine {
                    id: Some(req.id),
                    app: req.app,
                    name: Some(req.name),
                    region: req.region,
                    org: req.org,
                    config: req.config,
                    skip_launch: req.skip_launch,
                },
                &req.secrets,
            )
            .map_err(api)?;
        let rec = self
            .wait_until(&id, CREATE_HOLD, |r| r.state != MachineState::Creating)
            .map_err(api)?;
        if matches!(
            rec.state,
            MachineState::Destroyed
                | MachineState::Destroying
                | MachineState::LaunchFailed
                | MachineState::Failed
        ) {
            // The create failed: its operation says why (422 when the user's input is at fault).
            op.wait(CREATE_FAILURE_REPORT).map_err(api)?;
        }
        self.machine(&id).map_err(api)
    }

    fn get(&self, id: &MachineId) -> Result<Machine, ApiError> {
        self.machine(id).map_err(api)
    }

    fn list(&self, app: &str) -> Result<Vec<Machine>, ApiError> {
        Ok(self
            .list_app(app)
            .map_err(api)?
            .into_iter()
            .map(|r| r.to_api(Vec::new()))
            .collect())
    }

    fn start(&self, id: &MachineId) -> Result<MachineState, ApiError> {
        Ok(self.start(id).map_err(api)?.previous_state)
    }

    fn stop(&self, id: &MachineId, how: HostStop) -> Result<(), ApiError> {
        let opts = StopOptions {
            signal: how.signal,
            timeout: how.timeout,
        };
        self.stop(id, opts).map(drop).map_err(api)
    }

    fn suspend(&self, id: &MachineId) -> Result<(), ApiError> {
        self.suspend(id).map(drop).map_err(api)
    }

    fn restart(&self, id: &MachineId, how: HostStop) -> Result<(), ApiError> {
        let opts = StopOptions {
            signal: how.signal,
            timeout: how.timeout,
        };
        self.restart(id, opts).map(drop).map_err(api)
    }

    fn update(&self, id: &MachineId, req: HostUpdate) -> Result<Machine, ApiError> {
        let op = self
            .update_with_secrets(
                id,
                &UpdateMachine {
                    config: req.config.clone(),
                    skip_launch: req.skip_launch,
                    current_version: req.current_version,
                },
                &req.secrets,
            )
            .map_err(api)?;
        // Answer with the new version and config (as Fly does) while the machine moves to it:
        // the version was fixed when the update was accepted.
        let mut m = self.machine(id).map_err(api)?;
        let new_version = self
            .operations(id)
            .map_err(api)?
            .into_iter()
            .rev()
            .find(|(o, _)| o.id == op.op_id)
            .and_then(|(o, _)| o.params.new_version);
        if let Some(v) = new_version {
            m.instance_id.clone_from(&v);
            m.version = Some(v);
            m.config = Some(req.config);
        }
        Ok(m)
    }

    fn destroy(&self, id: &MachineId, force: bool) -> Result<(), ApiError> {
        self.destroy(id, force).map(drop).map_err(api)
    }

    fn signal(&self, id: &MachineId, signal: Signal) -> Result<(), ApiError> {
        self.signal(id, signal).map_err(api)
    }

    fn exec(&self, id: &MachineId, argv: &[String], timeout: Duration) -> Result<ExecResponse, ApiError> {
        let r = self.exec(id, argv, timeout).map_err(api)?;
        Ok(ExecResponse {
            exit_code: r.exit_code,
            exit_signal: r.exit_signal,
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
        })
    }

    fn ps(&self, id: &MachineId) -> Result<Vec<ProcessStat>, ApiError> {
        self.ps(id).map_err(api)
    }

    fn events(&self, id: &MachineId, limit: usize) -> Result<Vec<MachineEvent>, ApiError> {
        self.events(id, limit).map_err(api)
    }

    fn versions(&self, id: &MachineId) -> Result<Vec<MachineVersion>, ApiError> {
        self.versions(id).map_err(api)
    }

    fn wait(&self, id: &MachineId, wait: &HostWait) -> Result<WaitResponse, ApiError> {
        let out = self
            .wait(
                id,
                &wait.states,
                wait.version.as_deref(),
                wait.from_event_id.as_deref(),
                wait.timeout,
            )
            .map_err(api)?;
        Ok(WaitResponse {
            ok: true,
            state: out.state,
            version: out.version,
            event_id: out.event_id,
        })
    }

    fn update_metadata(&self, id: &MachineId, req: &UpdateMetadataRequest) -> Result<Machine, ApiError> {
        self.update_metadata(id, req).map_err(api)?;
        self.machine(id).map_err(api)
    }

    fn log_tail(&self, id: &MachineId, lines: usize) -> Result<Vec<LogEntry>, ApiError> {
        self.log_tail(id, lines).map_err(api)
    }

    fn follow_logs(&self, id: &MachineId, after_seq: Option<u64>) -> Result<Box<dyn LogFollower>, ApiError> {
        Ok(Box::new(self.follow_logs(id, after_seq).map_err(api)?))
    }

    fn console(&self, id: &MachineId, req: ConsoleRequest) -> Result<Box<dyn ConsoleSession>, ApiError> {
        let session = self.console(id, &req).map_err(api)?;
        Ok(Box::new(AgentConsole {
            machine: id.clone(),
            session,
        }))
    }

    fn connect(&self, id: &MachineId, port: u16) -> Result<std::net::TcpStream, ApiError> {
        self.connect(id, port).map_err(api)
    }

    fn create_volume(&self, req: &HostVolume) -> Result<(), ApiError> {
        self.create_volume(&req.id, req.size_gb, req.source.as_ref())
            .map_err(api)
    }

    fn volume(&self, id: &VolumeId) -> Result<HostVolumeStatus, ApiError> {
        self.volume(id).map_err(api)
    }

    fn extend_volume(&self, id: &VolumeId, size_gb: u32) -> Result<bool, ApiError> {
        self.extend_volume(id, size_gb).map_err(api)
    }

    fn destroy_volume(&self, id: &VolumeId) -> Result<(), ApiError> {
        self.destroy_volume(id).map_err(api)
    }

    fn snapshot_volume(&self, id: &VolumeId, snapshot: &SnapshotId) -> Result<HostSnapshot, ApiError> {
        Ok(self.snapshot_volume(id, snapshot).map_err(api)?.to_api())
    }

    fn delete_snapshot(&self, snapshot: &SnapshotId) -> Result<(), ApiError> {
        self.delete_snapshot(snapshot).map_err(api)
    }
}

/// A console session as the control plane sees it: the driver's session, its errors mapped as
/// [`Agent::exec`]'s are (412 once the machine stopped, 400 for init's refusals, 500 else).
struct AgentConsole {
    machine: MachineId,
    session: Box<dyn DriverSession>,
}

impl AgentConsole {
    fn api(&self) -> impl FnOnce(DriverError) -> ApiError + use<> {
        let machine = self.machine.clone();
        move |source| api(AgentError::Driver { machine, source })
    }
}

impl ConsoleSession for AgentConsole {
    fn stdin(&mut self, data: &[u8]) -> Result<(), ApiError> {
        let api = self.api();
        self.session.stdin(data).map_err(api)
    }

    fn close_stdin(&mut self) -> Result<(), ApiError> {
        let api = self.api();
        self.session.close_stdin().map_err(api)
    }

    fn resize(&mut self, size: TtySize) -> Result<(), ApiError> {
        let api = self.api();
        self.session.resize(size.rows, size.cols).map_err(api)
    }

    fn signal(&mut self, signal: Signal) -> Result<(), ApiError> {
        let api = self.api();
        self.session.signal(signal.number()).map_err(api)
    }

    fn next(&mut self, timeout: Duration) -> Result<Option<ConsoleEvent>, ApiError> {
        let api = self.api();
        Ok(self.session.recv(timeout).map_err(api)?.map(|e| match e {
            SessionEvent::Output {
                stream: OutputStream::Stdout,
                data,
            } => ConsoleEvent::Stdout(data),
            SessionEvent::Output {
                stream: OutputStream::Stderr,
                data,
            } => ConsoleEvent::Stderr(data),
            SessionEvent::Exited { exit_code, signal } => {
                ConsoleEvent::Exit(ConsoleExit { exit_code, signal })
            }
        }))
    }
}
