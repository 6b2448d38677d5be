//! Cost of verifying one signed command (two Ed25519 strict verifications, canonical
//! re-encoding, grant checks, replay window update) and of decoding its CALL frame.
//!
//!     cargo run --release -p proto --example bench_verify [iterations]

use std::time::Instant;

use proto::testkit::{self, NOW};
use proto::{decode, encode, Call, Message, ReplayWindow};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let (owner, dev, device_id) = (
        testkit::owner(),
        testkit::developer(),
        testkit::device().device_id(),
    );
    let commands: Vec<_> = (0..n)
        .map(|i| {
            testkit::signed_command(
                &owner,
                &dev,
                device_id,
                i + 1,
                NOW,
                testkit::deploy_args("hello-web"),
            )
        })
        .collect();
    let frames: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| {
            encode(&Message::Call(Box::new(Call {
                request: 1,
                command: c.clone(),
            })))
            .expect("encodes")
        })
        .collect();

    let verifier = testkit::sample_verifier();
    let mut window = ReplayWindow::new();
    let t = Instant::now();
    for c in &commands {
        verifier.verify(c, NOW, &mut window).expect("valid");
    }
    let verify_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    // The order and time checks a device adds (protocol v2): judge time at the floor,
    // refuse stale, record (each command changes the same chute).
    let mut order = proto::CommandOrder::new();
    let t = Instant::now();
    for c in &commands {
        let now = order.judge_time(NOW);
        verifier.check(c, now).expect("valid");
        order.check(&c.command).expect("in order");
        order.record(&c.command);
    }
    let ordered_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = Instant::now();
    for f in &frames {
        decode(f).expect("decodes");
    }
    let decode_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let t = Instant::now();
    for i in 0..n {
        let _ = testkit::signed_command(
            &owner,
            &dev,
            device_id,
            i,
            NOW,
            testkit::start_args("test-x"),
        );
    }
    let sign_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;

    let hb1 = encode(&Message::Publish(proto::Publish {
        request: 1,
        publication: proto::Publication::Heartbeat(testkit::heartbeat(1)),
    }))
    .expect("encodes");
    let hb100 = encode(&Message::Publish(proto::Publish {
        request: 1,
        publication: proto::Publication::Heartbeat(testkit::heartbeat(100)),
    }))
    .expect("encodes");

    println!("{}", proto::selftest().expect("selftest passes"));
    println!("iterations: {n}");
    println!("verify signed command: {verify_us:.1} us/command (2 strict Ed25519 verifications + checks + replay window)");
    println!("verify + time floor + per-chute order: {ordered_us:.1} us/command");
    println!(
        "decode CALL frame ({} bytes): {decode_us:.2} us/frame",
        frames[0].len()
    );
    println!("sign grant + command: {sign_us:.1} us");
    println!(
        "heartbeat frame: {} bytes with 1 chute, {} bytes with 100 chutes",
        hb1.len(),
        hb100.len()
    );
}
