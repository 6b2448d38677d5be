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

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::*;

const T: Duration = Duration::from_secs(60);

fn bin(name: &str) -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let p = target.join("debug").join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p chuted -p chute-cloud -p chutectl` first",
        p.display()
    );
    p
}

/// A chute-cloud process on a free port, killed on drop.
struct Cloud {
    child: Child,
    port: u16,
    data: PathBuf,
}

impl Cloud {
    fn start(dir: &Path) -> Cloud {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let data = dir.join("cloud");
        let child = Command::new(bin("chute-cloud"))
            .args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("cloud.log")).unwrap())
            .spawn()
            .expect("start chute-cloud");
        let c = Cloud { child, port, data };
        wait_until("chute-cloud to listen", T, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && c.data.join("admin.token").exists()
        });
        c
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chutectl(cloud: &Cloud, home: &Path, key: &Path, args: &[&str]) -> String {
    let o = Command::new(bin("chutectl"))
        .arg("--key")
        .arg(key)
        .args(args)
        .env("HOME", home)
        .env("CHUTECTL_CLOUD", format!("http://127.0.0.1:{}", cloud.port))
        .env("CHUTECTL_TOKEN", cloud.token())
        .output()
        .expect("run chutectl");
    assert!(
        o.status.success(),
        "chutectl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

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
    let owner_key = w.dir.join("owner.key");
    chutectl(&cloud, &home, &owner_key, &["keygen"]);
    let init: serde_json::Value = serde_json::from_str(&chutectl(
        &cloud,
        &home,
        &owner_key,
        &["owner", "init", "--json"],
    ))
    .unwrap();
    let owner_hex = init["owner_key"].as_str().unwrap().to_owned();
    let state = w.state_dir.to_str().unwrap().to_owned();
    w.cli(&["trust", "--state-dir", &state, "--owner-key", &owner_hex]);
    let device = w
        .cli(&["id", "--state-dir", &state])
        .lines()
        .find_map(|l| l.strip_prefix("device_id ").map(|s| s.trim().to_owned()))
        .unwrap();
    w.run_args = vec![
        "--cloud".into(),
        format!("ws://127.0.0.1:{}/agent", cloud.port),
    ];
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
        .env("CONSOLE_URL", format!("http://127.0.0.1:{}", cloud.port))
        .env("CONSOLE_TOKEN", cloud.token())
        .env("CONSOLE_DEVICE", &device)
        .env("CONSOLE_CHUTE", &name)
        .env("CONSOLE_CHUTE_DIR", &dir)
        .env("CONSOLE_OUT", &out)
        .env("CONSOLE_PROFILE", w.dir.join("chromium-profile"))
        .env("CHUTECTL", bin("chutectl"))
        .env("CHUTECTL_KEY", &owner_key)
        .env("CHUTECTL_CLOUD", format!("http://127.0.0.1:{}", cloud.port))
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
