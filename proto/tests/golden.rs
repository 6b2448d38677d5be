//! Golden byte fixtures: the exact bytes of one sample of every message type (plus the
//! signed canonical encodings and the persisted replay window). A change here is a wire
//! format change: bump the version or keep old peers working. Regenerate deliberately
//! with `UPDATE_GOLDEN=1 cargo test -p proto --test golden`.
//!
//! `tests/golden/` holds the current version (2); `tests/golden/v1/` keeps the frames
//! of protocol version 1, which this version refuses by its version byte.

use std::path::PathBuf;

use proto::testkit;
use proto::{decode, encode, hex_encode, ErrorCode, MessageType, ProtoError, ReplayWindow};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn check(name: &str, bytes: &[u8]) {
    let path = golden_dir().join(format!("{name}.hex"));
    let hex = format!("{}\n", hex_encode(bytes));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &hex).expect("write golden file");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert_eq!(
        want,
        hex,
        "{name}: encoding differs from {}",
        path.display()
    );
}

#[test]
fn every_message_type_matches_its_fixture_byte_for_byte() {
    let samples = testkit::sample_messages();
    for (name, msg) in &samples {
        let frame = encode(msg).expect("sample encodes");
        check(name, &frame);
        // And the fixture decodes back to the same message.
        let want = std::fs::read_to_string(golden_dir().join(format!("{name}.hex")))
            .expect("fixture exists");
        let bytes = hex::decode(want.trim()).expect("fixture is hex");
        assert_eq!(&decode(&bytes).expect("fixture decodes"), msg, "{name}");
    }
    for kind in MessageType::ALL {
        assert!(
            samples.iter().any(|(_, m)| m.message_type() == *kind),
            "no golden fixture for {kind}"
        );
    }
}

#[test]
fn signed_canonical_encodings_match_fixtures() {
    let cmd = testkit::sample_command();
    check("command_canonical", &cmd.command.canonical_bytes());
    check("grant_canonical", &cmd.grant.grant.canonical_bytes());
    // Signatures are deterministic (Ed25519), so they are fixtures too.
    check("command_signature", &cmd.signature.0);
    check("grant_signature", &cmd.grant.signature.0);
}

#[test]
fn persisted_replay_window_matches_fixture() {
    let mut window = ReplayWindow::new();
    testkit::sample_verifier()
        .verify(&testkit::sample_command(), testkit::NOW, &mut window)
        .expect("sample command verifies");
    check("replay_window", &window.to_bytes());
}

#[test]
fn key_derivations_match_fixture() {
    let device = testkit::device();
    check("device_pubkey", &device.public().0);
    check("device_id", &device.device_id().0);
    assert_eq!(device.device_id().to_hex().len(), 16);
}

#[test]
fn version_1_frames_are_refused_by_their_version_byte() {
    let dir = golden_dir().join("v1");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("v1 fixtures kept") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let is_frame = testkit::sample_messages()
            .iter()
            .any(|(n, _)| format!("{n}.hex") == name);
        if !is_frame {
            continue;
        }
        let bytes = hex::decode(std::fs::read_to_string(&path).expect("read").trim())
            .expect("fixture is hex");
        let err = decode(&bytes).expect_err("a v1 frame is not a v2 frame");
        assert_eq!(
            err,
            ProtoError::UnsupportedVersion {
                got: 1,
                supported: 2
            },
            "{name}"
        );
        assert_eq!(err.code(), ErrorCode::UnsupportedVersion);
        seen += 1;
    }
    assert_eq!(
        seen,
        testkit::sample_messages().len(),
        "v1 frame fixtures found"
    );
}

#[test]
fn grant_floors_and_command_order_match_fixtures() {
    let dev = testkit::developer();
    let mut floors = proto::GrantFloors::default();
    floors.revoke(&dev.public(), testkit::NOW).expect("room");
    check("grant_floors", &floors.to_bytes());
    let mut order = proto::CommandOrder::new();
    order.record(&testkit::sample_command().command);
    check("command_order", &order.to_bytes());
}
