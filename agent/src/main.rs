//! `chuted`: the agent daemon (`chuted run`) and its local admin CLI. Flag definitions
//! and wiring only: the daemon starts in `chuted::daemon`, requests and answers are
//! `chute_api` types, and the human output is `chute_api::render`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use argh::FromArgs;
use chute_api::admin::Reply;
use chute_api::{render, ApiError, ErrorClass, LogLine, Request};
use chuted::daemon::{self, DEFAULT_ADMIN_SOCKET};
use serde::de::DeserializeOwned;

/// chuted runs third-party containers ("chutes") under Podman with enforced CPU, memory,
/// pids and bandwidth caps. `chuted run` is the agent; the other commands talk to a running
/// agent over its admin socket (root only), print for people, and print JSON with --json.
/// Exit status: 0 done, 1 internal error, 2 bad input, 3 agent unreachable, 4 refused by
/// the agent (no room, wrong state, busy, not allowed).
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
    Revoke(RevokeCmd),
    Selftest(SelftestCmd),
}

/// Run the agent: reconcile with Podman, then serve the admin socket.
#[derive(FromArgs)]
#[argh(subcommand, name = "run")]
struct RunCmd {
    /// directory for the snapshot and keys (created 0700)
    #[argh(option)]
    state_dir: PathBuf,
    /// admin socket to serve (default /run/chuted/admin.sock; also accepted before
    /// `run`, this one wins)
    #[argh(option)]
    admin_socket: Option<PathBuf>,
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
    /// print each line as JSON: {"stream": "stdout"|"stderr", "line": ...}
    #[argh(switch)]
    json: bool,
}

/// Check a chute directory's manifest without an agent, and print what it asks for.
#[derive(FromArgs)]
#[argh(subcommand, name = "validate")]
struct ValidateCmd {
    /// directory holding chute.toml (or the file itself)
    #[argh(positional)]
    path: PathBuf,
    /// print the validated manifest as JSON
    #[argh(switch)]
    json: bool,
}

/// Start a stopped chute (re-admits its reservation if it was freed).
#[derive(FromArgs)]
#[argh(subcommand, name = "start")]
struct StartTag {
    /// chute name
    #[argh(positional)]
    name: String,
    /// print the result as JSON
    #[argh(switch)]
    json: bool,
}

/// Stop a chute; it is not restarted until you start it.
#[derive(FromArgs)]
#[argh(subcommand, name = "stop")]
struct StopTag {
    /// chute name
    #[argh(positional)]
    name: String,
    /// seconds between SIGTERM and SIGKILL (default and maximum: the agent's
    /// stop_timeout_secs)
    #[argh(option)]
    timeout: Option<u32>,
    /// print the result as JSON
    #[argh(switch)]
    json: bool,
}

/// Restart a chute, keeping its reservation throughout.
#[derive(FromArgs)]
#[argh(subcommand, name = "restart")]
struct RestartTag {
    /// chute name
    #[argh(positional)]
    name: String,
    /// print the result as JSON
    #[argh(switch)]
    json: bool,
}

/// Remove a chute: its container, reservation and record.
#[derive(FromArgs)]
#[argh(subcommand, name = "remove")]
struct RemoveTag {
    /// chute name
    #[argh(positional)]
    name: String,
    /// print the result as JSON
    #[argh(switch)]
    json: bool,
}

/// Print this device's id and public key (creating the device key if absent).
#[derive(FromArgs)]
#[argh(subcommand, name = "id")]
struct IdCmd {
    /// the agent's state directory
    #[argh(option)]
    state_dir: PathBuf,
    /// print JSON: {"device_id", "public_key"}
    #[argh(switch)]
    json: bool,
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

/// Revoke developer grants on this device: every grant for the key issued until now
/// stops working at the agent's next command (a newer grant from the owner works).
#[derive(FromArgs)]
#[argh(subcommand, name = "revoke")]
struct RevokeCmd {
    /// the agent's state directory
    #[argh(option)]
    state_dir: PathBuf,
    /// the developer's Ed25519 public key (64 hex characters)
    #[argh(option)]
    developer: Option<String>,
    /// revoke every developer's grants (also resets an unreadable grant store)
    #[argh(switch)]
    all: bool,
}

/// Check that signing and verification work on this machine (keys, a signed command
/// through the codec, forged and replayed copies refused).
#[derive(FromArgs)]
#[argh(subcommand, name = "selftest")]
struct SelftestCmd {}

/// Exit status of a client command (documented in `chuted --help`).
mod exit {
    /// Something failed inside the agent or this machine.
    pub const INTERNAL: u8 = 1;
    /// The command line, a manifest or a name is invalid.
    pub const BAD_INPUT: u8 = 2;
    /// No agent answers at the admin socket.
    pub const UNREACHABLE: u8 = 3;
    /// The agent refused: no room in the pools, wrong state, busy, not allowed.
    pub const REFUSED: u8 = 4;
}

/// Why a command failed, and so how `chuted` exits.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("cannot reach the agent at {path} (is `chuted run` running? pass --admin-socket PATH): {source}")]
    Unreachable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Agent(ApiError),
    #[error("{0:#}")]
    BadInput(anyhow::Error),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::Agent(e) => match e.code.class() {
                ErrorClass::BadInput => exit::BAD_INPUT,
                ErrorClass::Refused => exit::REFUSED,
                ErrorClass::Internal => exit::INTERNAL,
            },
            CliError::BadInput(_) => exit::BAD_INPUT,
            CliError::Internal(_) => exit::INTERNAL,
        }
    }
}

fn bad_input(e: impl Into<anyhow::Error>) -> CliError {
    CliError::BadInput(e.into())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let strs: Vec<&str> = args.iter().map(String::as_str).collect();
    let (bin, rest) = strs.split_first().unwrap_or((&"chuted", &[]));
    let cli = match Cli::from_args(&[bin], rest) {
        Ok(cli) => cli,
        Err(early) => {
            // --help prints and succeeds; a bad command line is bad input (argh's own
            // exit would be 1, which here means an internal error).
            return match early.status {
                Ok(()) => {
                    println!("{}", early.output);
                    ExitCode::SUCCESS
                }
                Err(()) => {
                    eprintln!("{}", early.output.trim_end());
                    ExitCode::from(exit::BAD_INPUT)
                }
            };
        }
    };
    if cli.version {
        println!("chuted {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let Some(cmd) = cli.cmd else {
        eprintln!("chuted: no command given; run `chuted --help` for the list");
        return ExitCode::from(exit::BAD_INPUT);
    };
    let admin = match admin_socket(cli.admin_socket, &cmd) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("chuted: {e}");
            return ExitCode::from(exit::BAD_INPUT);
        }
    };
    match dispatch(cmd, &admin) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chuted: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `--admin-socket` may be given before the subcommand (every command) or after `run`
/// (where a service file naturally writes it); two different paths are refused.
fn admin_socket(global: Option<PathBuf>, cmd: &Cmd) -> anyhow::Result<PathBuf> {
    let local = match cmd {
        Cmd::Run(r) => r.admin_socket.clone(),
        _ => None,
    };
    match (global, local) {
        (Some(g), Some(l)) if g != l => anyhow::bail!(
            "--admin-socket given twice with different paths ({} before `run`, {} after it); give it once",
            g.display(),
            l.display()
        ),
        (Some(p), _) | (None, Some(p)) => Ok(p),
        (None, None) => Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET)),
    }
}

/// Asks and prints the answer: the agent's JSON as sent with `--json`, else the
/// renderer's text of the answer decoded as `T`.
fn show<T: DeserializeOwned>(
    admin: &Path,
    req: &Request,
    json: bool,
    human: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    if json {
        let v: Option<serde_json::Value> = call(admin, req, |_| true)?;
        println!("{}", v.unwrap_or_default());
    } else if let Some(answer) = call::<T>(admin, req, |_| true)? {
        print!("{}", human(&answer));
    }
    Ok(())
}

fn dispatch(cmd: Cmd, admin: &Path) -> Result<(), CliError> {
    match cmd {
        Cmd::Run(r) => {
            run(r, admin)?;
        }
        Cmd::Id(c) => {
            create_state_dir(&c.state_dir)?;
            let key = chuted::identity::load_or_create_device_key(&c.state_dir)
                .map_err(anyhow::Error::from)?;
            if c.json {
                println!(
                    "{}",
                    serde_json::json!({"device_id": key.device_id().to_string(), "public_key": key.public_hex()})
                );
            } else {
                println!("device_id {}", key.device_id());
                println!("public_key {}", key.public_hex());
            }
        }
        Cmd::Trust(t) => {
            let owner = chuted::identity::parse_owner_key(&t.owner_key).map_err(bad_input)?;
            create_state_dir(&t.state_dir)?;
            let path =
                chuted::identity::trust_owner(&t.state_dir, &owner).map_err(anyhow::Error::from)?;
            println!("trusting owner {owner} ({})", path.display());
        }
        Cmd::Revoke(c) => {
            let now = chuted::cloud::unix_now();
            let msg =
                chuted::cloud::grants::revoke_cli(&c.state_dir, c.developer.as_deref(), c.all, now)
                    .map_err(bad_input)?;
            println!("{msg}");
        }
        Cmd::Selftest(_) => {
            println!("{}", proto::selftest().map_err(anyhow::Error::from)?);
        }
        Cmd::Deploy(d) => {
            let dir = std::fs::canonicalize(&d.dir)
                .with_context(|| format!("chute directory {}", d.dir.display()))
                .map_err(bad_input)?;
            let path = dir.join("chute.toml");
            let manifest_toml = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(bad_input)?;
            // Checked here too, so a refusal names the file as `validate` does; the agent
            // still validates everything it is sent.
            chutes::Manifest::from_toml_str(&manifest_toml)
                .with_context(|| format!("{} is not a valid chute manifest", path.display()))
                .map_err(bad_input)?;
            let req = Request::Deploy {
                manifest_toml,
                dir: Some(dir.to_string_lossy().into_owned()),
            };
            show(admin, &req, d.json, render::deploy)?
        }
        Cmd::List(l) => show(admin, &Request::List, l.json, |v: &Vec<_>| render::list(v))?,
        Cmd::Inspect(i) => show(
            admin,
            &Request::Inspect { name: i.name },
            i.json,
            render::inspect,
        )?,
        Cmd::Status(s) => show(admin, &Request::Status, s.json, render::status)?,
        Cmd::Start(c) => lifecycle(admin, Request::Start { name: c.name }, c.json)?,
        Cmd::Stop(c) => {
            let req = Request::Stop {
                name: c.name,
                timeout_secs: c.timeout,
            };
            lifecycle(admin, req, c.json)?
        }
        Cmd::Restart(c) => lifecycle(admin, Request::Restart { name: c.name }, c.json)?,
        Cmd::Remove(c) => lifecycle(admin, Request::Remove { name: c.name }, c.json)?,
        Cmd::Logs(l) => {
            let req = Request::Logs {
                name: l.name,
                follow: l.follow,
                tail: l.tail,
            };
            let stdout = std::io::stdout();
            let json = l.json;
            call::<serde_json::Value>(admin, &req, |line| {
                let mut out = stdout.lock();
                let written = if json {
                    serde_json::to_string(&line)
                        .map_err(std::io::Error::other)
                        .and_then(|j| writeln!(out, "{j}"))
                } else {
                    writeln!(out, "{}", line.line)
                };
                // A closed pipe (`| head`) ends the stream quietly.
                written.is_ok()
            })?;
        }
        Cmd::Validate(v) => {
            let path = if v.path.is_dir() {
                v.path.join("chute.toml")
            } else {
                v.path.clone()
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(bad_input)?;
            let m = chutes::Manifest::from_toml_str(&text)
                .with_context(|| format!("{} is not a valid chute manifest", path.display()))
                .map_err(bad_input)?;
            if v.json {
                println!(
                    "{}",
                    serde_json::to_string(&m).map_err(anyhow::Error::from)?
                );
            } else {
                print!("{}", render::validate(&m));
            }
        }
    }
    Ok(())
}

fn lifecycle(admin: &Path, req: Request, json: bool) -> Result<(), CliError> {
    show(admin, &req, json, render::ack)
}

/// Sends one request and decodes its answer as `T` (the type the request's kind names, or
/// `serde_json::Value`); progress goes to stderr as it arrives, log lines to `on_log`
/// (which returns false to stop reading: the answer is then `None`).
fn call<T: DeserializeOwned>(
    admin: &Path,
    req: &Request,
    mut on_log: impl FnMut(LogLine) -> bool,
) -> Result<Option<T>, CliError> {
    let mut stream = UnixStream::connect(admin).map_err(|source| CliError::Unreachable {
        path: admin.to_owned(),
        source,
    })?;
    let mut line = serde_json::to_vec(req).map_err(anyhow::Error::from)?;
    line.push(b'\n');
    stream.write_all(&line).context("sending the request")?;
    let reader = BufReader::new(stream);
    for line in reader.lines() {
        let line = line.context("reading the agent's reply")?;
        let reply: Reply<T> = serde_json::from_str(&line)
            .with_context(|| format!("unreadable reply from the agent: {line}"))?;
        match reply {
            Reply::Progress(p) => eprintln!("… {p}"),
            Reply::Log(l) => {
                if !on_log(l) {
                    return Ok(None);
                }
            }
            Reply::Ok(answer) => return Ok(Some(answer)),
            Reply::Error(e) => return Err(CliError::Agent(e)),
        }
    }
    Err(anyhow::anyhow!("the agent closed the connection without answering").into())
}

/// `chuted run`: the daemon, configured from the flags.
fn run(r: RunCmd, admin: &Path) -> Result<(), CliError> {
    let level: tracing::Level = r.log_level.parse().map_err(|_| {
        bad_input(anyhow::anyhow!(
            "--log-level {:?}: expected error, warn, info, debug or trace",
            r.log_level
        ))
    })?;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let opts = daemon::Options {
        state_dir: r.state_dir,
        admin_socket: admin.to_owned(),
        podman_socket: r
            .podman_socket
            .unwrap_or_else(|| PathBuf::from(daemon::DEFAULT_PODMAN_SOCKET)),
        config: r.config,
        cloud: r.cloud,
        cloud_ca: r.cloud_ca,
        cloud_realm: r.cloud_realm,
        cloud_keepalive: std::time::Duration::from_secs(r.cloud_keepalive_secs),
    };
    daemon::run(opts).map_err(|e| {
        if e.is_bad_input() {
            bad_input(e)
        } else {
            CliError::Internal(e.into())
        }
    })
}

fn create_state_dir(dir: &Path) -> Result<(), CliError> {
    daemon::create_state_dir(dir).map_err(|e| CliError::Internal(e.into()))
}
