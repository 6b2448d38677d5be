//! Property tests: the manifest parser never panics, the ledger never over-commits and
//! refused operations change nothing, the lifecycle never releases a reservation except
//! on the way to `Dead` and ignores stale timers.

use chutes::{
    Action, Amounts, ChuteName, ChuteState, Input, Ledger, Lifecycle, LifecycleConfig, Manifest,
    Resource, RestartPolicy,
};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../examples/hello-web/chute.toml");

// ---------------------------------------------------------------- manifest

#[derive(Debug, Clone)]
enum Mutation {
    Delete { at: usize, len: usize },
    Insert { at: usize, text: String },
    Replace { at: usize, ch: char },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let fragments = prop_oneof![
        any::<String>(),
        Just("=".to_owned()),
        Just("\"".to_owned()),
        Just("[".to_owned()),
        Just("\n[resources]\n".to_owned()),
        Just("\nmemory = \"1MiB\"\n".to_owned()),
        Just("99999999999999999999".to_owned()),
        Just("-".to_owned()),
        Just("1e308".to_owned()),
        Just("nan".to_owned()),
        Just(".".to_owned()),
        Just("\n".to_owned()),
        "[a-z_]{1,8} = [0-9]{1,3}",
    ];
    prop_oneof![
        (any::<usize>(), 0usize..20).prop_map(|(at, len)| Mutation::Delete { at, len }),
        (any::<usize>(), fragments).prop_map(|(at, text)| Mutation::Insert { at, text }),
        (any::<usize>(), any::<char>()).prop_map(|(at, ch)| Mutation::Replace { at, ch }),
    ]
}

fn apply(src: &str, muts: &[Mutation]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for m in muts {
        let n = chars.len().max(1);
        match m {
            Mutation::Delete { at, len } => {
                let at = at % n;
                let end = (at + len).min(chars.len());
                if at < end {
                    chars.drain(at..end);
                }
            }
            Mutation::Insert { at, text } => {
                let at = at % (chars.len() + 1);
                chars.splice(at..at, text.chars());
            }
            Mutation::Replace { at, ch } => {
                if !chars.is_empty() {
                    let at = at % chars.len();
                    chars[at] = *ch;
                }
            }
        }
    }
    chars.into_iter().collect()
}

fn check_parsed(m: &Manifest) {
    assert!(m.resources.memory_bytes >= 4 << 20);
    assert!((10..=1_024_000).contains(&m.resources.cpu_millicores));
    assert!((1..=1_000_000).contains(&m.resources.pids));
    assert!(ChuteName::parse(m.name.as_str()).is_ok());
    for bps in [m.network.bandwidth_down_bps, m.network.bandwidth_up_bps]
        .into_iter()
        .flatten()
    {
        assert!(bps >= 8_000);
    }
}

proptest! {
    #[test]
    fn manifest_parser_never_panics_on_arbitrary_text(s in any::<String>()) {
        if let Ok(m) = Manifest::from_toml_str(&s) { check_parsed(&m) }
    }

    #[test]
    fn manifest_parser_never_panics_on_mutated_manifests(muts in prop::collection::vec(mutation(), 1..6)) {
        let s = apply(EXAMPLE, &muts);
        match Manifest::from_toml_str(&s) {
            Ok(m) => check_parsed(&m),
            // Every error renders to a bounded, non-empty message.
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
                prop_assert!(msg.len() < 2_000, "{} bytes: {}", msg.len(), msg);
            }
        }
    }

    #[test]
    fn size_and_rate_parsers_never_panic(s in "[0-9. ]{0,30}[A-Za-z]{0,5}") {
        let _ = chutes::parse_bytes(&s);
        let _ = chutes::parse_rate_bps(&s);
    }
}

// ---------------------------------------------------------------- ledger

const NAMES: [&str; 5] = ["a", "b", "c", "d", "e"];

fn cap() -> Amounts {
    Amounts {
        cpu_millicores: 2_000,
        memory_bytes: 1 << 30,
        pids: 1_000,
        bandwidth_down_bps: 100_000_000,
        bandwidth_up_bps: 50_000_000,
    }
}

fn amounts() -> impl Strategy<Value = Amounts> {
    // Mostly sizes that sometimes fit, sometimes not; occasionally extremes.
    let part = |max: u64| prop_oneof![8 => 0..=max, 1 => Just(0u64), 1 => Just(u64::MAX)];
    (
        part(1_200),
        part(700 << 20),
        part(600),
        part(60_000_000),
        part(30_000_000),
    )
        .prop_map(|(c, m, p, d, u)| Amounts {
            cpu_millicores: c,
            memory_bytes: m,
            pids: p,
            bandwidth_down_bps: d,
            bandwidth_up_bps: u,
        })
}

#[derive(Debug, Clone)]
enum LedgerOp {
    Admit(usize, Amounts),
    CheckAdmit(usize, Amounts),
    Resize(usize, Amounts),
    CheckResize(usize, Amounts),
    Release(usize),
    Force(usize, Amounts),
}

fn ledger_op(with_force: bool) -> impl Strategy<Value = LedgerOp> {
    let i = 0..NAMES.len();
    let force_weight = if with_force { 1 } else { 0 };
    prop_oneof![
        3 => (i.clone(), amounts()).prop_map(|(i, a)| LedgerOp::Admit(i, a)),
        1 => (i.clone(), amounts()).prop_map(|(i, a)| LedgerOp::CheckAdmit(i, a)),
        3 => (i.clone(), amounts()).prop_map(|(i, a)| LedgerOp::Resize(i, a)),
        1 => (i.clone(), amounts()).prop_map(|(i, a)| LedgerOp::CheckResize(i, a)),
        2 => i.clone().prop_map(LedgerOp::Release),
        force_weight => (i, amounts()).prop_map(|(i, a)| LedgerOp::Force(i, a)),
    ]
}

fn name(i: usize) -> ChuteName {
    ChuteName::parse(NAMES[i]).expect("valid test name")
}

fn exact_sum(l: &Ledger) -> [u128; 5] {
    let mut sum = [0u128; 5];
    for (_, r) in l.reservations() {
        for (k, res) in Resource::ALL.iter().enumerate() {
            sum[k] += u128::from(r.get(*res));
        }
    }
    sum
}

fn run_ledger(ops: &[LedgerOp]) -> Result<(), TestCaseError> {
    let mut l = Ledger::new(cap());
    let mut forced = false;
    for op in ops {
        let before = postcard::to_stdvec(&l).expect("ledger serializes");
        let failed = match op.clone() {
            LedgerOp::Admit(i, a) => {
                let dry = l.check_admit(&name(i), &a);
                let real = l.admit(name(i), a);
                prop_assert_eq!(&dry, &real, "check_admit and admit disagree");
                if real.is_ok() {
                    prop_assert_eq!(l.get(&name(i)), Some(&a));
                }
                real.is_err()
            }
            LedgerOp::CheckAdmit(i, a) => {
                let _ = l.check_admit(&name(i), &a);
                true
            }
            LedgerOp::Resize(i, a) => {
                let old = l.get(&name(i)).copied();
                let dry = l.check_resize(&name(i), &a);
                let real = l.resize(&name(i), a);
                prop_assert_eq!(
                    dry.is_ok(),
                    real.is_ok(),
                    "check_resize and resize disagree"
                );
                if let Ok(prev) = real {
                    prop_assert_eq!(Some(prev), old);
                    prop_assert_eq!(l.get(&name(i)), Some(&a));
                }
                // A pure shrink of an existing reservation always succeeds.
                if let Some(old) = old {
                    if a.fits_within(&old) {
                        prop_assert!(l.get(&name(i)) == Some(&a), "shrink refused");
                    }
                }
                l.get(&name(i)) != Some(&a) || old == Some(a)
            }
            LedgerOp::CheckResize(i, a) => {
                let _ = l.check_resize(&name(i), &a);
                true
            }
            LedgerOp::Release(i) => l.release(&name(i)).is_none(),
            LedgerOp::Force(i, a) => {
                l.force_insert(name(i), a);
                forced = true;
                false
            }
        };
        if failed {
            let after = postcard::to_stdvec(&l).expect("ledger serializes");
            prop_assert_eq!(
                before,
                after,
                "a refused or dry-run op changed the ledger: {:?}",
                op
            );
        }
        let sum = exact_sum(&l);
        let used = l.used();
        let mut over = Vec::new();
        for (k, r) in Resource::ALL.iter().enumerate() {
            prop_assert_eq!(u128::from(used.get(*r)), sum[k].min(u128::from(u64::MAX)));
            if sum[k] > u128::from(cap().get(*r)) {
                over.push(*r);
            }
            prop_assert_eq!(l.free().get(*r), cap().get(*r).saturating_sub(used.get(*r)));
        }
        prop_assert_eq!(l.overcommitted(), over.clone());
        if !forced {
            prop_assert!(used.fits_within(&l.capacity()), "over capacity: {:?}", used);
            prop_assert!(over.is_empty());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ledger_never_overcommits_and_refusals_change_nothing(
        ops in prop::collection::vec(ledger_op(false), 1..60)
    ) {
        run_ledger(&ops)?;
    }

    #[test]
    fn ledger_with_force_insert_reports_overcommit_exactly(
        ops in prop::collection::vec(ledger_op(true), 1..60)
    ) {
        run_ledger(&ops)?;
    }
}

// ---------------------------------------------------------------- lifecycle

#[derive(Debug, Clone)]
enum Step {
    Input(Input),
    /// Fire the latest requested timer (the one an agent would actually run).
    FireCurrent,
    /// Fire an older or made-up token.
    FireStale(u64),
    Advance(u64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        1 => Just(Step::Input(Input::Installed)),
        1 => Just(Step::Input(Input::InstallFailed { reason: "x".into() })),
        2 => Just(Step::Input(Input::StartRequested)),
        2 => Just(Step::Input(Input::StopRequested)),
        2 => Just(Step::Input(Input::RestartRequested)),
        1 => Just(Step::Input(Input::RemoveRequested)),
        4 => Just(Step::Input(Input::ContainerStarted)),
        4 => prop_oneof![Just(0), Just(1), Just(137), any::<i32>()]
            .prop_map(|c| Step::Input(Input::ContainerExited { exit_code: c })),
        4 => Just(Step::FireCurrent),
        2 => (0u64..40).prop_map(Step::FireStale),
        3 => prop_oneof![Just(0u64), 0u64..5_000, Just(30_000), Just(u64::MAX / 4)].prop_map(Step::Advance),
    ]
}

fn policy() -> impl Strategy<Value = RestartPolicy> {
    prop_oneof![
        Just(RestartPolicy::Always),
        Just(RestartPolicy::OnFailure),
        Just(RestartPolicy::Never)
    ]
}

fn start_state() -> impl Strategy<Value = Option<ChuteState>> {
    prop_oneof![
        3 => Just(None),
        1 => prop_oneof![
            Just(ChuteState::Running),
            Just(ChuteState::Restarting),
            Just(ChuteState::Stopped),
            Just(ChuteState::Failed),
            Just(ChuteState::Installing),
        ].prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn lifecycle_invariants_hold_under_random_inputs(
        policy in policy(),
        restored in start_state(),
        steps in prop::collection::vec(step(), 0..80),
    ) {
        let cfg = LifecycleConfig::default();
        let mut now = 0u64;
        let mut current: Option<u64> = None;
        let mut l = match restored {
            None => Lifecycle::new(policy, cfg),
            Some(s) => Lifecycle::restore(s, 0, policy, cfg),
        };
        let mut actions_log = l.resume();
        let mut released = false;
        for st in steps {
            for a in &actions_log {
                match a {
                    Action::SetTimer { token, .. } => current = Some(*token),
                    Action::CancelTimers => current = None,
                    _ => {}
                }
            }
            let (input, stale) = match st {
                Step::Advance(d) => { now = now.saturating_add(d); actions_log = Vec::new(); continue; }
                Step::Input(i) => (i, false),
                Step::FireCurrent => match current {
                    Some(t) => { current = None; (Input::TimerFired { token: t }, false) }
                    None => { actions_log = Vec::new(); continue; }
                },
                Step::FireStale(t) => {
                    if Some(t) == current { actions_log = Vec::new(); continue; }
                    (Input::TimerFired { token: t }, true)
                }
            };
            let before = l.clone();
            let was_dead = before.state() == ChuteState::Dead;
            let checked = l.check(&input);
            let actions = l.handle(input.clone(), now);

            if checked.is_err() {
                prop_assert!(actions.is_empty(), "refused input emitted {:?}", actions);
                prop_assert_eq!(&l, &before, "refused input changed the machine");
            }
            if stale {
                prop_assert!(actions.is_empty(), "stale timer {:?} emitted {:?}", input, actions);
                prop_assert_eq!(&l, &before);
            }
            let releases = actions.iter().filter(|a| **a == Action::ReleaseReservation).count();
            if releases > 0 {
                prop_assert_eq!(releases, 1);
                prop_assert_eq!(l.state(), ChuteState::Dead, "release outside Dead: {:?}", actions);
                prop_assert!(!released, "released twice");
                released = true;
            }
            if l.state() == ChuteState::Dead && !was_dead {
                prop_assert_eq!(releases, 1, "became Dead without releasing: {:?}", actions);
            }
            if was_dead {
                prop_assert_eq!(l.state(), ChuteState::Dead);
                prop_assert!(actions.is_empty());
            }
            prop_assert!(l.restarts() >= before.restarts());
            prop_assert!(l.next_backoff_ms() <= cfg.backoff.max_ms);
            for a in &actions {
                if let Action::SetTimer { after_ms, .. } = a {
                    prop_assert!(*after_ms <= cfg.backoff.max_ms.max(cfg.zombie_timeout_ms));
                }
            }
            actions_log = actions;
        }
    }
}

// ---------------------------------------------------------------- confirmations

use chutes::{Confirmations, DiedEvent, StartEvent};

/// What can happen to a chute's runs, with Podman timestamps (small, so they collide).
#[derive(Debug, Clone)]
enum RunOp {
    OurStart(i64),
    OurStop,
    StartEvent(i64),
    DiedEvent(i64),
    Resync,
    StartObserved,
}

fn run_op() -> impl Strategy<Value = RunOp> {
    prop_oneof![
        (0i64..50).prop_map(RunOp::OurStart),
        Just(RunOp::OurStop),
        (0i64..50).prop_map(RunOp::StartEvent),
        (0i64..50).prop_map(RunOp::DiedEvent),
        Just(RunOp::Resync),
        Just(RunOp::StartObserved),
    ]
}

proptest! {
    /// Whatever order Podman's events arrive in relative to the agent's own calls:
    /// a `died` older than a start already known is never taken for an exit; a `died`
    /// after our stop (and before any new run) only confirms it; each of our starts
    /// swallows at most one `start` event, and only until a resync; `starts_seen` grows
    /// by exactly one per run, never otherwise.
    #[test]
    fn confirmations_never_mistake_a_late_event(ops in prop::collection::vec(run_op(), 0..80)) {
        let mut c = Confirmations::new();
        let mut latest_start = 0i64;
        let mut our_unconfirmed = 0u32;
        let mut stopped_by_us = false;
        let mut runs = 0u64;
        for op in ops {
            let seen_before = c.starts_seen();
            match op {
                RunOp::OurStart(t) => {
                    c.started_by_us(t);
                    latest_start = latest_start.max(t);
                    our_unconfirmed += 1;
                    stopped_by_us = false;
                    runs += 1;
                }
                RunOp::OurStop => {
                    c.exited_by_us();
                    stopped_by_us = true;
                }
                RunOp::StartEvent(t) => {
                    let v = c.start_event(t);
                    latest_start = latest_start.max(t);
                    if our_unconfirmed > 0 {
                        prop_assert_eq!(v, StartEvent::Confirms);
                        our_unconfirmed -= 1;
                    } else {
                        prop_assert_eq!(v, StartEvent::NewRun, "no start of ours is pending");
                        stopped_by_us = false;
                        runs += 1;
                    }
                }
                RunOp::DiedEvent(t) => {
                    let v = c.died_event(t);
                    if t != 0 && t < latest_start {
                        prop_assert_eq!(v, DiedEvent::Stale, "older than the start at {}", latest_start);
                    } else if stopped_by_us {
                        prop_assert_eq!(v, DiedEvent::Confirms);
                    } else {
                        prop_assert_eq!(v, DiedEvent::Exited);
                    }
                }
                RunOp::Resync => {
                    c.resynced();
                    our_unconfirmed = 0;
                    stopped_by_us = false;
                }
                RunOp::StartObserved => {
                    c.start_observed();
                    runs += 1;
                }
            }
            prop_assert!(c.starts_seen() >= seen_before);
            prop_assert_eq!(c.starts_seen(), runs);
            prop_assert_eq!(c.last_start_nanos(), latest_start);
        }
    }

    /// A refresh asked for is due exactly once.
    #[test]
    fn a_refresh_is_taken_once(asks in 0usize..5) {
        let mut c = Confirmations::new();
        for _ in 0..asks {
            c.want_refresh();
        }
        prop_assert_eq!(c.take_refresh(), asks > 0);
        prop_assert!(!c.take_refresh());
    }
}
