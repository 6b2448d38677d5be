//! Signed commands from the cloud: verification and at-most-once bookkeeping (all
//! synchronous, before anything runs), then the procedure itself as a task whose
//! signed result is remembered and sent to every session request waiting for it.
//!
//! Every procedure but `update-grant` runs as a `chute_api::Request` through
//! `Agent::handle`, like the local CLI's. Result payloads (`Outcome::Ok`) are the UTF-8
//! JSON of `chute_api` types: for deploy, start, stop, restart, remove and inspect the same
//! object the local CLI prints with `--json`; `status` is a `DeviceStatus` (the agent's
//! status, with its `clock` (`secs`, `state`: `ok` / `behind floor` / `ahead`,
//! `time_floor`) and `state_dir_bytes`, plus `device_id` and `chute_list`, where
//! `chute_list` and the `chutes` count hold only the chutes the caller's grant covers);
//! `logs` a `LogBatch`; `update-grant` a `GrantInstalled`. Refusals before execution are
//! ERROR messages; failures during execution are signed `Outcome::Err`.

use std::collections::BTreeMap;
use std::rc::Rc;

use proto::{
    Args, BoundedBytes, BoundedString, Call, CallResult, Chunk, ChuteName, ErrorCode, ErrorMsg,
    LogStream, Message, MessageType, Outcome, Publication, Publish, SignedCommand, SignedResult,
    Unsubscribe, Unsubscribed, MAX_PAYLOAD,
};
use smol::Task;

use super::images::Expect;
use super::logs::{LogRing, RING_BYTES, RING_LINES};
use super::store::StoreError;
use super::Cloud;
use crate::api::Event;
use chute_api::{ApiError, DeviceStatus, GrantInstalled, LogBatch, LogLine, Request, Response};

/// Where a deploy's archive comes from, as decided when its CALL was accepted.
enum Source {
    /// Over the chunk transfer.
    Transfer(Expect),
    /// This chute loaded exactly this archive before, as this image id: if the image is
    /// still here, nothing is transferred.
    Held(String),
}

/// A deploy's image, as registered when its CALL was accepted.
type ImageRequest = Result<([u8; 32], Source), (ErrorCode, String)>;

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

/// The wire's code for an API error (the wire's set is older and coarser).
fn wire_code(code: chute_api::ErrorCode) -> ErrorCode {
    use chute_api::ErrorCode as Api;
    match code {
        Api::InvalidManifest | Api::NotAllowed | Api::BadRequest => ErrorCode::InvalidManifest,
        Api::InsufficientResources => ErrorCode::InsufficientResources,
        Api::NoSuchChute => ErrorCode::NoSuchChute,
        Api::Busy => ErrorCode::Busy,
        Api::Timeout => ErrorCode::Timeout,
        Api::DigestMismatch => ErrorCode::DigestMismatch,
        Api::InvalidState
        | Api::Image
        | Api::RolledBack
        | Api::Podman
        | Api::Internal
        | Api::Unknown => ErrorCode::Internal,
    }
}

fn failed(code: ErrorCode, message: &str) -> Outcome {
    Outcome::Err {
        code,
        message: BoundedString::truncating(message),
    }
}

fn ok_json(v: &impl serde::Serialize) -> Outcome {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    match BoundedBytes::new(bytes) {
        Ok(b) => Outcome::Ok(b),
        Err(e) => failed(ErrorCode::Internal, &format!("reply too large: {e}")),
    }
}

fn from_api(r: Result<Response, ApiError>) -> Outcome {
    match r {
        Ok(v) => ok_json(&v),
        Err(e) => failed(wire_code(e.code), &e.message),
    }
}

/// A sink for requests whose events nobody reads (a cloud deploy's progress).
fn no_events() -> smol::channel::Sender<Event> {
    smol::channel::bounded(1).0
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

/// A log line cut into pieces of at most the wire's line length, on character
/// boundaries (the agent's stream cuts at 64 KiB; a publication carries 2 KiB lines).
fn wire_pieces(line: &str) -> impl Iterator<Item = &str> {
    let mut rest = line;
    let mut first = true;
    std::iter::from_fn(move || {
        if rest.is_empty() && !std::mem::take(&mut first) {
            return None;
        }
        first = false;
        let mut cut = rest.len().min(proto::MAX_LOG_LINE);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        Some(piece)
    })
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
                let held = chutes::Manifest::from_toml_str(&a.manifest_toml)
                    .ok()
                    .and_then(|m| {
                        crate::imagepin::loaded_archive(
                            &self.agent.state_dir,
                            &m,
                            &proto::hex_encode(&sha),
                        )
                    });
                match held {
                    Some(id) => Ok((sha, Source::Held(id))),
                    None => self
                        .images
                        .borrow_mut()
                        .expect(sha, a.image_size)
                        .map(|e| (sha, Source::Transfer(e))),
                }
            }),
            _ => None,
        };
        let this = self.clone();
        self.agent
            .spawn(async move {
                let outcome = this.execute(&command, image).await;
                this.finish(command, outcome).await;
            })
            .detach();
        None
    }

    /// Caches the signed result (a resent CALL gets it again) and sends it to the waiters
    /// of this session. A result waits for room in the outbox rather than being dropped
    /// when heartbeats and events have filled it: the caller would otherwise wait for an
    /// answer that never comes.
    async fn finish(&self, command: SignedCommand, outcome: Outcome) {
        let key = (command.signer, command.command.request_id);
        let result = SignedResult::sign(&self.device, &command.command, outcome);
        self.results.borrow_mut().insert(key.0, result.clone());
        let waiters = self.inflight.borrow_mut().remove(&key).unwrap_or_default();
        let epoch = self.epoch.get();
        for (e, request) in waiters {
            if e == epoch {
                let sent = self
                    .send_wait(&Message::Result(CallResult {
                        request,
                        result: result.clone(),
                    }))
                    .await;
                if !sent {
                    tracing::info!(
                        request,
                        "session gone before the result was sent; kept for a resend"
                    );
                }
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
                let image = match image {
                    Some(Ok((sha, Source::Held(id)))) => Some(self.held(a, sha, &id).await),
                    Some(Ok((sha, Source::Transfer(e)))) => Some(Ok((sha, e))),
                    Some(Err(e)) => Some(Err(e)),
                    None => None,
                };
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
                let req = Request::Deploy {
                    manifest_toml: a.manifest_toml.to_string(),
                    dir: dir.map(|d| d.to_string_lossy().into_owned()),
                };
                let r = agent.handle(req, &no_events()).await;
                if let Some(sha) = sha {
                    self.images.borrow_mut().release(&sha);
                }
                from_api(r)
            }
            Args::Start(a) => {
                self.answer(Request::Start {
                    name: a.chute.to_string(),
                })
                .await
            }
            // The caller's grace period, capped at the agent's configured one (the
            // device owner's policy).
            Args::Stop(a) => {
                self.answer(Request::Stop {
                    name: a.chute.to_string(),
                    timeout_secs: Some(a.timeout_secs),
                })
                .await
            }
            Args::Restart(a) => {
                self.answer(Request::Restart {
                    name: a.chute.to_string(),
                })
                .await
            }
            Args::Remove(a) => {
                self.answer(Request::Remove {
                    name: a.chute.to_string(),
                })
                .await
            }
            Args::Inspect(a) => {
                self.answer(Request::Inspect {
                    name: a.chute.to_string(),
                })
                .await
            }
            Args::Status => {
                // A developer sees only the chutes its grant's patterns cover: other
                // tenants' names, images and states are not its business.
                let grant = &command.grant.grant;
                let mine: Vec<_> = agent
                    .list()
                    .into_iter()
                    .filter(|c| grant.covers_chute(c.name.as_str()))
                    .collect();
                let mut status = agent.status();
                status.chutes = u32::try_from(mine.len()).unwrap_or(u32::MAX);
                let (secs, state) = self.clock();
                status.clock = Some(chute_api::ClockStatus {
                    secs,
                    state: state.as_str().to_owned(),
                    time_floor: self.order.borrow().order().time_floor(),
                });
                ok_json(&DeviceStatus {
                    agent: status,
                    device_id: self.device.device_id().to_hex(),
                    chute_list: mine,
                })
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
                ok_json(&GrantInstalled {
                    developer: a.grant.grant.developer.to_hex(),
                    installed,
                    rights: a.grant.grant.rights.to_string(),
                })
            }
        }
    }

    /// An archive this chute loaded before: when its reference still resolves to the
    /// image it brought, a directory naming only the digest (nothing is transferred);
    /// otherwise the transfer after all.
    async fn held(
        &self,
        a: &proto::DeployArgs,
        sha: [u8; 32],
        id: &str,
    ) -> Result<([u8; 32], Expect), (ErrorCode, String)> {
        let reference = chutes::Manifest::from_toml_str(&a.manifest_toml)
            .map(|m| m.image)
            .unwrap_or_default();
        let here = self.agent.runtime.image_id(&reference).await.ok();
        if here.as_deref() == Some(id) {
            match self.images.borrow().held_dir(&sha) {
                Ok(dir) => {
                    tracing::info!(image = %proto::hex_encode(&sha), "image archive already loaded; nothing to transfer");
                    return Ok((sha, Expect::Ready(dir)));
                }
                Err(e) => tracing::warn!(error = %e, "cannot note a held image; transferring it"),
            }
        }
        self.images
            .borrow_mut()
            .expect(sha, a.image_size)
            .map(|e| (sha, e))
    }

    async fn wait_image(
        &self,
        sha: [u8; 32],
        rx: super::images::Waiter,
    ) -> Result<std::path::PathBuf, (ErrorCode, String)> {
        let stall = self.cfg.transfer_stall;
        loop {
            let got = crate::timeout::with_timeout(stall / 4, rx.recv()).await;
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

    /// A request without events, answered as a signed outcome.
    async fn answer(&self, req: Request) -> Outcome {
        from_api(self.agent.handle(req, &no_events()).await)
    }

    /// Past output (bounded by `tail` and the payload cap); with `follow`, a subscription
    /// whose batches are published until the cloud unsubscribes or the session ends.
    /// Both through `Agent::handle`'s log stream, like the local `chuted logs`.
    async fn logs(self: &Rc<Self>, chute: &ChuteName, tail: u32, follow: bool) -> Outcome {
        // Refuse an unknown chute or one without a container before subscribing.
        let name = match self.agent.view(chute.as_str()) {
            Ok(v) if v.borrow().container_id.is_none() => {
                return failed(
                    ErrorCode::NoSuchChute,
                    &format!("chute `{chute}` has no container"),
                )
            }
            Ok(v) => v.borrow().manifest.name.clone(),
            Err(e) => {
                let e = ApiError::from(e);
                return failed(wire_code(e.code), &e.message);
            }
        };
        let mut lines: Vec<LogLine> = Vec::new();
        if tail > 0 {
            let (tx, rx) = smol::channel::bounded::<Event>(64);
            let req = Request::Logs {
                name: chute.to_string(),
                follow: false,
                tail: Some(tail.min(10_000)),
            };
            let agent = self.agent.clone();
            let answer = async move { agent.handle(req, &tx).await };
            let mut budget = MAX_PAYLOAD / 2;
            let collect = async {
                while let Ok(ev) = rx.recv().await {
                    let Event::Log(l) = ev else { continue };
                    for piece in wire_pieces(&l.line) {
                        if budget > piece.len() + 32 {
                            budget -= piece.len() + 32;
                            lines.push(LogLine {
                                stream: l.stream,
                                line: piece.to_owned(),
                            });
                        }
                    }
                }
            };
            if let (Err(e), ()) = futures_lite::future::zip(answer, collect).await {
                return failed(wire_code(e.code), &e.message);
            }
        }
        let subscription = follow.then(|| self.subscribe_logs(chute.clone()));
        ok_json(&LogBatch {
            chute: name,
            lines,
            subscription,
        })
    }

    fn subscribe_logs(self: &Rc<Self>, chute: ChuteName) -> u64 {
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
                let (tx, rx) = smol::channel::bounded::<Event>(64);
                let req = Request::Logs {
                    name: name1.to_string(),
                    follow: true,
                    tail: Some(0),
                };
                let agent = this.agent.clone();
                let follow = async move { agent.handle(req, &tx).await };
                let wire = |s| match s {
                    chute_api::LogStream::Stdout => LogStream::Stdout,
                    chute_api::LogStream::Stderr => LogStream::Stderr,
                };
                let fill = async {
                    while let Ok(ev) = rx.recv().await {
                        let Event::Log(l) = ev else { continue };
                        let ts = super::unix_now().saturating_mul(1000);
                        for piece in wire_pieces(&l.line) {
                            r1.borrow_mut().push(ts, wire(l.stream), piece);
                        }
                        let _ = bell_tx.try_send(());
                    }
                };
                if let (Err(e), ()) = futures_lite::future::zip(follow, fill).await {
                    tracing::warn!(chute = %name1, error = %e, "cannot follow logs");
                }
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
