//! The agent's link to its cloud manager: one websocket session at a time (WAMP-shaped,
//! postcard frames, see `proto`), re-established with capped, jittered backoff, over
//! which the agent publishes heartbeats and logs and runs signed commands.
//!
//! Trust: the cloud is a relay. Every command is verified end to end (developer
//! signature over the command and its grant's digest, lifetime judged at the time floor,
//! device id, owner-signed grant not superseded per `grants.bin`, rights and chute
//! pattern, per-chute order, replay window) before anything happens; the replay window
//! and the command order are on disk before a command runs, and results are signed by
//! the device key. A command runs at most once: a resend gets the remembered result, or
//! a refusal. A developer's `status` shows only the chutes its grant covers.
//!
//! Offline is normal: the link is a few tasks on the agent's executor that touch chutes
//! only through the same `Agent` calls the local CLI uses, so losing the cloud changes
//! nothing for running chutes or the admin socket.
//!
//! What this is not: a router or a store-and-forward queue. Heartbeats are snapshots
//! (the next one supersedes a missed one); log lines are buffered in a bounded ring
//! only while someone follows them.

mod backoff;
mod commands;
pub mod grants;
pub mod heartbeat;
pub mod images;
mod link;
pub mod logs;
mod store;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::{ClockState, Keypair, Message, PublicKey, Verifier};
use smol::channel::Sender;

use crate::supervisor::Agent;

pub use backoff::Backoff;
pub use link::{Endpoint, LinkError};

/// How the link behaves. Defaults suit a router on a home line.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `ws://HOST:PORT/PATH` or `wss://…`.
    pub url: String,
    /// Realm (fleet/tenant) named in HELLO and bound into the session signature.
    pub realm: String,
    /// Heartbeat period (the cloud may override it in WELCOME).
    pub heartbeat: Duration,
    /// Send a ping when nothing arrived for this long.
    pub keepalive: Duration,
    /// Give the session up when nothing arrived for this long after a ping.
    pub dead_after: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A session that lasted this long without abuse resets the backoff.
    pub stable_after: Duration,
    /// Give up a deploy whose image transfer made no progress for this long.
    pub transfer_stall: Duration,
    /// PEM file of CA certificates for wss:// (default: the system bundle).
    pub ca_file: Option<PathBuf>,
    /// Longest command lifetime accepted (`expires_at - issued_at`), at most
    /// [`proto::MAX_COMMAND_LIFETIME`] (config `command_lifetime_secs`).
    pub command_lifetime_secs: u64,
    /// Give the session up when one websocket send does not finish within this (a peer
    /// that stops reading must not stall dead-peer detection).
    pub send_timeout: Duration,
    /// Refused CALLs (bad signature, grant, time, replay…) tolerated in one session
    /// before it is closed as abusive: verification costs the device CPU.
    pub max_refused_calls: u32,
    /// Caps on partial image transfers (count, bytes, age before removal).
    pub image_limits: images::Limits,
}

impl LinkConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            realm: "default".into(),
            heartbeat: Duration::from_secs(30),
            keepalive: Duration::from_secs(60),
            dead_after: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(10),
            transfer_stall: Duration::from_secs(600),
            ca_file: None,
            command_lifetime_secs: proto::DEFAULT_COMMAND_LIFETIME,
            send_timeout: Duration::from_secs(20),
            max_refused_calls: 32,
            image_limits: images::Limits::default(),
        }
    }
}

/// Unix seconds from the system clock (commands carry wall-clock times).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The device clock against the time floor kept in `state_dir` (for the local
/// `status`, which also works without a cloud link): `{secs, state, time_floor}`.
pub fn clock_status(state_dir: &std::path::Path) -> chute_api::ClockStatus {
    let now = unix_now();
    let order = std::fs::read(state_dir.join(store::ORDER_FILE))
        .ok()
        .and_then(|b| proto::CommandOrder::from_bytes(&b).ok())
        .unwrap_or_default();
    chute_api::ClockStatus {
        secs: now,
        state: order.clock_state(now).as_str().to_owned(),
        time_floor: order.time_floor(),
    }
}

/// A session request waiting for a running command: (session epoch, request id).
type Waiting = (u64, u64);

/// Where results and publications go: the current session, if any.
#[derive(Clone)]
struct Outbox {
    tx: Sender<Vec<u8>>,
}

/// The link's state, shared by its tasks (single-threaded; no borrow is held across an
/// `.await`).
pub struct Cloud {
    agent: Rc<Agent>,
    device: Keypair,
    verifier: Option<Verifier>,
    cfg: LinkConfig,
    endpoint: Endpoint,
    replay: RefCell<store::ReplayStore>,
    order: RefCell<store::OrderStore>,
    grants: grants::GrantStore,
    results: RefCell<store::ResultCache>,
    /// Commands running now: (signer, request id) → session requests awaiting the result.
    inflight: RefCell<BTreeMap<(PublicKey, u64), Vec<Waiting>>>,
    images: RefCell<images::Images>,
    logs: RefCell<commands::LogTaps>,
    outbox: RefCell<Option<Outbox>>,
    epoch: Cell<u64>,
    heartbeat_seq: Cell<u64>,
    publish_seq: Cell<u64>,
}

impl Cloud {
    /// Prepares the link (parses the URL, loads the TLS roots, the replay window and
    /// installed grants). `owner` `None`: every command is refused until one is trusted.
    pub fn new(
        agent: Rc<Agent>,
        device: Keypair,
        owner: Option<PublicKey>,
        cfg: LinkConfig,
    ) -> Result<Rc<Self>, LinkError> {
        let endpoint = Endpoint::parse(&cfg.url, cfg.ca_file.as_deref())?;
        let verifier = owner.map(|o| {
            let mut v = Verifier::new(o, device.device_id());
            v.policy.max_lifetime_secs = cfg.command_lifetime_secs.min(proto::MAX_COMMAND_LIFETIME);
            v
        });
        let skew = verifier
            .as_ref()
            .map(|v| v.policy.max_skew_secs)
            .unwrap_or(60);
        let state_dir = agent.state_dir.clone();
        Ok(Rc::new(Cloud {
            replay: RefCell::new(store::ReplayStore::load(&state_dir, unix_now(), skew)),
            order: RefCell::new(store::OrderStore::load(&state_dir, unix_now(), skew)),
            grants: grants::GrantStore::new(&state_dir),
            results: RefCell::new(store::ResultCache::default()),
            inflight: RefCell::new(BTreeMap::new()),
            images: RefCell::new(images::Images::with_limits(
                &agent.cfg.image_dir(&state_dir),
                cfg.image_limits,
            )),
            logs: RefCell::new(commands::LogTaps::default()),
            outbox: RefCell::new(None),
            epoch: Cell::new(0),
            heartbeat_seq: Cell::new(0),
            publish_seq: Cell::new(0),
            agent,
            device,
            verifier,
            cfg,
            endpoint,
        }))
    }

    pub fn device_id(&self) -> proto::DeviceId {
        self.device.device_id()
    }

    /// Runs the link forever: connect, serve the session, back off, repeat.
    pub async fn run(self: Rc<Self>) {
        link::run(self).await
    }

    /// Queues a frame on the current session; dropped when offline (results stay in
    /// the cache for a resend, heartbeats are superseded by the next one).
    fn send(&self, msg: &Message) -> bool {
        let Some(out) = self.outbox.borrow().clone() else {
            return false;
        };
        match proto::encode(msg) {
            Ok(frame) => out.tx.try_send(frame).is_ok(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an outgoing frame");
                false
            }
        }
    }

    /// Like [`Cloud::send`] but waits for room (backpressure for log batches).
    async fn send_wait(&self, msg: &Message) -> bool {
        let Some(out) = self.outbox.borrow().clone() else {
            return false;
        };
        match proto::encode(msg) {
            Ok(frame) => out.tx.send(frame).await.is_ok(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an outgoing frame");
                false
            }
        }
    }

    /// The device clock and how it compares with the time floor (for heartbeats and
    /// `status`).
    pub fn clock(&self) -> (u64, ClockState) {
        let now = unix_now();
        (now, self.order.borrow().order().clock_state(now))
    }

    fn next_publish(&self) -> u64 {
        let n = self.publish_seq.get() + 1;
        self.publish_seq.set(n);
        n
    }
}
