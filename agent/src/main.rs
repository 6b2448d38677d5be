//! `chuted`: the agent daemon (`chuted run`) and its local admin CLI.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use anyhow::{bail, Context, Result};
use argh::FromArgs;
use chuted::admin::{ChuteSummary, Reply, Request};
use chuted::config::{AgentConfig, HostFacts};
use chuted::podman::Podman;
use chuted::supervisor::{self, Agent};

const DEFAULT_ADMIN_SOCKET: &str = "/run/chuted/admin.sock";
const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// chuted runs third-party containers ("chutes") under Podman with enforced CPU, memory,
/// pids and bandwidth caps. `chuted run` is the agent; the other commands talk to a running
/// agent over its admin socket (root only).
#[derive(FromArgs)]
struct Cli {
    /// admin socket of the running agent (default /run/chuted/admin.sock)
    #[argh(option)]
    admin_socket: Option<PathBuf>,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
    #[argh(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Run(RunCmd),
    Deploy(DeployCmd),
    List(ListCmd),
    Inspect(InspectCmd),
    Start(StartTag),
    Stop(StopTag),
    Restart(RestartTag),
    Remove(RemoveTag),
    Logs(LogsCmd),
    Status(StatusCmd),
    Validate(ValidateCmd),
    Id(IdCmd),
    Trust(TrustCmd),
    Selftest(SelftestCmd),
}

/// Run the agent: reconcile with Podman, then serve the admin socket.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {
    /// directory for the snapshot and keys (created 0700)
    #[argh(option)]
    state_dir: PathBuf,
    /// podman API socket (default /run/podman/podman.sock; start one with
    /// `podman system service --time=0 unix:///PATH`)
    #[argh(option)]
    podman_socket: Option<PathBuf>,
    /// agent config file (TOML: pools, allow_host_network, oci_runtime, ...)
    #[argh(option)]
    config: Option<PathBuf>,
    /// log level: error, warn, info (default), debug, trace
    #[argh(option, default = "String::from(\"info\")")]
    log_level: String,
    /// cloud manager to take signed commands from: ws://HOST:PORT/PATH or wss://...
    /// (overrides the config's `cloud`)
    #[argh(option)]
    cloud: Option<String>,
    /// PEM file of CA certificates for wss:// (default /etc/ssl/certs/ca-certificates.crt)
    #[argh(option)]
    cloud_ca: Option<PathBuf>,
    /// realm (fleet) to join on the cloud (default "default")
    #[argh(option, default = "String::from(\"default\")")]
    cloud_realm: String,
    /// ping the cloud after this many idle seconds; give up 30 s (or this, if less)
    /// after an unanswered ping (default 60)
    #[argh(option, default = "60")]
    cloud_keepalive_secs: u64,
    /// single-use claim token from the cloud owner: accepted on first connect
    #[argh(option)]
    claim: Option<String>,
}

/// Deploy or update the chute in DIR (chute.toml, optional image.tar + image.tar.sha256).
#[derive(FromArgs)]
#[argh(subcommand, name = "deploy")]
struct DeployCmd {
    /// directory holding chute.toml
    #[argh(positional)]
    dir: PathBuf,
    /// print the result as JSON
    #[argh(switch)]
    json: bool,
}

/// List chutes: name, state, restarts, container id.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// print JSON (an array of objects)
    #[argh(switch)]
    json: bool,
}

/// Show everything about one chute: manifest, reservation, usage, cgroup limits.
#[derive(FromArgs)]
#[argh(subcommand, name = "inspect")]
struct InspectCmd {
    /// chute name
    #[argh(positional)]
    name: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Show device pools (capacity, used, free) and the agent's health.
#[derive(FromArgs)]
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

/// Print a chute's output.
#[derive(FromArgs)]
#[argh(subcommand, name = "logs")]
struct LogsCmd {
    /// chute name
    #[argh(positional)]
    name: String,
    /// keep streaming new output
    #[argh(switch, short = 'f')]
    follow: bool,
    /// only the last N lines
    #[argh(option)]
    tail: Option<u32>,
}

/// Check a chute directory's manifest without an agent, and print what it asks for.
#[derive(FromArgs)]
#[argh(subcommand, name = "validate")]
struct ValidateCmd {
    /// directory holding chute.toml (or the file itself)
    #[argh(positional)]
    path: PathBuf,
}

/// Start a stopped chute (re-admits its reservation if it was freed).
#[derive(FromArgs)]
#[argh(subcommand, name = "start")]
struct StartTag {
    /// chute name
    #[argh(positional)]
    name: String,
}

/// Stop a chute; it is not restarted until you start it.
#[derive(FromArgs)]
#[argh(subcommand, name = "stop")]
struct StopTag {
    /// chute name
    #[argh(positional)]
    name: String,
}

/// Restart a chute, keeping its reservation throughout.
#[derive(FromArgs)]
#[argh(subcommand, name = "restart")]
struct RestartTag {
    /// chute name
    #[argh(positional)]
    name: String,
}

/// Remove a chute: its container, reservation and record.
#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
struct RemoveTag {
    /// chute name
    #[argh(positional)]
    name: String,
}

/// Print this device's id and public key (creating the device key if absent).
#[derive(FromArgs)]
#[argh(subcommand, name = "id")]
struct IdCmd {
    /// the agent's state directory
    #[argh(option)]
    state_dir: PathBuf,
}

/// Trust an owner's public key: commands are accepted only under grants it signed.
#[derive(FromArgs)]
#[argh(subcommand, name = "trust")]
struct TrustCmd {
    /// the agent's state directory
    #[argh(option)]
    state_dir: PathBuf,
    /// the owner's Ed25519 public key (64 hex characters)
    #[argh(option)]
    owner_key: String,
}

/// Check that signing and verification work on this machine (keys, a signed command
/// through the codec, forged and replayed copies refused).
#[derive(FromArgs)]
#[argh(subcommand, name = "selftest")]
struct SelftestCmd {}

fn main() -> ExitCode {
    let cli: Cli = argh::from_env();
    if cli.version {
        println!("chuted {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(cmd) = cli.cmd else {
        eprintln!("chuted: no command given; run `chuted --help` for the list");
        return ExitCode::from(2);
    };
    let admin = cli
        .admin_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADMIN_SOCKET));
    match dispatch(cmd, &admin) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chuted: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cmd: Cmd, admin: &Path) -> Result<ExitCode> {
    match cmd {
        Cmd::Run(r) => run(r, admin),
        Cmd::Id(c) => {
            create_state_dir(&c.state_dir)?;
            let key = chuted::identity::load_or_create_device_key(&c.state_dir)?;
            println!("device_id {}", key.device_id());
            println!("public_key {}", key.public_hex());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Trust(t) => {
            let owner = chuted::identity::parse_owner_key(&t.owner_key)?;
            create_state_dir(&t.state_dir)?;
            let path = chuted::identity::trust_owner(&t.state_dir, &owner)?;
            println!("trusting owner {owner} ({})", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Selftest(_) => {
            println!("{}", proto::selftest()?);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Deploy(d) => {
            let dir = std::fs::canonicalize(&d.dir)
                .with_context(|| format!("chute directory {}", d.dir.display()))?;
            let path = dir.join("chute.toml");
            let manifest_toml = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let v = call(
                admin,
                &Request::Deploy {
                    manifest_toml,
                    dir: Some(dir.to_string_lossy().into_owned()),
                },
            )?;
            if d.json {
                println!("{v}");
            } else {
                let verb = if v["updated"] == true {
                    "updated"
                } else if v["unchanged"] == true {
                    "unchanged"
                } else {
                    "deployed"
                };
                println!(
                    "{verb} {} ({}, container {})",
                    v["name"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?"),
                    short(v["container_id"].as_str().unwrap_or("-"))
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List(l) => {
            let v = call(admin, &Request::List)?;
            if l.json {
                println!("{v}");
                return Ok(ExitCode::SUCCESS);
            }
            let list: Vec<ChuteSummary> = serde_json::from_value(v)?;
            println!(
                "{:<24} {:<11} {:>8}  {:<12}  VERSION",
                "NAME", "STATE", "RESTARTS", "CONTAINER"
            );
            for c in list {
                println!(
                    "{:<24} {:<11} {:>8}  {:<12}  {}",
                    c.name,
                    c.state.to_string(),
                    c.restarts,
                    short(c.container_id.as_deref().unwrap_or("-")),
                    c.version
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Inspect(i) => {
            let v = call(admin, &Request::Inspect { name: i.name })?;
            if i.json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status(s) => {
            let v = call(admin, &Request::Status)?;
            if s.json {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Start(c) => simple(admin, Request::Start { name: c.name }),
        Cmd::Stop(c) => simple(admin, Request::Stop { name: c.name }),
        Cmd::Restart(c) => simple(admin, Request::Restart { name: c.name }),
        Cmd::Remove(c) => simple(admin, Request::Remove { name: c.name }),
        Cmd::Logs(l) => {
            call(
                admin,
                &Request::Logs {
                    name: l.name,
                    follow: l.follow,
                    tail: l.tail,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Validate(v) => {
            let path = if v.path.is_dir() {
                v.path.join("chute.toml")
            } else {
                v.path.clone()
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let m = chutes::Manifest::from_toml_str(&text)
                .with_context(|| format!("{} is not a valid chute manifest", path.display()))?;
            println!(
                "{} {}: image {}, cpu {}, memory {}, pids {}, down {}, up {}, restart {}",
                m.name,
                m.version,
                m.image,
                chutes::format_cpu(u64::from(m.resources.cpu_millicores)),
                chutes::format_bytes(m.resources.memory_bytes),
                m.resources.pids,
                m.network
                    .bandwidth_down_bps
                    .map(chutes::format_rate)
                    .unwrap_or_else(|| "unshaped".into()),
                m.network
                    .bandwidth_up_bps
                    .map(chutes::format_rate)
                    .unwrap_or_else(|| "unshaped".into()),
                m.restart
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn simple(admin: &Path, req: Request) -> Result<ExitCode> {
    let v = call(admin, &req)?;
    println!(
        "{} {}",
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?")
    );
    Ok(ExitCode::SUCCESS)
}

/// Sends one request; prints progress to stderr and logs to stdout as they arrive.
fn call(admin: &Path, req: &Request) -> Result<serde_json::Value> {
    let mut stream = UnixStream::connect(admin).with_context(|| {
        format!(
            "cannot reach the agent at {} (is `chuted run` running? pass --admin-socket PATH)",
            admin.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let reader = BufReader::new(stream);
    let stdout = std::io::stdout();
    for line in reader.lines() {
        let line = line.context("reading the agent's reply")?;
        match serde_json::from_str::<Reply>(&line)
            .with_context(|| format!("unreadable reply from the agent: {line}"))?
        {
            Reply::Progress(p) => eprintln!("… {p}"),
            Reply::Log { line, .. } => {
                let mut out = stdout.lock();
                if writeln!(out, "{line}").is_err() {
                    return Ok(serde_json::Value::Null);
                }
            }
            Reply::Ok(v) => return Ok(v),
            Reply::Error(e) => bail!("{e}"),
        }
    }
    bail!("the agent closed the connection without answering")
}

fn run(r: RunCmd, admin: &Path) -> Result<ExitCode> {
    let level: tracing::Level = r.log_level.parse().map_err(|_| {
        anyhow::anyhow!(
            "--log-level {:?}: expected error, warn, info, debug or trace",
            r.log_level
        )
    })?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();

    let host = HostFacts::detect();
    let mut cfg = match &r.config {
        Some(p) => AgentConfig::load(p, host)?,
        None => AgentConfig::defaults(host),
    };
    // Set by the OpenWrt init, which made that cgroup beside the agent's own; it wins over
    // the file so a package's config cannot put chutes outside the subtree procd manages.
    if let Some(cg) = std::env::var_os("CHUTED_CGROUP_PARENT").filter(|v| !v.is_empty()) {
        let cg = cg.to_string_lossy().into_owned();
        if !chuted::config::check_cgroup_parent(&cg) {
            bail!(
                "CHUTED_CGROUP_PARENT={cg:?}: expected {}",
                chuted::config::CGROUP_PARENT_ALLOWED
            );
        }
        cfg.cgroup_parent = Some(cg);
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&r.state_dir)
            .with_context(|| format!("cannot create state dir {}", r.state_dir.display()))?;
    }
    let lock_path = r.state_dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another chuted is already running with state dir {}",
            r.state_dir.display()
        );
    }
    let device = chuted::identity::load_or_create_device_key(&r.state_dir)?;
    let owner = chuted::identity::owner_key(&r.state_dir, cfg.owner_key.as_deref())?;
    let link_cfg = match r.cloud.clone().or_else(|| cfg.cloud.clone()) {
        Some(url) => {
            let keepalive = std::time::Duration::from_secs(r.cloud_keepalive_secs.max(1));
            let mut lc = chuted::cloud::LinkConfig::new(url);
            lc.realm = r.cloud_realm.clone();
            lc.heartbeat = cfg.heartbeat;
            lc.keepalive = keepalive;
            lc.dead_after = keepalive.min(std::time::Duration::from_secs(30));
            lc.ca_file = r.cloud_ca.clone();
            lc.claim = r.claim.clone();
            // Refuse a bad URL or unreadable CA file now, not after reconciling.
            chuted::cloud::Endpoint::parse(&lc.url, lc.ca_file.as_deref())?;
            Some(lc)
        }
        None => None,
    };

    let podman_socket = r
        .podman_socket
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PODMAN_SOCKET));
    let podman = Podman::new(&podman_socket);
    let ex = Rc::new(smol::LocalExecutor::new());
    let ex2 = ex.clone();
    let admin = admin.to_owned();
    smol::block_on(ex.run(async move {
        let version = podman.version().await.with_context(|| {
            format!(
                "Podman API at {} (start it with `podman system service --time=0 unix://{}`)",
                podman_socket.display(),
                podman_socket.display()
            )
        })?;
        tracing::info!(podman = %version, state_dir = %r.state_dir.display(), "chuted {} starting", env!("CARGO_PKG_VERSION"));
        let agent = Agent::new(podman, cfg, r.state_dir.clone(), ex2);
        agent
            .reconcile()
            .await
            .map_err(|e| anyhow::anyhow!("reconciliation failed: {e}"))?;
        let listener = chuted::server::bind(&admin)?;
        tracing::info!(admin_socket = %admin.display(), chutes = agent.list().len(), "ready");
        agent.spawn(supervisor::route_events(agent.clone())).detach();
        agent.spawn(supervisor::sample_usage(agent.clone())).detach();
        tracing::info!(device = %device.device_id(), owner = ?owner.map(|o| o.to_hex()), "identity");
        if let Some(lc) = link_cfg {
            if owner.is_none() {
                tracing::warn!("no owner key trusted: every cloud command will be refused (run `chuted trust`)");
            }
            let cloud = chuted::cloud::Cloud::new(agent.clone(), device, owner, lc)?;
            agent.spawn(cloud.run()).detach();
        }
        chuted::server::serve(agent, listener).await;
        drop(lock);
        Ok(ExitCode::SUCCESS)
    }))
}

fn create_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create state dir {}", dir.display()))
}
