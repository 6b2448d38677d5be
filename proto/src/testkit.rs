//! Deterministic keys and sample messages shared by the golden fixtures, the fuzz
//! corpus, the fuzz targets, the bench and peers' tests. Not for production keys: the
//! seeds are public.

use crate::bounded::{BoundedBytes, BoundedString, BoundedVec, ChuteName, ChutePattern};
use crate::code::ErrorCode;
use crate::command::{
    Args, ChuteArgs, Command, DeployArgs, Grant, Outcome, Procedure, Rights, SignedCommand,
    SignedResult,
};
use crate::keys::{DeviceId, Keypair};
use crate::message::*;
use crate::verify::{ReplayWindow, Verifier};

/// Fixed "now" of the fixtures (2023-11-14T22:13:20Z).
pub const NOW: u64 = 1_700_000_000;

pub fn owner() -> Keypair {
    Keypair::from_seed([1; 32])
}
pub fn developer() -> Keypair {
    Keypair::from_seed([2; 32])
}
pub fn device() -> Keypair {
    Keypair::from_seed([3; 32])
}
/// A key with no grant from the owner.
pub fn stranger() -> Keypair {
    Keypair::from_seed([4; 32])
}

fn name(s: &str) -> ChuteName {
    ChuteName::new(s).expect("fixture chute names are valid")
}

pub fn start_args(chute: &str) -> Args {
    Args::Start(ChuteArgs { chute: name(chute) })
}

pub fn deploy_args(chute: &str) -> Args {
    Args::Deploy(DeployArgs {
        chute: name(chute),
        manifest_toml: BoundedString::new(format!(
            "name = \"{chute}\"\nversion = \"1.0.0\"\nimage = \"localhost/{chute}:1\"\n"
        ))
        .expect("fixture manifest fits"),
        image_sha256: Some([0xab; 32]),
        image_size: 4_194_304,
    })
}

/// The owner's grant for `developer`: `rights` on chutes matched by `patterns` (exact
/// names or `prefix-*`), issued a day before `now`, valid for 30 days.
pub fn grant_for(developer: &Keypair, rights: Rights, patterns: &[&str], now: u64) -> Grant {
    Grant {
        developer: developer.public(),
        rights,
        chute_patterns: BoundedVec::new(
            patterns
                .iter()
                .map(|p| ChutePattern::new(*p).expect("fixture patterns are valid"))
                .collect(),
        )
        .expect("fixture pattern list fits"),
        devices: BoundedVec::default(),
        issued_at: now - 86_400,
        expires_at: now + 30 * 86_400,
    }
}

/// A command for `device_id` signed by `developer` under a grant from `owner` for all
/// procedures on the command's chute (by exact name) and on `test-*`, valid from `now`
/// for 5 minutes.
pub fn signed_command(
    owner: &Keypair,
    developer: &Keypair,
    device_id: DeviceId,
    request_id: u64,
    now: u64,
    args: Args,
) -> SignedCommand {
    let chute = args.chute().map(|c| c.to_string());
    let mut patterns = vec!["test-*"];
    patterns.extend(chute.as_deref());
    let grant = grant_for(developer, Rights::all(), &patterns, now).sign(owner);
    let command = Command {
        device_id,
        request_id,
        issued_at: now,
        expires_at: now + 300,
        args,
        grant_digest: [0; 32],
    };
    SignedCommand::sign(command, developer, grant)
}

/// The fixture deploy command (developer → device, granted pattern `hello-*`).
pub fn sample_command() -> SignedCommand {
    let dev = developer();
    let grant = grant_for(
        &dev,
        Rights::of(&[Procedure::Deploy, Procedure::Start, Procedure::Logs]),
        &["hello-*"],
        NOW,
    )
    .sign(&owner());
    let command = Command {
        device_id: device().device_id(),
        request_id: 42,
        issued_at: NOW,
        expires_at: NOW + 300,
        args: deploy_args("hello-web"),
        grant_digest: [0; 32],
    };
    SignedCommand::sign(command, &dev, grant)
}

pub fn sample_verifier() -> Verifier {
    Verifier::new(owner().public(), device().device_id())
}

fn text(s: &str) -> crate::Text {
    BoundedString::new(s).expect("fixture text fits")
}

fn short(s: &str) -> crate::ShortText {
    BoundedString::new(s).expect("fixture text fits")
}

/// A heartbeat with `n` chutes of plausible numbers.
pub fn heartbeat(n: usize) -> Heartbeat {
    let chutes = (0..n)
        .map(|i| ChuteUsage {
            name: name(&format!("chute-{i}")),
            state: ChuteState::Running,
            cpu_millicores: 120 + i as u32,
            memory_bytes: 23_456_789 + i as u64 * 1000,
            pids: 7,
            rx_bytes: 1_234_567_890,
            tx_bytes: 987_654_321,
            restarts: 0,
        })
        .collect();
    Heartbeat {
        seq: 1234,
        uptime_secs: 86_400 * 3,
        agent_version: short("0.1.0"),
        resources: Resources {
            cpu_millicores_total: 4000,
            cpu_millicores_free: 2500,
            memory_total: 1 << 30,
            memory_free: 600 << 20,
            pids_total: 4096,
            pids_free: 3900,
        },
        chutes: BoundedVec::new(chutes).expect("heartbeat fixture size within cap"),
        clock_secs: NOW,
        clock: crate::verify::ClockState::Ok,
        state_dir_bytes: 5_242_880,
    }
}

/// One sample of every message type, named for fixture files (`<name>.hex`).
pub fn sample_messages() -> Vec<(&'static str, Message)> {
    let dev = device();
    let challenge = Challenge {
        session_id: 7,
        nonce: [0x5a; 32],
    };
    let cmd = sample_command();
    let ok = SignedResult::sign(
        &dev,
        &cmd.command,
        Outcome::Ok(BoundedBytes::new(b"deployed".to_vec()).expect("fits")),
    );
    let err = SignedResult::sign(
        &dev,
        &cmd.command,
        Outcome::Err {
            code: ErrorCode::InsufficientResources,
            message: text("memory pool has 12 MiB free, chute wants 64 MiB"),
        },
    );
    vec![
        (
            "hello",
            Message::Hello(Hello {
                realm: short("default"),
                pubkey: dev.public(),
                agent_version: short("0.1.0"),
                auth_method: AuthMethod::Cryptosign,
            }),
        ),
        ("challenge", Message::Challenge(challenge.clone())),
        (
            "authenticate",
            Message::Authenticate(Authenticate::answer(&dev, "default", &challenge)),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                session_id: 7,
                heartbeat_secs: 30,
            }),
        ),
        (
            "abort",
            Message::Abort(Abort {
                code: ErrorCode::AuthenticationFailed,
                message: text("device 0123456789abcdef failed the challenge"),
            }),
        ),
        (
            "goodbye",
            Message::Goodbye(Goodbye {
                code: ErrorCode::SystemShutdown,
                message: text("agent restarting"),
            }),
        ),
        (
            "call",
            Message::Call(Box::new(Call {
                request: 9,
                command: cmd,
            })),
        ),
        (
            "result_ok",
            Message::Result(CallResult {
                request: 9,
                result: ok,
            }),
        ),
        (
            "result_err",
            Message::Result(CallResult {
                request: 9,
                result: err,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMsg {
                request_type: MessageType::Call.code(),
                request: 9,
                code: ErrorCode::Replayed,
                message: text("request 42 already used"),
            }),
        ),
        (
            "subscribe",
            Message::Subscribe(Subscribe {
                request: 10,
                topic: Topic {
                    device: Some(dev.device_id()),
                    kind: TopicKind::Logs(Some(name("hello-web"))),
                },
            }),
        ),
        (
            "subscribed",
            Message::Subscribed(Subscribed {
                request: 10,
                subscription: 77,
            }),
        ),
        (
            "unsubscribe",
            Message::Unsubscribe(Unsubscribe {
                request: 11,
                subscription: 77,
            }),
        ),
        (
            "unsubscribed",
            Message::Unsubscribed(Unsubscribed { request: 11 }),
        ),
        (
            "publish_heartbeat",
            Message::Publish(Publish {
                request: 12,
                publication: Publication::Heartbeat(heartbeat(2)),
            }),
        ),
        (
            "publish_logs",
            Message::Publish(Publish {
                request: 13,
                publication: Publication::Logs(LogBatch {
                    chute: name("hello-web"),
                    lines: BoundedVec::new(vec![
                        LogLine {
                            ts_ms: NOW * 1000 + 1,
                            stream: LogStream::Stdout,
                            text: BoundedString::new("listening on :8080").expect("fits"),
                        },
                        LogLine {
                            ts_ms: NOW * 1000 + 2,
                            stream: LogStream::Stderr,
                            text: BoundedString::new("warning: no TLS").expect("fits"),
                        },
                    ])
                    .expect("fits"),
                    dropped: 0,
                }),
            }),
        ),
        (
            "event_state",
            Message::Event(Event {
                subscription: 77,
                publication_id: 1001,
                device: dev.device_id(),
                publication: Publication::State(StateChange {
                    chute: name("hello-web"),
                    state: ChuteState::Running,
                    at: NOW,
                    detail: short("started by request 42"),
                }),
            }),
        ),
        (
            "chunk",
            Message::Chunk(Chunk {
                image_sha256: [0xab; 32],
                total_size: 4_194_304,
                offset: 524_288,
                data: BoundedBytes::new(vec![0x11; 64]).expect("fits"),
            }),
        ),
        (
            "chunk_ack",
            Message::ChunkAck(ChunkAck {
                image_sha256: [0xab; 32],
                next_offset: 524_352,
                complete: false,
            }),
        ),
    ]
}

/// Fuzz entry: decode arbitrary bytes, and if they decode, re-encode and decode again
/// (the round trip must be stable). Never panics unless the codec is broken.
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(msg) = decode(data) {
        let again = encode(&msg).expect("a decoded message re-encodes within the frame cap");
        assert_eq!(
            decode(&again).as_ref(),
            Ok(&msg),
            "round trip changed the message"
        );
    }
}

/// Fuzz entry: decode arbitrary bytes as a frame; run any CALL's command through the
/// fixture verifier twice (the second must be refused as a replay if the first passed;
/// a refusal must leave the window unchanged).
pub fn fuzz_verify(data: &[u8]) {
    let Ok(Message::Call(call)) = decode(data) else {
        return;
    };
    let verifier = sample_verifier();
    let mut window = ReplayWindow::new();
    let before = window.clone();
    match verifier.verify(&call.command, NOW, &mut window) {
        Ok(_) => {
            assert!(
                verifier.verify(&call.command, NOW, &mut window).is_err(),
                "a replay was accepted"
            );
        }
        Err(_) => assert_eq!(window, before, "a refusal changed the replay window"),
    }
}

/// Seeds for the `verify` fuzz target: the accepted sample CALL and one CALL per kind
/// of refusal, so the fuzzer starts next to every branch of the verifier.
pub fn verify_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let call = |name: &'static str, command: SignedCommand| {
        let frame = encode(&Message::Call(Box::new(Call {
            request: 1,
            command,
        })))
        .expect("seed encodes");
        (name, frame)
    };
    let (own, dev, device_id) = (owner(), developer(), device().device_id());
    let base = sample_command();
    let mut forged = base.clone();
    forged.command.request_id += 1;
    let resign = |mut cmd: Command, grant: crate::SignedGrant| {
        cmd.request_id += 100;
        SignedCommand::sign(cmd, &dev, grant)
    };
    let mut expired = base.command.clone();
    expired.issued_at = NOW - 400;
    expired.expires_at = NOW - 100;
    let mut future = base.command.clone();
    future.issued_at = NOW + 120;
    future.expires_at = NOW + 400;
    let mut wrong_device = base.command.clone();
    wrong_device.device_id = DeviceId([9; 8]);
    let mut old_grant = grant_for(&dev, Rights::all(), &["test-*"], NOW);
    old_grant.expires_at = NOW - 1;
    vec![
        call("accepted", base.clone()),
        call("forged", forged),
        call("expired", resign(expired, base.grant.clone())),
        call("future", resign(future, base.grant.clone())),
        call("wrong_device", resign(wrong_device, base.grant.clone())),
        call(
            "stranger",
            SignedCommand::sign(base.command.clone(), &stranger(), base.grant.clone()),
        ),
        call(
            "ungranted_procedure",
            resign(
                Command {
                    args: Args::Status,
                    ..base.command.clone()
                },
                base.grant.clone(),
            ),
        ),
        call(
            "ungranted_chute",
            resign(
                Command {
                    args: start_args("other"),
                    ..base.command.clone()
                },
                base.grant.clone(),
            ),
        ),
        call(
            "expired_grant",
            resign(base.command.clone(), old_grant.sign(&own)),
        ),
        call(
            "grant_not_by_owner",
            resign(
                base.command.clone(),
                grant_for(&dev, Rights::all(), &["test-*"], NOW).sign(&dev),
            ),
        ),
        call("grant_swapped", {
            let mut swapped = base.clone();
            swapped.grant = grant_for(&dev, Rights::all(), &["hello-*", "other-*"], NOW).sign(&own);
            swapped
        }),
        call(
            "status_all_rights",
            signed_command(&own, &dev, device_id, 7, NOW, Args::Status),
        ),
    ]
}
