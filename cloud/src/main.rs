//! chute-cloud: the fleet manager chuted devices connect to and developers push chutes
//! through with `chutectl`.
//!
//! It is an untrusted relay and store: it checks signatures and grants early (to refuse
//! fast and say why), keeps commands with their timeline and the device-signed results,
//! stores image blobs and shows honest device status. It can never forge a command
//! (that needs a developer key with an owner-signed grant) or a result (that needs the
//! device key); `chutectl` verifies every result itself.
//!
//! TLS: with `--tls-cert F --tls-key F` it serves https and wss on its one listener
//! (rustls on *ring*, see `tls`); without, plain http and ws (for a loopback test or
//! behind a TLS-terminating proxy).
//!
//! Replicas: several `serve` processes on one PostgreSQL database (`--database
//! postgres://…`) behave as one manager; they share nothing but the database
//! (see `bus`). With SQLite it is one process.
//!
//! What it deliberately is not (yet): multi-tenant.

mod agent;
mod api;
mod blobs;
mod bus;
mod conns;
mod console;
mod store;
mod swarm;
mod tls;
mod wire;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use argh::FromArgs;

use crate::store::{Backend, SqlStore, Store};

/// chute-cloud: fleet manager for chuted devices.
#[derive(FromArgs)]
struct Cli {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs)]
#[argh(subcommand)]
enum Cmd {
    Serve(Serve),
    Openapi(OpenapiCmd),
    Swarm(SwarmCmd),
}

/// Benchmark a running cloud with simulated agents (real handshakes, heartbeats and
/// signed commands and results); prints one summary table.
#[derive(FromArgs)]
#[argh(subcommand, name = "swarm")]
struct SwarmCmd {
    /// agent websocket URL, ws://HOST:PORT/agent (repeat for replicas: agents are
    /// spread over them, commands go through another one)
    #[argh(option)]
    cloud: Vec<String>,
    /// REST API token (admin) used to register the swarm's owner key, pre-authorise its
    /// agents and submit commands
    #[argh(option)]
    token: String,
    /// number of simulated agents
    #[argh(option)]
    agents: usize,
    /// heartbeat period of each agent in seconds (default 30)
    #[argh(option, default = "30")]
    heartbeat_secs: u64,
    /// how long to run with all agents connected, in seconds (default 30)
    #[argh(option, default = "30")]
    duration_secs: u64,
    /// process id of a server (repeat for replicas): its RSS and CPU are reported
    #[argh(option)]
    server_pid: Vec<u32>,
    /// signed commands per second sent to random agents (default 20; 0: none, heartbeats only)
    #[argh(option, default = "20.0")]
    commands_per_sec: f64,
    /// at the end, drop every session at once and time how long until all are back
    #[argh(switch)]
    reconnect_storm: bool,
}

/// Serve the REST API and the agent websocket.
#[derive(FromArgs)]
#[argh(subcommand, name = "serve")]
struct Serve {
    /// directory for the database, blobs and the admin token
    #[argh(option)]
    data_dir: PathBuf,
    /// address to listen on (default 127.0.0.1:8080)
    #[argh(option, default = "String::from(\"127.0.0.1:8080\")")]
    listen: String,
    /// database URL: sqlite://PATH (default sqlite://DATA_DIR/cloud.db) or
    /// postgres://USER[:PASSWORD]@HOST[:PORT]/DB (replicas share one)
    #[argh(option)]
    database: Option<String>,
    /// PEM certificate chain: serve https and wss instead of http and ws (needs --tls-key)
    #[argh(option)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1)
    #[argh(option)]
    tls_key: Option<PathBuf>,
    /// log level: error, warn, info, debug (default info)
    #[argh(option, default = "String::from(\"info\")")]
    log_level: String,
    /// open connections one IP address may hold (default 1024; devices behind one NAT
    /// share an address: raise it for fleets behind carrier-grade NAT)
    #[argh(option, default = "1024")]
    max_connections_per_ip: usize,
    /// open connections in all (default 16384; also bounded by the open-files limit,
    /// which the server raises to its hard limit at start)
    #[argh(option, default = "16384")]
    max_connections: usize,
}

/// Print the OpenAPI document and exit.
#[derive(FromArgs)]
#[argh(subcommand, name = "openapi")]
struct OpenapiCmd {}

/// Shared state of the server.
pub struct App {
    pub store: Arc<dyn Store>,
    pub hub: agent::Hub,
    pub blobs: blobs::Blobs,
    /// Agent handshakes in progress; beyond this many, upgrades are refused with 429
    /// (a flood of half-open sessions cannot exhaust memory or the store).
    pub handshakes: Arc<tokio::sync::Semaphore>,
    /// Web console sessions and heartbeat history.
    pub console: console::Console,
    /// Open connections by address (the limits `serve` enforces; shown in /metrics).
    pub conns: conns::Limiter,
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A replica's id for this run (unique among the processes sharing a database).
fn replica_id() -> u64 {
    let b = proto::random_bytes::<8>().unwrap_or_else(|_| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (t ^ (u64::from(std::process::id()) << 40)).to_le_bytes()
    });
    u64::from_le_bytes(b)
}

/// File holding the admin API token, written 0600 on first start.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

async fn ensure_admin_token(store: &dyn Store, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if store.token_count().await? > 0 {
        tracing::info!(path = %path.display(), "admin API token already issued");
        return Ok(());
    }
    let token = api::new_token("cc-").map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let tmp = data_dir.join(format!(".{ADMIN_TOKEN_FILE}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        writeln!(f, "{token}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    store
        .token_insert("admin", &api::token_hash(&token), "admin", now())
        .await?;
    println!("admin API token written to {} (mode 0600); use it with `chutectl login URL --token $(cat {})`", path.display(), path.display());
    Ok(())
}

async fn serve(s: Serve) -> anyhow::Result<()> {
    // Checked before anything is created: a typo in a path must not leave a data dir.
    if s.max_connections_per_ip == 0 || s.max_connections == 0 {
        anyhow::bail!("--max-connections-per-ip and --max-connections must be at least 1");
    }
    let tls = match (&s.tls_cert, &s.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        (None, None) => None,
        (Some(_), None) => {
            anyhow::bail!("--tls-cert needs --tls-key (the certificate's private key)")
        }
        (None, Some(_)) => {
            anyhow::bail!("--tls-key needs --tls-cert (the certificate chain it belongs to)")
        }
    };
    // The database holds token hashes and the audit log: a data dir we create is
    // owner-only (an existing one is left as its owner set it; the files are 0600).
    if !s.data_dir.exists() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&s.data_dir)
            .with_context(|| format!("cannot create {}", s.data_dir.display()))?;
    }
    let url = s
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", s.data_dir.join("cloud.db").display()));
    let store: Arc<dyn Store> = Arc::new(SqlStore::open(&url).await?);
    if s.database.is_none() {
        use std::os::unix::fs::PermissionsExt;
        for f in ["cloud.db", "cloud.db-wal", "cloud.db-shm"] {
            let p = s.data_dir.join(f);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("cannot restrict {}", p.display()))?;
            }
        }
    }
    ensure_admin_token(store.as_ref(), &s.data_dir).await?;
    let app = Arc::new(App {
        store,
        hub: agent::Hub::default(),
        blobs: blobs::Blobs::new(&s.data_dir).context("blob directory")?,
        handshakes: Arc::new(tokio::sync::Semaphore::new(agent::MAX_HANDSHAKES)),
        // Session cookies are `Secure` when this process serves TLS itself.
        console: console::Console::new(s.tls_cert.is_some()),
        conns: conns::Limiter::new(conns::Limits {
            per_ip: s.max_connections_per_ip,
            total: s.max_connections,
            first_byte: conns::FIRST_BYTE_DEADLINE,
        }),
    });
    app.hub.start_heartbeat_writer(app.store.clone());
    if Backend::of_url(&url)? == Backend::Postgres {
        // Other replicas may share this database: join them through it.
        let replica = replica_id();
        let to = app.clone();
        let sender = bus::start(&url, replica, move |r, e| to.hub.deliver(r, e)).await?;
        app.hub.attach_bus(sender);
        tracing::info!(replica = format!("{replica:016x}"), "replica joined");
    }
    let listener = tokio::net::TcpListener::bind(&s.listen)
        .await
        .with_context(|| format!("cannot listen on {}", s.listen))?;
    let addr = listener.local_addr()?;
    let nofile = raise_nofile();
    // Each connection is a descriptor; the database, blobs and logs need some too.
    if (s.max_connections as u64).saturating_add(256) > nofile {
        tracing::warn!(nofile, max_connections = s.max_connections,
            "the open-files limit is below --max-connections: accepts will fail before the cap holds");
    }
    let listener = conns::LimitedListener::new(listener, app.conns.clone());
    let router = api::router(app);
    match tls {
        Some(cfg) => {
            println!("chute-cloud listening on https://{addr} (agents: wss://{addr}/agent)");
            tracing::info!(%addr, tls = true, "listening");
            let listener = tls::TlsListener::new(listener, cfg)?;
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown())
                .await?;
        }
        None => {
            println!("chute-cloud listening on http://{addr} (agents: ws://{addr}/agent)");
            tracing::info!(%addr, tls = false, "listening");
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown())
                .await?;
        }
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard one (every agent session is a descriptor)
/// and returns the limit in force.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let cur = getrlimit(Resource::Nofile);
    let soft = cur.current.unwrap_or(u64::MAX);
    match cur.maximum {
        Some(hard) if soft < hard => {
            let mut raised = cur;
            raised.current = Some(hard);
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => hard,
                Err(e) => {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the open-files limit");
                    soft
                }
            }
        }
        _ => soft,
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

fn main() -> anyhow::Result<()> {
    let cli: Cli = argh::from_env();
    match cli.cmd {
        Cmd::Openapi(_) => {
            use utoipa::OpenApi;
            println!("{}", api::ApiDoc::openapi().to_pretty_json()?);
            Ok(())
        }
        Cmd::Swarm(s) => run_logged(
            tracing::Level::WARN,
            swarm::run(swarm::Opts {
                clouds: s.cloud,
                token: s.token,
                agents: s.agents,
                heartbeat_secs: s.heartbeat_secs,
                duration_secs: s.duration_secs,
                server_pids: s.server_pid,
                commands_per_sec: s.commands_per_sec,
                reconnect_storm: s.reconnect_storm,
            }),
        ),
        Cmd::Serve(s) => {
            let level = match s.log_level.as_str() {
                "error" => tracing::Level::ERROR,
                "warn" => tracing::Level::WARN,
                "info" => tracing::Level::INFO,
                "debug" => tracing::Level::DEBUG,
                other => anyhow::bail!("--log-level {other:?}: use error, warn, info or debug"),
            };
            run_logged(level, serve(s))
        }
    }
}

/// Logs to stderr at `level` and runs `job` on the two-worker runtime both `serve` and
/// `swarm` use (this machine class has two cores).
fn run_logged(
    level: tracing::Level,
    job: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(job)
}
