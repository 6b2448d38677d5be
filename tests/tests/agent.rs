//! The agent against real Podman: enforcement, admission, lifecycle, crash safety.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::*;

const SLEEPER: &str = r#"["sleep", "3600"]"#;

fn res(cpu: &str, mem: &str, pids: u32) -> String {
    format!("[resources]\ncpu = {cpu}\nmemory = \"{mem}\"\npids = {pids}\n")
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn caps_are_exactly_what_the_manifest_asked_for() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("caps");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.5", "64MiB", 64));
    let v = w.deploy(&dir);
    assert_eq!(v.chute.state, ChuteState::Running, "{v:?}");
    let pid = w.container_pid(&name);
    assert_eq!(
        cgroup_file(pid, "memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    // No swap beyond the cap: memory+swap limit equals the memory limit (when the kernel
    // accounts swap at all).
    if std::path::Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            cgroup_file(pid, "memory", "memory.memsw.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
    }
    assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(cgroup_file(pid, "cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cgroup_file(pid, "pids", "pids.max"), "64");

    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
    let capeff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let caps = u64::from_str_radix(capeff.split_whitespace().nth(1).unwrap(), 16).unwrap();
    const CAP_NET_ADMIN: u64 = 1 << 12;
    const CAP_NET_RAW: u64 = 1 << 13;
    const CAP_SYS_ADMIN: u64 = 1 << 21;
    const CAP_MKNOD: u64 = 1 << 27;
    assert_eq!(
        caps & (CAP_NET_ADMIN | CAP_NET_RAW | CAP_SYS_ADMIN | CAP_MKNOD),
        0,
        "{capeff}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert!(
        nofile.split_whitespace().filter(|t| *t == "1024").count() == 2,
        "{nofile}"
    );

    let c = format!("chute-{name}");
    assert_eq!(
        podman_ok(&["inspect", "-f", "{{.HostConfig.Privileged}}", &c]),
        "false"
    );
    assert_eq!(
        podman_ok(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"chuted.chute\"}}",
            &c
        ]),
        name
    );
    assert_ne!(
        podman_ok(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &c]),
        "host"
    );

    // The agent reports the same limits it enforces.
    let lim = w
        .inspect(&name)
        .cgroup_limits
        .expect("a running chute's limits");
    assert_eq!(lim.memory_max, Some(64u64 << 20), "{lim:?}");
    assert_eq!(lim.pids_max, Some(64), "{lim:?}");
}

/// Chutes go under the agent's `cgroup_parent` (OpenWrt's init passes it in
/// `CHUTED_CGROUP_PARENT`, which wins over the config file) with their caps intact there;
/// a bad value stops the agent at start with what is allowed.
#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn chutes_land_under_the_configured_cgroup_parent() {
    let file_top = unique("chuted-e2e-cgfile");
    let env_top = unique("chuted-e2e-cgenv");
    let mut w = World::new(&small_pools_config(&format!(
        "cgroup_parent = \"/{file_top}\""
    )));
    w.track_cgroup_tree(&file_top);
    w.track_cgroup_tree(&env_top);

    let out = std::process::Command::new(chuted_bin())
        .args(["--admin-socket"])
        .arg(&w.admin_socket)
        .args(["run", "--state-dir"])
        .arg(&w.state_dir)
        .arg("--podman-socket")
        .arg(&w.podman_socket)
        .arg("--config")
        .arg(&w.config)
        .env("CHUTED_CGROUP_PARENT", "/../escape")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("CHUTED_CGROUP_PARENT") && err.contains("/chuted/chutes"),
        "{err}"
    );

    let parent = format!("/{env_top}/chutes");
    w.agent_env
        .push(("CHUTED_CGROUP_PARENT".into(), parent.clone()));
    w.start_agent();
    let name = unique("cgparent");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.5", "64MiB", 64));
    assert_eq!(w.deploy(&dir).chute.state, ChuteState::Running);
    let pid = w.container_pid(&name);
    for controller in ["memory", "pids", "cpu"] {
        let path = cgroup_path(pid, controller);
        assert!(
            path.starts_with(&format!("{parent}/")),
            "{controller} cgroup {path} is not under {parent}"
        );
    }
    assert_eq!(
        cgroup_file(pid, "memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(cgroup_file(pid, "pids", "pids.max"), "64");
    // The agent reads usage and limits from where the chute really is.
    let lim = w
        .inspect(&name)
        .cgroup_limits
        .expect("a running chute's limits");
    assert_eq!(lim.memory_max, Some(64u64 << 20), "{lim:?}");
    w.cli(&["remove", &name]);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn an_over_committed_deploy_is_refused_and_creates_nothing() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let a = unique("fits");
    let dir = w.chute_dir(&a, SLEEPER, &res("0.5", "128MiB", 64));
    w.deploy(&dir);
    let b = unique("toobig");
    let dir = w.chute_dir(&b, SLEEPER, &res("0.5", "128MiB", 64));
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains(&b)
            && err.contains("memory")
            && err.contains("128 MiB")
            && err.contains("72 MiB"),
        "{err}"
    );
    let ps = podman_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=^chute-{b}$"),
        "--format",
        "{{.ID}}",
    ]);
    assert!(ps.is_empty(), "a container was created: {ps}");
    let list = w.list();
    assert_eq!(list.len(), 1, "{list:?}");
    let used = &w.status().pools.used;
    assert_eq!(used.memory_bytes, 128u64 << 20, "{used:?}");
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn bad_manifests_are_refused_with_the_key_and_what_is_allowed() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("bad");
    let dir = w.chute_dir(&name, SLEEPER, "[resources]\nmemory = \"64 potatoes\"\n");
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains("resources.memory") && err.contains("potatoes"),
        "{err}"
    );
    // The refusal names the file, as `validate` does.
    assert!(
        err.contains(&format!("{}/chute.toml", dir.display())),
        "{err}"
    );
    // The agent refuses it too when a client skips the local check.
    let bad = std::fs::read_to_string(dir.join("chute.toml")).unwrap();
    let request = serde_json::json!({"op": "deploy", "manifest_toml": bad, "dir": null});
    let reply = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&w.admin_socket).unwrap();
        s.write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(
        reply.contains("error") && reply.contains("resources.memory"),
        "{reply}"
    );
    let dir = w.chute_dir(&name, SLEEPER, "[restart]\npolicy = \"sometimes\"\n");
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains("restart.policy") && err.contains("on-failure"),
        "{err}"
    );
    // validate works without an agent, same messages.
    let err = w.cli_err(&["validate", dir.to_str().unwrap()]);
    assert!(err.contains("restart.policy"), "{err}");
    assert!(w.list().is_empty());
    // Host network is refused unless the agent allows it.
    let dir = w.chute_dir(&name, SLEEPER, "[network]\nhost_network = true\n");
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains("host network") && err.contains("allow_host_network"),
        "{err}"
    );
    let ps = podman_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("name=^chute-{name}$"),
        "--format",
        "{{.ID}}",
    ]);
    assert!(ps.is_empty());
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_killed_chute_comes_back_under_on_failure_with_backoff_and_the_same_reservation() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("crashy");
    let dir = w.chute_dir(
        &name,
        SLEEPER,
        &(res("0.25", "32MiB", 32) + "[restart]\npolicy = \"on-failure\"\n"),
    );
    let first = w.deploy(&dir);
    let id = first.chute.container_id.clone().unwrap();
    let used_before = w.status().pools.used;

    let mut gaps = Vec::new();
    for round in 1..=2u64 {
        let pid = w.container_pid(&name);
        let killed = Instant::now();
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        wait_until("restart", Duration::from_secs(20), || {
            let v = w.inspect(&name);
            v.state == ChuteState::Running && u64::from(v.restarts) >= round && v.pid != pid
        });
        gaps.push(killed.elapsed());
        // While restarting, the reservation never left the ledger.
        assert_eq!(w.status().pools.used, used_before);
    }
    let v = w.inspect(&name);
    assert_eq!(
        v.container_id.as_deref().unwrap(),
        id,
        "restart must reuse the container"
    );
    assert_eq!(v.last_exit_code, Some(137));
    // backoff_initial_ms = 300: the first restart waits >= 300 ms, the second >= 600 ms.
    assert!(gaps[0] >= Duration::from_millis(300), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(600), "{gaps:?}");
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_clean_exit_under_on_failure_stays_stopped_and_never_policy_marks_failure() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let ok = unique("once");
    let dir = w.chute_dir(
        &ok,
        r#"["sh", "-c", "sleep 1; exit 0"]"#,
        "[restart]\npolicy = \"on-failure\"\n",
    );
    w.deploy(&dir);
    w.wait_state(&ok, ChuteState::Stopped, Duration::from_secs(15));
    let bad = unique("never");
    let dir = w.chute_dir(
        &bad,
        r#"["sh", "-c", "sleep 1; exit 3"]"#,
        "[restart]\npolicy = \"never\"\n",
    );
    w.deploy(&dir);
    w.wait_state(&bad, ChuteState::Failed, Duration::from_secs(15));
    assert_eq!(w.inspect(&bad).last_exit_code, Some(3));
    assert_eq!(w.inspect(&bad).restarts, 0);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn stop_start_restart_remove_through_the_cli() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("ops");
    let dir = w.chute_dir(
        &name,
        r#"["sh", "-c", "echo hello-from-chute; exec sleep 3600"]"#,
        &res("0.25", "32MiB", 32),
    );
    let id = w.deploy_id(&dir);
    w.cli(&["stop", &name]);
    assert_eq!(w.state(&name), ChuteState::Stopped);
    assert_eq!(
        podman_ok(&["inspect", "-f", "{{.State.Running}}", &id]),
        "false"
    );
    // A stopped chute keeps its reservation.
    assert_eq!(w.used_memory(), 32u64 << 20);
    let err = w.cli_err(&["stop", &name]);
    assert!(err.contains("stopped"), "{err}");
    w.cli(&["start", &name]);
    assert_eq!(w.state(&name), ChuteState::Running);
    let before = w.started_at(&name);
    w.cli(&["restart", &name]);
    assert_eq!(w.state(&name), ChuteState::Running);
    assert_ne!(w.started_at(&name), before);
    assert_eq!(w.inspect(&name).restarts, 1);
    let logs = w.cli(&["logs", &name]);
    assert!(logs.contains("hello-from-chute"), "{logs}");
    let first: serde_json::Value =
        serde_json::from_str(w.cli(&["logs", &name, "--json"]).lines().next().unwrap()).unwrap();
    assert_eq!(first["stream"], "stdout", "{first}");
    assert_eq!(first["line"], "hello-from-chute", "{first}");
    w.cli(&["remove", &name]);
    assert!(w.list().is_empty());
    assert_eq!(w.used_memory(), 0);
    assert!(!podman(&["container", "exists", &id]).status.success());
    let err = w.cli_err(&["inspect", &name]);
    assert!(err.contains("no chute named"), "{err}");
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn update_shrinks_at_once_and_refuses_growth_that_does_not_fit() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("upd");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.5", "64MiB", 64));
    let id = w.deploy_id(&dir);
    // Grow beyond the 200 MiB pool: refused, old one untouched.
    let started = w.started_at(&name);
    std::fs::write(
        dir.join("chute.toml"),
        format!(
            "name = \"{name}\"\nversion = \"2\"\nimage = \"{IMAGE}\"\ncommand = {SLEEPER}\n{}",
            res("0.5", "256MiB", 64)
        ),
    )
    .unwrap();
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(err.contains("memory"), "{err}");
    let v = w.inspect(&name);
    assert_eq!(v.container_id.as_deref().unwrap(), id);
    assert_eq!(v.version, "1");
    assert_eq!(w.started_at(&name), started);
    // Shrink: accepted, reservation drops.
    std::fs::write(
        dir.join("chute.toml"),
        format!(
            "name = \"{name}\"\nversion = \"3\"\nimage = \"{IMAGE}\"\ncommand = {SLEEPER}\n{}",
            res("0.25", "32MiB", 32)
        ),
    )
    .unwrap();
    let v = w.deploy(&dir);
    assert_eq!(v.chute.state, ChuteState::Running, "{v:?}");
    assert_eq!(w.inspect(&name).version, "3");
    assert_eq!(w.used_memory(), 32u64 << 20);
    let pid = w.container_pid(&name);
    assert_eq!(
        cgroup_file(pid, "memory", "memory.limit_in_bytes"),
        (32u64 << 20).to_string()
    );
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_killed_agent_comes_back_and_adopts_its_running_chute_without_restarting_it() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("adopt");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.25", "32MiB", 32));
    let id = w.deploy_id(&dir);
    let started = w.started_at(&name);
    w.kill_agent();
    w.start_agent();
    let v = w.inspect(&name);
    assert_eq!(v.state, ChuteState::Running);
    assert_eq!(v.container_id.as_deref().unwrap(), id);
    assert_eq!(v.restarts, 0);
    assert_eq!(w.started_at(&name), started, "the chute was restarted");
    assert_eq!(w.used_memory(), 32u64 << 20);
    // And it is still supervised: a crash after adoption is restarted.
    let pid = w.container_pid(&name);
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    wait_until("restart after adoption", Duration::from_secs(20), || {
        w.inspect(&name).restarts == 1 && w.state(&name) == ChuteState::Running
    });
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_chute_that_died_while_the_agent_was_down_is_handled_per_policy() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let again = unique("again");
    let dir = w.chute_dir(
        &again,
        SLEEPER,
        &(res("0.25", "32MiB", 32) + "[restart]\npolicy = \"on-failure\"\n"),
    );
    w.deploy(&dir);
    let gone = unique("gone");
    let dir = w.chute_dir(
        &gone,
        SLEEPER,
        &(res("0.25", "48MiB", 32) + "[restart]\npolicy = \"never\"\n"),
    );
    w.deploy(&dir);
    w.kill_agent();
    for n in [&again, &gone] {
        let pid = w.container_pid(n);
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
    }
    wait_until("both exited", Duration::from_secs(10), || {
        podman_ok(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &format!("chute-{again}"),
        ]) == "false"
            && podman_ok(&[
                "inspect",
                "-f",
                "{{.State.Running}}",
                &format!("chute-{gone}"),
            ]) == "false"
    });
    w.start_agent();
    w.wait_state(&again, ChuteState::Running, Duration::from_secs(15));
    assert_eq!(w.inspect(&again).restarts, 1);
    let v = w.inspect(&gone);
    assert_eq!(v.state, ChuteState::Failed, "{v:?}");
    assert!(!v.reservation_held);
    assert_eq!(
        w.used_memory(),
        32u64 << 20,
        "never-policy chute's reservation must be freed"
    );
    // Starting it again re-admits it.
    w.cli(&["start", &gone]);
    assert_eq!(w.used_memory(), 80u64 << 20);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_corrupt_snapshot_is_reported_and_the_agent_rebuilds_from_labels() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("corrupt");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.25", "32MiB", 32));
    let id = w.deploy_id(&dir);
    w.kill_agent();
    let snap = w.state_dir.join("snapshot.bin");
    let mut bytes = std::fs::read(&snap).unwrap();
    let half = bytes.len() / 2;
    bytes.truncate(half);
    std::fs::write(&snap, &bytes).unwrap();
    w.start_agent();
    let v = w.inspect(&name);
    assert_eq!(v.container_id.as_deref().unwrap(), id);
    assert_eq!(v.state, ChuteState::Running);
    assert!(
        w.agent_log().contains("snapshot unusable"),
        "corruption must be reported"
    );
    let aside = std::fs::read_dir(&w.state_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("snapshot.bin.corrupt-")
        });
    assert!(aside, "the corrupt snapshot is kept for a post-mortem");
    // Garbage instead of truncation, too.
    w.kill_agent();
    std::fs::write(&snap, b"\x00\xffnot a snapshot at all").unwrap();
    w.start_agent();
    assert_eq!(w.inspect(&name).container_id.as_deref().unwrap(), id);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn a_labelled_container_the_snapshot_does_not_know_is_reported_not_deleted() {
    let mut w = World::new(&small_pools_config(""));
    // A snapshot exists (empty) so this is not a rebuild-from-labels start (with no
    // snapshot and no journal, labelled containers are the record and would be adopted).
    w.start_agent();
    w.kill_agent();
    let stray = unique("stray");
    w.track_container(&stray);
    podman_ok(&[
        "run",
        "-d",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        "--name",
        &stray,
        "--label",
        "chuted.managed=true",
        "--label",
        &format!("chuted.chute={stray}"),
        "--label",
        &format!("chuted.instance={}", w.instance),
        IMAGE,
        "sleep",
        "3600",
    ]);
    w.start_agent();
    let st = w.status();
    let unknown = &st.unknown_containers;
    assert!(
        unknown
            .iter()
            .any(|u| u.chute.as_deref() == Some(stray.as_str())),
        "{st:?}"
    );
    assert_eq!(
        podman_ok(&["inspect", "-f", "{{.State.Running}}", &stray]),
        "true"
    );
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn an_image_archive_is_loaded_only_when_its_digest_matches() {
    let mut w = World::new(&small_pools_config(""));
    w.start_agent();
    let name = unique("archive");
    let dir = w.chute_dir(&name, SLEEPER, &res("0.25", "32MiB", 32));
    let o = std::process::Command::new(workspace_root().join("examples/hello-web/build-image.sh"))
        .arg("--archive")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let good = std::fs::read_to_string(dir.join("image.tar.sha256")).unwrap();
    std::fs::write(
        dir.join("image.tar.sha256"),
        format!("{}  image.tar\n", "0".repeat(64)),
    )
    .unwrap();
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(err.contains("sha256") && err.contains("refusing"), "{err}");
    assert!(w.list().is_empty());
    assert_eq!(w.used_memory(), 0);
    std::fs::write(dir.join("image.tar.sha256"), good).unwrap();
    assert_eq!(w.deploy(&dir).chute.state, ChuteState::Running);
}

#[test]
#[ignore = "needs root and Podman; scripts/test.sh runs it with --include-ignored"]
fn cli_contract_socket_in_both_places_people_first_json_on_request_distinct_exit_codes() {
    let mut w = World::new(&small_pools_config(""));
    // `chuted --admin-socket PATH run ...`: the harness's form.
    w.start_agent();

    // People by default, JSON with --json, for status like every client command.
    let human = w.cli(&["status"]);
    assert!(human.starts_with("chuted "), "{human}");
    assert!(human.contains("POOL"), "{human}");
    assert!(
        serde_json::from_str::<serde_json::Value>(&human).is_err(),
        "{human}"
    );
    let st: AgentStatus = w.typed(&["status"]);
    assert_eq!(st.chutes, 0);
    let name = unique("contract");
    let dir = w.chute_dir(&name, SLEEPER, "");
    let human = w.cli(&["deploy", dir.to_str().unwrap()]);
    assert!(
        human.starts_with(&format!("deployed {name} (running")),
        "{human}"
    );
    let human = w.cli(&["inspect", &name]);
    assert!(human.contains("state:         running"), "{human}");
    let ack: chute_api::ChuteAck = w.typed(&["stop", &name]);
    assert_eq!(ack.state, ChuteState::Stopped);

    // Exit status: 2 bad input, 3 unreachable, 4 refused.
    let code = |args: &[&str]| w.try_cli(args).status.code();
    assert_eq!(code(&["inspect", "no-such-chute"]), Some(2));
    assert_eq!(code(&["frobnicate"]), Some(2));
    assert_eq!(
        code(&["stop", &name]),
        Some(4),
        "stopping a stopped chute is refused"
    );
    let unreachable = std::process::Command::new(chuted_bin())
        .args(["--admin-socket", "/nonexistent/chuted.sock", "status"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the agent"));
    w.kill_agent();

    // `chuted run --admin-socket PATH ...`: the form a service file writes.
    w.admin_socket = w.dir.join("run-form.sock");
    w.admin_socket_after_run = true;
    w.start_agent();
    assert_eq!(w.names(), vec![name], "the same state dir, the same chute");
}

#[test]
fn two_different_admin_sockets_are_refused_before_anything_starts() {
    let dir = std::env::temp_dir().join(unique("chuted-twosock-"));
    let o = std::process::Command::new(chuted_bin())
        .args([
            "--admin-socket",
            "/tmp/a.sock",
            "run",
            "--admin-socket",
            "/tmp/b.sock",
        ])
        .arg("--state-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--admin-socket given twice"), "{err}");
    assert!(!dir.exists(), "state dir created by a refused command");
}
