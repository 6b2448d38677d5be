//! The `chuted` agent's API, as types: what a front end (the `chuted` CLI, `chutectl`, the
//! cloud manager, a web console) sends to an agent and gets back, and how to print it for
//! people.
//!
//! * [`Request`] / [`Response`]: one request, one typed answer; the agent's
//!   `Agent::handle` is the one place that answers them, whether they came from the local
//!   admin socket or a signed cloud command.
//! * [`ChuteSummary`], [`ChuteDetail`], [`ChuteAck`], [`DeployResult`] /
//!   [`DeployOutcome`], [`AgentStatus`], [`LogLine`]: the answers.
//! * [`ApiError`] with an [`ErrorCode`] whose string form is stable (scripts and the cloud
//!   match on it), and an [`ErrorClass`] that maps it onto a CLI exit code.
//! * [`admin`]: the local socket's framing (newline-delimited JSON) around those types.
//! * [`render`]: the human output of `list`, `inspect`, `status`, `validate`, `deploy`
//!   and the lifecycle commands.
//!
//! The JSON form of every type is the `--json` output of `chuted` and the payload of a
//! cloud command's signed result; field names are a contract (new fields may be added,
//! none renamed).
//!
//! What it deliberately is not: no async runtime, no I/O, no sockets. Only serde, and the
//! pure `chutes` model for the names, states and amounts it shares.

pub mod admin;
mod error;
pub mod render;

use serde::{Deserialize, Serialize};

pub use chutes::{Amounts, ChuteName, ChuteState, RestartPolicy};
pub use error::{ApiError, ErrorClass, ErrorCode};

/// What the agent is asked to do. One request, one [`Response`] (or [`ApiError`]);
/// deploy may report progress and logs stream [`LogLine`]s before the answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Deploy a new chute or update an existing one. `dir` is where `chute.toml` was
    /// found, on the agent's machine; an image archive beside it is loaded.
    Deploy {
        manifest_toml: String,
        dir: Option<String>,
    },
    List,
    Inspect {
        name: String,
    },
    Start {
        name: String,
    },
    /// `timeout_secs`: seconds between SIGTERM and SIGKILL; at most the agent's own
    /// `stop_timeout_secs` (the device owner's policy), which is also the default.
    Stop {
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_secs: Option<u32>,
    },
    Restart {
        name: String,
    },
    Remove {
        name: String,
    },
    /// The last `tail` lines (all if `None`), then, with `follow`, new ones as they come.
    Logs {
        name: String,
        follow: bool,
        tail: Option<u32>,
    },
    Status,
}

impl Request {
    /// The kind of [`Response`] this request is answered with.
    pub fn kind(&self) -> ResponseKind {
        match self {
            Request::Deploy { .. } => ResponseKind::Deploy,
            Request::List => ResponseKind::List,
            Request::Inspect { .. } => ResponseKind::Inspect,
            Request::Start { .. }
            | Request::Stop { .. }
            | Request::Restart { .. }
            | Request::Remove { .. } => ResponseKind::Chute,
            Request::Logs { .. } => ResponseKind::LogsEnd,
            Request::Status => ResponseKind::Status,
        }
    }
}

/// Which [`Response`] variant a request expects: the JSON of the answers is not
/// self-describing (it is what `--json` prints), so a reader decodes by the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseKind {
    Deploy,
    List,
    Inspect,
    Chute,
    Status,
    LogsEnd,
}

/// The agent's answer to a [`Request`]. Serialized untagged: the JSON is the bare answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Response {
    Deploy(DeployResult),
    List(Vec<ChuteSummary>),
    Inspect(Box<ChuteDetail>),
    /// start, stop, restart, remove.
    Chute(ChuteAck),
    Status(AgentStatus),
    /// A log stream ended (the lines went ahead of it).
    LogsEnd,
}

impl Response {
    /// Decodes the JSON of an answer of `kind`.
    pub fn from_json(kind: ResponseKind, v: serde_json::Value) -> Result<Self, serde_json::Error> {
        Ok(match kind {
            ResponseKind::Deploy => Response::Deploy(serde_json::from_value(v)?),
            ResponseKind::List => Response::List(serde_json::from_value(v)?),
            ResponseKind::Inspect => Response::Inspect(serde_json::from_value(v)?),
            ResponseKind::Chute => Response::Chute(serde_json::from_value(v)?),
            ResponseKind::Status => Response::Status(serde_json::from_value(v)?),
            ResponseKind::LogsEnd => Response::LogsEnd,
        })
    }

    /// The answer as JSON (what `--json` prints).
    pub fn to_json(&self) -> serde_json::Value {
        // Every type here serializes to JSON without fail: string keys, no non-finite
        // float is ever produced by the agent (cpu_percent is a ratio of finite counts).
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }
}

/// One chute in `list` (and the cloud's status).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChuteSummary {
    pub name: ChuteName,
    pub state: ChuteState,
    pub container_id: Option<String>,
    pub restarts: u32,
    pub version: String,
    pub image: String,
}

/// The answer to start, stop, restart and remove: where the chute is now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChuteAck {
    pub name: ChuteName,
    pub state: ChuteState,
    #[serde(default)]
    pub container_id: Option<String>,
    #[serde(default)]
    pub restarts: u32,
}

/// What a deploy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployOutcome {
    /// A new chute was installed and started.
    Deployed,
    /// An existing chute now runs the new manifest. `live`: only its bandwidth changed,
    /// applied to the running container without a restart.
    Updated { live: bool },
    /// The manifest is the one already deployed; nothing was touched.
    Unchanged,
}

impl DeployOutcome {
    /// `deployed`, `updated` or `unchanged`.
    pub fn as_str(&self) -> &'static str {
        match self {
            DeployOutcome::Deployed => "deployed",
            DeployOutcome::Updated { .. } => "updated",
            DeployOutcome::Unchanged => "unchanged",
        }
    }
}

/// The answer to a deploy. JSON: the chute's `name`, `state`, `container_id`, `restarts`,
/// `outcome` (`deployed` | `updated` | `unchanged`), and the flags `updated`, `live`,
/// `unchanged` (present only when true) that earlier agents sent alone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "DeployWire", from = "DeployWire")]
pub struct DeployResult {
    pub chute: ChuteAck,
    pub outcome: DeployOutcome,
}

#[derive(Serialize, Deserialize)]
struct DeployWire {
    #[serde(flatten)]
    chute: ChuteAck,
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    updated: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    live: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    unchanged: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl From<DeployResult> for DeployWire {
    fn from(r: DeployResult) -> Self {
        DeployWire {
            outcome: Some(r.outcome.as_str().to_owned()),
            updated: matches!(r.outcome, DeployOutcome::Updated { .. }),
            live: matches!(r.outcome, DeployOutcome::Updated { live: true }),
            unchanged: r.outcome == DeployOutcome::Unchanged,
            chute: r.chute,
        }
    }
}

impl From<DeployWire> for DeployResult {
    fn from(w: DeployWire) -> Self {
        let outcome = match w.outcome.as_deref() {
            Some("updated") => DeployOutcome::Updated { live: w.live },
            Some("unchanged") => DeployOutcome::Unchanged,
            Some(_) => DeployOutcome::Deployed,
            None if w.updated => DeployOutcome::Updated { live: w.live },
            None if w.unchanged => DeployOutcome::Unchanged,
            None => DeployOutcome::Deployed,
        };
        DeployResult {
            chute: w.chute,
            outcome,
        }
    }
}

/// Everything about one chute: `inspect`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChuteDetail {
    pub name: ChuteName,
    pub state: ChuteState,
    pub container_id: Option<String>,
    pub container_name: String,
    pub restarts: u32,
    pub version: String,
    pub image: String,
    pub command: Vec<String>,
    pub restart_policy: RestartPolicy,
    /// Whether the chute's reservation is held in the pools (a stopped chute keeps it;
    /// a failed one that will not restart frees it).
    pub reservation_held: bool,
    pub reservation: Amounts,
    pub resources: ResourceCaps,
    pub network: NetworkDetail,
    /// The container's main process (0 when not running).
    pub pid: u32,
    pub last_exit_code: Option<i32>,
    pub last_error: Option<String>,
    pub usage: Option<UsageSample>,
    pub net: Option<NetSample>,
    /// The caps as the kernel holds them (read from the cgroup files).
    pub cgroup_limits: Option<CgroupLimits>,
    /// Where the chute's shaping lives (only while shaped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shaping: Option<ShapingInfo>,
    /// Why live network counters could not be read (only then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_error: Option<String>,
}

/// The manifest's caps.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceCaps {
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
    pub pids: u32,
}

/// The manifest's network section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetworkDetail {
    pub bandwidth_down_bps: Option<u64>,
    pub bandwidth_up_bps: Option<u64>,
    /// `HOST:CONTAINER/PROTO`.
    pub ports: Vec<String>,
    pub host_network: bool,
}

/// The interfaces a chute's shaping is attached to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShapingInfo {
    /// The host side of the chute's veth (download is shaped here).
    pub host_interface: String,
    /// The chute's side, inside its network namespace (upload is shaped here).
    pub chute_interface: String,
}

/// Limits the kernel enforces; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory_max: Option<u64>,
    pub memory_swap_max: Option<u64>,
    pub cpu_quota_us: Option<i64>,
    pub cpu_period_us: u64,
    pub pids_max: Option<u64>,
}

/// A chute's cgroup counters at one instant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageSample {
    pub cpu_usage_ns: u64,
    /// Of one core, over the last sampling interval.
    pub cpu_percent: f64,
    pub memory_bytes: u64,
    pub pids: u64,
    /// Agent uptime at the sample, milliseconds.
    pub sampled_at_ms: u64,
}

/// Per-direction counters of the chute's shaping classes (L2 bytes, as HTB counts).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
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

/// The device: `status`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    pub agent_version: String,
    pub uptime_secs: u64,
    /// The device's wall clock, Unix seconds (signed commands are checked against it).
    #[serde(default)]
    pub unix_time_secs: u64,
    /// How many chutes the agent holds.
    pub chutes: u32,
    pub pools: PoolStatus,
    /// Containers with this agent's labels that it does not know: left alone, reported.
    pub unknown_containers: Vec<UnknownContainer>,
    /// The device clock judged against the latest verified command time (a clock set
    /// back cannot revive expired commands).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockStatus>,
    /// Bytes under the agent's state dir (image transfers land there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir_bytes: Option<u64>,
}

/// The device clock as the command verifier sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClockStatus {
    /// The device's wall clock, Unix seconds.
    pub secs: u64,
    /// `ok`, `behind floor` (set back below the latest verified command) or `ahead`.
    pub state: String,
    /// The latest verified command's `issued_at` (0: none yet).
    pub time_floor: u64,
}

/// The device's pools.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolStatus {
    pub capacity: Amounts,
    pub used: Amounts,
    pub free: Amounts,
}

/// A container carrying this agent's labels that its records do not know.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UnknownContainer {
    pub container_id: String,
    /// The chute it claims to be (its label), if any.
    pub chute: Option<String>,
}

/// The cloud's `status` result: the agent's status, the device and every chute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeviceStatus {
    #[serde(flatten)]
    pub agent: AgentStatus,
    pub device_id: String,
    pub chute_list: Vec<ChuteSummary>,
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// One line of a chute's output (without its newline).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogLine {
    pub stream: LogStream,
    /// `text` in the cloud results of agents before this type existed.
    #[serde(alias = "text")]
    pub line: String,
}

/// The cloud's `logs` result: past lines, and the subscription publishing new ones.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogBatch {
    pub chute: ChuteName,
    pub lines: Vec<LogLine>,
    pub subscription: Option<u64>,
}

/// The cloud's `update-grant` result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GrantInstalled {
    /// The developer key the grant is for (hex).
    pub developer: String,
    /// False when an equal or newer grant was already installed.
    pub installed: bool,
    /// The rights it grants.
    pub rights: String,
}
