//! chute-cloud replicas on one PostgreSQL, end to end: a real chuted on real Podman
//! connected to replica A while the owner and the developer use replica B only, and a
//! replica killed (SIGKILL) mid-command. Each test starts its own PostgreSQL cluster
//! (e2e::pg). Needs `cargo build -p chuted -p chute-cloud -p chutectl` first.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::fleet::{
    bin, chute_with_image, free_port, grant_developer, identity, timeline, trust_owner, Cloud, Ctl,
};
use e2e::pg::PgCluster;
use e2e::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// A chute-cloud replica named `name` (its log file) on `port`, killed on drop.
/// Replicas share the database and the data dir (the image blobs).
fn replica(dir: &Path, name: &str, port: u16, database: &str) -> Cloud {
    Cloud::options(dir)
        .name(name)
        .port(port)
        .database(database)
        .start()
}

/// The owner set up through `ctl`, the device trusting it; returns (owner key, device
/// id, device public key).
fn owner_and_device(w: &World, ctl: &Ctl) -> (PathBuf, String, String) {
    let owner_key = w.dir.join("owner.key");
    trust_owner(w, ctl, &owner_key);
    let id = identity(w);
    (owner_key, id.device_id, id.public_key)
}

/// A developer key granted every procedure on `<prefix>-*`, and its chutectl.
fn developer(w: &World, ctl: &Ctl, owner_key: &Path, prefix: &str) -> (PathBuf, Ctl) {
    let dev_key = w.dir.join("dev.key");
    grant_developer(ctl, owner_key, &dev_key, prefix);
    let dctl = Ctl {
        home: w.dir.join("home-dev"),
        ..ctl.clone()
    };
    (dev_key, dctl)
}

#[test]
fn a_device_on_replica_a_is_managed_entirely_through_replica_b() {
    let pg = PgCluster::start();
    let db = pg.database("fleet");
    let mut w = World::new(&small_pools_config("heartbeat_secs = 1\nsample_secs = 1\n"));
    let a = replica(&w.dir, "a", free_port(), &db);
    let b = replica(&w.dir, "b", free_port(), &db);
    let ctl = Ctl::new(b.http(), a.token(), w.dir.join("home"));
    let (owner_key, device, _) = owner_and_device(&w, &ctl);

    // The device connects to A; B sees it pending and connected.
    w.run_args = vec!["--cloud".into(), a.agent_url()];
    w.start_agent();
    wait_until("the device pending and connected, seen from B", T, || {
        let d = ctl.device(&device);
        d["status"] == "pending" && d["connected"] == true
    });

    // Accepted through B: A's session learns it at once and heartbeats flow, visible
    // from B.
    ctl.ok(&owner_key, &["device", "accept", &device]);
    wait_until("heartbeats recorded, seen from B", T, || {
        ctl.device(&device)["last_heartbeat"].is_i64()
    });

    // Push (image archive uploaded to B), stop and logs, all through B.
    let prefix = unique("rp");
    let (dev_key, dctl) = developer(&w, &ctl, &owner_key, &prefix);
    let name = format!("{prefix}-web");
    let dir = chute_with_image(
        &mut w,
        &name,
        r#"["sh", "-c", "echo hello-from-b; while true; do echo tick; sleep 1; done"]"#,
        "",
    );
    let pushed = dctl.push(&dev_key, &dir, &device);
    let r = &pushed["results"][0];
    assert_eq!(
        r["status"],
        "succeeded",
        "{pushed}\nA:\n{}\nB:\n{}",
        tail(&a.log(), 30),
        tail(&b.log(), 30)
    );
    assert_eq!(r["verified"], true, "{r}");
    w.wait_state(&name, ChuteState::Running, T);

    // Live logs followed through B are relayed by A.
    let lines = dctl.follow_logs(&dev_key, &device, &name, 4);
    assert!(
        lines
            .iter()
            .any(|l| l["verified"] == false && l["text"] == "tick"),
        "no live line relayed through B in {lines:?}\nA:\n{}",
        tail(&a.log(), 20)
    );

    let r = dctl.ok(&dev_key, &["stop", "--device", &device, &name]);
    assert_eq!(r["verified"], true, "{r}");
    w.wait_state(&name, ChuteState::Stopped, T);
    wait_until("the stopped chute in the status seen from B", T, || {
        ctl.device(&device)["chutes_running"] == 0
    });

    // Both replicas tell the same story: device, commands, audit log.
    let actl = ctl.at(a.http());
    let (da, db_) = (actl.device(&device), ctl.device(&device));
    for f in ["status", "connected", "agent_version", "chutes_total"] {
        assert_eq!(da[f], db_[f], "{f}: A {da} / B {db_}");
    }
    let cmds = |c: &Ctl| c.get(&format!("devices/{device}/commands"));
    assert_eq!(cmds(&actl), cmds(&ctl));
    let audit_a = actl.get("audit");
    assert!(
        audit_a
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"].as_str().unwrap_or("").contains("/accept")),
        "B's accept in A's audit log: {audit_a}"
    );
    w.cli(&["remove", &name]);
}

#[test]
fn a_replica_killed_mid_command_loses_nothing_and_runs_it_once() {
    let pg = PgCluster::start();
    let db = pg.database("fleet");
    let mut w = World::new(&small_pools_config("heartbeat_secs = 1\n"));
    let a_port = free_port();
    let mut a = replica(&w.dir, "a", a_port, &db);
    let b = replica(&w.dir, "b", free_port(), &db);
    let ctl = Ctl::new(b.http(), a.token(), w.dir.join("home"));
    let (owner_key, device, pubkey) = owner_and_device(&w, &ctl);
    ctl.ok(&owner_key, &["device", "preauthorize", &pubkey]);
    w.run_args = vec!["--cloud".into(), a.agent_url()];
    w.start_agent();
    wait_until("the device connected, seen from B", T, || {
        ctl.device(&device)["connected"] == true
    });
    let prefix = unique("rk");
    let (dev_key, dctl) = developer(&w, &ctl, &owner_key, &prefix);
    // A chute that ignores SIGTERM: its stop takes the agent's stop timeout (2 s), long
    // enough to kill A while the command is with the device.
    let name = format!("{prefix}-slow");
    let dir = chute_with_image(
        &mut w,
        &name,
        r#"["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]"#,
        "",
    );
    let r = dctl.push(&dev_key, &dir, &device);
    assert_eq!(r["results"][0]["status"], "succeeded", "{r}");
    w.wait_state(&name, ChuteState::Running, T);

    let stop = std::thread::spawn({
        let (key, ctl) = (dev_key.clone(), dctl.clone());
        let (device, name) = (device.clone(), name.clone());
        move || ctl.run(&key, &["stop", "--device", &device, &name, "--json"])
    });
    let mut id = 0;
    wait_until("the stop command sent to the device by A", T, || {
        let cmds = ctl.get(&format!("devices/{device}/commands"));
        cmds.as_array()
            .into_iter()
            .flatten()
            .find(|c| c["procedure"] == "stop" && c["status"] == "sent")
            .map(|c| id = c["id"].as_i64().unwrap())
            .is_some()
    });
    a.kill9();
    // Another replica takes over A's address; the agent's backoff finds it.
    let _c = replica(&w.dir, "c", a_port, &db);
    let o = stop.join().unwrap();
    let out: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert!(
        o.status.success() && out["verified"] == true,
        "stop through B: {out} {}",
        String::from_utf8_lossy(&o.stderr)
    );
    w.wait_state(&name, ChuteState::Stopped, T);
    let c = ctl.get(&format!("commands/{id}"));
    assert_eq!(c["status"], "succeeded", "{c}");
    let log = w.agent_log();
    let runs = log
        .lines()
        .filter(|l| l.contains("running signed command") && l.contains(&format!("request={id} ")))
        .count();
    assert_eq!(runs, 1, "the stop ran once:\n{}", tail(&log, 40));
    let timeline = timeline(&c);
    assert_eq!(timeline.first(), Some(&"queued"), "{c}");
    assert_eq!(timeline.last(), Some(&"succeeded"), "{c}");
    // It was with the device when A died: the replica that took over sent it again and
    // the agent answered with the result of the one run.
    assert_eq!(timeline.iter().filter(|s| **s == "sent").count(), 2, "{c}");
    w.cli(&["remove", &name]);
}

/// The swarm benchmark's smoke run: 20 simulated agents against a SQLite cloud, and 20
/// against two replicas, every session held, every command answered, no errors.
#[test]
fn swarm_smoke() {
    let pg = PgCluster::start();
    let db = pg.database("swarm");
    let dir = std::env::temp_dir().join(unique("chute-swarm-"));
    for d in ["single", "pair"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let single = replica(
        &dir.join("single"),
        "single",
        free_port(),
        &format!("sqlite://{}/s.db", dir.display()),
    );
    let a = replica(&dir.join("pair"), "a", free_port(), &db);
    let b = replica(&dir.join("pair"), "b", free_port(), &db);
    for (clouds, pids, token) in [
        (vec![single.agent_url()], vec![single.pid()], single.token()),
        (
            vec![a.agent_url(), b.agent_url()],
            vec![a.pid(), b.pid()],
            a.token(),
        ),
    ] {
        let mut cmd = Command::new(bin("chute-cloud"));
        cmd.arg("swarm");
        for c in &clouds {
            cmd.args(["--cloud", c]);
        }
        for p in &pids {
            cmd.args(["--server-pid", &p.to_string()]);
        }
        let o = cmd
            .args(["--token", &token, "--agents", "20", "--heartbeat-secs", "1"])
            .args(["--duration-secs", "3", "--commands-per-sec", "10"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("| sessions held | 20 |"), "{out}");
        assert!(out.contains("| errors | 0 (commands 0) |"), "{out}");
        assert!(!out.contains("(0 commands)"), "{out}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
