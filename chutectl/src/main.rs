//! chutectl: the developer's and owner's command line for chute-cloud.
//!
//! Keys stay on this machine: the owner key signs grants, the developer key signs every
//! command, and every result printed is verified against the device key (whose hash is
//! the device id you addressed), so the cloud in between can neither forge a command
//! nor a result. `--json` prints one JSON document per command on stdout; progress goes
//! to stderr.
//!
//! What it is not: a device-side tool (that is `chuted`), or a cache of fleet state
//! (everything is asked from the cloud each time).

mod client;
mod sign;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use argh::FromArgs;
use proto::{
    Args, ChuteArgs, ChuteName, DeviceId, Keypair, LogsArgs, SignedCommand, SignedGrant, StopArgs,
};
use serde_json::{json, Value};

use client::Client;

/// chutectl: push chutes to your routers through chute-cloud.
#[derive(FromArgs)]
struct Cli {
    /// cloud URL, e.g. http://127.0.0.1:8080 (or env CHUTECTL_CLOUD, or `chutectl login`)
    #[argh(option)]
    cloud: Option<String>,
    /// API token (or env CHUTECTL_TOKEN, or `chutectl login`)
    #[argh(option)]
    token: Option<String>,
    /// PEM CA certificate(s) to trust for an https cloud: a private CA or the cloud's
    /// self-signed certificate (or env CHUTECTL_CA, or `chutectl login`; default the
    /// system bundle /etc/ssl/certs/ca-certificates.crt)
    #[argh(option)]
    ca: Option<PathBuf>,
    /// key file (or env CHUTECTL_KEY; default ~/.config/chutectl/key)
    #[argh(option)]
    key: Option<PathBuf>,
    /// print JSON
    #[argh(switch)]
    json: bool,
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Keygen(Keygen),
    Pubkey(Pubkey),
    Login(Login),
    Owner(OwnerCmd),
    Device(DeviceCmd),
    Grant(GrantCmd),
    Push(Push),
    List(ListCmd),
    Start(StartCmd),
    Stop(StopCmd),
    Restart(RestartCmd),
    Remove(RemoveCmd),
    Logs(LogsCmd),
    Deployment(DeploymentCmd),
    Token(TokenCmd),
}

/// API tokens (admin only): give each developer their own.
#[derive(FromArgs)]
#[argh(subcommand, name = "token")]
struct TokenCmd {
    #[argh(subcommand)]
    sub: TokenSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum TokenSub {
    Create(TokenCreate),
    List(TokenList),
}

/// Create an API token (shown once).
#[derive(FromArgs)]
#[argh(subcommand, name = "create")]
struct TokenCreate {
    /// who it is for
    #[argh(positional)]
    name: String,
    /// admin or developer (default developer: read state, submit commands, blobs, deployments)
    #[argh(option, default = "String::from(\"developer\")")]
    role: String,
}

/// List API tokens (names and roles, never secrets).
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct TokenList {}

/// Create a key (0600) and print its public half.
#[derive(FromArgs)]
#[argh(subcommand, name = "keygen")]
struct Keygen {
    /// where to write it (default: --key or ~/.config/chutectl/key)
    #[argh(option)]
    out: Option<PathBuf>,
}

/// Print the public key of --key.
#[derive(FromArgs)]
#[argh(subcommand, name = "pubkey")]
struct Pubkey {}

/// Save the cloud URL and token for later commands.
#[derive(FromArgs)]
#[argh(subcommand, name = "login")]
struct Login {
    /// cloud URL
    #[argh(positional)]
    url: String,
    /// API token
    #[argh(option)]
    token: String,
    /// PEM CA certificate(s) to trust for an https URL (saved with the URL and token)
    #[argh(option)]
    ca: Option<PathBuf>,
}

/// The fleet owner key.
#[derive(FromArgs)]
#[argh(subcommand, name = "owner")]
struct OwnerCmd {
    #[argh(subcommand)]
    sub: OwnerSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum OwnerSub {
    Init(OwnerInit),
}

/// Register --key as the fleet's owner key; prints what devices must trust.
#[derive(FromArgs)]
#[argh(subcommand, name = "init")]
struct OwnerInit {}

/// Devices: list, show, admit, tag, claim tokens.
#[derive(FromArgs)]
#[argh(subcommand, name = "device")]
struct DeviceCmd {
    #[argh(subcommand)]
    sub: DeviceSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum DeviceSub {
    List(DevList),
    Show(DevShow),
    Accept(DevAccept),
    Reject(DevReject),
    Tag(DevTag),
    ClaimToken(DevClaim),
    Preauthorize(DevPreauth),
}

/// List devices with their admission and live status.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct DevList {
    /// only devices with this tag
    #[argh(option)]
    tag: Option<String>,
}

macro_rules! dev_id_cmd {
    ($ty:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(FromArgs)]
        #[argh(subcommand, name = $name)]
        struct $ty {
            /// device id
            #[argh(positional)]
            id: String,
        }
    };
}
dev_id_cmd!(DevShow, "show", "Show one device.");
dev_id_cmd!(DevAccept, "accept", "Accept a pending device.");
dev_id_cmd!(
    DevReject,
    "reject",
    "Reject a device: it gets no commands and its session is closed."
);

/// Set a device's tags (replacing them).
#[derive(FromArgs)]
#[argh(subcommand, name = "tag")]
struct DevTag {
    /// device id
    #[argh(positional)]
    id: String,
    /// tags
    #[argh(positional)]
    tags: Vec<String>,
}

/// Create a single-use claim token: `chuted run --cloud URL --claim TOKEN`.
#[derive(FromArgs)]
#[argh(subcommand, name = "claim-token")]
struct DevClaim {
    /// lifetime (default 1h)
    #[argh(option, default = "String::from(\"1h\")")]
    expires: String,
}

/// Pre-authorise a device key (64 hex, from `chuted id`).
#[derive(FromArgs)]
#[argh(subcommand, name = "preauthorize")]
struct DevPreauth {
    /// device public key
    #[argh(positional)]
    pubkey: String,
}

/// Grants: the owner authorises developer keys.
#[derive(FromArgs)]
#[argh(subcommand, name = "grant")]
struct GrantCmd {
    #[argh(subcommand)]
    sub: GrantSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum GrantSub {
    Issue(GrantIssue),
    List(GrantList),
    Revoke(GrantRevoke),
}

/// Sign a grant with the owner key (--key) and store it in the cloud.
#[derive(FromArgs)]
#[argh(subcommand, name = "issue")]
struct GrantIssue {
    /// developer public key (hex)
    #[argh(option)]
    to: String,
    /// comma-separated: deploy,start,stop,restart,remove,logs,status,...
    #[argh(option)]
    procedures: String,
    /// comma-separated chute patterns: `name` or `prefix-*`
    #[argh(option)]
    chutes: String,
    /// comma-separated device ids (default: every device of the fleet)
    #[argh(option)]
    devices: Option<String>,
    /// lifetime (default 30d)
    #[argh(option, default = "String::from(\"30d\")")]
    expires: String,
}

/// List grants.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct GrantList {}

/// Revoke a grant: the cloud refuses commands under it at once, and (with --key as the
/// owner key) every accepted device it covers is sent an owner-signed `update-grant`
/// that supersedes the developer's older grants on the device itself.
#[derive(FromArgs)]
#[argh(subcommand, name = "revoke")]
struct GrantRevoke {
    /// grant id
    #[argh(positional)]
    id: i64,
    /// only mark it revoked in the cloud; send nothing to devices
    #[argh(switch)]
    cloud_only: bool,
}

/// Validate a chute directory, upload its image, sign and deploy it, and wait for each
/// device's signed result.
#[derive(FromArgs)]
#[argh(subcommand, name = "push")]
struct Push {
    /// directory with chute.toml (and optionally image.tar)
    #[argh(positional)]
    dir: PathBuf,
    /// target device id (repeatable)
    #[argh(option)]
    device: Vec<String>,
    /// target every accepted device with this tag
    #[argh(option)]
    tag: Option<String>,
    /// seconds to wait for results (default 300)
    #[argh(option, default = "300")]
    wait: u64,
}

/// List chutes: the device's signed status with --device, else the last heartbeats.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// device id
    #[argh(option)]
    device: Option<String>,
}

macro_rules! chute_op {
    ($ty:ident, $name:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(FromArgs)]
        #[argh(subcommand, name = $name)]
        struct $ty {
            /// device id
            #[argh(option)]
            device: String,
            /// chute name
            #[argh(positional)]
            name: String,
        }
    };
}
chute_op!(StartCmd, "start", "Start a chute.");
chute_op!(StopCmd, "stop", "Stop a chute.");
chute_op!(RestartCmd, "restart", "Restart a chute.");
chute_op!(RemoveCmd, "remove", "Remove a chute.");

/// A chute's recent logs.
#[derive(FromArgs)]
#[argh(subcommand, name = "logs")]
struct LogsCmd {
    /// device id
    #[argh(option)]
    device: String,
    /// lines of history (default 100)
    #[argh(option, default = "100")]
    tail: u32,
    /// keep following: new lines are relayed live (unsigned) until interrupted
    #[argh(switch)]
    follow: bool,
    /// with --follow, stop after this many seconds (default: until interrupted)
    #[argh(option)]
    follow_secs: Option<u64>,
    /// chute name
    #[argh(positional)]
    name: String,
}

/// Deployments: a chute version to a set of devices.
#[derive(FromArgs)]
#[argh(subcommand, name = "deployment")]
struct DeploymentCmd {
    #[argh(subcommand)]
    sub: DeploymentSub,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum DeploymentSub {
    List(DepList),
    Show(DepShow),
}

/// List deployments.
#[derive(FromArgs)]
#[argh(subcommand, name = "list")]
struct DepList {}

/// One deployment with per-device outcomes.
#[derive(FromArgs)]
#[argh(subcommand, name = "show")]
struct DepShow {
    /// deployment id
    #[argh(positional)]
    id: i64,
}

fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("chutectl")
}

fn saved() -> Value {
    std::fs::read_to_string(config_dir().join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null)
}

struct Ctx {
    cli_cloud: Option<String>,
    cli_token: Option<String>,
    cli_ca: Option<PathBuf>,
    key_path: PathBuf,
    json: bool,
}

impl Ctx {
    fn client(&self) -> anyhow::Result<Client> {
        let s = saved();
        let cloud = self
            .cli_cloud
            .clone()
            .or_else(|| std::env::var("CHUTECTL_CLOUD").ok())
            .or_else(|| s["cloud"].as_str().map(str::to_owned))
            .context("no cloud: pass --cloud URL, set CHUTECTL_CLOUD or run `chutectl login URL --token T`")?;
        let token = self
            .cli_token
            .clone()
            .or_else(|| std::env::var("CHUTECTL_TOKEN").ok())
            .or_else(|| s["token"].as_str().map(str::to_owned))
            .context("no API token: pass --token, set CHUTECTL_TOKEN or run `chutectl login URL --token T`")?;
        let ca = self.ca().or_else(|| s["ca"].as_str().map(PathBuf::from));
        Client::new(&cloud, &token, ca.as_deref())
    }

    /// The CA file given on the command line or in the environment (not the saved one).
    fn ca(&self) -> Option<PathBuf> {
        self.cli_ca
            .clone()
            .or_else(|| std::env::var_os("CHUTECTL_CA").map(PathBuf::from))
    }

    fn key(&self) -> anyhow::Result<Keypair> {
        sign::load_key(&self.key_path)
    }

    /// Prints `v` as JSON, or `human` otherwise.
    fn out(&self, v: &Value, human: impl FnOnce() -> String) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            println!("{}", human());
        }
    }
}

fn device_arg(id: &str) -> anyhow::Result<DeviceId> {
    DeviceId::from_hex(id).map_err(|e| anyhow::anyhow!("device id {id:?}: {e}"))
}

fn chute_arg(name: &str) -> anyhow::Result<ChuteName> {
    ChuteName::new(name).map_err(|e| anyhow::anyhow!("chute name {name:?}: {e}"))
}

fn ago(t: Option<i64>) -> String {
    match t {
        Some(t) => format!("{}s ago", (sign::unix_now() as i64 - t).max(0)),
        None => "never".into(),
    }
}

fn device_line(d: &Value) -> String {
    let conn = if d["connected"].as_bool() == Some(true) {
        format!("online since {}", ago(d["connected_since"].as_i64()))
    } else {
        "offline".into()
    };
    // The device clock at its last heartbeat, and how far it is from the cloud's.
    let clock = match (
        d["clock"]["state"].as_str(),
        d["clock"]["skew_secs"].as_i64(),
    ) {
        (Some(state), Some(skew)) => format!("{state} ({skew:+}s)"),
        _ => "?".into(),
    };
    format!(
        "{}  {:<8}  {}  {}  heartbeat {}  clock {clock}  chutes {}/{}  agent {}  tags {}",
        d["id"].as_str().unwrap_or("?"),
        d["status"].as_str().unwrap_or("?"),
        d["fingerprint"].as_str().unwrap_or("?"),
        conn,
        ago(d["last_heartbeat"].as_i64()),
        d["chutes_running"]
            .as_i64()
            .map_or("?".into(), |n| n.to_string()),
        d["chutes_total"]
            .as_i64()
            .map_or("?".into(), |n| n.to_string()),
        d["agent_version"].as_str().unwrap_or("?"),
        d["tags"]
            .as_array()
            .map(|t| t
                .iter()
                .filter_map(|x| x.as_str())
                .collect::<Vec<_>>()
                .join(","))
            .unwrap_or_default(),
    )
}

/// The newest unrevoked, unexpired grant the cloud holds for this developer key.
fn my_grant(c: &Client, key: &Keypair) -> anyhow::Result<SignedGrant> {
    let grants = c.get(&format!("/api/v1/grants?developer={}", key.public_hex()))?;
    let now = sign::unix_now() as i64;
    let best = grants
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| g["revoked_at"].is_null() && g["expires_at"].as_i64().unwrap_or(0) > now)
        .max_by_key(|g| g["issued_at"].as_i64().unwrap_or(0))
        .with_context(|| format!("no valid grant for developer key {}: ask the owner for `chutectl grant issue --to {}`", key.public_hex(), key.public_hex()))?;
    sign::decode_grant(best["signed"].as_str().unwrap_or(""))
}

/// One command sent and its verified outcome.
struct Sent {
    device: String,
    command: SignedCommand,
    id: i64,
}

fn submit(
    c: &Client,
    device: &str,
    cmd: &SignedCommand,
    deployment: Option<i64>,
) -> anyhow::Result<(Sent, Value)> {
    let v = c.post(
        &format!("/api/v1/devices/{device}/commands"),
        &json!({ "command": sign::command_hex(cmd)?, "deployment": deployment }),
    )?;
    let id = v["id"]
        .as_i64()
        .context("the cloud returned no command id")?;
    Ok((
        Sent {
            device: device.to_owned(),
            command: cmd.clone(),
            id,
        },
        v,
    ))
}

const TERMINAL: &[&str] = &["succeeded", "failed", "refused", "expired"];

/// Waits for a command to end; returns the JSON report (with `verified`).
fn wait(c: &Client, s: &Sent, timeout: Duration, quiet: bool) -> anyhow::Result<Value> {
    let start = Instant::now();
    let mut last = String::new();
    if !quiet {
        if let Ok(dev) = c.get(&format!("/api/v1/devices/{}", s.device)) {
            if dev["connected"] != json!(true) {
                eprintln!(
                    "  device {} is offline (last heartbeat {}): the command waits in the cloud until the device returns or the command expires",
                    s.device,
                    ago(dev["last_heartbeat"].as_i64())
                );
            }
        }
    }
    let v = loop {
        let v = c.get(&format!("/api/v1/commands/{}", s.id))?;
        let status = v["status"].as_str().unwrap_or("?").to_owned();
        if status != last && !quiet {
            eprintln!(
                "  [{:>5.1}s] {} {}: {}",
                start.elapsed().as_secs_f64(),
                s.device,
                v["procedure"].as_str().unwrap_or(""),
                status
            );
            last = status.clone();
        }
        if TERMINAL.contains(&status.as_str()) {
            break v;
        }
        if start.elapsed() > timeout {
            let dev = c
                .get(&format!("/api/v1/devices/{}", s.device))
                .unwrap_or(Value::Null);
            let why = if dev["connected"] == json!(true) {
                "the device is online but has not answered".to_owned()
            } else {
                format!(
                    "device offline (last heartbeat {}); it stays queued until it expires",
                    ago(dev["last_heartbeat"].as_i64())
                )
            };
            bail!(
                "command {} on device {} is still {status} after {}s: {why}",
                s.id,
                s.device,
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(150));
    };
    let status = v["status"].as_str().unwrap_or("?").to_owned();
    let mut report = json!({
        "device": s.device,
        "command": s.id,
        "status": status,
        "reason": v["reason"],
        "timeline": v["timeline"],
        "seconds": start.elapsed().as_secs_f64(),
    });
    if let Some(result) = v["result"].as_str() {
        let dev = c.get(&format!("/api/v1/devices/{}", s.device))?;
        let verified =
            sign::verify_result(result, dev["pubkey"].as_str().unwrap_or(""), &s.command)?;
        report["verified"] = json!(true);
        report["device_key"] = dev["pubkey"].clone();
        report["ok"] = json!(verified.ok);
        report["result"] = verified.value;
    } else {
        report["verified"] = json!(false);
        report["ok"] = json!(false);
    }
    Ok(report)
}

fn human_report(r: &Value) -> String {
    let verified = if r["verified"] == json!(true) {
        format!(
            "verified: signed by device {} (key {}…)",
            r["device"].as_str().unwrap_or("?"),
            &r["device_key"].as_str().unwrap_or("")
                [..16.min(r["device_key"].as_str().unwrap_or("").len())]
        )
    } else {
        "no device-signed result".into()
    };
    let detail = match r["status"].as_str() {
        Some("succeeded") => String::new(),
        Some("failed") => format!(
            ": {}",
            r["result"]["message"]
                .as_str()
                .or(r["reason"].as_str())
                .unwrap_or("")
        ),
        _ => format!(": {}", r["reason"].as_str().unwrap_or("")),
    };
    format!(
        "{} {}{}  [{}]",
        r["device"].as_str().unwrap_or("?"),
        r["status"].as_str().unwrap_or("?"),
        detail,
        verified
    )
}

/// Signs `args` for one device, sends it and waits for the verified result.
fn run_one(ctx: &Ctx, device: &str, args: Args) -> anyhow::Result<Value> {
    let c = ctx.client()?;
    let did = device_arg(device)?;
    let key = ctx.key()?;
    let grant = my_grant(&c, &key)?;
    let cmd = sign::sign_command(&key, &grant, did, args, 300);
    let (sent, _) = submit(&c, device, &cmd, None)?;
    wait(&c, &sent, Duration::from_secs(300), ctx.json)
}

fn finish(ctx: &Ctx, r: &Value, human: impl FnOnce() -> String) -> anyhow::Result<()> {
    ctx.out(r, human);
    if r["status"] != json!("succeeded") {
        std::process::exit(1);
    }
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<([u8; 32], u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().into(), n))
}

fn push(ctx: &Ctx, p: &Push) -> anyhow::Result<()> {
    let manifest_path = p.dir.join("chute.toml");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("cannot read {}", manifest_path.display()))?;
    let manifest = chutes::Manifest::from_toml_str(&text)
        .with_context(|| format!("{} is not a valid chute manifest", manifest_path.display()))?;
    let name = chute_arg(manifest.name.as_str())?;
    let c = ctx.client()?;
    let key = ctx.key()?;
    let grant = my_grant(&c, &key)?;
    let mut devices: Vec<String> = p.device.clone();
    if let Some(tag) = &p.tag {
        let list = c.get(&format!("/api/v1/devices?tag={tag}&status=accepted"))?;
        devices.extend(
            list.as_array()
                .into_iter()
                .flatten()
                .filter_map(|d| d["id"].as_str().map(str::to_owned)),
        );
    }
    devices.sort();
    devices.dedup();
    if devices.is_empty() {
        bail!(
            "no target devices: pass --device ID (repeatable) or --tag TAG (with accepted devices)"
        );
    }
    for d in &devices {
        device_arg(d)?;
    }
    let started = Instant::now();
    // The image, if the directory carries one: uploaded once, resumably.
    let archive = p.dir.join("image.tar");
    let image = if archive.exists() {
        let (sha, size) = sha256_file(&archive)?;
        client::upload_blob(&c, &archive, &proto::hex_encode(&sha), size, ctx.json)?;
        Some((sha, size))
    } else {
        None
    };
    let dep = c.post(
        "/api/v1/deployments",
        &json!({
            "chute": name.as_str(),
            "version": manifest.version,
            "image_sha256": image.map(|i| proto::hex_encode(&i.0)),
            "devices": devices,
        }),
    )?;
    let dep_id = dep["id"].as_i64().context("no deployment id")?;
    if !ctx.json {
        eprintln!(
            "deployment {dep_id}: {} {} to {} device(s)",
            name.as_str(),
            manifest.version,
            devices.len()
        );
    }
    let mut sent = Vec::new();
    for d in &devices {
        let args = Args::Deploy(proto::DeployArgs {
            chute: name.clone(),
            manifest_toml: proto::BoundedString::new(text.clone())
                .map_err(|e| anyhow::anyhow!("manifest: {e}"))?,
            image_sha256: image.map(|i| i.0),
            image_size: image.map_or(0, |i| i.1),
        });
        let cmd = sign::sign_command(&key, &grant, device_arg(d)?, args, 300);
        sent.push(submit(&c, d, &cmd, Some(dep_id))?.0);
    }
    let mut reports = Vec::new();
    for s in &sent {
        reports.push(wait(&c, s, Duration::from_secs(p.wait), ctx.json)?);
    }
    let ok = reports.iter().all(|r| r["status"] == json!("succeeded"));
    let out = json!({
        "deployment": dep_id,
        "chute": name.as_str(),
        "version": manifest.version,
        "image_sha256": image.map(|i| proto::hex_encode(&i.0)),
        "seconds": started.elapsed().as_secs_f64(),
        "results": reports,
    });
    ctx.out(&out, || {
        let mut s = format!(
            "deployment {dep_id} ({:.1}s):",
            started.elapsed().as_secs_f64()
        );
        for r in &reports {
            s.push_str("\n  ");
            s.push_str(&human_report(r));
        }
        s
    });
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

/// Sends every accepted device the grant covers an `update-grant`, signed by the owner
/// key under a grant the owner gives itself, installing an empty grant for the
/// developer issued now: the device then refuses the developer's older grants.
fn revoke_on_devices(ctx: &Ctx, c: &Client, grant: &Value) -> anyhow::Result<Vec<Value>> {
    let owner = ctx.key()?;
    let developer = proto::PublicKey::from_hex(grant["developer"].as_str().unwrap_or(""))
        .context("grant developer key")?;
    let covered: Vec<String> = grant["summary"]["devices"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d.as_str().map(str::to_owned))
        .collect();
    let devices: Vec<String> = c
        .get("/api/v1/devices?status=accepted")?
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str().map(str::to_owned))
        .filter(|d| covered.is_empty() || covered.contains(d))
        .collect();
    // Devices accept commands living at most their `command_lifetime_secs` (default 300 s,
    // at most 3600): the revocation is queued for offline devices that long; one offline
    // longer needs the command again or `chuted revoke` on the device.
    const LIFETIME: u64 = proto::DEFAULT_COMMAND_LIFETIME;
    // update-grant names no chute, so the owner's own grant for it needs no pattern.
    let admin = sign::make_grant(
        &owner,
        owner.public(),
        proto::Rights::of(&[proto::Procedure::UpdateGrant]),
        &[],
        &[],
        3600,
    )?;
    let empty = sign::make_grant(&owner, developer, proto::Rights::NONE, &[], &[], LIFETIME)?;
    let mut sent = Vec::new();
    for d in &devices {
        let args = Args::UpdateGrant(proto::UpdateGrantArgs {
            grant: empty.clone(),
        });
        let cmd = sign::sign_command(&owner, &admin, device_arg(d)?, args, LIFETIME);
        sent.push(submit(c, d, &cmd, None)?.0);
    }
    let mut reports = Vec::new();
    for s in &sent {
        reports.push(wait(c, s, Duration::from_secs(30), ctx.json).or_else(|e| -> anyhow::Result<Value> {
            Ok(json!({ "device": s.device, "command": s.id, "status": "queued", "reason": format!("{e:#}; it stays queued for the device"), "verified": false }))
        })?);
    }
    Ok(reports)
}

/// A device's log line: `line` (chute_api::LogLine), `text` from agents before it.
fn log_text(x: &Value) -> &str {
    x["line"]
        .as_str()
        .or_else(|| x["text"].as_str())
        .unwrap_or("")
}

/// Prints the verified tail, then the lines the device publishes while we watch (one
/// JSON object per line with `--json`). Polling keeps the follow alive in the cloud;
/// when it stops, the cloud unsubscribes and the device stops sending.
fn follow_logs(ctx: &Ctx, l: &LogsCmd, r: &Value) -> anyhow::Result<()> {
    let c = ctx.client()?;
    for x in r["result"]["lines"].as_array().into_iter().flatten() {
        if ctx.json {
            println!(
                "{}",
                json!({ "text": log_text(x), "stream": x["stream"], "verified": true })
            );
        } else {
            println!("{}", log_text(x));
        }
    }
    if !ctx.json {
        eprintln!(
            "[history above verified: signed by device {}; following live (relayed, unsigned)…]",
            l.device
        );
    }
    let start = Instant::now();
    let mut after = 0u64;
    let mut dropped = 0u64;
    loop {
        if l.follow_secs
            .is_some_and(|s| start.elapsed() >= Duration::from_secs(s))
        {
            return Ok(());
        }
        let v = c.get(&format!(
            "/api/v1/devices/{}/logs/{}?after={after}",
            l.device, l.name
        ))?;
        for x in v["lines"].as_array().into_iter().flatten() {
            after = after.max(x["seq"].as_u64().unwrap_or(after));
            if ctx.json {
                println!(
                    "{}",
                    json!({ "text": x["text"], "stream": x["stream"], "ts_ms": x["ts_ms"], "verified": false })
                );
            } else {
                println!("{}", x["text"].as_str().unwrap_or(""));
            }
        }
        let d = v["dropped"].as_u64().unwrap_or(0);
        if d > dropped && !ctx.json {
            eprintln!("[{} lines dropped by bounded buffers]", d - dropped);
        }
        dropped = d;
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("chutectl: {e:#}");
        if std::env::args().any(|a| a == "--json") {
            println!("{}", json!({ "error": format!("{e:#}") }));
        }
        std::process::exit(2);
    }
}

fn run() -> anyhow::Result<()> {
    // `--json` is accepted anywhere on the line (`chutectl device list --json`), not
    // only before the command as argh would require.
    let argv: Vec<String> = std::env::args().collect();
    let json_anywhere = argv.iter().skip(1).any(|a| a == "--json");
    let rest: Vec<&str> = argv
        .iter()
        .skip(1)
        .map(String::as_str)
        .filter(|a| *a != "--json")
        .collect();
    let cmd_name = argv.first().map(String::as_str).unwrap_or("chutectl");
    let mut cli = match Cli::from_args(&[cmd_name], &rest) {
        Ok(c) => c,
        Err(early) => match early.status {
            Ok(()) => {
                println!("{}", early.output);
                std::process::exit(0);
            }
            Err(()) => {
                eprintln!(
                    "{}\nRun chutectl --help for more information.",
                    early.output
                );
                std::process::exit(2);
            }
        },
    };
    cli.json |= json_anywhere;
    let key_path = cli
        .key
        .clone()
        .or_else(|| std::env::var_os("CHUTECTL_KEY").map(PathBuf::from))
        .unwrap_or_else(|| config_dir().join("key"));
    let ctx = Ctx {
        cli_cloud: cli.cloud.clone(),
        cli_token: cli.token.clone(),
        cli_ca: cli.ca.clone(),
        key_path,
        json: cli.json,
    };
    match cli.cmd {
        Cmd::Keygen(k) => {
            let path = k.out.unwrap_or_else(|| ctx.key_path.clone());
            let key = sign::write_new_key(&path)?;
            ctx.out(&json!({ "pubkey": key.public_hex(), "path": path }), || {
                format!(
                    "{}\n(secret key written to {}, mode 0600)",
                    key.public_hex(),
                    path.display()
                )
            });
        }
        Cmd::Pubkey(_) => {
            let key = ctx.key()?;
            ctx.out(&json!({ "pubkey": key.public_hex() }), || key.public_hex());
        }
        Cmd::Login(l) => {
            // Saved as an absolute path: later commands run from anywhere.
            let ca = match l.ca.clone().or_else(|| ctx.ca()) {
                Some(p) => Some(
                    std::fs::canonicalize(&p)
                        .with_context(|| format!("CA file {}", p.display()))?,
                ),
                None => None,
            };
            let c = Client::new(&l.url, &l.token, ca.as_deref())?;
            c.get("/api/v1/owner")
                .context("the cloud refused this URL/token")?;
            let dir = config_dir();
            std::fs::create_dir_all(&dir)?;
            let path = dir.join("config.json");
            let mut saved = json!({ "cloud": l.url, "token": l.token });
            if let Some(ca) = &ca {
                saved["ca"] = json!(ca);
            }
            let body = serde_json::to_string_pretty(&saved)?;
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)?;
                f.write_all(body.as_bytes())?;
            }
            ctx.out(
                &json!({ "cloud": l.url, "ca": ca, "saved_to": path }),
                || format!("logged in to {}; saved to {}", l.url, path.display()),
            );
        }
        Cmd::Owner(OwnerCmd {
            sub: OwnerSub::Init(_),
        }) => {
            let key = ctx.key()?;
            let c = ctx.client()?;
            c.put("/api/v1/owner", &json!({ "pubkey": key.public_hex() }))?;
            let trust = format!("chuted trust --owner-key {}", key.public_hex());
            ctx.out(
                &json!({ "owner_key": key.public_hex(), "trust_command": trust }),
                || {
                    format!(
                        "fleet owner key registered: {}\nevery device must trust it:\n  {trust}",
                        key.public_hex()
                    )
                },
            );
        }
        Cmd::Device(DeviceCmd { sub }) => {
            let c = ctx.client()?;
            match sub {
                DeviceSub::List(l) => {
                    let path = match &l.tag {
                        Some(t) => format!("/api/v1/devices?tag={t}"),
                        None => "/api/v1/devices".into(),
                    };
                    let v = c.get(&path)?;
                    ctx.out(&v, || {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(device_line)
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                DeviceSub::Show(d) => {
                    device_arg(&d.id)?;
                    let v = c.get(&format!("/api/v1/devices/{}", d.id))?;
                    ctx.out(&v, || {
                        format!(
                            "{}\n{}",
                            device_line(&v),
                            serde_json::to_string_pretty(&v).unwrap_or_default()
                        )
                    });
                }
                DeviceSub::Accept(d) => {
                    device_arg(&d.id)?;
                    let v = c.post(&format!("/api/v1/devices/{}/accept", d.id), &json!({}))?;
                    ctx.out(&v, || format!("accepted {}", device_line(&v)));
                }
                DeviceSub::Reject(d) => {
                    device_arg(&d.id)?;
                    let v = c.post(&format!("/api/v1/devices/{}/reject", d.id), &json!({}))?;
                    ctx.out(&v, || format!("rejected {}", device_line(&v)));
                }
                DeviceSub::Tag(t) => {
                    device_arg(&t.id)?;
                    let v = c.put(
                        &format!("/api/v1/devices/{}/tags", t.id),
                        &json!({ "tags": t.tags }),
                    )?;
                    ctx.out(&v, || device_line(&v));
                }
                DeviceSub::ClaimToken(t) => {
                    let secs = sign::parse_duration(&t.expires)?;
                    let v = c.post("/api/v1/claim-tokens", &json!({ "expires_secs": secs }))?;
                    ctx.out(&v, || format!("{}\n(single use; expires at {}; on the device: chuted run --cloud ws://HOST:PORT/agent --claim TOKEN)", v["token"].as_str().unwrap_or(""), v["expires_at"]));
                }
                DeviceSub::Preauthorize(p) => {
                    let v = c.post("/api/v1/devices", &json!({ "pubkey": p.pubkey }))?;
                    ctx.out(&v, || format!("pre-authorised {}", device_line(&v)));
                }
            }
        }
        Cmd::Grant(GrantCmd { sub }) => {
            let c = ctx.client()?;
            match sub {
                GrantSub::Issue(g) => {
                    let owner = ctx.key()?;
                    let developer = proto::PublicKey::from_hex(&g.to)
                        .map_err(|e| anyhow::anyhow!("--to: {e}"))?;
                    let rights = sign::procedures(&g.procedures)?;
                    let patterns: Vec<String> = g
                        .chutes
                        .split(',')
                        .map(|s| s.trim().to_owned())
                        .filter(|s| !s.is_empty())
                        .collect();
                    if patterns.is_empty() {
                        bail!("--chutes is empty: give `name` or `prefix-*` patterns");
                    }
                    let devices = g
                        .devices
                        .as_deref()
                        .unwrap_or("")
                        .split(',')
                        .filter(|s| !s.trim().is_empty())
                        .map(|s| device_arg(s.trim()))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let lifetime = sign::parse_duration(&g.expires)?;
                    let signed =
                        sign::make_grant(&owner, developer, rights, &patterns, &devices, lifetime)?;
                    let v = c.post(
                        "/api/v1/grants",
                        &json!({ "signed": sign::grant_hex(&signed) }),
                    )?;
                    ctx.out(&v, || {
                        format!(
                            "grant {} for {}: {} on {} (devices: {})",
                            v["id"],
                            g.to,
                            rights,
                            patterns.join(","),
                            if devices.is_empty() {
                                "all".into()
                            } else {
                                devices
                                    .iter()
                                    .map(|d| d.to_hex())
                                    .collect::<Vec<_>>()
                                    .join(",")
                            }
                        )
                    });
                }
                GrantSub::List(_) => {
                    let v = c.get("/api/v1/grants")?;
                    ctx.out(&v, || {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(|g| {
                                format!(
                                    "{}  {}  {}  {}  expires {}{}",
                                    g["id"],
                                    g["developer"].as_str().unwrap_or(""),
                                    g["summary"]["procedures"],
                                    g["summary"]["chutes"],
                                    g["expires_at"],
                                    if g["revoked_at"].is_null() {
                                        ""
                                    } else {
                                        "  REVOKED"
                                    }
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                GrantSub::Revoke(r) => {
                    let v = c.post(&format!("/api/v1/grants/{}/revoke", r.id), &json!({}))?;
                    if r.cloud_only {
                        ctx.out(&v, || format!("grant {} revoked in the cloud only (devices honour it until it expires)", r.id));
                        return Ok(());
                    }
                    let reports = revoke_on_devices(&ctx, &c, &v)?;
                    let ok = reports.iter().all(|r| r["status"] == json!("succeeded"));
                    let out = json!({ "grant": v, "devices": reports });
                    ctx.out(&out, || {
                        let mut s = format!("grant {} revoked in the cloud; on devices (older grants of {} superseded):", r.id, v["developer"].as_str().unwrap_or("?"));
                        for d in &reports {
                            s.push_str("\n  ");
                            s.push_str(&human_report(d));
                        }
                        s
                    });
                    if !ok {
                        std::process::exit(1);
                    }
                }
            }
        }
        Cmd::Push(p) => push(&ctx, &p)?,
        Cmd::List(l) => match &l.device {
            Some(d) => {
                let r = run_one(&ctx, d, Args::Status)?;
                let chutes = r["result"]["chute_list"].clone();
                let out = json!({ "device": d, "verified": r["verified"], "status": r["status"], "chutes": chutes, "reason": r["reason"] });
                let human = || {
                    let mut s = format!(
                        "device {d} ({}):",
                        if r["verified"] == json!(true) {
                            "verified: signed by the device"
                        } else {
                            "unverified"
                        }
                    );
                    for c in chutes.as_array().into_iter().flatten() {
                        s.push_str(&format!(
                            "\n  {:<24} {:<8} restarts {}",
                            c["name"].as_str().unwrap_or("?"),
                            c["state"].as_str().unwrap_or("?"),
                            c["restarts"]
                        ));
                    }
                    if r["status"] != json!("succeeded") {
                        s.push_str(&format!("\n  {}", human_report(&r)));
                    }
                    s
                };
                ctx.out(&out, human);
                if r["status"] != json!("succeeded") {
                    std::process::exit(1);
                }
            }
            None => {
                let c = ctx.client()?;
                let v = c.get("/api/v1/devices?status=accepted")?;
                let out: Vec<Value> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| json!({ "device": d["id"], "connected": d["connected"], "last_heartbeat": d["last_heartbeat"], "chutes": d["heartbeat"]["chutes"] }))
                    .collect();
                ctx.out(&json!(out), || {
                    let mut s = String::from("(from the last heartbeats, as relayed by the cloud; use --device ID for a signed answer)");
                    for d in &out {
                        for c in d["chutes"].as_array().into_iter().flatten() {
                            s.push_str(&format!("\n{}  {:<24} {:<8} restarts {}", d["device"].as_str().unwrap_or("?"), c["name"].as_str().unwrap_or("?"), c["state"].as_str().unwrap_or("?"), c["restarts"]));
                        }
                    }
                    s
                });
            }
        },
        Cmd::Start(o) => {
            let r = run_one(
                &ctx,
                &o.device,
                Args::Start(ChuteArgs {
                    chute: chute_arg(&o.name)?,
                }),
            )?;
            finish(&ctx, &r, || human_report(&r))?;
        }
        Cmd::Stop(o) => {
            let r = run_one(
                &ctx,
                &o.device,
                Args::Stop(StopArgs {
                    chute: chute_arg(&o.name)?,
                    timeout_secs: 10,
                }),
            )?;
            finish(&ctx, &r, || human_report(&r))?;
        }
        Cmd::Restart(o) => {
            let r = run_one(
                &ctx,
                &o.device,
                Args::Restart(ChuteArgs {
                    chute: chute_arg(&o.name)?,
                }),
            )?;
            finish(&ctx, &r, || human_report(&r))?;
        }
        Cmd::Remove(o) => {
            let r = run_one(
                &ctx,
                &o.device,
                Args::Remove(ChuteArgs {
                    chute: chute_arg(&o.name)?,
                }),
            )?;
            finish(&ctx, &r, || human_report(&r))?;
        }
        Cmd::Logs(l) => {
            let r = run_one(
                &ctx,
                &l.device,
                Args::Logs(LogsArgs {
                    chute: chute_arg(&l.name)?,
                    tail: l.tail,
                    follow: l.follow,
                }),
            )?;
            if !l.follow || r["status"] != json!("succeeded") {
                finish(&ctx, &r, || {
                    if r["status"] != json!("succeeded") {
                        return human_report(&r);
                    }
                    let mut s: Vec<String> = r["result"]["lines"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|x| log_text(x).to_owned())
                        .collect();
                    s.push(format!("[verified: signed by device {}]", l.device));
                    s.join("\n")
                })?;
                return Ok(());
            }
            follow_logs(&ctx, &l, &r)?;
        }
        Cmd::Token(TokenCmd { sub }) => {
            let c = ctx.client()?;
            match sub {
                TokenSub::Create(t) => {
                    let v = c.post("/api/v1/tokens", &json!({ "name": t.name, "role": t.role }))?;
                    ctx.out(&v, || {
                        format!(
                            "{}\n({} token {:?}; shown once: `chutectl login URL --token TOKEN`)",
                            v["token"].as_str().unwrap_or(""),
                            t.role,
                            t.name
                        )
                    });
                }
                TokenSub::List(_) => {
                    let v = c.get("/api/v1/tokens")?;
                    ctx.out(&v, || {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(|t| {
                                format!(
                                    "{}  {}  {}",
                                    t["id"],
                                    t["role"].as_str().unwrap_or(""),
                                    t["name"].as_str().unwrap_or("")
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
            }
        }
        Cmd::Deployment(DeploymentCmd { sub }) => {
            let c = ctx.client()?;
            let line = |d: &Value| {
                format!(
                    "{}  {} {}  targeted {} succeeded {} failed {} pending {}",
                    d["id"],
                    d["chute"].as_str().unwrap_or(""),
                    d["version"].as_str().unwrap_or(""),
                    d["targeted"],
                    d["succeeded"],
                    d["failed"],
                    d["pending"]
                )
            };
            match sub {
                DeploymentSub::List(_) => {
                    let v = c.get("/api/v1/deployments")?;
                    ctx.out(&v, || {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .map(line)
                            .collect::<Vec<_>>()
                            .join("\n")
                    });
                }
                DeploymentSub::Show(s) => {
                    let v = c.get(&format!("/api/v1/deployments/{}", s.id))?;
                    ctx.out(&v, || {
                        let mut out = line(&v);
                        for d in v["devices"].as_array().into_iter().flatten() {
                            out.push_str(&format!(
                                "\n  {}  {}{}",
                                d["device_id"].as_str().unwrap_or(""),
                                d["status"].as_str().unwrap_or(""),
                                d["reason"]
                                    .as_str()
                                    .map(|r| format!(": {r}"))
                                    .unwrap_or_default()
                            ));
                        }
                        out
                    });
                }
            }
        }
    }
    Ok(())
}
