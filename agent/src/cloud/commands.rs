//! Signed commands from the cloud: verification and at-most-once bookkeeping (all
//! synchronous, before anything runs), then the procedure itself as a task whose
//! signed result is remembered and sent to every session request waiting for it.
//!
//! Result payloads (`Outcome::Ok`) are UTF-8 JSON: for deploy, start, stop, restart,
//! remove and inspect the same object the local CLI prints with `--json`; `status` adds
//! `device_id`, `clock` (`secs`, `state`: `ok` / `behind floor` / `ahead`, `time_floor`),
//! `state_dir_bytes` and `chute_list`, where `chute_list` (and the `chutes` count) holds
//! only the chutes the caller's grant covers; `logs` is `{chute, lines: [{stream, text}],
//! subscription}`; `update-grant` is `{developer, installed, rights}`. Refusals before
//! execution are ERROR messages; failures during execution are signed `Outcome::Err`.

use std::collections::BTreeMap;
use std::rc::Rc;

use futures_lite::StreamExt;
use proto::{
    Args, BoundedBytes, BoundedString, Call, CallResult, Chunk, ChuteName, ErrorCode, ErrorMsg,
    LogStream, Message, MessageType, Outcome, Publication, Publish, SignedCommand, SignedResult,
    Unsubscribe, Unsubscribed, MAX_PAYLOAD,
};
use serde_json::{json, Value};
use smol::Task;

use super::images::Expect;
use super::logs::{LogRing, RING_BYTES, RING_LINES};
use super::store::StoreError;
use super::Cloud;
use crate::podman::{LogLines, LogSource};
use crate::supervisor::{ChuteOp, OpError};

/// A deploy's image, as registered when its CALL was accepted.
type ImageRequest = Result<([u8; 32], Expect), (ErrorCode, String)>;

pub(super) fn error_msg(
    kind: MessageType,
    request: u64,
    code: ErrorCode,
    message: &str,
) -> Message {
    Message::Error(ErrorMsg {
        request_type: kind.code(),
        request,
        code,
        message: BoundedString::truncating(message),
    })
}

fn op_code(e: &OpError) -> ErrorCode {
    match e {
        OpError::Manifest(_) | OpError::HostNetworkRefused { .. } | OpError::HostPort(_) => {
            ErrorCode::InvalidManifest
        }
        OpError::Admission(_) => ErrorCode::InsufficientResources,
        OpError::NoSuchChute { .. } => ErrorCode::NoSuchChute,
        OpError::Busy { .. } => ErrorCode::Busy,
        OpError::Timeout { .. } => ErrorCode::Timeout,
        _ => ErrorCode::Internal,
    }
}

fn failed(code: ErrorCode, message: &str) -> Outcome {
    Outcome::Err {
        code,
        message: BoundedString::truncating(message),
    }
}

fn ok_json(v: &Value) -> Outcome {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    match BoundedBytes::new(bytes) {
        Ok(b) => Outcome::Ok(b),
        Err(e) => failed(ErrorCode::Internal, &format!("reply too large: {e}")),
    }
}

fn from_op(r: Result<Value, OpError>) -> Outcome {
    match r {
        Ok(v) => ok_json(&v),
        Err(e) => failed(op_code(&e), &e.to_string()),
    }
}

/// What can be known about a deploy before running it: the manifest parses and names
/// the chute the grant was checked against.
fn precheck(a: &proto::DeployArgs) -> Result<(), (ErrorCode, String)> {
    let manifest = chutes::Manifest::from_toml_str(&a.manifest_toml)
        .map_err(|e| (ErrorCode::InvalidManifest, e.to_string()))?;
    // Over the link an image is always pinned by content (no owner opt-out): the
    // archive's sha256 in the signed command, or a reference with `@sha256:`.
    if a.image_sha256.is_none() && !crate::imagepin::is_digest_ref(&manifest.image) {
        return Err((
            ErrorCode::InvalidManifest,
            format!(
                "image {:?} is a mutable tag: a cloud deploy pins its image by content, either \
                 an archive (image_sha256 in the command) or a reference NAME@sha256:DIGEST",
                manifest.image
            ),
        ));
    }
    if manifest.name.as_str() != a.chute.as_str() {
        return Err((
            ErrorCode::InvalidManifest,
            format!(
                "the command deploys chute {:?} but its manifest names {:?}",
                a.chute.as_str(),
                manifest.name.as_str()
            ),
        ));
    }
    Ok(())
}

/// Live log subscriptions: one tap (Podman follow + ring + drain) per chute, shared by
/// every subscription to that chute. Dropping a tap cancels its tasks.
#[derive(Default)]
pub struct LogTaps {
    next_id: u64,
    subs: BTreeMap<u64, ChuteName>,
    taps: BTreeMap<ChuteName, Vec<Task<()>>>,
}

impl LogTaps {
    pub fn clear(&mut self) {
        self.subs.clear();
        self.taps.clear();
    }
}

impl Cloud {
    /// A CALL: verify, dedupe, record in the replay window (on disk), then run. Returns
    /// the immediate reply, if any (refusals and cached results).
    pub(super) fn handle_call(self: &Rc<Self>, call: Call, now: u64) -> Option<Message> {
        let Call { request, command } = call;
        let refuse = |code, msg: &str| Some(error_msg(MessageType::Call, request, code, msg));
        let Some(verifier) = &self.verifier else {
            return refuse(
                ErrorCode::InvalidGrant,
                "this device trusts no owner key yet (run `chuted trust --owner-key HEX` or set owner_key); every command is refused",
            );
        };
        // One supersession rule (proto's), from the floors on disk now: a revocation
        // by `chuted revoke` applies to the very next command.
        let floors = match self.grants.load() {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(request, error = %e, "refused command: grant store unavailable");
                return refuse(ErrorCode::GrantStoreUnavailable, &e.to_string());
            }
        };
        let mut verifier = verifier.clone();
        verifier.grants = floors;
        let cmd = &command.command;
        // Judged at the time floor when the clock is behind it (a clock set back must
        // not revive expired commands).
        let judged = self.order.borrow().judge_time(now);
        let clock_note = if judged != now {
            format!(" (device clock {now} is behind the time floor {judged} kept from verified commands)")
        } else {
            String::new()
        };
        let verified = match verifier.check(&command, judged) {
            Ok(v) => v,
            Err(e) => {
                if matches!(e, proto::VerifyError::Expired { .. })
                    && verifier.check(&command, cmd.issued_at).is_ok()
                {
                    // Authentic, but already expired on arrival: evidence the clock is ahead.
                    self.order
                        .borrow_mut()
                        .note_expired_on_arrival(cmd.issued_at);
                }
                let msg = format!("{e}{clock_note}");
                tracing::info!(request, code = %e.code(), reason = %msg, "refused command");
                return refuse(e.code(), &msg);
            }
        };
        let key = (command.signer, cmd.request_id);
        if let Some(res) = self.results.borrow().get(&key.0, key.1) {
            if res.command_digest == verified.command_digest {
                tracing::debug!(
                    request,
                    request_id = key.1,
                    "resent command: sending its result again"
                );
                return Some(Message::Result(CallResult {
                    request,
                    result: res.clone(),
                }));
            }
        }
        if let Some(waiters) = self.inflight.borrow_mut().get_mut(&key) {
            // Still running: this session request gets the result when it is ready.
            waiters.push((self.epoch.get(), request));
            return None;
        }
        // After the resend paths: a resent command gets its result even when a later
        // one has changed the chute since.
        if let Err((code, msg)) = self.order.borrow().check(cmd) {
            tracing::info!(request, code = %code, reason = %msg, "refused command");
            return refuse(code, &msg);
        }
        if let Err(e) = self
            .replay
            .borrow_mut()
            .accept(&key.0, key.1, cmd.issued_at, now)
        {
            let code = match e {
                StoreError::Io { .. } => ErrorCode::Internal,
                _ => ErrorCode::Replayed,
            };
            let msg = format!("request {}: {e}", key.1);
            tracing::info!(request, code = %code, reason = %msg, "refused command");
            return refuse(code, &msg);
        }
        if let Err(e) = self.order.borrow_mut().record(cmd) {
            let msg = format!("request {}: {e}", key.1);
            tracing::warn!(request, reason = %msg, "refused command");
            return refuse(ErrorCode::Internal, &msg);
        }
        tracing::info!(request, request_id = key.1, procedure = %verified.procedure,
            signer = %command.signer, chute = ?cmd.args.chute().map(|c| c.as_str()), "running signed command");
        self.inflight
            .borrow_mut()
            .insert(key, vec![(self.epoch.get(), request)]);
        // An image transfer must be registered before the next frame is read: the
        // sender may start streaming chunks right behind the CALL.
        let image = match &cmd.args {
            // A deploy that will be refused anyway must not open a transfer.
            Args::Deploy(a) if precheck(a).is_ok() => a.image_sha256.map(|sha| {
                self.images
                    .borrow_mut()
                    .expect(sha, a.image_size)
                    .map(|e| (sha, e))
            }),
            _ => None,
        };
        let this = self.clone();
        self.agent
            .spawn(async move {
                let outcome = this.execute(&command, image).await;
                this.finish(command, outcome);
            })
            .detach();
        None
    }

    fn finish(&self, command: SignedCommand, outcome: Outcome) {
        let key = (command.signer, command.command.request_id);
        let result = SignedResult::sign(&self.device, &command.command, outcome);
        self.results.borrow_mut().insert(key.0, result.clone());
        let waiters = self.inflight.borrow_mut().remove(&key).unwrap_or_default();
        let epoch = self.epoch.get();
        for (e, request) in waiters {
            if e == epoch {
                self.send(&Message::Result(CallResult {
                    request,
                    result: result.clone(),
                }));
            }
        }
    }

    async fn execute(
        self: &Rc<Self>,
        command: &SignedCommand,
        image: Option<ImageRequest>,
    ) -> Outcome {
        let agent = &self.agent;
        match &command.command.args {
            Args::Deploy(a) => {
                if let Err((code, msg)) = precheck(a) {
                    return failed(code, &msg);
                }
                let (dir, sha) = match image {
                    None => (None, None),
                    Some(Err((code, msg))) => return failed(code, &msg),
                    Some(Ok((sha, Expect::Ready(dir)))) => (Some(dir), Some(sha)),
                    Some(Ok((sha, Expect::Pending(rx, ack)))) => {
                        if let Some(ack) = ack {
                            self.send(&Message::ChunkAck(ack));
                        }
                        match self.wait_image(sha, rx).await {
                            Ok(dir) => (Some(dir), Some(sha)),
                            Err((code, msg)) => return failed(code, &msg),
                        }
                    }
                    Some(Ok((sha, Expect::Resume(rx, part, size)))) => {
                        // Hashing a large partial archive takes seconds on a router:
                        // never on the executor that supervises the chutes.
                        match smol::unblock(move || super::images::hash_part(&part, sha, size))
                            .await
                        {
                            Ok(t) => {
                                let ack = self.images.borrow_mut().resumed(&sha, t);
                                if let Some(ack) = ack {
                                    self.send(&Message::ChunkAck(ack));
                                }
                            }
                            Err(e) => {
                                let msg = format!(
                                    "image {}: cannot read the partial archive: {e}",
                                    proto::hex_encode(&sha)
                                );
                                self.images.borrow_mut().abandon(&sha, &msg);
                                return failed(ErrorCode::Internal, &msg);
                            }
                        }
                        match self.wait_image(sha, rx).await {
                            Ok(dir) => (Some(dir), Some(sha)),
                            Err((code, msg)) => return failed(code, &msg),
                        }
                    }
                };
                let (ptx, prx) = smol::channel::unbounded::<String>();
                let r = agent.deploy(a.manifest_toml.to_string(), dir, ptx).await;
                drop(prx);
                if let Some(sha) = sha {
                    self.images.borrow_mut().release(&sha);
                }
                if let Err(OpError::Image { message, .. }) = &r {
                    if message.contains("sha256") {
                        return failed(ErrorCode::DigestMismatch, message);
                    }
                }
                from_op(r)
            }
            Args::Start(a) => from_op(agent.op(a.chute.as_str(), ChuteOp::Start).await),
            // The stop timeout is the agent's configured one (a chute's grace period is
            // the device owner's policy, not the caller's).
            Args::Stop(a) => from_op(agent.op(a.chute.as_str(), ChuteOp::Stop).await),
            Args::Restart(a) => from_op(agent.op(a.chute.as_str(), ChuteOp::Restart).await),
            Args::Remove(a) => from_op(agent.op(a.chute.as_str(), ChuteOp::Remove).await),
            Args::Inspect(a) => from_op(agent.inspect(a.chute.as_str())),
            Args::Status => {
                // A developer sees only the chutes its grant's patterns cover: other
                // tenants' names, images and states are not its business.
                let grant = &command.grant.grant;
                let mine: Vec<_> = agent
                    .list()
                    .into_iter()
                    .filter(|c| grant.covers_chute(&c.name))
                    .collect();
                let mut v = agent.status();
                v["device_id"] = json!(self.device.device_id().to_hex());
                v["chutes"] = json!(mine.len());
                v["chute_list"] = json!(mine);
                let (clock, state) = self.clock();
                v["clock"] = json!({
                    "secs": clock,
                    "state": state.as_str(),
                    "time_floor": self.order.borrow().order().time_floor(),
                });
                v["state_dir_bytes"] = json!(super::heartbeat::dir_usage(&agent.state_dir));
                ok_json(&v)
            }
            Args::Logs(a) => self.logs(&a.chute, a.tail, a.follow).await,
            Args::UpdateGrant(a) => {
                let Some(verifier) = &self.verifier else {
                    return failed(ErrorCode::InvalidGrant, "no owner key is trusted");
                };
                let mut verifier = verifier.clone();
                verifier.grants = match self.grants.load() {
                    Ok(f) => f,
                    Err(e) => return failed(ErrorCode::GrantStoreUnavailable, &e.to_string()),
                };
                let installed = match verifier.install_grant(&a.grant) {
                    Ok(()) => true,
                    Err(proto::GrantUpdateError::Older { .. }) => false,
                    Err(e) => return failed(ErrorCode::InvalidGrant, &e.to_string()),
                };
                if installed {
                    if let Err(e) = self.grants.save(&verifier.grants) {
                        return failed(ErrorCode::Internal, &e.to_string());
                    }
                }
                ok_json(&json!({
                    "developer": a.grant.grant.developer.to_hex(),
                    "installed": installed,
                    "rights": a.grant.grant.rights.to_string(),
                }))
            }
        }
    }

    async fn wait_image(
        &self,
        sha: [u8; 32],
        rx: super::images::Waiter,
    ) -> Result<std::path::PathBuf, (ErrorCode, String)> {
        let stall = self.cfg.transfer_stall;
        loop {
            let got = futures_lite::future::or(async { Some(rx.recv().await) }, async {
                smol::Timer::after(stall / 4).await;
                None
            })
            .await;
            match got {
                Some(Ok(r)) => return r,
                Some(Err(_)) => {
                    return Err((ErrorCode::Canceled, "image transfer abandoned".into()));
                }
                None => {
                    let last = self.images.borrow().last_progress(&sha);
                    if last.is_none_or(|t| t.elapsed() >= stall) {
                        let msg = format!(
                            "image {}: no chunk arrived for {}s; re-issue the deploy to resume",
                            proto::hex_encode(&sha),
                            stall.as_secs()
                        );
                        self.images.borrow_mut().abandon(&sha, &msg);
                        return Err((ErrorCode::TransferIncomplete, msg));
                    }
                }
            }
        }
    }

    /// Past output from Podman (bounded by `tail` and the payload cap); with `follow`,
    /// a subscription whose batches are published until the cloud unsubscribes or the
    /// session ends.
    async fn logs(self: &Rc<Self>, chute: &ChuteName, tail: u32, follow: bool) -> Outcome {
        let id = match self.agent.view(chute.as_str()) {
            Ok(v) => v.borrow().container_id.clone(),
            Err(e) => return failed(op_code(&e), &e.to_string()),
        };
        let Some(id) = id else {
            return failed(
                ErrorCode::NoSuchChute,
                &format!("chute `{chute}` has no container"),
            );
        };
        let mut lines: Vec<Value> = Vec::new();
        let mut budget = MAX_PAYLOAD / 2;
        if tail > 0 {
            let mut stream = match self
                .agent
                .podman
                .logs(&id, false, Some(tail.min(10_000)))
                .await
            {
                Ok(s) => s,
                Err(e) => return failed(ErrorCode::Internal, &format!("chute `{chute}`: {e}")),
            };
            let mut split = LogLines::new(proto::MAX_LOG_LINE);
            let mut keep = |source: LogSource, l: &str| {
                if budget > l.len() + 32 {
                    budget -= l.len() + 32;
                    lines.push(json!({"stream": source.name(), "text": l}));
                }
            };
            while let Some(chunk) = stream.next().await {
                let Ok(chunk) = chunk else { break };
                split.feed(&chunk, &mut keep);
            }
            split.finish(&mut keep);
        }
        let subscription = if follow {
            Some(self.subscribe_logs(chute.clone(), id))
        } else {
            None
        };
        ok_json(&json!({ "chute": chute.as_str(), "lines": lines, "subscription": subscription }))
    }

    fn subscribe_logs(self: &Rc<Self>, chute: ChuteName, container: String) -> u64 {
        let mut taps = self.logs.borrow_mut();
        taps.next_id += 1;
        let id = taps.next_id;
        taps.subs.insert(id, chute.clone());
        if !taps.taps.contains_key(&chute) {
            let key = chute.clone();
            let ring = Rc::new(std::cell::RefCell::new(LogRing::new(
                RING_LINES, RING_BYTES,
            )));
            let (bell_tx, bell_rx) = smol::channel::bounded::<()>(1);
            let this = self.clone();
            let (r1, name1) = (ring.clone(), chute.clone());
            let reader = self.agent.spawn(async move {
                let mut stream = match this.agent.podman.logs(&container, true, Some(0)).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(chute = %name1, error = %e, "cannot follow logs");
                        return;
                    }
                };
                let mut split = LogLines::new(proto::MAX_LOG_LINE);
                let wire = |source| match source {
                    LogSource::Stdout => LogStream::Stdout,
                    LogSource::Stderr => LogStream::Stderr,
                };
                while let Some(Ok(chunk)) = stream.next().await {
                    let ts = super::unix_now().saturating_mul(1000);
                    split.feed(&chunk, |s, l| r1.borrow_mut().push(ts, wire(s), l));
                    let _ = bell_tx.try_send(());
                }
                // The container is gone: its last words, newline or not.
                let ts = super::unix_now().saturating_mul(1000);
                split.finish(|s, l| r1.borrow_mut().push(ts, wire(s), l));
                let _ = bell_tx.try_send(());
            });
            let this = self.clone();
            let drain = self.agent.spawn(async move {
                while bell_rx.recv().await.is_ok() {
                    loop {
                        let batch = ring.borrow_mut().take_batch(&chute);
                        let Some(batch) = batch else { break };
                        let msg = Message::Publish(Publish {
                            request: this.next_publish(),
                            publication: Publication::Logs(batch),
                        });
                        if !this.send_wait(&msg).await {
                            break;
                        }
                    }
                }
            });
            taps.taps.insert(key, vec![reader, drain]);
        }
        id
    }

    /// UNSUBSCRIBE from the cloud: ends a log subscription (and its tap when it was
    /// the last one on that chute).
    pub(super) fn handle_unsubscribe(&self, u: Unsubscribe) -> Message {
        let mut taps = self.logs.borrow_mut();
        let Some(chute) = taps.subs.remove(&u.subscription) else {
            return error_msg(
                MessageType::Unsubscribe,
                u.request,
                ErrorCode::ProtocolViolation,
                &format!("no subscription {} on this session", u.subscription),
            );
        };
        if !taps.subs.values().any(|c| *c == chute) {
            taps.taps.remove(&chute);
        }
        Message::Unsubscribed(Unsubscribed { request: u.request })
    }

    /// A CHUNK of an image archive.
    pub(super) fn handle_chunk(&self, chunk: &Chunk) -> Vec<Message> {
        match self.images.borrow_mut().accept(chunk) {
            Ok(ack) => vec![Message::ChunkAck(ack)],
            Err((code, msg, ack)) => {
                let mut out = vec![error_msg(MessageType::Chunk, chunk.offset, code, &msg)];
                out.extend(ack.map(Message::ChunkAck));
                out
            }
        }
    }

    /// Session start: resend acks of unfinished transfers so their senders resume.
    pub(super) fn on_welcome(&self) {
        for ack in self.images.borrow().acks() {
            self.send(&Message::ChunkAck(ack));
        }
    }

    /// Session end: follows are per session.
    pub(super) fn on_session_end(&self) {
        self.logs.borrow_mut().clear();
    }
}
