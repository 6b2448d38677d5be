//! A small typed client for Podman's libpod REST API (v4.3.1) over its Unix socket.
//!
//! Why not the `podman-api` crate: it drags tokio and hyper 0.14 into a smol agent (a
//! second runtime), adds ~750 KB to the binary, returns untyped stats, and sends the stop
//! timeout as `Timeout=` which libpod ignores. This client runs on whatever executor
//! polls it (smol in chuted), uses hyper 1.x for HTTP/1.1 and serde_json for bodies, and
//! covers only what chuted needs: images (exists, inspect, load, pull), the container
//! lifecycle, listing, events and logs.
//!
//! It deliberately does not pool connections (one per request; see the `http`
//! submodule), retry, or impose timeouts — the caller owns those policies. It never
//! creates a privileged container: every container drops all capabilities and adds back
//! an explicit list. Measured cost: ~330 KB of x86_64 release binary (opt-level z, LTO)
//! for this client and `cgroup` together, on top of smol and serde_json.

mod http;
mod stream;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use serde::{Deserialize, Serialize};

use http::{Exchange, ReqBody};
use stream::Lines;
pub use stream::{EventStream, LogChunk, LogLines, LogSource, LogStream, MAX_LINE, MAX_LOG_FRAME};

/// API prefix: Podman 4.3.1 serves libpod API v4.3.1.
const API: &str = "/v4.3.1/libpod";
/// Largest non-streaming answer read into memory (a `list` of hundreds of containers is
/// well under this).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Errors from talking to Podman. Every variant names the operation and its target.
#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("cannot reach Podman at {}: {source} (is `podman system service` running?)", socket.display())]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {target}: Podman answered {status}: {message}")]
    Api {
        op: &'static str,
        target: String,
        status: u16,
        message: String,
    },
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{op}: cannot decode Podman's answer: {message}")]
    Decode { op: &'static str, message: String },
    #[error("{op}: HTTP exchange with Podman failed: {source}")]
    Http {
        op: &'static str,
        #[source]
        source: hyper::Error,
    },
    #[error("{op}: Podman at {} did not answer within {}s (hung or overloaded?); the call was abandoned", socket.display(), after.as_secs())]
    Timeout {
        op: &'static str,
        socket: PathBuf,
        after: Duration,
    },
    #[error("{op}: Podman's answer exceeds {limit} bytes")]
    TooLarge { op: &'static str, limit: usize },
    #[error("{op}: cannot read {}: {source}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pull {reference}: {message}")]
    Pull { reference: String, message: String },
    #[error("{op} {target}: cannot build the request: {message}")]
    Request {
        op: &'static str,
        target: String,
        message: String,
    },
}

/// What chuted asks Podman to create; turned into libpod's SpecGenerator JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// Empty: the image's default command.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    /// Hard memory cap; swap is capped at the same value, so no swap beyond it.
    pub memory_bytes: u64,
    /// CFS quota and period: a hard CPU cap of `quota / period` cores.
    pub cpu_quota_us: i64,
    pub cpu_period_us: u64,
    pub pids_limit: i64,
    /// `(name, soft, hard)`, names as in `ulimit`: `nofile`, `nproc`, …
    pub ulimits: Vec<(String, u64, u64)>,
    /// Added after dropping ALL capabilities, e.g. `CAP_NET_BIND_SERVICE`.
    pub cap_add: Vec<String>,
    pub no_new_privileges: bool,
    /// `true`: the host's network namespace; `false`: Podman's default bridge.
    pub host_network: bool,
    /// `(host port, container port, "tcp" | "udp")`.
    pub ports: Vec<(u16, u16, String)>,
    /// Address the host ports bind to; `None`: every interface.
    pub host_ip: Option<String>,
    /// Own user namespace mapping container ids 0.. to host ids `(first, size)`;
    /// `None`: the host's.
    pub userns: Option<(u32, u32)>,
    /// e.g. `runc`; `None` uses Podman's default.
    pub oci_runtime: Option<String>,
    pub stop_timeout_secs: u32,
    /// libpod `cgroup_parent`; `None` uses Podman's default.
    pub cgroup_parent: Option<String>,
}

/// The parts of `podman inspect` chuted uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub name: String,
    pub running: bool,
    /// libpod's state: `created`, `running`, `exited`, `stopped`, …
    pub status: String,
    /// 0 if not running.
    pub pid: u32,
    pub exit_code: i32,
    pub started_at: String,
    /// `started_at` in nanoseconds since the Unix epoch, if it parsed.
    pub started_at_nanos: Option<i64>,
    pub finished_at: String,
    pub labels: BTreeMap<String, String>,
    /// The image reference the container was created from.
    pub image: String,
    /// The image's id (sha256 hex).
    pub image_id: String,
    /// Path of the network namespace (`NetworkSettings.SandboxKey`), if it has its own.
    pub sandbox_key: Option<String>,
    pub restart_count: u32,
    /// The kernel's OOM killer ended the container.
    pub oom_killed: bool,
}

/// One row of `podman ps -a`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub name: String,
    pub running: bool,
    pub state: String,
    pub exit_code: i32,
    pub pid: u32,
    pub labels: BTreeMap<String, String>,
}

/// A container event (`start`, `died`, `stop`, `remove`, `create`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerEvent {
    pub container_id: String,
    pub name: String,
    pub action: String,
    /// Set on `died` events.
    pub exit_code: Option<i32>,
    /// The container's labels (the event's attributes minus image, name and exit code).
    pub labels: BTreeMap<String, String>,
    pub time_nanos: i64,
}

/// How long a libpod call may take before it is abandoned (a hung Podman must not hang
/// the agent): the default, and for image loads and pulls, which move whole archives.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IMAGE_TIMEOUT: Duration = Duration::from_secs(600);

/// Handle on a Podman service socket. Cheap to clone; holds no connection.
#[derive(Debug, Clone)]
pub struct Podman {
    socket: PathBuf,
    /// Deadline of every call; stop and restart add their own stop timeout to it.
    timeout: Duration,
    /// Deadline of image loads and pulls.
    image_timeout: Duration,
}

impl Podman {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Podman {
            socket: socket.into(),
            timeout: DEFAULT_CALL_TIMEOUT,
            image_timeout: DEFAULT_IMAGE_TIMEOUT,
        }
    }

    /// Sets the deadlines of calls and of image loads/pulls. Streams (events, logs) are
    /// bounded only until their response head arrives; they are meant to stay open.
    #[must_use]
    pub fn with_timeouts(mut self, call: Duration, image: Duration) -> Self {
        self.timeout = call;
        self.image_timeout = image;
        self
    }

    /// Runs one libpod call under a deadline. On expiry the call's future is dropped,
    /// which closes its connection; what Podman did meanwhile is found by the next
    /// `inspect` or `list` (the caller's resync), never assumed.
    async fn within<T>(
        &self,
        op: &'static str,
        limit: Duration,
        call: impl Future<Output = Result<T, PodmanError>>,
    ) -> Result<T, PodmanError> {
        crate::timeout::with_timeout(limit, call)
            .await
            .unwrap_or_else(|| {
                Err(PodmanError::Timeout {
                    op,
                    socket: self.socket.clone(),
                    after: limit,
                })
            })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Podman's version, e.g. `4.3.1`.
    pub async fn version(&self) -> Result<String, PodmanError> {
        self.within("version", self.timeout, async {
            #[derive(Deserialize)]
            struct V {
                #[serde(rename = "Version")]
                version: String,
            }
            let op = "version";
            let body = self.simple(op, "podman", Method::GET, "/version").await?;
            Ok(decode::<V>(op, &body)?.version)
        })
        .await
    }

    pub async fn image_exists(&self, reference: &str) -> Result<bool, PodmanError> {
        self.within("check image", self.timeout, async {
            let op = "check image";
            let path = format!("/images/{}/exists", enc_path(reference));
            let ex = self
                .send(op, Method::GET, &path, ReqBody::Empty, None)
                .await?;
            match ex.status {
                StatusCode::NO_CONTENT | StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(api_error(op, format!("image {reference}"), ex).await),
            }
        })
        .await
    }

    /// The image's id (sha256 hex, without the `sha256:` prefix).
    pub async fn image_id(&self, reference: &str) -> Result<String, PodmanError> {
        self.within("inspect image", self.timeout, async {
            #[derive(Deserialize)]
            struct I {
                #[serde(rename = "Id")]
                id: String,
            }
            let op = "inspect image";
            let path = format!("/images/{}/json", enc_path(reference));
            let body = self
                .simple(op, &format!("image {reference}"), Method::GET, &path)
                .await?;
            let id = decode::<I>(op, &body)?.id;
            Ok(id.strip_prefix("sha256:").unwrap_or(&id).to_owned())
        })
        .await
    }

    /// Loads a `docker-archive` or `oci-archive` tarball, streaming it from disk. Returns
    /// the names of the loaded images.
    pub async fn image_load(&self, archive: &Path) -> Result<Vec<String>, PodmanError> {
        self.within("load image", self.image_timeout, async {
            #[derive(Deserialize)]
            struct L {
                #[serde(rename = "Names", default)]
                names: Vec<String>,
            }
            let op = "load image";
            let file_err = |source| PodmanError::File {
                op,
                path: archive.to_path_buf(),
                source,
            };
            let file = smol::fs::File::open(archive).await.map_err(file_err)?;
            let len = file.metadata().await.map_err(file_err)?.len();
            let ex = self
                .send(
                    op,
                    Method::POST,
                    "/images/load",
                    ReqBody::file(file, len),
                    Some("application/x-tar"),
                )
                .await?;
            let target = format!("from {}", archive.display());
            let body = expect_ok(op, target, ex, &[StatusCode::OK]).await?;
            Ok(decode::<L>(op, &body)?.names)
        })
        .await
    }

    /// Pulls an image. libpod answers 200 at once and reports failure inside the
    /// progress stream, which is read to its end.
    pub async fn image_pull(&self, reference: &str) -> Result<(), PodmanError> {
        self.within("pull image", self.image_timeout, async {
            #[derive(Deserialize)]
            struct P {
                #[serde(default)]
                error: Option<String>,
            }
            let op = "pull image";
            let path = format!("/images/pull?reference={}", enc_query(reference));
            let ex = self
                .send(op, Method::POST, &path, ReqBody::Empty, None)
                .await?;
            if ex.status != StatusCode::OK {
                return Err(api_error(op, format!("image {reference}"), ex).await);
            }
            let mut lines = Lines::new(ex, MAX_LINE);
            while let Some(line) = lines.next_line().await {
                let line = line?;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                if let Some(message) = decode::<P>(op, &line)?.error.filter(|e| !e.is_empty()) {
                    return Err(PodmanError::Pull {
                        reference: reference.to_owned(),
                        message,
                    });
                }
            }
            Ok(())
        })
        .await
    }

    /// Creates a container; returns its id.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<String, PodmanError> {
        self.within("create container", self.timeout, async {
            #[derive(Deserialize)]
            struct C {
                #[serde(rename = "Id")]
                id: String,
            }
            let op = "create container";
            let target = format!("container {}", spec.name);
            let json = serde_json::to_vec(&SpecGenerator::from(spec)).map_err(|e| {
                PodmanError::Request {
                    op,
                    target: target.clone(),
                    message: e.to_string(),
                }
            })?;
            let ex = self
                .send(
                    op,
                    Method::POST,
                    "/containers/create",
                    ReqBody::Bytes(Some(json.into())),
                    Some("application/json"),
                )
                .await?;
            let body = expect_ok(op, target, ex, &[StatusCode::CREATED, StatusCode::OK]).await?;
            Ok(decode::<C>(op, &body)?.id)
        })
        .await
    }

    /// Starts a container; already running is success.
    pub async fn start(&self, id: &str) -> Result<(), PodmanError> {
        self.within("start", self.timeout, async {
            let path = format!("/containers/{}/start", enc_path(id));
            self.action("start", id, &path, &[StatusCode::NOT_MODIFIED])
                .await
        })
        .await
    }

    /// Stops a container: SIGTERM (or its stop signal), then SIGKILL after
    /// `timeout_secs`. Already stopped is success.
    pub async fn stop(&self, id: &str, timeout_secs: u32) -> Result<(), PodmanError> {
        self.within(
            "stop",
            self.timeout + Duration::from_secs(timeout_secs.into()),
            async {
                // libpod reads lowercase `timeout`; `Timeout` (podman-api's spelling) is ignored.
                let path = format!("/containers/{}/stop?timeout={timeout_secs}", enc_path(id));
                self.action("stop", id, &path, &[StatusCode::NOT_MODIFIED])
                    .await
            },
        )
        .await
    }

    /// Restarts a container, waiting at most `timeout_secs` for it to stop.
    pub async fn restart(&self, id: &str, timeout_secs: u32) -> Result<(), PodmanError> {
        self.within(
            "restart",
            self.timeout + Duration::from_secs(timeout_secs.into()),
            async {
                // libpod 4.3.1 reads `timeout` here too; it ignores `t` and kills at once
                // (measured: t=2 took 0.55 s, timeout=2 took 2.7 s with a SIGTERM-deaf chute).
                let path = format!(
                    "/containers/{}/restart?timeout={timeout_secs}",
                    enc_path(id)
                );
                self.action("restart", id, &path, &[]).await
            },
        )
        .await
    }

    /// Removes a container and its anonymous volumes; already gone is success.
    pub async fn remove(&self, id: &str, force: bool) -> Result<(), PodmanError> {
        self.within("remove", self.timeout, async {
            #[derive(Deserialize)]
            struct R {
                #[serde(rename = "Err", default)]
                err: Option<String>,
            }
            let op = "remove";
            let path = format!("/containers/{}?force={force}&v=true", enc_path(id));
            let ex = self
                .send(op, Method::DELETE, &path, ReqBody::Empty, None)
                .await?;
            let target = format!("container {id}");
            match ex.status {
                StatusCode::NOT_FOUND => Ok(()),
                StatusCode::OK => {
                    let body = ex.collect(MAX_BODY).await?;
                    // libpod answers 200 with per-container reports that may carry an error.
                    let reports: Vec<R> = decode(op, &body)?;
                    match reports
                        .into_iter()
                        .find_map(|r| r.err.filter(|e| !e.is_empty()))
                    {
                        Some(message) => Err(PodmanError::Api {
                            op,
                            target,
                            status: 200,
                            message,
                        }),
                        None => Ok(()),
                    }
                }
                StatusCode::NO_CONTENT => Ok(()),
                _ => Err(api_error(op, target, ex).await),
            }
        })
        .await
    }

    /// Sends `signal` (e.g. `SIGKILL`, `TERM`, `9`) to the container's main process.
    pub async fn kill(&self, id: &str, signal: &str) -> Result<(), PodmanError> {
        self.within("kill", self.timeout, async {
            let path = format!(
                "/containers/{}/kill?signal={}",
                enc_path(id),
                enc_query(signal)
            );
            self.action("kill", id, &path, &[]).await
        })
        .await
    }

    pub async fn inspect(&self, id_or_name: &str) -> Result<ContainerInfo, PodmanError> {
        self.within("inspect", self.timeout, async {
            let op = "inspect";
            let path = format!("/containers/{}/json", enc_path(id_or_name));
            let body = self
                .simple(op, &format!("container {id_or_name}"), Method::GET, &path)
                .await?;
            Ok(decode::<RawInspect>(op, &body)?.into())
        })
        .await
    }

    /// All containers (running or not) carrying `label` (`key=value` or `key`).
    pub async fn list(&self, label: &str) -> Result<Vec<ContainerSummary>, PodmanError> {
        self.within("list containers", self.timeout, async {
            let op = "list containers";
            let filters = label_filters(label, false);
            // sync=true: without it libpod answers from its database, which still says
            // "running" for a container whose process was killed moments ago.
            let path = format!(
                "/containers/json?all=true&sync=true&filters={}",
                enc_query(&filters)
            );
            let body = self
                .simple(op, &format!("labelled {label}"), Method::GET, &path)
                .await?;
            let rows: Vec<RawSummary> = decode(op, &body)?;
            Ok(rows.into_iter().map(Into::into).collect())
        })
        .await
    }

    /// Live container events for containers carrying `label`, from now on.
    pub async fn events(&self, label: &str) -> Result<EventStream, PodmanError> {
        let op = "events";
        let filters = label_filters(label, true);
        let path = format!("/events?stream=true&filters={}", enc_query(&filters));
        let head = self.send(op, Method::GET, &path, ReqBody::Empty, None);
        let ex = self.within(op, self.timeout, head).await?;
        if ex.status != StatusCode::OK {
            return Err(api_error(op, format!("labelled {label}"), ex).await);
        }
        Ok(EventStream {
            lines: Lines::new(ex, MAX_LINE),
        })
    }

    /// The container's stdout and stderr; `follow` keeps the stream open for new output,
    /// `tail` limits how many past lines are sent first.
    pub async fn logs(
        &self,
        id: &str,
        follow: bool,
        tail: Option<u32>,
    ) -> Result<LogStream, PodmanError> {
        let op = "logs";
        let mut path = format!(
            "/containers/{}/logs?stdout=true&stderr=true&follow={follow}",
            enc_path(id)
        );
        if let Some(n) = tail {
            path.push_str(&format!("&tail={n}"));
        }
        let head = self.send(op, Method::GET, &path, ReqBody::Empty, None);
        let ex = self.within(op, self.timeout, head).await?;
        if ex.status != StatusCode::OK {
            return Err(api_error(op, format!("container {id}"), ex).await);
        }
        Ok(LogStream {
            ex,
            buf: Vec::new(),
            done: false,
        })
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: ReqBody,
        content_type: Option<&str>,
    ) -> Result<Exchange, PodmanError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{API}{path}"))
            .header(HOST, "d");
        if let Some(ct) = content_type {
            req = req.header(CONTENT_TYPE, ct);
        }
        if let Some(len) = hyper::body::Body::size_hint(&body).exact() {
            if len > 0 {
                req = req.header(CONTENT_LENGTH, len);
            }
        }
        let req = req.body(body).map_err(|e| PodmanError::Request {
            op,
            target: path.to_owned(),
            message: e.to_string(),
        })?;
        let ex = http::send(&self.socket, op, req).await?;
        tracing::trace!(op, path, status = ex.status.as_u16(), "libpod");
        Ok(ex)
    }

    /// GET-style call expecting 200 and a small body.
    async fn simple(
        &self,
        op: &'static str,
        target: &str,
        method: Method,
        path: &str,
    ) -> Result<Vec<u8>, PodmanError> {
        let ex = self.send(op, method, path, ReqBody::Empty, None).await?;
        expect_ok(op, target.to_owned(), ex, &[StatusCode::OK]).await
    }

    /// POST to a container action expecting 204 (or one of `also_ok`).
    async fn action(
        &self,
        op: &'static str,
        id: &str,
        path: &str,
        also_ok: &[StatusCode],
    ) -> Result<(), PodmanError> {
        let ex = self
            .send(op, Method::POST, path, ReqBody::Empty, None)
            .await?;
        if ex.status == StatusCode::NO_CONTENT
            || ex.status == StatusCode::OK
            || also_ok.contains(&ex.status)
        {
            return Ok(());
        }
        Err(api_error(op, format!("container {id}"), ex).await)
    }
}

/// Reads the body if the status is one of `ok`, else turns the answer into an error.
async fn expect_ok(
    op: &'static str,
    target: String,
    ex: Exchange,
    ok: &[StatusCode],
) -> Result<Vec<u8>, PodmanError> {
    if ok.contains(&ex.status) {
        ex.collect(MAX_BODY).await
    } else {
        Err(api_error(op, target, ex).await)
    }
}

/// libpod's error body is `{"cause": .., "message": .., "response": status}`.
async fn api_error(op: &'static str, target: String, ex: Exchange) -> PodmanError {
    let status = ex.status;
    if status == StatusCode::NOT_FOUND {
        return PodmanError::NotFound { what: target };
    }
    let message = match ex.collect(64 * 1024).await {
        Ok(body) => error_message(&body),
        Err(e) => format!("(error body unreadable: {e})"),
    };
    PodmanError::Api {
        op,
        target,
        status: status.as_u16(),
        message,
    }
}

fn error_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        message: String,
        #[serde(default)]
        cause: String,
    }
    match serde_json::from_slice::<E>(body) {
        Ok(e) if !e.message.is_empty() => e.message,
        Ok(e) if !e.cause.is_empty() => e.cause,
        _ => String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(512)
            .collect(),
    }
}

fn decode<T: serde::de::DeserializeOwned>(op: &'static str, body: &[u8]) -> Result<T, PodmanError> {
    serde_json::from_slice(body).map_err(|e| PodmanError::Decode {
        op,
        message: e.to_string(),
    })
}

/// `{"label":[label]}`, plus `"type":["container"]` for events.
fn label_filters(label: &str, containers_only: bool) -> String {
    let mut f: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    f.insert("label", vec![label]);
    if containers_only {
        f.insert("type", vec!["container"]);
    }
    // A map of strings always serialises.
    serde_json::to_string(&f).unwrap_or_default()
}

fn enc(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path segment; `/`, `:` and `@` stay, since libpod's routes take
/// image references such as `localhost/app:1` or `app@sha256:…` verbatim.
fn enc_path(s: &str) -> String {
    enc(s, b"/:@")
}

fn enc_query(s: &str) -> String {
    enc(s, b"")
}

// ---- libpod JSON shapes ----

#[derive(Serialize)]
struct SpecGenerator<'a> {
    name: &'a str,
    image: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    command: &'a [String],
    env: &'a BTreeMap<String, String>,
    labels: &'a BTreeMap<String, String>,
    resource_limits: ResourceLimits,
    r_limits: Vec<Rlimit<'a>>,
    cap_drop: [&'static str; 1],
    cap_add: &'a [String],
    no_new_privileges: bool,
    netns: Namespace,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    portmappings: Vec<PortMapping<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oci_runtime: Option<&'a str>,
    stop_timeout: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup_parent: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    userns: Option<Namespace>,
    #[serde(skip_serializing_if = "Option::is_none")]
    idmappings: Option<IdMappings>,
}

/// libpod's `storage.IDMappingOptions` (Go field names, no json tags upstream).
#[derive(Serialize)]
struct IdMappings {
    #[serde(rename = "UIDMap")]
    uid_map: [IdMap; 1],
    #[serde(rename = "GIDMap")]
    gid_map: [IdMap; 1],
}

#[derive(Serialize, Clone, Copy)]
struct IdMap {
    container_id: u32,
    host_id: u32,
    size: u32,
}

#[derive(Serialize)]
struct ResourceLimits {
    memory: MemoryLimits,
    cpu: CpuLimits,
    pids: PidsLimits,
}

#[derive(Serialize)]
struct MemoryLimits {
    limit: u64,
    /// OCI `swap` is memory + swap: equal to `limit` means no swap at all.
    swap: u64,
}

#[derive(Serialize)]
struct CpuLimits {
    quota: i64,
    period: u64,
}

#[derive(Serialize)]
struct PidsLimits {
    limit: i64,
}

#[derive(Serialize)]
struct Rlimit<'a> {
    /// libpod prefixes `RLIMIT_` and upper-cases it.
    #[serde(rename = "type")]
    kind: &'a str,
    soft: u64,
    hard: u64,
}

#[derive(Serialize)]
struct Namespace {
    nsmode: &'static str,
}

#[derive(Serialize)]
struct PortMapping<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    host_ip: Option<&'a str>,
    host_port: u16,
    container_port: u16,
    protocol: &'a str,
}

impl<'a> From<&'a ContainerSpec> for SpecGenerator<'a> {
    fn from(s: &'a ContainerSpec) -> Self {
        SpecGenerator {
            name: &s.name,
            image: &s.image,
            command: &s.command,
            env: &s.env,
            labels: &s.labels,
            resource_limits: ResourceLimits {
                memory: MemoryLimits {
                    limit: s.memory_bytes,
                    swap: s.memory_bytes,
                },
                cpu: CpuLimits {
                    quota: s.cpu_quota_us,
                    period: s.cpu_period_us,
                },
                pids: PidsLimits {
                    limit: s.pids_limit,
                },
            },
            r_limits: s
                .ulimits
                .iter()
                .map(|(kind, soft, hard)| Rlimit {
                    kind,
                    soft: *soft,
                    hard: *hard,
                })
                .collect(),
            cap_drop: ["ALL"],
            cap_add: &s.cap_add,
            no_new_privileges: s.no_new_privileges,
            netns: Namespace {
                nsmode: if s.host_network { "host" } else { "bridge" },
            },
            portmappings: s
                .ports
                .iter()
                .map(|(host, container, proto)| PortMapping {
                    host_ip: s.host_ip.as_deref(),
                    host_port: *host,
                    container_port: *container,
                    protocol: proto,
                })
                .collect(),
            oci_runtime: s.oci_runtime.as_deref(),
            stop_timeout: s.stop_timeout_secs,
            cgroup_parent: s.cgroup_parent.as_deref(),
            userns: s.userns.map(|_| Namespace { nsmode: "private" }),
            idmappings: s.userns.map(|(host_id, size)| {
                let m = IdMap {
                    container_id: 0,
                    host_id,
                    size,
                };
                IdMappings {
                    uid_map: [m],
                    gid_map: [m],
                }
            }),
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawInspect {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    image_name: String,
    #[serde(default)]
    restart_count: u32,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    config: RawConfig,
    #[serde(default)]
    network_settings: RawNetwork,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawState {
    #[serde(default)]
    status: String,
    #[serde(default)]
    running: bool,
    #[serde(default)]
    pid: i64,
    #[serde(default)]
    exit_code: i32,
    #[serde(default, rename = "OOMKilled")]
    oom_killed: bool,
    #[serde(default)]
    started_at: String,
    #[serde(default)]
    finished_at: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RawNetwork {
    #[serde(default)]
    sandbox_key: String,
}

impl From<RawInspect> for ContainerInfo {
    fn from(r: RawInspect) -> Self {
        ContainerInfo {
            id: r.id,
            name: r.name,
            running: r.state.running,
            status: r.state.status,
            pid: if r.state.running {
                u32::try_from(r.state.pid).unwrap_or(0)
            } else {
                0
            },
            exit_code: r.state.exit_code,
            started_at_nanos: rfc3339_nanos(&r.state.started_at),
            started_at: r.state.started_at,
            finished_at: r.state.finished_at,
            labels: r.config.labels.unwrap_or_default(),
            image: r.image_name,
            image_id: r.image,
            sandbox_key: Some(r.network_settings.sandbox_key).filter(|k| !k.is_empty()),
            restart_count: r.restart_count,
            oom_killed: r.state.oom_killed,
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawSummary {
    id: String,
    #[serde(default)]
    names: Vec<String>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    exit_code: i32,
    #[serde(default)]
    pid: i64,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

impl From<RawSummary> for ContainerSummary {
    fn from(r: RawSummary) -> Self {
        ContainerSummary {
            id: r.id,
            name: r.names.into_iter().next().unwrap_or_default(),
            running: r.state == "running",
            state: r.state,
            exit_code: r.exit_code,
            pid: u32::try_from(r.pid).unwrap_or(0),
            labels: r.labels.unwrap_or_default(),
        }
    }
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(rename = "Action", default)]
    action: String,
    #[serde(default)]
    status: String,
    #[serde(rename = "Actor", default)]
    actor: RawActor,
    #[serde(default)]
    id: String,
    #[serde(rename = "timeNano", default)]
    time_nano: i64,
    #[serde(default)]
    time: i64,
}

#[derive(Deserialize, Default)]
struct RawActor {
    #[serde(rename = "ID", default)]
    id: String,
    #[serde(rename = "Attributes", default)]
    attributes: Option<BTreeMap<String, String>>,
}

/// Parses one events line; `Ok(None)` for events that are not about a container.
fn parse_event(line: &[u8]) -> Result<Option<ContainerEvent>, String> {
    let raw: RawEvent = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if raw.kind != "container" {
        return Ok(None);
    }
    let mut labels = raw.actor.attributes.unwrap_or_default();
    let name = labels.remove("name").unwrap_or_default();
    let exit_code = labels
        .remove("containerExitCode")
        .and_then(|c| c.parse().ok());
    labels.remove("image");
    labels.remove("podId");
    Ok(Some(ContainerEvent {
        container_id: if raw.actor.id.is_empty() {
            raw.id
        } else {
            raw.actor.id
        },
        name,
        action: if raw.action.is_empty() {
            raw.status
        } else {
            raw.action
        },
        exit_code,
        labels,
        time_nanos: if raw.time_nano != 0 {
            raw.time_nano
        } else {
            raw.time.saturating_mul(1_000_000_000)
        },
    }))
}

/// Parses Go's RFC 3339 timestamps (`2026-11-23T16:06:38.92921819Z`, or with a `+hh:mm`
/// offset) into nanoseconds since the Unix epoch; `None` for anything else, including
/// libpod's zero time for a container never started.
pub fn rfc3339_nanos(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
        if end == start || end - start > 9 {
            return None;
        }
        nanos = num(start..end)? * 10i64.pow(9 - (end - start) as u32);
        i = end;
    }
    let offset_secs = match b.get(i..)? {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let secs = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    // Days from the civil date (Howard Hinnant's algorithm), March-based years.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Podman that accepts connections and never answers (a SIGSTOPped service looks
    /// like this: the kernel completes the connect, nobody reads).
    fn hung_podman() -> (tempfile::TempDir, std::os::unix::net::UnixListener, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let sock = dir.path().join("podman.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        (dir, listener, sock)
    }

    #[test]
    fn a_hung_podman_makes_calls_fail_at_their_deadline_not_hang() {
        let (_dir, _listener, sock) = hung_podman();
        let short = Duration::from_millis(300);
        let podman = Podman::new(&sock).with_timeouts(short, short * 2);
        smol::block_on(async {
            let t = std::time::Instant::now();
            let err = podman.version().await.expect_err("hung podman answered");
            let took = t.elapsed();
            assert!(
                matches!(err, PodmanError::Timeout { op: "version", .. }),
                "{err}"
            );
            assert!(took >= short && took < short * 4, "took {took:?}");
            assert!(err.to_string().contains("did not answer within"), "{err}");

            // stop waits for the stop timeout on top of the call deadline.
            let t = std::time::Instant::now();
            let err = podman
                .stop("abc", 1)
                .await
                .expect_err("hung podman stopped");
            assert!(
                matches!(err, PodmanError::Timeout { op: "stop", .. }),
                "{err}"
            );
            assert!(
                t.elapsed() >= short + Duration::from_secs(1),
                "{:?}",
                t.elapsed()
            );

            // Streams are bounded until their head arrives.
            let err = podman
                .events("a=b")
                .await
                .err()
                .expect("hung events answered");
            assert!(
                matches!(err, PodmanError::Timeout { op: "events", .. }),
                "{err}"
            );
        });
    }

    #[test]
    fn rfc3339_timestamps_parse_to_unix_nanos() {
        assert_eq!(rfc3339_nanos("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_nanos("2026-11-23T16:06:38.92921819Z"),
            Some(1_795_449_998_929_218_190)
        );
        assert_eq!(
            rfc3339_nanos("2026-11-23T17:06:38.929218190+01:00"),
            Some(1_795_449_998_929_218_190)
        );
        assert_eq!(
            rfc3339_nanos("2000-02-29T12:00:00Z"),
            Some(951_825_600_000_000_000)
        );
        for bad in [
            "",
            "0001-01-01T00:00:00Z",
            "2026-11-23 16:06:38Z",
            "2026-13-01T00:00:00Z",
            "2026-11-23T16:06:38.Z",
            "2026-11-23T16:06:38.1234567891Z",
            "2026-11-23T16:06:38",
            "2026-11-23T16:06:38+0100",
        ] {
            assert_eq!(rfc3339_nanos(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn spec_caps_swap_at_memory_and_never_privileged() {
        let spec = ContainerSpec {
            name: "chute-a".into(),
            image: "localhost/a:1".into(),
            memory_bytes: 64 << 20,
            cpu_quota_us: 50_000,
            cpu_period_us: 100_000,
            pids_limit: 64,
            ulimits: vec![("nofile".into(), 1024, 1024)],
            cap_add: vec!["CAP_NET_BIND_SERVICE".into()],
            no_new_privileges: true,
            ports: vec![(8080, 80, "tcp".into())],
            host_ip: Some("127.0.0.1".into()),
            oci_runtime: Some("runc".into()),
            stop_timeout_secs: 7,
            cgroup_parent: Some("/chuted/chutes".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(SpecGenerator::from(&spec)).expect("serialisable");
        assert_eq!(v["resource_limits"]["memory"]["limit"], 64 << 20);
        assert_eq!(v["resource_limits"]["memory"]["swap"], 64 << 20);
        assert_eq!(v["resource_limits"]["cpu"]["quota"], 50_000);
        assert_eq!(v["resource_limits"]["cpu"]["period"], 100_000);
        assert_eq!(v["resource_limits"]["pids"]["limit"], 64);
        assert_eq!(v["r_limits"][0]["type"], "nofile");
        assert_eq!(v["cap_drop"][0], "ALL");
        assert_eq!(v["cap_add"][0], "CAP_NET_BIND_SERVICE");
        assert_eq!(v["netns"]["nsmode"], "bridge");
        assert_eq!(v["portmappings"][0]["host_port"], 8080);
        assert_eq!(v["portmappings"][0]["host_ip"], "127.0.0.1");
        assert_eq!(v["oci_runtime"], "runc");
        assert_eq!(v["stop_timeout"], 7);
        assert_eq!(v["cgroup_parent"], "/chuted/chutes");
        assert!(v.get("privileged").is_none());
        assert!(
            v.get("command").is_none(),
            "empty command keeps the image's"
        );
    }

    #[test]
    fn died_event_carries_exit_code_and_labels() {
        let line = br#"{"status":"died","id":"abc","from":"localhost/a:1","Type":"container","Action":"died","Actor":{"ID":"abc","Attributes":{"containerExitCode":"3","image":"localhost/a:1","name":"chute-a","chuted.managed":"true"}},"scope":"local","time":1700000000,"timeNano":1700000000123456789}"#;
        let ev = parse_event(line).expect("valid").expect("container event");
        assert_eq!(ev.container_id, "abc");
        assert_eq!(ev.name, "chute-a");
        assert_eq!(ev.action, "died");
        assert_eq!(ev.exit_code, Some(3));
        assert_eq!(ev.time_nanos, 1_700_000_000_123_456_789);
        assert_eq!(
            ev.labels,
            BTreeMap::from([("chuted.managed".to_owned(), "true".to_owned())])
        );
        let image_ev = br#"{"Type":"image","Action":"pull","Actor":{"ID":"x"}}"#;
        assert_eq!(parse_event(image_ev), Ok(None));
    }

    #[test]
    fn log_frames_demux_and_reject_oversized() {
        let mut buf = vec![1, 0, 0, 0, 0, 0, 0, 3];
        buf.extend_from_slice(b"hi\n");
        buf.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 4]);
        buf.extend_from_slice(b"err");
        let (c, used) = stream::parse_log_frame(&buf)
            .expect("ok")
            .expect("complete");
        assert_eq!(c.stream, LogSource::Stdout);
        assert_eq!(c.data, b"hi\n");
        assert_eq!(used, 11);
        // The stderr frame announces 4 bytes but only 3 arrived so far.
        assert_eq!(stream::parse_log_frame(&buf[used..]), Ok(None));
        let huge = [1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(stream::parse_log_frame(&huge).is_err());
    }

    #[test]
    fn log_lines_keep_stdout_and_stderr_apart_and_cut_long_lines() {
        let chunk = |stream, data: &[u8]| LogChunk {
            stream,
            data: data.to_vec(),
        };
        let mut lines = LogLines::new(4);
        let mut got = Vec::new();
        let mut out = |s: LogSource, l: &str| got.push(format!("{}:{l}", s.name()));
        // A partial stdout line, then a whole stderr one, then the rest of stdout's.
        lines.feed(&chunk(LogSource::Stdout, b"ab"), &mut out);
        lines.feed(&chunk(LogSource::Stderr, b"e1\nxyz"), &mut out);
        lines.feed(&chunk(LogSource::Stdout, b"c\n123456"), &mut out);
        lines.finish(&mut out);
        assert_eq!(
            got,
            [
                "stderr:e1",
                "stdout:abc",
                "stdout:1234",
                "stdout:56",
                "stderr:xyz"
            ]
        );
    }

    #[test]
    fn error_message_prefers_libpod_message() {
        let body = br#"{"cause":"no such container","message":"no container with name or ID \"x\" found: no such container","response":404}"#;
        assert!(error_message(body).starts_with("no container with name"));
        assert_eq!(error_message(b"plain text\n"), "plain text");
    }

    #[test]
    fn encoding_keeps_image_references_routable() {
        assert_eq!(enc_path("localhost/app:1"), "localhost/app:1");
        assert_eq!(enc_query("a=b"), "a%3Db");
        assert_eq!(
            enc_query(&label_filters("chuted.managed=true", false)),
            "%7B%22label%22%3A%5B%22chuted.managed%3Dtrue%22%5D%7D"
        );
    }

    /// A one-shot fake libpod: answers the first request on `socket` with `response`
    /// (written in `piece`-byte writes to exercise reassembly) and returns the request
    /// head. Stops writing once the client hangs up.
    fn fake_server_in(
        socket: &Path,
        response: Vec<u8>,
        piece: usize,
    ) -> std::thread::JoinHandle<String> {
        use std::io::{Read, Write};
        let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind");
        std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).expect("read request");
                head.push(byte[0]);
            }
            for piece in response.chunks(piece) {
                if conn.write_all(piece).is_err() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            String::from_utf8_lossy(&head).into_owned()
        })
    }

    fn fake_server(socket: &Path, response: Vec<u8>) -> std::thread::JoinHandle<String> {
        fake_server_in(socket, response, 7)
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        let mut out =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                .to_vec();
        for part in body.chunks(13) {
            out.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
            out.extend_from_slice(part);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn event_stream_survives_a_bad_line_and_splits_across_chunks() {
        use futures_lite::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake.sock");
        let body = concat!(
            r#"{"Type":"container","Action":"start","Actor":{"ID":"c1","Attributes":{"name":"a"}},"timeNano":5}"#,
            "\n\nnot json\n",
            r#"{"Type":"image","Action":"pull","Actor":{"ID":"i"}}"#,
            "\n",
            r#"{"Type":"container","Action":"died","Actor":{"ID":"c1","Attributes":{"containerExitCode":"1"}},"timeNano":6}"#,
        );
        let server = fake_server(&socket, chunked(body.as_bytes()));
        let podman = Podman::new(&socket);
        let got: Vec<_> = smol::block_on(async {
            podman
                .events("chuted.managed=true")
                .await
                .expect("events")
                .collect()
                .await
        });
        let head = server.join().expect("server");
        assert!(
            head.starts_with("GET /v4.3.1/libpod/events?stream=true&filters=%7B%22label%22%3A%5B%22chuted.managed%3Dtrue%22%5D%2C%22type%22%3A%5B%22container%22%5D%7D HTTP/1.1"),
            "{head}"
        );
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0].as_ref().expect("start").action, "start");
        assert!(matches!(got[1], Err(PodmanError::Decode { .. })));
        let died = got[2].as_ref().expect("died");
        assert_eq!((died.action.as_str(), died.exit_code), ("died", Some(1)));
    }

    #[test]
    fn over_long_event_line_ends_the_stream() {
        use futures_lite::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake.sock");
        let body = vec![b'x'; MAX_LINE + 100];
        let server = fake_server_in(&socket, chunked(&body), 4096);
        let podman = Podman::new(&socket);
        let got: Vec<_> =
            smol::block_on(async { podman.events("a=b").await.expect("events").collect().await });
        server.join().expect("server");
        assert_eq!(got.len(), 1);
        assert!(matches!(got[0], Err(PodmanError::Decode { .. })));
    }

    #[test]
    fn stop_and_restart_send_the_timeout_libpod_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake.sock");
        let no_content = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        let podman = Podman::new(&socket);
        let server = fake_server(&socket, no_content.clone());
        smol::block_on(podman.stop("chute-a", 7)).expect("stop");
        let head = server.join().expect("server");
        assert!(
            head.starts_with("POST /v4.3.1/libpod/containers/chute-a/stop?timeout=7 HTTP/1.1"),
            "{head}"
        );
        std::fs::remove_file(&socket).expect("rm socket");
        let server = fake_server(&socket, no_content);
        smol::block_on(podman.restart("chute-a", 3)).expect("restart");
        let head = server.join().expect("server");
        assert!(
            head.starts_with("POST /v4.3.1/libpod/containers/chute-a/restart?timeout=3 HTTP/1.1"),
            "{head}"
        );
    }

    #[test]
    fn api_errors_carry_libpod_message_and_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("fake.sock");
        let body = br#"{"cause":"boom","message":"cannot start: boom","response":500}"#;
        let mut resp = format!(
            "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        resp.extend_from_slice(body);
        let server = fake_server(&socket, resp);
        let err = smol::block_on(Podman::new(&socket).start("chute-a")).expect_err("500");
        server.join().expect("server");
        match err {
            PodmanError::Api {
                op,
                target,
                status,
                message,
            } => {
                assert_eq!(
                    (op, target.as_str(), status),
                    ("start", "container chute-a", 500)
                );
                assert_eq!(message, "cannot start: boom");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn connect_error_says_what_to_do() {
        let p = Podman::new("/nonexistent/podman.sock");
        let err = smol::block_on(p.version()).expect_err("no socket");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/podman.sock"), "{msg}");
        assert!(msg.contains("podman system service"), "{msg}");
    }
}
