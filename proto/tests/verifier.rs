//! Every way a command is refused, each leaving the replay window exactly as it was,
//! plus the replay window's behaviour across a restart and at capacity, results and
//! session auth.

use proto::testkit::{self, developer, device, owner, stranger, NOW};
use proto::{
    Args, Authenticate, BoundedBytes, Challenge, ChuteArgs, ChuteName, Command, DeviceId,
    ErrorCode, Keypair, Outcome, Procedure, ReplayReason, ReplayWindow, Rights, SignedCommand,
    SignedGrant, SignedResult, Verifier, VerifyError, REPLAY_IDS, REPLAY_SIGNERS,
};

fn verifier() -> Verifier {
    testkit::sample_verifier()
}

/// A window that already holds some history, so "unchanged" means something.
fn busy_window() -> ReplayWindow {
    let mut w = ReplayWindow::new();
    let v = verifier();
    for id in [1, 2, 5] {
        let sc = testkit::signed_command(
            &owner(),
            &developer(),
            device().device_id(),
            id,
            NOW,
            testkit::start_args("a"),
        );
        v.verify(&sc, NOW, &mut w)
            .expect("history command verifies");
    }
    w
}

fn command(request_id: u64, args: Args) -> Command {
    Command {
        device_id: device().device_id(),
        request_id,
        issued_at: NOW,
        expires_at: NOW + 300,
        args,
        grant_digest: [0; 32],
    }
}

fn grant(rights: Rights, prefixes: &[&str]) -> SignedGrant {
    testkit::grant_for(&developer(), rights, prefixes, NOW).sign(&owner())
}

fn start(chute: &str) -> Args {
    Args::Start(ChuteArgs {
        chute: ChuteName::new(chute).expect("valid name"),
    })
}

/// Verifies at `now` and asserts the refusal left the window untouched.
fn refuse(sc: &SignedCommand, now: u64) -> VerifyError {
    let mut w = busy_window();
    let before = w.clone();
    let before_bytes = w.to_bytes();
    let err = verifier()
        .verify(sc, now, &mut w)
        .expect_err("command must be refused");
    assert_eq!(w, before, "refusal {err} changed the replay window");
    assert_eq!(w.to_bytes(), before_bytes);
    err
}

#[test]
fn a_valid_command_is_accepted_and_recorded() {
    let sc = testkit::sample_command();
    let mut w = busy_window();
    let v = verifier().verify(&sc, NOW + 10, &mut w).expect("valid");
    assert_eq!(v.procedure, Procedure::Deploy);
    assert_eq!(v.request_id, 42);
    assert_eq!(v.command_digest, sc.command.digest());
    assert_ne!(w, busy_window(), "acceptance is recorded");
}

#[test]
fn forged_signature_is_refused() {
    let mut sc = testkit::sample_command();
    sc.command.request_id = 43; // changed after signing
    let err = refuse(&sc, NOW);
    assert!(
        matches!(err, VerifyError::BadSignature { request_id: 43, .. }),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::InvalidSignature);

    let mut sc = testkit::sample_command();
    sc.signature.0[10] ^= 1;
    assert!(matches!(refuse(&sc, NOW), VerifyError::BadSignature { .. }));
}

#[test]
fn command_signed_by_another_key_than_the_grant_names_is_refused() {
    // The stranger signs properly, but borrows the developer's grant.
    let sc = SignedCommand::sign(
        command(7, start("hello-x")),
        &stranger(),
        grant(Rights::all(), &["test-*"]),
    );
    let err = refuse(&sc, NOW);
    assert!(matches!(err, VerifyError::GrantForOtherKey { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::InvalidGrant);
}

#[test]
fn expired_command_is_refused() {
    let sc = testkit::sample_command();
    let err = refuse(&sc, sc.command.expires_at + 1);
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
    // The last second is still valid.
    let mut w = ReplayWindow::new();
    verifier()
        .verify(&sc, sc.command.expires_at, &mut w)
        .expect("valid at expiry second");
}

#[test]
fn command_from_the_future_is_refused_beyond_the_skew() {
    let sc = testkit::sample_command();
    let err = refuse(&sc, NOW - 61);
    assert!(matches!(err, VerifyError::NotYetValid { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::NotYetValid);
    let mut w = ReplayWindow::new();
    verifier()
        .verify(&sc, NOW - 60, &mut w)
        .expect("within 60 s skew");
}

#[test]
fn command_with_too_long_a_lifetime_is_refused() {
    let mut cmd = command(8, start("hello-x"));
    cmd.expires_at = cmd.issued_at + 3601;
    let sc = SignedCommand::sign(cmd, &developer(), grant(Rights::all(), &["test-*"]));
    assert!(matches!(refuse(&sc, NOW), VerifyError::BadLifetime { .. }));
    let mut cmd = command(9, start("hello-x"));
    cmd.expires_at = cmd.issued_at - 1;
    let sc = SignedCommand::sign(cmd, &developer(), grant(Rights::all(), &["test-*"]));
    assert!(matches!(refuse(&sc, NOW), VerifyError::BadLifetime { .. }));
}

#[test]
fn replay_is_refused() {
    let sc = testkit::sample_command();
    let mut w = busy_window();
    verifier().verify(&sc, NOW, &mut w).expect("first time");
    let before = w.clone();
    let err = verifier().verify(&sc, NOW + 1, &mut w).expect_err("replay");
    assert!(
        matches!(
            err,
            VerifyError::Replay {
                reason: ReplayReason::AlreadySeen,
                request_id: 42,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.code(), ErrorCode::Replayed);
    assert_eq!(w, before);
}

#[test]
fn replay_is_refused_after_a_restart() {
    let sc = testkit::sample_command();
    let mut w = ReplayWindow::new();
    verifier().verify(&sc, NOW, &mut w).expect("first time");
    let persisted = w.to_bytes();
    drop(w);
    let mut restored = ReplayWindow::from_bytes(&persisted).expect("window loads");
    let err = verifier()
        .verify(&sc, NOW + 5, &mut restored)
        .expect_err("replay after restart");
    assert!(matches!(err, VerifyError::Replay { .. }), "{err}");
}

#[test]
fn corrupt_persisted_window_is_an_error_not_an_empty_window() {
    let mut w = ReplayWindow::new();
    verifier()
        .verify(&testkit::sample_command(), NOW, &mut w)
        .expect("valid");
    let bytes = w.to_bytes();
    assert!(ReplayWindow::from_bytes(&bytes[..bytes.len() - 3]).is_err());
    // More signers than the capacity: refused while reading.
    let mut too_many = vec![u8::try_from(REPLAY_SIGNERS + 1).expect("small")];
    too_many.extend([0u8; 100]);
    assert!(ReplayWindow::from_bytes(&too_many).is_err());
}

#[test]
fn wrong_device_is_refused() {
    let mut cmd = command(10, start("hello-x"));
    cmd.device_id = DeviceId([9; 8]);
    let sc = SignedCommand::sign(cmd, &developer(), grant(Rights::all(), &["test-*"]));
    let err = refuse(&sc, NOW);
    assert!(matches!(err, VerifyError::WrongDevice { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::WrongDevice);
}

#[test]
fn ungranted_procedure_is_refused_and_rights_are_separate() {
    for (granted, called) in [
        (
            Procedure::Start,
            Args::Stop(proto::StopArgs {
                chute: ChuteName::new("hello-x").expect("ok"),
                timeout_secs: 10,
            }),
        ),
        (Procedure::Stop, start("hello-x")),
        (
            Procedure::Deploy,
            Args::Remove(ChuteArgs {
                chute: ChuteName::new("hello-x").expect("ok"),
            }),
        ),
        (
            Procedure::Logs,
            Args::Restart(ChuteArgs {
                chute: ChuteName::new("hello-x").expect("ok"),
            }),
        ),
        (Procedure::Restart, Args::Status),
    ] {
        let sc = SignedCommand::sign(
            command(11, called),
            &developer(),
            grant(Rights::of(&[granted]), &["test-*"]),
        );
        let err = refuse(&sc, NOW);
        assert!(
            matches!(err, VerifyError::ProcedureNotGranted { .. }),
            "{err}"
        );
        assert_eq!(err.code(), ErrorCode::NotAuthorized);
    }
}

#[test]
fn chute_outside_the_granted_prefixes_is_refused() {
    let g = grant(Rights::all(), &["team-a-*", "demo"]);
    let sc = SignedCommand::sign(command(12, start("team-b-web")), &developer(), g.clone());
    let err = refuse(&sc, NOW);
    assert!(
        matches!(err, VerifyError::ChuteNotGranted { ref chute, .. } if chute == "team-b-web"),
        "{err}"
    );
    // Boundaries: `demo` is exact, `team-a-*` needs the dash and something after it.
    for no in ["demo-2", "demolition", "team-a", "team-ab"] {
        let sc = SignedCommand::sign(command(12, start(no)), &developer(), g.clone());
        assert!(
            matches!(refuse(&sc, NOW), VerifyError::ChuteNotGranted { .. }),
            "{no}"
        );
    }
    for ok in ["team-a-web", "demo"] {
        let sc = SignedCommand::sign(command(13, start(ok)), &developer(), g.clone());
        verifier()
            .verify(&sc, NOW, &mut ReplayWindow::new())
            .expect(ok);
    }
    // Deploy's prefix check is on its chute argument.
    let sc = SignedCommand::sign(command(14, testkit::deploy_args("other")), &developer(), g);
    assert!(matches!(
        refuse(&sc, NOW),
        VerifyError::ChuteNotGranted { .. }
    ));
}

#[test]
fn expired_grant_is_refused() {
    let mut g = testkit::grant_for(&developer(), Rights::all(), &["test-*"], NOW);
    g.expires_at = NOW - 1;
    let sc = SignedCommand::sign(command(15, start("test-x")), &developer(), g.sign(&owner()));
    let err = refuse(&sc, NOW);
    assert!(matches!(err, VerifyError::GrantExpired { .. }), "{err}");
}

#[test]
fn future_grant_and_grant_for_other_devices_are_refused() {
    let mut g = testkit::grant_for(&developer(), Rights::all(), &["test-*"], NOW);
    g.issued_at = NOW + 3600;
    let sc = SignedCommand::sign(command(16, start("test-x")), &developer(), g.sign(&owner()));
    assert!(matches!(
        refuse(&sc, NOW),
        VerifyError::GrantNotYetValid { .. }
    ));

    let mut g = testkit::grant_for(&developer(), Rights::all(), &["test-*"], NOW);
    g.devices = proto::BoundedVec::new(vec![DeviceId([1; 8])]).expect("fits");
    let sc = SignedCommand::sign(
        command(17, start("test-x")),
        &developer(),
        g.clone().sign(&owner()),
    );
    assert!(matches!(
        refuse(&sc, NOW),
        VerifyError::GrantOtherDevice { .. }
    ));
    g.devices = proto::BoundedVec::new(vec![DeviceId([1; 8]), device().device_id()]).expect("fits");
    let sc = SignedCommand::sign(command(18, start("test-x")), &developer(), g.sign(&owner()));
    verifier()
        .verify(&sc, NOW, &mut ReplayWindow::new())
        .expect("device listed");
}

#[test]
fn grant_signed_by_a_non_owner_is_refused() {
    // The developer grants itself everything.
    let g = testkit::grant_for(&developer(), Rights::all(), &["test-*"], NOW).sign(&developer());
    let sc = SignedCommand::sign(command(19, start("test-x")), &developer(), g);
    let err = refuse(&sc, NOW);
    assert!(matches!(err, VerifyError::GrantNotByOwner { .. }), "{err}");
    // A grant widened after the owner signed it.
    let mut g = grant(Rights::of(&[Procedure::Logs]), &["hello-"]);
    g.grant.rights = Rights::all();
    let sc = SignedCommand::sign(command(20, start("test-x")), &developer(), g);
    assert!(matches!(
        refuse(&sc, NOW),
        VerifyError::GrantNotByOwner { .. }
    ));
}

#[test]
fn ids_below_the_low_water_mark_are_refused_and_reordering_within_the_window_is_fine() {
    let v = verifier();
    let mut w = ReplayWindow::new();
    let mk = |id| {
        SignedCommand::sign(
            command(id, start("test-x")),
            &developer(),
            grant(Rights::all(), &["test-*"]),
        )
    };
    // Out of order inside the window.
    for id in [10, 12, 11] {
        v.verify(&mk(id), NOW, &mut w).expect("fresh id");
    }
    // Fill the window so the lowest ids fall off.
    for id in 100..100 + REPLAY_IDS as u64 {
        v.verify(&mk(id), NOW, &mut w).expect("fresh id");
    }
    // 12 was seen and fell off; 5 was never seen but is below the mark too.
    for id in [12, 5] {
        let err = v.verify(&mk(id), NOW, &mut w).expect_err("below the mark");
        assert!(
            matches!(
                err,
                VerifyError::Replay {
                    reason: ReplayReason::BelowLowWater { .. },
                    ..
                }
            ),
            "id {id}: {err}"
        );
    }
    // 10, 11 and 12 fell off, so the mark is 13: an id above it never seen is fine.
    v.verify(&mk(50), NOW, &mut w)
        .expect("unseen id above the mark");
    // Every id still in the window is refused as seen.
    let err = v.verify(&mk(150), NOW, &mut w).expect_err("seen");
    assert!(
        matches!(
            err,
            VerifyError::Replay {
                reason: ReplayReason::AlreadySeen,
                ..
            }
        ),
        "{err}"
    );
    v.verify(&mk(1000), NOW, &mut w)
        .expect("fresh id above the window");
}

#[test]
fn evicting_a_signer_keeps_its_old_commands_refused() {
    let v = verifier();
    let mut w = ReplayWindow::new();
    let first = testkit::signed_command(
        &owner(),
        &developer(),
        device().device_id(),
        1,
        NOW,
        start("test-x"),
    );
    v.verify(&first, NOW, &mut w).expect("fresh");
    // REPLAY_SIGNERS other developers push the first one out.
    for i in 0..REPLAY_SIGNERS {
        let key = Keypair::from_seed([100 + i as u8; 32]);
        let sc = testkit::signed_command(
            &owner(),
            &key,
            device().device_id(),
            1,
            NOW + 1 + i as u64,
            start("test-x"),
        );
        v.verify(&sc, NOW + 1 + i as u64, &mut w)
            .expect("fresh signer");
    }
    assert_eq!(w.signers(), REPLAY_SIGNERS);
    let err = v
        .verify(&first, NOW + 100, &mut w)
        .expect_err("evicted signer's command is still refused");
    assert!(
        matches!(
            err,
            VerifyError::Replay {
                reason: ReplayReason::BeforeFloor { .. },
                ..
            }
        ),
        "{err}"
    );
    // A command issued after the floor is accepted again.
    let later = testkit::signed_command(
        &owner(),
        &developer(),
        device().device_id(),
        2,
        NOW + 200,
        start("test-x"),
    );
    v.verify(&later, NOW + 200, &mut w)
        .expect("re-issued command accepted");
}

#[test]
fn device_signed_results_verify_end_to_end() {
    let sc = testkit::sample_command();
    let dev = device();
    let ok = SignedResult::sign(
        &dev,
        &sc.command,
        Outcome::Ok(BoundedBytes::new(b"done".to_vec()).expect("fits")),
    );
    ok.verify(&dev.public(), &sc.command)
        .expect("genuine result");

    // Tampered outcome.
    let mut bad = ok.clone();
    bad.outcome = Outcome::Ok(BoundedBytes::new(b"pwnd".to_vec()).expect("fits"));
    assert!(matches!(
        bad.verify(&dev.public(), &sc.command),
        Err(proto::ResultError::BadSignature { .. })
    ));
    // Another device's key.
    assert!(matches!(
        ok.verify(&stranger().public(), &sc.command),
        Err(proto::ResultError::WrongDevice { .. })
    ));
    // Answer to another command.
    let other = testkit::signed_command(
        &owner(),
        &developer(),
        dev.device_id(),
        42,
        NOW + 1,
        start("test-x"),
    );
    assert!(matches!(
        ok.verify(&dev.public(), &other.command),
        Err(proto::ResultError::WrongCommand { .. })
    ));
    // Signed by a non-device key claiming the device's id.
    let mut impostor = SignedResult::sign(&stranger(), &sc.command, ok.outcome.clone());
    impostor.device_id = dev.device_id();
    assert!(impostor.verify(&dev.public(), &sc.command).is_err());
}

#[test]
fn session_auth_is_bound_to_key_realm_and_session() {
    let dev = device();
    let ch = Challenge::random(7).expect("randomness");
    assert_ne!(ch.nonce, Challenge::random(7).expect("randomness").nonce);
    let answer = Authenticate::answer(&dev, "default", &ch);
    answer
        .verify("default", &dev.public(), &ch)
        .expect("genuine answer");
    assert!(answer.verify("other-realm", &dev.public(), &ch).is_err());
    let mut other_session = ch.clone();
    other_session.session_id = 8;
    assert!(answer
        .verify("default", &dev.public(), &other_session)
        .is_err());
    let mut other_nonce = ch.clone();
    other_nonce.nonce[0] ^= 1;
    assert!(answer
        .verify("default", &dev.public(), &other_nonce)
        .is_err());
    assert!(answer.verify("default", &stranger().public(), &ch).is_err());
}

#[test]
fn keys_round_trip_through_seed_and_hex() {
    let k = Keypair::generate().expect("randomness");
    let again = Keypair::from_seed(k.seed());
    assert_eq!(k.public(), again.public());
    assert_eq!(
        proto::PublicKey::from_hex(&k.public_hex()).expect("hex"),
        k.public()
    );
    assert_eq!(k.device_id().to_hex().len(), 16);
    assert_eq!(
        DeviceId::from_hex(&k.device_id().to_hex()).expect("hex"),
        k.device_id()
    );
    assert!(proto::PublicKey::from_hex("zz").is_err());
    assert_ne!(
        k.public(),
        Keypair::generate().expect("randomness").public()
    );
}

#[test]
fn selftest_passes() {
    let line = proto::selftest().expect("selftest");
    assert!(line.starts_with("proto selftest ok"), "{line}");
}

#[test]
fn typed_replies_travel_inside_signed_results() {
    let sc = testkit::sample_command();
    let reply = proto::Reply::Status(testkit::heartbeat(3));
    let result = SignedResult::sign(&device(), &sc.command, reply.to_outcome().expect("fits"));
    result
        .verify(&device().public(), &sc.command)
        .expect("genuine");
    let Outcome::Ok(payload) = &result.outcome else {
        panic!("ok outcome expected");
    };
    assert_eq!(proto::Reply::from_payload(payload).expect("decodes"), reply);
    assert!(proto::Reply::from_payload(&payload[..payload.len() - 1]).is_err());
}

#[test]
fn update_grant_supersedes_older_grants_for_that_key() {
    let mut v = verifier();
    let old = grant(Rights::all(), &["test-*"]);
    let sc = SignedCommand::sign(command(30, start("test-x")), &developer(), old.clone());
    v.check(&sc, NOW)
        .expect("old grant valid before the update");

    // The owner revokes: a newer grant with no rights.
    let mut newer = testkit::grant_for(&developer(), Rights::NONE, &[], NOW);
    newer.issued_at = NOW - 10;
    let newer = newer.sign(&owner());
    v.install_grant(&newer)
        .expect("owner-signed newer grant installs");

    let mut w = busy_window();
    let before = w.clone();
    let err = v.verify(&sc, NOW, &mut w).expect_err("superseded grant");
    assert!(matches!(err, VerifyError::GrantSuperseded { .. }), "{err}");
    assert_eq!(w, before);
    // The newer grant itself grants nothing.
    let sc = SignedCommand::sign(command(31, start("test-x")), &developer(), newer);
    assert!(matches!(
        v.check(&sc, NOW),
        Err(VerifyError::ProcedureNotGranted { .. })
    ));
    // Other developers are unaffected.
    let other = Keypair::from_seed([50; 32]);
    let sc = testkit::signed_command(
        &owner(),
        &other,
        device().device_id(),
        1,
        NOW,
        start("test-x"),
    );
    v.check(&sc, NOW).expect("other key unaffected");

    // Not owner-signed, or older than installed: refused.
    assert!(matches!(
        v.install_grant(
            &testkit::grant_for(&developer(), Rights::all(), &["test-*"], NOW).sign(&developer())
        ),
        Err(proto::GrantUpdateError::NotByOwner { .. })
    ));
    assert!(matches!(
        v.install_grant(&old),
        Err(proto::GrantUpdateError::Older { .. })
    ));

    // The floors persist.
    let restored = proto::GrantFloors::from_bytes(&v.grants.to_bytes()).expect("loads");
    assert_eq!(restored, v.grants);
}
