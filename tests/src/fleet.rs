//! chute-cloud and chutectl for the fleet tests (tests/tests/fleet.rs, replicas.rs,
//! console.rs): a chute-cloud process on a port of its own (optionally TLS, a
//! `--database` URL, a fixed port for a replica taking over another's address), killed
//! on drop; chutectl with a cloud URL, token and HOME of its own; and the steps those
//! tests repeat (the owner's key trusted by the device, a developer's grant, following
//! logs, looking a device up).
//!
//! Not a client library: every helper asserts what a test would assert and panics with
//! the output that explains a failure. The binaries are target/debug ones; build them
//! first with `cargo build -p chuted -p chute-cloud -p chutectl`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::{podman_ok, wait_until, workspace_root, World, IMAGE};

const T: Duration = Duration::from_secs(60);

/// A workspace binary from target/debug (or $CARGO_TARGET_DIR/debug).
pub fn bin(name: &str) -> PathBuf {
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

/// A port of 127.0.0.1 that was free a moment ago (bound to :0 and read back).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How to start a [`Cloud`]: [`Cloud::options`], then the setters, then `start`.
pub struct CloudOptions<'a> {
    dir: &'a Path,
    name: &'a str,
    port: Option<u16>,
    database: Option<&'a str>,
    tls: Option<(&'a Path, &'a Path)>,
}

impl<'a> CloudOptions<'a> {
    /// Names the log (`<dir>/<name>.log`) and stdout (`<dir>/<name>.out`) files, so
    /// replicas sharing `dir` keep their own; "cloud" unless set.
    pub fn name(mut self, name: &'a str) -> Self {
        self.name = name;
        self
    }

    /// Listens on this port instead of a free one (a replica taking over an address).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `--database URL` (PostgreSQL for replicas, or a sqlite:// file).
    pub fn database(mut self, url: &'a str) -> Self {
        self.database = Some(url);
        self
    }

    /// `--tls-cert`/`--tls-key`: https and wss.
    pub fn tls(mut self, cert: &'a Path, key: &'a Path) -> Self {
        self.tls = Some((cert, key));
        self
    }

    /// Starts it and waits until it listens and has written its admin token.
    pub fn start(self) -> Cloud {
        let port = self.port.unwrap_or_else(free_port);
        // Replicas share the data dir (the image blobs, the admin token).
        let data = self.dir.join("cloud");
        let log = self.dir.join(format!("{}.log", self.name));
        let out = self.dir.join(format!("{}.out", self.name));
        let mut cmd = Command::new(bin("chute-cloud"));
        cmd.args(["serve", "--data-dir"]).arg(&data).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--log-level",
            "debug",
        ]);
        if let Some(url) = self.database {
            cmd.args(["--database", url]);
        }
        if let Some((cert, key)) = self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let child = cmd
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start chute-cloud");
        let c = Cloud {
            child,
            port,
            data,
            log,
            out,
            tls: self.tls.is_some(),
        };
        wait_until("chute-cloud to listen", T, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && c.data.join("admin.token").exists()
        });
        c
    }
}

/// A chute-cloud process (`serve`), killed on drop.
pub struct Cloud {
    child: Child,
    pub port: u16,
    data: PathBuf,
    log: PathBuf,
    /// What it printed on stdout.
    pub out: PathBuf,
    tls: bool,
}

impl Cloud {
    /// Plain http on a free port, data in `<dir>/cloud`, log in `<dir>/cloud.log`.
    pub fn start(dir: &Path) -> Cloud {
        Self::options(dir).start()
    }

    pub fn options(dir: &Path) -> CloudOptions<'_> {
        CloudOptions {
            dir,
            name: "cloud",
            port: None,
            database: None,
            tls: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn http(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn agent_url(&self) -> String {
        let scheme = if self.tls { "wss" } else { "ws" };
        format!("{scheme}://127.0.0.1:{}/agent", self.port)
    }

    /// The admin token it wrote to its data dir.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// chutectl against this cloud with its admin token and `home` as HOME.
    pub fn ctl(&self, home: PathBuf) -> Ctl {
        Ctl::new(self.http(), self.token(), home)
    }

    /// One counter or gauge of its plain-http /metrics.
    pub fn metric(&self, name: &str) -> u64 {
        let o = Command::new("curl")
            .args(["-sf", &format!("{}/metrics", self.http())])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
            .trim()
            .parse()
            .unwrap()
    }

    /// SIGKILL, no shutdown: what a crashed replica looks like.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// chutectl with a cloud URL, a token and a HOME of its own.
#[derive(Clone)]
pub struct Ctl {
    pub cloud: String,
    pub token: String,
    pub home: PathBuf,
}

impl Ctl {
    pub fn new(cloud: String, token: String, home: PathBuf) -> Ctl {
        Ctl { cloud, token, home }
    }

    /// The same token and HOME against another cloud URL (another replica).
    pub fn at(&self, cloud: String) -> Ctl {
        Ctl {
            cloud,
            ..self.clone()
        }
    }

    /// The chutectl command with `--key key` and this cloud, token and HOME, for a
    /// caller that spawns it.
    pub fn command(&self, key: &Path) -> Command {
        let mut cmd = Command::new(bin("chutectl"));
        cmd.arg("--key")
            .arg(key)
            .env("HOME", &self.home)
            .env("CHUTECTL_CLOUD", &self.cloud)
            .env("CHUTECTL_TOKEN", &self.token);
        cmd
    }

    pub fn run(&self, key: &Path, args: &[&str]) -> Output {
        self.command(key).args(args).output().expect("run chutectl")
    }

    /// Runs with `--json` (at the end, as users type it); returns (success, JSON).
    pub fn json(&self, key: &Path, args: &[&str]) -> (bool, Value) {
        let mut a = args.to_vec();
        a.push("--json");
        let o = self.run(key, &a);
        let out = String::from_utf8_lossy(&o.stdout);
        let v = serde_json::from_str(&out).unwrap_or_else(|_| {
            panic!(
                "chutectl {args:?}: not JSON: {out}\nstderr: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
        (o.status.success(), v)
    }

    /// [`Ctl::json`] that must succeed.
    pub fn ok(&self, key: &Path, args: &[&str]) -> Value {
        let (ok, v) = self.json(key, args);
        assert!(ok, "chutectl {args:?} failed: {v}");
        v
    }

    /// GET /api/v1/PATH with the token, as JSON (Null when it fails).
    pub fn get(&self, path: &str) -> Value {
        let o = Command::new("curl")
            .args([
                "-sf",
                "-H",
                &format!("Authorization: Bearer {}", self.token),
            ])
            .arg(format!("{}/api/v1/{path}", self.cloud))
            .output()
            .unwrap();
        serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
    }

    /// The device as the API shows it (Null when unknown).
    pub fn device(&self, id: &str) -> Value {
        self.get(&format!("devices/{id}"))
    }

    /// The device's commands from the API (empty when the request fails).
    pub fn commands(&self, device: &str) -> Vec<Value> {
        self.get(&format!("devices/{device}/commands"))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The device's entry in `chutectl device list`, if it is listed.
    pub fn listed_device(&self, key: &Path, id: &str) -> Option<Value> {
        let list = self.ok(key, &["device", "list"]);
        list.as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
    }

    /// `chutectl push DIR --device DEVICE`, which must succeed; the push's JSON.
    pub fn push(&self, key: &Path, dir: &Path, device: &str) -> Value {
        self.ok(key, &["push", dir.to_str().unwrap(), "--device", device])
    }

    /// `chutectl logs --tail 1 --follow --follow-secs SECS --json`, which must succeed:
    /// the verified tail, then the live lines relayed while it watched, one JSON value
    /// each.
    pub fn follow_logs(&self, key: &Path, device: &str, chute: &str, secs: u32) -> Vec<Value> {
        let secs = secs.to_string();
        let o = self.run(
            key,
            &[
                "logs",
                "--device",
                device,
                chute,
                "--tail",
                "1",
                "--follow",
                "--follow-secs",
                &secs,
                "--json",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// What `chuted id` prints for a World's state dir.
pub struct Identity {
    pub device_id: String,
    pub public_key: String,
}

pub fn identity(w: &World) -> Identity {
    let state = w.state_dir.to_str().unwrap().to_owned();
    let id = w.cli(&["id", "--state-dir", &state]);
    let field = |f: &str| {
        id.lines()
            .find_map(|l| l.strip_prefix(f))
            .unwrap()
            .trim()
            .to_owned()
    };
    Identity {
        device_id: field("device_id "),
        public_key: field("public_key "),
    }
}

/// The owner's key made (`keygen`) and registered (`owner init`) through `ctl`, and
/// the World's device trusting it; returns what `owner init --json` printed.
pub fn trust_owner(w: &World, ctl: &Ctl, owner_key: &Path) -> Value {
    ctl.ok(owner_key, &["keygen"]);
    let init = ctl.ok(owner_key, &["owner", "init"]);
    let owner_hex = init["owner_key"].as_str().unwrap().to_owned();
    let state = w.state_dir.to_str().unwrap().to_owned();
    w.cli(&["trust", "--state-dir", &state, "--owner-key", &owner_hex]);
    init
}

/// A developer key made at `dev_key` and granted, by the owner through `ctl`, every
/// procedure on chutes `<prefix>-*` only.
pub fn grant_developer(ctl: &Ctl, owner_key: &Path, dev_key: &Path, prefix: &str) {
    let dev_pub = ctl.ok(dev_key, &["keygen"])["pubkey"]
        .as_str()
        .unwrap()
        .to_owned();
    ctl.ok(
        owner_key,
        &[
            "grant",
            "issue",
            "--to",
            &dev_pub,
            "--procedures",
            "deploy,start,stop,restart,remove,logs,status",
            "--chutes",
            &format!("{prefix}-*"),
        ],
    );
}

/// A chute directory ([`World::chute_dir`]) that carries an archive of the example
/// image, `image.tar`: cloud deploys pin their image by content.
pub fn chute_with_image(w: &mut World, name: &str, command: &str, extra: &str) -> PathBuf {
    let dir = w.chute_dir(name, command, extra);
    podman_ok(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        dir.join("image.tar").to_str().unwrap(),
        IMAGE,
    ]);
    dir
}

/// The statuses of a command's (or push result's) `timeline`, in order.
pub fn timeline(v: &Value) -> Vec<&str> {
    v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect()
}
