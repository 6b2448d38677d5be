//! Owns the agent's registry of chutes: the `Agent` handle, each chute's task handle and
//! published view, the snapshot writes, and the read-only answers (list, inspect, status).

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use chute_api::{
    AgentStatus, ChuteDetail, ChuteSummary, NetSample, PoolStatus, Response, UnknownContainer,
    UsageSample,
};
use chutes::{ChuteName, ChuteState, Ledger, Lifecycle, LifecycleConfig, Manifest};
use smol::channel::{bounded, Sender};
use smol::{LocalExecutor, Task};
use tracing::warn;

use super::actor::{Actor, ChuteMsg, ChuteOp};
use super::runtime::ContainerRuntime;
use super::usage::net_sample;
use super::{OpError, LABEL_INSTANCE};
use crate::cgroup::CgroupPaths;
use crate::config::AgentConfig;
use crate::podman::Podman;
use crate::snapshot::{self, ChuteRecord, Snapshot};

/// What the rest of the agent may read about a chute; written only by its task.
#[derive(Debug)]
pub struct ChuteView {
    pub manifest: Manifest,
    pub manifest_toml: String,
    pub container_id: Option<String>,
    pub state: ChuteState,
    /// The state a restarted agent should resume from (Stopped while a user's stop is
    /// still in flight, so a crash then does not undo the stop).
    pub durable_state: ChuteState,
    pub restarts: u32,
    pub reservation_held: bool,
    pub last_exit_code: Option<i32>,
    pub last_error: Option<String>,
    pub pid: u32,
    pub sandbox_key: Option<String>,
    pub cgroup: Option<CgroupPaths>,
    pub usage: Option<UsageSample>,
    /// Where the chute's bandwidth shaping lives, once applied.
    pub shaping: Option<tc_shaper::ChuteShaping>,
    pub net: Option<NetSample>,
}

impl ChuteView {
    /// A chute's view before its task has run: nothing known about a run yet.
    pub(super) fn new(
        manifest: Manifest,
        manifest_toml: String,
        state: ChuteState,
        reservation_held: bool,
        container_id: Option<String>,
    ) -> Self {
        ChuteView {
            manifest,
            manifest_toml,
            container_id,
            state,
            durable_state: state,
            restarts: 0,
            reservation_held,
            last_exit_code: None,
            last_error: None,
            pid: 0,
            sandbox_key: None,
            cgroup: None,
            usage: None,
            shaping: None,
            net: None,
        }
    }

    pub(super) fn record(&self) -> ChuteRecord {
        ChuteRecord {
            name: self.manifest.name.to_string(),
            manifest_toml: self.manifest_toml.clone(),
            container_id: self.container_id.clone(),
            state: self.durable_state,
            restarts: self.restarts,
            reservation_held: self.reservation_held,
        }
    }
}

pub(super) struct ChuteHandle {
    pub(super) tx: Sender<ChuteMsg>,
    pub(super) view: Rc<RefCell<ChuteView>>,
}

pub struct Agent {
    /// The libpod client, for the event and log streams.
    pub podman: Podman,
    /// Container operations (the same Podman in the daemon, a fake in unit tests).
    pub runtime: Rc<dyn ContainerRuntime>,
    pub cfg: AgentConfig,
    pub state_dir: PathBuf,
    pub ledger: RefCell<Ledger>,
    pub(super) chutes: RefCell<BTreeMap<ChuteName, ChuteHandle>>,
    pub unknown: RefCell<Vec<UnknownContainer>>,
    pub(super) ex: Rc<LocalExecutor<'static>>,
    pub(super) epoch: Instant,
    pub(super) last_saved: RefCell<Vec<u8>>,
    /// Unit tests' stand-in for a full disk: every snapshot write fails while set.
    #[cfg(test)]
    pub(super) fail_saves: std::cell::Cell<bool>,
    /// Resyncs (an inspect, the cgroup's files opened, shaping checked over netlink)
    /// run a few at a time: after a restart with 100 chutes, all at once held 100
    /// connections' buffers at the same moment and left the heap ~2 MB larger for good.
    pub(super) resync_gate: smol::lock::Semaphore,
}

/// How many chutes resync at once (see [`Agent::resync_gate`]).
const RESYNCS_AT_ONCE: usize = 4;

impl Agent {
    pub fn new(
        podman: Podman,
        cfg: AgentConfig,
        state_dir: PathBuf,
        ex: Rc<LocalExecutor<'static>>,
    ) -> Rc<Self> {
        let runtime = Rc::new(podman.clone());
        Self::with_runtime(podman, runtime, cfg, state_dir, ex)
    }

    /// An agent whose container operations go to `runtime` (streams still to `podman`).
    pub fn with_runtime(
        podman: Podman,
        runtime: Rc<dyn ContainerRuntime>,
        cfg: AgentConfig,
        state_dir: PathBuf,
        ex: Rc<LocalExecutor<'static>>,
    ) -> Rc<Self> {
        Rc::new(Agent {
            podman,
            runtime,
            ledger: RefCell::new(Ledger::new(cfg.pools)),
            cfg,
            state_dir,
            chutes: RefCell::new(BTreeMap::new()),
            unknown: RefCell::new(Vec::new()),
            ex,
            epoch: Instant::now(),
            last_saved: RefCell::new(Vec::new()),
            #[cfg(test)]
            fail_saves: std::cell::Cell::new(false),
            resync_gate: smol::lock::Semaphore::new(RESYNCS_AT_ONCE),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The label filter selecting this agent's containers.
    pub fn owned_filter(&self) -> String {
        format!("{LABEL_INSTANCE}={}", self.cfg.instance)
    }

    pub fn uptime(&self) -> Duration {
        self.epoch.elapsed()
    }

    pub fn spawn<T: 'static>(
        &self,
        fut: impl std::future::Future<Output = T> + 'static,
    ) -> Task<T> {
        self.ex.spawn(fut)
    }

    pub(super) fn lifecycle_config(&self) -> LifecycleConfig {
        self.cfg.lifecycle
    }

    pub(super) fn known_names(&self) -> String {
        let names: Vec<String> = self.chutes.borrow().keys().map(|n| n.to_string()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    /// What `pick` takes from the handle of the chute called `name`.
    fn lookup<T>(&self, name: &str, pick: impl Fn(&ChuteHandle) -> T) -> Result<T, OpError> {
        let parsed = ChuteName::parse(name)?;
        self.chutes
            .borrow()
            .get(&parsed)
            .map(pick)
            .ok_or_else(|| OpError::NoSuchChute {
                name: name.to_owned(),
                known: self.known_names(),
            })
    }

    pub(super) fn sender(&self, name: &str) -> Result<Sender<ChuteMsg>, OpError> {
        self.lookup(name, |h| h.tx.clone())
    }

    pub fn view(&self, name: &str) -> Result<Rc<RefCell<ChuteView>>, OpError> {
        self.lookup(name, |h| h.view.clone())
    }

    pub fn views(&self) -> Vec<Rc<RefCell<ChuteView>>> {
        self.chutes
            .borrow()
            .values()
            .map(|h| h.view.clone())
            .collect()
    }

    /// Writes the snapshot (and its journal copy) if anything in it changed since the last
    /// write. An error means the files on disk still hold the previous state: callers
    /// acting on a user's request refuse or undo it.
    pub fn save_snapshot(&self) -> Result<(), snapshot::SnapshotError> {
        let snap = Snapshot {
            chutes: self
                .chutes
                .borrow()
                .values()
                .map(|h| h.view.borrow().record())
                .collect(),
        };
        let bytes = snapshot::encode(&snap);
        if *self.last_saved.borrow() == bytes {
            return Ok(());
        }
        #[cfg(test)]
        if self.fail_saves.get() {
            return Err(snapshot::SnapshotError::Io {
                path: self.state_dir.join(snapshot::FILE_NAME),
                source: std::io::Error::from_raw_os_error(28),
            });
        }
        match snapshot::save_bytes(&self.state_dir, &bytes) {
            Ok(()) => {
                *self.last_saved.borrow_mut() = bytes;
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "cannot write snapshot");
                Err(e)
            }
        }
    }

    /// The containers carrying this agent's instance label that no chute claims, listed
    /// afresh (at start-up, after every event-stream reconnect, on every `status`). Kept as
    /// it was when Podman cannot answer.
    pub async fn refresh_unknown(&self) {
        let Ok(listed) = self.runtime.list(&self.owned_filter()).await else {
            return;
        };
        let claimed: Vec<String> = self
            .views()
            .iter()
            .filter_map(|v| v.borrow().container_id.clone())
            .collect();
        let unknown = listed
            .into_iter()
            .filter(|c| !claimed.iter().any(|id| id == &c.id))
            .map(|c| UnknownContainer {
                chute: c.labels.get(super::LABEL_CHUTE).cloned(),
                container_id: c.id,
            })
            .collect();
        *self.unknown.borrow_mut() = unknown;
    }

    pub(super) fn spawn_actor(
        self: &Rc<Self>,
        view: ChuteView,
        lifecycle: Lifecycle,
    ) -> Sender<ChuteMsg> {
        let restored = view.state != ChuteState::Installing;
        let name = view.manifest.name.clone();
        // Small on purpose: each slot is preallocated, and a chute sees a handful of events
        // per start; a 256-slot queue per chute was most of the agent's RSS at 100 chutes.
        let (tx, rx) = bounded(16);
        let view = Rc::new(RefCell::new(view));
        self.chutes.borrow_mut().insert(
            name.clone(),
            ChuteHandle {
                tx: tx.clone(),
                view: view.clone(),
            },
        );
        let actor = Actor {
            agent: self.clone(),
            name,
            lc: lifecycle,
            view,
            rx,
            tx: tx.clone(),
            deferred: VecDeque::new(),
            timers: Vec::new(),
            purge: false,
            restored,
            runs: chutes::Confirmations::new(),
            failed_op: None,
            pin: None,
            stop_timeout: None,
        };
        self.ex.spawn(actor.run()).detach();
        tx
    }

    pub(super) fn forget(&self, name: &ChuteName) {
        self.chutes.borrow_mut().remove(name);
        // A failure is logged; the record left on disk says Dead, which reconciliation
        // finishes.
        let _ = self.save_snapshot();
    }

    pub(super) async fn ask(
        &self,
        tx: Sender<ChuteMsg>,
        op: ChuteOp,
        chute: &str,
    ) -> Result<Response, OpError> {
        let (reply, rx) = bounded(1);
        tx.send(ChuteMsg::Request { op, reply })
            .await
            .map_err(|_| OpError::NoSuchChute {
                name: chute.to_owned(),
                known: self.known_names(),
            })?;
        rx.recv().await.unwrap_or_else(|_| {
            Err(OpError::NoSuchChute {
                name: chute.to_owned(),
                known: self.known_names(),
            })
        })
    }

    /// Runs a start, stop, restart or remove through the chute's task.
    pub async fn op(self: &Rc<Self>, name: &str, op: ChuteOp) -> Result<Response, OpError> {
        let tx = self.sender(name)?;
        self.ask(tx, op, name).await
    }

    pub fn list(&self) -> Vec<ChuteSummary> {
        self.views()
            .iter()
            .map(|v| {
                let v = v.borrow();
                ChuteSummary {
                    name: v.manifest.name.clone(),
                    state: v.state,
                    container_id: v.container_id.clone(),
                    restarts: v.restarts,
                    version: v.manifest.version.clone(),
                    image: v.manifest.image.clone(),
                }
            })
            .collect()
    }

    /// `inspect` plus live network counters (and those of its shaping classes).
    pub async fn inspect_live(&self, name: &str) -> Result<ChuteDetail, OpError> {
        let mut d = self.inspect(name)?;
        let netns = self.view(name)?.borrow().sandbox_key.clone();
        let shaped = self.view(name)?.borrow().shaping.clone();
        d.net = net_sample(d.pid, None);
        if let (Some(netns), Some(shaping)) = (netns, shaped) {
            d.shaping = Some(chute_api::ShapingInfo {
                host_interface: shaping.host_ifname,
                chute_interface: shaping.chute_ifname,
            });
            match tc_shaper::chute_stats(Path::new(&netns)).await {
                Ok(stats) => d.net = net_sample(d.pid, Some(&stats)),
                Err(e) => d.net_error = Some(e.to_string()),
            }
        }
        Ok(d)
    }

    pub fn inspect(&self, name: &str) -> Result<ChuteDetail, OpError> {
        let view = self.view(name)?;
        let v = view.borrow();
        let m = &v.manifest;
        Ok(ChuteDetail {
            name: m.name.clone(),
            state: v.state,
            container_id: v.container_id.clone(),
            container_name: m.name.container_name(),
            restarts: v.restarts,
            version: m.version.clone(),
            image: m.image.clone(),
            command: m.command.clone(),
            restart_policy: m.restart,
            reservation_held: v.reservation_held,
            reservation: m.reservation(),
            resources: chute_api::ResourceCaps {
                cpu_millicores: m.resources.cpu_millicores,
                memory_bytes: m.resources.memory_bytes,
                pids: m.resources.pids,
            },
            network: chute_api::NetworkDetail {
                bandwidth_down_bps: m.network.bandwidth_down_bps,
                bandwidth_up_bps: m.network.bandwidth_up_bps,
                ports: m.network.ports.iter().map(|p| p.to_string()).collect(),
                host_network: m.network.host_network,
            },
            pid: v.pid,
            last_exit_code: v.last_exit_code,
            last_error: v.last_error.clone(),
            usage: v.usage.clone(),
            net: v.net.clone(),
            cgroup_limits: v.cgroup.as_ref().and_then(|c| c.limits().ok()),
            shaping: None,
            net_error: None,
        })
    }

    pub fn status(&self) -> AgentStatus {
        let ledger = self.ledger.borrow();
        AgentStatus {
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.uptime().as_secs(),
            unix_time_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            chutes: u32::try_from(self.chutes.borrow().len()).unwrap_or(u32::MAX),
            pools: PoolStatus {
                capacity: ledger.capacity(),
                used: ledger.used(),
                free: ledger.free(),
            },
            unknown_containers: self.unknown.borrow().clone(),
            clock: Some(crate::cloud::clock_status(&self.state_dir)),
            state_dir_bytes: Some(crate::cloud::heartbeat::dir_usage(&self.state_dir)),
        }
    }
}
