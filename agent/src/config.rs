//! The agent's configuration file (`--config FILE`, TOML) and the defaults derived from the
//! host when a key is absent.
//!
//! Every key is optional. Unknown keys are refused so a typo never silently falls back to a
//! default (a mistyped `memroy` pool would otherwise hand chutes the whole machine).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chutes::{BackoffConfig, LifecycleConfig, Pools};
use serde::Deserialize;

/// Capabilities a chute keeps after `cap_drop = ALL`: enough for an ordinary daemon to bind
/// low ports and drop privileges, nothing that reaches the host (no NET_ADMIN, SYS_ADMIN,
/// NET_RAW, MKNOD, SYS_CHROOT, AUDIT_WRITE).
pub const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "NET_BIND_SERVICE",
    "SETGID",
    "SETUID",
];

/// Capabilities `cap_add` may grant: ordinary in-container privileges. Anything else is
/// refused at start; [`refused_cap_reason`] says why for the well-known dangerous ones.
pub const ALLOWED_CAPS: &[&str] = &[
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
];

/// Why a capability outside [`ALLOWED_CAPS`] is refused.
pub fn refused_cap_reason(cap: &str) -> &'static str {
    match cap {
        "ALL" => "grants every capability, host root in all but name",
        "SYS_ADMIN" => "mounts, namespaces and most of the kernel's admin interface",
        "NET_ADMIN" => {
            "reconfigures interfaces, routes, firewall and the shaping that caps bandwidth"
        }
        "NET_RAW" => "raw sockets: spoofed packets and sniffing on the chute's network",
        "SYS_TIME" => "sets the host clock, which command expiry is judged by",
        "SYS_MODULE" => "loads kernel modules",
        "BPF" | "PERFMON" => "loads BPF programs / reads kernel performance data",
        "SYS_PTRACE" => "traces and injects into other processes",
        "SYS_RAWIO" => "raw I/O ports and device memory",
        "DAC_READ_SEARCH" => "bypasses file read permissions (open_by_handle_at escapes)",
        "SYS_BOOT" => "reboots the host",
        "SYS_RESOURCE" => "overrides resource limits",
        "SYS_NICE" => "raises priorities above other chutes and the agent",
        "MAC_ADMIN" | "MAC_OVERRIDE" => "changes or bypasses mandatory access control",
        "LINUX_IMMUTABLE" => "alters immutable and append-only files",
        "SYSLOG" => "reads and clears the kernel log",
        "AUDIT_CONTROL" | "AUDIT_READ" => "controls or reads the kernel audit log",
        "CHECKPOINT_RESTORE" => "checkpoint/restore of other processes",
        "IPC_LOCK" | "IPC_OWNER" => "locks memory / bypasses IPC permissions",
        "WAKE_ALARM" | "BLOCK_SUSPEND" => "keeps the host awake or wakes it",
        _ => "not on the list of capabilities a chute may be given",
    }
}

/// Default host-port range chutes may publish on (unprivileged ports).
pub const DEFAULT_HOST_PORTS: (u16, u16) = (1024, 65535);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("config file {path}: invalid `{key}` = {value}: {allowed}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        value: String,
        allowed: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    pools: Option<RawPools>,
    allow_host_network: Option<bool>,
    oci_runtime: Option<String>,
    heartbeat_secs: Option<u64>,
    sample_secs: Option<u64>,
    owner_key: Option<String>,
    cloud: Option<String>,
    zombie_timeout_secs: Option<u64>,
    stop_timeout_secs: Option<u32>,
    backoff_initial_ms: Option<u64>,
    backoff_max_ms: Option<u64>,
    backoff_reset_secs: Option<u64>,
    ulimit_nofile: Option<u64>,
    ulimit_nproc: Option<u64>,
    cap_add: Option<Vec<String>>,
    instance: Option<String>,
    cgroup_parent: Option<String>,
    podman_timeout_secs: Option<u64>,
    image_timeout_secs: Option<u64>,
    command_lifetime_secs: Option<u64>,
    allow_unpinned_images: Option<bool>,
    host_ports: Option<String>,
    host_bind: Option<String>,
    partial_image_max_age_secs: Option<u64>,
    userns_base: Option<u32>,
    image_dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPools {
    cpu: Option<f64>,
    memory: Option<String>,
    pids: Option<u64>,
    bandwidth_down: Option<String>,
    bandwidth_up: Option<String>,
}

/// Validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Capacity the ledger admits chutes against.
    pub pools: Pools,
    pub allow_host_network: bool,
    /// OCI runtime passed to Podman per container (`runc` on cgroup-v1 hybrid hosts where
    /// crun refuses to run); `None` uses Podman's default.
    pub oci_runtime: Option<String>,
    pub heartbeat: Duration,
    pub sample_interval: Duration,
    pub owner_key: Option<String>,
    pub cloud: Option<String>,
    pub lifecycle: LifecycleConfig,
    pub ulimit_nofile: u64,
    pub ulimit_nproc: u64,
    pub cap_add: Vec<String>,
    /// Which agent on this host owns a container (label `chuted.instance`). One agent per
    /// host is the norm; distinct instances let several (tests, staging) share a Podman.
    pub instance: String,
    /// Where chutes' cgroups go (libpod `cgroup_parent`): a path under the cgroup root for
    /// Podman's cgroupfs manager, a `.slice` for systemd's. `None`: Podman's default.
    /// The OpenWrt init sets it (`CHUTED_CGROUP_PARENT`) so chutes sit beside the agent.
    pub cgroup_parent: Option<String>,
    /// Deadline of each libpod call (stop and restart add the stop timeout); a hung
    /// Podman makes the operation fail with a timeout instead of hanging the agent.
    pub podman_timeout: Duration,
    /// Deadline of an image load or pull.
    pub image_timeout: Duration,
    /// Longest lifetime of a signed command (default 300 s, at most 3600).
    pub command_lifetime_secs: u64,
    /// Local `chuted deploy` may name an image by a mutable tag (no archive, no
    /// `@sha256:`). Off by default; cloud deploys are always pinned.
    pub allow_unpinned_images: bool,
    /// Host ports a manifest may publish on, inclusive (default 1024-65535).
    pub host_ports: (u16, u16),
    /// Address published ports bind to (`None`: every interface). The OpenWrt init
    /// passes the LAN address from UCI.
    pub host_bind: Option<std::net::IpAddr>,
    /// A partial image transfer not resumed for this long is removed (default 24 h).
    pub partial_image_max_age: Duration,
    /// First host id of per-chute user namespaces (65536 ids each); `None`: off.
    pub userns_base: Option<u32>,
    /// Where image archives received from the cloud are kept (up to 1 GiB each): beside
    /// Podman's storage, not in the state dir, which on OpenWrt is on `/etc` flash and
    /// kept across sysupgrade. `None`: `<state_dir>/images`.
    pub image_dir: Option<PathBuf>,
}

/// A manifest port outside the owner's allow-list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "chute `{chute}` publishes host port {port}, outside this device's allowed host ports \
     {low}-{high} (config `host_ports`)"
)]
pub struct HostPortRefused {
    pub chute: String,
    pub port: u16,
    pub low: u16,
    pub high: u16,
}

impl AgentConfig {
    /// Refuses a manifest that publishes a host port outside `host_ports`, naming it.
    pub fn check_host_ports(&self, m: &chutes::Manifest) -> Result<(), HostPortRefused> {
        let (low, high) = self.host_ports;
        match m
            .network
            .ports
            .iter()
            .find(|p| p.host < low || p.host > high)
        {
            Some(p) => Err(HostPortRefused {
                chute: m.name.to_string(),
                port: p.host,
                low,
                high,
            }),
            None => Ok(()),
        }
    }
}

/// What [`check_cgroup_parent`] accepts, for error messages.
pub const CGROUP_PARENT_ALLOWED: &str = "an absolute cgroup path such as \"/chuted/chutes\" \
    (letters, digits, '.', '_', '-'; no \"..\") or a systemd slice such as \"chuted.slice\"";

/// Checks a `cgroup_parent` before it reaches Podman, which would otherwise fail every
/// container create with a less helpful message (or, for `..`, escape the subtree).
pub fn check_cgroup_parent(value: &str) -> bool {
    let name_ok = |s: &str| {
        !s.is_empty()
            && s != "."
            && s != ".."
            && s.len() <= 255
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    };
    match value.strip_prefix('/') {
        Some(path) => path.split('/').all(name_ok),
        None => value.len() > ".slice".len() && value.ends_with(".slice") && name_ok(value),
    }
}

/// Facts about the host used to derive default pools.
#[derive(Debug, Clone, Copy)]
pub struct HostFacts {
    pub cpus: u64,
    pub memory_bytes: u64,
}

impl HostFacts {
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u64)
            .unwrap_or(1);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| parse_memtotal(&s))
            .unwrap_or(256 * 1024 * 1024);
        HostFacts { cpus, memory_bytes }
    }
}

fn parse_memtotal(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Default pools: all cores, three quarters of RAM (the rest is for the OS, Podman and
/// conmon), 4096 pids and a 1 gbit link each way.
pub fn default_pools(host: HostFacts) -> Pools {
    Pools {
        cpu_millicores: host.cpus * 1000,
        memory_bytes: host.memory_bytes / 4 * 3,
        pids: 4096,
        bandwidth_down_bps: 1_000_000_000,
        bandwidth_up_bps: 1_000_000_000,
    }
}

impl AgentConfig {
    /// Defaults for this host, no file.
    pub fn defaults(host: HostFacts) -> Self {
        let lifecycle = LifecycleConfig {
            backoff: BackoffConfig::default(),
            ..LifecycleConfig::default()
        };
        AgentConfig {
            pools: default_pools(host),
            allow_host_network: false,
            oci_runtime: None,
            heartbeat: Duration::from_secs(30),
            sample_interval: Duration::from_secs(1),
            owner_key: None,
            cloud: None,
            lifecycle,
            ulimit_nofile: 1024,
            ulimit_nproc: 1024,
            cap_add: DEFAULT_CAPS.iter().map(|s| s.to_string()).collect(),
            instance: "default".to_owned(),
            cgroup_parent: None,
            podman_timeout: crate::podman::DEFAULT_CALL_TIMEOUT,
            image_timeout: crate::podman::DEFAULT_IMAGE_TIMEOUT,
            command_lifetime_secs: proto::DEFAULT_COMMAND_LIFETIME,
            allow_unpinned_images: false,
            host_ports: DEFAULT_HOST_PORTS,
            host_bind: None,
            partial_image_max_age: Duration::from_secs(24 * 3600),
            userns_base: None,
            image_dir: None,
        }
    }

    /// The directory image archives go to: `image_dir`, else `<state_dir>/images`.
    pub fn image_dir(&self, state_dir: &Path) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("images"))
    }

    pub fn load(path: &Path, host: HostFacts) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path, host)
    }

    pub fn parse(text: &str, path: &Path, host: HostFacts) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let invalid = |key: &'static str, value: String, allowed: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            value,
            allowed: allowed.to_owned(),
        };
        let mut cfg = AgentConfig::defaults(host);
        if let Some(p) = raw.pools {
            if let Some(cpu) = p.cpu {
                if !(cpu.is_finite() && cpu > 0.0 && cpu <= 4096.0) {
                    return Err(invalid(
                        "pools.cpu",
                        cpu.to_string(),
                        "a number of cores, > 0 and <= 4096",
                    ));
                }
                cfg.pools.cpu_millicores = (cpu * 1000.0).round() as u64;
            }
            if let Some(m) = p.memory {
                cfg.pools.memory_bytes = chutes::parse_bytes(&m).map_err(|e| {
                    invalid(
                        "pools.memory",
                        format!("{m:?}"),
                        &format!("{e} (e.g. \"512MiB\")"),
                    )
                })?;
            }
            if let Some(n) = p.pids {
                if n == 0 {
                    return Err(invalid("pools.pids", n.to_string(), "an integer >= 1"));
                }
                cfg.pools.pids = n;
            }
            if let Some(r) = p.bandwidth_down {
                cfg.pools.bandwidth_down_bps = chutes::parse_rate_bps(&r).map_err(|e| {
                    invalid(
                        "pools.bandwidth_down",
                        format!("{r:?}"),
                        &format!("{e} (e.g. \"100mbit\")"),
                    )
                })?;
            }
            if let Some(r) = p.bandwidth_up {
                cfg.pools.bandwidth_up_bps = chutes::parse_rate_bps(&r).map_err(|e| {
                    invalid(
                        "pools.bandwidth_up",
                        format!("{r:?}"),
                        &format!("{e} (e.g. \"20mbit\")"),
                    )
                })?;
            }
        }
        if let Some(v) = raw.allow_host_network {
            cfg.allow_host_network = v;
        }
        if let Some(rt) = raw.oci_runtime {
            if rt.is_empty()
                || !rt
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(
                    "oci_runtime",
                    format!("{rt:?}"),
                    "a runtime name such as \"runc\" or \"crun\"",
                ));
            }
            cfg.oci_runtime = Some(rt);
        }
        if let Some(s) = raw.heartbeat_secs {
            if !(1..=86_400).contains(&s) {
                return Err(invalid("heartbeat_secs", s.to_string(), "1..=86400"));
            }
            cfg.heartbeat = Duration::from_secs(s);
        }
        if let Some(s) = raw.sample_secs {
            if !(1..=3600).contains(&s) {
                return Err(invalid("sample_secs", s.to_string(), "1..=3600"));
            }
            cfg.sample_interval = Duration::from_secs(s);
        }
        if let Some(k) = raw.owner_key {
            if k.len() != 64 || !k.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(invalid(
                    "owner_key",
                    format!("{k:?}"),
                    "64 hex digits (an Ed25519 public key)",
                ));
            }
            cfg.owner_key = Some(k.to_ascii_lowercase());
        }
        if let Some(c) = raw.cloud {
            if !(c.starts_with("ws://") || c.starts_with("wss://")) {
                return Err(invalid("cloud", format!("{c:?}"), "a ws:// or wss:// URL"));
            }
            cfg.cloud = Some(c);
        }
        if let Some(s) = raw.zombie_timeout_secs {
            cfg.lifecycle.zombie_timeout_ms = s.saturating_mul(1000);
        }
        if let Some(s) = raw.podman_timeout_secs {
            if !(1..=3600).contains(&s) {
                return Err(invalid("podman_timeout_secs", s.to_string(), "1..=3600"));
            }
            cfg.podman_timeout = Duration::from_secs(s);
        }
        if let Some(s) = raw.image_timeout_secs {
            if !(1..=86400).contains(&s) {
                return Err(invalid("image_timeout_secs", s.to_string(), "1..=86400"));
            }
            cfg.image_timeout = Duration::from_secs(s);
        }
        if let Some(s) = raw.stop_timeout_secs {
            if s > 600 {
                return Err(invalid("stop_timeout_secs", s.to_string(), "0..=600"));
            }
            cfg.lifecycle.stop_timeout_secs = s;
        }
        if let Some(ms) = raw.backoff_initial_ms {
            if ms == 0 {
                return Err(invalid(
                    "backoff_initial_ms",
                    ms.to_string(),
                    "an integer >= 1",
                ));
            }
            cfg.lifecycle.backoff.initial_ms = ms;
        }
        if let Some(ms) = raw.backoff_max_ms {
            cfg.lifecycle.backoff.max_ms = ms;
        }
        if cfg.lifecycle.backoff.max_ms < cfg.lifecycle.backoff.initial_ms {
            return Err(invalid(
                "backoff_max_ms",
                cfg.lifecycle.backoff.max_ms.to_string(),
                "must be >= backoff_initial_ms",
            ));
        }
        if let Some(s) = raw.backoff_reset_secs {
            cfg.lifecycle.backoff.reset_after_ms = s.saturating_mul(1000);
        }
        if let Some(n) = raw.ulimit_nofile {
            cfg.ulimit_nofile = n.max(64);
        }
        if let Some(n) = raw.ulimit_nproc {
            cfg.ulimit_nproc = n.max(16);
        }
        if let Some(i) = raw.instance {
            if i.is_empty()
                || i.len() > 40
                || !i
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                return Err(invalid(
                    "instance",
                    format!("{i:?}"),
                    "1..=40 characters of a-z, 0-9 and '-'",
                ));
            }
            cfg.instance = i;
        }
        if let Some(cg) = raw.cgroup_parent {
            if !check_cgroup_parent(&cg) {
                return Err(invalid(
                    "cgroup_parent",
                    format!("{cg:?}"),
                    CGROUP_PARENT_ALLOWED,
                ));
            }
            cfg.cgroup_parent = Some(cg);
        }
        if let Some(d) = raw.image_dir {
            if !d.is_absolute() || d.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(invalid(
                    "image_dir",
                    format!("{:?}", d.display().to_string()),
                    "an absolute directory without \"..\", e.g. \"/opt/podman/chuted-images\"",
                ));
            }
            cfg.image_dir = Some(d);
        }
        if let Some(caps) = raw.cap_add {
            for c in &caps {
                let bare = c.trim_start_matches("CAP_");
                if bare.is_empty() || !bare.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_') {
                    return Err(invalid(
                        "cap_add",
                        format!("{c:?}"),
                        "capability names such as \"NET_BIND_SERVICE\"",
                    ));
                }
                if !ALLOWED_CAPS.contains(&bare) {
                    return Err(invalid(
                        "cap_add",
                        format!("{c:?}"),
                        &format!(
                            "refused: {}; allowed are {}",
                            refused_cap_reason(bare),
                            ALLOWED_CAPS.join(", ")
                        ),
                    ));
                }
            }
            cfg.cap_add = caps
                .into_iter()
                .map(|c| c.trim_start_matches("CAP_").to_owned())
                .collect();
        }
        if let Some(s) = raw.command_lifetime_secs {
            if !(1..=proto::MAX_COMMAND_LIFETIME).contains(&s) {
                return Err(invalid(
                    "command_lifetime_secs",
                    s.to_string(),
                    &format!("1..={} (seconds)", proto::MAX_COMMAND_LIFETIME),
                ));
            }
            cfg.command_lifetime_secs = s;
        }
        if let Some(v) = raw.allow_unpinned_images {
            cfg.allow_unpinned_images = v;
        }
        if let Some(r) = raw.host_ports {
            let parsed = r
                .split_once('-')
                .and_then(|(a, b)| {
                    Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
                })
                .filter(|(a, b)| *a >= 1 && a <= b);
            cfg.host_ports = parsed.ok_or_else(|| {
                invalid(
                    "host_ports",
                    format!("{r:?}"),
                    "a range LOW-HIGH of ports 1..=65535, e.g. \"1024-65535\"",
                )
            })?;
        }
        if let Some(s) = raw.partial_image_max_age_secs {
            if s == 0 {
                return Err(invalid(
                    "partial_image_max_age_secs",
                    s.to_string(),
                    "seconds >= 1",
                ));
            }
            cfg.partial_image_max_age = Duration::from_secs(s);
        }
        if let Some(b) = raw.userns_base {
            if b < 65536 {
                return Err(invalid(
                    "userns_base",
                    b.to_string(),
                    "a host id >= 65536, above every real user (e.g. 1000000)",
                ));
            }
            cfg.userns_base = Some(b);
        }
        if let Some(b) = raw.host_bind {
            cfg.host_bind = Some(b.parse().map_err(|_| {
                invalid(
                    "host_bind",
                    format!("{b:?}"),
                    "an IPv4 or IPv6 address such as \"192.168.1.1\"",
                )
            })?);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostFacts = HostFacts {
        cpus: 4,
        memory_bytes: 4 << 30,
    };

    fn parse(s: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(s, Path::new("/etc/chuted.toml"), HOST)
    }

    #[test]
    fn defaults_come_from_the_host() {
        let c = parse("").unwrap();
        assert_eq!(c.pools.cpu_millicores, 4000);
        assert_eq!(c.pools.memory_bytes, 3 << 30);
        assert!(!c.allow_host_network);
        assert_eq!(c.heartbeat, Duration::from_secs(30));
    }

    #[test]
    fn pools_parse_with_units() {
        let c = parse("[pools]\ncpu = 1.5\nmemory = \"512MiB\"\npids = 100\nbandwidth_down = \"100mbit\"\nbandwidth_up = \"20mbit\"\n").unwrap();
        assert_eq!(c.pools.cpu_millicores, 1500);
        assert_eq!(c.pools.memory_bytes, 512 << 20);
        assert_eq!(c.pools.pids, 100);
        assert_eq!(c.pools.bandwidth_down_bps, 100_000_000);
        assert_eq!(c.pools.bandwidth_up_bps, 20_000_000);
    }

    #[test]
    fn bad_values_name_the_key_and_what_is_allowed() {
        let e = parse("[pools]\nmemory = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("pools.memory") && e.contains("lots") && e.contains("512MiB"),
            "{e}"
        );
        let e = parse("[pools]\ncpu = -1\n").unwrap_err().to_string();
        assert!(e.contains("pools.cpu") && e.contains("> 0"), "{e}");
        let e = parse("memroy = 1\n").unwrap_err().to_string();
        assert!(e.contains("memroy"), "{e}");
        let e = parse("cap_add = [\"SYS_ADMIN\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cap_add") && e.contains("SYS_ADMIN"), "{e}");
        let e = parse("owner_key = \"abc\"\n").unwrap_err().to_string();
        assert!(e.contains("64 hex"), "{e}");
    }

    #[test]
    fn cgroup_parent_is_a_plain_path_or_a_slice() {
        assert_eq!(parse("").unwrap().cgroup_parent, None);
        for ok in ["/chuted/chutes", "/chuted", "chuted.slice", "/a_b-c.d"] {
            assert_eq!(
                parse(&format!("cgroup_parent = {ok:?}\n"))
                    .unwrap()
                    .cgroup_parent
                    .as_deref(),
                Some(ok)
            );
        }
        for bad in [
            "",
            "/",
            "chuted",
            "/chuted/../..",
            "/chuted//x",
            "/a b",
            "/x/",
            ".slice",
            "a/b.slice",
        ] {
            let e = parse(&format!("cgroup_parent = {bad:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cgroup_parent") && e.contains("/chuted/chutes"),
                "{bad:?}: {e}"
            );
        }
    }

    /// Image archives (up to 1 GiB) go where `image_dir` says, not into the state dir
    /// that OpenWrt keeps on flash across sysupgrade.
    #[test]
    fn image_dir_is_configurable_and_absolute() {
        let state = Path::new("/etc/chuted");
        assert_eq!(
            parse("").unwrap().image_dir(state),
            Path::new("/etc/chuted/images")
        );
        let c = parse("image_dir = \"/opt/podman/chuted-images\"\n").unwrap();
        assert_eq!(c.image_dir(state), Path::new("/opt/podman/chuted-images"));
        for bad in ["images", "/opt/../etc/chuted", ""] {
            let e = parse(&format!("image_dir = {bad:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("image_dir") && e.contains("absolute directory"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn cap_add_is_an_allow_list_and_refusals_say_why() {
        for bad in [
            "ALL",
            "SYS_ADMIN",
            "NET_ADMIN",
            "NET_RAW",
            "SYS_TIME",
            "SYS_MODULE",
            "BPF",
            "SYS_PTRACE",
            "CAP_SYS_ADMIN",
            "PERFMON",
            "WHATEVER",
        ] {
            let e = parse(&format!("cap_add = [{bad:?}]\n"))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("cap_add") && e.contains(bad) && e.contains("refused"),
                "{e}"
            );
            assert!(e.contains("NET_BIND_SERVICE"), "lists what is allowed: {e}");
        }
        let e = parse("cap_add = [\"NET_RAW\"]\n").unwrap_err().to_string();
        assert!(e.contains("raw sockets"), "{e}");
        let c = parse("cap_add = [\"CHOWN\", \"CAP_NET_BIND_SERVICE\"]\n").unwrap();
        assert_eq!(c.cap_add, ["CHOWN", "NET_BIND_SERVICE"]);
        for cap in DEFAULT_CAPS {
            assert!(ALLOWED_CAPS.contains(cap), "default {cap} must be allowed");
        }
    }

    #[test]
    fn command_lifetime_defaults_to_300_and_stops_at_an_hour() {
        assert_eq!(parse("").unwrap().command_lifetime_secs, 300);
        assert_eq!(
            parse("command_lifetime_secs = 3600\n")
                .unwrap()
                .command_lifetime_secs,
            3600
        );
        let e = parse("command_lifetime_secs = 3601\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("command_lifetime_secs") && e.contains("1..=3600"),
            "{e}"
        );
    }

    #[test]
    fn host_ports_outside_the_allow_list_are_refused_naming_the_port() {
        let m = |port: u16| {
            chutes::Manifest::from_toml_str(&format!(
                "name = \"web\"\nversion = \"1\"\nimage = \"x@sha256:{}\"\n[network]\nports = [\"{port}:80\"]\n",
                "a".repeat(64)
            ))
            .unwrap()
        };
        let c = parse("").unwrap();
        assert_eq!(c.host_ports, (1024, 65535));
        assert_eq!(c.host_bind, None);
        c.check_host_ports(&m(8080)).unwrap();
        let e = c.check_host_ports(&m(80)).unwrap_err().to_string();
        assert!(
            e.contains("host port 80") && e.contains("1024-65535"),
            "{e}"
        );
        let c = parse("host_ports = \"8000-8099\"\nhost_bind = \"192.168.1.1\"\n").unwrap();
        assert!(c.check_host_ports(&m(8100)).is_err());
        c.check_host_ports(&m(8000)).unwrap();
        assert_eq!(c.host_bind, Some("192.168.1.1".parse().unwrap()));
        for bad in ["80", "9000-8000", "0-10", "a-b"] {
            let e = parse(&format!("host_ports = {bad:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("host_ports") && e.contains("LOW-HIGH"), "{e}");
        }
        assert!(parse("host_bind = \"lan\"\n").is_err());
    }

    #[test]
    fn userns_is_off_by_default_and_its_base_above_real_users() {
        assert_eq!(parse("").unwrap().userns_base, None);
        assert_eq!(
            parse("userns_base = 1000000\n").unwrap().userns_base,
            Some(1_000_000)
        );
        let e = parse("userns_base = 1000\n").unwrap_err().to_string();
        assert!(e.contains("userns_base") && e.contains(">= 65536"), "{e}");
    }

    #[test]
    fn memtotal_is_read_from_meminfo() {
        assert_eq!(
            parse_memtotal("MemTotal:       16384 kB\nMemFree: 1 kB\n"),
            Some(16384 * 1024)
        );
        assert_eq!(parse_memtotal("garbage"), None);
    }
}
