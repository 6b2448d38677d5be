//! The agent's cloud link against a test peer built on `proto`, over a real websocket
//! on 127.0.0.1, with a real agent and real Podman: signed commands run, bad ones are
//! refused without changing anything, the link survives the peer going away, and
//! replays stay refused across an agent restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use e2e::peer::*;
use e2e::*;
use proto::{
    Args, BoundedBytes, BoundedString, ChunkAck, ChuteArgs, ChuteName, ChuteState, Command,
    DeployArgs, DeviceId, ErrorCode, Keypair, LogsArgs, Message, Outcome, Procedure, Publication,
    Rights, SignedCommand, Subscribe, Topic, TopicKind, Unsubscribe,
};

const T: Duration = Duration::from_secs(60);

struct Cloudy {
    w: World,
    peer: Peer,
    s: Session,
    dev: Developer,
}

fn setup(extra_config: &str, extra_run: &[&str]) -> Cloudy {
    setup_with(extra_config, extra_run, |_| Peer::bind())
}

fn setup_with(
    extra_config: &str,
    extra_run: &[&str],
    make_peer: impl FnOnce(&World) -> Peer,
) -> Cloudy {
    let mut w = World::new(&small_pools_config(&format!(
        "heartbeat_secs = 1\nsample_secs = 1\n{extra_config}"
    )));
    let owner = Keypair::generate().unwrap();
    let state = w.state_dir.to_str().unwrap().to_owned();
    w.cli(&[
        "trust",
        "--state-dir",
        &state,
        "--owner-key",
        &owner.public_hex(),
    ]);
    let id = w.cli(&["id", "--state-dir", &state]);
    let device_id = id
        .lines()
        .find_map(|l| l.strip_prefix("device_id "))
        .expect("`chuted id` prints device_id")
        .trim()
        .to_owned();
    let mut peer = make_peer(&w);
    w.run_args = vec!["--cloud".into(), peer.url()];
    w.run_args.extend(extra_run.iter().map(|s| s.to_string()));
    w.start_agent();
    let s = peer.accept(T, 0);
    assert_eq!(
        s.device_id().to_hex(),
        device_id,
        "HELLO carries the key `chuted id` printed"
    );
    let dev = Developer::new(owner, s.device_id());
    Cloudy { w, peer, s, dev }
}

fn name(s: &str) -> ChuteName {
    ChuteName::new(s).unwrap()
}

/// The test image by content (`NAME@sha256:DIGEST`): a cloud deploy without an archive
/// must pin its image so.
fn pinned_image() -> String {
    let digest = podman_ok(&["image", "inspect", "--format", "{{.Digest}}", IMAGE]);
    let repo = IMAGE.rsplit_once(':').unwrap().0;
    format!("{repo}@{}", digest.trim())
}

fn manifest_with(chute: &str, image: &str) -> String {
    format!(
        "name = \"{chute}\"\nversion = \"1\"\nimage = \"{image}\"\n\
         command = [\"sh\", \"-c\", \"while true; do echo tick; sleep 1; done\"]\n\
         [resources]\ncpu = 0.2\nmemory = \"32MiB\"\npids = 32\n"
    )
}

fn manifest(chute: &str) -> String {
    manifest_with(chute, &pinned_image())
}

/// A deploy of `chute`: from an archive of the test image (its own tag) when `image`
/// is given, else the test image by digest.
fn deploy_args(chute: &str, image: Option<([u8; 32], u64)>) -> Args {
    let toml = match image {
        Some(_) => manifest_with(chute, IMAGE),
        None => manifest(chute),
    };
    Args::Deploy(DeployArgs {
        chute: name(chute),
        manifest_toml: BoundedString::new(toml).unwrap(),
        image_sha256: image.map(|i| i.0),
        image_size: image.map_or(0, |i| i.1),
    })
}

fn chute_args(chute: &str) -> ChuteArgs {
    ChuteArgs { chute: name(chute) }
}

/// What must not change when a command is refused: the agent's view and Podman's.
fn observable(w: &World) -> (Vec<ChuteSummary>, String) {
    let list = w.list();
    let ps = podman_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=chuted.instance={}", w.instance),
        "--format",
        "{{.ID}}",
    ]);
    // Status and start time: a restart, stop or recreation shows in one of them.
    let detail: Vec<String> = ps
        .lines()
        .map(|id| {
            podman_ok(&[
                "inspect",
                "-f",
                "{{.Id}} {{.Name}} {{.State.Status}} {{.State.StartedAt}} {{.Created}}",
                id,
            ])
        })
        .collect();
    (list, detail.join("\n"))
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn signed_deploy_runs_a_chute_and_is_reported() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);

    let cmd = c.dev.sign(deploy_args(&chute, None));
    let reply = c.s.call(1, &cmd, T);
    let Reply::Result(result) = &reply else {
        panic!("{reply:?}")
    };
    result
        .verify(&c.s.hello.pubkey, &cmd.command)
        .expect("results are signed by the device key");
    let deployed: DeployResult = reply.ok();
    assert_eq!(
        deployed.chute.state,
        chute_api::ChuteState::Running,
        "{deployed:?}"
    );
    assert_eq!(deployed.outcome, DeployOutcome::Deployed);
    c.w.wait_state(&chute, chute_api::ChuteState::Running, T);
    let container = c.w.inspect(&chute).container_id.clone();

    // The cloud resends the same command: same signed result, no second execution.
    let again = c.s.call(2, &cmd, T);
    let Reply::Result(again) = again else {
        panic!("{again:?}")
    };
    assert_eq!(&again, result, "a resend gets the remembered result");
    assert_eq!(c.w.inspect(&chute).container_id, container);

    // Heartbeats report the chute with its usage.
    let start = Instant::now();
    loop {
        let hb = c.s.next_heartbeat(T);
        let mine = hb.chutes.iter().find(|u| u.name.as_str() == chute);
        if let Some(u) = mine {
            if u.state == ChuteState::Running && u.memory_bytes > 0 && u.pids > 0 {
                assert!(hb.resources.memory_free < hb.resources.memory_total);
                assert_eq!(hb.agent_version.as_str(), env!("CARGO_PKG_VERSION"));
                let frame = proto::encode(&Message::Publish(proto::Publish {
                    request: 1,
                    publication: Publication::Heartbeat(hb.clone()),
                }))
                .unwrap();
                println!(
                    "real heartbeat with {} chute(s): {} bytes per frame",
                    hb.chutes.len(),
                    frame.len()
                );
                break;
            }
        }
        assert!(
            start.elapsed() < T,
            "no heartbeat shows {chute} running with usage: {hb:?}"
        );
    }

    let v: ChuteDetail =
        c.s.call(3, &c.dev.sign(Args::Inspect(chute_args(&chute))), T)
            .ok();
    assert_eq!(v.name.as_str(), chute.as_str());
    let v: chute_api::DeviceStatus = c.s.call(4, &c.dev.sign(Args::Status), T).ok();
    assert_eq!(v.device_id, c.s.device_id().to_hex());
    assert!(v.chute_list.iter().any(|s| s.name.as_str() == chute));

    // Logs stream only while subscribed.
    let logs = c.dev.sign(Args::Logs(LogsArgs {
        chute: name(&chute),
        tail: 3,
        follow: true,
    }));
    let v: chute_api::LogBatch = c.s.call(5, &logs, T).ok();
    let sub = v.subscription.expect("follow gives a subscription");
    assert!(v.lines.iter().any(|l| l.line == "tick"), "{v:?}");
    c.s.wait_for("a log batch", T, |m| {
        matches!(m, Message::Publish(p) if matches!(&p.publication,
            Publication::Logs(b) if b.chute.as_str() == chute && b.lines.iter().any(|l| l.text.as_str() == "tick")))
    });
    c.s.send(&Message::Unsubscribe(Unsubscribe {
        request: 6,
        subscription: sub,
    }));
    c.s.wait_for(
        "UNSUBSCRIBED",
        T,
        |m| matches!(m, Message::Unsubscribed(u) if u.request == 6),
    );
    // Anything already in flight drains; after that, silence.
    let quiet_from = Instant::now() + Duration::from_millis(1500);
    while let Some(m) = c.s.recv(Duration::from_secs(4)) {
        if Instant::now() > quiet_from {
            assert!(
                !matches!(&m, Message::Publish(p) if matches!(p.publication, Publication::Logs(_))),
                "logs kept streaming after UNSUBSCRIBE: {m:?}"
            );
        }
        if Instant::now() > quiet_from + Duration::from_secs(3) {
            break;
        }
    }

    // Stop and remove through the cloud too; state changes are published.
    let stop = Args::Stop(proto::StopArgs {
        chute: name(&chute),
        timeout_secs: 1,
    });
    c.s.call(7, &c.dev.sign(stop), T).ok_json();
    c.s.wait_for("STATE stopped", T, |m| {
        matches!(m, Message::Publish(p) if matches!(&p.publication,
            Publication::State(s) if s.chute.as_str() == chute && s.state == ChuteState::Stopped))
    });
    c.s.call(8, &c.dev.sign(Args::Remove(chute_args(&chute))), T)
        .ok_json();
    c.s.wait_for("STATE dead", T, |m| {
        matches!(m, Message::Publish(p) if matches!(&p.publication,
            Publication::State(s) if s.chute.as_str() == chute && s.state == ChuteState::Dead))
    });
    assert!(c.w.list().is_empty());
}

fn expect_refused(s: &mut Session, request: u64, frame: Vec<u8>, code: ErrorCode, what: &str) {
    s.send_raw(frame);
    let e = s.reply(request, T);
    let e = e.error();
    assert_eq!(e.code, code, "{what}: {} {}", e.code, e.message);
    assert!(!e.message.is_empty(), "{what}: the refusal explains itself");
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn bad_commands_are_refused_and_change_nothing() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    c.s.call(1, &c.dev.sign(deploy_args(&chute, None)), T)
        .ok_json();
    c.w.wait_state(&chute, chute_api::ChuteState::Running, T);
    let before = observable(&c.w);
    let remove = Args::Remove(chute_args(&chute));
    let now = unix_now();

    // Frames that are not a message at all: an ERROR, not tied to a request.
    for (what, frame, code) in [
        (
            "garbage",
            vec![0xde, 0xad, 0xbe, 0xef],
            ErrorCode::UnsupportedVersion,
        ),
        (
            "an unknown message type",
            vec![proto::VERSION, 0x77, 1, 2, 3],
            ErrorCode::Malformed,
        ),
    ] {
        c.s.send_raw(frame);
        let m = c.s.wait_for(&format!("ERROR for {what}"), T, |m| {
            matches!(m, Message::Error(_))
        });
        let Message::Error(e) = m else { unreachable!() };
        assert_eq!(e.code, code, "{what}: {}", e.message);
    }

    // Signed commands and broken CALLs, each refused before anything runs. Built first
    // (the developer signs with fresh request ids), then sent in order.
    let valid = c.dev.sign(remove.clone());
    let truncated = call_frame(11, &valid);
    let truncated = truncated[..truncated.len() / 2].to_vec();
    // Unknown procedure: patch the procedure byte of a valid CALL.
    let mut unknown_procedure = call_frame(12, &valid);
    let varint = |v: u64| ((64 - v.leading_zeros()).max(1) as usize).div_ceil(7);
    let cmd = &valid.command;
    let pos = 2
        + varint(12)
        + 8
        + varint(cmd.request_id)
        + varint(cmd.issued_at)
        + varint(cmd.expires_at);
    assert_eq!(unknown_procedure[pos], Procedure::Remove.code());
    unknown_procedure[pos] = 99;
    // A signature byte flipped; arguments changed after signing.
    let mut forged = c.dev.sign(remove.clone());
    forged.signature.0[0] ^= 1;
    let mut edited = c.dev.sign(Args::Status);
    edited.command.args = remove.clone();
    // `remove`, signed by the developer after `change` to its command.
    let mut altered = |change: &dyn Fn(&mut Command)| {
        let base = c.dev.sign(remove.clone());
        let mut command = base.command.clone();
        change(&mut command);
        c.dev.resign(&base, command)
    };
    let expired = altered(&|cmd| {
        cmd.issued_at = now - 400;
        cmd.expires_at = now - 100;
    });
    let future = altered(&|cmd| {
        cmd.issued_at = now + 600;
        cmd.expires_at = now + 700;
    });
    let other_device = altered(&|cmd| cmd.device_id = DeviceId([9; 8]));
    let no_remove = c.dev.sign_with(
        remove.clone(),
        Rights::of(&[Procedure::Start, Procedure::Stop]),
        &["cl-*"],
    );
    let other_prefix = c.dev.sign_with(remove.clone(), Rights::all(), &["zzz-"]);
    // A grant the owner never signed (the developer granted itself everything).
    let mut self_granted = c.dev.sign(remove.clone());
    self_granted.grant =
        proto::testkit::grant_for(&c.dev.key, Rights::all(), &["cl-*"], now).sign(&c.dev.key);
    let self_granted = c.dev.resign(&self_granted, self_granted.command.clone());
    // A stranger's signature under the developer's grant.
    let base = c.dev.sign(remove.clone());
    let stranger = SignedCommand::sign(
        base.command.clone(),
        &Keypair::generate().unwrap(),
        base.grant.clone(),
    );
    // A request id already used (by a status that ran), now carrying another command.
    let status = c.dev.sign(Args::Status);
    c.s.call(22, &status, T).ok_json();
    let replay = c.dev.resign(
        &status,
        Command {
            args: remove.clone(),
            ..status.command.clone()
        },
    );
    expect_refused(&mut c.s, 11, truncated, ErrorCode::Malformed, "truncated");
    let code = ErrorCode::NoSuchProcedure;
    expect_refused(&mut c.s, 12, unknown_procedure, code, "unknown procedure");
    let cases: [(&str, &SignedCommand, ErrorCode); 10] = [
        ("forged", &forged, ErrorCode::InvalidSignature),
        ("edited after signing", &edited, ErrorCode::InvalidSignature),
        ("expired", &expired, ErrorCode::Expired),
        ("issued in the future", &future, ErrorCode::NotYetValid),
        ("another device", &other_device, ErrorCode::WrongDevice),
        ("ungranted procedure", &no_remove, ErrorCode::NotAuthorized),
        ("ungranted chute", &other_prefix, ErrorCode::NotAuthorized),
        ("self-granted", &self_granted, ErrorCode::InvalidGrant),
        ("a stranger's signature", &stranger, ErrorCode::InvalidGrant),
        ("replayed id", &replay, ErrorCode::Replayed),
    ];
    for (request, (what, cmd, code)) in (30u64..).zip(cases) {
        expect_refused(&mut c.s, request, call_frame(request, cmd), code, what);
    }
    // Unsigned subscriptions are not a way around the `logs` right.
    c.s.send(&Message::Subscribe(Subscribe {
        request: 24,
        topic: Topic {
            device: None,
            kind: TopicKind::Logs(Some(name(&chute))),
        },
    }));
    assert_eq!(c.s.reply(24, T).error().code, ErrorCode::NotAuthorized);
    // Signed, but the manifest names another chute than the (granted) one.
    let mut lying = match deploy_args(&chute, None) {
        Args::Deploy(a) => a,
        _ => unreachable!(),
    };
    lying.chute = name(&format!("{chute}-x"));
    let lying = c.dev.sign(Args::Deploy(lying));
    match c.s.call(25, &lying, T) {
        Reply::Result(r) => assert!(
            matches!(
                r.outcome,
                Outcome::Err {
                    code: ErrorCode::InvalidManifest,
                    ..
                }
            ),
            "{:?}",
            r.outcome
        ),
        Reply::Error(e) => panic!("{e:?}"),
    }
    assert_eq!(
        observable(&c.w),
        before,
        "refused commands changed the device"
    );

    // Protocol abuse closes the session; the agent comes back, at its backoff.
    c.s.send_text("{\"op\": \"remove\"}");
    c.s.wait_for(
        "ABORT after a text frame",
        T,
        |m| matches!(m, Message::Abort(a) if a.code == ErrorCode::ProtocolViolation),
    );
    c.s.wait_closed(T);
    let closed = Instant::now();
    let mut s2 = c.peer.accept(T, 0);
    let gap1 = closed.elapsed();
    s2.send_abusive(vec![0u8; proto::MAX_FRAME + 1]);
    s2.wait_closed(T);
    let closed = Instant::now();
    let mut s3 = c.peer.accept(T, 0);
    let gap2 = closed.elapsed();
    println!("reconnect after abuse: {gap1:?}, then {gap2:?}");
    assert!(
        gap1 >= Duration::from_millis(400),
        "reconnected after {gap1:?}: no backoff"
    );
    assert!(
        gap2 >= Duration::from_millis(900),
        "backoff did not grow after repeated abuse: {gap2:?}"
    );
    assert_eq!(
        observable(&c.w),
        before,
        "protocol abuse changed the device"
    );
    s3.call(30, &c.dev.sign(Args::Status), T).ok_json();
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn heartbeats_resume_after_the_peer_comes_back() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    c.s.call(1, &c.dev.sign(deploy_args(&chute, None)), T)
        .ok_json();
    let seq = c.s.next_heartbeat(T).seq;
    let port = c.peer.port;
    drop(c.s);
    drop(c.peer);

    // Offline: chutes and the local CLI carry on.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(c.w.state(&chute), chute_api::ChuteState::Running);
    c.w.cli(&["status"]);
    let attempts = c.w.agent_log().matches("cloud link down").count()
        + c.w.agent_log().matches("cloud still unreachable").count();
    assert!(
        attempts <= 4,
        "{attempts} connection attempts in 3 s: not backing off"
    );

    let mut peer = Peer::bind_port(port);
    let back = Instant::now();
    let mut s = peer.accept(Duration::from_secs(90), 0);
    let reconnect = back.elapsed();
    let hb = s.next_heartbeat(T);
    println!(
        "reconnect after the peer returned: {} ms",
        reconnect.as_millis()
    );
    assert!(
        hb.seq > seq,
        "heartbeat sequence continues ({} after {seq})",
        hb.seq
    );
    assert!(hb
        .chutes
        .iter()
        .any(|u| u.name.as_str() == chute && u.state == ChuteState::Running));
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn replays_are_refused_after_an_agent_restart() {
    let mut c = setup("", &[]);
    let status = c.dev.sign(Args::Status);
    c.s.call(1, &status, T).ok_json();
    let key = c.w.state_dir.join("device.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "device key mode {mode:o}");
    let device = c.s.hello.pubkey;

    c.w.kill_agent();
    drop(c.s);
    c.w.start_agent();
    let mut s = c.peer.accept(T, 0);
    assert_eq!(s.hello.pubkey, device, "the device key survives restarts");
    let e = s.call(2, &status, T);
    assert_eq!(
        e.error().code,
        ErrorCode::Replayed,
        "{:?}",
        e.error().message
    );
    s.call(3, &c.dev.sign(Args::Status), T).ok_json();
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_silent_peer_is_detected_and_replaced() {
    let mut c = setup("", &["--cloud-keepalive-secs", "2"]);
    // Stop reading: no pongs, no anything. The agent must notice within
    // keepalive + dead_after (2 s + 2 s) plus its backoff.
    let started = Instant::now();
    let mut s2 = c.peer.accept(Duration::from_secs(30), 0);
    println!("silent peer replaced after {:?}", started.elapsed());
    s2.next_heartbeat(T);
    drop(c.s);
}

/// An image archive as the cloud sends it: the bytes, their digest, CHUNK frames.
struct Archive {
    data: Vec<u8>,
    sha: [u8; 32],
}

impl Archive {
    /// The test image, saved by Podman.
    fn of_test_image(w: &World) -> Archive {
        let tar = w.dir.join("image.tar");
        podman_ok(&[
            "save",
            "--format",
            "docker-archive",
            "-o",
            tar.to_str().unwrap(),
            IMAGE,
        ]);
        let data = std::fs::read(&tar).unwrap();
        let sha = {
            use sha2::Digest;
            sha2::Sha256::digest(&data).into()
        };
        Archive { data, sha }
    }

    fn total(&self) -> u64 {
        self.data.len() as u64
    }

    /// The same digest over bytes with one of them flipped.
    fn corrupted(&self) -> Archive {
        let mut data = self.data.clone();
        data[self.data.len() / 3] ^= 0xff;
        Archive {
            data,
            sha: self.sha,
        }
    }

    fn is_ack(&self, m: &Message) -> bool {
        matches!(m, Message::ChunkAck(a) if a.image_sha256 == self.sha)
    }

    /// Sends `len` bytes from `offset`; the agent's answer, an ack or an ERROR.
    fn send(&self, s: &mut Session, offset: usize, len: usize) -> Message {
        let end = (offset + len).min(self.data.len());
        s.send(&Message::Chunk(proto::Chunk {
            image_sha256: self.sha,
            total_size: self.total(),
            offset: offset as u64,
            data: BoundedBytes::new(self.data[offset..end].to_vec()).unwrap(),
        }));
        s.wait_for("ack or error", T, |m| {
            self.is_ack(m) || matches!(m, Message::Error(_))
        })
    }

    /// Sends a chunk that must be acknowledged.
    fn ack(&self, s: &mut Session, offset: usize, len: usize) -> ChunkAck {
        match self.send(s, offset, len) {
            Message::ChunkAck(a) => a,
            other => panic!("chunk at {offset} refused: {other:?}"),
        }
    }

    /// Sends the rest from `offset` on; the last ack.
    fn finish(&self, s: &mut Session, mut offset: usize, piece: usize) -> ChunkAck {
        loop {
            let a = self.ack(s, offset, piece);
            offset = a.next_offset as usize;
            if offset >= self.data.len() {
                return a;
            }
        }
    }
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn image_archive_deploy_resumes_after_link_loss_and_is_verified() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    let archive = Archive::of_test_image(&c.w);
    let (sha, total) = (archive.sha, archive.total());
    let ack_of = |m: &Message| archive.is_ack(m);

    // Chunks for an image no verified deploy asked for are refused.
    let Message::Error(e) = archive.send(&mut c.s, 0, 1000) else {
        panic!("an unasked chunk was acknowledged")
    };
    assert_eq!(e.code, ErrorCode::ProtocolViolation);

    let cmd = c.dev.sign(deploy_args(&chute, Some((sha, total))));
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 1,
        command: cmd.clone(),
    })));
    let Message::ChunkAck(ChunkAck { next_offset: 0, .. }) = c.s.wait_for("first ack", T, ack_of)
    else {
        panic!("the transfer starts at 0")
    };
    const PIECE: usize = 128 * 1024;
    let mut off = 0;
    while off < archive.data.len() / 2 {
        off = archive.ack(&mut c.s, off, PIECE).next_offset as usize;
    }
    // The link drops mid-transfer; on the next session the agent says where to resume.
    drop(c.s);
    let mut s = c.peer.accept(T, 0);
    let Message::ChunkAck(ack) = s.wait_for("resume ack", T, ack_of) else {
        unreachable!()
    };
    assert_eq!(
        ack.next_offset as usize, off,
        "resumes after the bytes it holds"
    );
    let last = archive.finish(&mut s, off, PIECE);
    assert!(last.complete, "the last ack reports the verified archive");
    // The original request belonged to the old session: the cloud resends the CALL
    // and gets the one result (the deploy ran once).
    let v: DeployResult = s.call(2, &cmd, Duration::from_secs(120)).ok();
    assert_eq!(v.chute.state, chute_api::ChuteState::Running, "{v:?}");
    c.w.wait_state(&chute, chute_api::ChuteState::Running, T);

    // A corrupted archive is refused at the end and deploys nothing.
    let before = observable(&c.w);
    let other = unique("cl-");
    c.w.track(&other);
    let bad = c.dev.sign(deploy_args(&other, Some((sha, total))));
    s.send(&Message::Call(Box::new(proto::Call {
        request: 3,
        command: bad,
    })));
    s.wait_for("first ack", T, ack_of);
    let corrupt = archive.corrupted();
    let mut off = 0;
    let mut refused = None;
    while off < corrupt.data.len() {
        match corrupt.send(&mut s, off, PIECE) {
            Message::ChunkAck(a) => off = a.next_offset as usize,
            Message::Error(e) => {
                refused = Some(e);
                break;
            }
            _ => unreachable!(),
        }
    }
    let e = refused.expect("a corrupted archive is refused");
    assert_eq!(e.code, ErrorCode::DigestMismatch, "{}", e.message);
    match s.reply(3, T) {
        Reply::Result(r) => assert!(
            matches!(
                r.outcome,
                Outcome::Err {
                    code: ErrorCode::DigestMismatch,
                    ..
                }
            ),
            "{:?}",
            r.outcome
        ),
        Reply::Error(e) => panic!("{e:?}"),
    }
    assert_eq!(observable(&c.w), before);
}

/// The reply to `request`, failing if the agent asks for archive `sha` on the way.
fn reply_without_transfer(s: &mut Session, request: u64, sha: [u8; 32]) -> Reply {
    let start = Instant::now();
    loop {
        match s.recv(T) {
            Some(Message::ChunkAck(a)) if a.image_sha256 == sha => {
                panic!("the agent asked for an archive it already loaded: {a:?}")
            }
            Some(Message::Result(r)) if r.request == request => return Reply::Result(r.result),
            Some(Message::Error(e)) if e.request == request => return Reply::Error(e),
            _ => assert!(start.elapsed() < T, "no reply to request {request}"),
        }
    }
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn an_archive_the_chute_already_loaded_is_not_sent_again_unless_its_image_is_gone() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    // A tag of its own: untagging it below touches no other test's image.
    let own = format!("localhost/{}:1", unique("held-"));
    podman_ok(&["tag", IMAGE, &own]);
    let tar = c.w.dir.join("held.tar");
    podman_ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        tar.to_str().unwrap(),
        &own,
    ]);
    let data = std::fs::read(&tar).unwrap();
    let archive = Archive {
        sha: {
            use sha2::Digest;
            sha2::Sha256::digest(&data).into()
        },
        data,
    };
    let deploy = |dev: &mut Developer| {
        dev.sign(Args::Deploy(DeployArgs {
            chute: name(&chute),
            manifest_toml: BoundedString::new(manifest_with(&chute, &own)).unwrap(),
            image_sha256: Some(archive.sha),
            image_size: archive.total(),
        }))
    };
    let ack_of = |m: &Message| archive.is_ack(m);

    // First deploy: the archive crosses the link.
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 1,
        command: deploy(&mut c.dev),
    })));
    c.s.wait_for("first ack", T, ack_of);
    assert!(archive.finish(&mut c.s, 0, 256 * 1024).complete);
    let v: DeployResult = c.s.reply(1, T).ok();
    assert_eq!(v.chute.state, chute_api::ChuteState::Running, "{v:?}");

    // Again (a new signed command, same archive): not a byte is asked for.
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 2,
        command: deploy(&mut c.dev),
    })));
    let v: DeployResult = reply_without_transfer(&mut c.s, 2, archive.sha).ok();
    assert_eq!(v.chute.state, chute_api::ChuteState::Running, "{v:?}");
    assert!(c
        .w
        .agent_log()
        .contains("image archive already loaded; nothing to transfer"));

    // Once the reference no longer names that image, the archive is needed again.
    podman_ok(&["untag", &own, &own]);
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 3,
        command: deploy(&mut c.dev),
    })));
    let Message::ChunkAck(ChunkAck { next_offset: 0, .. }) = c.s.wait_for("an ack", T, ack_of)
    else {
        panic!("the transfer starts at 0")
    };
    assert!(archive.finish(&mut c.s, 0, 256 * 1024).complete);
    let v: DeployResult = c.s.reply(3, T).ok();
    assert_eq!(v.chute.state, chute_api::ChuteState::Running, "{v:?}");
    c.w.wait_state(&chute, chute_api::ChuteState::Running, T);
    let _ = podman(&["untag", &own, &own]);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn id_and_trust_commands() {
    let dir = std::env::temp_dir().join(unique("chuted-id-"));
    let run = |args: &[&str]| {
        let o = std::process::Command::new(chuted_bin())
            .args(args)
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let d = dir.to_str().unwrap();
    let (ok, first, _) = run(&["id", "--state-dir", d]);
    assert!(ok);
    let (_, second, _) = run(&["id", "--state-dir", d]);
    assert_eq!(first, second, "the identity is stable");
    let mode = std::fs::metadata(dir.join("device.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let key = std::fs::read_to_string(dir.join("device.key")).unwrap();
    assert!(
        !first.contains(key.trim()),
        "`chuted id` must not print the secret"
    );
    let (ok, _, err) = run(&["trust", "--state-dir", d, "--owner-key", "nothex"]);
    assert!(!ok && err.contains("owner key"), "{err}");
    let owner = Keypair::generate().unwrap().public_hex();
    let (ok, out, _) = run(&["trust", "--state-dir", d, "--owner-key", &owner]);
    assert!(ok && out.contains(&owner), "{out}");
    let mode = std::fs::metadata(dir.join("owner.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (ok, out, _) = run(&["selftest"]);
    assert!(ok && out.contains("selftest ok"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn wss_session_with_a_private_ca() {
    let certs = std::env::temp_dir().join(unique("chuted-tls-"));
    std::fs::create_dir_all(&certs).unwrap();
    let (ca, leaf, key) = make_certs(&certs);
    let ca_arg = ca.to_str().unwrap().to_owned();
    let mut c = setup_with("", &["--cloud-ca", &ca_arg], |_| {
        Peer::bind_tls(&leaf, &key)
    });
    assert!(c.peer.url().starts_with("wss://"));
    let v: chute_api::DeviceStatus = c.s.call(1, &c.dev.sign(Args::Status), T).ok();
    assert_eq!(v.device_id, c.s.device_id().to_hex());
    c.s.next_heartbeat(T);
    let _ = std::fs::remove_dir_all(&certs);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_newer_grant_installed_by_update_grant_revokes_the_older_one() {
    let mut c = setup("", &[]);
    c.s.call(1, &c.dev.sign(Args::Status), T).ok_json();
    // The owner's admin tool (its own developer key, granted update-grant) installs a
    // newer, empty grant for the developer.
    let mut admin = Developer::new(c.dev.owner.clone(), c.s.device_id());
    let now = unix_now();
    let mut revoke = proto::testkit::grant_for(&c.dev.key, Rights::NONE, &["cl-*"], now);
    revoke.issued_at = now - 10;
    let update = admin.sign(Args::UpdateGrant(proto::UpdateGrantArgs {
        grant: revoke.sign(&c.dev.owner),
    }));
    let v: chute_api::GrantInstalled = c.s.call(2, &update, T).ok();
    assert!(v.installed, "{v:?}");
    // A grant not signed by the owner is not installed.
    let forged_grant = proto::testkit::grant_for(&c.dev.key, Rights::all(), &["cl-*"], now + 5);
    let update = admin.sign(Args::UpdateGrant(proto::UpdateGrantArgs {
        grant: forged_grant.sign(&c.dev.key),
    }));
    match c.s.call(3, &update, T) {
        Reply::Result(r) => assert!(
            matches!(
                r.outcome,
                Outcome::Err {
                    code: ErrorCode::InvalidGrant,
                    ..
                }
            ),
            "{:?}",
            r.outcome
        ),
        Reply::Error(e) => panic!("{e:?}"),
    }
    // The developer's old grant (issued a day ago) no longer works.
    let e = c.s.call(4, &c.dev.sign(Args::Status), T);
    assert_eq!(
        e.error().code,
        ErrorCode::InvalidGrant,
        "{}",
        e.error().message
    );
    assert!(
        e.error().message.contains("superseded"),
        "{}",
        e.error().message
    );
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn image_transfer_resumes_after_an_agent_restart() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    let archive = Archive::of_test_image(&c.w);
    let (sha, total) = (archive.sha, archive.total());
    let ack_of = |m: &Message| archive.is_ack(m);
    const PIECE: usize = 100_000;
    let first = c.dev.sign(deploy_args(&chute, Some((sha, total))));
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 1,
        command: first,
    })));
    c.s.wait_for("first ack", T, ack_of);
    let mut held = 0;
    while held < archive.data.len() / 2 {
        held = archive.ack(&mut c.s, held, PIECE).next_offset as usize;
    }

    // The agent dies mid-transfer. Its deploy command is spent (replay window), so the
    // developer issues a new one for the same image: the bytes already on the device
    // are kept and the transfer resumes after them.
    c.w.kill_agent();
    drop(c.s);
    c.w.start_agent();
    let mut s = c.peer.accept(T, 0);
    let again = c.dev.sign(deploy_args(&chute, Some((sha, total))));
    s.send(&Message::Call(Box::new(proto::Call {
        request: 2,
        command: again,
    })));
    let Message::ChunkAck(ack) = s.wait_for("resume ack", T, ack_of) else {
        unreachable!()
    };
    assert_eq!(
        ack.next_offset as usize, held,
        "resumes after the bytes kept across the restart"
    );
    assert!(archive.finish(&mut s, held, PIECE).complete);
    let v: DeployResult = match s.reply(2, Duration::from_secs(120)) {
        r @ Reply::Result(_) => r.ok(),
        Reply::Error(e) => panic!("{e:?}"),
    };
    assert_eq!(v.chute.state, chute_api::ChuteState::Running, "{v:?}");
}

/// A developer holding a grant for exactly `chute` on the setup's device.
fn tenant(c: &Cloudy, chute: &str) -> Developer {
    let mut d = Developer::new(c.dev.owner.clone(), c.s.device_id());
    d.patterns = vec![chute.to_owned()];
    d
}

fn refused(reply: &Reply) -> (ErrorCode, String) {
    match reply {
        Reply::Error(e) => (e.code, e.message.to_string()),
        Reply::Result(r) => match &r.outcome {
            Outcome::Err { code, message } => (*code, message.to_string()),
            Outcome::Ok(_) => panic!("accepted: {reply:?}"),
        },
    }
}

#[test]
fn tenants_see_and_touch_only_their_own_chutes() {
    let mut c = setup("", &[]);
    let (a, b) = (unique("cl-"), unique("cl-"));
    c.w.track(&a);
    c.w.track(&b);
    let (mut dev_a, mut dev_b) = (tenant(&c, &a), tenant(&c, &b));
    c.s.call(1, &dev_a.sign(deploy_args(&a, None)), T).ok_json();
    c.s.call(2, &dev_b.sign(deploy_args(&b, None)), T).ok_json();
    c.w.wait_state(&a, e2e::ChuteState::Running, T);
    c.w.wait_state(&b, e2e::ChuteState::Running, T);
    // The container runs the image id pinned at deploy (the one its digest names).
    let pins = std::fs::read_to_string(c.w.state_dir.join("image-pins.json")).unwrap();
    let image = podman_ok(&["inspect", "-f", "{{.Image}}", &format!("chute-{a}")]);
    let by_digest = podman_ok(&["image", "inspect", "-f", "{{.Id}}", &pinned_image()]);
    assert_eq!(image, by_digest);
    assert!(pins.contains(&image) && pins.contains(&a), "{pins}");
    // Each developer's status lists its own chute only.
    for (req, dev, mine, theirs) in [(3, &mut dev_a, &a, &b), (4, &mut dev_b, &b, &a)] {
        let v = c.s.call(req, &dev.sign(Args::Status), T).ok_json();
        let names: Vec<&str> = v["chute_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, [mine.as_str()], "{v}");
        assert_eq!(v["chutes"], 1, "{v}");
        assert!(
            !v.to_string().contains(theirs.as_str()),
            "leaks {theirs}: {v}"
        );
    }
    // B cannot stop A's chute, nor reach it by a longer name under its own.
    let before = observable(&c.w);
    let (code, msg) = refused(&c.s.call(
        5,
        &dev_b.sign(Args::Stop(proto::StopArgs {
            chute: name(&a),
            timeout_secs: 1,
        })),
        T,
    ));
    assert_eq!(code, ErrorCode::NotAuthorized, "{msg}");
    assert!(msg.contains(&a), "{msg}");
    assert_eq!(
        observable(&c.w),
        before,
        "a refused command changed the device"
    );
}

#[test]
fn order_time_and_revocation_hold_across_restarts() {
    let mut c = setup("", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    let now = unix_now();
    // Deploy v2 (issued now), then the older v1 arrives late: refused as stale.
    let v2 = c.dev.sign(deploy_args(&chute, None));
    c.s.call(1, &v2, T).ok_json();
    c.w.wait_state(&chute, e2e::ChuteState::Running, T);
    let older = |c: &mut Cloudy, args: Args, issued_at: u64| {
        let base = c.dev.sign(args);
        let mut cmd = base.command.clone();
        cmd.issued_at = issued_at;
        cmd.expires_at = issued_at + 300;
        c.dev.resign(&base, cmd)
    };
    let v1 = older(
        &mut c,
        Args::Stop(proto::StopArgs {
            chute: name(&chute),
            timeout_secs: 1,
        }),
        now - 60,
    );
    let before = observable(&c.w);
    let (code, msg) = refused(&c.s.call(2, &v1, T));
    assert_eq!(code, ErrorCode::Stale, "{msg}");
    assert!(msg.contains("stale") && msg.contains(&chute), "{msg}");
    // Still stale after an agent restart.
    c.w.kill_agent();
    c.w.start_agent();
    c.s = c.peer.accept(T, 0);
    let v1b = older(&mut c, Args::Remove(chute_args(&chute)), now - 30);
    assert_eq!(refused(&c.s.call(3, &v1b, T)).0, ErrorCode::Stale);
    assert_eq!(
        observable(&c.w),
        before,
        "stale commands changed the device"
    );
    let v = c.s.call(4, &c.dev.sign(Args::Status), T).ok_json();
    assert_eq!(v["clock"]["state"], "ok", "{v}");
    assert_eq!(c.s.next_heartbeat(T).clock, proto::ClockState::Ok);

    // A command issued 50 s ahead (within the skew) raises the time floor past the
    // clock: the device reports it, and judges time from the floor.
    let ahead = older(&mut c, Args::Status, unix_now() + 50);
    c.s.call(5, &ahead, T).ok_json();
    let v = c.s.call(6, &c.dev.sign(Args::Status), T).ok_json();
    assert_eq!(v["clock"]["state"], "behind floor", "{v}");
    let hb = c.s.next_heartbeat(T);
    assert_eq!(hb.clock, proto::ClockState::BehindFloor);
    let local = c.w.status();
    assert_eq!(
        local.clock.as_ref().map(|c| c.state.as_str()),
        Some("behind floor"),
        "{local:?}"
    );
    assert!(hb.state_dir_bytes > 0);
    let base = c.dev.sign(Args::Status);
    let mut cmd = base.command.clone();
    cmd.issued_at = unix_now() - 280;
    cmd.expires_at = unix_now() + 20; // valid by the clock, expired at the floor
    let (code, msg) = refused(&c.s.call(7, &c.dev.resign(&base, cmd), T));
    assert_eq!(code, ErrorCode::Expired, "{msg}");
    assert!(
        msg.contains("device time is") && msg.contains("behind the time floor"),
        "{msg}"
    );

    // The owner revokes the developer locally while the agent runs.
    let state = c.w.state_dir.to_str().unwrap().to_owned();
    let dev_hex = c.dev.key.public_hex();
    let out =
        c.w.cli(&["revoke", "--state-dir", &state, "--developer", &dev_hex]);
    assert!(out.contains("revoked"), "{out}");
    let cmd = older(&mut c, Args::Status, unix_now() + 55);
    let (code, msg) = refused(&c.s.call(8, &cmd, T));
    assert_eq!(code, ErrorCode::InvalidGrant, "{msg}");
    assert!(msg.contains("superseded"), "{msg}");

    // A corrupt grant store refuses everything until the owner resets it.
    let store = c.w.state_dir.join("grants.bin");
    let mut bytes = std::fs::read(&store).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&store, bytes).unwrap();
    let mut other = Developer::new(c.dev.owner.clone(), c.s.device_id());
    let cmd = older(&mut c, Args::Status, unix_now() + 56);
    let (code, msg) = refused(&c.s.call(9, &cmd, T));
    assert_eq!(code, ErrorCode::GrantStoreUnavailable, "{msg}");
    assert!(
        msg.contains("grants.bin") && msg.contains("chuted revoke --all"),
        "{msg}"
    );
    let (code, _) = refused(&c.s.call(10, &other.sign(Args::Status), T));
    assert_eq!(
        code,
        ErrorCode::GrantStoreUnavailable,
        "every developer is refused"
    );
    let out = c.w.cli(&["revoke", "--state-dir", &state, "--all"]);
    assert!(out.contains("unreadable store was kept"), "{out}");
    // Old grants stay superseded; a grant the owner issues afterwards works.
    assert_eq!(
        refused(&c.s.call(11, &other.sign(Args::Status), T)).0,
        ErrorCode::InvalidGrant
    );
    let t = unix_now() + 58;
    let mut g = proto::testkit::grant_for(&other.key, Rights::all(), &["cl-*"], t);
    g.issued_at = t;
    let cmd = Command {
        device_id: c.s.device_id(),
        request_id: other.next_id(),
        issued_at: t,
        expires_at: t + 300,
        args: Args::Status,
        grant_digest: [0; 32],
    };
    let fresh = SignedCommand::sign(cmd, &other.key, g.sign(&c.dev.owner));
    c.s.call(12, &fresh, T).ok_json();

    // A peer sending endless bad signatures is cut off, not verified forever.
    for i in 0..40u64 {
        let mut forged = other.sign(Args::Status);
        forged.signature.0[0] ^= 1;
        // The agent closes mid-way; later writes may fail.
        c.s.send_abusive(call_frame(100 + i, &forged));
    }
    c.s.wait_closed(T);
    wait_until("the agent names why it closed", T, || {
        c.w.agent_log().contains("refused commands in one session")
    });
}

#[test]
fn images_are_pinned_by_content_and_archives_tag_only_their_chute() {
    let mut c = setup("allow_unpinned_images = false\n", &[]);
    let chute = unique("cl-");
    c.w.track(&chute);
    // Over the link, a plain tag is refused.
    let mut tagged = match deploy_args(&chute, None) {
        Args::Deploy(a) => a,
        _ => unreachable!(),
    };
    tagged.manifest_toml = BoundedString::new(manifest_with(&chute, IMAGE)).unwrap();
    let (code, msg) = refused(&c.s.call(1, &c.dev.sign(Args::Deploy(tagged)), T));
    assert_eq!(code, ErrorCode::InvalidManifest, "{msg}");
    assert!(
        msg.contains("mutable tag") && msg.contains("@sha256:"),
        "{msg}"
    );
    // Locally too, unless the owner opts out.
    let dir = c.w.chute_dir(&chute, "[\"sleep\", \"600\"]", "");
    let e = c.w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        e.contains("mutable tag") && e.contains("allow_unpinned_images"),
        "{e}"
    );
    // A host port outside the owner's range (default 1024-65535) is refused, named.
    let low = unique("cl-");
    let dir = c.w.chute_dir(
        &low,
        "[\"sleep\", \"600\"]",
        "[network]\nports = [\"80:8080/tcp\"]\n",
    );
    let e = c.w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        e.contains("host port 80") && e.contains("1024-65535"),
        "{e}"
    );

    // An archive that also tags another name is refused naming it, and never loaded.
    let foreign = format!("localhost/{}:1", unique("tenant-foreign-"));
    podman_ok(&["tag", IMAGE, &foreign]);
    let tar = c.w.dir.join("foreign.tar");
    podman_ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        tar.to_str().unwrap(),
        IMAGE,
        &foreign,
    ]);
    podman_ok(&["untag", IMAGE, &foreign]);
    let data = std::fs::read(&tar).unwrap();
    let archive = Archive {
        sha: {
            use sha2::Digest;
            sha2::Sha256::digest(&data).into()
        },
        data,
    };
    let deploy = c
        .dev
        .sign(deploy_args(&chute, Some((archive.sha, archive.total()))));
    c.s.send(&Message::Call(Box::new(proto::Call {
        request: 2,
        command: deploy,
    })));
    archive.finish(&mut c.s, 0, 256 * 1024);
    let (code, msg) = refused(&c.s.reply(2, T));
    assert!(
        msg.contains(&foreign) || msg.contains("images"),
        "{code}: {msg}"
    );
    let exists = podman(&["image", "exists", &foreign]);
    assert!(!exists.status.success(), "the foreign tag was applied");
    assert!(c.w.json(&["list"]).as_array().unwrap().is_empty());
}

/// Not a link test, but the tenancy one (issue 12): a chute in its own user namespace
/// (config `userns_base`) keeps its caps, shaping, logs and adoption by a restarted
/// agent. Prints deploy latency with and without it (`userns latency` lines).
#[test]
fn a_chute_in_its_own_user_namespace_keeps_caps_shaping_logs_and_adoption() {
    let chute_toml = |name: &str| {
        format!(
            "name = \"{name}\"\nversion = \"1\"\nimage = \"{IMAGE}\"\n\
             command = [\"sh\", \"-c\", \"while true; do echo tick; sleep 1; done\"]\n\
             [resources]\ncpu = 0.2\nmemory = \"32MiB\"\npids = 32\n\
             [network]\nbandwidth_down = \"8mbit\"\nbandwidth_up = \"4mbit\"\n"
        )
    };
    let mut timings = Vec::new();
    for base in [None, Some(1_300_000u32)] {
        let extra = base.map_or(String::new(), |b| format!("userns_base = {b}\n"));
        let mut w = World::new(&small_pools_config(&extra));
        w.start_agent();
        let name = unique("cl-u");
        let dir = w.chute_dir(&name, "[]", "");
        std::fs::write(dir.join("chute.toml"), chute_toml(&name)).unwrap();
        let t = Instant::now();
        w.deploy(&dir);
        let deploy = t.elapsed();
        w.wait_state(&name, e2e::ChuteState::Running, T);
        let t = Instant::now();
        for _ in 0..5 {
            w.cli(&["restart", &name]);
        }
        timings.push((base.is_some(), deploy, t.elapsed() / 5));
        let pid = w.container_pid(&name);
        let uid_map = std::fs::read_to_string(format!("/proc/{pid}/uid_map")).unwrap();
        let fields: Vec<&str> = uid_map.split_whitespace().collect();
        match base {
            Some(b) => assert_eq!(fields, ["0", &b.to_string(), "65536"], "{uid_map}"),
            None => assert_eq!(fields[..2], ["0", "0"], "{uid_map}"),
        }
        let Some(_) = base else { continue };
        // Caps, shaping and logs as without it.
        assert_eq!(
            cgroup_file(pid, "memory", "memory.limit_in_bytes"),
            (32u64 << 20).to_string()
        );
        assert_eq!(cgroup_file(pid, "pids", "pids.max"), "32");
        let v = w.inspect(&name);
        assert_eq!(
            v.net.as_ref().map(|n| n.down_rate_bps),
            Some(8_000_000),
            "{v:?}"
        );
        wait_until("log lines", T, || w.cli(&["logs", &name]).contains("tick"));
        // A restarted agent adopts it without restarting it.
        let started = w.started_at(&name);
        w.kill_agent();
        w.start_agent();
        w.wait_state(&name, e2e::ChuteState::Running, T);
        assert_eq!(w.started_at(&name), started, "adopted, not restarted");
        assert_eq!(w.container_pid(&name), pid);
        assert!(w.cli(&["logs", &name, "--tail", "5"]).contains("tick"));
    }
    for (userns, deploy, restart) in timings {
        println!(
            "userns latency: userns={userns}: deploy (create + start, first use of the range) {deploy:?}, restart (mean of 5) {restart:?}"
        );
    }
}
