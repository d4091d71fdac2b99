//! Machine states with Fly's names and the transitions the lifecycle verbs may take.
//!
//! [`Verb::transition`] is pure: given the current state it says which transient state the verb
//! passes through and where it ends, or why it is not allowed (the API's 412).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ApiError;

/// The state of a machine, spelled exactly as Fly spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum MachineState {
    /// Being created (transient).
    Creating,
    /// Created but never started (`skip_launch`); persistent.
    Created,
    /// Booting (transient).
    Starting,
    /// Running; persistent.
    Started,
    /// Being stopped (transient).
    Stopping,
    /// Stopped; persistent.
    Stopped,
    /// Being suspended (transient).
    Suspending,
    /// Suspended to a memory snapshot; persistent.
    Suspended,
    /// Being restarted (transient).
    Restarting,
    /// Its config is being updated (transient).
    Updating,
    /// Being replaced by a new version (transient).
    Replacing,
    /// Being destroyed (transient).
    Destroying,
    /// Destroyed; terminal.
    Destroyed,
    /// An old version after an update; terminal.
    Replaced,
    /// The record left on the old host after a migration; terminal.
    Migrated,
    /// Failed; persistent (can be started or destroyed).
    Failed,
    /// Could not boot on create; transient, goes on to `destroyed`.
    LaunchFailed,
}

/// How long a machine can rest in a state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateClass {
    /// A machine can rest here: `created`, `started`, `stopped`, `suspended`, `failed`.
    Persistent,
    /// An operation is in flight.
    Transient,
    /// Nothing happens to it any more: `destroyed`, `replaced`, `migrated`.
    Terminal,
}

impl MachineState {
    /// Every state, in declaration order.
    pub const ALL: [Self; 17] = [
        Self::Creating,
        Self::Created,
        Self::Starting,
        Self::Started,
        Self::Stopping,
        Self::Stopped,
        Self::Suspending,
        Self::Suspended,
        Self::Restarting,
        Self::Updating,
        Self::Replacing,
        Self::Destroying,
        Self::Destroyed,
        Self::Replaced,
        Self::Migrated,
        Self::Failed,
        Self::LaunchFailed,
    ];

    /// The name on the wire, e.g. `launch_failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Created => "created",
            Self::Starting => "starting",
            Self::Started => "started",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Suspending => "suspending",
            Self::Suspended => "suspended",
            Self::Restarting => "restarting",
            Self::Updating => "updating",
            Self::Replacing => "replacing",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Replaced => "replaced",
            Self::Migrated => "migrated",
            Self::Failed => "failed",
            Self::LaunchFailed => "launch_failed",
        }
    }

    /// Whether a machine rests here, is in the middle of an operation, or is gone.
    pub fn class(self) -> StateClass {
        match self {
            Self::Created | Self::Started | Self::Stopped | Self::Suspended | Self::Failed => {
                StateClass::Persistent
            }
            Self::Destroyed | Self::Replaced | Self::Migrated => StateClass::Terminal,
            Self::Creating
            | Self::Starting
            | Self::Stopping
            | Self::Suspending
            | Self::Restarting
            | Self::Updating
            | Self::Replacing
            | Self::Destroying
            | Self::LaunchFailed => StateClass::Transient,
        }
    }

    /// Not transient: what `wait?state=settled` waits for.
    pub fn is_settled(self) -> bool {
        self.class() != StateClass::Transient
    }

    /// Gone for good (`destroyed`, `replaced`, `migrated`): hidden from lists unless
    /// `include_deleted` is set.
    pub fn is_terminal(self) -> bool {
        self.class() == StateClass::Terminal
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a machine state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown machine state {0:?}; expected one of created, started, stopped, suspended, failed, destroyed, …"
)]
pub struct ParseStateError(pub String);

impl FromStr for MachineState {
    type Err = ParseStateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| ParseStateError(s.to_owned()))
    }
}

/// A lifecycle verb a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    /// `POST …/start`.
    Start,
    /// `POST …/stop`.
    Stop,
    /// `POST …/suspend`.
    Suspend,
    /// `POST …/restart`.
    Restart,
    /// `POST …/{id}` with a new config.
    Update,
    /// `DELETE …/{id}`; `force` (or fly-go's `kill`) allows destroying a running machine.
    Destroy {
        /// `?force=true` or `?kill=true`.
        force: bool,
    },
    /// `POST …/signal` (and fly-go's kill, a signal 9).
    Signal,
    /// `POST …/exec`.
    Exec,
    /// `GET …/ps`.
    Ps,
    /// `GET …/proxy`: a TCP connection to one of the machine's ports (`aloft proxy`).
    Proxy,
    /// `POST …/cordon`.
    Cordon,
    /// `POST …/uncordon`.
    Uncordon,
}

impl Verb {
    /// The verb as error messages name it (`start`, `destroy` …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Suspend => "suspend",
            Self::Restart => "restart",
            Self::Update => "update",
            Self::Destroy { .. } => "destroy",
            Self::Signal => "signal",
            Self::Exec => "exec",
            Self::Ps => "ps",
            Self::Proxy => "proxy",
            Self::Cordon => "cordon",
            Self::Uncordon => "uncordon",
        }
    }

    /// Where `self` takes a machine in `from`: the transient state it passes through (if any)
    /// and the state it ends in. Pure; the API answers 412 with the error.
    ///
    /// `update` ends in `started` only from `started`; a machine that was not started stays
    /// stopped (Fly's rule). The caller applies `skip_launch` (ends `stopped`) itself. Verbs that
    /// change no state (`signal`, `exec`, `ps`, `proxy`, `cordon`, `uncordon`) end where they began.
    /// Beyond the reference's table, a `failed` machine may be started, updated or destroyed
    /// (it is persistent, and nothing else gets it out). A verb whose result is the current
    /// state (`start` on `started`, `stop` on `stopped`) is refused here; a server that prefers
    /// to answer such calls as no-ops checks for that before asking.
    pub fn transition(self, from: MachineState) -> Result<Transition, StateError> {
        use MachineState as S;
        let go = |via: Option<S>, to: S| Ok(Transition { via, to });
        let deny = || {
            Err(StateError {
                verb: self,
                state: from,
            })
        };
        match (self, from) {
            (Self::Start, S::Created | S::Stopped | S::Suspended | S::Failed) => {
                go(Some(S::Starting), S::Started)
            }
            (Self::Stop, S::Started) => go(Some(S::Stopping), S::Stopped),
            // Stopping a suspended machine throws its snapshot away.
            (Self::Stop, S::Suspended) => go(None, S::Stopped),
            (Self::Suspend, S::Started) => go(Some(S::Suspending), S::Suspended),
            (Self::Restart, S::Started) => go(Some(S::Restarting), S::Started),
            (Self::Update, S::Started) => go(Some(S::Updating), S::Started),
            (Self::Update, S::Created | S::Stopped | S::Suspended | S::Failed) => {
                go(Some(S::Updating), S::Stopped)
            }
            (Self::Destroy { .. }, S::Created | S::Stopped | S::Suspended | S::Failed) => {
                go(Some(S::Destroying), S::Destroyed)
            }
            (Self::Destroy { force: true }, s) if s == S::Started || s.class() == StateClass::Transient => {
                if s == S::Destroying {
                    deny()
                } else {
                    go(Some(S::Destroying), S::Destroyed)
                }
            }
            (Self::Signal | Self::Exec | Self::Ps | Self::Proxy, S::Started) => go(None, S::Started),
            (Self::Cordon | Self::Uncordon, s) if !s.is_terminal() => go(None, s),
            _ => deny(),
        }
    }

    /// Whether `self` is allowed in `state` (see [`Verb::transition`]).
    pub fn can(self, state: MachineState) -> bool {
        self.transition(state).is_ok()
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an allowed verb takes a machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The transient state shown while the verb runs, if any.
    pub via: Option<MachineState>,
    /// The state the machine ends in when the verb succeeds.
    pub to: MachineState,
}

/// A verb not allowed in the machine's current state (HTTP 412).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unable to {verb} machine from current state: machine is {state}{hint}", hint = self.hint())]
pub struct StateError {
    /// What was asked.
    pub verb: Verb,
    /// The machine's state at the time.
    pub state: MachineState,
}

impl StateError {
    fn hint(&self) -> &'static str {
        match (self.verb, self.state) {
            (Verb::Destroy { force: false }, MachineState::Started) => {
                "; stop it first or destroy with force=true"
            }
            (_, s) if s.class() == StateClass::Transient => {
                "; another operation is in progress, wait for it to settle and retry"
            }
            _ => "",
        }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        ApiError::precondition_failed(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MachineState as S;

    #[test]
    fn names_match_fly_and_parse_back() {
        for s in S::ALL {
            let json = serde_json::to_value(s).unwrap();
            assert_eq!(json, serde_json::json!(s.as_str()));
            assert_eq!(serde_json::from_value::<S>(json).unwrap(), s);
            assert_eq!(s.as_str().parse::<S>().unwrap(), s);
        }
        assert_eq!(S::LaunchFailed.as_str(), "launch_failed");
        assert!("running".parse::<S>().is_err());
        assert!(serde_json::from_str::<S>("\"Started\"").is_err());
    }

    #[test]
    fn classes_follow_the_reference() {
        let persistent: Vec<_> = S::ALL
            .into_iter()
            .filter(|s| s.class() == StateClass::Persistent)
            .collect();
        assert_eq!(
            persistent,
            [S::Created, S::Started, S::Stopped, S::Suspended, S::Failed]
        );
        let terminal: Vec<_> = S::ALL.into_iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal, [S::Destroyed, S::Replaced, S::Migrated]);
        assert!(!S::LaunchFailed.is_settled());
        assert!(S::Failed.is_settled());
    }

    #[test]
    fn lifecycle_transitions() {
        let t = |v: Verb, s| v.transition(s).map(|t| (t.via, t.to));
        assert_eq!(t(Verb::Start, S::Created), Ok((Some(S::Starting), S::Started)));
        assert_eq!(t(Verb::Start, S::Stopped), Ok((Some(S::Starting), S::Started)));
        assert_eq!(t(Verb::Start, S::Suspended), Ok((Some(S::Starting), S::Started)));
        assert_eq!(t(Verb::Stop, S::Started), Ok((Some(S::Stopping), S::Stopped)));
        assert_eq!(t(Verb::Stop, S::Suspended), Ok((None, S::Stopped)));
        assert_eq!(
            t(Verb::Suspend, S::Started),
            Ok((Some(S::Suspending), S::Suspended))
        );
        assert_eq!(
            t(Verb::Restart, S::Started),
            Ok((Some(S::Restarting), S::Started))
        );
        assert_eq!(t(Verb::Update, S::Started), Ok((Some(S::Updating), S::Started)));
        // A machine that was not started stays stopped after an update.
        assert_eq!(t(Verb::Update, S::Stopped), Ok((Some(S::Updating), S::Stopped)));
        assert_eq!(t(Verb::Update, S::Created), Ok((Some(S::Updating), S::Stopped)));
        assert_eq!(
            t(Verb::Destroy { force: false }, S::Stopped),
            Ok((Some(S::Destroying), S::Destroyed))
        );
        assert_eq!(
            t(Verb::Destroy { force: true }, S::Started),
            Ok((Some(S::Destroying), S::Destroyed))
        );
        assert_eq!(
            t(Verb::Destroy { force: true }, S::Starting),
            Ok((Some(S::Destroying), S::Destroyed))
        );
        assert_eq!(t(Verb::Cordon, S::Stopped), Ok((None, S::Stopped)));
    }

    #[test]
    fn forbidden_transitions_are_412_with_the_state() {
        let err = Verb::Start.transition(S::Replacing).unwrap_err();
        let api: ApiError = err.into();
        assert_eq!(api.status(), 412);
        assert!(
            api.message()
                .starts_with("unable to start machine from current state"),
            "{}",
            api.message()
        );
        assert!(api.message().contains("replacing"));
        let destroy = Verb::Destroy { force: false }.transition(S::Started).unwrap_err();
        assert!(destroy.to_string().contains("force=true"), "{destroy}");
        for verb in [
            Verb::Stop,
            Verb::Suspend,
            Verb::Restart,
            Verb::Signal,
            Verb::Exec,
            Verb::Ps,
            Verb::Proxy,
        ] {
            for s in [S::Created, S::Stopped, S::Destroyed, S::Replaced] {
                assert!(!verb.can(s), "{verb} from {s}");
            }
        }
        for s in [S::Destroyed, S::Replaced, S::Migrated] {
            for verb in [
                Verb::Start,
                Verb::Update,
                Verb::Destroy { force: true },
                Verb::Cordon,
            ] {
                assert!(!verb.can(s), "{verb} from {s}");
            }
        }
        assert!(!Verb::Destroy { force: true }.can(S::Destroying));
        assert!(!Verb::Update.can(S::Starting), "one operation at a time");
    }

    #[test]
    fn every_pair_is_decided_without_panicking() {
        let verbs = [
            Verb::Start,
            Verb::Stop,
            Verb::Suspend,
            Verb::Restart,
            Verb::Update,
            Verb::Destroy { force: false },
            Verb::Destroy { force: true },
            Verb::Signal,
            Verb::Exec,
            Verb::Ps,
            Verb::Proxy,
            Verb::Cordon,
            Verb::Uncordon,
        ];
        for v in verbs {
            for s in S::ALL {
                if let Ok(t) = v.transition(s) {
                    assert!(t.via.is_none_or(|via| via.class() == StateClass::Transient));
                    // A verb either keeps the state or ends in a state a machine can rest in.
                    assert!(t.to == s || t.to.class() != StateClass::Transient, "{v} from {s}");
                }
            }
        }
    }
}
