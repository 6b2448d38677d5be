//! Numbers for the cloud link: bytes per heartbeat, control-channel traffic per hour,
//! signed-command verification cost, and the cost of persisting the replay window.
//!
//! Run: `cargo run --release -p chuted --example cloud_bench`
//! (reconnect time needs a real agent and peer; it is printed by
//! `cargo test -p e2e --test cloud heartbeats_resume -- --nocapture`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use proto::{testkit, Args, Message, Procedure, Publication, Publish, ReplayWindow, Verifier};

/// Websocket header of a client frame (the agent is the client: frames are masked).
fn ws_client_header(len: usize) -> usize {
    4 + match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}
/// Websocket header of a server frame (unmasked).
fn ws_server_header(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}
/// TLS 1.3 record overhead: 5-byte header, 1-byte inner content type, 16-byte AEAD tag.
const TLS_RECORD: usize = 22;
/// IPv4 + TCP headers with timestamps, per segment; each data segment is assumed to
/// draw one bare ACK back (no piggybacking: the worst case on an idle link).
const TCP_IP: usize = 52;

fn heartbeat_frame(n: usize) -> usize {
    proto::encode(&Message::Publish(Publish {
        request: 123_456,
        publication: Publication::Heartbeat(testkit::heartbeat(n)),
    }))
    .unwrap()
    .len()
}

fn main() {
    println!("== heartbeat size (postcard frame / + websocket / + TLS record) ==");
    for n in [0usize, 1, 10, 100] {
        let f = heartbeat_frame(n);
        let ws = f + ws_client_header(f);
        println!(
            "{n:>3} chutes: {f:>5} B frame, {ws:>5} B websocket, {:>5} B TLS  ({:.1} B per extra chute)",
            ws + TLS_RECORD,
            if n > 0 { (f - heartbeat_frame(0)) as f64 / n as f64 } else { 0.0 }
        );
    }

    println!("\n== control channel per hour: 30 s heartbeat, 10 chutes, 60 s keepalive ==");
    let hb = heartbeat_frame(10);
    let hb_tls = hb + ws_client_header(hb) + TLS_RECORD;
    let beats = 3600 / 30;
    // The agent pings after 60 s with nothing received; an otherwise silent cloud
    // therefore costs one ping (empty, masked) and one pong per minute.
    let pings = 3600 / 60;
    let ping_tls = ws_client_header(0) + TLS_RECORD;
    let pong_tls = ws_server_header(0) + TLS_RECORD;
    let app = beats * hb_tls + pings * (ping_tls + pong_tls);
    let segments = beats + 2 * pings;
    let wire = app + segments * TCP_IP * 2;
    println!("heartbeats: {beats} x {hb_tls} B = {} B", beats * hb_tls);
    println!(
        "keepalive:  {pings} x ({ping_tls} B ping + {pong_tls} B pong) = {} B",
        pings * (ping_tls + pong_tls)
    );
    println!(
        "total, websocket + TLS records: {app} B/hour = {:.1} KB/hour",
        app as f64 / 1000.0
    );
    println!(
        "total incl. TCP/IP headers and one bare ACK per segment: {wire} B/hour = {:.1} KB/hour (target < 100 KB/hour)",
        wire as f64 / 1000.0
    );
    println!("(a reconnect adds one TLS handshake, ~4-6 KB with a typical certificate chain)");

    println!("\n== signed command verification ==");
    let owner = testkit::owner();
    let dev = testkit::developer();
    let device = testkit::device();
    let verifier = Verifier::new(owner.public(), device.device_id());
    const N: u64 = 2000;
    let now = testkit::NOW;
    let cmds: Vec<_> = (0..N)
        .map(|i| {
            testkit::signed_command(
                &owner,
                &dev,
                device.device_id(),
                i + 1,
                now,
                testkit::start_args("web"),
            )
        })
        .collect();
    let mut window = ReplayWindow::new();
    let t = Instant::now();
    for c in &cmds {
        let v = verifier.verify(c, now, &mut window).unwrap();
        assert_eq!(v.procedure, Procedure::Start);
    }
    let per = t.elapsed() / N as u32;
    println!("verify (command signature + grant signature + checks + replay window): {per:?} per command");
    let t = Instant::now();
    for c in &cmds {
        assert!(verifier.verify(c, now, &mut window).is_err());
    }
    println!("replayed command refused in {:?}", t.elapsed() / N as u32);
    let frame = proto::encode(&Message::Call(Box::new(proto::Call {
        request: 1,
        command: cmds[0].clone(),
    })))
    .unwrap();
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(proto::decode(&frame).unwrap());
    }
    println!(
        "decode of a {}-byte CALL: {:?}",
        frame.len(),
        t.elapsed() / N as u32
    );
    let status = testkit::signed_command(&owner, &dev, device.device_id(), 1, now, Args::Status);
    let t = Instant::now();
    for _ in 0..N {
        std::hint::black_box(proto::SignedResult::sign(
            &device,
            &status.command,
            proto::Outcome::Ok(Default::default()),
        ));
    }
    println!("signing a result: {:?}", t.elapsed() / N as u32);

    println!(
        "\n== replay window persisted before each command (write, fsync, rename, fsync dir) =="
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.window");
    let bytes = window.to_bytes();
    const W: u32 = 50;
    let t = Instant::now();
    for _ in 0..W {
        chuted::snapshot::write_atomic(&path, &bytes, 0o600).unwrap();
    }
    println!(
        "{} B window: {:?} per command on {}",
        bytes.len(),
        t.elapsed() / W,
        dir.path().display()
    );
}
