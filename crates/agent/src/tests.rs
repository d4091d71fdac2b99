//! Fast tests with the fake driver: every verb's transitions, illegal verbs, failures and crashes
//! injected at every step, recovery, restart policies, concurrency and `wait`.

use std::time::Duration;

use aloft_api::{
    MachineConfig, MachineId, MachineRestart, MachineState, RestartPolicy, Signal, StopConfig, StopSignal,
    Verb, WaitState,
};

use crate::{
    Agent, AgentConfig, AgentError, CrashPhase, CreateMachine, DriverOp, ExitInfo, FakeDriver, Killswitch,
    OpStatus, RestartBackoff, StopOptions, UpdateMachine,
};

const T: Duration = Duration::from_secs(10);

struct Harness {
    dir: tempfile::TempDir,
    fake: FakeDriver,
}

impl Harness {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            fake: FakeDriver::new(),
        }
    }

    fn config(&self, killswitch: Option<Killswitch>) -> AgentConfig {
        AgentConfig {
            step_attempts: 3,
            retry_delay: Duration::from_millis(1),
            boot_timeout: Duration::from_secs(2),
            stop_timeout: Duration::from_millis(100),
            restart: RestartBackoff {
                initial: Duration::from_millis(2),
                max: Duration::from_millis(16),
                window: Duration::from_secs(600),
            },
            poll: Duration::from_millis(10),
            killswitch,
            ..AgentConfig::new(self.dir.path().join("agent.db"))
        }
    }

    fn open(&self) -> Agent {
        Agent::open(self.config(None), std::sync::Arc::new(self.fake.clone())).unwrap()
    }

    fn open_with(&self, switch: &Killswitch) -> Agent {
        Agent::open(
            self.config(Some(switch.clone())),
            std::sync::Arc::new(self.fake.clone()),
        )
        .unwrap()
    }
}

fn config(image: &str) -> MachineConfig {
    MachineConfig {
        image: Some(image.into()),
        ..MachineConfig::default()
    }
}

fn with_policy(policy: RestartPolicy, max: Option<u32>) -> MachineConfig {
    MachineConfig {
        restart: Some(MachineRestart {
            policy: Some(policy),
            max_retries: max,
            gpu_bid_price: None,
        }),
        ..config("busybox")
    }
}

fn create_req(config: MachineConfig, skip_launch: bool) -> CreateMachine {
    CreateMachine {
        app: "app1".into(),
        region: "local".into(),
        org: 1,
        config,
        skip_launch,
        ..CreateMachine::default()
    }
}

fn create(agent: &Agent, skip_launch: bool) -> MachineId {
    let h = agent.create(create_req(config("busybox"), skip_launch)).unwrap();
    h.wait(T).unwrap();
    h.machine
}

fn state(agent: &Agent, id: &MachineId) -> MachineState {
    agent.get(id).unwrap().state
}

fn settle(agent: &Agent, id: &MachineId) -> MachineState {
    agent
        .wait(id, &[WaitState::Settled], None, None, T)
        .unwrap()
        .state
}

/// The world matches the records: a started machine runs, no other does, live machines have their
/// disk, network and spec, destroyed ones and unknown ids have nothing.
fn assert_consistent(agent: &Agent, fake: &FakeDriver) {
    let world = fake.world();
    let machines = agent.list().unwrap();
    for m in &machines {
        assert!(m.op_id.is_none(), "{} still has operation {:?}", m.id, m.op_id);
        assert!(m.state.is_settled(), "{} is {}", m.id, m.state);
        assert_eq!(
            world.running(&m.id),
            m.state == MachineState::Started,
            "{} is {} but running={}",
            m.id,
            m.state,
            world.running(&m.id)
        );
        if m.state == MachineState::Destroyed {
            assert!(
                !world.residue().contains(&m.id),
                "destroyed {} left {world:?}",
                m.id
            );
        } else if m.state != MachineState::Failed {
            assert!(world.disks.contains_key(&m.id), "{} has no disk", m.id);
            assert!(world.nets.contains_key(&m.id), "{} has no network", m.id);
            assert!(world.specs.contains_key(&m.id), "{} has no spec", m.id);
        }
        for (op, _) in agent.operations(&m.id).unwrap() {
            assert!(
                !matches!(op.status, OpStatus::Running | OpStatus::Undoing),
                "{} operation {} is {:?}",
                m.id,
                op.id,
                op.status
            );
        }
    }
    for id in world.residue() {
        assert!(machines.iter().any(|m| m.id == id), "orphan {id} in {world:?}");
    }
}

#[test]
fn every_verb_walks_its_transitions() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    assert_eq!(state(&agent, &id), MachineState::Started);
    let m = agent.machine(&id).unwrap();
    assert_eq!(m.events[0].kind, "launch");
    assert_eq!(m.events[0].status, "started");
    assert!(m.private_ip.starts_with("fdaa:"), "{}", m.private_ip);
    assert_eq!(m.image_ref.unwrap().repository, "busybox");
    assert!(h.fake.world().running(&id));

    let stop = agent
        .stop(
            &id,
            StopOptions {
                signal: Some(Signal::SIGTERM),
                timeout: None,
            },
        )
        .unwrap();
    assert_eq!(stop.previous_state, MachineState::Started);
    assert_eq!(stop.wait(T).unwrap().state, MachineState::Stopped);
    let ev = &agent.events(&id, 1).unwrap()[0];
    assert_eq!((ev.kind.as_str(), ev.status.as_str()), ("stop", "stopped"));
    let exit = ev.request.as_ref().unwrap().exit_event.as_ref().unwrap();
    assert!(exit.requested_stop);
    assert_eq!(exit.guest_signal, 15);
    assert!(!h.fake.world().running(&id));

    // Start from stopped resets the writable disk.
    assert_eq!(
        agent.start(&id).unwrap().wait(T).unwrap().state,
        MachineState::Started
    );
    assert_eq!(h.fake.world().disks[&id], 2);

    assert_eq!(
        agent.suspend(&id).unwrap().wait(T).unwrap().state,
        MachineState::Suspended
    );
    assert!(h.fake.world().snapshots.contains(&id));
    // Start from suspended resumes, without a disk reset.
    let start = agent.start(&id).unwrap();
    assert_eq!(start.previous_state, MachineState::Suspended);
    assert_eq!(start.wait(T).unwrap().state, MachineState::Started);
    assert_eq!(h.fake.world().disks[&id], 2);
    assert!(!h.fake.world().snapshots.contains(&id));

    // Stop a suspended machine: the snapshot goes.
    agent.suspend(&id).unwrap().wait(T).unwrap();
    assert_eq!(
        agent
            .stop(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap()
            .state,
        MachineState::Stopped
    );
    assert!(!h.fake.world().snapshots.contains(&id));
    agent.start(&id).unwrap().wait(T).unwrap();

    let boots = h.fake.world().boots[&id];
    assert_eq!(
        agent
            .restart(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap()
            .state,
        MachineState::Started
    );
    assert_eq!(h.fake.world().boots[&id], boots + 1);

    // Update: a new version, the old one replaced.
    let v1 = agent.get(&id).unwrap().version;
    let rec = agent
        .update(
            &id,
            &UpdateMachine {
                config: config("busybox:v2"),
                current_version: Some(v1.clone()),
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(rec.state, MachineState::Started);
    assert_ne!(rec.version, v1);
    assert_eq!(rec.config.image.as_deref(), Some("busybox:v2"));
    assert_eq!(rec.resources.image.as_ref().unwrap().tag, "v2");
    let versions = agent.versions(&id).unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].version, rec.version);
    let old = agent
        .wait(&id, &[WaitState::Stopped], Some(&v1), None, Duration::ZERO)
        .unwrap();
    assert_eq!(old.state, MachineState::Replaced);
    // A stale version is refused (412).
    let stale = agent
        .update(
            &id,
            &UpdateMachine {
                config: config("busybox"),
                current_version: Some(v1),
                ..UpdateMachine::default()
            },
        )
        .unwrap_err();
    assert_eq!(stale.to_api().status(), 412, "{stale}");

    // Update of a stopped machine leaves it stopped.
    agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
    let rec = agent
        .update(
            &id,
            &UpdateMachine {
                config: config("busybox:v3"),
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(rec.state, MachineState::Stopped);
    assert!(!h.fake.world().running(&id));

    // Update of a started machine with skip_launch leaves it stopped too.
    agent.start(&id).unwrap().wait(T).unwrap();
    let rec = agent
        .update(
            &id,
            &UpdateMachine {
                config: config("busybox:v4"),
                skip_launch: true,
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(rec.state, MachineState::Stopped);

    agent.start(&id).unwrap().wait(T).unwrap();
    let e = agent.destroy(&id, false).unwrap_err();
    assert_eq!(e.to_api().status(), 412);
    assert!(e.to_string().contains("started"), "{e}");
    assert_eq!(
        agent.destroy(&id, true).unwrap().wait(T).unwrap().state,
        MachineState::Destroyed
    );
    assert!(h.fake.world().residue().is_empty());
    assert_consistent(&agent, &h.fake);
}

#[test]
fn skip_launch_creates_and_start_boots() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, true);
    assert_eq!(state(&agent, &id), MachineState::Created);
    assert!(!h.fake.world().running(&id));
    assert_eq!(agent.events(&id, 1).unwrap()[0].status, "created");
    agent.start(&id).unwrap().wait(T).unwrap();
    assert!(h.fake.world().running(&id));
    // From created, the fresh disk is not made again.
    assert_eq!(h.fake.world().disks[&id], 1);
    assert_consistent(&agent, &h.fake);
}

/// A machine brought into `target` (a persistent or terminal state).
fn machine_in(agent: &Agent, fake: &FakeDriver, target: MachineState) -> MachineId {
    let id = create(agent, target == MachineState::Created);
    match target {
        MachineState::Created | MachineState::Started => {}
        MachineState::Stopped => {
            agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
        }
        MachineState::Suspended => {
            agent.suspend(&id).unwrap().wait(T).unwrap();
        }
        MachineState::Failed => {
            agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
            fake.workload_fails_to_start();
            agent.start(&id).unwrap().wait(T).unwrap_err();
        }
        MachineState::Destroyed => {
            agent.destroy(&id, true).unwrap().wait(T).unwrap();
        }
        other => panic!("no recipe for {other}"),
    }
    assert_eq!(state(agent, &id), target);
    id
}

#[test]
fn illegal_verbs_are_refused_naming_the_state() {
    let h = Harness::new();
    let agent = h.open();
    type Call<'a> = &'a dyn Fn(&Agent, &MachineId) -> Result<(), AgentError>;
    // What a started fake machine's port connects to (see `FakeDriver`).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let verbs: [(Verb, Call<'_>); 11] = [
        (Verb::Start, &|a, id| a.start(id).map(drop)),
        (Verb::Stop, &|a, id| a.stop(id, StopOptions::default()).map(drop)),
        (Verb::Suspend, &|a, id| a.suspend(id).map(drop)),
        (Verb::Restart, &|a, id| {
            a.restart(id, StopOptions::default()).map(drop)
        }),
        (Verb::Update, &|a, id| {
            a.update(
                id,
                &UpdateMachine {
                    config: config("busybox"),
                    ..UpdateMachine::default()
                },
            )
            .map(drop)
        }),
        (Verb::Destroy { force: false }, &|a, id| {
            a.destroy(id, false).map(drop)
        }),
        (Verb::Destroy { force: true }, &|a, id| {
            a.destroy(id, true).map(drop)
        }),
        (Verb::Signal, &|a, id| a.signal(id, Signal::SIGUSR1)),
        (Verb::Exec, &|a, id| a.exec(id, &["true".into()], T).map(drop)),
        (Verb::Ps, &|a, id| a.ps(id).map(drop)),
        (Verb::Proxy, &|a, id| a.connect(id, port).map(drop)),
    ];
    let states = [
        MachineState::Created,
        MachineState::Started,
        MachineState::Stopped,
        MachineState::Suspended,
        MachineState::Failed,
        MachineState::Destroyed,
    ];
    for from in states {
        for (verb, call) in &verbs {
            let id = machine_in(&agent, &h.fake, from);
            let res = call(&agent, &id);
            if verb.can(from) {
                res.unwrap_or_else(|e| panic!("{verb} from {from}: {e}"));
                settle(&agent, &id);
            } else {
                let e = res.expect_err(&format!("{verb} from {from} must be refused"));
                assert!(matches!(e, AgentError::State(_)), "{verb} from {from}: {e:?}");
                assert_eq!(e.to_api().status(), 412, "{verb} from {from}");
                assert!(e.to_string().contains(from.as_str()), "{e}");
                assert_eq!(state(&agent, &id), from, "a refused verb changes nothing");
            }
        }
    }
    // Transient states: a machine whose start is blocked is `starting`.
    let id = machine_in(&agent, &h.fake, MachineState::Stopped);
    h.fake.block(DriverOp::StartVm);
    let start = agent.start(&id).unwrap();
    assert!(h.fake.wait_for_call(DriverOp::StartVm, id.as_str(), 2, T));
    assert_eq!(state(&agent, &id), MachineState::Starting);
    for (verb, call) in &verbs {
        if matches!(verb, Verb::Destroy { force: true }) {
            continue;
        }
        let e = call(&agent, &id).expect_err(&format!("{verb} while starting"));
        assert_eq!(e.to_api().status(), 412, "{verb}: {e}");
        assert!(e.to_string().contains("starting"), "{e}");
    }
    h.fake.unblock(DriverOp::StartVm);
    start.wait(T).unwrap();
    assert!(matches!(
        agent.start(&"00000000000000".parse().unwrap()),
        Err(AgentError::NotFound { .. })
    ));
    assert_consistent(&agent, &h.fake);
}

const CREATE_OPS: [DriverOp; 7] = [
    DriverOp::PullImage,
    DriverOp::BuildBase,
    DriverOp::CreateDisk,
    DriverOp::AttachNetwork,
    DriverOp::WriteSpec,
    DriverOp::StartVm,
    DriverOp::WaitStarted,
];

#[test]
fn create_survives_a_transient_failure_at_every_step() {
    for op in CREATE_OPS {
        let h = Harness::new();
        let agent = h.open();
        h.fake.fail(op, 2);
        let handle = agent.create(create_req(config("busybox"), false)).unwrap();
        let rec = handle.wait(T).unwrap_or_else(|e| panic!("{op}: {e}"));
        assert_eq!(rec.state, MachineState::Started, "{op}");
        let (_, steps) = agent.operations(&rec.id).unwrap().pop().unwrap();
        // wait_started retries within its boot timeout; every other step is attempted again.
        let retried = op == DriverOp::WaitStarted || steps.iter().any(|s| s.attempts == 3);
        assert!(retried, "{op}: {steps:?}");
        assert_consistent(&agent, &h.fake);
    }
}

#[test]
fn create_rolls_back_or_fails_cleanly_at_every_step() {
    for op in CREATE_OPS {
        let h = Harness::new();
        let agent = h.open();
        h.fake.fail_always(op);
        let handle = agent.create(create_req(config("busybox"), false)).unwrap();
        let e = handle.wait(T).unwrap_err();
        let AgentError::OperationFailed { state, .. } = &e else {
            panic!("{op}: {e:?}")
        };
        let booting = matches!(op, DriverOp::StartVm | DriverOp::WaitStarted);
        let expected = if booting {
            MachineState::Failed
        } else {
            MachineState::Destroyed
        };
        assert_eq!(*state, expected, "{op}: {e}");
        let world = h.fake.world();
        assert!(!world.running(&handle.machine), "{op}");
        if !booting {
            assert!(world.residue().is_empty(), "{op}: rollback left {world:?}");
            let ev = &agent.events(&handle.machine, 1).unwrap()[0];
            assert_eq!((ev.kind.as_str(), ev.status.as_str()), ("launch", "destroyed"));
            assert!(ev.request.as_ref().unwrap().extra.contains_key("error"));
        }
        h.fake.clear_faults();
        if booting {
            // A failed machine can be started again, or destroyed.
            agent.start(&handle.machine).unwrap().wait(T).unwrap();
            agent.destroy(&handle.machine, true).unwrap().wait(T).unwrap();
        }
        assert_consistent(&agent, &h.fake);
        assert!(h.fake.world().residue().is_empty(), "{op}");
    }
}

#[test]
fn a_missing_image_is_the_users_fault() {
    let h = Harness::new();
    let agent = h.open();
    h.fake.missing_image("nope:latest");
    let e = agent
        .create(create_req(config("nope:latest"), false))
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert_eq!(e.to_api().status(), 422, "{e}");
    assert!(e.to_string().contains("nope:latest"), "{e}");
    // An update to a missing image rolls back: same version, still running.
    let id = create(&agent, false);
    let v = agent.get(&id).unwrap().version;
    let e = agent
        .update(
            &id,
            &UpdateMachine {
                config: config("nope:latest"),
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::OperationFailed {
                state: MachineState::Started,
                ..
            }
        ),
        "{e:?}"
    );
    let rec = agent.get(&id).unwrap();
    assert_eq!(rec.version, v);
    assert_eq!(agent.versions(&id).unwrap().len(), 1);
    assert!(h.fake.world().running(&id));
    assert_consistent(&agent, &h.fake);
}

#[test]
fn invalid_configs_are_refused_before_anything_is_recorded() {
    let h = Harness::new();
    let agent = h.open();
    let e = agent
        .create(create_req(MachineConfig::default(), false))
        .unwrap_err();
    assert_eq!(e.to_api().status(), 400);
    let mut c = config("busybox");
    c.guest = Some(aloft_api::MachineGuest {
        cpus: Some(1),
        memory_mb: Some(100_000),
        ..aloft_api::MachineGuest::default()
    });
    let e = agent.create(create_req(c, false)).unwrap_err();
    assert!(e.to_string().contains("memory"), "{e}");
    assert!(agent.list().unwrap().is_empty());
    let id = create(&agent, true);
    let again = CreateMachine {
        id: Some(id.clone()),
        ..create_req(config("busybox"), false)
    };
    assert_eq!(agent.create(again).unwrap_err().to_api().status(), 409);
}

#[test]
fn stop_survives_failures() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    h.fake.fail(DriverOp::StopVm, 1);
    assert_eq!(
        agent
            .stop(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap()
            .state,
        MachineState::Stopped
    );
    agent.start(&id).unwrap().wait(T).unwrap();
    // A stop that keeps failing ends in a kill.
    h.fake.fail_always(DriverOp::StopVm);
    assert_eq!(
        agent
            .stop(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap()
            .state,
        MachineState::Stopped
    );
    assert!(!h.fake.world().running(&id));
    h.fake.clear_faults();
    agent.start(&id).unwrap().wait(T).unwrap();
    // Neither stop nor kill works: failed, and destroy (retried once the fault clears) cleans up.
    h.fake.fail_always(DriverOp::StopVm);
    h.fake.fail_always(DriverOp::KillVm);
    let e = agent
        .stop(&id, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::OperationFailed {
                state: MachineState::Failed,
                ..
            }
        ),
        "{e:?}"
    );
    h.fake.clear_faults();
    agent.destroy(&id, true).unwrap().wait(T).unwrap();
    assert_consistent(&agent, &h.fake);
}

const DESTROY_OPS: [DriverOp; 5] = [
    DriverOp::KillVm,
    DriverOp::DiscardSnapshot,
    DriverOp::RemoveMachineDir,
    DriverOp::RemoveDisk,
    DriverOp::DetachNetwork,
];

#[test]
fn destroy_completes_through_failures_at_every_step() {
    for op in DESTROY_OPS {
        let h = Harness::new();
        let agent = h.open();
        let id = create(&agent, false);
        h.fake.fail(op, 2);
        assert_eq!(
            agent.destroy(&id, true).unwrap().wait(T).unwrap().state,
            MachineState::Destroyed,
            "{op}"
        );
        assert_consistent(&agent, &h.fake);

        let id = create(&agent, false);
        h.fake.fail_always(op);
        let e = agent.destroy(&id, true).unwrap().wait(T).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::OperationFailed {
                    state: MachineState::Failed,
                    ..
                }
            ),
            "{op}: {e:?}"
        );
        h.fake.clear_faults();
        agent.destroy(&id, false).unwrap().wait(T).unwrap();
        assert_consistent(&agent, &h.fake);
        assert!(h.fake.world().residue().is_empty(), "{op}");
    }
}

#[test]
fn suspend_falls_back_to_stop_and_resume_to_a_cold_boot() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    h.fake.fail_always(DriverOp::SuspendVm);
    let e = agent.suspend(&id).unwrap().wait(T).unwrap_err();
    assert!(
        matches!(
            e,
            AgentError::OperationFailed {
                state: MachineState::Stopped,
                ..
            }
        ),
        "{e:?}"
    );
    h.fake.clear_faults();
    agent.start(&id).unwrap().wait(T).unwrap();
    agent.suspend(&id).unwrap().wait(T).unwrap();
    let disks = h.fake.world().disks[&id];
    h.fake.fail_always(DriverOp::ResumeVm);
    let rec = agent.start(&id).unwrap().wait(T).unwrap();
    assert_eq!(rec.state, MachineState::Started);
    // Cold boot without a rootfs reset; the error is in the event.
    assert_eq!(h.fake.world().disks[&id], disks);
    assert!(!h.fake.world().snapshots.contains(&id));
    let ev = &agent.events(&id, 1).unwrap()[0];
    assert!(ev.request.as_ref().unwrap().extra.contains_key("error"));
    h.fake.clear_faults();
    assert_consistent(&agent, &h.fake);
}

type VerbCall<'a> = &'a dyn Fn(&Agent, Option<&MachineId>) -> Result<crate::OpHandle, AgentError>;

/// Runs `verb` on a machine prepared by `setup`, crashing at `op`/`phase`; reopens and checks the
/// machine settles where the verb goes and nothing is orphaned.
fn crash_case(
    setup: MachineState,
    verb: VerbCall<'_>,
    op: DriverOp,
    phase: CrashPhase,
    expect: MachineState,
) {
    let h = Harness::new();
    let id = {
        let agent = h.open();
        (setup != MachineState::Creating).then(|| machine_in(&agent, &h.fake, setup))
    };
    let switch = Killswitch::new();
    let crashed_id = {
        let agent = h.open_with(&switch);
        h.fake.crash_at(op, phase, &switch);
        let handle = verb(&agent, id.as_ref()).unwrap();
        let res = handle.wait(T);
        let tripped = switch.is_tripped();
        h.fake.clear_faults();
        assert!(
            !tripped || matches!(res, Err(AgentError::Halted)),
            "{op} {phase:?}: {res:?}"
        );
        handle.machine
        // The agent is dropped here, as if killed.
    };
    let agent = h.open();
    let settled = settle(&agent, &crashed_id);
    assert_eq!(settled, expect, "{setup} → crash at {op} {phase:?}");
    assert_consistent(&agent, &h.fake);
    // Still controllable.
    if settled != MachineState::Destroyed {
        agent.destroy(&crashed_id, true).unwrap().wait(T).unwrap();
    }
    assert_consistent(&agent, &h.fake);
    assert!(h.fake.world().residue().is_empty());
}

#[test]
fn crashes_at_every_step_boundary_recover() {
    type Verb<'a> = VerbCall<'a>;
    let create: Verb<'_> = &|a, _| a.create(create_req(config("busybox"), false));
    let stop: Verb<'_> = &|a, id| a.stop(id.unwrap(), StopOptions::default());
    let start: Verb<'_> = &|a, id| a.start(id.unwrap());
    let restart: Verb<'_> = &|a, id| a.restart(id.unwrap(), StopOptions::default());
    let suspend: Verb<'_> = &|a, id| a.suspend(id.unwrap());
    let destroy: Verb<'_> = &|a, id| a.destroy(id.unwrap(), true);
    let update: Verb<'_> = &|a, id| {
        a.update(
            id.unwrap(),
            &UpdateMachine {
                config: config("busybox:v2"),
                ..UpdateMachine::default()
            },
        )
    };
    use DriverOp as D;
    use MachineState as S;
    let cases: Vec<(S, Verb<'_>, Vec<D>, S)> = vec![
        (S::Creating, create, CREATE_OPS.to_vec(), S::Started),
        (S::Started, stop, vec![D::StopVm], S::Stopped),
        (
            S::Stopped,
            start,
            vec![
                D::KillVm,
                D::AttachNetwork,
                D::CreateDisk,
                D::WriteSpec,
                D::StartVm,
                D::WaitStarted,
            ],
            S::Started,
        ),
        (
            S::Suspended,
            start,
            vec![D::ResumeVm, D::DiscardSnapshot, D::WaitStarted],
            S::Started,
        ),
        (
            S::Started,
            restart,
            vec![D::StopVm, D::CreateDisk, D::WriteSpec, D::StartVm, D::WaitStarted],
            S::Started,
        ),
        (S::Started, suspend, vec![D::SuspendVm], S::Suspended),
        (
            S::Started,
            update,
            vec![
                D::PullImage,
                D::BuildBase,
                D::StopVm,
                D::CreateDisk,
                D::WriteSpec,
                D::StartVm,
                D::WaitStarted,
            ],
            S::Started,
        ),
        (S::Started, destroy, DESTROY_OPS.to_vec(), S::Destroyed),
    ];
    for (setup, verb, ops, expect) in cases {
        for op in ops {
            for phase in [CrashPhase::Before, CrashPhase::After] {
                crash_case(setup, verb, op, phase, expect);
            }
        }
    }
}

#[test]
fn orphans_are_removed_on_open() {
    let h = Harness::new();
    let agent = h.open();
    let keep = create(&agent, false);
    drop(agent);
    // Things a machine the database never heard of left behind.
    let stray: MachineId = "0123456789abcd".parse().unwrap();
    use crate::Driver;
    h.fake.create_disk(&stray, 64).unwrap();
    h.fake.attach_network(&stray, 1).unwrap();
    let agent = h.open();
    let world = h.fake.world();
    assert!(!world.residue().contains(&stray), "{world:?}");
    assert!(world.running(&keep));
    assert_consistent(&agent, &h.fake);
}

#[test]
fn a_reopened_agent_reattaches_and_sees_exits() {
    let h = Harness::new();
    let id = {
        let agent = h.open();
        let a = create(&agent, false);
        let b = agent
            .create(create_req(with_policy(RestartPolicy::No, None), false))
            .unwrap();
        b.wait(T).unwrap();
        (a, b.machine)
    };
    let (a, b) = id;
    // b's workload exits while no agent runs.
    h.fake.exit_workload(
        &b,
        ExitInfo {
            exit_code: Some(1),
            ..ExitInfo::default()
        },
    );
    let agent = h.open();
    assert_eq!(
        agent
            .wait(&b, &[WaitState::Stopped], None, None, T)
            .unwrap()
            .state,
        MachineState::Stopped
    );
    let ev = &agent.events(&b, 1).unwrap()[0];
    assert_eq!((ev.kind.as_str(), ev.status.as_str()), ("exit", "stopped"));
    assert_eq!(
        ev.request
            .as_ref()
            .unwrap()
            .exit_event
            .as_ref()
            .unwrap()
            .exit_code,
        1
    );
    // a was reattached: its monitor sees an exit now (default policy: on-failure restarts it).
    assert_eq!(state(&agent, &a), MachineState::Started);
    let boots = h.fake.world().boots[&a];
    h.fake.exit_workload(
        &a,
        ExitInfo {
            exit_code: Some(2),
            ..ExitInfo::default()
        },
    );
    assert!(h.fake.wait_for_call(DriverOp::StartVm, a.as_str(), 2, T));
    let w = agent.wait(&a, &[WaitState::Started], None, None, T).unwrap();
    assert_eq!(w.state, MachineState::Started);
    settle(&agent, &a);
    assert_eq!(h.fake.world().boots[&a], boots + 1);
    assert_eq!(agent.get(&a).unwrap().restart_count, 1);
    // And is controllable.
    agent.stop(&a, StopOptions::default()).unwrap().wait(T).unwrap();
    assert_consistent(&agent, &h.fake);
}

fn crash_loop(config: MachineConfig, exit_code: i32) -> (Agent, Harness, MachineId) {
    let h = Harness::new();
    h.fake.exit_on_start(Some(ExitInfo {
        exit_code: Some(exit_code),
        ..ExitInfo::default()
    }));
    let agent = h.open();
    let handle = agent.create(create_req(config, false)).unwrap();
    handle.wait(T).unwrap();
    let id = handle.machine;
    (agent, h, id)
}

fn wait_settled_in(agent: &Agent, id: &MachineId, want: MachineState) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let rec = agent.get(id).unwrap();
        if rec.state == want && rec.op_id.is_none() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} is {} not {want}",
            rec.state
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn restart_policy_no_stops_after_the_first_exit() {
    let (agent, h, id) = crash_loop(with_policy(RestartPolicy::No, None), 1);
    wait_settled_in(&agent, &id, MachineState::Stopped);
    assert_eq!(h.fake.world().boots[&id], 1);
    let ev = &agent.events(&id, 1).unwrap()[0];
    let exit = ev.request.as_ref().unwrap().exit_event.as_ref().unwrap();
    assert!(!exit.restarting);
    assert_consistent(&agent, &h.fake);
}

#[test]
fn restart_policy_on_failure_gives_up_after_max_retries() {
    let (agent, h, id) = crash_loop(with_policy(RestartPolicy::OnFailure, Some(3)), 1);
    wait_settled_in(&agent, &id, MachineState::Stopped);
    // Give a (wrong) extra restart a chance to show up.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.fake.world().boots[&id], 4);
    let rec = agent.get(&id).unwrap();
    assert_eq!(rec.state, MachineState::Stopped);
    assert_eq!(rec.restart_count, 3);
    let exits: Vec<_> = agent
        .events(&id, 50)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "exit")
        .collect();
    assert_eq!(exits.len(), 4);
    let restarting: Vec<bool> = exits
        .iter()
        .map(|e| {
            e.request
                .as_ref()
                .unwrap()
                .exit_event
                .as_ref()
                .unwrap()
                .restarting
        })
        .collect();
    assert_eq!(restarting, [false, true, true, true], "newest first");
    // Backoff doubles per restart (2, 4, 8 ms here).
    let backoffs: Vec<u64> = agent
        .operations(&id)
        .unwrap()
        .into_iter()
        .filter(|(op, _)| op.source == aloft_api::EventSource::Flyd)
        .map(|(op, _)| op.params.backoff_ms)
        .collect();
    assert_eq!(backoffs, [2, 4, 8]);
    // A clean exit under on-failure is not restarted.
    let (agent, h, id) = crash_loop(with_policy(RestartPolicy::OnFailure, None), 0);
    wait_settled_in(&agent, &id, MachineState::Stopped);
    assert_eq!(h.fake.world().boots[&id], 1);
    // A user start counts afresh.
    h.fake.exit_on_start(None);
    agent.start(&id).unwrap().wait(T).unwrap();
    assert_eq!(agent.get(&id).unwrap().restart_count, 0);
}

#[test]
fn restart_policy_always_restarts_clean_exits() {
    let (agent, h, id) = crash_loop(with_policy(RestartPolicy::Always, Some(2)), 0);
    wait_settled_in(&agent, &id, MachineState::Stopped);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.fake.world().boots[&id], 3);
    // Without max_retries it keeps going until someone destroys it.
    let (agent, h, id) = crash_loop(with_policy(RestartPolicy::Always, None), 0);
    assert!(h.fake.wait_for_call(DriverOp::StartVm, id.as_str(), 6, T));
    let destroy = agent.destroy(&id, true).unwrap();
    destroy.wait(T).unwrap();
    assert_eq!(state(&agent, &id), MachineState::Destroyed);
    let boots = h.fake.world().boots[&id];
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.fake.world().boots[&id], boots, "no restart after destroy");
    assert_consistent(&agent, &h.fake);
}

#[test]
fn default_policy_is_on_failure_with_ten_retries_and_auto_destroy_destroys() {
    let (agent, h, id) = crash_loop(config("busybox"), 3);
    wait_settled_in(&agent, &id, MachineState::Stopped);
    assert_eq!(h.fake.world().boots[&id], 11);
    let mut c = with_policy(RestartPolicy::No, None);
    c.auto_destroy = Some(true);
    let (agent, h, id) = crash_loop(c, 0);
    wait_settled_in(&agent, &id, MachineState::Destroyed);
    assert!(h.fake.world().residue().is_empty());
    assert_consistent(&agent, &h.fake);
}

#[test]
fn kill_and_signals_reach_the_workload() {
    let h = Harness::new();
    let agent = h.open();
    let mut c = with_policy(RestartPolicy::No, None);
    c.stop_config = Some(StopConfig {
        signal: Some(StopSignal::SIGUSR1),
        timeout: None,
    });
    let handle = agent.create(create_req(c, false)).unwrap();
    handle.wait(T).unwrap();
    let id = handle.machine;
    let spec = &h.fake.world().specs[&id];
    assert_eq!(spec.run_config.stop_signal.as_deref(), Some("SIGUSR1"));
    assert_eq!(spec.run_config.runtime.machine_id, id.as_str());
    assert_eq!(spec.run_config.runtime.app_name, "app1");
    assert_eq!(spec.run_config.root.fstype, "erofs");
    let out = agent.exec(&id, &["echo".into(), "hi".into()], T).unwrap();
    assert_eq!(out.stdout, b"echo hi\n");
    assert_eq!(agent.ps(&id).unwrap().len(), 1);
    agent.signal(&id, Signal::SIGUSR2).unwrap();
    assert_eq!(state(&agent, &id), MachineState::Started);
    agent.kill(&id).unwrap();
    wait_settled_in(&agent, &id, MachineState::Stopped);
    let ev = &agent.events(&id, 1).unwrap()[0];
    assert_eq!(
        ev.request
            .as_ref()
            .unwrap()
            .exit_event
            .as_ref()
            .unwrap()
            .guest_signal,
        9
    );
    let e = agent.kill(&id).unwrap_err();
    assert_eq!(e.to_api().status(), 412, "{e}");
}

#[test]
fn machines_run_in_parallel_and_force_destroy_cancels() {
    let h = Harness::new();
    let agent = h.open();
    let a = machine_in(&agent, &h.fake, MachineState::Stopped);
    h.fake.block(DriverOp::StartVm);
    let start = agent.start(&a).unwrap();
    assert!(h.fake.wait_for_call(DriverOp::StartVm, a.as_str(), 2, T));
    // Another machine's operations go on while a's start is stuck.
    let b = machine_in(&agent, &h.fake, MachineState::Created);
    h.fake.unblock(DriverOp::StartVm);
    start.wait(T).unwrap();
    agent.stop(&a, StopOptions::default()).unwrap().wait(T).unwrap();

    h.fake.block(DriverOp::StartVm);
    let start = agent.start(&a).unwrap();
    assert!(h.fake.wait_for_call(DriverOp::StartVm, a.as_str(), 3, T));
    let destroy = agent.destroy(&a, true).unwrap();
    // Only one destroy.
    assert_eq!(agent.destroy(&a, true).unwrap_err().to_api().status(), 409);
    h.fake.unblock(DriverOp::StartVm);
    let e = start.wait(T).unwrap_err();
    assert!(matches!(e, AgentError::OperationFailed { .. }), "{e:?}");
    assert_eq!(destroy.wait(T).unwrap().state, MachineState::Destroyed);
    agent.start(&b).unwrap().wait(T).unwrap();
    assert_consistent(&agent, &h.fake);
}

#[test]
fn wait_answers_states_versions_and_events() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    let w = agent.wait(&id, &[WaitState::Started], None, None, T).unwrap();
    assert_eq!(w.state, MachineState::Started);
    assert!(!w.event_id.is_empty());
    let e = agent
        .wait(&id, &[WaitState::Stopped], None, None, Duration::from_millis(30))
        .unwrap_err();
    assert_eq!(e.to_api().status(), 408, "{e}");
    // A waiter is woken by the change it waits for.
    let from = w.event_id.clone();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| agent.wait(&id, &[WaitState::Stopped], None, None, T));
        std::thread::sleep(Duration::from_millis(20));
        agent.stop(&id, StopOptions::default()).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().state, MachineState::Stopped);
    });
    // from_event_id: the start that happened after `from` counts even once the machine moved on.
    agent.start(&id).unwrap().wait(T).unwrap();
    agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
    let w = agent
        .wait(&id, &[WaitState::Started], None, Some(&from), Duration::ZERO)
        .unwrap();
    assert_eq!(w.state, MachineState::Started);
    assert_ne!(w.event_id, from);
    assert_eq!(
        agent
            .wait(
                &id,
                &[WaitState::Started],
                None,
                Some("01NOTANEVENT0000000000000"),
                T
            )
            .unwrap_err()
            .to_api()
            .status(),
        400
    );
    assert_eq!(
        agent
            .wait(
                &id,
                &[WaitState::Started],
                Some("01NOTAVERSION000000000000"),
                None,
                T
            )
            .unwrap_err()
            .to_api()
            .status(),
        404
    );
    // settled
    assert_eq!(
        agent
            .wait(&id, &[WaitState::Settled], None, None, T)
            .unwrap()
            .state,
        MachineState::Stopped
    );
}

#[test]
fn graceful_shutdown_finishes_operations_and_leaves_vms_running() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    let other = machine_in(&agent, &h.fake, MachineState::Stopped);
    let handle = agent.start(&other).unwrap();
    agent.shutdown(T);
    assert!(matches!(handle.wait(T), Ok(_) | Err(AgentError::Halted)));
    assert!(h.fake.world().running(&id));
    let agent = h.open();
    assert_eq!(state(&agent, &id), MachineState::Started);
    assert_eq!(settle(&agent, &other), MachineState::Started);
    assert_consistent(&agent, &h.fake);
}

#[test]
fn crashes_during_a_rollback_recover() {
    for op in [
        DriverOp::KillVm,
        DriverOp::RemoveMachineDir,
        DriverOp::RemoveDisk,
        DriverOp::DetachNetwork,
    ] {
        for phase in [CrashPhase::Before, CrashPhase::After] {
            let h = Harness::new();
            let switch = Killswitch::new();
            let id = {
                let agent = h.open_with(&switch);
                // The create fails at write_spec for good, so its rollback runs; it crashes there.
                h.fake.fail_always(DriverOp::WriteSpec);
                h.fake.crash_at(op, phase, &switch);
                let handle = agent.create(create_req(config("busybox"), false)).unwrap();
                assert!(
                    matches!(handle.wait(T), Err(AgentError::Halted)),
                    "{op} {phase:?}"
                );
                assert_eq!(state(&agent, &handle.machine), MachineState::LaunchFailed);
                handle.machine
            };
            h.fake.clear_faults();
            let agent = h.open();
            assert_eq!(settle(&agent, &id), MachineState::Destroyed, "{op} {phase:?}");
            assert_consistent(&agent, &h.fake);
            assert!(h.fake.world().residue().is_empty(), "{op} {phase:?}");
        }
    }
}

#[test]
fn crashes_during_a_policy_restart_recover() {
    for op in [
        DriverOp::KillVm,
        DriverOp::AttachNetwork,
        DriverOp::WriteSpec,
        DriverOp::StartVm,
        DriverOp::WaitStarted,
    ] {
        for phase in [CrashPhase::Before, CrashPhase::After] {
            let h = Harness::new();
            let switch = Killswitch::new();
            let id = {
                let agent = h.open_with(&switch);
                let id = create(&agent, false);
                // The workload crashes; on-failure restarts it; the agent dies on the way.
                h.fake.crash_at(op, phase, &switch);
                h.fake.exit_workload(
                    &id,
                    ExitInfo {
                        exit_code: Some(1),
                        ..ExitInfo::default()
                    },
                );
                let deadline = std::time::Instant::now() + T;
                while !switch.is_tripped() {
                    assert!(std::time::Instant::now() < deadline, "{op} {phase:?}: no restart");
                    std::thread::sleep(Duration::from_millis(2));
                }
                id
            };
            h.fake.clear_faults();
            let agent = h.open();
            wait_settled_in(&agent, &id, MachineState::Started);
            assert_eq!(agent.get(&id).unwrap().restart_count, 1, "{op} {phase:?}");
            assert_consistent(&agent, &h.fake);
        }
    }
}

#[test]
fn agent_and_handles_can_be_shared_across_threads() {
    fn check<T: Send + Sync>() {}
    check::<Agent>();
    check::<crate::OpHandle>();
    check::<AgentError>();
    check::<crate::VmDriver>();
    check::<crate::HostNetwork>();
}

#[test]
fn rootfs_persist_keeps_the_writable_layer() {
    let h = Harness::new();
    let agent = h.open();
    for (persist, start_resets, restart_resets) in [
        (aloft_api::RootfsPersist::Never, true, true),
        (aloft_api::RootfsPersist::Restart, true, false),
        (aloft_api::RootfsPersist::Always, false, false),
    ] {
        let mut c = config("busybox");
        c.rootfs = Some(aloft_api::MachineRootfs {
            persist: Some(persist),
            size_gb: None,
        });
        let handle = agent.create(create_req(c, false)).unwrap();
        handle.wait(T).unwrap();
        let id = handle.machine;
        let disks = || h.fake.world().disks[&id];
        agent
            .restart(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap();
        assert_eq!(disks(), 1 + u64::from(restart_resets), "{persist:?} restart");
        let before = disks();
        agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
        agent.start(&id).unwrap().wait(T).unwrap();
        assert_eq!(disks(), before + u64::from(start_resets), "{persist:?} start");
    }
}

#[test]
fn metadata_changes_without_a_new_version() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    let v = agent.get(&id).unwrap().version;
    let mut req = aloft_api::UpdateMetadataRequest {
        machine_version: Some(v.clone()),
        ..aloft_api::UpdateMetadataRequest::default()
    };
    req.metadata
        .insert("fly_process_group".into(), Some("web".into()));
    let rec = agent.update_metadata(&id, &req).unwrap();
    assert_eq!(rec.config.metadata["fly_process_group"], "web");
    assert_eq!(rec.version, v);
    assert_eq!(h.fake.world().boots[&id], 1, "no reboot");
    req.metadata.insert("fly_process_group".into(), None);
    req.machine_version = Some("01STALE0000000000000000000".into());
    assert_eq!(
        agent.update_metadata(&id, &req).unwrap_err().to_api().status(),
        412
    );
    req.machine_version = None;
    assert!(
        agent
            .update_metadata(&id, &req)
            .unwrap()
            .config
            .metadata
            .is_empty()
    );
    agent.destroy(&id, true).unwrap().wait(T).unwrap();
    assert_eq!(
        agent.update_metadata(&id, &req).unwrap_err().to_api().status(),
        404
    );
}

#[test]
fn one_agent_per_database() {
    let h = Harness::new();
    let agent = h.open();
    let e = Agent::open(h.config(None), std::sync::Arc::new(h.fake.clone())).unwrap_err();
    assert!(matches!(e, AgentError::Locked { .. }), "{e:?}");
    drop(agent);
    drop(h.open());
}

#[test]
fn history_is_bounded() {
    let h = Harness::new();
    let agent = h.open();
    let id = create(&agent, false);
    for _ in 0..110 {
        agent
            .restart(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap();
    }
    let ops = agent.operations(&id).unwrap();
    assert_eq!(ops.len(), 111, "under the limit nothing goes");
    for _ in 0..100 {
        agent
            .restart(&id, StopOptions::default())
            .unwrap()
            .wait(T)
            .unwrap();
    }
    let ops = agent.operations(&id).unwrap();
    assert_eq!(ops.len(), 200);
    assert!(
        ops.iter()
            .all(|(op, steps)| op.kind == crate::OpKind::Restart && steps.len() == 5)
    );
    assert_eq!(agent.events(&id, 1000).unwrap().len(), 200);
    assert_consistent(&agent, &h.fake);
}

#[test]
fn machines_bigger_than_the_host_are_refused() {
    let h = Harness::new();
    let agent = Agent::open(
        AgentConfig {
            host_memory_mb: 1024,
            host_cpus: 2,
            ..h.config(None)
        },
        std::sync::Arc::new(h.fake.clone()),
    )
    .unwrap();
    let mut c = config("busybox");
    c.size = Some("shared-cpu-4x".into());
    let e = agent.create(create_req(c.clone(), false)).unwrap_err();
    let api = e.to_api();
    assert_eq!(api.status(), 422, "{e}");
    assert_eq!(api.body().status, aloft_api::ErrorStatus::InsufficientCapacity);
    assert!(e.to_string().contains("cpus"), "{e}");
    c.size = Some("performance-1x".into());
    let e = agent.create(create_req(c.clone(), false)).unwrap_err();
    assert!(e.to_string().contains("2048 MiB"), "{e}");
    let id = create(&agent, false);
    assert_eq!(
        agent
            .update(
                &id,
                &UpdateMachine {
                    config: c,
                    ..UpdateMachine::default()
                }
            )
            .unwrap_err()
            .to_api()
            .status(),
        422
    );
    assert!(agent.list().unwrap().len() == 1);
}

#[test]
fn scheduled_machines_start_again_when_their_period_is_up() {
    let h = Harness::new();
    let agent_config = AgentConfig {
        schedule_tick: Duration::from_millis(20),
        schedule_hour: Duration::from_millis(400),
        ..h.config(None)
    };
    let agent = Agent::open(agent_config, std::sync::Arc::new(h.fake.clone())).unwrap();
    let mut c = with_policy(RestartPolicy::No, None);
    c.schedule = Some("hourly".into());
    let handle = agent.create(create_req(c, false)).unwrap();
    handle.wait(T).unwrap();
    let id = handle.machine;
    let launched = std::time::Instant::now();
    // The job ends; the machine stays stopped until its hour (400 ms here) is up …
    h.fake.exit_workload(
        &id,
        ExitInfo {
            exit_code: Some(0),
            ..ExitInfo::default()
        },
    );
    wait_settled_in(&agent, &id, MachineState::Stopped);
    std::thread::sleep(Duration::from_millis(100));
    if launched.elapsed() < Duration::from_millis(350) {
        assert_eq!(
            agent.get(&id).unwrap().state,
            MachineState::Stopped,
            "started before its time"
        );
    }
    // … then the scheduler starts it.
    wait_settled_in(&agent, &id, MachineState::Started);
    assert!(
        launched.elapsed() >= Duration::from_millis(400),
        "{:?}",
        launched.elapsed()
    );
    let start = agent
        .events(&id, 10)
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "start")
        .unwrap();
    assert_eq!(start.source, Some(aloft_api::EventSource::Flyd));
    assert_eq!(h.fake.world().boots[&id], 2);

    // A schedule Fly does not have is refused up front.
    let mut bad = config("busybox");
    bad.schedule = Some("yearly".into());
    let e = agent.create(create_req(bad, false)).unwrap_err();
    assert!(matches!(e, AgentError::InvalidConfig { .. }), "{e}");
    assert!(e.to_string().contains("hourly, daily, weekly or monthly"), "{e}");
}

// --- Rotating the agent's secrets key ---

/// App secrets as the control plane hands them to a create or update.
fn secret_env(version: u64, db: &str) -> aloft_api::SecretEnv {
    aloft_api::SecretEnv {
        version,
        values: [("DB".to_owned(), db.to_owned())].into(),
    }
}

/// `DB` as the last boot of machine `id` got it.
fn booted_db(fake: &FakeDriver, id: &MachineId) -> Option<String> {
    fake.world().specs[id].run_config.env.get("DB").cloned()
}

/// The key ids the sealed secrets carried by `id`'s operations record.
fn op_key_ids(agent: &Agent, id: &MachineId) -> Vec<Option<String>> {
    agent
        .operations(id)
        .unwrap()
        .into_iter()
        .filter_map(|(op, _)| op.params.secrets.map(|s| s.sealed.key_id))
        .collect()
}

impl Harness {
    /// Opens the agent with `keys` as its secrets keys.
    fn open_keys(&self, keys: aloft_secretbox::Keyring) -> Agent {
        let config = AgentConfig {
            secrets_keys: Some(std::sync::Arc::new(keys)),
            ..self.config(None)
        };
        Agent::open(config, std::sync::Arc::new(self.fake.clone())).unwrap()
    }

    fn key_path(&self) -> std::path::PathBuf {
        self.config(None).secrets_key_path()
    }

    /// Moves the current key file aside to `name` (a rotation's first step): the next open
    /// creates a new one.
    fn move_key_aside(&self, name: &str) -> std::path::PathBuf {
        let old = self.dir.path().join(name);
        std::fs::rename(self.key_path(), &old).unwrap();
        old
    }

    /// The ring a rotation gives: the (new) key file as current, `previous` as previous keys.
    fn ring(&self, previous: &[&std::path::Path]) -> aloft_secretbox::Keyring {
        let mut ring =
            aloft_secretbox::Keyring::new(aloft_secretbox::Key::load_or_create(&self.key_path()).unwrap())
                .with_hint("give it with --agent-secrets-key-previous FILE");
        for p in previous {
            ring = ring.with_previous(aloft_secretbox::Key::load(p).unwrap());
        }
        ring
    }
}

/// An agent on `h` with one machine created with secret `one` (sealed with the agent's key): the
/// agent, the machine, and the key's id.
fn machine_with_a_secret(h: &Harness) -> (Agent, MachineId, String) {
    let agent = h.open();
    let key_id = aloft_secretbox::Key::load(&h.key_path())
        .unwrap()
        .id()
        .to_string();
    let handle = agent
        .create_with_secrets(create_req(config("busybox"), false), &secret_env(1, "one"))
        .unwrap();
    handle.wait(T).unwrap();
    (agent, handle.machine, key_id)
}

#[test]
fn a_rotated_agent_key_opens_and_reseals_what_the_previous_one_sealed() {
    let h = Harness::new();
    let (agent, id, a_id) = machine_with_a_secret(&h);
    assert_eq!(booted_db(&h.fake, &id).as_deref(), Some("one"));
    drop(agent);
    // An update with new secrets, cut off before it writes the spec: its copy of the secrets
    // (sealed with A) waits in the unfinished operation.
    let switch = Killswitch::new();
    {
        let agent = h.open_with(&switch);
        h.fake.crash_at(DriverOp::WriteSpec, CrashPhase::Before, &switch);
        let req = UpdateMachine {
            config: config("busybox"),
            ..UpdateMachine::default()
        };
        let handle = agent
            .update_with_secrets(&id, &req, &secret_env(2, "two"))
            .unwrap();
        assert!(matches!(handle.wait(T), Err(AgentError::Halted)));
        h.fake.clear_faults();
    }

    // Rotated: B current, A previous. The open re-seals the version's secrets and the
    // unfinished update's copy, and forgets the finished create's copy.
    let old = h.move_key_aside("agent-secrets.key.old");
    let agent = h.open_keys(h.ring(&[&old]));
    let b_id = aloft_secretbox::Key::load(&h.key_path())
        .unwrap()
        .id()
        .to_string();
    assert_ne!(a_id, b_id);
    let report = agent.secrets_resealed().clone();
    assert_eq!(report.resealed, 2, "{report:?}");
    assert_eq!(report.machines, 1, "{report:?}");
    assert_eq!(report.forgotten, 1, "{report:?}");
    assert!(report.unreadable.is_empty(), "{report:?}");
    // The update resumes and boots with its secrets.
    assert_eq!(settle(&agent, &id), MachineState::Started);
    assert_eq!(booted_db(&h.fake, &id).as_deref(), Some("two"));
    assert!(
        op_key_ids(&agent, &id)
            .iter()
            .all(|k| k.as_deref() == Some(b_id.as_str())),
        "{:?}",
        op_key_ids(&agent, &id)
    );
    drop(agent);

    // B alone: nothing left to re-seal, and a boot opens the version's secrets.
    let agent = h.open();
    assert_eq!(agent.secrets_resealed(), &crate::SecretsReseal::default());
    agent
        .restart(&id, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(booted_db(&h.fake, &id).as_deref(), Some("two"));
    assert_eq!(h.fake.world().boots[&id], 3);
}

#[test]
fn a_missing_agent_key_is_named_with_its_id_and_where_to_give_it() {
    let h = Harness::new();
    let (agent, id, a_id) = machine_with_a_secret(&h);
    drop(agent);

    // A new key, and A not given: the agent opens all the same and reports the value,
    // naming A's id and the hint; a boot of that version fails with the same message.
    let old = h.move_key_aside("lost.key");
    let agent = h.open_keys(h.ring(&[]));
    let report = agent.secrets_resealed().clone();
    assert_eq!(report.resealed, 0, "{report:?}");
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    let why = &report.unreadable[0];
    for part in [id.as_str(), a_id.as_str(), "--agent-secrets-key-previous"] {
        assert!(why.contains(part), "{part:?} missing: {why}");
    }
    assert!(!why.contains("one"), "{why}");
    assert_eq!(settle(&agent, &id), MachineState::Started);
    let e = agent
        .restart(&id, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&a_id) && e.contains("--agent-secrets-key-previous"),
        "{e}"
    );
    drop(agent);

    // Given A again: re-sealed, and the machine boots with its secrets.
    let agent = h.open_keys(h.ring(&[&old]));
    assert_eq!(agent.secrets_resealed().resealed, 1);
    assert!(agent.secrets_resealed().unreadable.is_empty());
    agent.start(&id).unwrap().wait(T).unwrap();
    assert_eq!(booted_db(&h.fake, &id).as_deref(), Some("one"));
}

fn vol(s: &str) -> aloft_api::VolumeId {
    s.parse().unwrap()
}

fn mounting(volume: &str, path: &str) -> MachineConfig {
    MachineConfig {
        mounts: vec![aloft_api::MachineMount {
            volume: Some(volume.into()),
            path: Some(path.into()),
            name: Some("data".into()),
            size_gb: Some(1),
            ..aloft_api::MachineMount::default()
        }],
        ..config("busybox")
    }
}

fn create_mounting(agent: &Agent, volume: &str, skip_launch: bool) -> MachineId {
    let h = agent
        .create(create_req(mounting(volume, "/data"), skip_launch))
        .unwrap();
    h.wait(T).unwrap();
    h.machine
}

#[test]
fn volumes_are_made_once_and_reported() {
    let h = Harness::new();
    let agent = h.open();
    let id = vol("vol_0123456789abcdef");
    assert_eq!(agent.volume(&id).unwrap_err().to_api().status(), 404);
    agent.create_volume(&id, 3, None).unwrap();
    // A retried create keeps the disk as it is.
    agent.create_volume(&id, 7, None).unwrap();
    assert_eq!(h.fake.world().volumes[&id].size_gb, 3);
    let st = agent.volume(&id).unwrap();
    assert_eq!(st.size_gb, 3);
    assert_eq!(st.attached_machine_id, None);
    let usage = st.usage.unwrap();
    assert_eq!(usage.blocks * usage.block_size, 3 << 30);
    for bad in [0, 501] {
        let e = agent.create_volume(&vol("vol_other"), bad, None).unwrap_err();
        assert_eq!(e.to_api().status(), 422, "{e}");
    }
    assert!(!h.fake.world().volumes.contains_key(&vol("vol_other")));
    // Destroying a volume with no disk is fine (a retried destroy).
    agent.destroy_volume(&vol("vol_other")).unwrap();
    agent.destroy_volume(&id).unwrap();
    assert!(h.fake.world().volumes.is_empty());
    assert_eq!(agent.volume(&id).unwrap_err().to_api().status(), 404);
}

#[test]
fn a_mount_is_checked_before_anything_is_recorded() {
    let h = Harness::new();
    let agent = h.open();
    agent.create_volume(&vol("vol_a"), 1, None).unwrap();
    let two = MachineConfig {
        mounts: [mounting("vol_a", "/a").mounts, mounting("vol_b", "/b").mounts].concat(),
        ..config("busybox")
    };
    let cases = [
        (two, "only one volume per machine"),
        (
            mounting("vol_nothere", "/data"),
            "volume vol_nothere is not on this host",
        ),
        (mounting("not-a-volume", "/data"), "mounts[0].volume"),
        (mounting("", "/data"), "mounts[0].volume is required"),
        (mounting("vol_a", "data"), "not an absolute path"),
        (mounting("vol_a", "/"), "root filesystem"),
        (mounting("vol_a", "/a/../b"), "not a normalized path"),
        (mounting("vol_a", "/proc/x"), "in /proc"),
        (mounting("vol_a", ""), "mounts[0].path is required"),
        (mounting("vol_a", " /data"), "not an absolute path"),
    ];
    for (c, says) in cases {
        let e = agent.create(create_req(c, false)).unwrap_err();
        let api = e.to_api();
        assert_eq!(api.status(), 422, "{e}");
        assert!(
            api.message().contains(says),
            "{} does not say {says:?}",
            api.message()
        );
    }
    assert!(agent.list().unwrap().is_empty(), "nothing recorded");
    assert!(h.fake.world().specs.is_empty());
}

#[test]
fn a_volume_is_mounted_by_one_machine_at_a_time() {
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_0123456789abcdef");
    agent.create_volume(&v, 1, None).unwrap();
    let a = create_mounting(&agent, v.as_str(), false);
    // The boot attaches the disk, and init is told to mount it by its disk's serial.
    let spec = h.fake.world().specs[&a].clone();
    assert_eq!(spec.volumes.len(), 1);
    assert_eq!(spec.volumes[0].volume, v);
    assert_eq!(
        spec.volumes[0].disk,
        std::path::PathBuf::from(format!("/fake/volumes/{v}.ext4"))
    );
    let m = &spec.run_config.mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(
        (m[0].volume.as_str(), m[0].path.as_str(), m[0].fstype.as_str()),
        (v.as_str(), "/data", "ext4")
    );
    assert_eq!(m[0].serial, aloft_vm::disk_serial(crate::FIRST_VOLUME_DISK));
    assert_eq!(agent.volume(&v).unwrap().attached_machine_id, Some(a.clone()));

    // Another machine may not take it, created or updated to it; stopped does not free it.
    agent.stop(&a, StopOptions::default()).unwrap().wait(T).unwrap();
    let e = agent
        .create(create_req(mounting(v.as_str(), "/data"), false))
        .unwrap_err();
    let api = e.to_api();
    assert_eq!(api.status(), 422, "{e}");
    assert!(api.message().contains(a.as_str()), "{}", api.message());
    let b = create(&agent, false);
    let e = agent
        .update(
            &b,
            &UpdateMachine {
                config: mounting(v.as_str(), "/data"),
                ..UpdateMachine::default()
            },
        )
        .unwrap_err();
    assert_eq!(e.to_api().status(), 422, "{e}");
    assert!(e.to_string().contains(a.as_str()), "{e}");
    assert!(agent.get(&b).unwrap().config.mounts.is_empty());

    // The machine that has it keeps it through an update, at another path.
    agent
        .update(
            &a,
            &UpdateMachine {
                config: mounting(v.as_str(), "/var/lib/data/"),
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap();
    agent.start(&a).unwrap().wait(T).unwrap();
    assert_eq!(
        h.fake.world().specs[&a].run_config.mounts[0].path,
        "/var/lib/data"
    );

    // Once it is destroyed, the volume is free for another machine.
    agent.destroy(&a, true).unwrap().wait(T).unwrap();
    assert_eq!(agent.volume(&v).unwrap().attached_machine_id, None);
    agent
        .update(
            &b,
            &UpdateMachine {
                config: mounting(v.as_str(), "/data"),
                ..UpdateMachine::default()
            },
        )
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(agent.volume(&v).unwrap().attached_machine_id, Some(b.clone()));
    assert_consistent(&agent, &h.fake);
}

#[test]
fn an_update_in_flight_holds_the_volume_it_installs() {
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let a = create(&agent, false);
    h.fake.block(DriverOp::PullImage);
    let op = agent
        .update(
            &a,
            &UpdateMachine {
                config: mounting("vol_a", "/data"),
                ..UpdateMachine::default()
            },
        )
        .unwrap();
    assert!(h.fake.wait_for_call(DriverOp::PullImage, "busybox", 2, T));
    // The update has not installed its config yet, and the volume is taken all the same.
    assert!(agent.get(&a).unwrap().config.mounts.is_empty());
    let e = agent
        .create(create_req(mounting("vol_a", "/data"), false))
        .unwrap_err();
    assert!(e.to_string().contains(a.as_str()), "{e}");
    let e = agent.destroy_volume(&v).unwrap_err();
    assert_eq!(e.to_api().status(), 412, "{e}");
    h.fake.unblock(DriverOp::PullImage);
    op.wait(T).unwrap();
    assert_eq!(agent.volume(&v).unwrap().attached_machine_id, Some(a));
}

#[test]
fn a_mounted_volume_is_not_destroyed() {
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let a = create_mounting(&agent, "vol_a", true);
    let e = agent.destroy_volume(&v).unwrap_err();
    let api = e.to_api();
    assert_eq!(api.status(), 412, "{e}");
    assert!(api.message().contains(a.as_str()), "{}", api.message());
    assert!(h.fake.world().volumes.contains_key(&v), "the disk stays");
    agent.destroy(&a, false).unwrap().wait(T).unwrap();
    agent.destroy_volume(&v).unwrap();
    assert!(h.fake.world().volumes.is_empty());
}

/// Index of the first call of `op` for `what` after position `from` in the fake's calls.
fn call_after(fake: &FakeDriver, from: usize, op: DriverOp, what: &str) -> Option<usize> {
    fake.world()
        .calls
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, (o, w))| *o == op && w == what)
        .map(|(i, _)| i)
}

#[test]
fn an_extend_grows_the_filesystem_when_no_vm_has_it_and_before_the_next_boot_otherwise() {
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    let fs_gb = || h.fake.world().volumes[&v].fs_gb;
    agent.create_volume(&v, 1, None).unwrap();
    // Not mounted: grown at once.
    assert!(!agent.extend_volume(&v, 2).unwrap());
    assert_eq!(fs_gb(), 2);
    // Volumes never shrink, and only exist where they were made.
    assert_eq!(agent.extend_volume(&v, 1).unwrap_err().to_api().status(), 422);
    assert_eq!(
        agent
            .extend_volume(&vol("vol_b"), 2)
            .unwrap_err()
            .to_api()
            .status(),
        404
    );
    // A retried extend that is done changes nothing.
    assert!(!agent.extend_volume(&v, 2).unwrap());

    // Mounted by a stopped machine: grown at once, no restart needed.
    let a = create_mounting(&agent, "vol_a", true);
    assert!(!agent.extend_volume(&v, 3).unwrap());
    assert_eq!(fs_gb(), 3);
    assert_eq!(agent.volume(&v).unwrap().size_gb, 3);

    // Started: the disk grows now, its filesystem before the next boot.
    agent.start(&a).unwrap().wait(T).unwrap();
    assert!(agent.extend_volume(&v, 4).unwrap());
    assert_eq!(h.fake.world().volumes[&v].size_gb, 4);
    assert_eq!(fs_gb(), 3, "not under a running VM");
    let status = agent.volume(&v).unwrap();
    assert_eq!(status.size_gb, 4);
    assert_eq!(
        status.usage.unwrap().blocks,
        3 << 18,
        "the filesystem still has 3 GB"
    );
    let from = h.fake.world().calls.len();
    agent
        .restart(&a, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(fs_gb(), 4);
    let grown = call_after(&h.fake, from, DriverOp::GrowVolumeFs, "vol_a").unwrap();
    let stopped = call_after(&h.fake, from, DriverOp::StopVm, a.as_str()).unwrap();
    let booted = call_after(&h.fake, from, DriverOp::StartVm, a.as_str()).unwrap();
    assert!(
        stopped < grown && grown < booted,
        "grown between the stop and the boot"
    );
    let log = agent.log_tail(&a, 50).unwrap();
    assert!(
        log.iter().any(|l| l.message.contains("vol_a: filesystem grown")),
        "{log:#?}"
    );

    // Suspended: its snapshot has the filesystem mounted; a resume keeps the old size, and the
    // next cold boot grows it.
    agent.suspend(&a).unwrap().wait(T).unwrap();
    assert!(agent.extend_volume(&v, 5).unwrap());
    agent.start(&a).unwrap().wait(T).unwrap();
    assert_eq!(fs_gb(), 4, "a resumed snapshot keeps the size it had");
    agent.stop(&a, StopOptions::default()).unwrap().wait(T).unwrap();
    assert_eq!(fs_gb(), 4, "a stop alone does not grow it");
    agent.start(&a).unwrap().wait(T).unwrap();
    assert_eq!(fs_gb(), 5);

    // A machine being started counts as one that has the disk.
    agent.stop(&a, StopOptions::default()).unwrap().wait(T).unwrap();
    h.fake.block(DriverOp::AttachNetwork);
    let op = agent.start(&a).unwrap();
    assert!(h.fake.wait_for_call(DriverOp::AttachNetwork, a.as_str(), 1, T));
    assert!(agent.extend_volume(&v, 6).unwrap());
    assert_eq!(fs_gb(), 5);
    h.fake.unblock(DriverOp::AttachNetwork);
    op.wait(T).unwrap();
    assert_eq!(fs_gb(), 6, "the boot in flight grew it before it started the VM");
    assert_consistent(&agent, &h.fake);
}

#[test]
fn a_failed_growth_does_not_stop_the_boot() {
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let a = create_mounting(&agent, "vol_a", false);
    assert!(agent.extend_volume(&v, 2).unwrap());
    h.fake.fail_always(DriverOp::GrowVolumeFs);
    agent
        .restart(&a, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(state(&agent, &a), MachineState::Started);
    assert_eq!(h.fake.world().volumes[&v].fs_gb, 1);
    let log = agent.log_tail(&a, 50).unwrap();
    assert!(
        log.iter()
            .any(|l| l.message.contains("could not grow its filesystem")),
        "{log:#?}"
    );
    h.fake.clear_faults();
    agent
        .restart(&a, StopOptions::default())
        .unwrap()
        .wait(T)
        .unwrap();
    assert_eq!(h.fake.world().volumes[&v].fs_gb, 2, "the next boot tries again");
}

fn snap(s: &str) -> aloft_api::SnapshotId {
    s.parse().unwrap()
}

/// The positions in the fake's calls of `ops` (each with its `what`), in order, from `from`;
/// panics naming the first one missing.
fn calls_in_order(fake: &FakeDriver, from: usize, ops: &[(DriverOp, &str)]) -> Vec<usize> {
    let mut at = from;
    ops.iter()
        .map(|(op, what)| {
            let i = call_after(fake, at, *op, what)
                .unwrap_or_else(|| panic!("no {op} {what} after {at}: {:#?}", fake.world().calls));
            at = i + 1;
            i
        })
        .collect()
}

#[test]
fn snapshots_restores_and_forks_carry_a_volume_s_data() {
    use aloft_api::VolumeSource;
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    let s1 = snap("vs_1");
    agent.create_volume(&v, 2, None).unwrap();
    assert!(h.fake.write_volume(&v, 42));

    let info = agent.snapshot_volume(&v, &s1).unwrap();
    assert_eq!(info.volume, v);
    assert_eq!(info.volume_size, 2 << 30);
    assert!(info.digest.starts_with("sha256:"), "{}", info.digest);
    // A retake is answered as it is, without a second copy, whatever the volume holds now.
    assert!(h.fake.write_volume(&v, 43));
    assert_eq!(agent.snapshot_volume(&v, &s1).unwrap(), info);
    let copies = |op| h.fake.world().calls.iter().filter(|(o, _)| *o == op).count();
    assert_eq!(copies(DriverOp::SnapshotVolume), 1);
    assert_eq!(agent.volume_snapshot(&s1).unwrap(), Some(info.clone()));
    // Through the host interface, as the control plane sees it.
    let host: &dyn aloft_api::MachineHost = &agent;
    assert_eq!(host.snapshot_volume(&v, &s1).unwrap(), info.to_api());

    // A restore is the snapshot's data, grown to the size asked.
    let restored = vol("vol_restored");
    let from_s1 = VolumeSource::Snapshot(s1.clone());
    agent.create_volume(&restored, 3, Some(&from_s1)).unwrap();
    let r = h.fake.world().volumes[&restored];
    assert_eq!((r.data, r.size_gb, r.fs_gb), (42, 3, 3));
    assert_eq!(agent.volume(&restored).unwrap().size_gb, 3);
    // A retried restore keeps the disk as it is.
    assert!(h.fake.write_volume(&restored, 7));
    agent.create_volume(&restored, 3, Some(&from_s1)).unwrap();
    assert_eq!(h.fake.world().volumes[&restored].data, 7);

    // A fork is the source's data as it is now.
    let fork = vol("vol_fork");
    agent
        .create_volume(&fork, 2, Some(&VolumeSource::Volume(v.clone())))
        .unwrap();
    let f = h.fake.world().volumes[&fork];
    assert_eq!((f.data, f.size_gb, f.fs_gb), (43, 2, 2));

    // What cannot be done says why.
    let status = |e: AgentError| (e.to_api().status(), e.to_api().message().to_owned());
    let (code, msg) = status(
        agent
            .create_volume(&vol("vol_small"), 1, Some(&from_s1))
            .unwrap_err(),
    );
    assert_eq!(code, 422, "{msg}");
    assert!(msg.contains("snapshot vs_1 holds 2 GB"), "{msg}");
    let (code, msg) = status(
        agent
            .create_volume(&vol("vol_small"), 1, Some(&VolumeSource::Volume(v.clone())))
            .unwrap_err(),
    );
    assert_eq!(code, 422, "{msg}");
    assert!(msg.contains("volume vol_a holds 2 GB"), "{msg}");
    let (code, msg) = status(
        agent
            .create_volume(&v, 2, Some(&VolumeSource::Volume(v.clone())))
            .unwrap_err(),
    );
    assert_eq!(code, 422, "{msg}");
    let missing = VolumeSource::Snapshot(snap("vs_missing"));
    let (code, msg) = status(agent.create_volume(&vol("vol_x"), 2, Some(&missing)).unwrap_err());
    assert_eq!((code, msg.as_str()), (404, "snapshot vs_missing not found"));
    let (code, msg) = status(
        agent
            .create_volume(&vol("vol_x"), 2, Some(&VolumeSource::Volume(vol("vol_missing"))))
            .unwrap_err(),
    );
    assert_eq!((code, msg.as_str()), (404, "volume vol_missing not found"));
    let (code, _) = status(
        agent
            .snapshot_volume(&vol("vol_missing"), &snap("vs_2"))
            .unwrap_err(),
    );
    assert_eq!(code, 404);
    let (code, msg) = status(agent.snapshot_volume(&fork, &s1).unwrap_err());
    assert_eq!(code, 409, "{msg}");
    assert!(msg.contains("vs_1 is a snapshot of volume vol_a"), "{msg}");
    for v in ["vol_small", "vol_x"] {
        assert!(!h.fake.world().volumes.contains_key(&vol(v)), "{v} was not made");
    }

    // A snapshot outlives its volume, and goes when deleted.
    agent.destroy_volume(&v).unwrap();
    assert_eq!(agent.volume_snapshot(&s1).unwrap(), Some(info));
    let again = vol("vol_again");
    agent.create_volume(&again, 2, Some(&from_s1)).unwrap();
    assert_eq!(h.fake.world().volumes[&again].data, 42);
    host.delete_snapshot(&s1).unwrap();
    agent.delete_snapshot(&s1).unwrap();
    assert_eq!(agent.volume_snapshot(&s1).unwrap(), None);
    assert!(h.fake.world().volume_snapshots.is_empty());
    let (code, _) = status(
        agent
            .create_volume(&vol("vol_late"), 2, Some(&from_s1))
            .unwrap_err(),
    );
    assert_eq!(code, 404);
}

#[test]
fn a_started_machine_s_vm_is_paused_around_the_copy_only() {
    use aloft_api::VolumeSource;
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let m = create_mounting(&agent, "vol_a", false);
    assert_eq!(state(&agent, &m), MachineState::Started);

    let from = h.fake.world().calls.len();
    agent.snapshot_volume(&v, &snap("vs_1")).unwrap();
    calls_in_order(
        &h.fake,
        from,
        &[
            (DriverOp::SnapshotVolume, "vol_a"),
            (DriverOp::PauseVm, m.as_str()),
            (DriverOp::ContinueVm, m.as_str()),
        ],
    );
    assert_eq!(state(&agent, &m), MachineState::Started);
    assert!(h.fake.world().running(&m), "it runs on");

    let from = h.fake.world().calls.len();
    agent
        .create_volume(&vol("vol_b"), 1, Some(&VolumeSource::Volume(v.clone())))
        .unwrap();
    calls_in_order(
        &h.fake,
        from,
        &[
            (DriverOp::ForkVolume, "vol_b"),
            (DriverOp::PauseVm, m.as_str()),
            (DriverOp::ContinueVm, m.as_str()),
        ],
    );

    // A suspended machine's disk is not written: no pause; nor a stopped one's.
    agent.suspend(&m).unwrap().wait(T).unwrap();
    assert_eq!(state(&agent, &m), MachineState::Suspended);
    let from = h.fake.world().calls.len();
    agent.snapshot_volume(&v, &snap("vs_2")).unwrap();
    agent.stop(&m, StopOptions::default()).unwrap().wait(T).unwrap();
    agent.snapshot_volume(&v, &snap("vs_3")).unwrap();
    let calls = &h.fake.world().calls[from..];
    assert!(!calls.iter().any(|(o, _)| *o == DriverOp::PauseVm), "{calls:#?}");
    assert_eq!(
        calls
            .iter()
            .filter(|(o, _)| *o == DriverOp::SnapshotVolume)
            .count(),
        2
    );
}

#[test]
fn a_machine_s_operations_wait_for_a_copy_of_its_volume_and_a_copy_for_its_operations() {
    let h = Harness::new();
    let agent = std::sync::Arc::new(h.open());
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let m = create_mounting(&agent, "vol_a", false);

    // A stop asked for while the copy is made waits for it.
    h.fake.block(DriverOp::SnapshotVolume);
    let taking = {
        let agent = agent.clone();
        let v = v.clone();
        std::thread::spawn(move || agent.snapshot_volume(&v, &snap("vs_1")))
    };
    assert!(h.fake.wait_for_call(DriverOp::SnapshotVolume, "vol_a", 1, T));
    let stopping = {
        let agent = agent.clone();
        let m = m.clone();
        std::thread::spawn(move || agent.stop(&m, StopOptions::default()).map(|h| h.wait(T)))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(state(&agent, &m), MachineState::Started, "the stop waits");
    h.fake.unblock(DriverOp::SnapshotVolume);
    taking.join().unwrap().unwrap();
    stopping.join().unwrap().unwrap().unwrap();
    assert_eq!(state(&agent, &m), MachineState::Stopped);
    // Paused and continued for the copy, stopped only after.
    calls_in_order(
        &h.fake,
        0,
        &[
            (DriverOp::PauseVm, m.as_str()),
            (DriverOp::ContinueVm, m.as_str()),
            (DriverOp::StopVm, m.as_str()),
        ],
    );

    // A copy asked for while an operation runs waits for its end (and then finds no VM to
    // pause).
    agent.start(&m).unwrap().wait(T).unwrap();
    h.fake.block(DriverOp::StopVm);
    let stopping = {
        let agent = agent.clone();
        let m = m.clone();
        std::thread::spawn(move || agent.stop(&m, StopOptions::default()).map(|h| h.wait(T)))
    };
    assert!(h.fake.wait_for_call(DriverOp::StopVm, m.as_str(), 2, T));
    let taking = {
        let agent = agent.clone();
        let v = v.clone();
        std::thread::spawn(move || agent.snapshot_volume(&v, &snap("vs_2")))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !h.fake.world().volume_snapshots.contains_key(&snap("vs_2")),
        "the copy waits for the stop"
    );
    let from = h.fake.world().calls.len();
    h.fake.unblock(DriverOp::StopVm);
    stopping.join().unwrap().unwrap().unwrap();
    taking.join().unwrap().unwrap();
    let calls = &h.fake.world().calls[from..];
    assert!(
        calls.contains(&(DriverOp::SnapshotVolume, "vol_a".into())),
        "{calls:#?}"
    );
    assert!(!calls.iter().any(|(o, _)| *o == DriverOp::PauseVm), "{calls:#?}");
}

#[test]
fn a_damaged_snapshot_is_not_restored() {
    use aloft_api::VolumeSource;
    let h = Harness::new();
    let agent = h.open();
    let v = vol("vol_a");
    agent.create_volume(&v, 1, None).unwrap();
    let s = snap("vs_1");
    agent.snapshot_volume(&v, &s).unwrap();
    assert!(h.fake.damage_snapshot(&s));
    let e = agent
        .create_volume(&vol("vol_b"), 1, Some(&VolumeSource::Snapshot(s)))
        .unwrap_err();
    let api = e.to_api();
    assert_eq!(api.status(), 409, "{e}");
    assert_eq!(
        api.message(),
        "snapshot vs_1 is damaged: its content no longer matches its digest; restore another"
    );
    assert!(!h.fake.world().volumes.contains_key(&vol("vol_b")));
}

/// The next event of a console session, waiting up to [`T`]; panics when none came.
fn next_event(session: &mut dyn aloft_api::ConsoleSession) -> aloft_api::ConsoleEvent {
    let deadline = std::time::Instant::now() + T;
    while std::time::Instant::now() < deadline {
        if let Some(e) = session.next(Duration::from_millis(50)).unwrap() {
            return e;
        }
    }
    panic!("no console event within {T:?}");
}

#[test]
fn a_console_streams_both_ways_on_a_started_machine() {
    use aloft_api::{ConsoleEvent, ConsoleExit, ConsoleRequest, MachineHost, TtySize};

    let h = Harness::new();
    let agent = h.open();
    let id = machine_in(&agent, &h.fake, MachineState::Started);
    // On a terminal: output (stderr included) arrives as stdout; the size follows resizes.
    let req = ConsoleRequest {
        argv: vec!["sh".into(), "-i".into()],
        tty: Some(TtySize { rows: 24, cols: 80 }),
        env: vec![("TERM".into(), "xterm-256color".into())],
        user: Some("postgres".into()),
    };
    let mut s = MachineHost::console(&agent, &id, req).unwrap();
    s.stdin(b"hel").unwrap();
    assert_eq!(s.next(Duration::from_millis(20)).unwrap(), None, "no line yet");
    s.stdin(b"lo\nsize\n").unwrap();
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"hello\n".to_vec()));
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"24 80\n".to_vec()));
    s.resize(TtySize { rows: 50, cols: 132 }).unwrap();
    s.stdin(b"size\nenv TERM\nerr oops\n").unwrap();
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"50 132\n".to_vec()));
    assert_eq!(
        next_event(&mut *s),
        ConsoleEvent::Stdout(b"xterm-256color\n".to_vec())
    );
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"oops\n".to_vec()));
    s.stdin(b"exit 3\n").unwrap();
    let exit = ConsoleExit {
        exit_code: Some(3),
        signal: None,
    };
    assert_eq!(next_event(&mut *s), ConsoleEvent::Exit(exit));
    assert!(s.next(Duration::ZERO).is_err(), "nothing after the exit");
    let rec = h.fake.world().sessions[0].clone();
    assert_eq!(rec.argv, ["sh", "-i"]);
    assert_eq!(rec.user.as_deref(), Some("postgres"));
    assert_eq!(rec.stdin, b"hello\nsize\nsize\nenv TERM\nerr oops\nexit 3\n");
    assert_eq!(rec.exit, Some((Some(3), None)));
    assert!(!rec.closed);
    drop(s);
    assert!(h.fake.world().sessions[0].closed);

    // On pipes: stderr stays apart, closing stdin ends it, a signal ends it.
    let pipes = ConsoleRequest {
        argv: vec!["cat".into()],
        ..ConsoleRequest::default()
    };
    let mut s = MachineHost::console(&agent, &id, pipes.clone()).unwrap();
    s.stdin(b"size\nerr oops\n").unwrap();
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"no tty\n".to_vec()));
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stderr(b"oops\n".to_vec()));
    s.close_stdin().unwrap();
    assert_eq!(
        next_event(&mut *s),
        ConsoleEvent::Exit(ConsoleExit {
            exit_code: Some(0),
            signal: None
        })
    );
    let mut s = MachineHost::console(&agent, &id, pipes.clone()).unwrap();
    s.signal(Signal::SIGTERM).unwrap();
    assert_eq!(
        next_event(&mut *s),
        ConsoleEvent::Exit(ConsoleExit {
            exit_code: None,
            signal: Some(15)
        })
    );

    // Dropping a running session kills its command; the machine keeps running.
    let s = MachineHost::console(&agent, &id, pipes).unwrap();
    drop(s);
    let rec = h.fake.world().sessions.last().unwrap().clone();
    assert!(rec.closed && rec.exit.is_none(), "{rec:?}");
    assert_eq!(state(&agent, &id), MachineState::Started);
}

#[test]
fn a_console_needs_a_started_machine_and_a_program() {
    use aloft_api::{ConsoleRequest, MachineHost};

    let h = Harness::new();
    let agent = h.open();
    let req = ConsoleRequest {
        argv: vec!["sh".into()],
        ..ConsoleRequest::default()
    };
    for target in [
        MachineState::Created,
        MachineState::Stopped,
        MachineState::Suspended,
    ] {
        let id = machine_in(&agent, &h.fake, target);
        let e = MachineHost::console(&agent, &id, req.clone()).err().unwrap();
        assert_eq!(e.status(), 412, "{target}: {e}");
        assert!(e.message().contains(target.as_str()), "{e}");
    }
    let unknown: MachineId = "3d8d413b29d089".parse().unwrap();
    let e = MachineHost::console(&agent, &unknown, req.clone()).err().unwrap();
    assert_eq!(e.status(), 404, "{e}");
    assert!(h.fake.world().sessions.is_empty());

    // Init's refusal is the caller's to fix: 400 with its message.
    let id = machine_in(&agent, &h.fake, MachineState::Started);
    h.fake.missing_program("/app/nope");
    let nope = ConsoleRequest {
        argv: vec!["/app/nope".into()],
        ..ConsoleRequest::default()
    };
    let e = MachineHost::console(&agent, &id, nope).err().unwrap();
    assert_eq!(e.status(), 400, "{e}");
    assert!(e.message().contains("executable not found: /app/nope"), "{e}");
    // A driver failure is a 500 that hides the details.
    h.fake.fail_always(DriverOp::ExecSession);
    let e = MachineHost::console(&agent, &id, req.clone()).err().unwrap();
    assert_eq!(e.status(), 500, "{e}");
    h.fake.clear_faults();

    // The machine stopping under a session ends it: every call fails, as 412.
    let mut s = MachineHost::console(&agent, &id, req).unwrap();
    agent.stop(&id, StopOptions::default()).unwrap().wait(T).unwrap();
    let e = s.next(Duration::from_millis(10)).unwrap_err();
    assert_eq!(e.status(), 412, "{e}");
    assert_eq!(s.stdin(b"x\n").unwrap_err().status(), 412);
}

#[test]
fn a_console_without_a_command_runs_bash_else_sh() {
    use aloft_api::{ConsoleEvent, ConsoleRequest, MachineHost};

    let h = Harness::new();
    let agent = h.open();
    let id = machine_in(&agent, &h.fake, MachineState::Started);
    let shell = ConsoleRequest {
        env: vec![("TERM".into(), "vt100".into())],
        ..ConsoleRequest::default()
    };
    let mut s = MachineHost::console(&agent, &id, shell.clone()).unwrap();
    s.stdin(b"env TERM\n").unwrap();
    assert_eq!(next_event(&mut *s), ConsoleEvent::Stdout(b"vt100\n".to_vec()));
    drop(s);
    assert_eq!(h.fake.world().sessions[0].argv, [crate::agent::BASH]);

    // An image without bash: init refuses it, sh runs instead.
    h.fake.missing_program(crate::agent::BASH);
    let s = MachineHost::console(&agent, &id, shell.clone()).unwrap();
    drop(s);
    let w = h.fake.world();
    assert_eq!(w.sessions.len(), 2, "the refused bash never ran");
    assert_eq!(w.sessions[1].argv, [crate::agent::SH]);
    let tries = w
        .calls
        .iter()
        .filter(|(op, _)| *op == DriverOp::ExecSession)
        .count();
    assert_eq!(tries, 3, "bash, then bash and sh");

    // Without either, init's refusal for sh is the answer.
    h.fake.missing_program(crate::agent::SH);
    let e = MachineHost::console(&agent, &id, shell).err().unwrap();
    assert_eq!(e.status(), 400, "{e}");
    assert!(e.message().contains("executable not found: /bin/sh"), "{e}");
    // Other failures of bash are not retried with sh.
    h.fake.fail_always(DriverOp::ExecSession);
    let before = h.fake.world().calls.len();
    let e = MachineHost::console(&agent, &id, ConsoleRequest::default())
        .err()
        .unwrap();
    assert_eq!(e.status(), 500, "{e}");
    assert_eq!(h.fake.world().calls.len(), before + 1);
}

/// A port of the host's loopback that nothing listens on (bound, then closed).
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn connect_reaches_a_fake_machines_port_on_the_loopback() {
    use std::io::{Read as _, Write as _};

    use aloft_api::MachineHost;

    let h = Harness::new();
    let agent = h.open();
    let id = machine_in(&agent, &h.fake, MachineState::Started);
    // The fake machine's ports are the loopback's: the test's listener plays the workload.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut client = MachineHost::connect(&agent, &id, port).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    client.set_read_timeout(Some(T)).unwrap();
    server.set_read_timeout(Some(T)).unwrap();
    client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    server.write_all(b"pong").unwrap();
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");
    // The workload's close is the client's end of stream.
    drop(server);
    assert_eq!(client.read(&mut buf).unwrap(), 0);
    assert!(
        h.fake
            .world()
            .calls
            .contains(&(DriverOp::Connect, id.to_string()))
    );
    // Nothing changed for the machine.
    assert_eq!(state(&agent, &id), MachineState::Started);
}

#[test]
fn connect_needs_a_started_machine_and_a_listener() {
    use aloft_api::MachineHost;

    let h = Harness::new();
    let agent = h.open();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    for target in [
        MachineState::Created,
        MachineState::Stopped,
        MachineState::Suspended,
    ] {
        let id = machine_in(&agent, &h.fake, target);
        let e = MachineHost::connect(&agent, &id, port).unwrap_err();
        assert_eq!(e.status(), 412, "{target}: {e}");
        assert!(e.message().contains(target.as_str()), "{e}");
        assert!(e.message().contains("proxy"), "{e}");
    }
    let unknown: MachineId = "3d8d413b29d089".parse().unwrap();
    assert_eq!(
        MachineHost::connect(&agent, &unknown, port).unwrap_err().status(),
        404
    );
    assert!(
        !h.fake
            .world()
            .calls
            .iter()
            .any(|(op, _)| *op == DriverOp::Connect),
        "refused before the driver"
    );

    // Nothing listening: 502 naming the port, the machine and where to listen.
    let id = machine_in(&agent, &h.fake, MachineState::Started);
    let closed = closed_port();
    let e = MachineHost::connect(&agent, &id, closed).unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    let m = e.message();
    assert!(
        m.contains(&format!(
            "nothing accepted a connection on port {closed} of machine {id}"
        )),
        "{m}"
    );
    assert!(m.contains("[::] or fly-local-6pn"), "{m}");
    // A driver failure is a 500 that hides the details.
    h.fake.fail_always(DriverOp::Connect);
    assert_eq!(MachineHost::connect(&agent, &id, port).unwrap_err().status(), 500);
    h.fake.clear_faults();
    assert!(MachineHost::connect(&agent, &id, port).is_ok());
}
