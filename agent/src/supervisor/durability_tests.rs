//! Owns the durability tests against the fake engine: a full disk refuses every operation
//! and changes nothing; a removal Podman did not do is not reported done; the state comes
//! back from the journal when the snapshot is corrupt or gone; and a randomized crash loop
//! (the agent dropped between two polls of its tasks, as `kill -9` would leave it) over
//! deploys, updates, stops, starts, restarts and removals, checking after every restart that
//! what was acknowledged held and nothing leaked.

use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chute_api::{ChuteState, ErrorCode, Request, Response};
use smol::LocalExecutor;

use super::fake::FakePodman;
use super::{Agent, LABEL_CHUTE, LABEL_INSTANCE};
use crate::api::Event;
use crate::config::{AgentConfig, HostFacts};
use crate::podman::Podman;
use crate::snapshot;

const IMAGE: &str = "localhost/fake:1";
const IMAGE2: &str = "localhost/fake:2";

/// One agent process: its executor and its state. Dropping it without running the
/// executor again is a crash: its tasks are never polled again.
struct Node {
    ex: Rc<LocalExecutor<'static>>,
    agent: Rc<Agent>,
}

fn boot(fake: &Rc<FakePodman>, dir: &Path) -> Node {
    let ex = Rc::new(LocalExecutor::new());
    let mut cfg = AgentConfig::defaults(HostFacts {
        cpus: 2,
        memory_bytes: 1 << 30,
    });
    // The fake's images are tags; pinning by content is tested against real Podman.
    cfg.allow_unpinned_images = true;
    let agent = Agent::with_runtime(
        Podman::new("/nonexistent/podman.sock"),
        fake.clone(),
        cfg,
        dir.to_owned(),
        ex.clone(),
    );
    let a = agent.clone();
    smol::block_on(ex.run(async move { a.reconcile().await })).expect("reconciled");
    let node = Node { ex, agent };
    node.idle(20);
    node
}

impl Node {
    fn ask(&self, req: Request) -> Result<Response, chute_api::ApiError> {
        let (tx, _rx) = smol::channel::unbounded::<Event>();
        let agent = self.agent.clone();
        smol::block_on(self.ex.run(async move { agent.handle(req, &tx).await }))
    }

    /// Lets background tasks (reconciliation's starts) run for `ms`.
    fn idle(&self, ms: u64) {
        smol::block_on(self.ex.run(smol::Timer::after(Duration::from_millis(ms))));
    }

    fn state(&self, name: &str) -> Option<(ChuteState, String)> {
        self.agent
            .list()
            .into_iter()
            .find(|c| c.name.as_str() == name)
            .map(|c| (c.state, c.version))
    }
}

fn manifest(name: &str, version: u32, memory_mib: u32) -> String {
    let image = if version.is_multiple_of(2) {
        IMAGE2
    } else {
        IMAGE
    };
    // The command differs per version, so every update replaces the container.
    let secs = 3600 + version;
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nimage = \"{image}\"\ncommand = [\"sleep\", \"{secs}\"]\n[resources]\ncpu = 0.25\nmemory = \"{memory_mib}MiB\"\npids = 32\n[restart]\npolicy = \"always\"\n"
    )
}

fn engine() -> Rc<FakePodman> {
    let f = FakePodman::with_image(IMAGE);
    f.state.borrow_mut().images.insert(IMAGE2.into());
    Rc::new(f)
}

fn deploy(toml: &str) -> Request {
    Request::Deploy {
        manifest_toml: toml.to_owned(),
        dir: None,
    }
}

#[test]
fn with_the_disk_full_every_operation_is_refused_naming_the_file_and_nothing_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = engine();
    let n = boot(&fake, dir.path());
    n.ask(deploy(&manifest("run", 1, 32))).expect("deployed");
    n.ask(deploy(&manifest("idle", 1, 32))).expect("deployed");
    n.ask(Request::Stop {
        name: "idle".into(),
        timeout_secs: None,
    })
    .expect("stopped");
    let on_disk = std::fs::read(dir.path().join(snapshot::FILE_NAME)).expect("snapshot");
    let used = n.agent.status().pools.used;
    fake.take_calls();

    n.agent.fail_saves.set(true);
    let refused = [
        deploy(&manifest("new", 1, 32)),
        deploy(&manifest("run", 2, 48)),
        Request::Stop {
            name: "run".into(),
            timeout_secs: None,
        },
        Request::Restart { name: "run".into() },
        Request::Remove { name: "run".into() },
        Request::Start {
            name: "idle".into(),
        },
        Request::Remove {
            name: "idle".into(),
        },
    ];
    for req in refused {
        let what = format!("{req:?}");
        let e = n.ask(req).expect_err("refused: the state cannot be saved");
        assert_eq!(e.code, ErrorCode::Internal, "{what}: {e:?}");
        assert!(
            e.message.contains("could not be saved") && e.message.contains("snapshot.bin"),
            "{what}: {}",
            e.message
        );
    }
    // The chutes are as they were: same states, versions, containers, reservations.
    assert_eq!(n.state("run"), Some((ChuteState::Running, "1".into())));
    assert_eq!(n.state("idle"), Some((ChuteState::Stopped, "1".into())));
    assert_eq!(n.state("new"), None);
    assert!(fake.by_name("chute-run").expect("kept").running);
    assert!(fake.by_name("chute-new").is_none());
    assert_eq!(fake.by_name("chute-run").expect("kept").spec.image, IMAGE);
    assert_eq!(n.agent.status().pools.used, used);
    let touched: Vec<String> = fake
        .take_calls()
        .into_iter()
        .filter(|c| !c.starts_with("inspect") && !c.starts_with("list"))
        .collect();
    assert!(touched.is_empty(), "no container was touched: {touched:?}");
    assert_eq!(
        std::fs::read(dir.path().join(snapshot::FILE_NAME)).expect("snapshot"),
        on_disk
    );

    // Space again: the same requests work.
    n.agent.fail_saves.set(false);
    n.ask(Request::Stop {
        name: "run".into(),
        timeout_secs: None,
    })
    .expect("stopped once the state can be saved");
}

#[test]
fn remove_while_podman_is_unreachable_is_an_error_and_the_chute_stays_with_its_reservation() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = engine();
    let n = boot(&fake, dir.path());
    n.ask(deploy(&manifest("rel-c", 1, 32))).expect("deployed");
    let used = n.agent.status().pools.used;
    fake.state.borrow_mut().unreachable = true;
    let e = n
        .ask(Request::Remove {
            name: "rel-c".into(),
        })
        .expect_err("Podman did not remove it");
    assert_eq!(e.code, ErrorCode::Podman, "{e:?}");
    assert!(e.message.contains("cannot reach Podman"), "{}", e.message);
    assert_eq!(n.agent.list().len(), 1, "still listed");
    assert_eq!(n.agent.status().pools.used, used, "reservation kept");
    assert!(fake.by_name("chute-rel-c").expect("still there").running);
    // And after a restart it is still there, not finished off as a removal.
    drop(n);
    fake.state.borrow_mut().unreachable = false;
    let n = boot(&fake, dir.path());
    assert_eq!(n.state("rel-c"), Some((ChuteState::Running, "1".into())));
    n.ask(Request::Remove {
        name: "rel-c".into(),
    })
    .expect("removed once Podman answers");
    assert!(fake.by_name("chute-rel-c").is_none());
    assert_eq!(n.agent.status().pools.used.memory_bytes, 0);
}

#[test]
fn a_corrupt_or_deleted_snapshot_keeps_stopped_chutes_stopped_and_counters_and_versions() {
    for damage in ["corrupt", "delete"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = engine();
        let n = boot(&fake, dir.path());
        n.ask(deploy(&manifest("up", 1, 32))).expect("deployed");
        n.ask(deploy(&manifest("up", 2, 48))).expect("updated");
        n.ask(Request::Restart { name: "up".into() })
            .expect("restarted");
        n.ask(deploy(&manifest("down", 1, 32))).expect("deployed");
        n.ask(Request::Stop {
            name: "down".into(),
            timeout_secs: None,
        })
        .expect("stopped");
        let used = n.agent.status().pools.used;
        drop(n);
        let snap = dir.path().join(snapshot::FILE_NAME);
        if damage == "corrupt" {
            let mut b = std::fs::read(&snap).expect("snapshot");
            let mid = b.len() / 2;
            b[mid] ^= 0x5a;
            std::fs::write(&snap, b).expect("written");
        } else {
            std::fs::remove_file(&snap).expect("deleted");
        }
        let n = boot(&fake, dir.path());
        assert_eq!(
            n.state("down"),
            Some((ChuteState::Stopped, "1".into())),
            "{damage}: a stopped chute stays stopped"
        );
        assert!(!fake.by_name("chute-down").expect("kept").running);
        assert_eq!(n.state("up"), Some((ChuteState::Running, "2".into())));
        let up = n
            .agent
            .list()
            .into_iter()
            .find(|c| c.name.as_str() == "up")
            .expect("listed");
        assert_eq!(up.restarts, 1, "{damage}: restart counter kept");
        assert_eq!(n.agent.status().pools.used, used, "{damage}");
        assert!(n.agent.status().unknown_containers.is_empty(), "{damage}");
    }
}

#[test]
fn with_both_copies_lost_the_labels_rebuild_every_chute_and_nothing_is_unmanaged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = engine();
    let n = boot(&fake, dir.path());
    n.ask(deploy(&manifest("a", 1, 32))).expect("deployed");
    n.ask(deploy(&manifest("b", 1, 32))).expect("deployed");
    drop(n);
    std::fs::remove_file(dir.path().join(snapshot::FILE_NAME)).expect("deleted");
    std::fs::remove_file(dir.path().join(snapshot::JOURNAL_NAME)).expect("deleted");
    let n = boot(&fake, dir.path());
    assert_eq!(n.state("a"), Some((ChuteState::Running, "1".into())));
    assert_eq!(n.state("b"), Some((ChuteState::Running, "1".into())));
    assert!(n.agent.status().unknown_containers.is_empty());
    assert_eq!(n.agent.status().pools.used.memory_bytes, 64 << 20);
}

#[test]
fn unknown_containers_are_listed_afresh_not_only_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = engine();
    let n = boot(&fake, dir.path());
    assert!(n.agent.status().unknown_containers.is_empty());
    let stray = crate::podman::ContainerSpec {
        name: "stray-by-hand".into(),
        image: IMAGE.into(),
        labels: [
            (LABEL_INSTANCE.to_owned(), "default".to_owned()),
            (LABEL_CHUTE.to_owned(), "stray".to_owned()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    };
    let f = fake.clone();
    let id = smol::block_on(async move {
        use super::runtime::ContainerRuntime;
        f.create(&stray).await.expect("created")
    });
    let Ok(Response::Status(s)) = n.ask(Request::Status) else {
        panic!("status")
    };
    assert_eq!(s.unknown_containers.len(), 1);
    assert_eq!(s.unknown_containers[0].chute.as_deref(), Some("stray"));
    fake.state.borrow_mut().containers.remove(&id);
    let Ok(Response::Status(s)) = n.ask(Request::Status) else {
        panic!("status")
    };
    assert!(s.unknown_containers.is_empty(), "gone from the list too");
}

/// What a chute may be after a restart: one state when the last operation on it was
/// acknowledged, either of two when it was interrupted.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    Absent,
    Runs(u32),
    Stopped(u32),
}

struct Rng(u64);
impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn observe(n: &Node, name: &str) -> Want {
    match n.state(name) {
        None => Want::Absent,
        Some((ChuteState::Running, v)) => Want::Runs(v.parse().expect("numeric version")),
        Some((ChuteState::Stopped, v)) => Want::Stopped(v.parse().expect("numeric version")),
        Some(other) => panic!("{name}: unexpected {other:?}"),
    }
}

/// No duplicate or unclaimed containers, pools equal to the reservations held, every
/// chute listed as running has a running container.
fn check_invariants(n: &Node, fake: &FakePodman, round: usize) {
    let list = n.agent.list();
    let s = fake.state.borrow();
    let ours: Vec<_> = s
        .containers
        .values()
        .filter(|c| c.spec.labels.contains_key(LABEL_INSTANCE))
        .collect();
    for c in &ours {
        let claimed = list
            .iter()
            .filter(|l| l.container_id.as_deref() == Some(c.id.as_str()))
            .count();
        assert_eq!(
            claimed, 1,
            "round {round}: container {} claimed {claimed} times",
            c.spec.name
        );
    }
    let mut held = chutes::Amounts::default();
    for l in &list {
        let d = n.agent.inspect(l.name.as_str()).expect("inspect");
        if d.reservation_held {
            held.memory_bytes += d.reservation.memory_bytes;
            held.cpu_millicores += d.reservation.cpu_millicores;
            held.pids += d.reservation.pids;
        }
        if l.state == ChuteState::Running {
            let id = l
                .container_id
                .as_deref()
                .expect("a running chute has a container");
            assert!(
                s.containers[id].running,
                "round {round}: {} not running",
                l.name
            );
        }
    }
    let used = n.agent.status().pools.used;
    assert_eq!(
        (used.memory_bytes, used.cpu_millicores, used.pids),
        (held.memory_bytes, held.cpu_millicores, held.pids),
        "round {round}: pools equal the reservations held"
    );
    assert!(
        n.agent.status().unknown_containers.is_empty(),
        "round {round}: unknown containers {:?}",
        n.agent.status().unknown_containers
    );
}

/// The randomized crash loop: `CHUTED_CRASH_ROUNDS` (default 300) crashes at random points
/// of random operations on three `always` chutes. Prints its figures.
#[test]
fn randomized_crash_loop_keeps_every_acknowledged_operation_and_leaks_nothing() {
    let rounds: usize = std::env::var("CHUTED_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(300);
    let seed = std::env::var("CHUTED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let fake = engine();
    let names = ["ca", "cb", "cc"];
    let mut want: BTreeMap<&str, Vec<Want>> =
        names.iter().map(|n| (*n, vec![Want::Absent])).collect();
    let mut next_version = 1u32;
    let (mut crashes, mut acked, mut interrupted_at) = (0, 0, BTreeMap::new());
    let started = Instant::now();
    let mut log: Vec<String> = Vec::new();
    let mut node = boot(&fake, dir.path());
    for round in 0..rounds {
        let name = names[rng.next(names.len() as u64) as usize];
        let now = want[name][0].clone();
        let (req, after, op) = match (&now, rng.next(4)) {
            (Want::Absent, _) => {
                next_version += 1;
                let v = next_version;
                (deploy(&manifest(name, v, 16)), Want::Runs(v), "deploy")
            }
            (Want::Runs(_) | Want::Stopped(_), 0) => {
                next_version += 1;
                let v = next_version;
                let mem = 16 + 8 * (v % 3);
                // An update starts the new version, stopped before or not.
                (deploy(&manifest(name, v, mem)), Want::Runs(v), "update")
            }
            (Want::Runs(v), 1) => (
                Request::Stop {
                    name: name.into(),
                    timeout_secs: None,
                },
                Want::Stopped(*v),
                "stop",
            ),
            (Want::Runs(v), 2) => (
                Request::Restart { name: name.into() },
                Want::Runs(*v),
                "restart",
            ),
            (Want::Stopped(v), 1 | 2) => (
                Request::Start { name: name.into() },
                Want::Runs(*v),
                "start",
            ),
            _ => (
                Request::Remove { name: name.into() },
                Want::Absent,
                "remove",
            ),
        };
        // Poll the agent's tasks a random number of times, then crash it.
        let polls = rng.next(48);
        let (tx, _rx) = smol::channel::unbounded::<Event>();
        let agent = node.agent.clone();
        let task = node.ex.spawn(async move { agent.handle(req, &tx).await });
        for _ in 0..polls {
            if task.is_finished() || !node.ex.try_tick() {
                break;
            }
        }
        log.push(format!(
            "round {round}: {op} {name} after {polls} polls: {}",
            if task.is_finished() {
                "acknowledged"
            } else {
                "interrupted"
            }
        ));
        if task.is_finished() {
            match smol::block_on(task) {
                Ok(_) => {
                    acked += 1;
                    want.insert(name, vec![after]);
                }
                Err(e) => panic!("round {round}: {op} {name} failed: {e:?}"),
            }
            // Every op is acknowledged here or cut off below; some rounds crash between.
            if rng.next(3) != 0 {
                continue;
            }
        } else {
            *interrupted_at.entry(op).or_insert(0u32) += 1;
            want.get_mut(name).expect("known").push(after);
        }
        crashes += 1;
        // kill -9: the old executor is never polled again.
        drop(node);
        node = boot(&fake, dir.path());
        check_invariants(&node, &fake, round);
        for n in names {
            let seen = observe(&node, n);
            assert!(
                want[n].contains(&seen),
                "round {round} (seed {seed}): {n} is {seen:?}, allowed {:?}; last: {:#?}",
                want[n],
                &log[log.len().saturating_sub(6)..]
            );
            want.insert(n, vec![seen]);
        }
    }
    println!(
        "crash loop: {rounds} rounds, {crashes} crashes ({} mid-operation: {interrupted_at:?}), {acked} operations acknowledged, seed {seed}, {:.1} s",
        interrupted_at.values().sum::<u32>(),
        started.elapsed().as_secs_f64()
    );
    assert!(crashes >= 100, "only {crashes} crashes");
}
