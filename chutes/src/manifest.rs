//! `chute.toml`: parsed once into validated types.
//!
//! Everything the agent needs later (names, caps, ports, restart policy) is checked here,
//! so code further down never sees an unvalidated string. Errors name the key as a dotted
//! path, quote the bad value and say what is allowed; unknown keys are errors, because a
//! typo such as `memroy = "1GiB"` silently ignored would leave a chute uncapped.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

use crate::ledger::Reservation;

/// Largest manifest accepted; a manifest is a few hundred bytes, this only bounds parsing.
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024;
/// Podman refuses memory limits below this.
pub const MIN_MEMORY_BYTES: u64 = 4 * 1024 * 1024;
/// Below this tc's HTB cannot shape sensibly.
pub const MIN_RATE_BPS: u64 = 8_000;
/// Upper bound on `resources.cpu`, in cores.
pub const MAX_CPU_CORES: u32 = 1024;
/// Upper bound on `resources.pids`.
pub const MAX_PIDS: u32 = 1_000_000;
/// Default `resources.cpu` (0.25 cores).
pub const DEFAULT_CPU_MILLICORES: u32 = 250;
/// Default `resources.memory` (64 MiB).
pub const DEFAULT_MEMORY_BYTES: u64 = 64 * 1024 * 1024;
/// Default `resources.pids`.
pub const DEFAULT_PIDS: u32 = 64;

const TOP_KEYS: &str = "name, version, image, command, env, resources, network, restart";
const RESOURCES_KEYS: &str = "cpu, memory, pids";
const NETWORK_KEYS: &str = "bandwidth_down, bandwidth_up, ports, host_network";
const RESTART_KEYS: &str = "policy";

const NAME_ALLOWED: &str = "1 to 40 characters from a-z, 0-9 and '-', starting with a letter or digit and not ending with '-', e.g. \"hello-web\"";
const SIZE_UNITS: &str = "B, KiB, MiB, GiB, TiB, KB, MB, GB, TB";
const SIZE_ALLOWED: &str = "a size of at least 4 MiB in B, KiB, MiB, GiB, TiB, KB, MB, GB or TB (a bare number is bytes), e.g. \"64MiB\"";
const RATE_UNITS: &str = "bit, kbit, mbit, gbit";
const RATE_ALLOWED: &str =
    "a rate of at least 8kbit in bit, kbit, mbit or gbit (decimal, as tc), e.g. \"8mbit\"";

/// Why a manifest (or a chute name) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Not valid TOML (or too large to parse).
    #[error("chute.toml{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Syntax {
        /// 1-based line of the error, when the parser knows it.
        line: Option<usize>,
        /// The parser's description.
        message: String,
    },
    /// A required key is absent.
    #[error("missing required key `{key}`")]
    MissingKey {
        /// Dotted path of the key.
        key: &'static str,
    },
    /// A key that the manifest format does not have (usually a typo).
    #[error("unknown key `{key}` (allowed: {allowed})")]
    UnknownKey {
        /// Dotted path of the unknown key.
        key: String,
        /// The keys allowed at that level.
        allowed: &'static str,
    },
    /// A key whose value breaks a rule.
    #[error("invalid `{key}` = {value}: expected {allowed}")]
    InvalidValue {
        /// Dotted path of the key.
        key: &'static str,
        /// The offending value as written (strings quoted, long values shortened).
        value: String,
        /// What would have been accepted.
        allowed: String,
    },
}

impl ManifestError {
    fn invalid(key: &'static str, value: impl Into<String>, allowed: impl Into<String>) -> Self {
        ManifestError::InvalidValue {
            key,
            value: value.into(),
            allowed: allowed.into(),
        }
    }
}

/// A validated chute name: `[a-z0-9-]`, 1..=40 characters, not starting or ending with `-`.
///
/// Serialized as a plain string and validated again on deserialization, so a tampered
/// snapshot cannot smuggle in a name that would break a container name or a path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ChuteName(String);

impl ChuteName {
    /// Longest name accepted.
    pub const MAX_LEN: usize = 40;

    /// Validates `s` as a chute name.
    pub fn parse(s: &str) -> Result<Self, ManifestError> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(ChuteName(s.to_owned()))
        } else {
            Err(ManifestError::invalid("name", quote(s), NAME_ALLOWED))
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The Podman container name used for this chute: `chute-<name>`.
    pub fn container_name(&self) -> String {
        format!("chute-{}", self.0)
    }
}

impl fmt::Display for ChuteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ChuteName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for ChuteName {
    type Err = ManifestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ChuteName::parse(s)
    }
}

impl TryFrom<String> for ChuteName {
    type Error = ManifestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        ChuteName::parse(&s)
    }
}

impl From<ChuteName> for String {
    fn from(n: ChuteName) -> String {
        n.0
    }
}

/// A validated `chute.toml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The chute's name (`name`).
    pub name: ChuteName,
    /// Free-form version label (`version`): non-empty, at most 64 printable characters.
    pub version: String,
    /// Image reference (`image`): non-empty, at most 255 characters, no whitespace.
    pub image: String,
    /// Command and arguments; empty means the image's default.
    pub command: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Hard caps, also reserved from the device's pools at deploy time.
    pub resources: Resources,
    /// Bandwidth caps and port mappings.
    pub network: Network,
    /// What to do when the container exits on its own.
    pub restart: RestartPolicy,
}

/// `[resources]`: hard caps, reserved at deploy time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU cap in thousandths of a core (`cpu = 0.5` → 500), at least 1.
    pub cpu_millicores: u32,
    /// Memory cap in bytes (no swap beyond it), at least 4 MiB.
    pub memory_bytes: u64,
    /// Maximum number of processes/threads.
    pub pids: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millicores: DEFAULT_CPU_MILLICORES,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            pids: DEFAULT_PIDS,
        }
    }
}

/// `[network]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    /// Cap on traffic toward the chute, bits per second; `None` = not shaped.
    pub bandwidth_down_bps: Option<u64>,
    /// Cap on traffic from the chute, bits per second; `None` = not shaped.
    pub bandwidth_up_bps: Option<u64>,
    /// Published ports; no two share a host port and protocol.
    pub ports: Vec<PortMapping>,
    /// Share the host's network namespace (the agent refuses it unless configured to allow).
    /// Never combined with ports or bandwidth caps, which could not be enforced.
    pub host_network: bool,
}

/// Transport protocol of a port mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP (the default).
    Tcp,
    /// UDP.
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One published port, `HOST:CONTAINER[/tcp|/udp]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port on the device, 1..=65535.
    pub host: u16,
    /// Port inside the container, 1..=65535.
    pub container: u16,
    /// Protocol.
    pub protocol: Protocol,
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.host, self.container, self.protocol)
    }
}

impl FromStr for PortMapping {
    type Err = String;
    /// Parses `HOST:CONTAINER[/tcp|/udp]`; the error says what is wrong.
    fn from_str(s: &str) -> Result<Self, String> {
        let (ports, protocol) = match s.split_once('/') {
            None => (s, Protocol::Tcp),
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some((_, other)) => return Err(format!("unknown protocol `{other}`")),
        };
        let (host, container) = ports
            .split_once(':')
            .ok_or_else(|| "missing `:` between host and container port".to_owned())?;
        let port = |p: &str, which: &str| -> Result<u16, String> {
            match p.parse::<u16>() {
                Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
                _ => Err(format!("{which} port `{p}` is not in 1..=65535")),
            }
        };
        Ok(PortMapping {
            host: port(host, "host")?,
            container: port(container, "container")?,
            protocol,
        })
    }
}

/// `[restart] policy`: what to do when the container exits on its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart after every exit, with backoff.
    Always,
    /// Restart after a non-zero exit code; stop on exit code 0.
    #[default]
    OnFailure,
    /// Never restart: exit code 0 → stopped, anything else → failed.
    Never,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

impl FromStr for RestartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(RestartPolicy::Always),
            "on-failure" => Ok(RestartPolicy::OnFailure),
            "never" => Ok(RestartPolicy::Never),
            _ => Err("one of \"always\", \"on-failure\", \"never\"".to_owned()),
        }
    }
}

impl Manifest {
    /// Parses and validates a `chute.toml`.
    pub fn from_toml_str(s: &str) -> Result<Manifest, ManifestError> {
        if s.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::Syntax {
                line: None,
                message: format!(
                    "manifest is {} bytes; at most {MAX_MANIFEST_BYTES} allowed",
                    s.len()
                ),
            });
        }
        let table: Table = s.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map(|sp| {
                s.as_bytes()[..sp.start.min(s.len())]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1
            });
            ManifestError::Syntax {
                line,
                // toml's messages span lines; keep ours to one.
                message: e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; "),
            }
        })?;
        check_keys(
            &table,
            "",
            &[
                "name",
                "version",
                "image",
                "command",
                "env",
                "resources",
                "network",
                "restart",
            ],
            TOP_KEYS,
        )?;

        let name = ChuteName::parse(required_str(&table, "name", NAME_ALLOWED)?)?;

        const VERSION_ALLOWED: &str =
            "a non-empty string of at most 64 printable characters, e.g. \"1.0.0\"";
        let version = required_str(&table, "version", VERSION_ALLOWED)?;
        if version.is_empty()
            || version.chars().count() > 64
            || version.chars().any(char::is_control)
        {
            return Err(ManifestError::invalid(
                "version",
                quote(version),
                VERSION_ALLOWED,
            ));
        }

        const IMAGE_ALLOWED: &str = "a non-empty image reference of at most 255 characters without whitespace, e.g. \"localhost/hello-web:1\"";
        let image = required_str(&table, "image", IMAGE_ALLOWED)?;
        if image.is_empty()
            || image.len() > 255
            || image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ManifestError::invalid("image", quote(image), IMAGE_ALLOWED));
        }

        let command = match table.get("command") {
            None => Vec::new(),
            Some(v) => parse_command(v)?,
        };
        let env = match table.get("env") {
            None => BTreeMap::new(),
            Some(v) => parse_env(v)?,
        };
        let resources = match table.get("resources") {
            None => Resources::default(),
            Some(v) => parse_resources(sub_table(v, "resources")?)?,
        };
        let network = match table.get("network") {
            None => Network::default(),
            Some(v) => parse_network(sub_table(v, "network")?)?,
        };
        let restart = match table.get("restart") {
            None => RestartPolicy::default(),
            Some(v) => {
                let t = sub_table(v, "restart")?;
                check_keys(t, "restart", &["policy"], RESTART_KEYS)?;
                match t.get("policy") {
                    None => RestartPolicy::default(),
                    Some(p) => {
                        let allowed = "one of \"always\", \"on-failure\", \"never\"";
                        let s = p.as_str().ok_or_else(|| {
                            ManifestError::invalid("restart.policy", show(p), allowed)
                        })?;
                        s.parse().map_err(|e: String| {
                            ManifestError::invalid("restart.policy", show(p), e)
                        })?
                    }
                }
            }
        };

        Ok(Manifest {
            name,
            version: version.to_owned(),
            image: image.to_owned(),
            command,
            env,
            resources,
            network,
            restart,
        })
    }

    /// What this chute reserves from the device's pools. Unshaped directions reserve no
    /// bandwidth.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            cpu_millicores: u64::from(self.resources.cpu_millicores),
            memory_bytes: self.resources.memory_bytes,
            pids: u64::from(self.resources.pids),
            bandwidth_down_bps: self.network.bandwidth_down_bps.unwrap_or(0),
            bandwidth_up_bps: self.network.bandwidth_up_bps.unwrap_or(0),
        }
    }
}

fn check_keys(
    table: &Table,
    prefix: &str,
    allowed: &[&str],
    allowed_str: &'static str,
) -> Result<(), ManifestError> {
    match table.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(k) => Err(ManifestError::UnknownKey {
            key: if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            },
            allowed: allowed_str,
        }),
    }
}

fn required_str<'a>(
    table: &'a Table,
    key: &'static str,
    allowed: &str,
) -> Result<&'a str, ManifestError> {
    let v = table.get(key).ok_or(ManifestError::MissingKey { key })?;
    v.as_str()
        .ok_or_else(|| ManifestError::invalid(key, show(v), allowed))
}

fn sub_table<'a>(v: &'a Value, key: &'static str) -> Result<&'a Table, ManifestError> {
    v.as_table()
        .ok_or_else(|| ManifestError::invalid(key, show(v), format!("a table `[{key}]`")))
}

fn parse_command(v: &Value) -> Result<Vec<String>, ManifestError> {
    const ALLOWED: &str = "a non-empty array of strings without NUL characters whose first \
        element (the program) is not empty, e.g. [\"httpd\", \"-f\"]; leave `command` out \
        to run the image's own";
    let arr = v
        .as_array()
        .ok_or_else(|| ManifestError::invalid("command", show(v), ALLOWED))?;
    match arr.first().and_then(Value::as_str) {
        Some(program) if !program.trim().is_empty() => {}
        _ => return Err(ManifestError::invalid("command", show(v), ALLOWED)),
    }
    arr.iter()
        .map(|item| match item.as_str() {
            Some(s) if !s.contains('\0') => Ok(s.to_owned()),
            _ => Err(ManifestError::invalid("command", show(v), ALLOWED)),
        })
        .collect()
}

fn valid_env_key(k: &str) -> bool {
    let mut bytes = k.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_env(v: &Value) -> Result<BTreeMap<String, String>, ManifestError> {
    let t = v.as_table().ok_or_else(|| {
        ManifestError::invalid(
            "env",
            show(v),
            "a table of strings, e.g. { GREETING = \"hi\" }",
        )
    })?;
    let mut env = BTreeMap::new();
    for (k, val) in t {
        if !valid_env_key(k) {
            return Err(ManifestError::invalid(
                "env",
                quote(k),
                "variable names matching [A-Za-z_][A-Za-z0-9_]*, e.g. GREETING",
            ));
        }
        match val.as_str() {
            // A NUL cannot be passed through exec(2); refuse it here, not at start time.
            Some(s) if !s.contains('\0') => {
                env.insert(k.clone(), s.to_owned());
            }
            _ => {
                return Err(ManifestError::invalid(
                    "env",
                    format!("{{ {k} = {} }}", show(val)),
                    format!("a string value without NUL characters, e.g. {k} = \"1\""),
                ))
            }
        }
    }
    Ok(env)
}

fn parse_resources(t: &Table) -> Result<Resources, ManifestError> {
    check_keys(t, "resources", &["cpu", "memory", "pids"], RESOURCES_KEYS)?;
    let mut r = Resources::default();
    if let Some(v) = t.get("cpu") {
        let allowed = format!("a number of cores > 0 and <= {MAX_CPU_CORES}, e.g. 0.5");
        let cores = match v {
            Value::Integer(i) => *i as f64,
            Value::Float(f) => *f,
            _ => return Err(ManifestError::invalid("resources.cpu", show(v), allowed)),
        };
        if !(cores.is_finite() && cores > 0.0 && cores <= f64::from(MAX_CPU_CORES)) {
            return Err(ManifestError::invalid("resources.cpu", show(v), allowed));
        }
        // The kernel's smallest CFS quota is 1 ms per period (0.01 cores at our 100 ms);
        // a smaller ask would be enforced as 0.01 while only the ask was reserved.
        if cores * 1000.0 < f64::from(MIN_CPU_MILLICORES) - 1e-6 {
            return Err(ManifestError::invalid(
                "resources.cpu",
                show(v),
                format!(
                    "{allowed}; at least 0.01, the smallest CPU cap the kernel enforces \
                     (a 1 ms quota per 100 ms period)"
                ),
            ));
        }
        r.cpu_millicores = cores_to_millicores(cores);
    }
    if let Some(v) = t.get("memory") {
        let parsed = match v {
            Value::String(s) => parse_bytes_inner(s),
            Value::Integer(i) => u64::try_from(*i).map_err(|_| "negative".to_owned()),
            _ => Err("not a size".to_owned()),
        };
        match parsed {
            Ok(b) if b >= MIN_MEMORY_BYTES => r.memory_bytes = b,
            Ok(b) => {
                return Err(ManifestError::invalid(
                    "resources.memory",
                    show(v),
                    format!("{SIZE_ALLOWED}; got {}, below the minimum", format_bytes(b)),
                ))
            }
            Err(e) => {
                return Err(ManifestError::invalid(
                    "resources.memory",
                    show(v),
                    format!("{SIZE_ALLOWED}; {e}"),
                ))
            }
        }
    }
    if let Some(v) = t.get("pids") {
        match v.as_integer() {
            Some(i) if (1..=i64::from(MAX_PIDS)).contains(&i) => {
                r.pids = u32::try_from(i).expect("range-checked to 1..=1_000_000")
            }
            _ => {
                return Err(ManifestError::invalid(
                    "resources.pids",
                    show(v),
                    format!("an integer from 1 to {MAX_PIDS}, e.g. 64"),
                ))
            }
        }
    }
    Ok(r)
}

/// Rounds up so a cap is never below what was written, but tolerates binary float noise
/// (`0.1 * 1000` is `100.00000000000001`, which must be 100, not 101).
/// The smallest CPU cap that is enforced as written (see `parse_resources`).
const MIN_CPU_MILLICORES: u32 = 10;

fn cores_to_millicores(cores: f64) -> u32 {
    let m = cores * 1000.0;
    let r = m.round();
    let m = if (m - r).abs() < 1e-6 { r } else { m.ceil() };
    // `cores` is in (0, 1024], so `m` is in (0, 1_024_000]: the cast cannot truncate.
    (m as u32).max(1)
}

fn parse_rate_key(v: &Value, key: &'static str) -> Result<u64, ManifestError> {
    let s = v
        .as_str()
        .ok_or_else(|| ManifestError::invalid(key, show(v), RATE_ALLOWED))?;
    match parse_rate_inner(s) {
        Ok(bps) if bps >= MIN_RATE_BPS => Ok(bps),
        Ok(bps) => Err(ManifestError::invalid(
            key,
            show(v),
            format!(
                "{RATE_ALLOWED}; got {}, below the minimum",
                format_rate(bps)
            ),
        )),
        Err(e) => Err(ManifestError::invalid(
            key,
            show(v),
            format!("{RATE_ALLOWED}; {e}"),
        )),
    }
}

fn parse_network(t: &Table) -> Result<Network, ManifestError> {
    check_keys(
        t,
        "network",
        &["bandwidth_down", "bandwidth_up", "ports", "host_network"],
        NETWORK_KEYS,
    )?;
    let mut n = Network::default();
    if let Some(v) = t.get("bandwidth_down") {
        n.bandwidth_down_bps = Some(parse_rate_key(v, "network.bandwidth_down")?);
    }
    if let Some(v) = t.get("bandwidth_up") {
        n.bandwidth_up_bps = Some(parse_rate_key(v, "network.bandwidth_up")?);
    }
    if let Some(v) = t.get("host_network") {
        n.host_network = v.as_bool().ok_or_else(|| {
            ManifestError::invalid("network.host_network", show(v), "true or false")
        })?;
    }
    if let Some(v) = t.get("ports") {
        const ALLOWED: &str =
            "an array of \"HOST:CONTAINER[/tcp|/udp]\" strings with ports in 1..=65535, e.g. [\"8080:8080/tcp\"]";
        let arr = v
            .as_array()
            .ok_or_else(|| ManifestError::invalid("network.ports", show(v), ALLOWED))?;
        for item in arr {
            let s = item
                .as_str()
                .ok_or_else(|| ManifestError::invalid("network.ports", show(item), ALLOWED))?;
            let p: PortMapping = s.parse().map_err(|e: String| {
                ManifestError::invalid("network.ports", show(item), format!("{ALLOWED}; {e}"))
            })?;
            if let Some(prev) = n
                .ports
                .iter()
                .find(|q| q.host == p.host && q.protocol == p.protocol)
            {
                return Err(ManifestError::invalid(
                    "network.ports",
                    show(item),
                    format!(
                        "each host port and protocol at most once (host port {}/{} is already mapped by \"{prev}\")",
                        p.host, p.protocol
                    ),
                ));
            }
            n.ports.push(p);
        }
    }
    if n.host_network {
        // Neither publishing nor per-chute shaping can be enforced on the host's own
        // interfaces, and a cap that is silently not applied is worse than a refusal.
        if !n.ports.is_empty() {
            return Err(ManifestError::invalid(
                "network.ports",
                show(t.get("ports").unwrap_or(&Value::Array(Vec::new()))),
                "no ports when `network.host_network = true` (the chute binds host ports directly)",
            ));
        }
        for (key, path) in [
            ("bandwidth_down", "network.bandwidth_down"),
            ("bandwidth_up", "network.bandwidth_up"),
        ] {
            if let Some(v) = t.get(key) {
                return Err(ManifestError::invalid(
                    path,
                    show(v),
                    "no bandwidth cap when `network.host_network = true` (it cannot be enforced per chute)",
                ));
            }
        }
    }
    Ok(n)
}

/// Renders a TOML value for an error message, shortened so a hostile manifest cannot make
/// error messages arbitrarily large.
fn show(v: &Value) -> String {
    let s = match v {
        Value::String(s) => quote(s),
        Value::Integer(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Boolean(b) => b.to_string(),
        Value::Datetime(d) => d.to_string(),
        Value::Array(a) => {
            let items: Vec<String> = a.iter().take(8).map(show).collect();
            let more = if a.len() > 8 { ", ..." } else { "" };
            format!("[{}{more}]", items.join(", "))
        }
        Value::Table(t) => {
            let items: Vec<String> = t
                .iter()
                .take(8)
                .map(|(k, v)| format!("{k} = {}", show(v)))
                .collect();
            let more = if t.len() > 8 { ", ..." } else { "" };
            format!("{{ {}{more} }}", items.join(", "))
        }
    };
    shorten(s)
}

fn quote(s: &str) -> String {
    shorten(format!("{s:?}"))
}

fn shorten(s: String) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s
    } else {
        let mut t: String = s.chars().take(MAX).collect();
        t.push('…');
        t
    }
}

/// Splits `"64 MiB"` into a scaled integer; fractions round up ("0.1KiB" → 103). Errors
/// are short: the caller says what is allowed.
fn parse_scaled(s: &str, unit_of: impl Fn(&str) -> Option<u64>) -> Result<u64, String> {
    let t = s.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    let unit = unit.trim_start();
    let mult = unit_of(unit).ok_or_else(|| {
        if unit.is_empty() {
            "missing unit".to_owned()
        } else {
            format!("unknown unit `{unit}`")
        }
    })?;
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || (num.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(format!("`{num}` is not a number"));
    }
    if frac.len() > 18 {
        return Err("too many decimal places".to_owned());
    }
    let too_big = || "too large".to_owned();
    let int: u128 = int.parse().map_err(|_| too_big())?;
    let mut value = int.checked_mul(u128::from(mult)).ok_or_else(too_big)?;
    if !frac.is_empty() {
        let digits = u32::try_from(frac.len()).map_err(|_| too_big())?;
        let den = 10u128.pow(digits);
        let f: u128 = frac.parse().map_err(|_| too_big())?;
        let scaled = f * u128::from(mult);
        value = value
            .checked_add(scaled.div_ceil(den))
            .ok_or_else(too_big)?;
    }
    u64::try_from(value).map_err(|_| too_big())
}

/// Parses a size: `B`, `KiB`, `MiB`, `GiB`, `TiB` (binary), `KB`, `MB`, `GB`, `TB`
/// (decimal), or a bare number of bytes; an optional space before the unit. Units are
/// case-sensitive because `Mb` (megabit) vs `MB` is exactly the confusion to refuse.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    parse_bytes_inner(s).map_err(|e| format!("{e} (sizes are a number and one of {SIZE_UNITS})"))
}

fn parse_bytes_inner(s: &str) -> Result<u64, String> {
    parse_scaled(s, |u| {
        Some(match u {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => return None,
        })
    })
}

/// Parses a rate in bits per second, tc style: `bit`, `kbit`, `mbit`, `gbit` (decimal
/// multiples of 1000, case-insensitive). A bare number is refused: tc reads it as bytes per
/// second, which nobody means.
pub fn parse_rate_bps(s: &str) -> Result<u64, String> {
    parse_rate_inner(s).map_err(|e| format!("{e} (rates are a number and one of {RATE_UNITS})"))
}

fn parse_rate_inner(s: &str) -> Result<u64, String> {
    parse_scaled(s, |u| {
        Some(match u.to_ascii_lowercase().as_str() {
            "bit" => 1,
            "kbit" => 1_000,
            "mbit" => 1_000_000,
            "gbit" => 1_000_000_000,
            _ => return None,
        })
    })
}

/// Formats with the largest unit that fits: exact values as integers, others truncated
/// (never rounded up) to two decimals, so "free" is never shown larger than it is.
fn format_scaled(n: u64, units: &[(&str, u64)], base: &str) -> String {
    for &(name, size) in units {
        if n >= size {
            let whole = n / size;
            let rem = n % size;
            return if rem == 0 {
                format!("{whole} {name}")
            } else {
                let hundredths = u128::from(rem) * 100 / u128::from(size);
                format!("{whole}.{hundredths:02} {name}")
            };
        }
    }
    format!("{n} {base}")
}

/// `67108864` → `"64 MiB"`, `1536` → `"1.50 KiB"`, `100` → `"100 B"`.
pub fn format_bytes(n: u64) -> String {
    format_scaled(
        n,
        &[
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ],
        "B",
    )
}

/// `8_000_000` → `"8 mbit"`, `1_500` → `"1.50 kbit"`.
pub fn format_rate(bps: u64) -> String {
    format_scaled(
        bps,
        &[
            ("gbit", 1_000_000_000),
            ("mbit", 1_000_000),
            ("kbit", 1_000),
        ],
        "bit",
    )
}

/// `500` → `"0.5 cores"`, `1000` → `"1 core"`, `2250` → `"2.25 cores"`.
pub fn format_cpu(millicores: impl Into<u64>) -> String {
    let m: u64 = millicores.into();
    let whole = m / 1000;
    let frac = m % 1000;
    let num = if frac == 0 {
        whole.to_string()
    } else {
        let f = format!("{frac:03}");
        format!("{whole}.{}", f.trim_end_matches('0'))
    };
    if m == 1000 {
        "1 core".to_owned()
    } else {
        format!("{num} cores")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A manifest with every section and key.
    const FULL_EXAMPLE: &str = r#"
name = "hello-web"                 # [a-z0-9-], 1..=40; container is named chute-<name>
version = "1.0.0"
image = "localhost/hello-web:1"    # present locally, pulled, or loaded from an archive
command = ["httpd", "-f", "-p", "8080"]
env = { GREETING = "hi" }

[resources]                         # reserved at deploy time from the device's pools
cpu = 0.5                           # cores, hard cap (CFS quota)
memory = "64MiB"                    # hard cap, no swap beyond it
pids = 64

[network]
bandwidth_down = "8mbit"            # toward the chute
bandwidth_up = "2mbit"              # from the chute
ports = ["8080:8080/tcp"]

[restart]
policy = "on-failure"              # always | on-failure | never
"#;

    #[test]
    fn design_example_parses_to_exact_values() {
        let m = Manifest::from_toml_str(FULL_EXAMPLE).unwrap();
        let want = Manifest {
            name: ChuteName::parse("hello-web").unwrap(),
            version: "1.0.0".into(),
            image: "localhost/hello-web:1".into(),
            command: vec!["httpd".into(), "-f".into(), "-p".into(), "8080".into()],
            env: [("GREETING".to_owned(), "hi".to_owned())].into(),
            resources: Resources {
                cpu_millicores: 500,
                memory_bytes: 64 * MIB,
                pids: 64,
            },
            network: Network {
                bandwidth_down_bps: Some(8_000_000),
                bandwidth_up_bps: Some(2_000_000),
                ports: vec![PortMapping {
                    host: 8080,
                    container: 8080,
                    protocol: Protocol::Tcp,
                }],
                host_network: false,
            },
            restart: RestartPolicy::OnFailure,
        };
        assert_eq!(m, want);
        assert_eq!(m.name.container_name(), "chute-hello-web");
        assert_eq!(
            m.reservation(),
            Reservation {
                cpu_millicores: 500,
                memory_bytes: 64 * MIB,
                pids: 64,
                bandwidth_down_bps: 8_000_000,
                bandwidth_up_bps: 2_000_000,
            }
        );
    }

    #[test]
    fn repo_example_parses() {
        let s = include_str!("../../examples/hello-web/chute.toml");
        let m = Manifest::from_toml_str(s).unwrap();
        assert_eq!(m.name.as_str(), "hello-web");
        assert_eq!(m.network.ports[0].to_string(), "18080:8080/tcp");
    }

    #[test]
    fn minimal_manifest_gets_defaults() {
        let m = Manifest::from_toml_str("name = \"a\"\nversion = \"1\"\nimage = \"i\"\n").unwrap();
        assert!(m.command.is_empty());
        assert!(m.env.is_empty());
        assert_eq!(
            m.resources,
            Resources {
                cpu_millicores: 250,
                memory_bytes: 64 * MIB,
                pids: 64
            }
        );
        assert_eq!(m.network, Network::default());
        assert_eq!(m.restart, RestartPolicy::OnFailure);
        assert_eq!(m.reservation().bandwidth_down_bps, 0);
    }

    const BASE: &str = "name = \"web\"\nversion = \"1\"\nimage = \"img\"\n";

    fn with(extra: &str) -> Result<Manifest, ManifestError> {
        Manifest::from_toml_str(&format!("{BASE}{extra}\n"))
    }

    /// Replaces the line that starts with `key =` in BASE.
    fn replacing(key: &str, line: &str) -> Result<Manifest, ManifestError> {
        let s: String = BASE
            .lines()
            .map(|l| {
                if l.starts_with(&format!("{key} =")) {
                    line
                } else {
                    l
                }
            })
            .filter(|l| !l.is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        Manifest::from_toml_str(&s)
    }

    #[track_caller]
    fn invalid(r: Result<Manifest, ManifestError>, key: &str) -> String {
        match r {
            Err(e @ ManifestError::InvalidValue { key: k, .. }) if k == key => e.to_string(),
            other => panic!("expected InvalidValue for `{key}`, got {other:?}"),
        }
    }

    #[test]
    fn name_rules() {
        for good in ["a", "0", "hello-web", "a-b-c", "x1", &"a".repeat(40)] {
            assert!(ChuteName::parse(good).is_ok(), "{good}");
            replacing("name", &format!("name = \"{good}\"")).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Hello",
            "a_b",
            "a b",
            "é",
            "a.b",
            &"a".repeat(41),
        ] {
            assert!(ChuteName::parse(bad).is_err(), "{bad:?}");
            let msg = invalid(replacing("name", &format!("name = {bad:?}")), "name");
            assert!(msg.contains("a-z, 0-9"), "{msg}");
        }
        invalid(replacing("name", "name = 5"), "name");
    }

    #[test]
    fn chute_name_validates_on_deserialize() {
        let ok: ChuteName = serde_json::from_str("\"web\"").unwrap();
        assert_eq!(ok.as_str(), "web");
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"web\"");
        assert!(serde_json::from_str::<ChuteName>("\"../etc\"").is_err());
        let bytes = postcard::to_stdvec(&"Bad Name").unwrap();
        assert!(postcard::from_bytes::<ChuteName>(&bytes).is_err());
    }

    #[test]
    fn required_keys() {
        for key in ["name", "version", "image"] {
            let s: String = BASE
                .lines()
                .filter(|l| !l.starts_with(key))
                .map(|l| format!("{l}\n"))
                .collect();
            let e = Manifest::from_toml_str(&s).unwrap_err();
            assert_eq!(
                e,
                ManifestError::MissingKey {
                    key: match key {
                        "name" => "name",
                        "version" => "version",
                        _ => "image",
                    }
                }
            );
            assert_eq!(e.to_string(), format!("missing required key `{key}`"));
        }
    }

    #[test]
    fn version_and_image_rules() {
        replacing("version", &format!("version = \"{}\"", "v".repeat(64))).unwrap();
        replacing("version", "version = \"1.0 beta\"").unwrap();
        for bad in [
            "\"\"",
            &format!("\"{}\"", "v".repeat(65)),
            "\"a\\u0007\"",
            "1",
        ] {
            invalid(replacing("version", &format!("version = {bad}")), "version");
        }
        replacing("image", &format!("image = \"{}\"", "i".repeat(255))).unwrap();
        for bad in [
            "\"\"",
            &format!("\"{}\"", "i".repeat(256)),
            "\"a b\"",
            "\"a\\tb\"",
            "[]",
        ] {
            invalid(replacing("image", &format!("image = {bad}")), "image");
        }
    }

    #[test]
    fn command_rules() {
        assert_eq!(
            with("command = [\"sh\", \"-c\", \"x y\"]").unwrap().command,
            ["sh", "-c", "x y"]
        );
        for bad in [
            "command = \"sh -c\"",
            "command = [1]",
            "command = [\"a\\u0000\"]",
            "command = [[\"a\"]]",
            "command = []",
            "command = [\"\"]",
            "command = [\" \", \"x\"]",
        ] {
            invalid(with(bad), "command");
        }
    }

    #[test]
    fn env_rules() {
        let m = with("env = { A = \"1\", _b9 = \"\", PATH = \"/bin:/x y\" }").unwrap();
        assert_eq!(m.env.len(), 3);
        assert_eq!(m.env["PATH"], "/bin:/x y");
        let m = with("[env]\nX = \"y\"").unwrap();
        assert_eq!(m.env["X"], "y");
        for bad in [
            "env = { 1A = \"x\" }",
            "env = { \"A-B\" = \"x\" }",
            "env = { \"\" = \"x\" }",
            "env = { A = 1 }",
            "env = { A = \"\\u0000\" }",
            "env = \"A=1\"",
            "env = { A = { B = \"c\" } }",
        ] {
            let msg = invalid(with(bad), "env");
            assert!(msg.starts_with("invalid `env` = "), "{msg}");
        }
    }

    #[test]
    fn cpu_rules() {
        for (v, want) in [
            ("0.5", 500),
            ("1", 1000),
            ("2", 2000),
            ("0.1", 100),
            ("0.3", 300),
            ("0.01", 10),
            ("0.0101", 11),
            ("1024", 1_024_000),
        ] {
            let m = with(&format!("[resources]\ncpu = {v}")).unwrap();
            assert_eq!(m.resources.cpu_millicores, want, "cpu = {v}");
        }
        for bad in [
            "0", "0.0", "-1", "1024.001", "1025", "nan", "inf", "\"0.5\"", "true", "0.0099",
            "0.0001", "1e-9",
        ] {
            let msg = invalid(with(&format!("[resources]\ncpu = {bad}")), "resources.cpu");
            assert!(msg.contains("cores"), "{msg}");
        }
    }

    #[test]
    fn memory_rules() {
        for (v, want) in [
            ("\"64MiB\"", 64 * MIB),
            ("\"64 MiB\"", 64 * MIB),
            ("\"4MiB\"", 4 * MIB),
            ("\"1GiB\"", 1 << 30),
            ("\"0.5GiB\"", 512 * MIB),
            ("\"4096KiB\"", 4 * MIB),
            ("\"5MB\"", 5_000_000),
            ("\"5000KB\"", 5_000_000),
            ("\"1GB\"", 1_000_000_000),
            ("\"4194304\"", 4 * MIB),
            ("\"4194304B\"", 4 * MIB),
            ("4194304", 4 * MIB),
        ] {
            let m = with(&format!("[resources]\nmemory = {v}")).unwrap();
            assert_eq!(m.resources.memory_bytes, want, "memory = {v}");
        }
        for bad in [
            "\"64Mb\"",
            "\"64mib\"",
            "\"4194303\"",
            "\"3MiB\"",
            "\"\"",
            "\"MiB\"",
            "\"-1MiB\"",
            "\"1.MiB\"",
            "\"1..5MiB\"",
            "\"99999999999999999999GiB\"",
            "\"64 MiB extra\"",
            "-5",
            "1.5",
            "[]",
        ] {
            let msg = invalid(
                with(&format!("[resources]\nmemory = {bad}")),
                "resources.memory",
            );
            assert!(msg.contains("e.g. \"64MiB\""), "{msg}");
        }
        assert!(
            invalid(with("[resources]\nmemory = \"64Mb\""), "resources.memory")
                .starts_with("invalid `resources.memory` = \"64Mb\": expected ")
        );
        assert!(
            invalid(with("[resources]\nmemory = \"1MiB\""), "resources.memory")
                .contains("; got 1 MiB, below the minimum")
        );
    }

    #[test]
    fn pids_rules() {
        for (v, want) in [("1", 1), ("64", 64), ("1000000", 1_000_000)] {
            assert_eq!(
                with(&format!("[resources]\npids = {v}"))
                    .unwrap()
                    .resources
                    .pids,
                want
            );
        }
        for bad in ["0", "-1", "1000001", "1.0", "\"64\"", "99999999999999999"] {
            invalid(
                with(&format!("[resources]\npids = {bad}")),
                "resources.pids",
            );
        }
    }

    #[test]
    fn bandwidth_rules() {
        for (v, want) in [
            ("8mbit", 8_000_000),
            ("8Mbit", 8_000_000),
            ("8 mbit", 8_000_000),
            ("8kbit", 8_000),
            ("1.5mbit", 1_500_000),
            ("1gbit", 1_000_000_000),
            ("9000bit", 9_000),
        ] {
            let m = with(&format!(
                "[network]\nbandwidth_down = \"{v}\"\nbandwidth_up = \"{v}\""
            ))
            .unwrap();
            assert_eq!(m.network.bandwidth_down_bps, Some(want), "{v}");
            assert_eq!(m.network.bandwidth_up_bps, Some(want), "{v}");
        }
        for bad in [
            "\"7kbit\"",
            "\"8000\"",
            "\"8mbps\"",
            "\"8MB\"",
            "\"\"",
            "8000000",
            "\"fast\"",
        ] {
            invalid(
                with(&format!("[network]\nbandwidth_down = {bad}")),
                "network.bandwidth_down",
            );
            invalid(
                with(&format!("[network]\nbandwidth_up = {bad}")),
                "network.bandwidth_up",
            );
        }
    }

    #[test]
    fn ports_rules() {
        let m =
            with("[network]\nports = [\"8080:80\", \"53:53/udp\", \"53:53/tcp\", \"65535:1/tcp\"]")
                .unwrap();
        assert_eq!(
            m.network
                .ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["8080:80/tcp", "53:53/udp", "53:53/tcp", "65535:1/tcp"]
        );
        for bad in [
            "[\"8080\"]",
            "[\"0:80\"]",
            "[\"80:0\"]",
            "[\"65536:80\"]",
            "[\"80:80/sctp\"]",
            "[\"a:80\"]",
            "[\"+80:80\"]",
            "[\"127.0.0.1:80:80\"]",
            "[80]",
            "\"80:80\"",
            "[\"80:80\", \"80:81/tcp\"]",
        ] {
            invalid(with(&format!("[network]\nports = {bad}")), "network.ports");
        }
        let msg = invalid(
            with("[network]\nports = [\"80:80\", \"80:81/tcp\"]"),
            "network.ports",
        );
        assert!(msg.contains("already mapped by \"80:80/tcp\""), "{msg}");
    }

    #[test]
    fn host_network_rules() {
        assert!(
            with("[network]\nhost_network = true")
                .unwrap()
                .network
                .host_network
        );
        assert!(
            !with("[network]\nhost_network = false")
                .unwrap()
                .network
                .host_network
        );
        invalid(
            with("[network]\nhost_network = \"yes\""),
            "network.host_network",
        );
        invalid(
            with("[network]\nhost_network = true\nports = [\"80:80\"]"),
            "network.ports",
        );
        invalid(
            with("[network]\nhost_network = true\nbandwidth_up = \"1mbit\""),
            "network.bandwidth_up",
        );
    }

    #[test]
    fn restart_rules() {
        for (v, want) in [
            ("always", RestartPolicy::Always),
            ("on-failure", RestartPolicy::OnFailure),
            ("never", RestartPolicy::Never),
        ] {
            assert_eq!(
                with(&format!("[restart]\npolicy = \"{v}\""))
                    .unwrap()
                    .restart,
                want
            );
            assert_eq!(want.to_string(), v);
        }
        assert_eq!(with("[restart]").unwrap().restart, RestartPolicy::OnFailure);
        for bad in ["\"on_failure\"", "\"Always\"", "1"] {
            let msg = invalid(
                with(&format!("[restart]\npolicy = {bad}")),
                "restart.policy",
            );
            assert!(msg.contains("\"on-failure\""), "{msg}");
        }
    }

    #[test]
    fn tables_must_be_tables() {
        invalid(with("resources = 1"), "resources");
        invalid(with("network = \"x\""), "network");
        invalid(with("restart = \"always\""), "restart");
    }

    #[test]
    fn unknown_keys_are_named_with_allowed_keys() {
        for (extra, key, allowed) in [
            ("[resource]\ncpu = 1", "resource", TOP_KEYS),
            ("images = \"x\"", "images", TOP_KEYS),
            ("[resources]\ncpus = 1", "resources.cpus", RESOURCES_KEYS),
            (
                "[network]\nbandwidth = \"1mbit\"",
                "network.bandwidth",
                NETWORK_KEYS,
            ),
            (
                "[restart]\npolcy = \"never\"",
                "restart.polcy",
                RESTART_KEYS,
            ),
        ] {
            let e = with(extra).unwrap_err();
            assert_eq!(
                e,
                ManifestError::UnknownKey {
                    key: key.into(),
                    allowed
                }
            );
            assert_eq!(
                e.to_string(),
                format!("unknown key `{key}` (allowed: {allowed})")
            );
        }
        assert_eq!(
            with("[resource]").unwrap_err().to_string(),
            "unknown key `resource` (allowed: name, version, image, command, env, resources, network, restart)"
        );
    }

    #[test]
    fn syntax_errors_carry_the_line() {
        let e = Manifest::from_toml_str("name = \"a\"\nversion = \"1\"\nimage = = \"x\"\n")
            .unwrap_err();
        match &e {
            ManifestError::Syntax { line, message } => {
                assert_eq!(*line, Some(3));
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("chute.toml line 3: "), "{e}");
        let dup = Manifest::from_toml_str("name = \"a\"\nname = \"b\"\n").unwrap_err();
        assert!(
            matches!(dup, ManifestError::Syntax { line: Some(2), .. }),
            "{dup:?}"
        );
        let big = "#".repeat(MAX_MANIFEST_BYTES + 1);
        assert!(matches!(
            Manifest::from_toml_str(&big),
            Err(ManifestError::Syntax { line: None, .. })
        ));
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let msg = invalid(
            with(&format!("[resources]\nmemory = \"{}\"", "9".repeat(10_000))),
            "resources.memory",
        );
        assert!(msg.len() < 600, "{}", msg.len());
    }

    #[test]
    fn unit_helpers_roundtrip() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_bytes("0.1KiB"), Ok(103));
        assert_eq!(parse_bytes("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_bytes("18446744073709551616").is_err());
        assert!(parse_bytes("17179869184GiB").is_err());
        assert_eq!(parse_rate_bps("8mbit"), Ok(8_000_000));
        assert!(parse_rate_bps("8").unwrap_err().contains("missing unit"));
        assert!(parse_bytes("8 parsecs")
            .unwrap_err()
            .contains("unknown unit `parsecs`"));
        assert_eq!(format_bytes(64 * MIB), "64 MiB");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(64 * MIB - 1), "63.99 MiB");
        assert_eq!(format_bytes(100), "100 B");
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(u64::MAX), "16777215.99 TiB");
        assert_eq!(format_rate(8_000_000), "8 mbit");
        assert_eq!(format_rate(2_500_000), "2.50 mbit");
        assert_eq!(format_rate(999), "999 bit");
        assert_eq!(format_cpu(500u32), "0.5 cores");
        assert_eq!(format_cpu(1000u64), "1 core");
        assert_eq!(format_cpu(2250u32), "2.25 cores");
        assert_eq!(format_cpu(1u32), "0.001 cores");
        assert_eq!(format_cpu(0u32), "0 cores");
        // Formatting truncates, so it never overstates (and is within 1%).
        for n in [4 * MIB, 1536, 3 << 30, 12345, 64 * MIB - 1] {
            let back = parse_bytes(&format_bytes(n)).unwrap();
            assert!(back <= n && back >= n - n / 100, "{n} -> {back}");
        }
        for n in [8_000u64, 1_500_000, 2_000_000_000] {
            assert_eq!(parse_rate_bps(&format_rate(n)), Ok(n));
        }
    }

    #[test]
    fn manifest_roundtrips_through_postcard_and_json() {
        let m = Manifest::from_toml_str(FULL_EXAMPLE).unwrap();
        let bytes = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Manifest>(&bytes).unwrap(), m);
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"restart\":\"on-failure\""), "{json}");
        assert_eq!(serde_json::from_str::<Manifest>(&json).unwrap(), m);
    }
}
