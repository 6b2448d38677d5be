//! Owns the supervisor's fast unit tests: deploy, update, rollback, stop/start and
//! reconcile against the in-memory fake engine (no root, no Podman).

use std::rc::Rc;
use std::time::Duration;

use chute_api::{ChuteState, DeployOutcome, ErrorCode, Request, Response};
use smol::LocalExecutor;

use super::fake::FakePodman;
use super::{Agent, LABEL_CHUTE, LABEL_INSTANCE, LABEL_MANAGED};
use crate::api::Event;
use crate::config::{AgentConfig, HostFacts};
use crate::podman::{ContainerSpec, Podman};

const IMAGE: &str = "localhost/fake:1";

struct World {
    ex: Rc<LocalExecutor<'static>>,
    fake: Rc<FakePodman>,
    agent: Rc<Agent>,
    dir: tempfile::TempDir,
}

fn config() -> AgentConfig {
    // 2 cores, 768 MiB of memory for chutes (3/4 of 1 GiB).
    let mut cfg = AgentConfig::defaults(HostFacts {
        cpus: 2,
        memory_bytes: 1 << 30,
    });
    // The fake's images are tags; pinning by content is tested against real Podman.
    cfg.allow_unpinned_images = true;
    cfg
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().expect("temp dir");
        let fake = Rc::new(FakePodman::with_image(IMAGE));
        let ex = Rc::new(LocalExecutor::new());
        let agent = agent_on(&ex, &fake, dir.path());
        World {
            ex,
            fake,
            agent,
            dir,
        }
    }

    fn run<T>(&self, fut: impl std::future::Future<Output = T>) -> T {
        smol::block_on(self.ex.run(fut))
    }

    fn ask(&self, req: Request) -> Result<Response, chute_api::ApiError> {
        let (tx, _rx) = smol::channel::unbounded::<Event>();
        let agent = self.agent.clone();
        self.run(async move { agent.handle(req, &tx).await })
    }

    fn deploy(&self, toml: &str) -> Result<chute_api::DeployResult, chute_api::ApiError> {
        match self.ask(Request::Deploy {
            manifest_toml: toml.to_owned(),
            dir: None,
        })? {
            Response::Deploy(d) => Ok(d),
            other => panic!("deploy answered {other:?}"),
        }
    }

    fn detail(&self, name: &str) -> chute_api::ChuteDetail {
        match self.ask(Request::Inspect { name: name.into() }) {
            Ok(Response::Inspect(d)) => *d,
            other => panic!("inspect answered {other:?}"),
        }
    }

    fn used_memory(&self) -> u64 {
        self.agent.status().pools.used.memory_bytes
    }

    /// Lets background tasks (restarts started by reconcile) run until `done` holds.
    fn settle(&self, what: &str, done: impl Fn(&Agent) -> bool) {
        let agent = self.agent.clone();
        self.run(async move {
            for _ in 0..200 {
                if done(&agent) {
                    return;
                }
                smol::Timer::after(Duration::from_millis(5)).await;
            }
            panic!("{what} did not happen");
        });
    }
}

fn agent_on(
    ex: &Rc<LocalExecutor<'static>>,
    fake: &Rc<FakePodman>,
    state_dir: &std::path::Path,
) -> Rc<Agent> {
    Agent::with_runtime(
        // Never called: events and logs are not exercised here.
        Podman::new("/nonexistent/podman.sock"),
        fake.clone(),
        config(),
        state_dir.to_owned(),
        ex.clone(),
    )
}

fn manifest(name: &str, memory: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nversion = \"1\"\nimage = \"{IMAGE}\"\ncommand = [\"sleep\", \"3600\"]\n{extra}\n[resources]\ncpu = 0.5\nmemory = \"{memory}\"\npids = 32\n"
    )
}

#[test]
fn a_deploy_creates_a_capped_container_reserves_its_share_and_runs() {
    let w = World::new();
    let r = w.deploy(&manifest("web", "64MiB", "")).expect("deployed");
    assert_eq!(r.outcome, DeployOutcome::Deployed);
    assert_eq!(r.chute.state, ChuteState::Running);
    let c = w.fake.by_name("chute-web").expect("container created");
    assert!(c.running);
    assert_eq!(r.chute.container_id.as_deref(), Some(c.id.as_str()));
    assert_eq!(c.spec.memory_bytes, 64 << 20);
    assert_eq!(c.spec.cpu_quota_us, 50_000);
    assert_eq!(c.spec.pids_limit, 32);
    assert!(c.spec.no_new_privileges);
    assert_eq!(c.spec.labels[LABEL_CHUTE], "web");
    assert_eq!(c.spec.labels[LABEL_MANAGED], "true");
    assert_eq!(w.used_memory(), 64 << 20);
    // Durable before acknowledged: the snapshot holds the chute.
    let snap = crate::snapshot::load(w.dir.path())
        .expect("snapshot readable")
        .expect("snapshot written");
    assert_eq!(snap.chutes.len(), 1);
}

#[test]
fn a_deploy_that_does_not_fit_creates_nothing_and_says_what_is_short() {
    let w = World::new();
    let e = w
        .deploy(&manifest("big", "2GiB", ""))
        .expect_err("refused: more memory than the pools hold");
    assert_eq!(e.code, ErrorCode::InsufficientResources);
    assert!(e.message.contains("memory"), "{e}");
    assert!(w.fake.take_calls().is_empty(), "nothing was created");
    assert_eq!(w.used_memory(), 0);
    assert!(w.agent.list().is_empty());
}

#[test]
fn a_missing_image_that_cannot_be_pulled_leaves_nothing_behind() {
    let w = World::new();
    let toml = manifest("nopull", "64MiB", "").replace(IMAGE, "localhost/absent:1");
    let e = w.deploy(&toml).expect_err("no image");
    assert_eq!(e.code, ErrorCode::Image);
    assert!(e.message.contains("could not be pulled"), "{e}");
    assert_eq!(w.fake.take_calls(), vec!["pull localhost/absent:1"]);
    assert_eq!(w.used_memory(), 0);
    assert!(w.agent.list().is_empty());
}

#[test]
fn the_same_manifest_again_is_unchanged_and_touches_nothing() {
    let w = World::new();
    let toml = manifest("same", "64MiB", "");
    w.deploy(&toml).expect("deployed");
    w.fake.take_calls();
    let r = w.deploy(&toml).expect("answered");
    assert_eq!(r.outcome, DeployOutcome::Unchanged);
    assert!(w.fake.take_calls().is_empty());
}

#[test]
fn an_update_replaces_the_container_and_resizes_the_reservation() {
    let w = World::new();
    let first = w.deploy(&manifest("upd", "64MiB", "")).expect("deployed");
    let old_id = first.chute.container_id.expect("has a container");
    let r = w
        .deploy(&manifest("upd", "128MiB", "").replace("version = \"1\"", "version = \"2\""))
        .expect("updated");
    assert_eq!(r.outcome, DeployOutcome::Updated { live: false });
    assert_eq!(r.chute.state, ChuteState::Running);
    let c = w.fake.by_name("chute-upd").expect("new container");
    assert_ne!(c.id, old_id);
    assert!(c.running);
    assert_eq!(c.spec.memory_bytes, 128 << 20);
    assert!(!w.fake.state.borrow().containers.contains_key(&old_id));
    assert_eq!(w.used_memory(), 128 << 20);
    assert_eq!(w.detail("upd").version, "2");
}

#[test]
fn an_update_whose_new_version_cannot_start_puts_the_old_one_back() {
    let w = World::new();
    w.deploy(&manifest("rb", "64MiB", "")).expect("deployed");
    w.fake
        .state
        .borrow_mut()
        .images
        .insert("localhost/broken:2".into());
    w.fake.state.borrow_mut().refuse_start_of_image = Some("localhost/broken:2".into());
    let bad = manifest("rb", "128MiB", "")
        .replace(IMAGE, "localhost/broken:2")
        .replace("version = \"1\"", "version = \"2\"");
    let e = w.deploy(&bad).expect_err("the new version cannot start");
    assert_eq!(e.code, ErrorCode::RolledBack);
    assert!(e.message.contains("previous version was restored"), "{e}");
    let d = w.detail("rb");
    assert_eq!(d.state, ChuteState::Running);
    assert_eq!(d.version, "1");
    assert_eq!(d.image, IMAGE);
    let c = w.fake.by_name("chute-rb").expect("old version re-created");
    assert!(c.running);
    assert_eq!(c.spec.image, IMAGE);
    assert_eq!(
        w.used_memory(),
        64 << 20,
        "the old reservation, not the new one"
    );
}

#[test]
fn growth_that_does_not_fit_is_refused_before_the_running_chute_is_touched() {
    let w = World::new();
    w.deploy(&manifest("grow", "64MiB", "")).expect("deployed");
    w.fake.take_calls();
    let e = w
        .deploy(&manifest("grow", "4GiB", "").replace("version = \"1\"", "version = \"2\""))
        .expect_err("does not fit");
    assert_eq!(e.code, ErrorCode::InsufficientResources);
    assert!(
        w.fake.take_calls().is_empty(),
        "the running chute was not touched"
    );
    assert_eq!(w.detail("grow").state, ChuteState::Running);
}

#[test]
fn stop_and_start_are_acknowledged_when_podman_returns_and_keep_the_reservation() {
    let w = World::new();
    w.deploy(&manifest("ss", "64MiB", "")).expect("deployed");
    let stopped = w
        .ask(Request::Stop {
            name: "ss".into(),
            timeout_secs: None,
        })
        .expect("stopped");
    let Response::Chute(a) = stopped else {
        panic!("{stopped:?}")
    };
    assert_eq!(a.state, ChuteState::Stopped);
    assert!(!w.fake.by_name("chute-ss").expect("kept").running);
    assert_eq!(w.used_memory(), 64 << 20);
    let e = w
        .ask(Request::Stop {
            name: "ss".into(),
            timeout_secs: None,
        })
        .expect_err("already stopped");
    assert_eq!(e.code, ErrorCode::InvalidState);
    let started = w
        .ask(Request::Start { name: "ss".into() })
        .expect("started");
    assert!(matches!(started, Response::Chute(a) if a.state == ChuteState::Running));
    let restarted = w
        .ask(Request::Restart { name: "ss".into() })
        .expect("restarted");
    assert!(
        matches!(restarted, Response::Chute(a) if a.state == ChuteState::Running && a.restarts == 1)
    );
    w.ask(Request::Remove { name: "ss".into() })
        .expect("removed");
    assert!(w.fake.by_name("chute-ss").is_none());
    assert_eq!(w.used_memory(), 0);
    let e = w
        .ask(Request::Inspect { name: "ss".into() })
        .expect_err("gone");
    assert_eq!(e.code, ErrorCode::NoSuchChute);
}

#[test]
fn reconcile_adopts_the_running_restarts_the_dead_and_reports_strangers() {
    let w = World::new();
    w.deploy(&manifest("alive", "32MiB", "")).expect("deployed");
    w.deploy(&manifest("died", "32MiB", "")).expect("deployed");
    w.deploy(&manifest(
        "done",
        "32MiB",
        "[restart]\npolicy = \"never\"\n",
    ))
    .expect("deployed");
    // While the agent is away: one chute crashes, one exits cleanly, and someone
    // creates a container with our labels that no record knows.
    {
        let mut s = w.fake.state.borrow_mut();
        for c in s.containers.values_mut() {
            match c.spec.name.as_str() {
                "chute-died" => {
                    c.running = false;
                    c.exit_code = 1;
                }
                "chute-done" => {
                    c.running = false;
                    c.exit_code = 0;
                }
                _ => {}
            }
        }
    }
    let stranger = ContainerSpec {
        name: "chute-stranger".into(),
        image: IMAGE.into(),
        labels: [
            (LABEL_INSTANCE.to_owned(), "default".to_owned()),
            (LABEL_CHUTE.to_owned(), "stranger".to_owned()),
        ]
        .into_iter()
        .collect(),
        ..ContainerSpec::default()
    };
    let fake = w.fake.clone();
    w.run(async move {
        use super::runtime::ContainerRuntime;
        fake.create(&stranger).await.expect("created")
    });
    w.fake.take_calls();

    // A new agent on the same state dir and engine, as after a crash.
    let ex = Rc::new(LocalExecutor::new());
    let agent = agent_on(&ex, &w.fake, w.dir.path());
    let w2 = World {
        ex,
        fake: w.fake.clone(),
        agent,
        dir: w.dir,
    };
    let agent = w2.agent.clone();
    w2.run(async move { agent.reconcile().await })
        .expect("reconciled");
    w2.settle("the dead chute's restart", |a| {
        a.list()
            .iter()
            .any(|c| c.name.as_str() == "died" && c.state == ChuteState::Running)
    });
    let calls = w2.fake.take_calls();
    let id_of = |n: &str| w2.fake.by_name(n).expect("container kept").id;
    assert!(
        calls.contains(&format!("start {}", id_of("chute-died"))),
        "{calls:?}"
    );
    assert!(
        !calls
            .iter()
            .any(|c| c.contains(&id_of("chute-alive")) && !c.starts_with("inspect")),
        "the running chute is adopted, not restarted: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("remove")),
        "nothing deleted: {calls:?}"
    );
    assert_eq!(w2.detail("alive").state, ChuteState::Running);
    assert_eq!(w2.detail("died").restarts, 1);
    let done = w2.detail("done");
    assert_eq!(done.state, ChuteState::Stopped);
    assert!(
        !done.reservation_held,
        "policy never: its reservation is freed"
    );
    let status = w2.agent.status();
    assert_eq!(status.chutes, 3);
    assert_eq!(status.pools.used.memory_bytes, 64 << 20);
    assert_eq!(status.unknown_containers.len(), 1);
    assert_eq!(
        status.unknown_containers[0].chute.as_deref(),
        Some("stranger")
    );
}

#[test]
fn a_stop_may_shorten_the_grace_period_but_not_lengthen_it() {
    let w = World::new();
    let configured = w.agent.cfg.lifecycle.stop_timeout_secs;
    w.deploy(&manifest("grace", "64MiB", "")).expect("deployed");
    for (asked, used) in [
        (Some(1), 1),
        (Some(configured + 50), configured),
        (None, configured),
    ] {
        w.fake.take_calls();
        w.ask(Request::Stop {
            name: "grace".into(),
            timeout_secs: asked,
        })
        .expect("stopped");
        let calls = w.fake.take_calls();
        assert!(
            calls.contains(&format!("stop-timeout {used}")),
            "{asked:?}: {calls:?}"
        );
        w.ask(Request::Start {
            name: "grace".into(),
        })
        .expect("started");
    }
}
