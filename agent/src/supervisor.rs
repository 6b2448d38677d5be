//! The supervisor: one task per chute that alone owns that chute's lifecycle (Spawnpoint's
//! design), a router that feeds Podman's event stream to those tasks, a usage sampler, and
//! reconciliation with what Podman reports when the agent starts.
//!
//! Everything runs on one single-threaded executor; shared state lives in `RefCell`s that
//! are never borrowed across an `.await`.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use chutes::{
    AdmissionError, ChuteName, ChuteState, Input, Ledger, Lifecycle, LifecycleConfig, Manifest,
    ManifestError, ReconcileAction,
};
use serde_json::{json, Value};
use smol::channel::{bounded, Receiver, Sender};
use smol::{LocalExecutor, Task, Timer};
use tracing::{debug, info, warn};

use crate::cgroup::CgroupPaths;
use crate::config::AgentConfig;
use crate::podman::{ContainerEvent, ContainerInfo, ContainerSpec, Podman, PodmanError};
use crate::snapshot::{self, ChuteRecord, Snapshot};

pub const LABEL_MANAGED: &str = "chuted.managed";
pub const LABEL_CHUTE: &str = "chuted.chute";
pub const LABEL_MANIFEST: &str = "chuted.manifest";
pub const LABEL_INSTANCE: &str = "chuted.instance";
/// Name of an image archive beside `chute.toml`, and of the file holding its sha256.
pub const IMAGE_ARCHIVE: &str = "image.tar";
pub const IMAGE_DIGEST: &str = "image.tar.sha256";

/// How long an operation waits for Podman's event confirming it before it inspects the
/// container directly (the event stream may be reconnecting).
const EVENT_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("no chute named `{name}` (known: {known})")]
    NoSuchChute { name: String, known: String },
    #[error("chute `{chute}`: {message}")]
    State { chute: String, message: String },
    #[error("chute `{chute}` asks for the host network, which this agent's config does not allow (set allow_host_network = true to permit it)")]
    HostNetworkRefused { chute: String },
    #[error("chute `{chute}`: image: {message}")]
    Image { chute: String, message: String },
    #[error("chute `{chute}`: podman: {source}")]
    Podman {
        chute: String,
        #[source]
        source: PodmanError,
    },
    #[error("chute `{chute}`: update failed and the previous version was restored: {message}")]
    UpdateRolledBack { chute: String, message: String },
    #[error("chute `{chute}`: timed out waiting to become {wanted} (now {now}){detail}")]
    Timeout {
        chute: String,
        wanted: &'static str,
        now: ChuteState,
        detail: String,
    },
    #[error("chute `{chute}` is busy with another operation; try again")]
    Busy { chute: String },
    #[error(transparent)]
    Uncappable(#[from] crate::controllers::Uncappable),
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UsageSample {
    pub cpu_usage_ns: u64,
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub pids: u64,
    pub sampled_at_ms: u64,
}

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

/// Per-direction counters of the chute's shaping classes (L2 bytes).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NetSample {
    pub down_bytes: u64,
    pub down_packets: u64,
    pub down_drops: u64,
    pub down_rate_bps: u64,
    pub up_bytes: u64,
    pub up_packets: u64,
    pub up_drops: u64,
    pub up_rate_bps: u64,
}

impl NetSample {
    pub fn from_stats(s: &tc_shaper::ShapingStats) -> Self {
        let mut n = NetSample::default();
        if let Some(d) = &s.down {
            n.down_bytes = d.bytes;
            n.down_packets = d.packets;
            n.down_drops = d.drops;
            n.down_rate_bps = d.rate_bps;
        }
        if let Some(u) = &s.up {
            n.up_bytes = u.bytes;
            n.up_packets = u.packets;
            n.up_drops = u.drops;
            n.up_rate_bps = u.rate_bps;
        }
        n
    }
}

impl ChuteView {
    fn record(&self) -> ChuteRecord {
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
    Stop,
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

type Reply = Sender<Result<Value, OpError>>;

struct ChuteHandle {
    tx: Sender<ChuteMsg>,
    view: Rc<RefCell<ChuteView>>,
}

/// A container with our labels that the snapshot did not know: reported, never deleted.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnknownContainer {
    pub container_id: String,
    pub chute: Option<String>,
}

pub struct Agent {
    pub podman: Podman,
    pub cfg: AgentConfig,
    pub state_dir: PathBuf,
    pub ledger: RefCell<Ledger>,
    chutes: RefCell<BTreeMap<ChuteName, ChuteHandle>>,
    pub unknown: RefCell<Vec<UnknownContainer>>,
    ex: Rc<LocalExecutor<'static>>,
    epoch: Instant,
    last_saved: RefCell<Vec<u8>>,
}

impl Agent {
    pub fn new(
        podman: Podman,
        cfg: AgentConfig,
        state_dir: PathBuf,
        ex: Rc<LocalExecutor<'static>>,
    ) -> Rc<Self> {
        Rc::new(Agent {
            podman,
            ledger: RefCell::new(Ledger::new(cfg.pools)),
            cfg,
            state_dir,
            chutes: RefCell::new(BTreeMap::new()),
            unknown: RefCell::new(Vec::new()),
            ex,
            epoch: Instant::now(),
            last_saved: RefCell::new(Vec::new()),
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

    fn lifecycle_config(&self) -> LifecycleConfig {
        self.cfg.lifecycle
    }

    fn known_names(&self) -> String {
        let names: Vec<String> = self.chutes.borrow().keys().map(|n| n.to_string()).collect();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }

    fn handle(&self, name: &str) -> Result<Sender<ChuteMsg>, OpError> {
        let parsed = ChuteName::parse(name)?;
        self.chutes
            .borrow()
            .get(&parsed)
            .map(|h| h.tx.clone())
            .ok_or_else(|| OpError::NoSuchChute {
                name: name.to_owned(),
                known: self.known_names(),
            })
    }

    pub fn view(&self, name: &str) -> Result<Rc<RefCell<ChuteView>>, OpError> {
        let parsed = ChuteName::parse(name)?;
        self.chutes
            .borrow()
            .get(&parsed)
            .map(|h| h.view.clone())
            .ok_or_else(|| OpError::NoSuchChute {
                name: name.to_owned(),
                known: self.known_names(),
            })
    }

    pub fn views(&self) -> Vec<Rc<RefCell<ChuteView>>> {
        self.chutes
            .borrow()
            .values()
            .map(|h| h.view.clone())
            .collect()
    }

    /// Writes the snapshot if anything in it changed since the last write.
    pub fn save_snapshot(&self) {
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
            return;
        }
        match snapshot::save(&self.state_dir, &snap) {
            Ok(()) => *self.last_saved.borrow_mut() = bytes,
            Err(e) => warn!(error = %e, "cannot write snapshot"),
        }
    }

    fn spawn_actor(self: &Rc<Self>, view: ChuteView, lifecycle: Lifecycle) -> Sender<ChuteMsg> {
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
            starts_seen: 0,
            purge: false,
            restored,
            refresh_pending: false,
            last_start_nanos: 0,
            unconfirmed_starts: 0,
            exit_confirmed: false,
            failed_op: None,
        };
        self.ex.spawn(actor.run()).detach();
        tx
    }

    fn forget(&self, name: &ChuteName) {
        self.chutes.borrow_mut().remove(name);
        self.save_snapshot();
    }

    async fn ask(&self, tx: Sender<ChuteMsg>, op: ChuteOp, chute: &str) -> Result<Value, OpError> {
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

    /// Deploys a new chute or updates an existing one. Nothing is created or changed when
    /// this fails (an update that fails midway puts the previous version back).
    pub async fn deploy(
        self: &Rc<Self>,
        manifest_toml: String,
        dir: Option<PathBuf>,
        progress: Sender<String>,
    ) -> Result<Value, OpError> {
        let manifest = Manifest::from_toml_str(&manifest_toml)?;
        if manifest.network.host_network && !self.cfg.allow_host_network {
            return Err(OpError::HostNetworkRefused {
                chute: manifest.name.to_string(),
            });
        }
        // A chute whose caps Podman would silently drop is refused, naming the controller.
        crate::controllers::require(manifest.name.as_str(), self.cfg.cgroup_parent.as_deref())?;
        let name = manifest.name.clone();
        let existing = self.chutes.borrow().get(&name).map(|h| h.tx.clone());
        if let Some(tx) = existing {
            let op = ChuteOp::Update {
                manifest: Box::new(manifest),
                manifest_toml,
                dir,
                progress,
            };
            return self.ask(tx, op, name.as_str()).await;
        }
        // Reserve first so two concurrent deploys cannot both fit into the same space;
        // the installer releases it again if anything fails.
        self.ledger
            .borrow_mut()
            .admit(name.clone(), manifest.reservation())?;
        let _ = progress.try_send(format!(
            "reserved {} cpu, {} memory, {} pids",
            chutes::format_cpu(u64::from(manifest.resources.cpu_millicores)),
            chutes::format_bytes(manifest.resources.memory_bytes),
            manifest.resources.pids
        ));
        let view = ChuteView {
            manifest: manifest.clone(),
            manifest_toml,
            container_id: None,
            state: ChuteState::Installing,
            durable_state: ChuteState::Installing,
            restarts: 0,
            reservation_held: true,
            last_exit_code: None,
            last_error: None,
            pid: 0,
            sandbox_key: None,
            cgroup: None,
            usage: None,
            shaping: None,
            net: None,
        };
        let lc = Lifecycle::new(manifest.restart, self.lifecycle_config());
        let tx = self.spawn_actor(view, lc);
        self.ask(tx, ChuteOp::Install { dir, progress }, name.as_str())
            .await
    }

    pub async fn op(self: &Rc<Self>, name: &str, op: ChuteOp) -> Result<Value, OpError> {
        let tx = self.handle(name)?;
        self.ask(tx, op, name).await
    }

    pub fn list(&self) -> Vec<crate::admin::ChuteSummary> {
        self.views()
            .iter()
            .map(|v| {
                let v = v.borrow();
                crate::admin::ChuteSummary {
                    name: v.manifest.name.to_string(),
                    state: v.state,
                    container_id: v.container_id.clone(),
                    restarts: v.restarts,
                    version: v.manifest.version.clone(),
                    image: v.manifest.image.clone(),
                }
            })
            .collect()
    }

    /// `inspect` plus the live counters of the chute's shaping classes.
    pub async fn inspect_live(&self, name: &str) -> Result<Value, OpError> {
        let mut v = self.inspect(name)?;
        let netns = self.view(name)?.borrow().sandbox_key.clone();
        let shaped = self.view(name)?.borrow().shaping.clone();
        if let (Some(netns), Some(shaping)) = (netns, shaped) {
            v["shaping"] = json!({
                "host_interface": shaping.host_ifname,
                "chute_interface": shaping.chute_ifname,
            });
            match tc_shaper::chute_stats(Path::new(&netns)).await {
                Ok(stats) => v["net"] = json!(NetSample::from_stats(&stats)),
                Err(e) => v["net_error"] = json!(e.to_string()),
            }
        }
        Ok(v)
    }

    pub fn inspect(&self, name: &str) -> Result<Value, OpError> {
        let view = self.view(name)?;
        let v = view.borrow();
        let m = &v.manifest;
        Ok(json!({
            "name": m.name.as_str(),
            "state": v.state,
            "container_id": v.container_id,
            "container_name": m.name.container_name(),
            "restarts": v.restarts,
            "version": m.version,
            "image": m.image,
            "command": m.command,
            "restart_policy": m.restart,
            "reservation_held": v.reservation_held,
            "reservation": m.reservation(),
            "resources": {
                "cpu_millicores": m.resources.cpu_millicores,
                "memory_bytes": m.resources.memory_bytes,
                "pids": m.resources.pids,
            },
            "network": {
                "bandwidth_down_bps": m.network.bandwidth_down_bps,
                "bandwidth_up_bps": m.network.bandwidth_up_bps,
                "ports": m.network.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
                "host_network": m.network.host_network,
            },
            "pid": v.pid,
            "last_exit_code": v.last_exit_code,
            "last_error": v.last_error,
            "usage": v.usage,
            "net": v.net,
            "cgroup_limits": v.cgroup.as_ref().and_then(|c| c.limits().ok()).map(|l| json!({
                "memory_max": l.memory_max,
                "memory_swap_max": l.memory_swap_max,
                "cpu_quota_us": l.cpu_quota_us,
                "cpu_period_us": l.cpu_period_us,
                "pids_max": l.pids_max,
            })),
        }))
    }

    pub fn status(&self) -> Value {
        let ledger = self.ledger.borrow();
        json!({
            "agent_version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": self.uptime().as_secs(),
            "chutes": self.chutes.borrow().len(),
            "pools": {
                "capacity": ledger.capacity(),
                "used": ledger.used(),
                "free": ledger.free(),
            },
            "unknown_containers": *self.unknown.borrow(),
        })
    }

    /// Brings the in-memory state in line with the snapshot and what Podman reports.
    pub async fn reconcile(self: &Rc<Self>) -> anyhow_free::Result<()> {
        let (records, rebuilt) = match snapshot::load(&self.state_dir) {
            Ok(Some(s)) => (s.chutes, false),
            Ok(None) => (Vec::new(), false),
            Err(e) => {
                let aside = snapshot::set_aside(&self.state_dir);
                warn!(error = %e, set_aside = ?aside, "snapshot unusable; rebuilding from container labels");
                (Vec::new(), true)
            }
        };
        let observed = self
            .podman
            .list(&self.owned_filter())
            .await
            .map_err(|e| anyhow_free::Error(format!("cannot list containers: {e}")))?;

        // When the snapshot was lost, the labels are the record: every container we own
        // carries its manifest.
        let mut records = records;
        if rebuilt {
            for c in &observed {
                if let (Some(name), Some(toml)) =
                    (c.labels.get(LABEL_CHUTE), c.labels.get(LABEL_MANIFEST))
                {
                    if records.iter().any(|r| &r.name == name) {
                        continue;
                    }
                    records.push(ChuteRecord {
                        name: name.clone(),
                        manifest_toml: toml.clone(),
                        container_id: Some(c.id.clone()),
                        state: ChuteState::Running,
                        restarts: 0,
                        reservation_held: true,
                    });
                }
            }
        }

        let mut manifests: BTreeMap<ChuteName, (Manifest, ChuteRecord)> = BTreeMap::new();
        for r in records {
            match Manifest::from_toml_str(&r.manifest_toml) {
                Ok(m) => {
                    manifests.insert(m.name.clone(), (m, r));
                }
                Err(e) => {
                    warn!(chute = %r.name, error = %e, "snapshot entry has an invalid manifest; skipping")
                }
            }
        }
        let known: Vec<chutes::KnownChute> = manifests
            .values()
            .map(|(m, r)| chutes::KnownChute {
                name: m.name.clone(),
                container_id: r.container_id.clone(),
                state: r.state,
                policy: m.restart,
            })
            .collect();
        let obs: Vec<chutes::ObservedContainer> = observed
            .iter()
            .map(|c| chutes::ObservedContainer {
                id: c.id.clone(),
                chute: c
                    .labels
                    .get(LABEL_CHUTE)
                    .and_then(|n| ChuteName::parse(n).ok()),
                running: c.running,
                exit_code: Some(c.exit_code),
            })
            .collect();
        let plan = chutes::reconcile::plan(&known, &obs);
        info!(
            actions = plan.len(),
            chutes = known.len(),
            containers = obs.len(),
            "reconciling"
        );
        for action in plan {
            self.apply_reconcile(action, &mut manifests).await;
        }
        self.save_snapshot();
        Ok(())
    }

    async fn apply_reconcile(
        self: &Rc<Self>,
        action: ReconcileAction,
        manifests: &mut BTreeMap<ChuteName, (Manifest, ChuteRecord)>,
    ) {
        match action {
            ReconcileAction::Adopt {
                chute,
                container_id,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                info!(chute = %chute, container = %short(&container_id), "adopting running chute");
                let tx = self.spawn_restored(restored_view(
                    m,
                    r,
                    ChuteState::Running,
                    true,
                    Some(container_id),
                ));
                let _ = tx.send(ChuteMsg::Happened(Happening::Resync)).await;
            }
            ReconcileAction::Restart {
                chute,
                container_id,
                exit_code,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                info!(chute = %chute, ?exit_code, "chute died while the agent was down; restarting per policy {}", m.restart);
                let mut view = restored_view(m, r, ChuteState::Stopped, true, Some(container_id));
                view.last_exit_code = exit_code;
                // The start below is a restart: counted now, as the lifecycle would have.
                view.restarts = r.restarts.saturating_add(1);
                let tx = self.spawn_restored(view);
                start_in_background(&tx).await;
            }
            ReconcileAction::Release {
                chute,
                container_id,
                exit_code,
            } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                let state = if exit_code.unwrap_or(0) == 0 {
                    ChuteState::Stopped
                } else {
                    ChuteState::Failed
                };
                info!(chute = %chute, ?exit_code, "chute died while the agent was down; policy {} says no restart, reservation freed", m.restart);
                let mut view = restored_view(m, r, state, false, Some(container_id));
                view.last_exit_code = exit_code;
                self.spawn_restored(view);
            }
            ReconcileAction::KeepStopped {
                chute,
                container_id,
            } => self.keep_stopped(&chute, Some(container_id), manifests),
            ReconcileAction::Recreate { chute } => {
                let Some((m, r)) = manifests.get(&chute) else {
                    return;
                };
                warn!(chute = %chute, "container is gone; re-creating it");
                let tx = self.spawn_restored(restored_view(m, r, ChuteState::Stopped, true, None));
                start_in_background(&tx).await;
            }
            ReconcileAction::ReportUnknown {
                container_id,
                chute,
            } => {
                warn!(container = %short(&container_id), chute = ?chute.as_ref().map(|c| c.to_string()),
                    "container carries chuted labels but is not in the snapshot; leaving it alone (remove it with `podman rm` if it is stale)");
                self.unknown.borrow_mut().push(UnknownContainer {
                    container_id,
                    chute: chute.map(|c| c.to_string()),
                });
            }
            ReconcileAction::Forget { chute } => {
                debug!(chute = %chute, "forgetting chute with no container");
            }
            ReconcileAction::FinishRemoval {
                chute,
                container_id,
            } => {
                info!(chute = %chute, container = %short(&container_id), "finishing a removal interrupted by the agent stopping");
                if let Err(e) = self.podman.remove(&container_id, true).await {
                    warn!(chute = %chute, error = %e, "cannot remove leftover container");
                }
            }
            ReconcileAction::RecreateStopped { chute } => {
                info!(chute = %chute, "stopped chute's container is gone; it will be re-created on the next start");
                self.keep_stopped(&chute, None, manifests);
            }
        }
        let over = self.ledger.borrow().overcommitted();
        if !over.is_empty() {
            warn!(?over, "adopted chutes exceed the configured pools; new deploys will be refused until space is freed");
        }
    }
}

impl Agent {
    /// A chute the user stopped (or that failed) before the agent went down: it stays as it
    /// was, keeping its reservation if it held one; a missing container is re-created on
    /// the next start.
    fn keep_stopped(
        self: &Rc<Self>,
        chute: &ChuteName,
        container_id: Option<String>,
        manifests: &BTreeMap<ChuteName, (Manifest, ChuteRecord)>,
    ) {
        let Some((m, r)) = manifests.get(chute) else {
            return;
        };
        self.spawn_restored(restored_view(
            m,
            r,
            r.state,
            r.reservation_held,
            container_id,
        ));
    }

    /// Gives a chute rebuilt by reconciliation its task: its reservation back in the ledger
    /// if the view says it holds one, its lifecycle in the view's state and restart count.
    fn spawn_restored(self: &Rc<Self>, view: ChuteView) -> Sender<ChuteMsg> {
        if view.reservation_held {
            self.ledger
                .borrow_mut()
                .force_insert(view.manifest.name.clone(), view.manifest.reservation());
        }
        let lc = Lifecycle::restore(
            view.state,
            view.restarts,
            view.manifest.restart,
            self.lifecycle_config(),
        );
        self.spawn_actor(view, lc)
    }
}

/// The view of a chute rebuilt from its snapshot record during reconciliation.
fn restored_view(
    m: &Manifest,
    r: &ChuteRecord,
    state: ChuteState,
    held: bool,
    container_id: Option<String>,
) -> ChuteView {
    ChuteView {
        manifest: m.clone(),
        manifest_toml: r.manifest_toml.clone(),
        container_id,
        state,
        durable_state: state,
        restarts: r.restarts,
        reservation_held: held,
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

/// Asks a freshly restored chute to start; nobody waits for the answer (its task logs and
/// records a failure).
async fn start_in_background(tx: &Sender<ChuteMsg>) {
    let (reply, _rx) = bounded(1);
    let _ = tx
        .send(ChuteMsg::Request {
            op: ChuteOp::Start,
            reply,
        })
        .await;
}

/// A minimal error type for the binary-facing reconcile entry point, so this library does
/// not need `anyhow`.
pub mod anyhow_free {
    #[derive(Debug)]
    pub struct Error(pub String);
    impl std::fmt::Display for Error {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Error {}
    pub type Result<T> = std::result::Result<T, Error>;
}

/// Wall-clock time in Podman's event timestamp unit.
fn wall_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// The libpod spec for a chute: caps enforced by the kernel, nothing privileged.
pub fn container_spec(cfg: &AgentConfig, m: &Manifest, manifest_toml: &str) -> ContainerSpec {
    const CPU_PERIOD_US: u64 = 100_000;
    // The kernel refuses CFS quotas under 1 ms.
    let quota = (i64::from(m.resources.cpu_millicores) * CPU_PERIOD_US as i64 / 1000).max(1000);
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    labels.insert(LABEL_INSTANCE.to_owned(), cfg.instance.clone());
    labels.insert(LABEL_CHUTE.to_owned(), m.name.to_string());
    labels.insert(LABEL_MANIFEST.to_owned(), manifest_toml.to_owned());
    labels.insert("chuted.version".to_owned(), m.version.clone());
    ContainerSpec {
        name: m.name.container_name(),
        image: m.image.clone(),
        command: m.command.clone(),
        env: m.env.clone(),
        labels,
        memory_bytes: m.resources.memory_bytes,
        cpu_quota_us: quota,
        cpu_period_us: CPU_PERIOD_US,
        pids_limit: i64::from(m.resources.pids),
        ulimits: vec![
            ("nofile".to_owned(), cfg.ulimit_nofile, cfg.ulimit_nofile),
            ("nproc".to_owned(), cfg.ulimit_nproc, cfg.ulimit_nproc),
        ],
        cap_add: cfg.cap_add.clone(),
        no_new_privileges: true,
        host_network: m.network.host_network,
        ports: m
            .network
            .ports
            .iter()
            .map(|p| (p.host, p.container, p.protocol.to_string()))
            .collect(),
        oci_runtime: cfg.oci_runtime.clone(),
        stop_timeout_secs: cfg.lifecycle.stop_timeout_secs,
        cgroup_parent: cfg.cgroup_parent.clone(),
    }
}

struct Actor {
    agent: Rc<Agent>,
    name: ChuteName,
    lc: Lifecycle,
    view: Rc<RefCell<ChuteView>>,
    rx: Receiver<ChuteMsg>,
    tx: Sender<ChuteMsg>,
    /// Requests that arrived while another was in progress, in order.
    deferred: VecDeque<(ChuteOp, Reply)>,
    timers: Vec<Task<()>>,
    starts_seen: u64,
    /// Set when an install failed: the chute leaves no trace.
    purge: bool,
    /// Built by reconciliation: timers (backoff, zombie) must be re-armed.
    restored: bool,
    /// The container (re)started; its pid and cgroup paths are to be read.
    refresh_pending: bool,
    /// Podman's timestamp of the last `start` event handled.
    last_start_nanos: i64,
    /// Starts acted on when libpod returned, whose `start` event is still to come.
    unconfirmed_starts: u32,
    /// The current run's exit was acted on when our stop returned: a `died` event before
    /// the next start only confirms it.
    exit_confirmed: bool,
    /// Why the Podman call behind the request being handled failed, for its caller.
    failed_op: Option<OpError>,
}

impl Actor {
    async fn run(mut self) {
        if self.restored {
            for action in self.lc.resume(self.agent.now_ms()) {
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
            if finished {
                self.timers.clear();
                self.agent.forget(&self.name);
            } else {
                self.agent.save_snapshot();
            }
            if let Some((reply, result)) = reply_to {
                let _ = reply.try_send(result);
            }
            if finished {
                // Fail anything still queued rather than leaving callers hanging.
                for (_, reply) in self.deferred.drain(..) {
                    let _ = reply.try_send(Err(OpError::State {
                        chute: self.name.to_string(),
                        message: "was removed".into(),
                    }));
                }
                break;
            }
            if self.refresh_pending {
                self.refresh_pending = false;
                self.refresh_runtime_info().await;
            }
        }
    }

    fn publish(&self) {
        let mut v = self.view.borrow_mut();
        v.state = self.lc.state();
        v.durable_state = self.lc.snapshot_state();
        v.restarts = self.lc.restarts();
        if let Some(code) = self.lc.last_exit_code() {
            v.last_exit_code = Some(code);
        }
    }

    fn container_id(&self) -> Option<String> {
        self.view.borrow().container_id.clone()
    }

    fn podman_err(&self, source: PodmanError) -> OpError {
        OpError::Podman {
            chute: self.name.to_string(),
            source,
        }
    }

    fn state_err(&self, e: impl std::fmt::Display) -> OpError {
        OpError::State {
            chute: self.name.to_string(),
            message: e.to_string(),
        }
    }

    async fn background(&mut self, happening: Happening) {
        match happening {
            Happening::Event(ev) => {
                if self.container_id().as_deref() != Some(ev.container_id.as_str()) {
                    return;
                }
                match ev.action.as_str() {
                    "start" if self.unconfirmed_starts > 0 => {
                        // The confirmation of a start we already acted on when libpod's
                        // start returned. Feeding it again could land after a later request
                        // (a restart) and be mistaken for that request's start.
                        self.unconfirmed_starts -= 1;
                        self.last_start_nanos = self.last_start_nanos.max(ev.time_nanos);
                        self.refresh_pending = true;
                    }
                    "start" => {
                        // Not ours (a start by hand, or one whose return we never saw).
                        self.last_start_nanos = self.last_start_nanos.max(ev.time_nanos);
                        self.exit_confirmed = false;
                        if self.wants_shaping() {
                            // Shaped before it is reported running: a fresh start means a
                            // fresh network namespace and veth, with no qdiscs on them.
                            self.refresh_runtime_info().await;
                            self.shape_or_kill().await;
                        } else {
                            // Pid and cgroup paths are read after the reply is sent, so
                            // the inspect they need does not add to start latency.
                            self.refresh_pending = true;
                        }
                        self.starts_seen += 1;
                        self.feed(Input::ContainerStarted).await;
                    }
                    "died" if ev.time_nanos != 0 && ev.time_nanos < self.last_start_nanos => {
                        // Older than the start we already acted on (events can arrive late
                        // after a stream reconnect): that run is over, this one is not.
                        debug!(chute = %self.name, "ignoring a died event older than the last start");
                    }
                    "died" if self.exit_confirmed => {
                        debug!(chute = %self.name, "died event confirms the stop already acted on");
                    }
                    "died" => {
                        let exit_code = ev.exit_code.unwrap_or(-1);
                        debug!(chute = %self.name, exit_code, "container died");
                        self.view.borrow_mut().pid = 0;
                        self.feed(Input::ContainerExited { exit_code }).await;
                    }
                    _ => {}
                }
            }
            Happening::Timer(token) => self.feed(Input::TimerFired { token }).await,
            Happening::Resync => self.resync().await,
        }
    }

    /// Compares what we believe with what Podman says, for events we may have missed.
    async fn resync(&mut self) {
        // After a gap in the event stream, confirmations may never come; the inspect
        // below is the truth from here on.
        self.unconfirmed_starts = 0;
        self.exit_confirmed = false;
        let Some(id) = self.container_id() else {
            return;
        };
        match self.agent.podman.inspect(&id).await {
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
                        self.starts_seen += 1;
                        self.feed(Input::ContainerStarted).await;
                    }
                } else if !info.running && matches!(state, ChuteState::Running) {
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

    fn rates(&self) -> tc_shaper::ChuteRates {
        let v = self.view.borrow();
        tc_shaper::ChuteRates {
            down_bps: v.manifest.network.bandwidth_down_bps,
            up_bps: v.manifest.network.bandwidth_up_bps,
        }
    }

    fn wants_shaping(&self) -> bool {
        let r = self.rates();
        r.down_bps.is_some() || r.up_bps.is_some()
    }

    /// Applies the manifest's rates to the running container's veth.
    async fn apply_shaping(&mut self) -> Result<(), String> {
        let rates = self.rates();
        let Some(netns) = self.view.borrow().sandbox_key.clone() else {
            return Err("the container has no network namespace to shape".into());
        };
        match tc_shaper::shape_chute(Path::new(&netns), rates).await {
            Ok(shaping) => {
                debug!(chute = %self.name, host_if = %shaping.host_ifname, "shaped");
                self.view.borrow_mut().shaping = Some(shaping);
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// A chute that cannot be shaped must not run unshaped: kill it and let its restart
    /// policy (with backoff) try again.
    async fn shape_or_kill(&mut self) {
        if let Err(e) = self.apply_shaping().await {
            warn!(chute = %self.name, error = %e, "bandwidth shaping failed; stopping the chute");
            self.view.borrow_mut().last_error = Some(format!("bandwidth shaping failed: {e}"));
            if let Some(id) = self.container_id() {
                let _ = self.agent.podman.kill(&id, "KILL").await;
            }
        }
    }

    async fn refresh_runtime_info(&mut self) {
        let Some(id) = self.container_id() else {
            return;
        };
        if let Ok(info) = self.agent.podman.inspect(&id).await {
            self.take_runtime_info(&info);
        }
    }

    /// Records the run's pid, network namespace and cgroup paths from an inspect.
    fn take_runtime_info(&mut self, info: &ContainerInfo) {
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

    async fn feed(&mut self, input: Input) {
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
            let actions = self.lc.handle(input, self.agent.now_ms());
            if !actions.is_empty() {
                // Record the decision before acting on it: a stop whose `podman stop` is
                // under way when the agent dies must still be a stop after reconciliation.
                self.publish();
                self.agent.save_snapshot();
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
    async fn execute(&mut self, action: chutes::Action) -> Vec<Input> {
        use chutes::Action;
        let podman = self.agent.podman.clone();
        match action {
            Action::StartContainer => {
                let asked_at = wall_nanos();
                if let Err(e) = self.start_container().await {
                    warn!(chute = %self.name, error = %e, "start failed");
                    self.view.borrow_mut().last_error = Some(e.to_string());
                    return vec![Input::ContainerExited { exit_code: 127 }];
                }
                self.started_by_us(asked_at, None).await;
                return vec![Input::ContainerStarted];
            }
            Action::StopContainer { timeout_secs } => {
                if let Some(id) = self.container_id() {
                    if let Err(e) = podman.stop(&id, timeout_secs).await {
                        warn!(chute = %self.name, error = %e, "stop failed");
                        self.view.borrow_mut().last_error = Some(e.to_string());
                        self.failed_op = Some(self.podman_err(e));
                        return vec![Input::StopFailed];
                    }
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
                    if let Err(e) = podman.remove(&id, true).await {
                        warn!(chute = %self.name, error = %e, "remove failed");
                    }
                }
                let mut v = self.view.borrow_mut();
                v.container_id = None;
                v.pid = 0;
                v.cgroup = None;
            }
            Action::ReleaseReservation => {
                self.agent.ledger.borrow_mut().release(&self.name);
                self.view.borrow_mut().reservation_held = false;
            }
            Action::PurgeConfig => {}
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
    async fn restart_container(&mut self, id: &str, timeout_secs: u32) -> Vec<Input> {
        let podman = self.agent.podman.clone();
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
                        self.exit_confirmed = true;
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
    async fn started_by_us(&mut self, asked_at: i64, inspected: Option<&ContainerInfo>) {
        // Taken before the start call: a `died` of this run is later, one of any earlier
        // run is earlier and must be ignored.
        self.last_start_nanos = self.last_start_nanos.max(asked_at);
        self.exit_confirmed = false;
        self.starts_seen += 1;
        self.unconfirmed_starts += 1;
        match inspected {
            Some(info) => self.take_runtime_info(info),
            // Shaping needs the new run's network namespace now.
            None if self.wants_shaping() => self.refresh_runtime_info().await,
            // Pid and cgroup paths are read after the reply is sent, so the inspect they
            // need does not add to start latency.
            None => self.refresh_pending = true,
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
    async fn exit_of_our_stop(&mut self, id: &str) -> Option<Input> {
        match self.agent.podman.inspect(id).await {
            Ok(info) if !info.running => {
                self.exit_confirmed = true;
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
    async fn start_container(&mut self) -> Result<(), OpError> {
        let podman = self.agent.podman.clone();
        let id = match self.container_id() {
            Some(id) => id,
            None => self.create_container().await?,
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

    async fn create_container(&mut self) -> Result<String, OpError> {
        let (spec, name) = {
            let v = self.view.borrow();
            (
                container_spec(&self.agent.cfg, &v.manifest, &v.manifest_toml),
                v.manifest.name.container_name(),
            )
        };
        // A container with our name but not our id is a leftover of an interrupted
        // operation of ours (same name, our labels): replace it.
        if let Ok(info) = self.agent.podman.inspect(&name).await {
            if info.labels.get(LABEL_CHUTE).map(String::as_str) == Some(self.name.as_str()) {
                let _ = self.agent.podman.remove(&info.id, true).await;
            }
        }
        let id = self
            .agent
            .podman
            .create(&spec)
            .await
            .map_err(|e| self.podman_err(e))?;
        self.view.borrow_mut().container_id = Some(id.clone());
        Ok(id)
    }

    /// Runs the actor's loop (events, timers) until `done` holds, deferring requests.
    async fn wait_for(
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

    fn ok_value(&self) -> Value {
        let v = self.view.borrow();
        json!({
            "name": self.name.as_str(),
            "state": self.lc.state(),
            "container_id": v.container_id,
            "restarts": self.lc.restarts(),
        })
    }

    async fn handle_op(&mut self, op: ChuteOp) -> Result<Value, OpError> {
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
                    .map_err(|e| self.state_err(e))?;
                if !self.view.borrow().reservation_held {
                    let want = self.view.borrow().manifest.reservation();
                    self.agent
                        .ledger
                        .borrow_mut()
                        .admit(self.name.clone(), want)?;
                    self.view.borrow_mut().reservation_held = true;
                }
                self.view.borrow_mut().last_error = None;
                let before = self.starts_seen;
                self.feed(Input::StartRequested).await;
                self.wait_for("running", |a| {
                    a.starts_seen > before && a.lc.state() == ChuteState::Running
                })
                .await?;
                Ok(self.ok_value())
            }
            ChuteOp::Stop => {
                self.lc
                    .check(&Input::StopRequested)
                    .map_err(|e| self.state_err(e))?;
                self.feed(Input::StopRequested).await;
                if let Some(e) = self.failed_op.take() {
                    return Err(e);
                }
                self.wait_for("stopped", |a| a.lc.state() == ChuteState::Stopped)
                    .await?;
                Ok(self.ok_value())
            }
            ChuteOp::Restart => {
                self.lc
                    .check(&Input::RestartRequested)
                    .map_err(|e| self.state_err(e))?;
                let before = self.starts_seen;
                self.feed(Input::RestartRequested).await;
                if let Some(e) = self.failed_op.take() {
                    return Err(e);
                }
                self.wait_for("running", |a| {
                    a.starts_seen > before && a.lc.state() == ChuteState::Running
                })
                .await?;
                Ok(self.ok_value())
            }
            ChuteOp::Remove => {
                self.feed(Input::RemoveRequested).await;
                if self.view.borrow().reservation_held {
                    self.agent.ledger.borrow_mut().release(&self.name);
                    self.view.borrow_mut().reservation_held = false;
                }
                Ok(json!({ "name": self.name.as_str(), "state": ChuteState::Dead }))
            }
        }
    }

    async fn install(
        &mut self,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Value, OpError> {
        let result = self.install_inner(dir, progress).await;
        if let Err(e) = &result {
            // Leave nothing behind: no container, no reservation, no record.
            if let Some(id) = self.container_id() {
                let _ = self.agent.podman.remove(&id, true).await;
            }
            self.agent.ledger.borrow_mut().release(&self.name);
            self.view.borrow_mut().reservation_held = false;
            self.lc.handle(
                Input::InstallFailed {
                    reason: e.to_string(),
                },
                self.agent.now_ms(),
            );
            self.purge = true;
        }
        result
    }

    async fn install_inner(
        &mut self,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Value, OpError> {
        let manifest = self.view.borrow().manifest.clone();
        ensure_image(&self.agent.podman, &manifest, dir, progress).await?;
        let _ = progress.try_send(format!(
            "creating container {}",
            manifest.name.container_name()
        ));
        let id = self.create_container().await?;
        let _ = progress.try_send(format!("starting container {}", short(&id)));
        let asked_at = wall_nanos();
        self.agent
            .podman
            .start(&id)
            .await
            .map_err(|e| self.podman_err(e))?;
        self.started_by_us(asked_at, None).await;
        self.feed(Input::Installed).await;
        if self.lc.state() != ChuteState::Running {
            return Err(self.state_err(format!(
                "exited right after starting (exit code {:?}); see `chuted logs {}`",
                self.lc.last_exit_code(),
                self.name
            )));
        }
        info!(chute = %self.name, container = %short(&id), "installed");
        Ok(self.ok_value())
    }

    /// True when `new` differs from the running manifest only in bandwidth (and version),
    /// which can be changed on the live qdiscs without touching the container.
    fn only_rates_differ(&self, new: &Manifest) -> bool {
        let v = self.view.borrow();
        if self.lc.state() != ChuteState::Running || !v.reservation_held {
            return false;
        }
        let mut same = new.clone();
        same.network.bandwidth_down_bps = v.manifest.network.bandwidth_down_bps;
        same.network.bandwidth_up_bps = v.manifest.network.bandwidth_up_bps;
        same.version = v.manifest.version.clone();
        same == v.manifest
    }

    /// Changes a running chute's rates in place: growth checked first, the class changed
    /// live (no flush, no restart), the reservation resized only once the kernel took it.
    async fn update_rates_live(
        &mut self,
        manifest: Manifest,
        manifest_toml: String,
        progress: &Sender<String>,
    ) -> Result<Value, OpError> {
        let want = manifest.reservation();
        self.agent.ledger.borrow().check_resize(&self.name, &want)?;
        let _ = progress.try_send("changing bandwidth on the live chute".into());
        let old_manifest =
            std::mem::replace(&mut self.view.borrow_mut().manifest, manifest.clone());
        if let Err(e) = self.apply_shaping().await {
            self.view.borrow_mut().manifest = old_manifest;
            // Put the old rates back; the tc layer already removed what it half-built.
            let _ = self.apply_shaping().await;
            return Err(OpError::State {
                chute: self.name.to_string(),
                message: format!("cannot change bandwidth: {e}; previous rates kept"),
            });
        }
        self.agent.ledger.borrow_mut().resize(&self.name, want)?;
        self.view.borrow_mut().manifest_toml = manifest_toml;
        info!(chute = %self.name, version = %manifest.version, "bandwidth changed live");
        let mut v = self.ok_value();
        v["updated"] = json!(true);
        v["live"] = json!(true);
        Ok(v)
    }

    /// Replaces the chute's container with one built from `manifest`. Growth is checked
    /// before anything is touched; if the new container cannot start, the old version
    /// comes back with its old reservation.
    async fn update(
        &mut self,
        manifest: Manifest,
        manifest_toml: String,
        dir: Option<&Path>,
        progress: &Sender<String>,
    ) -> Result<Value, OpError> {
        if self.view.borrow().manifest_toml == manifest_toml {
            let mut v = self.ok_value();
            v["unchanged"] = json!(true);
            return Ok(v);
        }
        if matches!(self.lc.state(), ChuteState::Installing | ChuteState::Dead) {
            return Err(OpError::Busy {
                chute: self.name.to_string(),
            });
        }
        if self.only_rates_differ(&manifest) {
            return self
                .update_rates_live(manifest, manifest_toml, progress)
                .await;
        }
        let want = manifest.reservation();
        let held = self.view.borrow().reservation_held;
        if held {
            self.agent.ledger.borrow().check_resize(&self.name, &want)?;
        } else {
            self.agent.ledger.borrow().check_admit(&self.name, &want)?;
        }
        ensure_image(&self.agent.podman, &manifest, dir, progress).await?;

        let old_manifest = self.view.borrow().manifest.clone();
        let old_toml = self.view.borrow().manifest_toml.clone();
        let old_held = held;
        let was_running = matches!(
            self.lc.state(),
            ChuteState::Running | ChuteState::Restarting
        );
        let old_reservation = if held {
            Some(self.agent.ledger.borrow_mut().resize(&self.name, want)?)
        } else {
            self.agent
                .ledger
                .borrow_mut()
                .admit(self.name.clone(), want)?;
            None
        };
        self.view.borrow_mut().reservation_held = true;

        let _ = progress.try_send("stopping the running version".into());
        if was_running {
            self.feed(Input::StopRequested).await;
            // A failed stop is not waited out: the forced removal below ends the old run.
            if self.failed_op.take().is_none() {
                let _ = self
                    .wait_for("stopped", |a| a.lc.state() == ChuteState::Stopped)
                    .await;
            }
        }
        if let Some(id) = self.container_id() {
            let _ = self.agent.podman.remove(&id, true).await;
        }
        {
            let mut v = self.view.borrow_mut();
            v.container_id = None;
            v.manifest = manifest.clone();
            v.manifest_toml = manifest_toml;
            v.last_error = None;
        }
        self.lc.set_policy(manifest.restart);
        let _ = progress.try_send(format!("starting version {}", manifest.version));
        let before = self.starts_seen;
        self.feed(Input::StartRequested).await;
        let mut started = self
            .wait_for("running", |a| {
                (a.starts_seen > before && a.lc.state() == ChuteState::Running)
                    // Podman refusing the start (no such executable, bad image config)
                    // fails the same way on every try: waiting out a backoff series
                    // would only delay the rollback.
                    || a.view.borrow().last_error.is_some()
            })
            .await;
        if started.is_ok() && self.lc.state() != ChuteState::Running {
            let why = self.view.borrow().last_error.clone().unwrap_or_default();
            started = Err(self.state_err(format!(
                "version {} could not start: {why}",
                manifest.version
            )));
        }
        if let Err(e) = started {
            let message = e.to_string();
            warn!(chute = %self.name, error = %message, "update failed; restoring previous version");
            self.feed(Input::StopRequested).await;
            if let Some(id) = self.container_id() {
                let _ = self.agent.podman.remove(&id, true).await;
            }
            {
                let mut v = self.view.borrow_mut();
                v.container_id = None;
                v.manifest = old_manifest.clone();
                v.manifest_toml = old_toml;
            }
            self.lc.set_policy(old_manifest.restart);
            {
                let mut ledger = self.agent.ledger.borrow_mut();
                ledger.release(&self.name);
                if let Some(old) = old_reservation {
                    ledger.force_insert(self.name.clone(), old);
                }
            }
            self.view.borrow_mut().reservation_held = old_held;
            if was_running {
                let before = self.starts_seen;
                self.feed(Input::StartRequested).await;
                let _ = self.wait_for("running", |a| a.starts_seen > before).await;
            }
            return Err(OpError::UpdateRolledBack {
                chute: self.name.to_string(),
                message,
            });
        }
        info!(chute = %self.name, version = %manifest.version, "updated");
        let mut v = self.ok_value();
        v["updated"] = json!(true);
        Ok(v)
    }
}

/// Makes the manifest's image available: from an archive beside chute.toml (verified by
/// its sha256 before loading), else the local store, else a pull.
pub async fn ensure_image(
    podman: &Podman,
    manifest: &Manifest,
    dir: Option<&Path>,
    progress: &Sender<String>,
) -> Result<(), OpError> {
    let chute = manifest.name.to_string();
    let image_err = |message: String| OpError::Image {
        chute: chute.clone(),
        message,
    };
    if let Some(dir) = dir {
        let archive = dir.join(IMAGE_ARCHIVE);
        if archive.exists() {
            let digest_file = dir.join(IMAGE_DIGEST);
            let expected = std::fs::read_to_string(&digest_file).map_err(|e| {
                image_err(format!(
                    "{} has no digest: cannot read {} ({e}); create it with `sha256sum {IMAGE_ARCHIVE} > {IMAGE_DIGEST}`",
                    archive.display(),
                    digest_file.display()
                ))
            })?;
            let expected = expected
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            let _ = progress.try_send(format!("verifying {}", archive.display()));
            let path = archive.clone();
            let actual = smol::unblock(move || sha256_file(&path))
                .await
                .map_err(|e| image_err(format!("cannot read {}: {e}", archive.display())))?;
            if actual != expected {
                return Err(image_err(format!(
                    "{} has sha256 {actual} but {} says {expected}; refusing to load it",
                    archive.display(),
                    digest_file.display()
                )));
            }
            let _ = progress.try_send(format!(
                "loading {} (sha256 {})",
                archive.display(),
                &actual[..12]
            ));
            let names = podman
                .image_load(&archive)
                .await
                .map_err(|e| image_err(format!("loading {}: {e}", archive.display())))?;
            if !podman.image_exists(&manifest.image).await.unwrap_or(false) {
                return Err(image_err(format!(
                    "{} holds {} but chute.toml asks for image {:?}",
                    archive.display(),
                    names.join(", "),
                    manifest.image
                )));
            }
            return Ok(());
        }
    }
    match podman.image_exists(&manifest.image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return Err(OpError::Podman { chute, source: e }),
    }
    let _ = progress.try_send(format!("pulling {}", manifest.image));
    podman.image_pull(&manifest.image).await.map_err(|e| {
        image_err(format!(
            "{:?} is not in the local store and could not be pulled ({e}); build it locally or put {IMAGE_ARCHIVE} and {IMAGE_DIGEST} beside chute.toml",
            manifest.image
        ))
    })
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Routes Podman's event stream to the chute tasks, reconnecting with capped backoff.
/// After every (re)connect each chute resyncs, covering events lost in the gap.
pub async fn route_events(agent: Rc<Agent>) {
    use futures_lite::StreamExt;
    let mut backoff = Duration::from_millis(250);
    loop {
        match agent.podman.events(&agent.owned_filter()).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(250);
                let txs: Vec<_> = agent
                    .chutes
                    .borrow()
                    .values()
                    .map(|h| h.tx.clone())
                    .collect();
                for tx in txs {
                    let _ = tx.send(ChuteMsg::Happened(Happening::Resync)).await;
                }
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(ev) => {
                            let Some(name) = ev
                                .labels
                                .get(LABEL_CHUTE)
                                .and_then(|n| ChuteName::parse(n).ok())
                            else {
                                continue;
                            };
                            let tx = agent.chutes.borrow().get(&name).map(|h| h.tx.clone());
                            if let Some(tx) = tx {
                                let _ = tx.send(ChuteMsg::Happened(Happening::Event(ev))).await;
                            }
                        }
                        Err(e) => {
                            warn!(error = %e, "podman event stream broke; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot subscribe to podman events")
            }
        }
        Timer::after(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Samples every running chute's cgroup counters once per interval.
pub async fn sample_usage(agent: Rc<Agent>) {
    let interval = agent.cfg.sample_interval;
    let mut warned_at: Option<Instant> = None;
    // Reading tc counters means entering the chute's network namespace; every fifth
    // sample is plenty for heartbeats and keeps 100 chutes cheap.
    const NET_EVERY: u64 = 5;
    let mut tick: u64 = 0;
    loop {
        Timer::after(interval).await;
        tick += 1;
        if tick % NET_EVERY == 0 {
            let shaped: Vec<_> = agent
                .views()
                .into_iter()
                .filter_map(|v| {
                    let netns = {
                        let b = v.borrow();
                        b.shaping.as_ref().and(b.sandbox_key.clone())
                    };
                    netns.map(|n| (v, n))
                })
                .collect();
            for (view, netns) in shaped {
                if let Ok(stats) = tc_shaper::chute_stats(Path::new(&netns)).await {
                    view.borrow_mut().net = Some(NetSample::from_stats(&stats));
                }
            }
        }
        let now = agent.now_ms();
        for view in agent.views() {
            let mut v = view.borrow_mut();
            let Some(cg) = v.cgroup.as_ref() else {
                continue;
            };
            match cg.usage() {
                Ok(u) => {
                    let cpu_percent = match &v.usage {
                        Some(prev)
                            if now > prev.sampled_at_ms && u.cpu_usage_ns >= prev.cpu_usage_ns =>
                        {
                            (u.cpu_usage_ns - prev.cpu_usage_ns) as f64
                                / ((now - prev.sampled_at_ms) as f64 * 1e6)
                                * 100.0
                        }
                        _ => 0.0,
                    };
                    v.usage = Some(UsageSample {
                        cpu_usage_ns: u.cpu_usage_ns,
                        cpu_percent,
                        memory_bytes: u.memory_bytes,
                        pids: u.pids,
                        sampled_at_ms: now,
                    });
                }
                Err(e) => {
                    // A container that just died loses its cgroup; say so once a minute at most.
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        debug!(chute = %v.manifest.name, error = %e, "usage sample failed");
                        warned_at = Some(Instant::now());
                    }
                    if v.pid == 0 {
                        v.cgroup = None;
                    }
                }
            }
        }
    }
}
