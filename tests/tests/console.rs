//! The web console in a real headless Chromium, against a real chute-cloud and a real
//! chuted on real Podman: sign in, accept the pending agent, grant the browser's own
//! key with `chutectl grant issue` (the line the Keys page prints), deploy the example
//! chute from the Deploy page, see it running with its caps, follow its logs (a hostile
//! line must render as text), stop it from a button and see the agent report it
//! stopped, sign out. The browser is driven by tests/console/console_test.py
//! (Playwright for Python, pinned, in the venv scripts/console-test.sh makes); this
//! test sets up the fleet and checks the agent's side. Screenshots of every page go to
//! target/console-test/ (or $CONSOLE_OUT).
//!
//! Run with scripts/console-test.sh (it builds the binaries and the venv first).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use e2e::fleet::{bin, identity, trust_owner, Cloud};
use e2e::*;

#[test]
#[ignore = "needs root, Podman and Chromium with Playwright; run scripts/console-test.sh"]
fn console_browser_admits_grants_deploys_follows_and_stops() {
    let python = std::env::var("CONSOLE_PYTHON")
        .unwrap_or_else(|_| "/var/cache/chuted-test/playwright/bin/python".into());
    assert!(
        Path::new(&python).exists(),
        "{python} missing: run scripts/console-test.sh (it makes the Playwright venv)"
    );
    let mut w = World::new(&small_pools_config("heartbeat_secs = 1\nsample_secs = 1\n"));
    let cloud = Cloud::start(&w.dir);
    let home = w.dir.join("home");
    let ctl = cloud.ctl(home.clone());
    let owner_key = w.dir.join("owner.key");
    trust_owner(&w, &ctl, &owner_key);
    let device = identity(&w).device_id;
    w.run_args = vec!["--cloud".into(), cloud.agent_url()];
    w.start_agent();

    // The example chute, under a name of this test, printing hostile lines to its log.
    let prefix = unique("cw");
    let name = format!("{prefix}-web");
    let dir = w.dir.join("chute");
    std::fs::create_dir_all(&dir).unwrap();
    let st = Command::new(workspace_root().join("examples/hello-web/build-image.sh"))
        .arg("--archive")
        .arg(&dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "build-image.sh --archive");
    let example =
        std::fs::read_to_string(workspace_root().join("examples/hello-web/chute.toml")).unwrap();
    let manifest: String = example
        .lines()
        .map(|l| {
            if l.starts_with("name = ") {
                format!("name = \"{name}\"")
            } else if l.starts_with("command = ") {
                // A log line that would run script if it were rendered as HTML.
                r#"command = ["sh", "-c", "echo hello-console; while true; do echo '<img src=x onerror=window.__pwned=1>'; echo '<script>window.__pwned=2</script>'; sleep 1; done"]"#.to_owned()
            } else if l.starts_with("ports = ") {
                // No fixed host port: tests run in parallel.
                String::new()
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("chute.toml"), manifest).unwrap();
    w.track(&name);

    let out = std::env::var("CONSOLE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target/console-test"));
    std::fs::create_dir_all(&out).unwrap();
    let script = workspace_root().join("tests/console/console_test.py");
    let started = std::time::Instant::now();
    let st = Command::new(&python)
        .arg(&script)
        .env("CONSOLE_URL", cloud.http())
        .env("CONSOLE_TOKEN", cloud.token())
        .env("CONSOLE_DEVICE", &device)
        .env("CONSOLE_CHUTE", &name)
        .env("CONSOLE_CHUTE_DIR", &dir)
        .env("CONSOLE_OUT", &out)
        .env("CONSOLE_PROFILE", w.dir.join("chromium-profile"))
        .env("CHUTECTL", bin("chutectl"))
        .env("CHUTECTL_KEY", &owner_key)
        .env("CHUTECTL_CLOUD", cloud.http())
        .env("CHUTECTL_TOKEN", cloud.token())
        .env("HOME", &home)
        .status()
        .expect("run the browser test");
    eprintln!("browser session: {:.1}s", started.elapsed().as_secs_f64());
    assert!(
        st.success(),
        "the browser test failed (screenshots in {}); agent log:\n{}",
        out.display(),
        tail(&w.agent_log(), 30)
    );
    // What the page showed is what the agent has: the chute, stopped by the button.
    assert_eq!(w.state(&name), ChuteState::Stopped);
}
