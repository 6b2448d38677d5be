//! Crash safety against real Podman: the agent killed at named points of an update and a
//! deploy (`CHUTED_CRASH_AT`, debug builds only), the state dir's filesystem full, the
//! snapshot corrupt or deleted, Podman gone during a removal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::*;

fn manifest(name: &str, version: u32, extra: &str) -> String {
    // The command differs per version, so every update replaces the container.
    format!(
        "name = \"{name}\"\nversion = \"{version}\"\nimage = \"{IMAGE}\"\ncommand = [\"sleep\", \"{}\"]\n\
         [resources]\ncpu = 0.1\nmemory = \"32MiB\"\npids = 32\n[restart]\npolicy = \"always\"\n{extra}",
        3600 + version
    )
}

fn write_manifest(dir: &Path, toml: &str) {
    std::fs::write(dir.join("chute.toml"), toml).unwrap();
}

/// This world's containers, as Podman lists them (running or not).
fn our_containers(w: &World) -> Vec<String> {
    let out = podman_ok(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=chuted.instance={}", w.instance),
        "--format",
        "{{.Names}} {{.State}}",
    ]);
    out.lines().map(str::to_owned).collect()
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
    assert_eq!(w.deploy(&dir)["state"], "running");
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
        w.wait_state(&name, "running", Duration::from_secs(15));
        let v = w.inspect(&name);
        let now: u32 = v["version"].as_str().unwrap().parse().unwrap();
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
        assert_eq!(
            st["unknown_containers"].as_array().unwrap().len(),
            0,
            "{point}"
        );
        assert_eq!(st["pools"]["used"]["memory_bytes"], 32u64 << 20, "{point}");
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
        assert_eq!(st["pools"]["used"]["memory_bytes"], 0, "{point}");
        assert_eq!(st["unknown_containers"].as_array().unwrap().len(), 0);
        // Deploying again works.
        assert_eq!(w.deploy(&dir)["state"], "running", "{point}");
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
    let id = w.deploy(&dir)["container_id"].as_str().unwrap().to_owned();
    let other = unique("fulln");
    let other_dir = w.chute_dir(&other, "[]", "");
    write_manifest(&other_dir, &manifest(&other, 1, ""));

    disk.fill();
    for args in [
        vec!["stop", name.as_str()],
        vec!["restart", name.as_str()],
        vec!["remove", name.as_str()],
        vec!["deploy", other_dir.to_str().unwrap()],
    ] {
        let err = w.cli_err(&args);
        assert!(
            err.contains("could not be saved")
                && err.contains("snapshot.bin")
                && err.contains("No space left on device"),
            "{args:?}: {err}"
        );
    }
    write_manifest(&dir, &manifest(&name, 2, ""));
    let err = w.cli_err(&["deploy", dir.to_str().unwrap()]);
    assert!(err.contains("could not be saved"), "update: {err}");
    // As it was: running, same container, version 1; nothing of the refused deploy.
    let v = w.inspect(&name);
    assert_eq!(v["state"], "running");
    assert_eq!(v["container_id"].as_str().unwrap(), id);
    assert_eq!(v["version"], "1");
    assert_eq!(our_containers(&w).len(), 1, "{:?}", our_containers(&w));
    assert_eq!(w.status()["pools"]["used"]["memory_bytes"], 32u64 << 20);

    // kill -9, space freed, restart: still exactly that.
    w.kill_agent();
    disk.free();
    w.start_agent();
    let v = w.inspect(&name);
    assert_eq!(v["state"], "running");
    assert_eq!(v["container_id"].as_str().unwrap(), id);
    assert_eq!(v["version"], "1");
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
    assert_eq!(w.deploy(&dir)["state"], "running");
    write_manifest(&dir, &manifest(&shaped, 1, &rates("4mbit")));
    assert_eq!(w.deploy(&dir)["live"], true);
    let stopped = unique("crst");
    let sdir = w.chute_dir(&stopped, "[]", "");
    write_manifest(&sdir, &manifest(&stopped, 1, ""));
    w.deploy(&sdir);
    w.cli(&["stop", &stopped]);
    w.cli(&["restart", &shaped]);
    let restarts = w.inspect(&shaped)["restarts"].clone();

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
        assert_eq!(v["state"], "running", "{damage}");
        assert_eq!(
            v["network"]["bandwidth_down_bps"], 4_000_000,
            "{damage}: {v}"
        );
        assert_eq!(v["restarts"], restarts, "{damage}");
        assert_eq!(w.state(&stopped), "stopped", "{damage}");
        assert!(
            w.agent_log().contains("recovered from the journal"),
            "{damage}"
        );
        assert_eq!(
            w.status()["unknown_containers"].as_array().unwrap().len(),
            0
        );
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
    assert_eq!(w.status()["pools"]["used"]["memory_bytes"], 32u64 << 20);
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
