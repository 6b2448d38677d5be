//! chute-cloud + chutectl end to end: a real chuted on real Podman, managed through a
//! real chute-cloud with the developer CLI, the way a fleet owner and a developer use
//! them. Needs `cargo build -p chuted -p chute-cloud -p chutectl` first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::fleet::{chute_with_image, grant_developer, identity, timeline, trust_owner, Cloud, Ctl};
use e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

#[test]
fn owner_admits_a_device_and_a_developer_pushes_a_chute_through_the_cloud() {
    let mut w = World::new(&small_pools_config("heartbeat_secs = 1\nsample_secs = 1\n"));
    let cloud = Cloud::start(&w.dir);
    let ctl = cloud.ctl(w.dir.join("home"));
    let owner_key = w.dir.join("owner.key");
    let dev_key = w.dir.join("dev.key");

    // The owner registers the fleet key and the device trusts it.
    let init = trust_owner(&w, &ctl, &owner_key);
    let owner_hex = init["owner_key"].as_str().unwrap();
    assert!(init["trust_command"].as_str().unwrap().contains(owner_hex));
    let device = identity(&w).device_id;

    // An unknown device appears pending, with a fingerprint the owner can compare.
    w.run_args = vec!["--cloud".into(), cloud.agent_url()];
    w.start_agent();
    wait_until("the device to appear pending", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["status"] == "pending")
    });
    let d = ctl.listed_device(&owner_key, &device).unwrap();
    assert_eq!(d["connected"], true, "{d}");
    assert!(
        device.starts_with(&d["fingerprint"].as_str().unwrap().replace('-', "")),
        "{d}"
    );
    for field in ["id", "status", "connected", "fingerprint", "last_heartbeat"] {
        assert!(d.get(field).is_some(), "device list lacks {field}: {d}");
    }

    // Accepted: heartbeats are recorded from then on.
    ctl.ok(&owner_key, &["device", "accept", &device]);
    wait_until("a heartbeat after acceptance", T, || {
        ctl.listed_device(&owner_key, &device).is_some_and(|d| {
            d["status"] == "accepted"
                && d["last_heartbeat"].is_i64()
                && d["agent_version"].is_string()
        })
    });
    // Its clock, as its heartbeats report it: this host's, so in step with the cloud's.
    let d = ctl.listed_device(&owner_key, &device).unwrap();
    assert_eq!(d["clock"]["state"], "ok", "{d}");
    let skew = d["clock"]["skew_secs"].as_i64().unwrap();
    assert!(skew.abs() <= 3, "{d}");
    let shown = ctl.run(&owner_key, &["device", "show", &device]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("clock ok ("), "{shown}");
    ctl.ok(&owner_key, &["device", "tag", &device, "lab", "e2e"]);

    // The owner grants a developer key every procedure on chutes `<prefix>*` only.
    let prefix = unique("fl");
    grant_developer(&ctl, &owner_key, &dev_key, &prefix);

    // The developer works with a developer token: fleet state and what they sign, not
    // admission or grants.
    let dev_token = ctl.ok(&owner_key, &["token", "create", "alice"]);
    let dctl = Ctl::new(
        cloud.http(),
        dev_token["token"].as_str().unwrap().to_owned(),
        w.dir.join("home-dev"),
    );
    let (ok, denied) = dctl.json(&dev_key, &["device", "accept", &device]);
    assert!(
        !ok && denied["error"]
            .as_str()
            .unwrap()
            .contains("developer token may not"),
        "{denied}"
    );

    // The developer pushes a chute directory with an image archive: the image goes to
    // the cloud's blob store, then to the device over the chunk transfer.
    let name = format!("{prefix}-web");
    let dir = chute_with_image(
        &mut w,
        &name,
        r#"["sh", "-c", "echo hello-from-the-cloud; while true; do echo tick; sleep 1; done"]"#,
        "[resources]\ncpu = 0.25\nmemory = \"48MiB\"\npids = 48\n",
    );
    let started = Instant::now();
    let pushed = dctl.ok(&dev_key, &["push", dir.to_str().unwrap(), "--tag", "lab"]);
    let push_secs = started.elapsed().as_secs_f64();
    let r = &pushed["results"][0];
    assert_eq!(
        r["status"],
        "succeeded",
        "{pushed}\ncloud log:\n{}",
        tail(&cloud.log(), 30)
    );
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["device"], device.as_str());
    assert_eq!(timeline(r), ["queued", "sent", "succeeded"], "{r}");
    eprintln!("push round trip (upload + transfer + deploy + verified result): {push_secs:.2}s");

    let image_size = std::fs::metadata(dir.join("image.tar")).unwrap().len();
    assert_eq!(
        cloud.metric("chute_cloud_image_bytes_sent_total"),
        image_size,
        "the image crossed once"
    );

    // It runs on the agent, with the caps of its manifest.
    w.wait_state(&name, e2e::ChuteState::Running, T);
    let pid = w.container_pid(&name);
    assert_eq!(cgroup_file(pid, "pids", "pids.max"), "48");
    let mem = cgroup_file(pid, "memory", "memory.limit_in_bytes");
    assert_eq!(mem, (48u64 << 20).to_string());

    // stop / start / logs, each a signed command with a verified result.
    let r = dctl.ok(&dev_key, &["stop", "--device", &device, &name]);
    assert_eq!(r["verified"], true, "{r}");
    w.wait_state(&name, e2e::ChuteState::Stopped, T);
    let r = dctl.ok(&dev_key, &["start", "--device", &device, &name]);
    assert_eq!(r["verified"], true, "{r}");
    w.wait_state(&name, e2e::ChuteState::Running, T);
    let mut logs = Value::Null;
    wait_until("the chute's output in its logs", T, || {
        logs = dctl.ok(&dev_key, &["logs", "--device", &device, &name]);
        logs.to_string().contains("hello-from-the-cloud")
    });
    assert_eq!(logs["verified"], true, "{logs}");
    // Following: the verified tail, then live lines relayed while someone watches.
    let lines = dctl.follow_logs(&dev_key, &device, &name, 4);
    assert!(
        lines
            .iter()
            .any(|l| l["verified"] == false && l["text"] == "tick"),
        "no live line in {lines:?}"
    );
    let listed = dctl.ok(&dev_key, &["list", "--device", &device]);
    assert_eq!(listed["verified"], true, "{listed}");
    assert!(listed.to_string().contains(&name), "{listed}");

    // Pushing the same version again replaces the chute in place; the blob is already in
    // the cloud, so nothing is uploaded again.
    let started = Instant::now();
    let o = dctl.run(
        &dev_key,
        &["push", dir.to_str().unwrap(), "--device", &device],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already in the cloud"));
    w.wait_state(&name, e2e::ChuteState::Running, T);
    // The device still holds the image that archive loaded: nothing crosses the link.
    assert_eq!(
        cloud.metric("chute_cloud_image_bytes_sent_total"),
        image_size,
        "a device that already holds the digest is sent nothing"
    );
    assert!(
        w.agent_log()
            .contains("image archive already loaded; nothing to transfer"),
        "{}",
        tail(&w.agent_log(), 30)
    );
    eprintln!(
        "second push of the same image: 0 image bytes sent (first: {image_size}), {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // Honest status: running/total from heartbeats.
    wait_until("heartbeats to count the running chute", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["chutes_running"] == 1 && d["chutes_total"] == 1)
    });

    // A chute outside the grant's pattern is refused, with the reason, and nothing runs.
    let other = unique("outside");
    let odir = w.chute_dir(&other, r#"["sleep", "3600"]"#, "");
    let (ok, refused) = dctl.json(
        &dev_key,
        &["push", odir.to_str().unwrap(), "--device", &device],
    );
    assert!(!ok, "{refused}");
    let r = &refused["results"][0];
    assert_eq!(r["status"], "refused", "{refused}");
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("not_authorized") && reason.contains(&other),
        "{reason}"
    );
    assert!(w.try_cli(&["inspect", &other]).status.code() != Some(0));

    // Deployments count per-device outcomes; the audit log saw the owner's calls.
    let deps = ctl.ok(&owner_key, &["deployment", "list"]);
    let first = deps
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["chute"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(
        (first["targeted"].as_i64(), first["succeeded"].as_i64()),
        (Some(1), Some(1)),
        "{first}"
    );
    let shown = ctl.ok(
        &owner_key,
        &["deployment", "show", &first["id"].to_string()],
    );
    assert_eq!(shown["devices"][0]["device_id"], device.as_str());

    // Clean up through the cloud too.
    let r = dctl.ok(&dev_key, &["remove", "--device", &device, &name]);
    assert_eq!(r["verified"], true, "{r}");

    // Revoking the grant: refused in the cloud at once, and the device installs an
    // owner-signed empty grant that supersedes the developer's older ones.
    let grants = ctl.ok(&owner_key, &["grant", "list"]);
    let gid = grants[0]["id"].to_string();
    let revoked = ctl.ok(&owner_key, &["grant", "revoke", &gid]);
    let d = &revoked["devices"][0];
    assert_eq!(
        (d["status"].as_str(), d["verified"].as_bool()),
        (Some("succeeded"), Some(true)),
        "{revoked}"
    );
    assert_eq!(d["result"]["installed"], true, "{revoked}");
    let (ok, r) = dctl.json(&dev_key, &["start", "--device", &device, &name]);
    assert!(
        !ok && r["error"].as_str().unwrap().contains("no valid grant"),
        "{r}"
    );
}

/// A scripted device speaking the protocol over a real websocket: what a hostile or
/// simply offline-and-back device looks like to the cloud, without Podman.
mod fake {
    use std::net::TcpStream;
    use std::time::Duration;

    use proto::{AuthMethod, Authenticate, BoundedString, Hello, Keypair, Message};
    use tungstenite::client::IntoClientRequest;
    use tungstenite::http::HeaderValue;
    use tungstenite::{Message as WsMessage, WebSocket};

    pub type Ws = WebSocket<TcpStream>;

    pub fn open(url: &str, claim: Option<&str>) -> Ws {
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(proto::SUBPROTOCOL),
        );
        if let Some(c) = claim {
            req.headers_mut()
                .insert("X-Chute-Claim", HeaderValue::from_str(c).unwrap());
        }
        let host = req.uri().authority().unwrap().as_str().to_owned();
        let tcp = TcpStream::connect(host).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        tungstenite::client::client(req, tcp)
            .expect("websocket upgrade")
            .0
    }

    pub fn send(ws: &mut Ws, m: &Message) {
        ws.send(WsMessage::Binary(proto::encode(m).unwrap().into()))
            .unwrap();
    }

    /// The next protocol message; `None` when the cloud closed the session.
    pub fn recv(ws: &mut Ws) -> Option<Message> {
        loop {
            match ws.read() {
                Ok(WsMessage::Binary(b)) => return Some(proto::decode(&b).unwrap()),
                Ok(WsMessage::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// HELLO, answer the CHALLENGE; returns what came after (WELCOME or ABORT).
    pub fn handshake(ws: &mut Ws, key: &Keypair) -> Option<Message> {
        send(
            ws,
            &Message::Hello(Hello {
                realm: BoundedString::new("default").unwrap(),
                pubkey: key.public(),
                agent_version: BoundedString::new("fake-1").unwrap(),
                auth_method: AuthMethod::Cryptosign,
            }),
        );
        let Some(Message::Challenge(c)) = recv(ws) else {
            panic!("no CHALLENGE")
        };
        send(
            ws,
            &Message::Authenticate(Authenticate::answer(key, "default", &c)),
        );
        recv(ws)
    }

    pub fn connect(url: &str, key: &Keypair, claim: Option<&str>) -> (Ws, Option<Message>) {
        let mut ws = open(url, claim);
        let m = handshake(&mut ws, key);
        (ws, m)
    }
}

fn status_of(ctl: &Ctl, key: &Path, id: &str) -> String {
    ctl.listed_device(key, id)
        .map(|d| d["status"].as_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[test]
fn admission_claims_rejection_hostile_frames_and_offline_delivery_in_order() {
    use proto::{BoundedBytes, CallResult, ErrorCode, Keypair, Message, Outcome, SignedResult};
    let dir = std::env::temp_dir().join(unique("chute-cloud-adm-"));
    std::fs::create_dir_all(&dir).unwrap();
    let cloud = Cloud::start(&dir);
    let ctl = cloud.ctl(dir.join("home"));
    let owner_key = dir.join("owner.key");
    let dev_key = dir.join("dev.key");
    ctl.ok(&owner_key, &["keygen"]);
    ctl.ok(&owner_key, &["owner", "init"]);
    let url = cloud.agent_url();

    // Unknown key: welcomed but pending; what it publishes is not recorded.
    let a = Keypair::generate().unwrap();
    let a_id = a.device_id().to_hex();
    let (mut wa, m) = fake::connect(&url, &a, None);
    assert!(matches!(m, Some(Message::Welcome(_))), "{m:?}");
    assert_eq!(status_of(&ctl, &owner_key, &a_id), "pending");

    // A claim token accepts a new key on its first connect, once.
    let claim = ctl.ok(&owner_key, &["device", "claim-token", "--expires", "10m"]);
    let token = claim["token"].as_str().unwrap().to_owned();
    let b = Keypair::generate().unwrap();
    let b_id = b.device_id().to_hex();
    let (wb, m) = fake::connect(&url, &b, Some(&token));
    assert!(matches!(m, Some(Message::Welcome(_))), "{m:?}");
    assert_eq!(status_of(&ctl, &owner_key, &b_id), "accepted");
    let c = Keypair::generate().unwrap();
    let c_id = c.device_id().to_hex();
    let (mut wc, _) = fake::connect(&url, &c, Some(&token));
    assert_eq!(
        status_of(&ctl, &owner_key, &c_id),
        "pending",
        "a claim token is single-use"
    );
    drop(wb);

    // A pending device's heartbeat is not recorded, but it is shown the moment the
    // owner accepts the device.
    fake::send(
        &mut wc,
        &Message::Publish(proto::Publish {
            request: 1,
            publication: proto::Publication::Heartbeat(proto::Heartbeat {
                seq: 1,
                uptime_secs: 5,
                agent_version: proto::BoundedString::new("fake-2").unwrap(),
                resources: Default::default(),
                chutes: Default::default(),
                clock_secs: 0,
                clock: proto::ClockState::Ok,
                state_dir_bytes: 0,
            }),
        }),
    );
    std::thread::sleep(Duration::from_millis(300));
    let d = ctl.listed_device(&owner_key, &c_id).unwrap();
    assert!(d["last_heartbeat"].is_null(), "{d}");
    ctl.ok(&owner_key, &["device", "accept", &c_id]);
    wait_until("the held heartbeat recorded on acceptance", T, || {
        ctl.listed_device(&owner_key, &c_id).is_some_and(|d| {
            d["last_heartbeat"].is_i64() && d["agent_version"] == "fake-2" && d["chutes_total"] == 0
        })
    });
    // Its clock said 1970: the skew against the cloud's clock shows it.
    let d = ctl.listed_device(&owner_key, &c_id).unwrap();
    let now = e2e::peer::unix_now() as i64;
    assert_eq!(d["clock"]["secs"], 0, "{d}");
    assert!(
        (d["clock"]["skew_secs"].as_i64().unwrap() + now).abs() <= 5,
        "{d}"
    );

    // A heartbeat flood is recorded at a bounded rate, not frame by frame, and the
    // flooding session is shed (the device may come back, at a sane rate).
    let hb = |seq: u64| {
        Message::Publish(proto::Publish {
            request: seq,
            publication: proto::Publication::Heartbeat(proto::Heartbeat {
                seq,
                uptime_secs: 5,
                agent_version: proto::BoundedString::new("fake-2").unwrap(),
                resources: Default::default(),
                chutes: Default::default(),
                clock_secs: 0,
                clock: proto::ClockState::Ok,
                state_dir_bytes: 0,
            }),
        })
    };
    std::thread::sleep(Duration::from_millis(1000));
    for seq in 10..210 {
        if wc
            .send(tungstenite::Message::Binary(
                proto::encode(&hb(seq)).unwrap().into(),
            ))
            .is_err()
        {
            break;
        }
    }
    let mut shed = None;
    while let Some(m) = fake::recv(&mut wc) {
        if let Message::Abort(a) = m {
            shed = Some(a.message.as_str().to_owned());
        }
    }
    assert!(
        shed.as_deref().is_some_and(|m| m.contains("heartbeats")),
        "the flooding session was not shed: {shed:?}"
    );
    std::thread::sleep(Duration::from_millis(300));
    let d = ctl.listed_device(&owner_key, &c_id).unwrap();
    assert_eq!(
        d["heartbeat"]["seq"], 10,
        "every flooded heartbeat was written: {d}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    let (mut wc, welcome) = fake::connect(&url, &c, None);
    assert!(matches!(welcome, Some(Message::Welcome(_))), "{welcome:?}");
    fake::send(&mut wc, &hb(500));
    wait_until("the next heartbeat after the gap", T, || {
        ctl.listed_device(&owner_key, &c_id)
            .is_some_and(|d| d["heartbeat"]["seq"] == 500)
    });

    // Rejecting a device closes its session and refuses it from then on.
    ctl.ok(&owner_key, &["device", "reject", &a_id]);
    let mut closed = false;
    for _ in 0..5 {
        match fake::recv(&mut wa) {
            Some(Message::Abort(ab)) => {
                assert_eq!(ab.code, ErrorCode::NotAuthorized);
                closed = true;
                break;
            }
            None => {
                closed = true;
                break;
            }
            Some(_) => {}
        }
    }
    assert!(closed, "a rejected device's session stays open");
    let (_w, m) = fake::connect(&url, &a, None);
    assert!(
        matches!(m, Some(Message::Abort(_))),
        "rejected device welcomed again: {m:?}"
    );

    // Hostile peers: a bad challenge answer, garbage frames, a text frame.
    let mut w = fake::open(&url, None);
    fake::send(
        &mut w,
        &Message::Hello(proto::Hello {
            realm: proto::BoundedString::new("default").unwrap(),
            pubkey: Keypair::generate().unwrap().public(),
            agent_version: proto::BoundedString::new("x").unwrap(),
            auth_method: proto::AuthMethod::Cryptosign,
        }),
    );
    let _challenge = fake::recv(&mut w);
    fake::send(
        &mut w,
        &Message::Authenticate(proto::Authenticate {
            signature: proto::SignatureBytes([7; 64]),
        }),
    );
    assert!(
        matches!(fake::recv(&mut w), Some(Message::Abort(ab)) if ab.code == ErrorCode::AuthenticationFailed)
    );
    let mut w = fake::open(&url, None);
    w.send(tungstenite::Message::Binary(
        vec![0xde, 0xad, 0xbe, 0xef].into(),
    ))
    .unwrap();
    assert!(
        matches!(fake::recv(&mut w), None | Some(Message::Abort(_))),
        "garbage instead of HELLO must end the session"
    );
    let mut w = fake::open(&url, None);
    let _ = w.send(tungstenite::Message::Binary(
        vec![1u8; 2 * proto::MAX_FRAME].into(),
    ));
    assert!(
        matches!(fake::recv(&mut w), None | Some(Message::Abort(_))),
        "an oversized frame must end the session"
    );
    assert!(fake::recv(&mut w).is_none(), "and close the socket");
    let devices = ctl.ok(&owner_key, &["device", "list"]);
    assert_eq!(
        devices.as_array().unwrap().len(),
        3,
        "hostile peers created devices: {devices}"
    );

    // Offline delivery: commands queued while B is away arrive in order when it returns,
    // and chutectl verifies the device-signed results.
    let dev_pub = ctl.ok(&dev_key, &["keygen"])["pubkey"]
        .as_str()
        .unwrap()
        .to_owned();
    ctl.ok(
        &owner_key,
        &[
            "grant",
            "issue",
            "--to",
            &dev_pub,
            "--procedures",
            "start,stop",
            "--chutes",
            "app-*",
        ],
    );
    let spawn = |op: &str| {
        ctl.command(&dev_key)
            .args([op, "--device", &b_id, "app-one", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let stop = spawn("stop");
    wait_until("the stop command queued", T, || {
        ctl.commands(&b_id).len() == 1
    });
    let start = spawn("start");
    wait_until("the start command queued", T, || {
        ctl.commands(&b_id).len() == 2
    });
    let (mut wb, m) = fake::connect(&url, &b, None);
    assert!(matches!(m, Some(Message::Welcome(_))));
    let mut seen = Vec::new();
    while seen.len() < 2 {
        if let Message::Call(call) =
            fake::recv(&mut wb).expect("the cloud delivers queued commands")
        {
            {
                seen.push(call.command.command.procedure().as_str().to_owned());
                let result = SignedResult::sign(
                    &b,
                    &call.command.command,
                    Outcome::Ok(BoundedBytes::new(b"{}".to_vec()).unwrap()),
                );
                fake::send(
                    &mut wb,
                    &Message::Result(CallResult {
                        request: call.request,
                        result,
                    }),
                );
            }
        }
    }
    assert_eq!(
        seen,
        ["stop", "start"],
        "delivered in the order they were queued"
    );
    for child in [stop, start] {
        let o = child.wait_with_output().unwrap();
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(o.status.success(), "{v}");
        assert_eq!(v["verified"], true, "{v}");
        assert_eq!(timeline(&v), ["queued", "sent", "succeeded"], "{v}");
    }

    // A result signed by another key is stored by the relay but refused by chutectl.
    let forged = spawn("stop");
    let Some(Message::Call(call)) = fake::recv(&mut wb) else {
        panic!("no CALL")
    };
    let result = SignedResult::sign(
        &c,
        &call.command.command,
        Outcome::Ok(BoundedBytes::new(b"{}".to_vec()).unwrap()),
    );
    fake::send(
        &mut wb,
        &Message::Result(CallResult {
            request: call.request,
            result,
        }),
    );
    let o = forged.wait_with_output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("NOT signed by the device"), "{err}");

    // A command that expires while its device is away is never delivered: its timeline
    // ends `expired`.
    drop(wb);
    wait_until("B offline", T, || {
        ctl.listed_device(&owner_key, &b_id)
            .is_some_and(|d| d["connected"] == false)
    });
    let seed = |p: &Path| {
        proto::Keypair::from_seed(
            proto::hex_decode::<32>("key", &std::fs::read_to_string(p).unwrap()).unwrap(),
        )
    };
    let (owner, dev) = (seed(&owner_key), seed(&dev_key));
    let now = e2e::peer::unix_now();
    let grant = proto::testkit::grant_for(&dev, proto::Rights::all(), &["app-*"], now).sign(&owner);
    let cmd = proto::SignedCommand::sign(
        proto::Command {
            device_id: b.device_id(),
            request_id: now * 1_000_000,
            issued_at: now,
            expires_at: now + 1,
            args: proto::Args::Start(proto::ChuteArgs {
                chute: proto::ChuteName::new("app-one").unwrap(),
            }),
            grant_digest: [0; 32],
        },
        &dev,
        grant,
    );
    let frame = proto::encode(&Message::Call(Box::new(proto::Call {
        request: 0,
        command: cmd,
    })))
    .unwrap();
    let body = serde_json::json!({ "command": proto::hex_encode(&frame) }).to_string();
    let o = Command::new("curl")
        .args([
            "-sf",
            "-X",
            "POST",
            "-H",
            &format!("Authorization: Bearer {}", ctl.token),
        ])
        .args(["-H", "Content-Type: application/json", "-d", &body])
        .arg(format!("{}/api/v1/devices/{b_id}/commands", ctl.cloud))
        .output()
        .unwrap();
    let queued: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(queued["status"], "queued", "{queued}");
    std::thread::sleep(Duration::from_millis(2500));
    let (mut wb, m) = fake::connect(&url, &b, None);
    assert!(matches!(m, Some(Message::Welcome(_))));
    wb.get_ref()
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        if let Ok(tungstenite::Message::Binary(b)) = wb.read() {
            let m = proto::decode(&b).unwrap();
            assert!(
                !matches!(m, Message::Call(_)),
                "an expired command was delivered: {m:?}"
            );
        }
    }
    let c = ctl
        .commands(&b_id)
        .into_iter()
        .find(|c| c["id"] == queued["id"])
        .unwrap();
    assert_eq!(timeline(&c), ["queued", "expired"], "{c}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chuted_run_with_a_claim_token_is_accepted_on_first_connect() {
    // A long heartbeat period: status between heartbeats comes from state changes.
    let mut w = World::new(&small_pools_config("heartbeat_secs = 120\n"));
    let cloud = Cloud::start(&w.dir);
    let ctl = cloud.ctl(w.dir.join("home"));
    let owner_key = w.dir.join("owner.key");
    ctl.ok(&owner_key, &["keygen"]);
    ctl.ok(&owner_key, &["owner", "init"]);
    let claim = ctl.ok(&owner_key, &["device", "claim-token", "--expires", "5m"]);
    let device = identity(&w).device_id;
    w.run_args = vec![
        "--cloud".into(),
        cloud.agent_url(),
        "--claim".into(),
        claim["token"].as_str().unwrap().to_owned(),
    ];
    w.start_agent();
    wait_until("the claimed device online and accepted", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["status"] == "accepted" && d["connected"] == true)
    });
    // Its heartbeats are recorded without the owner doing anything.
    wait_until("a heartbeat", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["last_heartbeat"].is_i64())
    });
    let first = ctl.listed_device(&owner_key, &device).unwrap()["last_heartbeat"].clone();

    // Status follows chute state changes at once, not a heartbeat period later, and
    // does not pretend a heartbeat arrived.
    let name = unique("claimed");
    let dir = w.chute_dir(&name, r#"["sleep", "3600"]"#, "");
    w.deploy(&dir);
    wait_until("the running chute in the cloud's status", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["chutes_running"] == 1)
    });
    w.cli(&["stop", &name]);
    wait_until("the stopped chute in the cloud's status", T, || {
        ctl.listed_device(&owner_key, &device).is_some_and(|d| {
            d["chutes_running"] == 0
                && d["heartbeat"]["chutes"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["name"] == name.as_str() && c["state"] == "stopped")
                })
        })
    });
    w.cli(&["remove", &name]);
    wait_until("the removed chute gone from the cloud's status", T, || {
        ctl.listed_device(&owner_key, &device)
            .is_some_and(|d| d["chutes_total"] == 0)
    });
    let d = ctl.listed_device(&owner_key, &device).unwrap();
    assert_eq!(
        d["last_heartbeat"], first,
        "a state change is not a heartbeat: {d}"
    );
}

/// `curl` against the TLS cloud, trusting `ca`; (exit success, stdout).
fn curl_tls(ca: &Path, args: &[&str]) -> (bool, String) {
    let o = Command::new("curl")
        .args(["-s", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
fn a_tls_cloud_serves_agents_over_wss_and_chutectl_over_https() {
    use std::io::{Read, Write};
    let mut w = World::new(&small_pools_config("heartbeat_secs = 1\nsample_secs = 1\n"));
    let certs = w.dir.join("tls");
    std::fs::create_dir_all(&certs).unwrap();
    let (ca, leaf, key) = make_certs(&certs);
    let cloud = Cloud::options(&w.dir).tls(&leaf, &key).start();
    let printed = std::fs::read_to_string(&cloud.out).unwrap();
    assert!(
        printed.contains(&format!("https://127.0.0.1:{}", cloud.port))
            && printed.contains(&format!("wss://127.0.0.1:{}/agent", cloud.port)),
        "{printed}"
    );
    let ctl = cloud.ctl(w.dir.join("home"));
    let owner_key = w.dir.join("owner.key");

    // chutectl trusts the private CA once `login --ca` saved it; not before.
    let (ok, v) = ctl.json(&owner_key, &["device", "list"]);
    assert!(
        !ok && v["error"].as_str().unwrap().contains("certificate"),
        "{v}"
    );
    let o = ctl.run(
        &owner_key,
        &[
            "login",
            &cloud.http(),
            "--token",
            &cloud.token(),
            "--ca",
            ca.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    trust_owner(&w, &ctl, &owner_key);
    let device = identity(&w).device_id;

    // Hostile clients on the TLS port: one that never starts its handshake, one that
    // speaks plain http. Neither disturbs anyone; the silent one is cut off.
    let mut silent = std::net::TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    let silent = std::thread::spawn(move || {
        let since = Instant::now();
        silent
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = [0u8; 16];
        (silent.read(&mut buf).map_err(|e| e.kind()), since.elapsed())
    });
    let mut plain = std::net::TcpStream::connect(("127.0.0.1", cloud.port)).unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("ok"),
        "plain http was served on the TLS port"
    );
    assert_eq!(
        curl_tls(&ca, &[&format!("{}/healthz", cloud.http())]),
        (true, "ok\n".to_owned())
    );

    // An agent that does not trust the cloud's certificate (the system bundle only)
    // does not connect, and says why.
    let claim = ctl.ok(&owner_key, &["device", "claim-token", "--expires", "10m"]);
    let claim = claim["token"].as_str().unwrap().to_owned();
    w.run_args = vec![
        "--cloud".into(),
        cloud.agent_url(),
        "--claim".into(),
        claim.clone(),
    ];
    w.start_agent();
    wait_until("the agent to log the untrusted certificate", T, || {
        w.agent_log().contains("invalid peer certificate")
    });
    assert!(
        ctl.listed_device(&owner_key, &device).is_none(),
        "an agent that refused the certificate reached the cloud"
    );
    w.kill_agent();

    // Trusting the CA (--cloud-ca), it connects over wss and the claim accepts it.
    w.run_args
        .extend(["--cloud-ca".into(), ca.to_str().unwrap().to_owned()]);
    w.start_agent();
    wait_until("the device connected and accepted over wss", T, || {
        ctl.listed_device(&owner_key, &device).is_some_and(|d| {
            d["status"] == "accepted" && d["connected"] == true && d["last_heartbeat"].is_i64()
        })
    });

    // A developer pushes a chute with its image over https; it runs on the device.
    let dev_key = w.dir.join("dev.key");
    let prefix = unique("tls");
    grant_developer(&ctl, &owner_key, &dev_key, &prefix);
    let name = format!("{prefix}-web");
    let dir = chute_with_image(
        &mut w,
        &name,
        r#"["sh", "-c", "while true; do echo tick; sleep 1; done"]"#,
        "",
    );
    let pushed = ctl.push(&dev_key, &dir, &device);
    let r = &pushed["results"][0];
    assert_eq!(
        (r["status"].as_str(), r["verified"].as_bool()),
        (Some("succeeded"), Some(true)),
        "{pushed}\ncloud log:\n{}",
        tail(&cloud.log(), 30)
    );
    w.wait_state(&name, e2e::ChuteState::Running, T);
    let listed = ctl.ok(&dev_key, &["list", "--device", &device]);
    assert!(listed.to_string().contains(&name), "{listed}");
    let (ok, metrics) = curl_tls(&ca, &[&format!("{}/metrics", cloud.http())]);
    assert!(
        ok && metrics.contains("chute_cloud_sessions 1"),
        "{metrics}"
    );

    // The silent client was disconnected after the handshake timeout (10 s).
    let (read, waited) = silent.join().unwrap();
    assert_eq!(read, Ok(0), "the silent client was not closed ({waited:?})");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "silent client closed after {waited:?}"
    );

    let r = ctl.ok(&dev_key, &["remove", "--device", &device, &name]);
    assert_eq!(r["verified"], true, "{r}");
}
