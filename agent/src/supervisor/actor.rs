//! Owns the per-chute actor: the one task that alone changes a chute, its messages, and how
//! it carries out the lifecycle's actions against Podman and tells its own starts and stops
//! from Podman's late events.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chute_api::{ChuteAck, DeployOutcome, DeployResult, Response};
use chutes::{
    ChuteName, ChuteState, Confirmations, DiedEvent, Input, Lifecycle, Manifest, StartEvent,
};
use smol::channel::{Receiver, Sender};
use smol::{Task, Timer};
use tracing::{debug, warn};

use super::registry::{Agent, ChuteView};
use super::spec::container_spec;
use super::{crash_point, wall_nanos, OpError, LABEL_CHUTE};
use crate::cgroup::CgroupPaths;
use crate::podman::{ContainerEvent, ContainerInfo, PodmanError};

/// How long an operation waits for Podman's event confirming it before it inspects the
/// container directly (the event stream may be reconnecting).
const EVENT_WAIT: Duration = Duration::from_secs(5);

pub enum ChuteOp {
    Install {
        dir: Option<PathBuf>,
        progress: Sender<String>,
    },
    Update {
        manifest: Box<Manifest>,
        manifest_toml: String,
        dir: Option<PathBuf>,
        progress: Sender<String>,
    },
    Start,
    /// `timeout_secs`: the caller's grace period, capped at the configured one.
    Stop {
        timeout_secs: Option<u32>,
    },
    Restart,
    Remove,
}

pub enum ChuteMsg {
    /// Answered by `handle_op`; deferred while another request is in progress.
    Request { op: ChuteOp, reply: Reply },
    /// Handled at once, even in the middle of a request (which may be waiting for it).
    Happened(Happening),
}

/// Something that happened to a chute, as opposed to something asked of it.
pub enum Happening {
    Event(ContainerEvent),
    Timer(u64),
    Resync,
}

pub(super) type Reply = Sender<Result<Response, OpError>>;

pub(super) struct Actor {
    pub(super) agent: Rc<Agent>,
    pub(super) name: ChuteName,
    pub(super) lc: Lifecycle,
    pub(super) view: Rc<RefCell<ChuteView>>,
    pub(super) rx: Receiver<ChuteMsg>,
    pub(super) tx: Sender<ChuteMsg>,
    /// Requests that arrived while another was in progress, in order.
    pub(super) deferred: VecDeque<(ChuteOp, Reply)>,
    pub(super) timers: Vec<Task<()>>,
    /// Set when an install failed: the chute leaves no trace.
    pub(super) purge: bool,
    /// Built by reconciliation: timers (backoff, zombie) must be re-armed.
    pub(super) restored: bool,
    /// Which of Podman's events only confirm what this task already did.
    pub(super) runs: Confirmations,
    /// Why the Podman call behind the request being handled failed, for its caller.
    pub(super) failed_op: Option<OpError>,
    /// The state recorded in the snapshot in place of the lifecycle's while an update
    /// replaces the container (`Restarting` for a chute that ran: a crash at any point of
    /// the update must end with it running, on the old version or the new).
    pub(super) pin: Option<ChuteState>,
    /// The grace period asked for by the stop being handled, if any.
    pub(super) stop_timeout: Option<u32>,
}

impl Actor {
    pub(super) async fn run(mut self) {
        if self.restored {
            for action in self.lc.resume() {
                self.execute(action).await;
            }
        }
        loop {
            let msg = match self.deferred.pop_front() {
                Some((op, reply)) => ChuteMsg::Request { op, reply },
                None => match self.rx.recv().await {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            let mut reply_to = None;
            match msg {
                ChuteMsg::Request { op, reply } => {
                    reply_to = Some((reply, self.handle_op(op).await));
                }
                ChuteMsg::Happened(h) => self.background(h).await,
            }
            self.publish();
            let finished = self.purge || self.lc.state() == ChuteState::Dead;
            // Durable before acknowledged: a caller told "deployed" must find the chute
            // again even if the agent is killed the next instant.
            // Every request wrote what it decided before acting on it (`feed`, `install`,
            // `update`), so a failure here loses at most details (a new container id, a
            // counter) that reconciliation finds again; it is logged by the writer.
            if finished {
                self.timers.clear();
                self.agent.forget(&self.name);
            } else {
                let _ = self.agent.save_snapshot();
            }
            if let Some((reply, result)) = reply_to {
                let _ = reply.try_send(result);
            }
            if finished {
                // Fail anything still queued rather than leaving callers hanging.
                for (_, reply) in self.deferred.drain(..) {
                    let _ = reply.try_send(Err(OpError::Removed {
                        chute: self.name.to_string(),
                    }));
                }
                break;
            }
            if self.runs.take_refresh() {
                self.refresh_runtime_info().await;
            }
        }
    }

    pub(super) fn publish(&self) {
        let mut v = self.view.borrow_mut();
        v.state = self.lc.state();
        v.durable_state = self.pin.unwrap_or(self.lc.snapshot_state());
        v.restarts = self.lc.restarts();
        if let Some(code) = self.lc.last_exit_code() {
            v.last_exit_code = Some(code);
        }
    }

    pub(super) fn container_id(&self) -> Option<String> {
        self.view.borrow().container_id.clone()
    }

    pub(super) fn podman_err(&self, source: PodmanError) -> OpError {
        OpError::Podman {
            chute: self.name.to_string(),
            source,
        }
    }

    /// Writes the snapshot; a failure as the operation's error.
    pub(super) fn persist(&self) -> Result<(), OpError> {
        self.publish();
        self.agent
            .save_snapshot()
            .map_err(|source| OpError::NotSaved {
                chute: self.name.to_string(),
                source,
            })
    }

    pub(super) fn refused(&self, source: chutes::LifecycleError) -> OpError {
        OpError::Refused {
            chute: self.name.to_string(),
            source,
        }
    }

    pub(super) async fn background(&mut self, happening: Happening) {
        match happening {
            Happening::Event(ev) => {
                if self.container_id().as_deref() != Some(ev.container_id.as_str()) {
                    return;
                }
                match ev.action.as_str() {
                    "start" => match self.runs.start_event(ev.time_nanos) {
                        StartEvent::Confirms => {}
                        // Not ours (a start by hand, or one whose return we never saw).
                        StartEvent::NewRun => self.new_run_seen().await,
                    },
                    "died" => match self.runs.died_event(ev.time_nanos) {
                        // Older than the start we already acted on (events can arrive late
                        // after a stream reconnect): that run is over, this one is not.
                        DiedEvent::Stale => {
                            debug!(chute = %self.name, "ignoring a died event older than the last start")
                        }
                        DiedEvent::Confirms => {
                            debug!(chute = %self.name, "died event confirms the stop already acted on")
                        }
                        DiedEvent::Exited => {
                            let exit_code = ev.exit_code.unwrap_or(-1);
                            debug!(chute = %self.name, exit_code, "container died");
                            self.note_exit_cause(exit_code);
                            self.view.borrow_mut().pid = 0;
                            self.feed(Input::ContainerExited { exit_code }).await;
                        }
                    },
                    _ => {}
                }
            }
            Happening::Timer(token) => self.feed(Input::TimerFired { token }).await,
            Happening::Resync => self.resync().await,
        }
    }

    /// A run this task did not start: shaped (if it must be), then fed to the lifecycle.
    async fn new_run_seen(&mut self) {
        if self.wants_shaping() {
            // Shaped before it is reported running: a fresh start means a
            // fresh network namespace and veth, with no qdiscs on them.
            self.refresh_runtime_info().await;
            self.shape_or_kill().await;
        } else {
            // Pid and cgroup paths are read after the reply is sent, so the inspect they
            // need does not add to start latency.
            self.runs.want_refresh();
        }
        self.feed(Input::ContainerStarted).await;
    }

    /// Compares what we believe with what Podman says, for events we may have missed.
    pub(super) async fn resync(&mut self) {
        // After a gap in the event stream, confirmations may never come; the inspect
        // below is the truth from here on.
        self.runs.resynced();
        let Some(id) = self.container_id() else {
            return;
        };
        let agent = self.agent.clone();
        let _turn = agent.resync_gate.acquire().await;
        match self.agent.runtime.inspect(&id).await {
            Ok(info) => {
                let state = self.lc.state();
                if info.running
                    && matches!(
                        state,
                        ChuteState::Running | ChuteState::Restarting | ChuteState::Installing
                    )
                {
                    self.refresh_runtime_info().await;
                    // Adopted or missed-event chutes: shaping is idempotent, so an
                    // existing tree is adopted and a missing one is built.
                    if self.wants_shaping() {
                        self.shape_or_kill().await;
                    }
                    if state == ChuteState::Restarting {
                        self.runs.start_observed();
                        self.feed(Input::ContainerStarted).await;
                    }
                } else if !info.running && matches!(state, ChuteState::Running) {
                    self.note_exit_cause(info.exit_code);
                    self.view.borrow_mut().pid = 0;
                    self.feed(Input::ContainerExited {
                        exit_code: info.exit_code,
                    })
                    .await;
                }
            }
            Err(e) => debug!(chute = %self.name, error = %e, "resync inspect failed"),
        }
    }

    /// An exit by SIGKILL (137) that the kernel logged as a memory-cgroup OOM kill in this
    /// chute's container is recorded as such, with the cap it hit; `inspect` shows it
    /// beside the exit code (which alone cannot tell it from any other kill).
    fn note_exit_cause(&self, exit_code: i32) {
        if exit_code != 137 {
            return;
        }
        let Some(id) = self.container_id() else {
            return;
        };
        if crate::oom::killed_for_memory(&id, self.runs.last_start_nanos()) {
            let cap = chutes::format_bytes(self.view.borrow().manifest.resources.memory_bytes);
            warn!(chute = %self.name, cap = %cap, "killed: out of memory");
            self.view.borrow_mut().last_error = Some(format!("killed: out of memory (cap {cap})"));
        }
    }

    pub(super) async fn refresh_runtime_info(&mut self) {
        let Some(id) = self.container_id() else {
            return;
        };
        if let Ok(info) = self.agent.runtime.inspect(&id).await {
            self.take_runtime_info(&info);
        }
    }

    /// Records the run's pid, network namespace and cgroup paths from an inspect.
    pub(super) fn take_runtime_info(&mut self, info: &ContainerInfo) {
        let cgroup = if info.pid > 0 {
            CgroupPaths::for_pid(info.pid).ok()
        } else {
            None
        };
        let mut v = self.view.borrow_mut();
        v.pid = info.pid;
        v.sandbox_key = info.sandbox_key.clone();
        v.cgroup = cgroup;
    }

    pub(super) async fn feed(&mut self, input: Input) {
        let mut inputs = VecDeque::from([input]);
        // A failed start feeds an exit back in; the backoff timer bounds that loop, this
        // guard only protects against a logic error turning it into a hot one.
        let mut budget = 16;
        while let Some(input) = inputs.pop_front() {
            budget -= 1;
            if budget == 0 {
                warn!(chute = %self.name, "lifecycle input budget exhausted");
                break;
            }
            let is_request = input.is_request();
            let before = is_request.then(|| self.lc.clone());
            let actions = self.lc.handle(input, self.agent.now_ms());
            if !actions.is_empty() {
                // Record the decision before acting on it: a stop whose `podman stop` is
                // under way when the agent dies must still be a stop after reconciliation.
                // A user's request that cannot be recorded is not carried out (what
                // happens to the chute by itself, a restart after a crash, still is).
                if let Err(e) = self.persist() {
                    if let Some(before) = before {
                        self.lc = before;
                        self.publish();
                        self.failed_op = Some(e);
                        return;
                    }
                }
                if is_request {
                    crash_point("request-recorded");
                }
            }
            for action in actions {
                for next in self.execute(action).await {
                    inputs.push_back(next);
                }
            }
            self.publish();
        }
    }

    /// Carries out one action; what it brought about, to feed back in order.
    pub(super) async fn execute(&mut self, action: chutes::Action) -> Vec<Input> {
        use chutes::Action;
        let podman = self.agent.runtime.clone();
        match action {
            Action::StartContainer => {
                let asked_at = wall_nanos();
                if let Err(e) = self.start_container().await {
                    warn!(chute = %self.name, error = %e, "start failed");
                    self.view.borrow_mut().last_error = Some(e.to_string());
                    return vec![Input::ContainerExited { exit_code: 127 }];
                }
                crash_point("start-after-start");
                self.started_by_us(asked_at, None).await;
                return vec![Input::ContainerStarted];
            }
            Action::StopContainer { timeout_secs } => {
                // A caller may shorten the grace period, never lengthen it.
                let timeout_secs = self
                    .stop_timeout
                    .map_or(timeout_secs, |t| t.min(timeout_secs));
                if let Some(id) = self.container_id() {
                    if let Err(e) = podman.stop(&id, timeout_secs).await {
                        warn!(chute = %self.name, error = %e, "stop failed");
                        self.view.borrow_mut().last_error = Some(e.to_string());
                        self.failed_op = Some(self.podman_err(e));
                        return vec![Input::StopFailed];
                    }
                    crash_point("stop-after-stop");
                    return self.exit_of_our_stop(&id).await.into_iter().collect();
                }
            }
            Action::RestartContainer { timeout_secs } => {
                if let Some(id) = self.container_id() {
                    return self.restart_container(&id, timeout_secs).await;
                }
            }
            Action::RemoveContainer => {
                if let Some(id) = self.container_id() {
                    match podman.remove(&id, true).await {
                        // Forced: it ends the run even if the stop before it failed.
                        Ok(()) | Err(PodmanError::NotFound { .. }) => self.failed_op = None,
                        Err(e) => {
                            // Not removed: the chute stays, with its container and its
                            // reservation, and the caller is told.
                            warn!(chute = %self.name, error = %e, "remove failed");
                            self.failed_op = Some(self.podman_err(e));
                            return Vec::new();
                        }
                    }
                }
                crash_point("remove-after-remove");
                let mut v = self.view.borrow_mut();
                v.container_id = None;
                v.pid = 0;
                v.cgroup = None;
            }
            Action::ReleaseReservation => {
                if self.failed_op.is_some() {
                    // The removal before it failed: the chute keeps what it holds.
                    return Vec::new();
                }
                self.agent.ledger.borrow_mut().release(&self.name);
                self.view.borrow_mut().reservation_held = false;
            }
            Action::SetTimer { token, after_ms } => {
                self.timers.clear();
                let tx = self.tx.clone();
                self.timers.push(self.agent.spawn(async move {
                    Timer::after(Duration::from_millis(after_ms)).await;
                    let _ = tx.send(ChuteMsg::Happened(Happening::Timer(token))).await;
                }));
            }
            Action::CancelTimers => self.timers.clear(),
        }
        Vec::new()
    }

    /// One libpod restart: cheaper than our own stop and start (measured ~100 ms less:
    /// libpod holds the container's lock throughout, so the exit cleanup of the old run
    /// never runs between them), and as prompt to act on, since the new run's StartedAt
    /// tells every `died` of the old run (earlier) from one of the new (later).
    pub(super) async fn restart_container(&mut self, id: &str, timeout_secs: u32) -> Vec<Input> {
        let podman = self.agent.runtime.clone();
        let result = podman.restart(id, timeout_secs).await;
        let info = podman.inspect(id).await;
        match (result, info) {
            (Ok(()), Ok(info)) if info.running => match info.started_at_nanos {
                Some(started) => {
                    // The inspect that dated the new run also located it.
                    self.started_by_us(started, Some(&info)).await;
                    vec![Input::ContainerRestarted]
                }
                // No timestamp to order events by: let them tell the story.
                None => Vec::new(),
            },
            // Restarted and gone again already, or Podman cannot say: the events (or
            // the resync after a gap in them) tell what happened.
            (Ok(()), _) => Vec::new(),
            (Err(e), info) => {
                warn!(chute = %self.name, error = %e, "restart failed");
                self.view.borrow_mut().last_error = Some(e.to_string());
                self.failed_op = Some(self.podman_err(e));
                match info {
                    // The stop half failed: it runs as before.
                    Ok(info) if info.running => vec![Input::StopFailed],
                    // Stopped, and the start half failed: the restart's exit, then a
                    // failed start, which the policy judges like any other.
                    Ok(info) => {
                        self.runs.exited_by_us();
                        self.view.borrow_mut().pid = 0;
                        vec![
                            Input::ContainerExited {
                                exit_code: info.exit_code,
                            },
                            Input::ContainerExited { exit_code: 127 },
                        ]
                    }
                    Err(_) => vec![Input::StopFailed],
                }
            }
        }
    }

    /// Our start returned: the process runs. Acted on now rather than on Podman's `start`
    /// event, which only confirms it and (with the file event logger Podman uses here)
    /// arrives up to a poll interval later; the event, when it comes, is swallowed.
    /// `inspected`: an inspect of the new run the caller already has.
    pub(super) async fn started_by_us(&mut self, asked_at: i64, inspected: Option<&ContainerInfo>) {
        // Taken before the start call: a `died` of this run is later, one of any earlier
        // run is earlier and must be ignored.
        self.runs.started_by_us(asked_at);
        match inspected {
            Some(info) => self.take_runtime_info(info),
            // Shaping needs the new run's network namespace now.
            None if self.wants_shaping() => self.refresh_runtime_info().await,
            // Pid and cgroup paths are read after the reply is sent, so the inspect they
            // need does not add to start latency.
            None => self.runs.want_refresh(),
        }
        if self.wants_shaping() {
            // Shaped before it is reported running: a fresh start means a fresh network
            // namespace and veth, with no qdiscs on them.
            self.shape_or_kill().await;
        }
    }

    /// Our stop returned, so the container has exited: its exit code is read now rather
    /// than waited for in Podman's `died` event (which then only confirms it). `None`
    /// leaves the decision to the event, if Podman says it still runs or cannot say.
    pub(super) async fn exit_of_our_stop(&mut self, id: &str) -> Option<Input> {
        match self.agent.runtime.inspect(id).await {
            Ok(info) if !info.running => {
                self.runs.exited_by_us();
                self.view.borrow_mut().pid = 0;
                Some(Input::ContainerExited {
                    exit_code: info.exit_code,
                })
            }
            Ok(_) => None,
            Err(e) => {
                debug!(chute = %self.name, error = %e, "inspect after stop failed; waiting for the event");
                None
            }
        }
    }

    /// Starts the chute's container, creating it again if it vanished.
    pub(super) async fn start_container(&mut self) -> Result<(), OpError> {
        let podman = self.agent.runtime.clone();
        let id = match self.container_id() {
            Some(id) => id,
            None => {
                let id = self.create_container().await?;
                crash_point("start-after-create");
                id
            }
        };
        match podman.start(&id).await {
            // Gone while we were not looking (removed by hand): build it again.
            Err(PodmanError::NotFound { .. }) => {
                let id = self.create_container().await?;
                podman.start(&id).await.map_err(|e| self.podman_err(e))
            }
            other => other.map_err(|e| self.podman_err(e)),
        }
    }

    /// Resolves and records the image id the chute's containers are created from (see
    /// `imagepin`): after `ensure_image`, before any container exists.
    pub(super) async fn pin_image(
        &self,
        m: &Manifest,
        dir: Option<&std::path::Path>,
    ) -> Result<String, OpError> {
        crate::imagepin::pin(&*self.agent.runtime, &self.agent.state_dir, m, dir)
            .await
            .map_err(|message| OpError::Image {
                chute: self.name.to_string(),
                message,
            })
    }

    pub(super) async fn create_container(&mut self) -> Result<String, OpError> {
        let (mut spec, name, manifest) = {
            let v = self.view.borrow();
            (
                container_spec(&self.agent.cfg, &v.manifest, &v.manifest_toml),
                v.manifest.name.container_name(),
                v.manifest.clone(),
            )
        };
        if let Some(base) = self.agent.cfg.userns_base {
            spec.userns = Some(
                crate::userns::range_for(base, &self.agent.state_dir, self.name.as_str()).map_err(
                    |message| OpError::Userns {
                        chute: self.name.to_string(),
                        message: message.to_string(),
                    },
                )?,
            );
        }
        // Never from a mutable tag: the image id pinned at deploy (see imagepin).
        spec.image =
            crate::imagepin::image_for(&*self.agent.runtime, &self.agent.state_dir, &manifest)
                .await
                .map_err(|message| OpError::Image {
                    chute: self.name.to_string(),
                    message,
                })?;
        // A container with our name but not our id is a leftover of an interrupted
        // operation of ours (same name, our labels): replace it.
        if let Ok(info) = self.agent.runtime.inspect(&name).await {
            if info.labels.get(LABEL_CHUTE).map(String::as_str) == Some(self.name.as_str()) {
                let _ = self.agent.runtime.remove(&info.id, true).await;
            }
        }
        let id = self
            .agent
            .runtime
            .create(&spec)
            .await
            .map_err(|e| self.podman_err(e))?;
        self.view.borrow_mut().container_id = Some(id.clone());
        Ok(id)
    }

    /// Runs the actor's loop (events, timers) until `done` holds, deferring requests.
    pub(super) async fn wait_for(
        &mut self,
        wanted: &'static str,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), OpError> {
        let mut resynced = false;
        let mut deadline = Instant::now()
            + EVENT_WAIT
            + Duration::from_secs(u64::from(self.agent.cfg.lifecycle.stop_timeout_secs));
        while !done(self) {
            let rx = self.rx.clone();
            let msg = smol::future::or(async { rx.recv().await.ok() }, async {
                Timer::at(deadline).await;
                None
            })
            .await;
            match msg {
                Some(ChuteMsg::Request { op, reply }) => self.deferred.push_back((op, reply)),
                Some(ChuteMsg::Happened(h)) => self.background(h).await,
                None if !resynced => {
                    resynced = true;
                    self.resync().await;
                    deadline = Instant::now() + EVENT_WAIT;
                }
                None => {
                    let detail = self
                        .view
                        .borrow()
                        .last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    return Err(OpError::Timeout {
                        chute: self.name.to_string(),
                        wanted,
                        now: self.lc.state(),
                        detail,
                    });
                }
            }
        }
        Ok(())
    }

    pub(super) fn ack(&self) -> ChuteAck {
        ChuteAck {
            name: self.name.clone(),
            state: self.lc.state(),
            container_id: self.container_id(),
            restarts: self.lc.restarts(),
        }
    }

    pub(super) fn deployed(&self, outcome: DeployOutcome) -> Response {
        Response::Deploy(DeployResult {
            chute: self.ack(),
            outcome,
        })
    }

    pub(super) async fn handle_op(&mut self, op: ChuteOp) -> Result<Response, OpError> {
        self.failed_op = None;
        match op {
            ChuteOp::Install { dir, progress } => self.install(dir.as_deref(), &progress).await,
            ChuteOp::Update {
                manifest,
                manifest_toml,
                dir,
                progress,
            } => {
                self.update(*manifest, manifest_toml, dir.as_deref(), &progress)
                    .await
            }
            ChuteOp::Start => {
                self.lc
                    .check(&Input::StartRequested)
                    .map_err(|e| self.refused(e))?;
                let admitted = !self.view.borrow().reservation_held;
                if admitted {
                    let want = self.view.borrow().manifest.reservation();
                    self.agent
                        .ledger
                        .borrow_mut()
                        .admit(self.name.clone(), want)?;
                    self.view.borrow_mut().reservation_held = true;
                }
                self.view.borrow_mut().last_error = None;
                let before = self.runs.starts_seen();
                self.feed(Input::StartRequested).await;
                if let Some(e) = self
                    .failed_op
                    .take()
                    .filter(|e| matches!(e, OpError::NotSaved { .. }))
                {
                    if admitted {
                        self.agent.ledger.borrow_mut().release(&self.name);
                        self.view.borrow_mut().reservation_held = false;
                    }
                    return Err(e);
                }
                self.wait_for("running", |a| {
                    a.runs.starts_seen() > before && a.lc.state() == ChuteState::Running
                })
                .await?;
                Ok(Response::Chute(self.ack()))
            }
            ChuteOp::Stop { timeout_secs } => {
                self.lc
                    .check(&Input::StopRequested)
                    .map_err(|e| self.refused(e))?;
                self.stop_timeout = timeout_secs;
                self.feed(Input::StopRequested).await;
                self.stop_timeout = None;
                if let Some(e) = self.failed_op.take() {
                    return Err(e);
                }
                self.wait_for("stopped", |a| a.lc.state() == ChuteState::Stopped)
                    .await?;
                Ok(Response::Chute(self.ack()))
            }
            ChuteOp::Restart => {
                self.lc
                    .check(&Input::RestartRequested)
                    .map_err(|e| self.refused(e))?;
                let before = self.runs.starts_seen();
                self.feed(Input::RestartRequested).await;
                if let Some(e) = self.failed_op.take() {
                    return Err(e);
                }
                self.wait_for("running", |a| {
                    a.runs.starts_seen() > before && a.lc.state() == ChuteState::Running
                })
                .await?;
                Ok(Response::Chute(self.ack()))
            }
            ChuteOp::Remove => {
                let before = self.lc.clone();
                self.feed(Input::RemoveRequested).await;
                if let Some(e) = self.failed_op.take() {
                    // Not recorded, or Podman did not remove the container: the chute is
                    // kept as it was (listed, reservation held) and the caller told so.
                    let resumed = self.lc.state() == ChuteState::Dead;
                    self.lc = before;
                    if resumed {
                        // Its timers were cancelled with the removal.
                        for action in self.lc.resume() {
                            self.execute(action).await;
                        }
                        let _ = self.persist();
                        // The stop before the failed removal may have ended the run.
                        self.resync().await;
                    }
                    return Err(e);
                }
                if self.view.borrow().reservation_held {
                    self.agent.ledger.borrow_mut().release(&self.name);
                    self.view.borrow_mut().reservation_held = false;
                }
                Ok(Response::Chute(ChuteAck {
                    name: self.name.clone(),
                    state: ChuteState::Dead,
                    container_id: None,
                    restarts: self.lc.restarts(),
                }))
            }
        }
    }
}
