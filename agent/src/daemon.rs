//! Owns the daemon's start-up (`chuted run`): config, state dir and its lock, identity,
//! the Podman check, reconciliation, the admin socket, the background tasks and the cloud
//! link, in that order. The binary only parses flags and calls [`run`].

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use crate::cloud::{Cloud, Endpoint, LinkConfig, LinkError};
use crate::config::{AgentConfig, ConfigError, HostFacts};
use crate::identity::IdentityError;
use crate::podman::{Podman, PodmanError};
use crate::server::AdminSocketError;
use crate::supervisor::{self, Agent, ReconcileError};

pub const DEFAULT_ADMIN_SOCKET: &str = "/run/chuted/admin.sock";
pub const DEFAULT_PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// What `chuted run` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    pub state_dir: PathBuf,
    pub admin_socket: PathBuf,
    pub podman_socket: PathBuf,
    pub config: Option<PathBuf>,
    /// Overrides the config's `cloud`.
    pub cloud: Option<String>,
    pub cloud_ca: Option<PathBuf>,
    pub cloud_realm: String,
    pub cloud_keepalive: Duration,
}

/// Why the daemon did not start. `BadInput` variants are the caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "CHUTED_CGROUP_PARENT={value:?}: expected {}",
        crate::config::CGROUP_PARENT_ALLOWED
    )]
    CgroupParent { value: String },
    #[error("cannot create state dir {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another chuted is already running with state dir {}", path.display())]
    Locked { path: PathBuf },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("Podman API at {} (start it with `podman system service --time=0 unix://{}`): {source}", socket.display(), socket.display())]
    Podman {
        socket: PathBuf,
        source: PodmanError,
    },
    #[error("reconciliation failed: {0}")]
    Reconcile(#[from] ReconcileError),
    #[error(transparent)]
    AdminSocket(#[from] AdminSocketError),
}

impl StartError {
    /// The operator gave something invalid (config, flags, environment), as opposed to
    /// the machine failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            StartError::Config(_)
                | StartError::CgroupParent { .. }
                | StartError::Link(LinkError::BadUrl { .. })
        )
    }
}

/// Creates the state dir (0700) if it is missing.
pub fn create_state_dir(dir: &Path) -> Result<(), StartError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StartError::StateDir {
            path: dir.to_owned(),
            source,
        })
}

/// Runs the agent until the process is killed.
pub fn run(opts: Options) -> Result<(), StartError> {
    match crate::limits::raise_nofile() {
        Ok(l) => tracing::info!(
            nofile = l.soft,
            before = l.soft_before,
            chutes_carried = crate::limits::chutes_carried(l.soft),
            "open-files limit"
        ),
        Err(e) => tracing::warn!(error = %e, "keeping the open-files limit"),
    }
    let host = HostFacts::detect();
    let mut cfg = match &opts.config {
        Some(p) => AgentConfig::load(p, host)?,
        None => AgentConfig::defaults(host),
    };
    // Set by the OpenWrt init, which made that cgroup beside the agent's own; it wins over
    // the file so a package's config cannot put chutes outside the subtree procd manages.
    if let Some(cg) = std::env::var_os("CHUTED_CGROUP_PARENT").filter(|v| !v.is_empty()) {
        let cg = cg.to_string_lossy().into_owned();
        if !crate::config::check_cgroup_parent(&cg) {
            return Err(StartError::CgroupParent { value: cg });
        }
        cfg.cgroup_parent = Some(cg);
    }
    // Podman drops a cap whose controller is missing; say so at start (deploys are refused).
    for m in crate::controllers::check(cfg.cgroup_parent.as_deref()) {
        tracing::error!(controller = m.controller, reason = %m.reason, "chutes cannot be capped: deploys are refused until this is fixed");
    }
    create_state_dir(&opts.state_dir)?;
    let lock_path = opts.state_dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| StartError::StateDir {
            path: lock_path.clone(),
            source,
        })?;
    // flock(2) through rustix (already in the tree via async-io) rather than
    // File::try_lock, which needs Rust 1.89; the OpenWrt 23.05 feed builds with 1.85.
    if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        return Err(StartError::Locked {
            path: opts.state_dir.clone(),
        });
    }
    let device = crate::identity::load_or_create_device_key(&opts.state_dir)?;
    let owner = crate::identity::owner_key(&opts.state_dir, cfg.owner_key.as_deref())?;
    let link_cfg = match opts.cloud.clone().or_else(|| cfg.cloud.clone()) {
        Some(url) => {
            let keepalive = opts.cloud_keepalive.max(Duration::from_secs(1));
            let mut lc = LinkConfig::new(url);
            lc.realm = opts.cloud_realm.clone();
            lc.heartbeat = cfg.heartbeat;
            lc.keepalive = keepalive;
            lc.dead_after = keepalive.min(Duration::from_secs(30));
            lc.ca_file = opts.cloud_ca.clone();
            lc.command_lifetime_secs = cfg.command_lifetime_secs;
            lc.image_limits.partial_max_age = cfg.partial_image_max_age;
            // Refuse a bad URL or unreadable CA file now, not after reconciling.
            Endpoint::parse(&lc.url, lc.ca_file.as_deref())?;
            Some(lc)
        }
        None => None,
    };

    let podman =
        Podman::new(&opts.podman_socket).with_timeouts(cfg.podman_timeout, cfg.image_timeout);
    // A Podman just started (socket activation at boot) can take longer than one call's
    // deadline to answer its first request.
    let first_call = podman.clone().with_timeouts(
        cfg.podman_timeout.max(Duration::from_secs(30)),
        cfg.image_timeout,
    );
    let ex = Rc::new(smol::LocalExecutor::new());
    let ex2 = ex.clone();
    smol::block_on(ex.run(async move {
        let version = first_call
            .version()
            .await
            .map_err(|source| StartError::Podman {
                socket: opts.podman_socket.clone(),
                source,
            })?;
        tracing::info!(podman = %version, state_dir = %opts.state_dir.display(), "chuted {} starting", env!("CARGO_PKG_VERSION"));
        let agent = Agent::new(podman, cfg, opts.state_dir.clone(), ex2);
        agent.reconcile().await?;
        let listener = crate::server::bind(&opts.admin_socket)?;
        tracing::info!(admin_socket = %opts.admin_socket.display(), chutes = agent.list().len(), "ready");
        agent.spawn(supervisor::route_events(agent.clone())).detach();
        agent.spawn(supervisor::sample_usage(agent.clone())).detach();
        tracing::info!(device = %device.device_id(), owner = ?owner.map(|o| o.to_hex()), "identity");
        if let Some(lc) = link_cfg {
            if owner.is_none() {
                tracing::warn!("no owner key trusted: every cloud command will be refused (run `chuted trust`)");
            }
            let cloud = Cloud::new(agent.clone(), device, owner, lc)?;
            agent.spawn(cloud.run()).detach();
        }
        crate::server::serve(agent, listener).await;
        drop(lock);
        Ok(())
    }))
}
