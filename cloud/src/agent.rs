//! Agent sessions at `/agent`: the router side of the `proto` handshake (HELLO →
//! CHALLENGE → AUTHENTICATE → WELCOME), device admission, and one loop per device that
//! delivers its stored commands in order (one at a time), streams image blobs over the
//! resumable chunk transfer (only the chunks the agent asks for: none when it already
//! holds the digest), and records heartbeats (with the device clock and its skew against
//! ours) and signed results.
//!
//! Bounds: frames over `proto::MAX_FRAME` close the socket (the websocket layer refuses
//! them); the handshake must finish within [`HANDSHAKE_TIMEOUT`]; a session that sends
//! more than [`MAX_MALFORMED`] bad frames is aborted, one that sends more than
//! [`MAX_HEARTBEATS`] heartbeats per [`HEARTBEAT_WINDOW`] is shed; unknown keys create at
//! most [`MAX_PENDING`] pending devices, beyond which new keys are refused without a
//! write; heartbeats wait for the store in a bounded queue (a full one drops them).
//!
//! Scale: an idle session costs ~10 KiB of server memory (small websocket buffers) and no
//! queries — it reads the store when woken (through the [`Hub`], across replicas through
//! [`crate::bus`]), after a command finishes, and every 30 s as a fallback.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{Message as WsMessage, WebSocket};
use proto::{
    Abort, BoundedBytes, BoundedString, Call, Challenge, Chunk, ErrorCode, Hello, Message,
    MessageType, PublicKey, Publication, Welcome, MAX_FRAME,
};
use serde_json::json;
use tokio::sync::Notify;

use futures_util::SinkExt;

use crate::store::{CommandRow, HeartbeatRow, Store};
use crate::{bus, now, wire, App};

/// Websocket read buffer per session.
pub const WS_READ_BUFFER: usize = 4096;
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_MALFORMED: u32 = 8;
pub const MAX_PENDING: i64 = 1000;
/// Heartbeats are written to the store at most this often per session.
pub const MIN_HEARTBEAT_GAP: Duration = Duration::from_millis(900);
/// Agent handshakes in progress at once.
pub const MAX_HANDSHAKES: usize = 256;
/// Image chunk size and how many are in flight ahead of the device's acknowledgement.
const CHUNK: usize = 256 * 1024;
const WINDOW: u64 = 4;
/// How often a session wakes on its own (silence check, idle follows).
const POLL: Duration = Duration::from_secs(5);
/// Every this many POLLs it also reads the store without a wake-up: a fallback for a
/// wake-up lost between replicas, and for commands expiring in the queue. Commands are
/// otherwise read only when there is reason to (session start, wake-up, a command
/// finished), so idle sessions and heartbeats cost no queries (10k sessions polling
/// every 2 s would be 5,000 queries a second).
const STORE_EVERY_POLLS: u32 = 6;

/// A live session, as the rest of the cloud sees it.
#[derive(Clone)]
pub struct Live {
    pub session: u64,
    pub since: i64,
    pub wake: Arc<Notify>,
}

/// Lines kept per followed chute (older ones are dropped and counted).
pub const FOLLOW_LINES: usize = 1000;
/// A follow nobody has polled for this long is ended (UNSUBSCRIBE to the agent), so
/// the agent sends logs only while someone watches.
pub const FOLLOW_IDLE: Duration = Duration::from_secs(30);

/// One log line relayed from a device.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub seq: u64,
    pub ts_ms: u64,
    pub stream: String,
    pub text: String,
}

/// A chute's live logs while someone follows them.
pub struct Follow {
    pub subscription: u64,
    pub lines: std::collections::VecDeque<LogLine>,
    pub next_seq: u64,
    pub dropped: u64,
    pub last_poll: Instant,
}

/// Connected devices: the sessions of this process, and — with replicas on PostgreSQL
/// — what the other replicas announced over the [`bus`](crate::bus).
pub struct Hub {
    live: Mutex<HashMap<String, Live>>,
    next_session: AtomicU64,
    /// (device, chute) → live logs being followed.
    follows: Mutex<HashMap<(String, String), Follow>>,
    /// Image bytes sent to devices in CHUNKs (for /metrics).
    pub chunk_bytes: AtomicU64,
    /// Other replicas (PostgreSQL only).
    bus: OnceLock<bus::Sender>,
    /// device → (replica, session, since) of sessions on other replicas.
    remote: Mutex<HashMap<String, (u64, u64, i64)>>,
    /// replica → when it last said it was alive.
    alive: Mutex<HashMap<u64, Instant>>,
    /// The heartbeat writer's queue, once started.
    heartbeats: OnceLock<tokio::sync::mpsc::Sender<HeartbeatRow>>,
    /// Heartbeats dropped because the writer's queue was full.
    pub heartbeats_dropped: AtomicU64,
}

/// Heartbeats waiting to be written; beyond this many the newest are dropped (a
/// heartbeat is a snapshot: the next one replaces it) and memory stays bounded.
const HEARTBEAT_QUEUE: usize = 20_000;

impl Default for Hub {
    fn default() -> Self {
        Self {
            live: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            follows: Mutex::new(HashMap::new()),
            chunk_bytes: AtomicU64::new(0),
            bus: OnceLock::new(),
            remote: Mutex::new(HashMap::new()),
            alive: Mutex::new(HashMap::new()),
            heartbeats: OnceLock::new(),
            heartbeats_dropped: AtomicU64::new(0),
        }
    }
}

impl Hub {
    /// Starts the task that writes heartbeats in batches: one transaction for all that
    /// arrived while the previous one was committing, so 10k devices cost a few commits
    /// a second instead of one each, and no session waits for the disk.
    pub fn start_heartbeat_writer(&self, store: Arc<dyn Store>) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<HeartbeatRow>(HEARTBEAT_QUEUE);
        if self.heartbeats.set(tx).is_err() {
            return;
        }
        tokio::spawn(async move {
            let mut batch = Vec::new();
            while rx.recv_many(&mut batch, 2000).await > 0 {
                // The newest heartbeat of each device is enough.
                let mut latest: HashMap<String, HeartbeatRow> = HashMap::new();
                for b in batch.drain(..) {
                    latest.insert(b.device.clone(), b);
                }
                let rows: Vec<HeartbeatRow> = latest.into_values().collect();
                if let Err(e) = store.device_heartbeats(&rows).await {
                    tracing::warn!(error = %e, n = rows.len(), "cannot record heartbeats");
                }
            }
        });
    }

    async fn record_heartbeat(&self, app: &App, row: HeartbeatRow) {
        match self.heartbeats.get() {
            Some(tx) => {
                if tx.try_send(row).is_err() {
                    self.heartbeats_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            None => {
                let _ = app
                    .store
                    .device_heartbeats(std::slice::from_ref(&row))
                    .await;
            }
        }
    }

    /// Joins the other replicas: events go out through `sender`, and session ids are
    /// prefixed with the replica's so they stay unique across replicas.
    pub fn attach_bus(&self, sender: bus::Sender) {
        self.next_session
            .store(((sender.replica & 0xF_FFFF) << 40) | 1, Ordering::Relaxed);
        let _ = self.bus.set(sender);
    }

    fn publish(&self, e: bus::Event) {
        if let Some(b) = self.bus.get() {
            b.publish(e);
        }
    }

    fn replica_alive(&self, replica: u64) -> bool {
        self.alive
            .lock()
            .ok()
            .and_then(|a| a.get(&replica).map(|t| t.elapsed() < bus::ALIVE_TIMEOUT))
            .unwrap_or(false)
    }

    fn local(&self, device: &str) -> Option<Live> {
        self.live.lock().ok()?.get(device).cloned()
    }

    /// The device's session here or, with replicas, on a live other replica.
    pub fn get(&self, device: &str) -> Option<Live> {
        if let Some(l) = self.local(device) {
            return Some(l);
        }
        let (replica, session, since) = *self.remote.lock().ok()?.get(device)?;
        self.replica_alive(replica).then(|| Live {
            session,
            since,
            wake: Arc::new(Notify::new()),
        })
    }

    /// Sessions open on this replica and on the live others.
    pub fn count(&self) -> usize {
        let local = self.live.lock().map(|m| m.len()).unwrap_or(0);
        let remote = self
            .remote
            .lock()
            .map(|m| {
                m.values()
                    .filter(|(r, _, _)| self.replica_alive(*r))
                    .count()
            })
            .unwrap_or(0);
        local + remote
    }

    /// Tells the device's session to look at the store again (new command, accepted…),
    /// wherever it is.
    pub fn wake(&self, device: &str) {
        match self.local(device) {
            Some(l) => l.wake.notify_one(),
            None => self.publish(bus::Event::Wake {
                d: device.to_owned(),
            }),
        }
    }

    fn register(&self, device: &str, live: Live) {
        let (session, since) = (live.session, live.since);
        if let Ok(mut m) = self.live.lock() {
            // A newer session of the same key replaces the older one; the older loop
            // notices on its next wake and ends.
            if let Some(old) = m.insert(device.to_owned(), live) {
                old.wake.notify_one();
            }
        }
        if let Ok(mut r) = self.remote.lock() {
            r.remove(device);
        }
        self.publish(bus::Event::Session {
            d: device.to_owned(),
            s: session,
            since,
        });
    }

    fn unregister(&self, device: &str, session: u64) {
        if let Ok(mut m) = self.live.lock() {
            if m.get(device).is_some_and(|l| l.session == session) {
                m.remove(device);
                self.publish(bus::Event::Gone {
                    d: device.to_owned(),
                    s: session,
                });
            }
        }
    }

    /// An event from another replica.
    pub fn deliver(&self, replica: u64, e: bus::Event) {
        use bus::Event as E;
        if let Ok(mut a) = self.alive.lock() {
            a.insert(replica, Instant::now());
        }
        match e {
            E::Wake { d } => {
                if let Some(l) = self.local(&d) {
                    l.wake.notify_one();
                }
            }
            E::Session { d, s, since } => {
                // The device reconnected there: a session of it here is stale.
                if let Ok(mut m) = self.live.lock() {
                    if let Some(old) = m.remove(&d) {
                        old.wake.notify_one();
                    }
                }
                if let Ok(mut r) = self.remote.lock() {
                    r.insert(d, (replica, s, since));
                }
            }
            E::Gone { d, s } => {
                if let Ok(mut r) = self.remote.lock() {
                    if r.get(&d).is_some_and(|(_, rs, _)| *rs == s) {
                        r.remove(&d);
                    }
                }
            }
            E::Follow { d, c, sub } => self.follow_start_here(&d, &c, sub),
            E::Logs {
                d,
                c,
                lines,
                dropped,
            } => self.follow_push_here(&d, &c, lines, dropped),
            E::Poll { d, c } => {
                if let Ok(mut f) = self.follows.lock() {
                    if let Some(f) = f.get_mut(&(d, c)) {
                        f.last_poll = Instant::now();
                    }
                }
            }
            E::Unfollow { d, c } => {
                if let Ok(mut m) = self.follows.lock() {
                    m.retain(|(fd, fc), _| fd != &d || c.as_ref().is_some_and(|c| c != fc));
                }
            }
            E::Alive => {}
            E::Hello => {
                // A replica started: tell it which sessions are here.
                let here: Vec<(String, u64, i64)> = self
                    .live
                    .lock()
                    .map(|m| {
                        m.iter()
                            .map(|(d, l)| (d.clone(), l.session, l.since))
                            .collect()
                    })
                    .unwrap_or_default();
                for (d, s, since) in here {
                    self.publish(bus::Event::Session { d, s, since });
                }
            }
        }
    }

    /// Lines after `after` of a followed chute; `None` when nobody follows it. Counts
    /// as a poll (keeps the follow alive, on the session's replica too).
    pub fn poll_logs(&self, device: &str, chute: &str, after: u64) -> Option<(Vec<LogLine>, u64)> {
        let found = {
            let mut f = self.follows.lock().ok()?;
            let f = f.get_mut(&(device.to_owned(), chute.to_owned()))?;
            f.last_poll = Instant::now();
            (
                f.lines.iter().filter(|l| l.seq > after).cloned().collect(),
                f.dropped,
            )
        };
        if self.local(device).is_none() {
            self.publish(bus::Event::Poll {
                d: device.to_owned(),
                c: chute.to_owned(),
            });
        }
        Some(found)
    }

    fn follow_start(&self, device: &str, chute: &str, subscription: u64) {
        self.follow_start_here(device, chute, subscription);
        self.publish(bus::Event::Follow {
            d: device.to_owned(),
            c: chute.to_owned(),
            sub: subscription,
        });
    }

    fn follow_start_here(&self, device: &str, chute: &str, subscription: u64) {
        if let Ok(mut m) = self.follows.lock() {
            let f = m
                .entry((device.to_owned(), chute.to_owned()))
                .or_insert_with(|| Follow {
                    subscription,
                    lines: std::collections::VecDeque::new(),
                    next_seq: 1,
                    dropped: 0,
                    last_poll: Instant::now(),
                });
            f.subscription = subscription;
            f.last_poll = Instant::now();
        }
    }

    fn follow_push(
        &self,
        device: &str,
        chute: &str,
        lines: Vec<(u64, String, String)>,
        dropped: u32,
    ) {
        if self.bus.get().is_some() {
            self.publish(bus::Event::Logs {
                d: device.to_owned(),
                c: chute.to_owned(),
                lines: lines.clone(),
                dropped,
            });
        }
        self.follow_push_here(device, chute, lines, dropped);
    }

    fn follow_push_here(
        &self,
        device: &str,
        chute: &str,
        lines: Vec<(u64, String, String)>,
        dropped: u32,
    ) {
        let Ok(mut m) = self.follows.lock() else {
            return;
        };
        let Some(f) = m.get_mut(&(device.to_owned(), chute.to_owned())) else {
            return;
        };
        f.dropped += u64::from(dropped);
        for (ts_ms, stream, text) in lines {
            if f.lines.len() >= FOLLOW_LINES {
                f.lines.pop_front();
                f.dropped += 1;
            }
            f.lines.push_back(LogLine {
                seq: f.next_seq,
                ts_ms,
                stream,
                text,
            });
            f.next_seq += 1;
        }
    }

    /// Follows of `device` nobody polled for [`FOLLOW_IDLE`]: removed, their
    /// subscriptions returned for UNSUBSCRIBE.
    fn follow_expire(&self, device: &str) -> Vec<u64> {
        let Ok(mut m) = self.follows.lock() else {
            return Vec::new();
        };
        let idle: Vec<(String, String)> = m
            .iter()
            .filter(|((d, _), f)| d == device && f.last_poll.elapsed() > FOLLOW_IDLE)
            .map(|(k, _)| k.clone())
            .collect();
        idle.into_iter()
            .filter_map(|k| {
                let f = m.remove(&k)?;
                self.publish(bus::Event::Unfollow {
                    d: k.0,
                    c: Some(k.1),
                });
                Some(f.subscription)
            })
            .collect()
    }

    /// The agent drops a session's subscriptions with the session.
    fn follow_end_all(&self, device: &str) {
        if let Ok(mut m) = self.follows.lock() {
            m.retain(|(d, _), _| d != device);
        }
        self.publish(bus::Event::Unfollow {
            d: device.to_owned(),
            c: None,
        });
    }

    fn current(&self, device: &str, session: u64) -> bool {
        self.local(device).is_some_and(|l| l.session == session)
    }
}

fn frame(m: &Message) -> Option<WsMessage> {
    proto::encode(m).ok().map(|f| WsMessage::Binary(f.into()))
}

async fn send(ws: &mut WebSocket, m: &Message) -> Result<(), String> {
    let f = frame(m).ok_or_else(|| format!("cannot encode {}", m.message_type()))?;
    ws.send(f).await.map_err(|e| format!("send: {e}"))
}

async fn abort(ws: &mut WebSocket, code: ErrorCode, why: &str) {
    let _ = send(
        ws,
        &Message::Abort(Abort {
            code,
            message: BoundedString::truncating(why),
        }),
    )
    .await;
    let _ = ws.close().await;
}

async fn recv(ws: &mut WebSocket) -> Result<Message, String> {
    loop {
        match ws.recv().await {
            Some(Ok(WsMessage::Binary(b))) => return proto::decode(&b).map_err(|e| e.to_string()),
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
            Some(Ok(WsMessage::Text(_))) => return Err("text frame; the protocol is binary".into()),
            Some(Ok(WsMessage::Close(_))) | None => return Err("closed".into()),
            Some(Err(e)) => return Err(format!("websocket: {e}")),
        }
    }
}

/// What admission decided for an authenticated key.
enum Admission {
    Accepted,
    Pending,
    Refused(String),
}

async fn admit(app: &App, key: &PublicKey, claim: Option<&str>) -> Result<Admission, String> {
    let id = key.device_id().to_hex();
    let t = now();
    let store = &app.store;
    let existing = store.device_get(&id).await.map_err(|e| e.to_string())?;
    if let Some(d) = &existing {
        if d.pubkey != key.to_hex() {
            return Ok(Admission::Refused("device id collision".into()));
        }
    }
    let status = existing.map(|d| d.status);
    if status.as_deref() == Some("accepted") {
        return Ok(Admission::Accepted);
    }
    if status.as_deref() == Some("rejected") {
        return Ok(Admission::Refused(
            "this device was rejected by the fleet owner".into(),
        ));
    }
    if let Some(token) = claim {
        let sha = crate::api::token_hash(token);
        if store
            .claim_use(&sha, &id, t)
            .await
            .map_err(|e| e.to_string())?
        {
            store
                .device_insert(&id, &key.to_hex(), "accepted", t)
                .await
                .map_err(|e| e.to_string())?;
            store
                .device_set_status(&id, "accepted", t)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(device = %id, "device accepted by claim token");
            return Ok(Admission::Accepted);
        }
        tracing::info!(device = %id, "claim token unknown, used or expired");
    }
    if status.is_none() {
        let pending = store
            .device_count_status("pending")
            .await
            .map_err(|e| e.to_string())?;
        if pending >= MAX_PENDING {
            return Ok(Admission::Refused(format!(
                "{pending} devices already await approval; try later"
            )));
        }
        store
            .device_insert(&id, &key.to_hex(), "pending", t)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(device = %id, fingerprint = %wire::fingerprint(key), "new device pending approval");
    }
    Ok(Admission::Pending)
}

/// An image being sent for the command in flight.
struct ImageSend {
    sha: [u8; 32],
    hex: String,
    size: u64,
    sent_upto: u64,
}

struct Inflight {
    command: i64,
    image: Option<ImageSend>,
    /// For `logs`: the chute, so a follow subscription in the result can be tracked.
    logs_chute: Option<String>,
}

/// Runs one agent websocket until it ends.
pub async fn session(
    mut ws: WebSocket,
    app: Arc<App>,
    claim: Option<String>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let hello: Hello = match recv(&mut ws).await? {
            Message::Hello(h) => h,
            other => return Err(format!("expected HELLO, got {}", other.message_type())),
        };
        let session_id = app.hub.next_session.fetch_add(1, Ordering::Relaxed);
        let challenge = Challenge::random(session_id).map_err(|e| e.to_string())?;
        send(&mut ws, &Message::Challenge(challenge.clone())).await?;
        match recv(&mut ws).await? {
            Message::Authenticate(a) => a
                .verify(&hello.realm, &hello.pubkey, &challenge)
                .map_err(|e| e.to_string())?,
            other => {
                return Err(format!(
                    "expected AUTHENTICATE, got {}",
                    other.message_type()
                ))
            }
        }
        Ok((hello, session_id))
    })
    .await;
    drop(permit);
    let (hello, session_id) = match handshake {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::info!(reason = %e, "agent handshake failed");
            abort(&mut ws, ErrorCode::AuthenticationFailed, &e).await;
            return;
        }
        Err(_) => {
            tracing::info!("agent handshake timed out");
            abort(&mut ws, ErrorCode::ProtocolViolation, "handshake timed out").await;
            return;
        }
    };
    let device = hello.device_id().to_hex();
    let mut accepted = match admit(&app, &hello.pubkey, claim.as_deref()).await {
        Ok(Admission::Accepted) => true,
        Ok(Admission::Pending) => false,
        Ok(Admission::Refused(why)) => {
            abort(&mut ws, ErrorCode::NotAuthorized, &why).await;
            return;
        }
        Err(e) => {
            tracing::warn!(device = %device, error = %e, "admission failed");
            abort(
                &mut ws,
                ErrorCode::Internal,
                "the cloud cannot admit devices right now",
            )
            .await;
            return;
        }
    };
    if send(
        &mut ws,
        &Message::Welcome(Welcome {
            session_id,
            heartbeat_secs: 0,
        }),
    )
    .await
    .is_err()
    {
        return;
    }
    let agent_version = hello.agent_version.to_string();
    if accepted {
        let _ = app.store.device_seen(&device, &agent_version, now()).await;
    }
    let wake = Arc::new(Notify::new());
    app.hub.register(
        &device,
        Live {
            session: session_id,
            since: now(),
            wake: wake.clone(),
        },
    );
    tracing::info!(device = %device, session = session_id, accepted, "agent session open");
    let reason = run(&mut ws, &app, &device, session_id, &wake, &mut accepted).await;
    if app.hub.current(&device, session_id) {
        app.hub.follow_end_all(&device);
    }
    app.hub.unregister(&device, session_id);
    tracing::info!(device = %device, session = session_id, reason = %reason, "agent session closed");
}

async fn run(
    ws: &mut WebSocket,
    app: &App,
    device: &str,
    session_id: u64,
    wake: &Notify,
    accepted: &mut bool,
) -> String {
    let mut malformed = 0u32;
    let mut inflight: Option<Inflight> = None;
    let mut tick = tokio::time::interval(POLL);
    let mut last_rx = Instant::now();
    let mut held_heartbeat: Option<Message> = None;
    let mut limits = Limits::default();
    let mut check = true;
    let mut polls = 0u32;
    loop {
        if *accepted && inflight.is_none() && check {
            match next_command(app, device).await {
                Ok(Some(cmd)) => match deliver(ws, app, &cmd).await {
                    // A command that could not be sent was marked failed: look again.
                    Ok(f) => {
                        check = f.is_none();
                        inflight = f;
                    }
                    Err(e) => return e,
                },
                Ok(None) => check = false,
                Err(e) => tracing::warn!(device, error = %e, "cannot read queued commands"),
            }
        }
        tokio::select! {
            m = ws.recv() => {
                let frame = match m {
                    Some(Ok(WsMessage::Binary(b))) => b,
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(WsMessage::Text(_))) => {
                        abort(ws, ErrorCode::ProtocolViolation, "text frame; chute.v1.postcard is binary").await;
                        return "text frame".into();
                    }
                    Some(Ok(WsMessage::Close(_))) | None => return "closed by the agent".into(),
                    Some(Err(e)) => return format!("websocket: {e}"),
                };
                last_rx = Instant::now();
                let msg = match proto::decode(&frame) {
                    Ok(m) => m,
                    Err(e) => {
                        malformed += 1;
                        if malformed > MAX_MALFORMED {
                            abort(ws, ErrorCode::ProtocolViolation, &format!("{malformed} malformed frames")).await;
                            return format!("malformed frames: {e}");
                        }
                        continue;
                    }
                };
                if is_heartbeat(&msg) && !limits.allow_heartbeat() {
                    abort(ws, ErrorCode::ProtocolViolation, &format!("more than {MAX_HEARTBEATS} heartbeats in {} s", HEARTBEAT_WINDOW.as_secs())).await;
                    return "heartbeats too fast: shed".into();
                }
                if !*accepted {
                    // A pending device is heard but not recorded (it cannot fill the
                    // store); its latest heartbeat is kept in memory for the moment it
                    // is accepted, so its status is known at once.
                    if is_heartbeat(&msg) {
                        held_heartbeat = Some(msg);
                    }
                    continue;
                }
                let busy = inflight.is_some();
                let r = handle(ws, app, device, msg, &mut inflight, &mut limits).await;
                // A finished command: the next one may be queued.
                check |= busy && inflight.is_none();
                match r {
                    Ok(true) => {}
                    Ok(false) => {
                        malformed += 1;
                        if malformed > MAX_MALFORMED {
                            abort(ws, ErrorCode::ProtocolViolation, "too many out-of-place frames").await;
                            return "out-of-place frames".into();
                        }
                    }
                    Err(e) => return e,
                }
            }
            _ = wake.notified() => {
                check = true;
                if !app.hub.current(device, session_id) {
                    abort(ws, ErrorCode::ProtocolViolation, "replaced by a newer session of this device").await;
                    return "replaced by a newer session".into();
                }
                match app.store.device_get(device).await {
                    Ok(Some(d)) if d.status == "accepted" => {
                        if !*accepted {
                            if let Some(hb) = held_heartbeat.take() {
                                if let Err(e) = handle(ws, app, device, hb, &mut inflight, &mut limits).await {
                                    return e;
                                }
                            }
                        }
                        *accepted = true;
                    }
                    Ok(Some(d)) if d.status == "rejected" => {
                        abort(ws, ErrorCode::NotAuthorized, "this device was rejected by the fleet owner").await;
                        return "rejected".into();
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                polls += 1;
                check |= polls % STORE_EVERY_POLLS == 0;
                if last_rx.elapsed() > Duration::from_secs(180) {
                    return "agent silent for 180 s".into();
                }
                for subscription in app.hub.follow_expire(device) {
                    let request = app.hub.next_session.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = send(ws, &Message::Unsubscribe(proto::Unsubscribe { request, subscription })).await {
                        return e;
                    }
                }
            }
        }
    }
}

/// When a session last wrote status to the store (writes are rate-limited).
#[derive(Default)]
struct Limits {
    heartbeat: Option<Instant>,
    /// Heartbeats received in the current window (recorded or not).
    heartbeat_window: Option<(Instant, u32)>,
    /// State changes written in the current one-second window.
    state_window: Option<(Instant, u32)>,
}

/// State changes written per session per second (a burst of chutes changing at once
/// fits; a flood does not).
const MAX_STATE_WRITES: u32 = 32;

/// Heartbeats a session may send per [`HEARTBEAT_WINDOW`]: three times the fastest
/// period an agent can be configured with (1 s). Beyond it the session is shed — an
/// agent 100× too fast costs decoding and wake-ups even when its heartbeats are not
/// recorded; it reconnects with backoff.
pub const MAX_HEARTBEATS: u32 = 30;
pub const HEARTBEAT_WINDOW: Duration = Duration::from_secs(10);

impl Limits {
    fn allow_heartbeat(&mut self) -> bool {
        match &mut self.heartbeat_window {
            Some((start, n)) if start.elapsed() < HEARTBEAT_WINDOW => {
                *n += 1;
                *n <= MAX_HEARTBEATS
            }
            _ => {
                self.heartbeat_window = Some((Instant::now(), 1));
                true
            }
        }
    }

    fn allow_state(&mut self) -> bool {
        match &mut self.state_window {
            Some((start, n)) if start.elapsed() < Duration::from_secs(1) => {
                *n += 1;
                *n <= MAX_STATE_WRITES
            }
            _ => {
                self.state_window = Some((Instant::now(), 1));
                true
            }
        }
    }
}

fn is_heartbeat(m: &Message) -> bool {
    matches!(m, Message::Publish(p) if matches!(p.publication, Publication::Heartbeat(_)))
}

/// The next command to deliver, marking expired ones on the way.
async fn next_command(app: &App, device: &str) -> Result<Option<CommandRow>, String> {
    loop {
        let Some(c) = app
            .store
            .command_next(device)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let t = now();
        if c.expires_at < t {
            app.store
                .command_set(
                    c.id,
                    "expired",
                    Some("expired before the device could receive it"),
                    None,
                    t,
                )
                .await
                .map_err(|e| e.to_string())?;
            continue;
        }
        return Ok(Some(c));
    }
}

async fn deliver(
    ws: &mut WebSocket,
    app: &App,
    c: &CommandRow,
) -> Result<Option<Inflight>, String> {
    let signed = match wire::decode_command(&c.signed) {
        Ok(s) => s,
        Err(e) => {
            let _ = app
                .store
                .command_set(c.id, "failed", Some(&e.to_string()), None, now())
                .await;
            return Ok(None);
        }
    };
    let logs_chute = wire::follow_chute(&signed);
    let image = wire::image_of(&signed).map(|(sha, size)| ImageSend {
        sha,
        hex: proto::hex_encode(&sha),
        size,
        sent_upto: 0,
    });
    send(
        ws,
        &Message::Call(Box::new(Call {
            request: c.id as u64,
            command: signed,
        })),
    )
    .await?;
    let detail = (c.status == "sent").then_some("resent after the device reconnected");
    let _ = app
        .store
        .command_set(c.id, "sent", detail, None, now())
        .await;
    Ok(Some(Inflight {
        command: c.id,
        image,
        logs_chute,
    }))
}

/// Handles one frame from an accepted device. `Ok(false)`: out of place.
async fn handle(
    ws: &mut WebSocket,
    app: &App,
    device: &str,
    msg: Message,
    inflight: &mut Option<Inflight>,
    limits: &mut Limits,
) -> Result<bool, String> {
    match msg {
        Message::Publish(p) => {
            match p.publication {
                // A device that sends heartbeats faster than this is recorded at this rate
                // (heartbeats are snapshots; the store is not a device's to flood).
                Publication::Heartbeat(_)
                    if limits
                        .heartbeat
                        .is_some_and(|t| t.elapsed() < MIN_HEARTBEAT_GAP) => {}
                Publication::Heartbeat(h) => {
                    limits.heartbeat = Some(Instant::now());
                    let running = h
                        .chutes
                        .iter()
                        .filter(|c| c.state == proto::ChuteState::Running)
                        .count();
                    let t = now();
                    let clock_secs = i64::try_from(h.clock_secs).unwrap_or(i64::MAX);
                    let body = json!({
                        "seq": h.seq,
                        "uptime_secs": h.uptime_secs,
                        // The device clock against ours when the heartbeat arrived: a
                        // router without an RTC can be years off, and its commands are
                        // then judged at its time floor (see `DeviceClock` in the API).
                        "clock": {
                            "secs": clock_secs,
                            "state": h.clock.as_str(),
                            "skew_secs": clock_secs.saturating_sub(t),
                        },
                        "resources": {
                            "cpu_millicores_total": h.resources.cpu_millicores_total,
                            "cpu_millicores_free": h.resources.cpu_millicores_free,
                            "memory_total": h.resources.memory_total,
                            "memory_free": h.resources.memory_free,
                            "pids_total": h.resources.pids_total,
                            "pids_free": h.resources.pids_free,
                        },
                        "chutes_running": running,
                        "chutes_total": h.chutes.len(),
                        "chutes": h.chutes.iter().map(|c| json!({
                            "name": c.name.as_str(),
                            "state": format!("{:?}", c.state).to_lowercase(),
                            "cpu_millicores": c.cpu_millicores,
                            "memory_bytes": c.memory_bytes,
                            "pids": c.pids,
                            "rx_bytes": c.rx_bytes,
                            "tx_bytes": c.tx_bytes,
                            "restarts": c.restarts,
                        })).collect::<Vec<_>>(),
                    });
                    app.hub
                        .record_heartbeat(
                            app,
                            HeartbeatRow {
                                device: device.to_owned(),
                                agent_version: h.agent_version.to_string(),
                                json: body.to_string(),
                                at: t,
                            },
                        )
                        .await;
                }
                Publication::Logs(b) => {
                    let lines = b
                        .lines
                        .iter()
                        .map(|l| {
                            (
                                l.ts_ms,
                                format!("{:?}", l.stream).to_lowercase(),
                                l.text.to_string(),
                            )
                        })
                        .collect();
                    app.hub
                        .follow_push(device, b.chute.as_str(), lines, b.dropped);
                }
                // A chute changed state between heartbeats: the stored snapshot follows at
                // once (at most MAX_STATE_WRITES a second), so status is not a period stale.
                Publication::State(sc) => {
                    if !limits.allow_state() {
                        return Ok(true);
                    }
                    let Ok(Some(d)) = app.store.device_get(device).await else {
                        return Ok(true);
                    };
                    let mut hb = d
                        .heartbeat
                        .as_deref()
                        .and_then(|h| serde_json::from_str::<serde_json::Value>(h).ok())
                        .unwrap_or_else(|| json!({ "chutes": [] }));
                    let state = format!("{:?}", sc.state).to_lowercase();
                    if let Some(chutes) = hb["chutes"].as_array_mut() {
                        // `Dead` is the lifecycle's terminal state: the chute was removed.
                        let removed = sc.state == proto::ChuteState::Dead;
                        let name = sc.chute.as_str();
                        if removed {
                            chutes.retain(|c| c["name"] != name);
                        } else if let Some(c) = chutes.iter_mut().find(|c| c["name"] == name) {
                            c["state"] = json!(state);
                        } else {
                            chutes.push(json!({ "name": name, "state": state }));
                        }
                        let running = chutes.iter().filter(|c| c["state"] == "running").count();
                        let total = chutes.len();
                        hb["chutes_running"] = json!(running);
                        hb["chutes_total"] = json!(total);
                        let _ = app.store.device_set_snapshot(device, &hb.to_string()).await;
                    }
                }
            }
            Ok(true)
        }
        Message::Result(r) => {
            let Some(f) = inflight.as_ref().filter(|f| f.command as u64 == r.request) else {
                return Ok(false);
            };
            let status = match r.result.outcome {
                proto::Outcome::Ok(_) => "succeeded",
                proto::Outcome::Err { .. } => "failed",
            };
            let reason = match &r.result.outcome {
                proto::Outcome::Err { code, message } => {
                    Some(format!("{}: {}", code.uri(), message.as_str()))
                }
                _ => None,
            };
            if let (Some(chute), Some(sub)) = (&f.logs_chute, wire::logs_subscription(&r.result)) {
                app.hub.follow_start(device, chute, sub);
            }
            let hex = wire::encode_result(&r.result);
            let _ = app
                .store
                .command_set(f.command, status, reason.as_deref(), Some(&hex), now())
                .await;
            *inflight = None;
            Ok(true)
        }
        Message::Error(e) if e.request_type == MessageType::Call.code() => {
            let Some(f) = inflight.as_ref().filter(|f| f.command as u64 == e.request) else {
                return Ok(false);
            };
            let reason = format!("{}: {}", e.code.uri(), e.message.as_str());
            let _ = app
                .store
                .command_set(f.command, "refused", Some(&reason), None, now())
                .await;
            *inflight = None;
            Ok(true)
        }
        Message::Error(e) => {
            tracing::info!(device, code = %e.code, message = %e.message.as_str(), "agent reported an error");
            Ok(true)
        }
        Message::ChunkAck(a) => {
            let Some(img) = inflight
                .as_mut()
                .and_then(|f| f.image.as_mut())
                .filter(|i| i.sha == a.image_sha256)
            else {
                return Ok(true);
            };
            if a.complete || a.next_offset >= img.size {
                return Ok(true);
            }
            img.sent_upto = img.sent_upto.max(a.next_offset);
            let limit = img.size.min(a.next_offset + WINDOW * CHUNK as u64);
            while img.sent_upto < limit {
                let len = CHUNK.min((img.size - img.sent_upto) as usize);
                let data = app
                    .blobs
                    .read_at(&img.hex, img.sent_upto, len)
                    .await
                    .map_err(|e| format!("blob {}: {e}", img.hex))?;
                if data.is_empty() {
                    return Err(format!("blob {} is shorter than announced", img.hex));
                }
                let n = data.len() as u64;
                let chunk = Chunk {
                    image_sha256: img.sha,
                    total_size: img.size,
                    offset: img.sent_upto,
                    data: BoundedBytes::new(data).map_err(|e| e.to_string())?,
                };
                send(ws, &Message::Chunk(chunk)).await?;
                img.sent_upto += n;
                app.hub.chunk_bytes.fetch_add(n, Ordering::Relaxed);
            }
            Ok(true)
        }
        Message::Goodbye(_) | Message::Abort(_) => Err("the agent ended the session".into()),
        Message::Unsubscribed(_) | Message::Subscribed(_) => Ok(true),
        _ => Ok(false),
    }
}

/// Frames over this size close the socket in the websocket layer.
pub const fn max_frame() -> usize {
    MAX_FRAME
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqlStore;
    use futures_util::StreamExt;
    use proto::{AuthMethod, Authenticate, Hello, Keypair, Publish};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message as Ws;

    type Client = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    async fn next(ws: &mut Client) -> Option<Message> {
        loop {
            match ws.next().await? {
                Ok(Ws::Binary(b)) => return proto::decode(&b).ok(),
                Ok(Ws::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    async fn put(ws: &mut Client, m: &Message) -> bool {
        let f = proto::encode(m).expect("encodable");
        ws.send(Ws::Binary(f.into())).await.is_ok()
    }

    /// An accepted agent's session, through WELCOME.
    async fn agent(url: &str, key: &Keypair) -> Client {
        let mut req = url.into_client_request().expect("url");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            proto::SUBPROTOCOL.parse().expect("header"),
        );
        let (mut ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("connect");
        let hello = Hello {
            realm: BoundedString::new("chute").expect("realm"),
            pubkey: key.public(),
            agent_version: BoundedString::new("test").expect("version"),
            auth_method: AuthMethod::Cryptosign,
        };
        assert!(put(&mut ws, &Message::Hello(hello)).await);
        let Some(Message::Challenge(c)) = next(&mut ws).await else {
            panic!("no CHALLENGE");
        };
        let auth = Authenticate::answer(key, "chute", &c);
        assert!(put(&mut ws, &Message::Authenticate(auth)).await);
        assert!(matches!(next(&mut ws).await, Some(Message::Welcome(_))));
        ws
    }

    fn heartbeat(seq: u64) -> Message {
        let mut h = proto::testkit::heartbeat(1);
        h.seq = seq;
        Message::Publish(Publish {
            request: seq,
            publication: Publication::Heartbeat(h),
        })
    }

    #[tokio::test]
    async fn an_agent_sending_heartbeats_far_too_fast_is_shed_and_others_are_served() {
        let dir = std::env::temp_dir().join(format!("chute-cloud-shed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let store = SqlStore::open(&format!("sqlite://{}/c.db", dir.display()))
            .await
            .expect("store");
        let (flood, calm) = (
            Keypair::generate().expect("key"),
            Keypair::generate().expect("key"),
        );
        for k in [&flood, &calm] {
            let id = k.public().device_id().to_hex();
            store
                .device_insert(&id, &k.public().to_hex(), "accepted", 1)
                .await
                .expect("preauthorise");
        }
        let app = Arc::new(App {
            store: Arc::new(store),
            hub: Hub::default(),
            blobs: crate::blobs::Blobs::new(&dir).expect("blobs"),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            console: crate::console::Console::default(),
            conns: crate::conns::Limiter::new(crate::conns::Limits::default()),
        });
        app.hub.start_heartbeat_writer(app.store.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("ws://{}/agent", listener.local_addr().expect("addr"));
        let router = crate::api::router(app.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });

        let mut calm_ws = agent(&url, &calm).await;
        let mut flood_ws = agent(&url, &flood).await;
        // 100 heartbeats at once: 100× an agent's fastest period.
        let mut shed = None;
        for seq in 1..=100 {
            if !put(&mut flood_ws, &heartbeat(seq)).await {
                break;
            }
        }
        while let Some(m) = next(&mut flood_ws).await {
            if let Message::Abort(a) = m {
                shed = Some(a);
            }
        }
        let a = shed.expect("the flooding session was aborted");
        assert_eq!(a.code, ErrorCode::ProtocolViolation);
        assert!(
            a.message.as_str().contains("heartbeats"),
            "{}",
            a.message.as_str()
        );

        // The calm agent is still served: its heartbeat is recorded.
        assert!(put(&mut calm_ws, &heartbeat(1)).await);
        let id = calm.public().device_id().to_hex();
        let mut recorded = false;
        for _ in 0..100 {
            let d = app.store.device_get(&id).await.expect("device");
            if d.is_some_and(|d| d.last_heartbeat.is_some()) {
                recorded = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(recorded, "the calm agent's heartbeat was recorded");
        assert!(app.hub.get(&id).is_some());
        assert!(app.hub.get(&flood.public().device_id().to_hex()).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
