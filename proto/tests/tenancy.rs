//! Many developers on one device (issue 12): grant patterns on name boundaries, the
//! developer's signature binding the grant, no unknown rights, supersession floors that
//! are never forgotten, per-chute ordering and a time floor against a clock set back.

use proto::testkit::{self, developer, device, owner, NOW};
use proto::{
    decode, encode, Args, Call, ChuteArgs, ChuteName, ChutePattern, ClockState, Command,
    CommandOrder, ErrorCode, GrantFloors, GrantUpdateError, Keypair, Message, Policy, ProtoError,
    ReplayWindow, Rights, SignedCommand, SignedGrant, Verifier, VerifyError, MAX_COMMAND_LIFETIME,
    MAX_GRANT_FLOORS,
};

fn start(chute: &str) -> Args {
    Args::Start(ChuteArgs {
        chute: ChuteName::new(chute).expect("valid name"),
    })
}

fn command(request_id: u64, issued_at: u64, args: Args) -> Command {
    Command {
        device_id: device().device_id(),
        request_id,
        issued_at,
        expires_at: issued_at + 300,
        args,
        grant_digest: [0; 32],
    }
}

fn grant(rights: Rights, patterns: &[&str], issued_at: u64) -> SignedGrant {
    let mut g = testkit::grant_for(&developer(), rights, patterns, NOW);
    g.issued_at = issued_at;
    g.sign(&owner())
}

fn sign(request_id: u64, args: Args, grant: SignedGrant) -> SignedCommand {
    SignedCommand::sign(command(request_id, NOW, args), &developer(), grant)
}

fn call_frame(sc: &SignedCommand) -> Vec<u8> {
    encode(&Message::Call(Box::new(Call {
        request: 1,
        command: sc.clone(),
    })))
    .expect("encodes")
}

#[test]
fn chute_patterns_match_on_name_boundaries() {
    let p = |s: &str| ChutePattern::new(s).expect("valid pattern");
    assert!(p("demo").covers("demo"));
    assert!(!p("demo").covers("demolition"), "an exact name is exact");
    assert!(!p("demo").covers("demo-x"));
    assert!(p("acme-*").covers("acme-web"));
    assert!(p("acme-*").covers("acme-web-2"));
    assert!(!p("acme-*").covers("acme"), "the bare stem is not under it");
    assert!(!p("acme-*").covers("acmex"));
    assert!(
        !p("acme-*").covers("acme-"),
        "something must follow the dash"
    );
    assert!(!p("acme-*").covers("xacme-web"));

    // Through the verifier: a grant for `demo` does not reach `demolition`.
    let v = testkit::sample_verifier();
    let g = grant(Rights::all(), &["demo", "acme-*"], NOW - 10);
    for (chute, ok) in [
        ("demo", true),
        ("demolition", false),
        ("acme-web", true),
        ("acme", false),
        ("acmex", false),
    ] {
        let r = v.check(&sign(1, start(chute), g.clone()), NOW);
        assert_eq!(r.is_ok(), ok, "{chute}: {r:?}");
        if let Err(e) = r {
            assert!(matches!(e, VerifyError::ChuteNotGranted { .. }), "{e}");
            assert!(e.to_string().contains("acme-*"), "names the patterns: {e}");
        }
    }
}

#[test]
fn other_pattern_forms_are_refused_when_issued_and_when_decoded() {
    for bad in [
        "", "*", "-*", "demo*", "de*mo", "a-*-*", "*-x", "Demo", "a_b-*",
    ] {
        let e = ChutePattern::new(bad).expect_err(bad);
        assert!(e.to_string().contains("chute pattern"), "{bad}: {e}");
    }
    let e = ChutePattern::new("demo*").expect_err("no dash");
    assert!(e.to_string().contains("-*"), "says what is allowed: {e}");

    // A CALL whose grant carries `demo*` (patched in after signing, as a hostile or
    // older tool would send it) is refused while decoding, naming the pattern.
    let sc = sign(
        1,
        start("demox"),
        grant(Rights::all(), &["demox"], NOW - 10),
    );
    let mut frame = call_frame(&sc);
    let pos = frame
        .windows(6)
        .position(|w| w == b"\x05demox")
        .expect("pattern in frame");
    frame[pos + 5] = b'*';
    let err = decode(&frame).expect_err("bad pattern decoded");
    assert!(matches!(err, ProtoError::Field { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert!(err.to_string().contains("demo*"), "{err}");
}

#[test]
fn a_grant_swapped_after_signing_is_refused() {
    let v = testkit::sample_verifier();
    // The developer signed under a narrow grant ...
    let narrow = grant(Rights::of(&[proto::Procedure::Start]), &["web"], NOW - 10);
    let sc = sign(5, start("web"), narrow);
    v.check(&sc, NOW).expect("valid as signed");
    // ... and someone in the path attaches an older, broader grant of the same key.
    let mut swapped = sc.clone();
    swapped.grant = grant(Rights::all(), &["web", "other-*"], NOW - 1000);
    let mut w = ReplayWindow::new();
    let err = v
        .verify(&swapped, NOW, &mut w)
        .expect_err("grant not covered by the signature");
    assert!(matches!(err, VerifyError::GrantNotBound { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::InvalidGrant);
    assert_eq!(w, ReplayWindow::new(), "refusal recorded nothing");
    assert_eq!(sc.command.grant_digest, sc.grant.digest());
}

#[test]
fn unknown_rights_bits_are_refused() {
    assert!(Rights::from_bits(Rights::all().bits()).is_ok());
    for bit in [0, 10, 31] {
        let e = Rights::from_bits(1 << bit).expect_err("unknown bit");
        assert!(e.to_string().contains("rights bit"), "{e}");
    }
    // On the wire: the sample grant's rights byte with bit 0 (no procedure) set.
    let sc = testkit::sample_command();
    let mut frame = call_frame(&sc);
    let mut needle = sc.grant.grant.developer.0.to_vec();
    needle.push(sc.grant.grant.rights.bits() as u8);
    let pos = frame
        .windows(needle.len())
        .position(|w| w == needle.as_slice())
        .expect("grant in frame");
    frame[pos + 32] |= 1;
    let err = decode(&frame).expect_err("unknown right decoded");
    assert!(err.to_string().contains("rights bit"), "{err}");
}

#[test]
fn grant_floors_are_never_evicted_by_capacity() {
    let key_n = |i: usize| {
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64 + 1000).to_le_bytes());
        Keypair::from_seed(seed).public()
    };
    let mut floors = GrantFloors::default();
    for i in 0..MAX_GRANT_FLOORS {
        floors.raise(&key_n(i), NOW + i as u64).expect("room");
    }
    let before = floors.clone();
    let err = floors
        .raise(&key_n(MAX_GRANT_FLOORS), NOW)
        .expect_err("full");
    assert!(matches!(err, GrantUpdateError::Full { .. }), "{err}");
    assert!(err.to_string().contains("revoke --all"), "says how: {err}");
    assert_eq!(floors, before, "nothing was forgotten to make room");
    for i in 0..MAX_GRANT_FLOORS {
        assert_eq!(floors.floor_for(&key_n(i)), NOW + i as u64);
    }
    // Raising an existing key's floor still works when full.
    floors.raise(&key_n(0), NOW + 5000).expect("existing key");
    assert_eq!(floors.floor_for(&key_n(0)), NOW + 5000);
    let restored = GrantFloors::from_bytes(&floors.to_bytes()).expect("loads");
    assert_eq!(restored, floors);
}

#[test]
fn local_revocation_supersedes_grants_issued_until_now() {
    let mut v = testkit::sample_verifier();
    let sc = testkit::sample_command();
    v.check(&sc, NOW).expect("valid");
    v.grants.revoke(&developer().public(), NOW).expect("room");
    let err = v.check(&sc, NOW).expect_err("revoked");
    assert!(matches!(err, VerifyError::GrantSuperseded { .. }), "{err}");
    // A grant the owner issues afterwards works again.
    let later = grant(Rights::all(), &["hello-*"], NOW + 1);
    let again = SignedCommand::sign(
        command(43, NOW + 2, start("hello-web")),
        &developer(),
        later,
    );
    v.check(&again, NOW + 2).expect("newer grant");
    // revoke_all: every developer.
    let mut v = testkit::sample_verifier();
    v.grants.revoke_all(NOW);
    assert!(v.check(&sc, NOW).is_err());
}

#[test]
fn a_command_issued_before_the_last_change_of_its_chute_is_stale() {
    let mut order = CommandOrder::new();
    let g = grant(Rights::all(), &["web", "db"], NOW - 100);
    let v2 = SignedCommand::sign(command(2, NOW, start("web")), &developer(), g.clone());
    let v1 = SignedCommand::sign(command(1, NOW - 60, start("web")), &developer(), g.clone());
    order.check(&v2.command).expect("first");
    order.record(&v2.command);
    let err = order
        .check(&v1.command)
        .expect_err("older, delivered later");
    assert!(matches!(err, VerifyError::Stale { .. }), "{err}");
    assert_eq!(err.code(), ErrorCode::Stale);
    assert!(err.to_string().contains("web"), "{err}");
    // Another chute is unaffected; a read on the same chute too.
    let db = command(3, NOW - 60, start("db"));
    order.check(&db).expect("other chute");
    let read = command(
        4,
        NOW - 60,
        Args::Inspect(ChuteArgs {
            chute: ChuteName::new("web").expect("valid"),
        }),
    );
    order.check(&read).expect("reads are not ordered");
    // Same second is fine (deploy then start, issued together).
    order
        .check(&command(5, NOW, start("web")))
        .expect("same second");
    // Persisted.
    let restored = CommandOrder::from_bytes(&order.to_bytes()).expect("loads");
    assert!(
        restored.check(&v1.command).is_err(),
        "stale across restarts"
    );
}

#[test]
fn time_floor_keeps_a_clock_set_back_from_reviving_expired_commands() {
    let v = testkit::sample_verifier();
    let mut order = CommandOrder::new();
    let g = grant(Rights::all(), &["web"], NOW - 100);
    let old = SignedCommand::sign(command(1, NOW, start("web")), &developer(), g.clone());
    let newer = SignedCommand::sign(command(2, NOW + 900, start("web")), &developer(), g);
    // The newer command was verified at NOW + 900: that is the floor now.
    v.check(&newer, order.judge_time(NOW + 900)).expect("valid");
    order.record(&newer.command);
    assert_eq!(order.time_floor(), NOW + 900);
    // Someone sets the clock back to NOW: the old command would be valid by the clock.
    let clock = NOW + 10;
    v.check(&old, clock).expect("by the bare clock it is valid");
    let judged = order.judge_time(clock);
    let err = v.check(&old, judged).expect_err("judged at the floor");
    assert!(matches!(err, VerifyError::Expired { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("device time is {}", NOW + 900)),
        "names the device time it judged by: {err}"
    );
    assert_eq!(order.clock_state(clock), ClockState::BehindFloor);
    assert_eq!(order.clock_state(NOW + 901), ClockState::Ok);
    assert_eq!(ClockState::BehindFloor.as_str(), "behind floor");
    // A clock ahead: the newest authentic command arrived already expired.
    order.note_expired_on_arrival(NOW + 2000);
    assert_eq!(order.clock_state(NOW + 5000), ClockState::Ahead);
    assert_eq!(ClockState::Ahead.to_string(), "ahead");
}

#[test]
fn time_refusals_name_the_device_time() {
    let v = testkit::sample_verifier();
    let sc = testkit::sample_command();
    for now in [NOW - 1000, NOW + 1000] {
        let e = v.check(&sc, now).expect_err("out of time");
        assert!(
            e.to_string().contains(&format!("device time {now}"))
                || e.to_string().contains(&format!("device time is {now}")),
            "{e}"
        );
    }
}

#[test]
fn default_command_lifetime_is_300s_and_at_most_an_hour() {
    assert_eq!(Policy::default().max_lifetime_secs, 300);
    assert_eq!(MAX_COMMAND_LIFETIME, 3600);
    let v = testkit::sample_verifier();
    let g = grant(Rights::all(), &["web"], NOW - 100);
    let mut long = command(1, NOW, start("web"));
    long.expires_at = NOW + 301;
    let sc = SignedCommand::sign(long, &developer(), g);
    let e = v.check(&sc, NOW).expect_err("301 s lifetime");
    assert!(matches!(e, VerifyError::BadLifetime { .. }), "{e}");
    let mut v = Verifier::new(owner().public(), device().device_id());
    v.policy.max_lifetime_secs = 3600;
    v.check(&sc, NOW).expect("allowed when configured");
}

#[test]
fn command_order_stays_bounded_and_never_looser() {
    let mut order = CommandOrder::new();
    let n = proto::MAX_ORDERED_CHUTES + 10;
    for i in 0..n {
        order.record(&command(i as u64, NOW + i as u64, start(&format!("c-{i}"))));
    }
    assert!(order.to_bytes().len() < (proto::MAX_ORDERED_CHUTES + 1) * 24);
    // The earliest chutes were folded away; their old commands stay stale.
    let e = order.check(&command(1, NOW, start("c-0")));
    assert!(e.is_err(), "a forgotten chute's old command is still stale");
    order
        .check(&command(1, NOW + n as u64, start("c-0")))
        .expect("a new one is fine");
}
