//! End-to-end test harness: real `chuted` binaries against a real Podman API service,
//! each test with its own Podman service, state dir, admin socket and uniquely named
//! chutes. Everything a test creates is removed by name/id in `Drop`, even on failure.
//!
//! Not a library for users; only the tests in `tests/tests/` use it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod fleet;
pub mod peer;
pub mod pg;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use chute_api::{
    AgentStatus, ChuteDetail, ChuteState, ChuteSummary, DeployOutcome, DeployResult, RestartPolicy,
};
use serde_json::Value;

pub const IMAGE: &str = "localhost/chuted-hello-web:1";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The chuted binary under test: $CHUTED_BIN, else target/{debug,release}/chuted.
pub fn chuted_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CHUTED_BIN") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    let p = target.join("debug/chuted");
    assert!(
        p.exists(),
        "{} missing: run `cargo build -p chuted` first (or set CHUTED_BIN)",
        p.display()
    );
    p
}

/// Builds the example image once per machine (idempotent script).
pub fn ensure_image() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let st = Command::new(workspace_root().join("examples/hello-web/build-image.sh"))
            .stdout(Stdio::null())
            .status()
            .expect("run build-image.sh");
        assert!(st.success(), "building the example image failed");
    });
}

pub fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

pub fn podman_ok(args: &[&str]) -> String {
    let o = podman(args);
    assert!(
        o.status.success(),
        "podman {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One test's world: a Podman API service, an agent, and the chutes it deployed.
pub struct World {
    pub dir: PathBuf,
    /// The agent's `instance` label value.
    pub instance: String,
    pub podman_socket: PathBuf,
    pub admin_socket: PathBuf,
    pub state_dir: PathBuf,
    pub config: PathBuf,
    podman_service: Child,
    agent: Option<Child>,
    /// Container names this test may have created; removed in Drop.
    containers: Vec<String>,
    /// Extra arguments for `chuted run` (e.g. `--cloud URL`).
    pub run_args: Vec<String>,
    /// Extra environment for `chuted run`.
    pub agent_env: Vec<(String, String)>,
    /// Pass `--admin-socket` after `run` (a service file's form) instead of before it.
    pub admin_socket_after_run: bool,
    /// Top-level cgroups this test had Podman create (a `cgroup_parent`); removed in Drop.
    cgroup_trees: Vec<String>,
}

impl World {
    /// `config` is the agent config file's text.
    pub fn new(config: &str) -> World {
        ensure_image();
        let dir = std::env::temp_dir().join(unique("chuted-e2e-"));
        std::fs::create_dir_all(&dir).unwrap();
        let podman_socket = dir.join("podman.sock");
        let podman_service = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", podman_socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start podman system service");
        let config_path = dir.join("agent.toml");
        // Each test's agent owns only its own containers, though all share one Podman store.
        let instance = unique("e2e-");
        // The tests deploy the test image by its tag; pinning is tested where it is named.
        let unpinned = if config.contains("allow_unpinned_images") {
            ""
        } else {
            "allow_unpinned_images = true\n"
        };
        std::fs::write(
            &config_path,
            format!("instance = \"{instance}\"\n{unpinned}{config}"),
        )
        .unwrap();
        let w = World {
            instance,
            admin_socket: dir.join("admin.sock"),
            state_dir: dir.join("state"),
            config: config_path,
            podman_socket,
            podman_service,
            agent: None,
            containers: Vec::new(),
            run_args: Vec::new(),
            agent_env: Vec::new(),
            admin_socket_after_run: false,
            cgroup_trees: Vec::new(),
            dir,
        };
        wait_until("podman socket", Duration::from_secs(10), || {
            w.podman_socket.exists()
        });
        w
    }

    pub fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let socket_flag = ["--admin-socket".as_ref(), self.admin_socket.as_os_str()];
        let (before, after) = if self.admin_socket_after_run {
            (&[][..], &socket_flag[..])
        } else {
            (&socket_flag[..], &[][..])
        };
        let child = Command::new(chuted_bin())
            .args(before)
            .arg("run")
            .args(after)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--podman-socket")
            .arg(&self.podman_socket)
            .arg("--config")
            .arg(&self.config)
            .arg("--log-level")
            .arg("debug")
            .args(&self.run_args)
            .envs(self.agent_env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chuted run");
        self.agent = Some(child);
        let start = Instant::now();
        loop {
            if self.try_cli(&["status"]).status.success() {
                break;
            }
            if let Some(st) = self.agent.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited with {st} during start; log:\n{}",
                    self.agent_log()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent did not come up; log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL, as a crash or power cut would.
    pub fn kill_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills this world's Podman API service (SIGKILL: its containers live on under
    /// conmon) and leaves it down until [`World::start_podman_service`].
    pub fn stop_podman_service(&mut self) {
        let _ = self.podman_service.kill();
        let _ = self.podman_service.wait();
    }

    /// The Podman API service's pid (to SIGSTOP it: a hung Podman).
    pub fn podman_service_pid(&self) -> u32 {
        self.podman_service.id()
    }

    /// Starts a fresh Podman API service on the same socket path.
    pub fn start_podman_service(&mut self) {
        let _ = std::fs::remove_file(&self.podman_socket);
        self.podman_service = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", self.podman_socket.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart podman system service");
        wait_until("podman socket", Duration::from_secs(10), || {
            self.podman_socket.exists()
        });
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        Command::new(chuted_bin())
            .arg("--admin-socket")
            .arg(&self.admin_socket)
            .args(args)
            .output()
            .expect("run chuted cli")
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            o.status.success(),
            "chuted {args:?} failed: {}\nagent log tail:\n{}",
            String::from_utf8_lossy(&o.stderr),
            tail(&self.agent_log(), 30)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs a CLI command that must fail; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            !o.status.success(),
            "chuted {args:?} unexpectedly succeeded: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.cli(&a)).unwrap()
    }

    /// A `--json` answer, decoded as the typed API a front end uses.
    pub fn typed<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        serde_json::from_value(self.json(args)).unwrap()
    }

    /// `inspect --json`, or `None` while the agent refuses admin connections.
    pub fn inspect_when_possible(&self, name: &str) -> Option<ChuteDetail> {
        let o = self.try_cli(&["inspect", name, "--json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    }

    pub fn inspect(&self, name: &str) -> ChuteDetail {
        self.typed(&["inspect", name])
    }

    pub fn list(&self) -> Vec<ChuteSummary> {
        self.typed(&["list"])
    }

    /// The names `list` shows.
    pub fn names(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .map(|c| c.name.to_string())
            .collect()
    }

    pub fn state(&self, name: &str) -> ChuteState {
        self.inspect(name).state
    }

    /// Memory the pools have handed out.
    pub fn used_memory(&self) -> u64 {
        self.status().pools.used.memory_bytes
    }

    pub fn wait_state(&self, name: &str, want: ChuteState, timeout: Duration) {
        let start = Instant::now();
        loop {
            let s = self.state(name);
            if s == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "chute {name} is {s}, wanted {want}; log tail:\n{}",
                tail(&self.agent_log(), 30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Writes a chute directory; `extra` is appended to the manifest.
    pub fn chute_dir(&mut self, name: &str, command: &str, extra: &str) -> PathBuf {
        let d = self.dir.join(format!("chute-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("chute.toml"),
            format!("name = \"{name}\"\nversion = \"1\"\nimage = \"{IMAGE}\"\ncommand = {command}\n{extra}"),
        )
        .unwrap();
        self.track(name);
        d
    }

    pub fn track(&mut self, chute: &str) {
        let c = format!("chute-{chute}");
        if !self.containers.contains(&c) {
            self.containers.push(c);
        }
    }

    pub fn track_container(&mut self, name: &str) {
        self.containers.push(name.to_owned());
    }

    pub fn deploy(&mut self, dir: &Path) -> DeployResult {
        self.typed(&["deploy", dir.to_str().unwrap()])
    }

    /// Deploys and returns the container id.
    pub fn deploy_id(&mut self, dir: &Path) -> String {
        self.deploy(dir)
            .chute
            .container_id
            .expect("a deployed chute has a container")
    }

    pub fn container_pid(&self, name: &str) -> u32 {
        podman_ok(&["inspect", "-f", "{{.State.Pid}}", &format!("chute-{name}")])
            .parse()
            .unwrap()
    }

    pub fn started_at(&self, name: &str) -> String {
        podman_ok(&[
            "inspect",
            "-f",
            "{{.State.StartedAt}}",
            &format!("chute-{name}"),
        ])
    }

    pub fn status(&self) -> AgentStatus {
        self.typed(&["status"])
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill_agent();
        for c in &self.containers {
            let _ = podman(&["rm", "-f", "-t", "0", c]);
        }
        for top in &self.cgroup_trees {
            remove_cgroup_tree(top);
        }
        let _ = self.podman_service.kill();
        let _ = self.podman_service.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test dir kept for post-mortem: {}", self.dir.display());
        }
    }
}

impl World {
    /// Marks `/top` (a cgroup this test's `cgroup_parent` made Podman create) for removal
    /// in every hierarchy once the test's containers are gone.
    pub fn track_cgroup_tree(&mut self, top: &str) {
        self.cgroup_trees.push(top.to_owned());
    }
}

/// Removes the cgroup `/top` and everything under it, in the v2 hierarchy and in every
/// v1 one. Empty cgroups only: Podman may take a moment to clean up a container's own.
pub fn remove_cgroup_tree(top: &str) {
    fn rmdir_tree(dir: &Path) -> bool {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rmdir_tree(&e.path());
                }
            }
        }
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for _ in 0..50 {
        let mut all_gone = true;
        for root in &roots {
            let dir = root.join(top.trim_start_matches('/'));
            if dir.exists() && !rmdir_tree(&dir) {
                all_gone = false;
            }
        }
        if all_gone {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("cgroup {top} could not be removed everywhere");
}

/// A process's cgroups from `/proc/PID/cgroup`: (controllers, path) per hierarchy; the
/// v2 one has no controllers.
fn proc_cgroups(pid: u32) -> Vec<(String, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next().unwrap();
            let ctrls = parts.next().unwrap().to_owned();
            (ctrls, parts.next().unwrap().to_owned())
        })
        .collect()
}

fn has_controller(ctrls: &str, controller: &str) -> bool {
    ctrls.split(',').any(|c| c == controller)
}

/// The cgroup path of a process for `controller` (v1), or its v2 path.
pub fn cgroup_path(pid: u32, controller: &str) -> String {
    let cgroups = proc_cgroups(pid);
    cgroups
        .iter()
        .find(|(ctrls, _)| has_controller(ctrls, controller))
        .or_else(|| cgroups.iter().find(|(ctrls, _)| ctrls.is_empty()))
        .map(|(_, path)| path.clone())
        .unwrap_or_else(|| panic!("no {controller} cgroup for pid {pid}"))
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Reads one cgroup-v1 (or v2) file of a process's cgroup for `controller`.
pub fn cgroup_file(pid: u32, controller: &str, file: &str) -> String {
    for (ctrls, path) in proc_cgroups(pid) {
        if has_controller(&ctrls, controller) {
            let p = format!("/sys/fs/cgroup/{ctrls}{path}/{file}");
            let alt = format!("/sys/fs/cgroup/{controller}{path}/{file}");
            return std::fs::read_to_string(&p)
                .or_else(|_| std::fs::read_to_string(&alt))
                .unwrap_or_else(|e| panic!("read {p}: {e}"))
                .trim()
                .to_owned();
        }
        if ctrls.is_empty() {
            let p = format!("/sys/fs/cgroup{path}/{file}");
            if let Ok(s) = std::fs::read_to_string(&p) {
                return s.trim().to_owned();
            }
        }
    }
    panic!("no {controller} cgroup for pid {pid}");
}

/// A config with small, exact pools so admission is easy to reason about.
pub fn small_pools_config(extra: &str) -> String {
    format!(
        "{extra}\nbackoff_initial_ms = 300\nbackoff_max_ms = 4000\nstop_timeout_secs = 2\n\
         [pools]\ncpu = 2.0\nmemory = \"200MiB\"\npids = 500\nbandwidth_down = \"100mbit\"\nbandwidth_up = \"100mbit\"\n"
    )
}

/// A private CA and a certificate for 127.0.0.1 signed by it (openssl CLI).
pub fn make_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let sh = |script: &str| {
        let st = std::process::Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("run openssl");
        assert!(st.success(), "openssl failed: {script}");
    };
    sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=chuted-test-ca");
    sh("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout leaf.key -out leaf.csr -subj /CN=127.0.0.1");
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    sh("openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out leaf.pem -days 2 -extfile leaf.ext");
    (
        dir.join("ca.pem"),
        dir.join("leaf.pem"),
        dir.join("leaf.key"),
    )
}
