//! Crash safety against real Podman: the agent killed at named points of an update and a
//! deploy (`CHUTED_CRASH_AT`, debug builds only), the state dir's filesystem full, the
//! snapshot corrupt or deleted, Podman gone during a removal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::*;

fn manifest(name: &str, version: u32, extra: &str) -> String {
    // The command differs per version, so every update replaces the container. It exits on
    // SIGTERM (a bare `sleep` as pid 1 ignores it, and every stop would wait out the stop
    // timeout).
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nimage = \"{IMAGE}\"\ncommand = [\"sh\", \"-c\", \"trap 'exit 0' TERM; sleep {} & wait\"]\n\
         [resources]\ncpu = 0.1\nmemory = \"32MiB\"\npids = 32\n[restart]\npolicy = \"always\"\n{extra}",
        3600 + version
    )
}

fn write_manifest(dir: &Path, toml: &str) {
    std::fs::write(dir.join("chute.toml"), toml).unwrap();
}

/// This world's containers, as Podman's API lists them (running or not): `name state`.
/// Asked over the socket rather than with the `podman` CLI, which takes longer to start
/// than the answer takes.
fn our_containers(w: &World) -> Vec<String> {
    let out = Command::new("curl")
        .args(["-sf", "-G", "--unix-socket"])
        .arg(&w.podman_socket)
        .arg("http://d/v4.0.0/libpod/containers/json")
        .args(["--data-urlencode", "all=true", "--data-urlencode"])
        .arg(format!(
            "filters={{\"label\":[\"chuted.instance={}\"]}}",
            w.instance
        ))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["Names"][0].as_str().unwrap(),
                c["State"].as_str().unwrap()
            )
        })
        .collect()
}

/// Runs `chuted deploy` against an agent told to kill itself at `point`, and checks that it
/// did.
fn deploy_and_crash_at(w: &mut World, dir: &Path, point: &str) {
    w.kill_agent();
    w.agent_env = vec![("CHUTED_CRASH_AT".into(), point.into())];
    w.start_agent();
    let o = w.try_cli(&["deploy", dir.to_str().unwrap()]);
    assert!(
        !o.status.success(),
        "{point}: the deploy was acknowledged, so the agent did not crash there"
    );
    wait_until("the agent to die", Duration::from_secs(30), || {
        w.agent_log()
            .contains(&format!("CHUTED_CRASH_AT={point}: killing myself"))
    });
    w.kill_agent();
    w.agent_env.clear();
    w.start_agent();
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn an_update_killed_at_every_point_ends_running_on_the_old_or_the_new_version() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("crup");
    let dir = w.chute_dir(&name, "[]", "");
    write_manifest(&dir, &manifest(&name, 1, ""));
    assert_eq!(w.deploy(&dir).chute.state, ChuteState::Running);
    let mut version = 1;
    for point in [
        "update-recorded",
        "stop-after-stop",
        "update-after-stop",
        "update-after-remove",
        "start-after-create",
        "start-after-start",
    ] {
        let old = version;
        version += 1;
        write_manifest(&dir, &manifest(&name, version, ""));
        deploy_and_crash_at(&mut w, &dir, point);
        // Within the restart backoff (300 ms here) plus a start.
        w.wait_state(&name, ChuteState::Running, Duration::from_secs(15));
        let v = w.inspect(&name);
        let now: u32 = v.version.parse().unwrap();
        assert!(
            now == old || now == version,
            "{point}: runs version {now}, not {old} or {version}"
        );
        // What runs is what the agent says runs: one container, running, of that version.
        let c = format!("chute-{name}");
        assert_eq!(
            podman_ok(&["inspect", "-f", "{{.State.Running}}", &c]),
            "true",
            "{point}"
        );
        assert_eq!(
            podman_ok(&[
                "inspect",
                "-f",
                "{{index .Config.Labels \"chuted.version\"}}",
                &c
            ]),
            now.to_string(),
            "{point}"
        );
        assert_eq!(
            our_containers(&w).len(),
            1,
            "{point}: {:?}",
            our_containers(&w)
        );
        let st = w.status();
        assert_eq!(st.unknown_containers.len(), 0, "{point}");
        assert_eq!(st.pools.used.memory_bytes, 32u64 << 20, "{point}");
        eprintln!("{point}: running version {now} (update {old} -> {version})");
        version = version.max(now);
    }
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_deploy_killed_before_it_was_acknowledged_is_undone_on_restart() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    for point in [
        "deploy-recorded",
        "deploy-after-create",
        "deploy-after-start",
    ] {
        let name = unique("crdep");
        let dir = w.chute_dir(&name, "[]", "");
        write_manifest(&dir, &manifest(&name, 1, ""));
        deploy_and_crash_at(&mut w, &dir, point);
        assert!(
            !w.cli(&["list"]).contains(&name),
            "{point}: an unacknowledged deploy is not listed"
        );
        assert!(
            our_containers(&w).is_empty(),
            "{point}: its container was removed: {:?}",
            our_containers(&w)
        );
        let st = w.status();
        assert_eq!(st.pools.used.memory_bytes, 0, "{point}");
        assert_eq!(st.unknown_containers.len(), 0);
        // Deploying again works.
        assert_eq!(w.deploy(&dir).chute.state, ChuteState::Running, "{point}");
        w.cli(&["remove", &name]);
    }
}

/// A small tmpfs mounted on the state dir; unmounted (lazily, the agent may still hold its
/// lock there) when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs on {}", dir.display());
        SmallDisk(dir.to_owned())
    }

    /// Fills the filesystem to the last byte.
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=4096"])
            .arg(format!("of={}", self.0.join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn free(&self) {
        std::fs::remove_file(self.0.join("filler")).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn with_the_state_dir_full_nothing_is_acknowledged_and_nothing_changes() {
    let mut w = World::new(&small_pools_config(""));
    let disk = SmallDisk::mount(&w.state_dir, "1m");
    w.start_agent();
    let name = unique("full");
    let dir = w.chute_dir(&name, "[]", "");
    write_manifest(&dir, &manifest(&name, 1, ""));
    let id = w.deploy_id(&dir);
    let other = unique("fulln");
    let other_dir = w.chute_dir(&other, "[]", "");
    write_manifest(&other_dir, &manifest(&other, 1, ""));

    disk.fill();
    let state_dir = w.state_dir.to_str().unwrap().to_owned();
    for args in [
        vec!["stop", name.as_str()],
        vec!["restart", name.as_str()],
        vec!["remove", name.as_str()],
    ] {
        let err = w.cli_err(&args);
        assert!(
            err.contains("could not be saved")
                && err.contains(&format!("{state_dir}/snapshot.bin"))
                && err.contains("No space left on device"),
            "{args:?}: {err}"
        );
    }
    // A deploy or update may be refused earlier, by the image pin it records first; either
    // way the error names the file in the state dir and the full disk.
    write_manifest(&dir, &manifest(&name, 2, ""));
    for target in [&other_dir, &dir] {
        let err = w.cli_err(&["deploy", target.to_str().unwrap()]);
        assert!(
            err.contains(&state_dir) && err.contains("No space left on device"),
            "deploy {}: {err}",
            target.display()
        );
    }
    // As it was: running, same container, version 1; nothing of the refused deploy.
    let v = w.inspect(&name);
    assert_eq!(v.state, ChuteState::Running);
    assert_eq!(v.container_id.as_deref().unwrap(), id);
    assert_eq!(v.version, "1");
    assert_eq!(our_containers(&w).len(), 1, "{:?}", our_containers(&w));
    assert_eq!(w.status().pools.used.memory_bytes, 32u64 << 20);

    // kill -9, space freed, restart: still exactly that.
    w.kill_agent();
    disk.free();
    w.start_agent();
    let v = w.inspect(&name);
    assert_eq!(v.state, ChuteState::Running);
    assert_eq!(v.container_id.as_deref().unwrap(), id);
    assert_eq!(v.version, "1");
    assert!(!w.cli(&["list"]).contains(&other));
    assert_eq!(our_containers(&w).len(), 1);
    w.kill_agent();
    drop(disk);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_corrupt_or_deleted_snapshot_keeps_a_live_rate_change_and_a_stopped_chute() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let shaped = unique("crbw");
    let dir = w.chute_dir(&shaped, "[]", "");
    let rates =
        |down: &str| format!("[network]\nbandwidth_down = \"{down}\"\nbandwidth_up = \"2mbit\"\n");
    write_manifest(&dir, &manifest(&shaped, 1, &rates("8mbit")));
    assert_eq!(w.deploy(&dir).chute.state, ChuteState::Running);
    write_manifest(&dir, &manifest(&shaped, 1, &rates("4mbit")));
    assert_eq!(
        w.deploy(&dir).outcome,
        DeployOutcome::Updated { live: true }
    );
    let stopped = unique("crst");
    let sdir = w.chute_dir(&stopped, "[]", "");
    write_manifest(&sdir, &manifest(&stopped, 1, ""));
    w.deploy(&sdir);
    w.cli(&["stop", &stopped]);
    w.cli(&["restart", &shaped]);
    let restarts = w.inspect(&shaped).restarts;

    for damage in ["corrupt", "delete"] {
        w.kill_agent();
        let snap = w.state_dir.join("snapshot.bin");
        if damage == "corrupt" {
            let mut b = std::fs::read(&snap).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0x5a;
            std::fs::write(&snap, b).unwrap();
        } else {
            std::fs::remove_file(&snap).unwrap();
        }
        w.start_agent();
        let v = w.inspect(&shaped);
        assert_eq!(v.state, ChuteState::Running, "{damage}");
        assert_eq!(
            v.network.bandwidth_down_bps,
            Some(4_000_000),
            "{damage}: {v:?}"
        );
        assert_eq!(v.restarts, restarts, "{damage}");
        assert_eq!(w.state(&stopped), ChuteState::Stopped, "{damage}");
        assert!(
            w.agent_log().contains("recovered from the journal"),
            "{damage}"
        );
        assert_eq!(w.status().unknown_containers.len(), 0);
    }
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn remove_while_podman_is_gone_is_an_error_and_keeps_the_chute() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("crrm");
    let dir = w.chute_dir(&name, "[]", "");
    write_manifest(&dir, &manifest(&name, 1, ""));
    w.deploy(&dir);
    w.stop_podman_service();
    let err = w.cli_err(&["remove", &name]);
    assert!(err.contains("cannot reach Podman"), "{err}");
    assert!(w.cli(&["list"]).contains(&name), "still listed");
    assert_eq!(w.status().pools.used.memory_bytes, 32u64 << 20);
    w.start_podman_service();
    assert_eq!(
        podman_ok(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &format!("chute-{name}")
        ]),
        "true"
    );
    w.cli(&["remove", &name]);
    assert!(our_containers(&w).is_empty());
}

/// What a chute may be after a restart: one state when the last operation on it was
/// acknowledged, either of two when the agent was killed during it.
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

/// Every chute's settled state from one `list` (waiting out starts under way).
fn observe_all(w: &World) -> Vec<(String, Want)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let list = w.list();
        let mut out = Vec::new();
        let mut settled = true;
        for l in &list {
            let version: u32 = l.version.parse().unwrap();
            let name = l.name.as_str().to_owned();
            match l.state {
                ChuteState::Running => out.push((name, Want::Runs(version))),
                ChuteState::Stopped => out.push((name, Want::Stopped(version))),
                _ => settled = false,
            }
        }
        if settled {
            return out;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not settled: {list:?}; log tail:\n{}",
            tail(&w.agent_log(), 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The randomized crash loop against the real agent and Podman: `CHUTED_E2E_KILLS`
/// (default 100) rounds of a random operation on one of three `always` chutes, the agent
/// killed with SIGKILL a random 0–900 ms after the request was sent, restarted, and checked:
/// no duplicate or unclaimed containers, pools equal to the reservations held, every
/// acknowledged operation held, chutes that should run running. Prints its figures.
#[test]
#[ignore = "needs root and Podman; scripts/tests/crash-loop.sh runs it"]
fn randomized_kill_9_crash_loop_against_podman() {
    let kills: usize = std::env::var("CHUTED_E2E_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("CHUTED_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    let mut rng = Rng(seed);
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let names: Vec<String> = (0..3).map(|_| unique("loop")).collect();
    let dirs: Vec<PathBuf> = names.iter().map(|n| w.chute_dir(n, "[]", "")).collect();
    let mut want: Vec<Vec<Want>> = vec![vec![Want::Absent]; names.len()];
    let mut next_version = 0u32;
    let (mut acked, mut interrupted) = (0u32, 0u32);
    let mut recovery = Duration::ZERO;
    let started = std::time::Instant::now();
    for round in 0..kills {
        let i = rng.next(names.len() as u64) as usize;
        let (name, dir) = (&names[i], &dirs[i]);
        let now = want[i][0].clone();
        let (args, after): (Vec<String>, Want) = match (&now, rng.next(4)) {
            (Want::Absent, _) | (_, 0) => {
                next_version += 1;
                write_manifest(dir, &manifest(name, next_version, ""));
                (
                    vec!["deploy".into(), dir.to_str().unwrap().into()],
                    Want::Runs(next_version),
                )
            }
            (Want::Runs(v), 1) => (vec!["stop".into(), name.clone()], Want::Stopped(*v)),
            (Want::Runs(v), 2) => (vec!["restart".into(), name.clone()], Want::Runs(*v)),
            (Want::Stopped(v), 1 | 2) => (vec!["start".into(), name.clone()], Want::Runs(*v)),
            _ => (vec!["remove".into(), name.clone()], Want::Absent),
        };
        let mut cli = Command::new(chuted_bin())
            .arg("--admin-socket")
            .arg(&w.admin_socket)
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.next(900)));
        w.kill_agent();
        let ok = cli.wait().unwrap().success();
        if ok {
            acked += 1;
            want[i] = vec![after];
        } else {
            interrupted += 1;
            want[i].push(after);
        }
        let t = std::time::Instant::now();
        w.start_agent();
        recovery += t.elapsed();

        // Every chute is what it may be. A chute reconciliation is starting shows as
        // stopped until its start returns: looked at again until it is allowed or 15 s
        // have passed.
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let seen_of = |all: &[(String, Want)], n: &str| {
            all.iter()
                .find(|(name, _)| name == n)
                .map_or(Want::Absent, |(_, s)| s.clone())
        };
        let mut seen_all = observe_all(&w);
        while std::time::Instant::now() < deadline
            && names
                .iter()
                .enumerate()
                .any(|(j, n)| !want[j].contains(&seen_of(&seen_all, n)))
        {
            std::thread::sleep(Duration::from_millis(200));
            seen_all = observe_all(&w);
        }
        for (j, n) in names.iter().enumerate() {
            let seen = seen_of(&seen_all, n);
            assert!(
                want[j].contains(&seen),
                "round {round} (seed {seed}, {args:?}): {n} is {seen:?}, allowed {:?}; log tail:\n{}",
                want[j],
                tail(&w.agent_log(), 40)
            );
            want[j] = vec![seen];
        }
        // No duplicate or unclaimed containers; chutes listed running run.
        let containers = our_containers(&w);
        for c in &containers {
            let cname = c.split_whitespace().next().unwrap();
            assert!(
                seen_all.iter().any(|(n, _)| format!("chute-{n}") == cname),
                "round {round}: container {c} belongs to no listed chute"
            );
        }
        assert!(
            containers.len() <= seen_all.len(),
            "round {round}: {containers:?}"
        );
        for (n, s) in &seen_all {
            if matches!(s, Want::Runs(_)) {
                assert!(
                    containers.contains(&format!("chute-{n} running")),
                    "round {round}: {n} listed running, its container not: {containers:?}"
                );
            }
        }
        // Pools equal the reservations held: every chute here holds its 32 MiB (policy
        // always; a stop keeps the reservation).
        let st = w.status();
        assert_eq!(
            st.pools.used.memory_bytes,
            (seen_all.len() as u64) * (32 << 20),
            "round {round}: {st:?}"
        );
        assert_eq!(st.unknown_containers.len(), 0, "round {round}: {st:?}");
    }
    println!(
        "kill -9 crash loop: {kills} kills ({interrupted} during an operation, {acked} after it was acknowledged), invariants held after every restart; mean restart-to-ready {:.0} ms; seed {seed}; {:.0} s",
        recovery.as_secs_f64() * 1000.0 / kills as f64,
        started.elapsed().as_secs_f64()
    );
}
