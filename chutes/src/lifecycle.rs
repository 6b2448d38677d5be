//! The per-chute state machine: inputs (requests, Podman events, fired timers) in,
//! actions for the agent out. Pure: time is passed in, timers are requested, never run.
//!
//! ```text
//!  Installing --Installed--> Running --exit, policy restarts--> Restarting --timer--> (StartContainer)
//!      |                      |  ^                                  |   ContainerStarted --> Running
//!  InstallFailed        exit, no restart                      StopRequested
//!      v                      v                                     v
//!    Failed  <-------------- Stopped/Failed (zombie timer armed) <--+
//!                             | zombie timer fires
//!                             v
//!  (any) --RemoveRequested--> Dead  (remove container, release reservation; the agent forgets it)
//! ```
//!
//! A requested restart is one `RestartContainer` (the reservation is kept throughout); the
//! agent reports it done with `ContainerRestarted`, or with the exit and start it saw.
//!
//! Invariants the agent can rely on: the reservation is released only on the way to
//! `Dead` (never around a restart); an exit caused by our own stop or restart is never
//! counted as a failure; a timer whose token is not the latest one requested does nothing;
//! an input that makes no sense in the current state changes nothing, and [`Lifecycle::check`]
//! says why, naming the state and what is allowed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::manifest::RestartPolicy;

/// Where a chute is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChuteState {
    /// Being deployed (image, container creation, first start).
    Installing,
    /// Its container runs.
    Running,
    /// It exited and will be started again after a backoff delay.
    Restarting,
    /// Stopped on request, or exited 0 with a policy that does not restart it.
    Stopped,
    /// Exited non-zero with a policy that does not restart it, or failed to install.
    Failed,
    /// Removed: container, reservation and config are gone (or going).
    Dead,
}

impl fmt::Display for ChuteState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChuteState::Installing => "installing",
            ChuteState::Running => "running",
            ChuteState::Restarting => "restarting",
            ChuteState::Stopped => "stopped",
            ChuteState::Failed => "failed",
            ChuteState::Dead => "dead",
        })
    }
}

/// Exponential backoff between automatic restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffConfig {
    /// First delay.
    pub initial_ms: u64,
    /// Largest delay.
    pub max_ms: u64,
    /// Multiplier per consecutive failure (values below 1 act as 1).
    pub factor: u32,
    /// A chute that ran at least this long before exiting starts over from `initial_ms`.
    pub reset_after_ms: u64,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial_ms: 1_000,
            max_ms: 60_000,
            factor: 2,
            reset_after_ms: 30_000,
        }
    }
}

/// Tunables of the state machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleConfig {
    /// Restart backoff.
    pub backoff: BackoffConfig,
    /// How long a stopped or failed chute keeps its container and reservation before it
    /// is removed (becomes `Dead`).
    pub zombie_timeout_ms: u64,
    /// Grace period given to `podman stop` before SIGKILL.
    pub stop_timeout_secs: u32,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            backoff: BackoffConfig::default(),
            zombie_timeout_ms: 86_400_000,
            stop_timeout_secs: 10,
        }
    }
}

/// Something that happened to a chute.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Input {
    /// The agent created and started the container: the deploy finished.
    Installed,
    /// The deploy failed (the agent releases the reservation itself). The chute stays
    /// `Failed` until removed or its zombie timer fires; that removal emits
    /// `ReleaseReservation` again, which is harmless (`Ledger::release` of a chute holding
    /// nothing returns `None`).
    InstallFailed {
        /// Why, for the operator.
        reason: String,
    },
    /// A user asked to start a stopped or failed chute.
    StartRequested,
    /// A user asked to stop the chute.
    StopRequested,
    /// A user asked to restart the chute.
    RestartRequested,
    /// A user asked to remove the chute.
    RemoveRequested,
    /// The container started: our own start returned, or Podman reported a start.
    ContainerStarted,
    /// Our `podman stop` failed (the container is taken to be still running).
    StopFailed,
    /// Our `podman restart` returned with the container running again: both halves of a
    /// requested restart at once (the exit and the start).
    ContainerRestarted,
    /// Podman event "died".
    ContainerExited {
        /// The container's exit code.
        exit_code: i32,
    },
    /// A timer requested with [`Action::SetTimer`] fired.
    TimerFired {
        /// The token given in `SetTimer`.
        token: u64,
    },
}

impl Input {
    /// Short name for messages: `"start"`, `"container-exited"`, ...
    pub fn name(&self) -> &'static str {
        match self {
            Input::Installed => "installed",
            Input::InstallFailed { .. } => "install-failed",
            Input::StartRequested => "start",
            Input::StopRequested => "stop",
            Input::RestartRequested => "restart",
            Input::RemoveRequested => "remove",
            Input::ContainerStarted => "container-started",
            Input::ContainerExited { .. } => "container-exited",
            Input::StopFailed => "stop-failed",
            Input::ContainerRestarted => "container-restarted",
            Input::TimerFired { .. } => "timer-fired",
        }
    }

    /// True for the four user requests (start, stop, restart, remove).
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Input::StartRequested
                | Input::StopRequested
                | Input::RestartRequested
                | Input::RemoveRequested
        )
    }
}

/// What the agent must do, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// `podman start` the chute's existing container.
    StartContainer,
    /// `podman stop` with this grace period.
    StopContainer {
        /// Seconds before SIGKILL.
        timeout_secs: u32,
    },
    /// `podman restart` with this grace period (the reservation is kept throughout).
    RestartContainer {
        /// Seconds before SIGKILL.
        timeout_secs: u32,
    },
    /// Remove the container.
    RemoveContainer,
    /// Return the chute's reservation to the ledger.
    ReleaseReservation,
    /// Feed `Input::TimerFired { token }` back after `after_ms`. Supersedes every earlier
    /// timer of this chute: only the latest token is honoured.
    SetTimer {
        /// Token to hand back.
        token: u64,
        /// Delay.
        after_ms: u64,
    },
    /// Drop every pending timer of this chute.
    CancelTimers,
}

/// Why an input was refused or ignored; the input changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LifecycleError {
    /// A user request that makes no sense in this state.
    #[error("cannot {request} a chute that is {state}: {hint} (allowed now: {allowed})")]
    NotAllowed {
        /// The chute's state.
        state: ChuteState,
        /// The request (`"start"`, `"stop"`, `"restart"`, `"remove"`).
        request: &'static str,
        /// What to do instead.
        hint: &'static str,
        /// Requests accepted in this state.
        allowed: &'static str,
    },
    /// An event that means nothing in this state (e.g. a duplicate Podman event).
    #[error("event `{event}` ignored: the chute is {state}")]
    Ignored {
        /// The chute's state.
        state: ChuteState,
        /// The event.
        event: &'static str,
    },
    /// A timer that was superseded or cancelled.
    #[error("timer {token} is stale: ignored")]
    StaleTimer {
        /// The fired token.
        token: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum TimerKind {
    Backoff,
    Zombie,
}

/// An exit or start we caused ourselves, so it is not mistaken for a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Expect {
    Nothing,
    /// We asked for a stop: the next exit means Stopped.
    StopExit,
    /// We asked for a restart: the next exit is ours, a start follows.
    RestartExit,
    /// We asked for a start: the next ContainerStarted means Running.
    Start,
}

/// One chute's state machine. Serializable so the agent can snapshot it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lifecycle {
    state: ChuteState,
    policy: RestartPolicy,
    cfg: LifecycleConfig,
    restarts: u32,
    last_exit_code: Option<i32>,
    consecutive_failures: u32,
    started_at_ms: Option<u64>,
    last_token: u64,
    timer: Option<(u64, TimerKind)>,
    expect: Expect,
    install_failed: bool,
}

impl Lifecycle {
    /// A chute being installed.
    pub fn new(policy: RestartPolicy, cfg: LifecycleConfig) -> Self {
        Self::restore(ChuteState::Installing, 0, policy, cfg)
    }

    /// A chute in `state` after reconciliation on agent start. Timers are not armed; call
    /// [`Lifecycle::resume`] for the actions that re-arm them.
    pub fn restore(
        state: ChuteState,
        restarts: u32,
        policy: RestartPolicy,
        cfg: LifecycleConfig,
    ) -> Self {
        Lifecycle {
            state,
            policy,
            cfg,
            restarts,
            last_exit_code: None,
            consecutive_failures: 0,
            started_at_ms: None,
            last_token: 0,
            timer: None,
            expect: Expect::Nothing,
            install_failed: false,
        }
    }

    /// Actions that bring a restored machine back to life: a `Restarting` chute gets its
    /// backoff timer, a `Stopped`/`Failed` one its zombie timer (a full timeout from now:
    /// time spent while the agent was down is not counted against the chute).
    pub fn resume(&mut self) -> Vec<Action> {
        match self.state {
            ChuteState::Restarting => {
                let delay = self.next_backoff_ms();
                let token = self.arm(TimerKind::Backoff);
                vec![Action::SetTimer {
                    token,
                    after_ms: delay,
                }]
            }
            ChuteState::Stopped | ChuteState::Failed => self.arm_zombie(),
            _ => Vec::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> ChuteState {
        self.state
    }

    /// The state to record for reconciliation ([`crate::KnownChute::state`]): like
    /// [`Lifecycle::state`], but a chute whose stop was requested and not yet seen to
    /// finish counts as `Stopped`, so an agent crash in between does not undo the stop, and
    /// one in the middle of a requested restart counts as `Restarting`.
    pub fn snapshot_state(&self) -> ChuteState {
        match (self.state, self.expect) {
            (ChuteState::Running, Expect::StopExit) => ChuteState::Stopped,
            // A requested restart under way: if the agent dies now and finds the chute
            // exited, the start it still owes is made on reconciliation, whatever the
            // policy (and a chute Podman did restart is adopted).
            (ChuteState::Running, Expect::RestartExit | Expect::Start) => ChuteState::Restarting,
            // A requested start under way: owed too, so a crash before the container runs
            // still ends with it running.
            (ChuteState::Stopped | ChuteState::Failed, Expect::Start) => ChuteState::Restarting,
            (state, _) => state,
        }
    }

    /// Restarts ever made, automatic and requested.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Exit code of the last exit seen, if any.
    pub fn last_exit_code(&self) -> Option<i32> {
        self.last_exit_code
    }

    /// Delay before the next automatic restart if the chute failed now (ignoring the
    /// reset for a long run).
    pub fn next_backoff_ms(&self) -> u64 {
        let b = &self.cfg.backoff;
        let factor = u64::from(b.factor.max(1));
        let mut d = b.initial_ms.min(b.max_ms);
        for _ in 0..self.consecutive_failures {
            if d >= b.max_ms {
                break;
            }
            d = d.saturating_mul(factor).min(b.max_ms);
        }
        d
    }

    /// Consecutive failures counted for the backoff.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// The restart policy in force.
    pub fn policy(&self) -> RestartPolicy {
        self.policy
    }

    /// The configuration.
    pub fn config(&self) -> &LifecycleConfig {
        &self.cfg
    }

    /// Changes the policy (on update); applies from the next exit on.
    pub fn set_policy(&mut self, p: RestartPolicy) {
        self.policy = p;
    }

    /// User requests accepted in the current state, for messages: `"start, remove"`.
    pub fn allowed_requests(&self) -> &'static str {
        match self.state {
            ChuteState::Installing => "remove",
            ChuteState::Running | ChuteState::Restarting => "stop, restart, remove",
            ChuteState::Stopped => "start, remove",
            ChuteState::Failed if self.install_failed => "remove",
            ChuteState::Failed => "start, remove",
            ChuteState::Dead => "nothing",
        }
    }

    /// Would `handle(input)` do anything? `Err` says why not (state, and what is allowed).
    pub fn check(&self, input: &Input) -> Result<(), LifecycleError> {
        self.clone().apply(input.clone(), 0).map(|_| ())
    }

    /// Feeds one input; returns the actions to carry out, in order. An input refused by
    /// [`Lifecycle::check`] returns no actions and changes nothing.
    pub fn handle(&mut self, input: Input, now_ms: u64) -> Vec<Action> {
        self.apply(input, now_ms).unwrap_or_default()
    }

    /// The transition function. On `Err` nothing has been modified.
    fn apply(&mut self, input: Input, now: u64) -> Result<Vec<Action>, LifecycleError> {
        use ChuteState as S;
        match (self.state, &input) {
            (S::Dead, _) => Err(self.refuse(&input)),
            (_, Input::RemoveRequested) => Ok(self.remove()),
            (_, Input::TimerFired { token }) => self.timer_fired(*token),

            (S::Installing, Input::Installed) => {
                self.state = S::Running;
                self.expect = Expect::Nothing;
                self.started_at_ms.get_or_insert(now);
                Ok(Vec::new())
            }
            (S::Installing, Input::InstallFailed { .. }) => {
                self.install_failed = true;
                self.state = S::Failed;
                Ok(self.arm_zombie())
            }
            (S::Installing, Input::ContainerStarted) => {
                // The "start" event may overtake `Installed`; the run starts now.
                self.started_at_ms = Some(now);
                Ok(Vec::new())
            }
            (S::Installing, Input::ContainerExited { exit_code }) => {
                Ok(self.exited_on_its_own(*exit_code, now))
            }

            (S::Running, Input::ContainerExited { exit_code }) => Ok(match self.expect {
                Expect::StopExit => {
                    self.last_exit_code = Some(*exit_code);
                    self.expect = Expect::Nothing;
                    self.started_at_ms = None;
                    self.state = S::Stopped;
                    self.arm_zombie()
                }
                Expect::RestartExit => {
                    // The first half of a requested restart; Podman does the second.
                    self.last_exit_code = Some(*exit_code);
                    self.expect = Expect::Start;
                    self.started_at_ms = None;
                    Vec::new()
                }
                Expect::Nothing | Expect::Start => self.exited_on_its_own(*exit_code, now),
            }),
            (S::Running, Input::ContainerStarted) => {
                self.started_at_ms = Some(now);
                if matches!(self.expect, Expect::Start | Expect::RestartExit) {
                    self.expect = Expect::Nothing;
                }
                Ok(Vec::new())
            }
            (S::Running, Input::StopRequested) => {
                self.expect = Expect::StopExit;
                Ok(vec![Action::StopContainer {
                    timeout_secs: self.cfg.stop_timeout_secs,
                }])
            }
            (S::Running, Input::RestartRequested) => {
                self.expect = Expect::RestartExit;
                self.restarts = self.restarts.saturating_add(1);
                Ok(vec![Action::RestartContainer {
                    timeout_secs: self.cfg.stop_timeout_secs,
                }])
            }
            (S::Running, Input::ContainerRestarted)
                if matches!(self.expect, Expect::RestartExit | Expect::Start) =>
            {
                self.started_at_ms = Some(now);
                self.expect = Expect::Nothing;
                Ok(Vec::new())
            }
            (S::Running, Input::StopFailed)
                if matches!(self.expect, Expect::StopExit | Expect::RestartExit) =>
            {
                // Still running as far as anyone knows; the next exit is a real one again.
                if self.expect == Expect::RestartExit {
                    self.restarts = self.restarts.saturating_sub(1);
                }
                self.expect = Expect::Nothing;
                Ok(Vec::new())
            }

            (S::Restarting, Input::ContainerStarted) => {
                self.state = S::Running;
                self.started_at_ms = Some(now);
                self.expect = Expect::Nothing;
                Ok(self.cancel_timer())
            }
            (S::Restarting, Input::ContainerExited { exit_code })
                if self.expect == Expect::Start =>
            {
                Ok(self.exited_on_its_own(*exit_code, now))
            }
            (S::Restarting, Input::StopRequested) => {
                let mut actions = vec![Action::CancelTimers];
                self.timer = None;
                if self.expect == Expect::Start {
                    // A start is already under way: undo it.
                    actions.push(Action::StopContainer {
                        timeout_secs: self.cfg.stop_timeout_secs,
                    });
                }
                self.expect = Expect::Nothing;
                self.state = S::Stopped;
                actions.extend(self.arm_zombie());
                Ok(actions)
            }
            (S::Restarting, Input::RestartRequested) => {
                // Skip the rest of the backoff.
                self.timer = None;
                self.expect = Expect::Start;
                self.restarts = self.restarts.saturating_add(1);
                Ok(vec![Action::CancelTimers, Action::StartContainer])
            }

            (S::Stopped | S::Failed, Input::StartRequested) if !self.install_failed => {
                // The zombie timer is re-armed rather than cancelled, so a start that never
                // happens (image gone, Podman error) still ends in removal; ContainerStarted
                // cancels it.
                self.expect = Expect::Start;
                self.consecutive_failures = 0;
                let mut actions = vec![Action::StartContainer];
                actions.extend(self.arm_zombie());
                Ok(actions)
            }
            (S::Stopped | S::Failed, Input::ContainerStarted) if self.expect == Expect::Start => {
                self.state = S::Running;
                self.started_at_ms = Some(now);
                self.expect = Expect::Nothing;
                Ok(self.cancel_timer())
            }
            (S::Stopped | S::Failed, Input::ContainerExited { exit_code })
                if self.expect == Expect::Start =>
            {
                Ok(self.exited_on_its_own(*exit_code, now))
            }

            _ => Err(self.refuse(&input)),
        }
    }

    fn exited_on_its_own(&mut self, exit_code: i32, now: u64) -> Vec<Action> {
        self.last_exit_code = Some(exit_code);
        self.expect = Expect::Nothing;
        let ran_ms = self.started_at_ms.take().map(|s| now.saturating_sub(s));
        if ran_ms.is_some_and(|r| r >= self.cfg.backoff.reset_after_ms) {
            self.consecutive_failures = 0;
        }
        let restart = match self.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        };
        if restart {
            // Under `always` a clean exit counts too, or a chute exiting at once would spin.
            let delay = self.next_backoff_ms();
            self.consecutive_failures = self.consecutive_failures.saturating_add(1);
            self.state = ChuteState::Restarting;
            let token = self.arm(TimerKind::Backoff);
            vec![Action::SetTimer {
                token,
                after_ms: delay,
            }]
        } else {
            self.state = if exit_code == 0 {
                ChuteState::Stopped
            } else {
                ChuteState::Failed
            };
            self.arm_zombie()
        }
    }

    fn timer_fired(&mut self, token: u64) -> Result<Vec<Action>, LifecycleError> {
        let Some((armed, kind)) = self.timer else {
            return Err(LifecycleError::StaleTimer { token });
        };
        if armed != token {
            return Err(LifecycleError::StaleTimer { token });
        }
        match (kind, self.state) {
            (TimerKind::Backoff, ChuteState::Restarting) => {
                self.timer = None;
                self.expect = Expect::Start;
                self.restarts = self.restarts.saturating_add(1);
                Ok(vec![Action::StartContainer])
            }
            (TimerKind::Zombie, ChuteState::Stopped | ChuteState::Failed) => {
                self.timer = None;
                self.expect = Expect::Nothing;
                self.state = ChuteState::Dead;
                Ok(vec![Action::RemoveContainer, Action::ReleaseReservation])
            }
            // Every transition out of these states clears the timer, so this is only
            // reachable through a hand-edited snapshot; ignoring it is the safe answer.
            _ => Err(LifecycleError::StaleTimer { token }),
        }
    }

    fn remove(&mut self) -> Vec<Action> {
        let mut actions = vec![Action::CancelTimers];
        let may_run = matches!(self.state, ChuteState::Running | ChuteState::Installing)
            || self.expect == Expect::Start;
        if may_run {
            actions.push(Action::StopContainer {
                timeout_secs: self.cfg.stop_timeout_secs,
            });
        }
        actions.extend([Action::RemoveContainer, Action::ReleaseReservation]);
        self.state = ChuteState::Dead;
        self.timer = None;
        self.expect = Expect::Nothing;
        self.started_at_ms = None;
        actions
    }

    fn arm(&mut self, kind: TimerKind) -> u64 {
        self.last_token = self.last_token.wrapping_add(1);
        self.timer = Some((self.last_token, kind));
        self.last_token
    }

    fn arm_zombie(&mut self) -> Vec<Action> {
        let token = self.arm(TimerKind::Zombie);
        vec![Action::SetTimer {
            token,
            after_ms: self.cfg.zombie_timeout_ms,
        }]
    }

    fn cancel_timer(&mut self) -> Vec<Action> {
        match self.timer.take() {
            Some(_) => vec![Action::CancelTimers],
            None => Vec::new(),
        }
    }

    fn refuse(&self, input: &Input) -> LifecycleError {
        use ChuteState as S;
        let request = input.name();
        let hint = match (self.state, input) {
            (S::Dead, _) => "it has been removed; deploy it again",
            (_, i) if !i.is_request() => {
                return LifecycleError::Ignored {
                    state: self.state,
                    event: request,
                }
            }
            (S::Installing, _) => "it is still installing; wait for the deploy to finish",
            (S::Running, Input::StartRequested) => "it is already running",
            (S::Restarting, Input::StartRequested) => {
                "it will be started again after its backoff; restart it to start it now"
            }
            (S::Stopped, Input::StopRequested) => "it is already stopped",
            (S::Failed, Input::StopRequested) => "it is not running",
            (S::Failed, _) if self.install_failed => {
                "it failed to install; deploy it again or remove it"
            }
            (S::Stopped | S::Failed, _) => "start it first",
            _ => "not possible in this state",
        };
        LifecycleError::NotAllowed {
            state: self.state,
            request,
            hint,
            allowed: self.allowed_requests(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action as A;
    use ChuteState as S;
    use Input as I;

    const STOP: A = A::StopContainer { timeout_secs: 10 };
    const DAY: u64 = 86_400_000;

    fn running(policy: RestartPolicy) -> Lifecycle {
        let mut l = Lifecycle::new(policy, LifecycleConfig::default());
        assert_eq!(l.state(), S::Installing);
        assert_eq!(l.handle(I::Installed, 0), vec![]);
        assert_eq!(l.state(), S::Running);
        l
    }

    /// The token of the single SetTimer in `actions`.
    #[track_caller]
    fn timer(actions: &[Action], after: u64) -> u64 {
        match actions
            .iter()
            .rev()
            .find(|a| matches!(a, A::SetTimer { .. }))
        {
            Some(A::SetTimer { token, after_ms }) => {
                assert_eq!(*after_ms, after, "{actions:?}");
                *token
            }
            _ => panic!("no SetTimer in {actions:?}"),
        }
    }

    #[track_caller]
    fn unchanged(l: &mut Lifecycle, input: Input) {
        let before = l.clone();
        assert!(
            l.check(&input).is_err(),
            "{input:?} accepted in {}",
            l.state()
        );
        assert_eq!(l.handle(input, 123), vec![]);
        assert_eq!(*l, before);
    }

    #[test]
    fn exit_while_running_follows_policy() {
        for (policy, code, state) in [
            (RestartPolicy::Always, 0, S::Restarting),
            (RestartPolicy::Always, 1, S::Restarting),
            (RestartPolicy::OnFailure, 1, S::Restarting),
            (RestartPolicy::OnFailure, -1, S::Restarting),
            (RestartPolicy::OnFailure, 0, S::Stopped),
            (RestartPolicy::Never, 0, S::Stopped),
            (RestartPolicy::Never, 2, S::Failed),
        ] {
            let mut l = running(policy);
            let a = l.handle(I::ContainerExited { exit_code: code }, 5);
            assert_eq!(l.state(), state, "{policy} exit {code}");
            assert_eq!(l.last_exit_code(), Some(code));
            let after = if state == S::Restarting { 1_000 } else { DAY };
            assert_eq!(
                a,
                vec![A::SetTimer {
                    token: timer(&a, after),
                    after_ms: after
                }]
            );
            assert!(!a.contains(&A::ReleaseReservation));
        }
    }

    #[test]
    fn backoff_timer_starts_container_then_running_on_started() {
        let mut l = running(RestartPolicy::OnFailure);
        let t = timer(&l.handle(I::ContainerExited { exit_code: 1 }, 10), 1_000);
        assert_eq!(l.restarts(), 0);
        assert_eq!(
            l.handle(I::TimerFired { token: t }, 1_010),
            vec![A::StartContainer]
        );
        assert_eq!(
            l.state(),
            S::Restarting,
            "stays restarting until the start is seen"
        );
        assert_eq!(l.restarts(), 1);
        unchanged(&mut l, I::TimerFired { token: t });
        assert_eq!(l.handle(I::ContainerStarted, 1_020), vec![]);
        assert_eq!(l.state(), S::Running);
    }

    #[test]
    fn backoff_doubles_caps_and_resets_after_a_long_run() {
        let mut l = running(RestartPolicy::Always);
        let mut now = 0;
        let mut seen = Vec::new();
        for _ in 0..9 {
            now += 100; // crashes right away
            let a = l.handle(I::ContainerExited { exit_code: 1 }, now);
            let Some(A::SetTimer { token, after_ms }) = a.first().cloned() else {
                panic!("{a:?}")
            };
            seen.push(after_ms);
            now += after_ms;
            assert_eq!(
                l.handle(I::TimerFired { token }, now),
                vec![A::StartContainer]
            );
            l.handle(I::ContainerStarted, now);
        }
        assert_eq!(
            seen,
            [1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(l.restarts(), 9);
        // Ran 30 s: starts over from the initial delay.
        now += 30_000;
        let a = l.handle(I::ContainerExited { exit_code: 1 }, now);
        timer(&a, 1_000);
        assert_eq!(l.next_backoff_ms(), 2_000);
    }

    #[test]
    fn stop_request_exit_is_not_restarted() {
        let mut l = running(RestartPolicy::Always);
        assert_eq!(l.handle(I::StopRequested, 1), vec![STOP]);
        assert_eq!(l.state(), S::Running, "until the container has exited");
        assert_eq!(
            l.snapshot_state(),
            S::Stopped,
            "a crash now must not undo the stop"
        );
        let a = l.handle(I::ContainerExited { exit_code: 137 }, 2);
        assert_eq!(l.state(), S::Stopped);
        timer(&a, DAY);
        assert_eq!(l.restarts(), 0);
        assert_eq!(l.consecutive_failures(), 0);
    }

    #[test]
    fn stop_while_restarting_cancels_the_backoff() {
        let mut l = running(RestartPolicy::Always);
        let backoff = timer(&l.handle(I::ContainerExited { exit_code: 1 }, 1), 1_000);
        let a = l.handle(I::StopRequested, 2);
        assert_eq!(a[0], A::CancelTimers);
        assert!(!a.contains(&STOP), "nothing runs: {a:?}");
        timer(&a, DAY);
        assert_eq!(l.state(), S::Stopped);
        unchanged(&mut l, I::TimerFired { token: backoff });
    }

    #[test]
    fn stop_while_a_restart_start_is_under_way_stops_it() {
        let mut l = running(RestartPolicy::Always);
        let t = timer(&l.handle(I::ContainerExited { exit_code: 1 }, 1), 1_000);
        l.handle(I::TimerFired { token: t }, 1_001);
        let a = l.handle(I::StopRequested, 1_002);
        assert_eq!(&a[..2], &[A::CancelTimers, STOP]);
        assert_eq!(l.state(), S::Stopped);
        // The start and the stop's exit arrive afterwards and change nothing.
        unchanged(&mut l, I::ContainerStarted);
        unchanged(&mut l, I::ContainerExited { exit_code: 143 });
    }

    #[test]
    fn zombie_timer_kills_stopped_and_failed() {
        for code in [0, 1] {
            let mut l = running(RestartPolicy::Never);
            let z = timer(&l.handle(I::ContainerExited { exit_code: code }, 1), DAY);
            assert_eq!(
                l.handle(I::TimerFired { token: z }, DAY + 1),
                vec![A::RemoveContainer, A::ReleaseReservation]
            );
            assert_eq!(l.state(), S::Dead);
            for i in [
                I::StartRequested,
                I::RemoveRequested,
                I::ContainerStarted,
                I::TimerFired { token: z },
            ] {
                unchanged(&mut l, i);
            }
        }
    }

    #[test]
    fn start_from_stopped_and_failed() {
        for code in [0, 3] {
            let mut l = running(RestartPolicy::Never);
            let z = timer(&l.handle(I::ContainerExited { exit_code: code }, 1), DAY);
            let a = l.handle(I::StartRequested, 2);
            assert_eq!(a[0], A::StartContainer);
            let z2 = timer(&a, DAY);
            assert_ne!(z, z2);
            unchanged(&mut l, I::TimerFired { token: z });
            assert_eq!(l.handle(I::ContainerStarted, 3), vec![A::CancelTimers]);
            assert_eq!(l.state(), S::Running);
            unchanged(&mut l, I::TimerFired { token: z2 });
        }
    }

    #[test]
    fn failed_start_is_a_crash() {
        let mut l = running(RestartPolicy::Never);
        l.handle(I::ContainerExited { exit_code: 0 }, 1);
        l.handle(I::StartRequested, 2);
        timer(&l.handle(I::ContainerExited { exit_code: 1 }, 3), DAY);
        assert_eq!(l.state(), S::Failed);
    }

    #[test]
    fn restart_request_is_not_a_failure() {
        let mut l = running(RestartPolicy::OnFailure);
        assert_eq!(
            l.handle(I::RestartRequested, 1),
            vec![A::RestartContainer { timeout_secs: 10 }]
        );
        assert_eq!(l.restarts(), 1);
        assert_eq!(
            l.snapshot_state(),
            S::Restarting,
            "a crash now still owes a start"
        );
        assert_eq!(l.handle(I::ContainerExited { exit_code: 143 }, 2), vec![]);
        assert_eq!(l.state(), S::Running);
        assert_eq!(l.last_exit_code(), Some(143));
        assert_eq!(l.snapshot_state(), S::Restarting);
        assert_eq!(l.handle(I::ContainerStarted, 3), vec![]);
        assert_eq!(l.snapshot_state(), S::Running);
        assert_eq!(l.consecutive_failures(), 0);
        // The next exit is a real one again.
        timer(&l.handle(I::ContainerExited { exit_code: 1 }, 4), 1_000);
        assert_eq!(l.state(), S::Restarting);
    }

    #[test]
    fn a_requested_start_under_way_is_recorded_as_owed() {
        let mut l = running(RestartPolicy::Never);
        l.handle(I::StopRequested, 1);
        l.handle(I::ContainerExited { exit_code: 0 }, 2);
        assert_eq!(l.snapshot_state(), S::Stopped);
        l.handle(I::StartRequested, 3);
        assert_eq!(
            l.snapshot_state(),
            S::Restarting,
            "a crash before the start returns still owes it, whatever the policy"
        );
        l.handle(I::ContainerStarted, 4);
        assert_eq!(l.snapshot_state(), S::Running);
    }

    #[test]
    fn a_restart_reported_whole_is_one_restart_and_no_failure() {
        let mut l = running(RestartPolicy::Never);
        l.handle(I::RestartRequested, 1);
        assert_eq!(l.handle(I::ContainerRestarted, 2), vec![]);
        assert_eq!(l.state(), S::Running);
        assert_eq!(l.snapshot_state(), S::Running);
        assert_eq!(l.restarts(), 1);
        // Only a restart under way can finish.
        unchanged(&mut l, I::ContainerRestarted);
        // The next exit is a real one.
        timer(&l.handle(I::ContainerExited { exit_code: 1 }, 3), DAY);
        assert_eq!(l.state(), S::Failed);
    }

    #[test]
    fn failed_start_of_a_requested_restart_follows_the_policy() {
        let mut l = running(RestartPolicy::Never);
        l.handle(I::RestartRequested, 1);
        l.handle(I::ContainerExited { exit_code: 143 }, 2);
        // The start half failed (the agent feeds the failure back as an exit).
        timer(&l.handle(I::ContainerExited { exit_code: 127 }, 3), DAY);
        assert_eq!(l.state(), S::Failed);
        assert_eq!(l.last_exit_code(), Some(127));
    }

    #[test]
    fn failed_stop_leaves_the_chute_running_and_the_next_exit_a_real_one() {
        for request in [I::StopRequested, I::RestartRequested] {
            let mut l = running(RestartPolicy::OnFailure);
            assert_eq!(l.handle(request.clone(), 1).len(), 1);
            assert_eq!(l.handle(I::StopFailed, 2), vec![]);
            assert_eq!(l.state(), S::Running, "after a failed {request:?}");
            assert_eq!(l.restarts(), 0, "a failed restart is no restart");
            assert_eq!(l.snapshot_state(), S::Running);
            // Not mistaken for the exit of the stop that failed.
            timer(&l.handle(I::ContainerExited { exit_code: 1 }, 3), 1_000);
            assert_eq!(l.state(), S::Restarting);
            // Meaningless when no stop is under way.
            unchanged(&mut l, I::StopFailed);
        }
        let mut l = running(RestartPolicy::OnFailure);
        unchanged(&mut l, I::StopFailed);
    }

    #[test]
    fn restart_request_while_restarting_skips_the_backoff() {
        let mut l = running(RestartPolicy::Always);
        let t = timer(&l.handle(I::ContainerExited { exit_code: 1 }, 1), 1_000);
        assert_eq!(
            l.handle(I::RestartRequested, 2),
            vec![A::CancelTimers, A::StartContainer]
        );
        assert_eq!(l.restarts(), 1);
        unchanged(&mut l, I::TimerFired { token: t });
        l.handle(I::ContainerStarted, 3);
        assert_eq!(l.state(), S::Running);
    }

    #[test]
    fn remove_from_every_state() {
        let full = |stop: bool| {
            let mut v = vec![A::CancelTimers];
            if stop {
                v.push(STOP);
            }
            v.extend([A::RemoveContainer, A::ReleaseReservation]);
            v
        };
        let mut l = Lifecycle::new(RestartPolicy::Always, LifecycleConfig::default());
        assert_eq!(l.handle(I::RemoveRequested, 0), full(true));
        assert_eq!(l.state(), S::Dead);

        let mut l = running(RestartPolicy::Always);
        assert_eq!(l.handle(I::RemoveRequested, 0), full(true));

        let mut l = running(RestartPolicy::Always);
        l.handle(I::ContainerExited { exit_code: 1 }, 0);
        assert_eq!(l.handle(I::RemoveRequested, 0), full(false));

        let mut l = running(RestartPolicy::Never);
        l.handle(I::ContainerExited { exit_code: 0 }, 0);
        assert_eq!(l.handle(I::RemoveRequested, 0), full(false));
        assert_eq!(l.state(), S::Dead);
        unchanged(&mut l, I::RemoveRequested);
    }

    #[test]
    fn install_failed_can_only_be_removed() {
        let mut l = Lifecycle::new(RestartPolicy::Always, LifecycleConfig::default());
        let z = timer(
            &l.handle(
                I::InstallFailed {
                    reason: "no image".into(),
                },
                0,
            ),
            DAY,
        );
        assert_eq!(l.state(), S::Failed);
        let e = l.check(&I::StartRequested).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot start a chute that is failed: it failed to install; deploy it again or remove it (allowed now: remove)"
        );
        unchanged(&mut l, I::StartRequested);
        assert_eq!(
            l.handle(I::TimerFired { token: z }, DAY),
            vec![A::RemoveContainer, A::ReleaseReservation]
        );
    }

    #[test]
    fn early_events_during_install() {
        // "start" overtaking Installed, then a quick crash before Installed.
        let mut l = Lifecycle::new(RestartPolicy::OnFailure, LifecycleConfig::default());
        assert_eq!(l.handle(I::ContainerStarted, 0), vec![]);
        assert_eq!(l.state(), S::Installing);
        timer(&l.handle(I::ContainerExited { exit_code: 1 }, 5), 1_000);
        assert_eq!(l.state(), S::Restarting);
        unchanged(&mut l, I::Installed);
    }

    #[test]
    fn nonsense_requests_change_nothing_and_say_why() {
        let mut l = running(RestartPolicy::Never);
        unchanged(&mut l, I::StartRequested);
        assert_eq!(
            l.check(&I::StartRequested).unwrap_err().to_string(),
            "cannot start a chute that is running: it is already running (allowed now: stop, restart, remove)"
        );
        unchanged(&mut l, I::Installed);
        unchanged(&mut l, I::TimerFired { token: 99 });
        l.handle(I::ContainerExited { exit_code: 0 }, 1);
        for i in [
            I::StopRequested,
            I::RestartRequested,
            I::ContainerExited { exit_code: 0 },
            I::ContainerStarted,
        ] {
            unchanged(&mut l, i);
        }
        assert_eq!(
            l.check(&I::RestartRequested).unwrap_err().to_string(),
            "cannot restart a chute that is stopped: start it first (allowed now: start, remove)"
        );
        let mut i = Lifecycle::new(RestartPolicy::Never, LifecycleConfig::default());
        for r in [I::StartRequested, I::StopRequested, I::RestartRequested] {
            unchanged(&mut i, r);
        }
        assert!(i
            .check(&I::StopRequested)
            .unwrap_err()
            .to_string()
            .contains("still installing"));
        assert_eq!(i.check(&I::ContainerExited { exit_code: 0 }), Ok(()),);
        assert!(matches!(
            running(RestartPolicy::Never).check(&I::Installed),
            Err(LifecycleError::Ignored {
                state: S::Running,
                event: "installed"
            })
        ));
    }

    #[test]
    fn restore_and_resume_rearm_timers() {
        let cfg = LifecycleConfig::default();
        let mut l = Lifecycle::restore(S::Restarting, 7, RestartPolicy::Always, cfg);
        assert_eq!(l.restarts(), 7);
        let t = timer(&l.resume(), 1_000);
        assert_eq!(
            l.handle(I::TimerFired { token: t }, 1_000),
            vec![A::StartContainer]
        );
        assert_eq!(l.restarts(), 8);

        let mut l = Lifecycle::restore(S::Failed, 0, RestartPolicy::Never, cfg);
        let z = timer(&l.resume(), DAY);
        assert_eq!(
            l.handle(I::TimerFired { token: z }, DAY),
            vec![A::RemoveContainer, A::ReleaseReservation]
        );

        let mut l = Lifecycle::restore(S::Running, 0, RestartPolicy::Never, cfg);
        assert_eq!(l.resume(), vec![]);
        timer(&l.handle(I::ContainerExited { exit_code: 9 }, 1), DAY);
        assert_eq!(l.state(), S::Failed);
    }

    #[test]
    fn set_policy_applies_to_the_next_exit() {
        let mut l = running(RestartPolicy::Never);
        l.set_policy(RestartPolicy::Always);
        assert_eq!(l.policy(), RestartPolicy::Always);
        l.handle(I::ContainerExited { exit_code: 0 }, 1);
        assert_eq!(l.state(), S::Restarting);
    }

    #[test]
    fn backoff_config_edge_cases_do_not_overflow() {
        let cfg = LifecycleConfig {
            backoff: BackoffConfig {
                initial_ms: u64::MAX / 2,
                max_ms: u64::MAX,
                factor: u32::MAX,
                reset_after_ms: 0,
            },
            ..LifecycleConfig::default()
        };
        let mut l = Lifecycle::restore(S::Running, u32::MAX, RestartPolicy::Always, cfg);
        for i in 0..5 {
            l.handle(I::ContainerExited { exit_code: 1 }, i);
            let _ = l.next_backoff_ms();
            l.handle(I::RestartRequested, i);
            l.handle(I::ContainerStarted, i);
        }
        assert_eq!(l.restarts(), u32::MAX);
        let zero = LifecycleConfig {
            backoff: BackoffConfig {
                initial_ms: 5_000,
                max_ms: 1_000,
                factor: 0,
                reset_after_ms: 1,
            },
            ..LifecycleConfig::default()
        };
        assert_eq!(
            Lifecycle::new(RestartPolicy::Always, zero).next_backoff_ms(),
            1_000
        );
    }

    #[test]
    fn serde_forms() {
        assert_eq!(
            serde_json::to_string(&S::Restarting).unwrap(),
            "\"restarting\""
        );
        assert_eq!(S::Failed.to_string(), "failed");
        let mut l = running(RestartPolicy::Always);
        l.handle(I::ContainerExited { exit_code: 1 }, 1);
        let bytes = postcard::to_stdvec(&l).unwrap();
        assert_eq!(postcard::from_bytes::<Lifecycle>(&bytes).unwrap(), l);
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(serde_json::from_str::<Lifecycle>(&json).unwrap(), l);
    }
}
