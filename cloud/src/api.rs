//! REST API under `/api/v1` (bearer API tokens; every mutating call is written to the
//! audit log), plus `/healthz`, `/metrics` and `/api/v1/openapi.json`.
//!
//! The OpenAPI document is generated with utoipa from the handler annotations and the
//! request/response types below, so it cannot drift from what the handlers accept: a
//! type change changes the document. utoipa is compile-time only (derive macros, no
//! runtime router of its own), which keeps it a small addition to axum.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State, WebSocketUpgrade};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::store::{DeploymentRow, DeviceRow, GrantRow, NewCommand};
use crate::{blobs, now, wire, App};

/// An error answer: `{"error": "..."}` with a 4xx (or 5xx when the store fails).
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// What was wrong and what is allowed.
    pub error: String,
}

impl ApiError {
    fn bad(msg: impl Into<String>) -> Self {
        Self(StatusCode::BAD_REQUEST, msg.into())
    }
    fn not_found(msg: impl Into<String>) -> Self {
        Self(StatusCode::NOT_FOUND, msg.into())
    }
    fn conflict(msg: impl Into<String>) -> Self {
        Self(StatusCode::CONFLICT, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        Self(StatusCode::INTERNAL_SERVER_ERROR, "storage error".into())
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn token_hash(token: &str) -> String {
    proto::hex_encode(&Sha256::digest(token.as_bytes()))
}

/// A fresh random token (hex of 32 bytes from the OS CSPRNG) with a readable prefix.
pub fn new_token(prefix: &str) -> Result<String, ApiError> {
    proto::random_bytes::<32>()
        .map(|b| format!("{prefix}{}", proto::hex_encode(&b)))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

fn device_id(id: &str) -> Result<proto::DeviceId, ApiError> {
    proto::DeviceId::from_hex(id)
        .map_err(|e| ApiError::bad(format!("{e} (16 hex digits, as `chuted id` prints)")))
}

// ---------- types ----------

#[derive(Serialize, ToSchema)]
pub struct Device {
    /// 16 hex digits: the first 8 bytes of sha256 of the device key.
    pub id: String,
    /// `pending`, `accepted` or `rejected`.
    pub status: String,
    /// Whether a session is open now.
    pub connected: bool,
    /// Unix seconds the current session opened.
    pub connected_since: Option<i64>,
    /// Short key fingerprint (first 12 hex digits of the id, grouped) to compare with `chuted id`.
    pub fingerprint: String,
    pub pubkey: String,
    /// Unix seconds of the last heartbeat.
    pub last_heartbeat: Option<i64>,
    /// Seconds since the last heartbeat.
    pub heartbeat_age_secs: Option<i64>,
    pub chutes_running: Option<i64>,
    pub chutes_total: Option<i64>,
    pub agent_version: Option<String>,
    pub tags: Vec<String>,
    /// The device clock at the last heartbeat (none before the first).
    pub clock: Option<DeviceClock>,
    /// Per chute state, restarts and usage from the last heartbeat.
    #[schema(value_type = Object)]
    pub heartbeat: Option<Value>,
}

/// A device's clock as its last heartbeat reported it.
#[derive(Serialize, ToSchema)]
pub struct DeviceClock {
    /// The device clock, unix seconds.
    pub secs: i64,
    /// `ok`; `behind floor`: earlier than the newest signed command the device has seen
    /// (set back, or lost at boot without an RTC: commands are judged at that floor, so
    /// short-lived ones may be refused as expired); `ahead`: the newest authentic
    /// command arrived already expired (the clock probably runs ahead).
    pub state: String,
    /// Device clock minus the cloud's clock when the heartbeat arrived, in seconds
    /// (positive: the device is ahead).
    pub skew_secs: i64,
}

#[derive(Deserialize, IntoParams)]
pub struct DeviceQuery {
    /// Only devices carrying this tag.
    pub tag: Option<String>,
    /// Only devices with this status.
    pub status: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct PreauthorizeRequest {
    /// The device's public key (64 hex digits, as `chuted id` prints).
    pub pubkey: String,
}

#[derive(Deserialize, ToSchema)]
pub struct TagsRequest {
    pub tags: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct ClaimRequest {
    /// Lifetime in seconds (1..=2592000; default 3600).
    pub expires_secs: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct ClaimToken {
    /// Give it to one device: `chuted run --cloud URL --claim TOKEN`. Shown once.
    pub token: String,
    pub expires_at: i64,
}

#[derive(Deserialize, ToSchema)]
pub struct OwnerRequest {
    /// The owner's public key (64 hex digits).
    pub pubkey: String,
}

#[derive(Serialize, ToSchema)]
pub struct Owner {
    pub pubkey: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct GrantRequest {
    /// Hex of the postcard encoding of an owner-signed grant.
    pub signed: String,
}

#[derive(Serialize, ToSchema)]
pub struct Grant {
    pub id: i64,
    pub developer: String,
    /// Hex of the signed grant (what a developer attaches to commands).
    pub signed: String,
    #[schema(value_type = Object)]
    pub summary: Value,
    pub issued_at: i64,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(Deserialize, IntoParams)]
pub struct GrantQuery {
    /// Only grants for this developer key (hex).
    pub developer: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct CommandRequest {
    /// Hex of a CALL frame carrying the developer-signed command.
    pub command: String,
    /// The deployment this command belongs to, if any.
    pub deployment: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct TimelineEvent {
    /// `queued`, `sent`, `succeeded`, `failed`, `refused` or `expired`.
    pub status: String,
    pub at: i64,
    pub detail: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct CommandView {
    pub id: i64,
    pub device_id: String,
    pub deployment: Option<i64>,
    pub procedure: String,
    pub chute: Option<String>,
    pub signer: String,
    pub request_id: i64,
    /// `queued`, `sent`, `succeeded`, `failed`, `refused` or `expired`.
    pub status: String,
    /// Why it was refused or failed.
    pub reason: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
    /// Hex of the RESULT frame carrying the device-signed result (verify it yourself).
    pub result: Option<String>,
    /// The result's outcome as the cloud decoded it (unverified convenience).
    #[schema(value_type = Object)]
    pub outcome: Option<Value>,
    pub timeline: Vec<TimelineEvent>,
}

#[derive(Deserialize, IntoParams)]
pub struct BlobQuery {
    /// Offset of these bytes in the blob (must equal `received`).
    pub offset: u64,
    /// Total size of the blob in bytes.
    pub size: u64,
}

#[derive(Serialize, ToSchema)]
pub struct BlobStatus {
    pub sha256: String,
    pub size: u64,
    /// Bytes held; an upload continues from here.
    pub received: u64,
    pub complete: bool,
}

#[derive(Deserialize, ToSchema)]
pub struct DeploymentRequest {
    pub chute: String,
    pub version: String,
    pub image_sha256: Option<String>,
    /// Target device ids.
    pub devices: Vec<String>,
}

#[derive(Serialize, ToSchema)]
pub struct DeviceOutcome {
    pub device_id: String,
    pub command: Option<i64>,
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Deployment {
    pub id: i64,
    pub chute: String,
    pub version: String,
    pub image_sha256: Option<String>,
    pub created_at: i64,
    pub targeted: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub pending: usize,
    pub devices: Vec<DeviceOutcome>,
}

#[derive(Serialize, ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    pub at: i64,
    pub token_id: Option<i64>,
    pub method: String,
    pub path: String,
    pub status: i64,
}

#[derive(Deserialize, IntoParams)]
pub struct LogsQuery {
    /// Only lines with a sequence number above this (0: every line held).
    pub after: Option<u64>,
}

#[derive(Serialize, ToSchema)]
pub struct LogLineView {
    pub seq: u64,
    pub ts_ms: u64,
    pub stream: String,
    pub text: String,
}

#[derive(Serialize, ToSchema)]
pub struct LiveLogs {
    pub lines: Vec<LogLineView>,
    /// Lines lost to bounded buffers (agent's and cloud's) so far.
    pub dropped: u64,
}

#[derive(Deserialize, IntoParams)]
pub struct LimitQuery {
    /// At most this many (1..=1000, default 100).
    pub limit: Option<i64>,
}

// ---------- helpers ----------

fn device_view(app: &App, d: DeviceRow) -> Device {
    let live = app.hub.get(&d.id);
    let hb: Option<Value> = d
        .heartbeat
        .as_deref()
        .and_then(|h| serde_json::from_str(h).ok());
    let t = now();
    Device {
        fingerprint: proto::PublicKey::from_hex(&d.pubkey)
            .map(|k| wire::fingerprint(&k))
            .unwrap_or_default(),
        connected: live.is_some(),
        connected_since: live.map(|l| l.since),
        last_heartbeat: d.last_heartbeat,
        heartbeat_age_secs: d.last_heartbeat.map(|h| (t - h).max(0)),
        chutes_running: hb.as_ref().and_then(|h| h["chutes_running"].as_i64()),
        chutes_total: hb.as_ref().and_then(|h| h["chutes_total"].as_i64()),
        agent_version: d.agent_version,
        tags: serde_json::from_str(&d.tags).unwrap_or_default(),
        clock: hb.as_ref().and_then(|h| {
            let c = &h["clock"];
            Some(DeviceClock {
                secs: c["secs"].as_i64()?,
                state: c["state"].as_str()?.to_owned(),
                skew_secs: c["skew_secs"].as_i64()?,
            })
        }),
        heartbeat: hb,
        id: d.id,
        status: d.status,
        pubkey: d.pubkey,
    }
}

async fn command_view(app: &App, c: crate::store::CommandRow) -> Result<CommandView, ApiError> {
    let timeline = app
        .store
        .command_events(c.id)
        .await?
        .into_iter()
        .map(|e| TimelineEvent {
            status: e.status,
            at: e.at,
            detail: e.detail,
        })
        .collect();
    let outcome = c
        .result
        .as_deref()
        .and_then(|r| wire::decode_result(r).ok())
        .map(|r| wire::outcome_json(&r));
    Ok(CommandView {
        id: c.id,
        device_id: c.device_id,
        deployment: c.deployment_id,
        procedure: c.procedure,
        chute: c.chute,
        signer: c.signer,
        request_id: c.request_id,
        status: c.status,
        reason: c.reason,
        created_at: c.created_at,
        expires_at: c.expires_at,
        result: c.result,
        outcome,
        timeline,
    })
}

fn limit(q: &LimitQuery) -> Result<i64, ApiError> {
    match q.limit {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n),
        Some(n) => Err(ApiError::bad(format!("limit {n} is outside 1..=1000"))),
    }
}

// ---------- handlers ----------

#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "ok")), security())]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text")), security())]
async fn metrics(State(app): State<Arc<App>>) -> Result<String, ApiError> {
    let mut out = String::new();
    out.push_str(
        "# HELP chute_cloud_sessions Agent sessions open now.\n# TYPE chute_cloud_sessions gauge\n",
    );
    out.push_str(&format!("chute_cloud_sessions {}\n", app.hub.count()));
    out.push_str(
        "# HELP chute_cloud_commands Commands by outcome.\n# TYPE chute_cloud_commands gauge\n",
    );
    for (status, n) in app.store.command_counts().await? {
        out.push_str(&format!(
            "chute_cloud_commands{{status=\"{status}\"}} {n}\n"
        ));
    }
    let t = now();
    let mut lag = 0i64;
    let mut devices = [0i64; 3];
    for d in app.store.device_list().await? {
        match d.status.as_str() {
            "pending" => devices[0] += 1,
            "accepted" => devices[1] += 1,
            _ => devices[2] += 1,
        }
        if app.hub.get(&d.id).is_some() {
            if let Some(h) = d.last_heartbeat {
                lag = lag.max(t - h);
            }
        }
    }
    out.push_str("# HELP chute_cloud_devices Devices by admission status.\n# TYPE chute_cloud_devices gauge\n");
    for (s, n) in ["pending", "accepted", "rejected"].iter().zip(devices) {
        out.push_str(&format!("chute_cloud_devices{{status=\"{s}\"}} {n}\n"));
    }
    out.push_str("# HELP chute_cloud_heartbeat_lag_seconds Oldest last heartbeat among connected devices.\n# TYPE chute_cloud_heartbeat_lag_seconds gauge\n");
    out.push_str(&format!("chute_cloud_heartbeat_lag_seconds {lag}\n"));
    out.push_str("# HELP chute_cloud_connections Open TCP connections (agents, API, console).\n# TYPE chute_cloud_connections gauge\n");
    out.push_str(&format!("chute_cloud_connections {}\n", app.conns.open()));
    out.push_str("# HELP chute_cloud_connections_refused_total Connections closed at accept: an address or the server at its limit.\n# TYPE chute_cloud_connections_refused_total counter\n");
    out.push_str(&format!(
        "chute_cloud_connections_refused_total {}\n",
        app.conns.refused()
    ));
    out.push_str("# HELP chute_cloud_image_bytes_sent_total Image bytes sent to devices in chunks.\n# TYPE chute_cloud_image_bytes_sent_total counter\n");
    out.push_str(&format!(
        "chute_cloud_image_bytes_sent_total {}\n",
        app.hub
            .chunk_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    ));
    Ok(out)
}

#[utoipa::path(get, path = "/api/v1/owner", responses((status = 200, body = Owner)))]
async fn owner_get(State(app): State<Arc<App>>) -> ApiResult<Owner> {
    Ok(Json(Owner {
        pubkey: app.store.owner_get().await?,
    }))
}

#[utoipa::path(put, path = "/api/v1/owner", request_body = OwnerRequest,
    responses((status = 200, body = Owner), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn owner_put(State(app): State<Arc<App>>, Json(r): Json<OwnerRequest>) -> ApiResult<Owner> {
    let key = proto::PublicKey::from_hex(&r.pubkey)
        .map_err(|e| ApiError::bad(format!("owner key: {e}")))?;
    key.verifying_key()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    match app.store.owner_get().await? {
        Some(k) if k != key.to_hex() => {
            return Err(ApiError::conflict(format!(
                "this fleet already has owner key {k}; it cannot be replaced through the API"
            )))
        }
        Some(_) => {}
        None => app.store.owner_set(&key.to_hex(), now()).await?,
    }
    Ok(Json(Owner {
        pubkey: Some(key.to_hex()),
    }))
}

#[utoipa::path(get, path = "/api/v1/devices", params(DeviceQuery), responses((status = 200, body = [Device])))]
async fn devices_list(
    State(app): State<Arc<App>>,
    Query(q): Query<DeviceQuery>,
) -> ApiResult<Vec<Device>> {
    let out = app
        .store
        .device_list()
        .await?
        .into_iter()
        .map(|d| device_view(&app, d))
        .filter(|d| q.tag.as_ref().is_none_or(|t| d.tags.contains(t)))
        .filter(|d| q.status.as_ref().is_none_or(|s| &d.status == s))
        .collect();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/devices", request_body = PreauthorizeRequest,
    responses((status = 200, body = Device), (status = 400, body = ErrorBody)))]
async fn devices_preauthorize(
    State(app): State<Arc<App>>,
    Json(r): Json<PreauthorizeRequest>,
) -> ApiResult<Device> {
    let key = proto::PublicKey::from_hex(&r.pubkey)
        .map_err(|e| ApiError::bad(format!("device key: {e}")))?;
    key.verifying_key()
        .map_err(|e| ApiError::bad(e.to_string()))?;
    let id = key.device_id().to_hex();
    app.store
        .device_insert(&id, &key.to_hex(), "accepted", now())
        .await?;
    app.store.device_set_status(&id, "accepted", now()).await?;
    app.hub.wake(&id);
    let d = app
        .store
        .device_get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("device vanished"))?;
    Ok(Json(device_view(&app, d)))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = Device), (status = 404, body = ErrorBody)))]
async fn device_get(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Device> {
    device_id(&id)?;
    let d = app
        .store
        .device_get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    Ok(Json(device_view(&app, d)))
}

async fn set_status(app: &App, id: &str, status: &str) -> ApiResult<Device> {
    device_id(id)?;
    if !app.store.device_set_status(id, status, now()).await? {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    app.hub.wake(id);
    let d = app
        .store
        .device_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    Ok(Json(device_view(app, d)))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/accept", params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = Device), (status = 404, body = ErrorBody)))]
async fn device_accept(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Device> {
    set_status(&app, &id, "accepted").await
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/reject", params(("id" = String, Path, description = "device id")),
    responses((status = 200, body = Device), (status = 404, body = ErrorBody)))]
async fn device_reject(State(app): State<Arc<App>>, Path(id): Path<String>) -> ApiResult<Device> {
    set_status(&app, &id, "rejected").await
}

#[utoipa::path(put, path = "/api/v1/devices/{id}/tags", params(("id" = String, Path, description = "device id")),
    request_body = TagsRequest, responses((status = 200, body = Device), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn device_tags(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Json(r): Json<TagsRequest>,
) -> ApiResult<Device> {
    device_id(&id)?;
    if r.tags.len() > 32 {
        return Err(ApiError::bad(format!("{} tags; at most 32", r.tags.len())));
    }
    for t in &r.tags {
        if t.is_empty()
            || t.len() > 64
            || !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(ApiError::bad(format!(
                "tag {t:?}: 1..=64 characters of A-Z a-z 0-9 - _ . :"
            )));
        }
    }
    let mut tags = r.tags.clone();
    tags.sort();
    tags.dedup();
    if !app
        .store
        .device_set_tags(&id, &json!(tags).to_string(), now())
        .await?
    {
        return Err(ApiError::not_found(format!("no device {id}")));
    }
    let d = app
        .store
        .device_get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    Ok(Json(device_view(&app, d)))
}

#[utoipa::path(post, path = "/api/v1/claim-tokens", request_body = ClaimRequest,
    responses((status = 200, body = ClaimToken), (status = 400, body = ErrorBody)))]
async fn claim_create(
    State(app): State<Arc<App>>,
    Json(r): Json<ClaimRequest>,
) -> ApiResult<ClaimToken> {
    let secs = r.expires_secs.unwrap_or(3600);
    if !(1..=30 * 86400).contains(&secs) {
        return Err(ApiError::bad(format!(
            "expires_secs {secs} is outside 1..=2592000"
        )));
    }
    let token = new_token("claim-")?;
    let t = now();
    let expires_at = t + secs as i64;
    app.store
        .claim_insert(&token_hash(&token), t, expires_at)
        .await?;
    Ok(Json(ClaimToken { token, expires_at }))
}

fn grant_view(g: GrantRow) -> Grant {
    Grant {
        summary: serde_json::from_str(&g.summary).unwrap_or(Value::Null),
        id: g.id,
        developer: g.developer,
        signed: g.signed,
        issued_at: g.issued_at,
        expires_at: g.expires_at,
        revoked_at: g.revoked_at,
    }
}

#[utoipa::path(post, path = "/api/v1/grants", request_body = GrantRequest,
    responses((status = 200, body = Grant), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn grant_create(
    State(app): State<Arc<App>>,
    Json(r): Json<GrantRequest>,
) -> ApiResult<Grant> {
    let g = wire::decode_grant(&r.signed).map_err(|e| ApiError::bad(e.to_string()))?;
    let owner = app.store.owner_get().await?.ok_or_else(|| {
        ApiError::conflict("no owner key registered yet: run `chutectl owner init`")
    })?;
    let owner =
        proto::PublicKey::from_hex(&owner).map_err(|e| ApiError::conflict(e.to_string()))?;
    if !g.is_signed_by(&owner) {
        return Err(ApiError::bad(format!(
            "the grant is not signed by the fleet owner key {owner}"
        )));
    }
    let row = GrantRow {
        id: 0,
        developer: g.grant.developer.to_hex(),
        signed: r.signed.to_lowercase(),
        summary: wire::grant_summary(&g).to_string(),
        issued_at: g.grant.issued_at as i64,
        expires_at: g.grant.expires_at.min(i64::MAX as u64) as i64,
        revoked_at: None,
    };
    let id = app.store.grant_insert(&row, now()).await?;
    Ok(Json(grant_view(GrantRow { id, ..row })))
}

#[utoipa::path(get, path = "/api/v1/grants", params(GrantQuery), responses((status = 200, body = [Grant])))]
async fn grant_list(
    State(app): State<Arc<App>>,
    Query(q): Query<GrantQuery>,
) -> ApiResult<Vec<Grant>> {
    let out = app
        .store
        .grant_list()
        .await?
        .into_iter()
        .filter(|g| {
            q.developer
                .as_ref()
                .is_none_or(|d| d.eq_ignore_ascii_case(&g.developer))
        })
        .map(grant_view)
        .collect();
    Ok(Json(out))
}

#[utoipa::path(post, path = "/api/v1/grants/{id}/revoke", params(("id" = i64, Path, description = "grant id")),
    responses((status = 200, body = Grant), (status = 404, body = ErrorBody)))]
async fn grant_revoke(State(app): State<Arc<App>>, Path(id): Path<i64>) -> ApiResult<Grant> {
    if !app.store.grant_revoke(id, now()).await? {
        return Err(ApiError::not_found(format!("no grant {id}")));
    }
    let g = app
        .store
        .grant_list()
        .await?
        .into_iter()
        .find(|g| g.id == id)
        .ok_or_else(|| ApiError::not_found(format!("no grant {id}")))?;
    Ok(Json(grant_view(g)))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/commands", params(("id" = String, Path, description = "device id")),
    request_body = CommandRequest,
    responses((status = 200, body = CommandView, description = "stored: queued, or refused with its reason"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn command_create(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Json(r): Json<CommandRequest>,
) -> ApiResult<CommandView> {
    let did = device_id(&id)?;
    let signed = wire::decode_command(&r.command).map_err(|e| ApiError::bad(e.to_string()))?;
    let d = app
        .store
        .device_get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no device {id}")))?;
    if d.status != "accepted" {
        return Err(ApiError::conflict(format!(
            "device {id} is {}; only accepted devices take commands",
            d.status
        )));
    }
    if let Some(dep) = r.deployment {
        if app.store.deployment_get(dep).await?.is_none() {
            return Err(ApiError::not_found(format!("no deployment {dep}")));
        }
    }
    let owner = app.store.owner_get().await?.ok_or_else(|| {
        ApiError::conflict("no owner key registered yet: run `chutectl owner init`")
    })?;
    let owner =
        proto::PublicKey::from_hex(&owner).map_err(|e| ApiError::conflict(e.to_string()))?;
    let t = now();
    let mut refusal = wire::early_check(&owner, did, &signed, t as u64)
        .err()
        .map(|(code, msg)| format!("{code}: {msg}"));
    let grant_hex = proto::hex_encode(&postcard::to_allocvec(&signed.grant).unwrap_or_default());
    if refusal.is_none() && app.store.grant_revoked(&grant_hex).await? {
        refusal =
            Some("chute.error.invalid_grant: the grant was revoked by the fleet owner".into());
    }
    if refusal.is_none() {
        if let Some((sha, size)) = wire::image_of(&signed) {
            let hex = proto::hex_encode(&sha);
            match app.blobs.progress(&hex, size) {
                Some(p) if p.complete && p.size == size => {}
                Some(p) if p.complete => refusal = Some(format!("image {hex} holds {} bytes, the command says {size}", p.size)),
                _ => refusal = Some(format!("image {hex} is not uploaded (complete) yet; upload it to /api/v1/blobs/{hex} first")),
            }
        }
    }
    let (procedure, chute) = wire::procedure_chute(&signed);
    let c = NewCommand {
        device_id: id.clone(),
        deployment_id: r.deployment,
        signer: signed.signer.to_hex(),
        request_id: signed.command.request_id.min(i64::MAX as u64) as i64,
        procedure,
        chute,
        status: if refusal.is_some() {
            "refused".into()
        } else {
            "queued".into()
        },
        reason: refusal,
        signed: wire::encode_command(&signed),
        created_at: t,
        expires_at: signed.command.expires_at.min(i64::MAX as u64) as i64,
    };
    let cid = app.store.command_insert(&c).await?;
    app.hub.wake(&id);
    let row = app
        .store
        .command_get(cid)
        .await?
        .ok_or_else(|| ApiError::not_found("command vanished"))?;
    Ok(Json(command_view(&app, row).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/commands", params(("id" = String, Path, description = "device id"), LimitQuery),
    responses((status = 200, body = [CommandView]), (status = 400, body = ErrorBody)))]
async fn command_list(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<CommandView>> {
    device_id(&id)?;
    let mut out = Vec::new();
    for c in app.store.command_list(Some(&id), None, limit(&q)?).await? {
        out.push(command_view(&app, c).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/commands/{id}", params(("id" = i64, Path, description = "command id")),
    responses((status = 200, body = CommandView), (status = 404, body = ErrorBody)))]
async fn command_get(State(app): State<Arc<App>>, Path(id): Path<i64>) -> ApiResult<CommandView> {
    let c = app
        .store
        .command_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no command {id}")))?;
    Ok(Json(command_view(&app, c).await?))
}

#[utoipa::path(get, path = "/api/v1/blobs/{sha256}", params(("sha256" = String, Path, description = "sha256, 64 hex digits")),
    responses((status = 200, body = BlobStatus), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
async fn blob_get(State(app): State<Arc<App>>, Path(sha): Path<String>) -> ApiResult<BlobStatus> {
    blobs::check_name(&sha).map_err(|e| ApiError::bad(e.to_string()))?;
    let known = app.store.blob_get(&sha).await?;
    let p = app
        .blobs
        .progress(&sha, known.as_ref().map_or(0, |b| b.size as u64))
        .ok_or_else(|| ApiError::not_found(format!("no blob {sha}; upload from offset 0")))?;
    Ok(Json(BlobStatus {
        sha256: sha,
        size: p.size,
        received: p.received,
        complete: p.complete,
    }))
}

#[utoipa::path(put, path = "/api/v1/blobs/{sha256}", params(("sha256" = String, Path, description = "sha256, 64 hex digits"), BlobQuery),
    request_body(content = String, content_type = "application/octet-stream", description = "bytes at `offset`"),
    responses((status = 200, body = BlobStatus), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody, description = "wrong offset: resume from `received`"), (status = 422, body = ErrorBody)))]
async fn blob_put(
    State(app): State<Arc<App>>,
    Path(sha): Path<String>,
    Query(q): Query<BlobQuery>,
    body: Bytes,
) -> ApiResult<BlobStatus> {
    blobs::check_name(&sha).map_err(|e| ApiError::bad(e.to_string()))?;
    let known = app
        .store
        .blob_get(&sha)
        .await?
        .filter(|b| !b.complete)
        .map(|b| b.size as u64);
    let p = app
        .blobs
        .write(&sha, q.size, known, q.offset, &body)
        .await
        .map_err(|e| match e {
            blobs::BlobError::WrongOffset { .. } | blobs::BlobError::SizeChanged { .. } => {
                ApiError::conflict(e.to_string())
            }
            blobs::BlobError::DigestMismatch { .. } => {
                ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            blobs::BlobError::Io { .. } => {
                tracing::error!(error = %e, "blob write failed");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "blob storage error".into(),
                )
            }
            _ => ApiError::bad(e.to_string()),
        })?;
    app.store
        .blob_put(
            &crate::store::BlobRow {
                sha256: sha.clone(),
                size: p.size as i64,
                received: p.received as i64,
                complete: p.complete,
            },
            now(),
        )
        .await?;
    Ok(Json(BlobStatus {
        sha256: sha,
        size: p.size,
        received: p.received,
        complete: p.complete,
    }))
}

async fn deployment_view(app: &App, d: DeploymentRow) -> Result<Deployment, ApiError> {
    let targets: Vec<String> = serde_json::from_str(&d.targets).unwrap_or_default();
    let cmds = app.store.command_list(None, Some(d.id), 1000).await?;
    let mut devices = Vec::new();
    let (mut ok, mut bad, mut pending) = (0, 0, 0);
    for t in &targets {
        // The newest command for this device in the deployment decides its outcome.
        let c = cmds.iter().find(|c| &c.device_id == t);
        let status = c.map_or("pending".to_owned(), |c| c.status.clone());
        match status.as_str() {
            "succeeded" => ok += 1,
            "failed" | "refused" | "expired" => bad += 1,
            _ => pending += 1,
        }
        devices.push(DeviceOutcome {
            device_id: t.clone(),
            command: c.map(|c| c.id),
            status,
            reason: c.and_then(|c| c.reason.clone()),
        });
    }
    Ok(Deployment {
        id: d.id,
        chute: d.chute,
        version: d.version,
        image_sha256: d.image_sha256,
        created_at: d.created_at,
        targeted: targets.len(),
        succeeded: ok,
        failed: bad,
        pending,
        devices,
    })
}

#[utoipa::path(post, path = "/api/v1/deployments", request_body = DeploymentRequest,
    responses((status = 200, body = Deployment), (status = 400, body = ErrorBody)))]
async fn deployment_create(
    State(app): State<Arc<App>>,
    Json(r): Json<DeploymentRequest>,
) -> ApiResult<Deployment> {
    proto::ChuteName::new(r.chute.as_str()).map_err(|e| ApiError::bad(format!("chute: {e}")))?;
    if r.version.is_empty() || r.version.len() > 128 {
        return Err(ApiError::bad("version: 1..=128 characters"));
    }
    if r.devices.is_empty() || r.devices.len() > 10_000 {
        return Err(ApiError::bad("devices: 1..=10000 device ids"));
    }
    for d in &r.devices {
        device_id(d)?;
    }
    if let Some(s) = &r.image_sha256 {
        blobs::check_name(s).map_err(|e| ApiError::bad(e.to_string()))?;
    }
    let row = DeploymentRow {
        id: 0,
        chute: r.chute,
        version: r.version,
        image_sha256: r.image_sha256,
        targets: json!(r.devices).to_string(),
        created_at: now(),
    };
    let id = app.store.deployment_insert(&row).await?;
    Ok(Json(
        deployment_view(&app, DeploymentRow { id, ..row }).await?,
    ))
}

#[utoipa::path(get, path = "/api/v1/deployments", params(LimitQuery), responses((status = 200, body = [Deployment])))]
async fn deployment_list(
    State(app): State<Arc<App>>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<Deployment>> {
    let mut out = Vec::new();
    for d in app.store.deployment_list(limit(&q)?).await? {
        out.push(deployment_view(&app, d).await?);
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/api/v1/deployments/{id}", params(("id" = i64, Path, description = "deployment id")),
    responses((status = 200, body = Deployment), (status = 404, body = ErrorBody)))]
async fn deployment_get(State(app): State<Arc<App>>, Path(id): Path<i64>) -> ApiResult<Deployment> {
    let d = app
        .store
        .deployment_get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no deployment {id}")))?;
    Ok(Json(deployment_view(&app, d).await?))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/logs/{chute}",
    params(("id" = String, Path, description = "device id"), ("chute" = String, Path, description = "chute name"), LogsQuery),
    responses((status = 200, body = LiveLogs, description = "lines relayed from the device (not signed)"),
        (status = 404, body = ErrorBody, description = "nobody follows this chute: send a signed `logs` command with follow first")))]
async fn live_logs(
    State(app): State<Arc<App>>,
    Path((id, chute)): Path<(String, String)>,
    Query(q): Query<LogsQuery>,
) -> ApiResult<LiveLogs> {
    device_id(&id)?;
    let (lines, dropped) = app
        .hub
        .poll_logs(&id, &chute, q.after.unwrap_or(0))
        .ok_or_else(|| ApiError::not_found(format!("no live logs for chute {chute:?} on {id}: send a signed `logs` command with follow = true first")))?;
    Ok(Json(LiveLogs {
        lines: lines
            .into_iter()
            .map(|l| LogLineView {
                seq: l.seq,
                ts_ms: l.ts_ms,
                stream: l.stream,
                text: l.text,
            })
            .collect(),
        dropped,
    }))
}

#[utoipa::path(get, path = "/api/v1/audit", params(LimitQuery), responses((status = 200, body = [AuditEntry])))]
async fn audit_list(
    State(app): State<Arc<App>>,
    Query(q): Query<LimitQuery>,
) -> ApiResult<Vec<AuditEntry>> {
    let out = app
        .store
        .audit_list(limit(&q)?)
        .await?
        .into_iter()
        .map(|a| AuditEntry {
            id: a.id,
            at: a.at,
            token_id: a.token_id,
            method: a.method,
            path: a.path,
            status: a.status,
        })
        .collect();
    Ok(Json(out))
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "chute-cloud", description = "Fleet manager for chuted devices: an untrusted relay and store for signed commands."),
    paths(healthz, metrics, owner_get, owner_put, devices_list, devices_preauthorize, device_get, device_accept,
        device_reject, device_tags, claim_create, grant_create, grant_list, grant_revoke, command_create,
        command_list, command_get, blob_get, blob_put, deployment_create, deployment_list, deployment_get, audit_list, live_logs, token_create, token_list),
    modifiers(&BearerAuth),
    security(("token" = []))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// Token roles: `admin` may do everything; `developer` may read fleet state (not the
/// audit log or tokens) and submit what a developer signs: commands, blobs, deployments.
/// Signatures still decide what runs on a device; roles decide what this cloud accepts.
pub(crate) fn allowed(role: &str, method: &Method, path: &str) -> bool {
    if role == "admin" {
        return true;
    }
    if role != "developer" {
        return false;
    }
    let rest = path.strip_prefix("/api/v1").unwrap_or(path);
    if *method == Method::GET || *method == Method::HEAD {
        return !rest.starts_with("/audit") && !rest.starts_with("/tokens");
    }
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    matches!(
        (method.as_str(), segs.as_slice()),
        ("POST", ["devices", _, "commands"]) | ("PUT", ["blobs", _]) | ("POST", ["deployments"])
    )
}

#[derive(Deserialize, ToSchema)]
pub struct TokenRequest {
    /// Who or what the token is for (1..=64 characters).
    pub name: String,
    /// `admin` or `developer` (default `developer`).
    pub role: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct TokenView {
    pub id: i64,
    pub name: String,
    pub role: String,
    /// Present only in the answer that created it.
    pub token: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/tokens", request_body = TokenRequest,
    responses((status = 200, body = TokenView), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody)))]
async fn token_create(
    State(app): State<Arc<App>>,
    Json(r): Json<TokenRequest>,
) -> ApiResult<TokenView> {
    let role = r.role.unwrap_or_else(|| "developer".into());
    if role != "admin" && role != "developer" {
        return Err(ApiError::bad(format!(
            "role {role:?}: use admin or developer"
        )));
    }
    if r.name.is_empty() || r.name.len() > 64 || r.name.chars().any(char::is_control) {
        return Err(ApiError::bad("name: 1..=64 printable characters"));
    }
    let token = new_token("cc-")?;
    let id = app
        .store
        .token_insert(&r.name, &token_hash(&token), &role, now())
        .await?;
    Ok(Json(TokenView {
        id,
        name: r.name,
        role,
        token: Some(token),
    }))
}

#[utoipa::path(get, path = "/api/v1/tokens", responses((status = 200, body = [TokenView])))]
async fn token_list(State(app): State<Arc<App>>) -> ApiResult<Vec<TokenView>> {
    Ok(Json(
        app.store
            .token_list()
            .await?
            .into_iter()
            .map(|t| TokenView {
                id: t.id,
                name: t.name,
                role: t.role,
                token: None,
            })
            .collect(),
    ))
}

/// Bearer-token check for `/api/v1`, and the audit log of every mutating call.
async fn auth(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Without a bearer token, the console's session cookie (with its CSRF header on
    // mutating calls) stands for the API token it was opened with.
    let hash =
        match token.map(token_hash) {
            Some(h) => h,
            None => match crate::console::api_session(&app, &req) {
                Ok(Some(h)) => h,
                Ok(None) => return ApiError(
                    StatusCode::UNAUTHORIZED,
                    "missing `Authorization: Bearer TOKEN` (the admin token is in the data dir)"
                        .into(),
                )
                .into_response(),
                Err(msg) => return ApiError(StatusCode::FORBIDDEN, msg).into_response(),
            },
        };
    let row = match app.store.token_lookup(&hash).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "unknown or revoked API token".into(),
            )
            .into_response()
        }
        Err(e) => return ApiError::from(e).into_response(),
    };
    let method = req.method().clone();
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map_or_else(|| req.uri().path().to_owned(), |u| u.path().to_owned());
    let resp = if allowed(&row.role, &method, &path) {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "a {} token may not {method} {path}; ask the fleet owner (admin token)",
                row.role
            ),
        )
        .into_response()
    };
    if method != Method::GET && method != Method::HEAD {
        if let Err(e) = app
            .store
            .audit(
                now(),
                Some(row.id),
                method.as_str(),
                &path,
                i64::from(resp.status().as_u16()),
            )
            .await
        {
            tracing::error!(error = %e, "cannot write the audit log");
        }
        tracing::info!(token = %row.name, method = %method, path = %path, status = resp.status().as_u16(), "audit");
    }
    resp
}

async fn agent_ws(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let claim = headers
        .get("x-chute-claim")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() <= 128)
        .map(str::to_owned);
    let Ok(permit) = app.handshakes.clone().try_acquire_owned() else {
        return ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            "too many agent handshakes in progress; retry with backoff".into(),
        )
        .into_response();
    };
    // Small buffers: an idle session holds them for hours, 10k sessions at once
    // (tungstenite's default is 128 KiB each way; frames larger than the read buffer
    // still arrive, the buffer grows for them).
    ws.protocols([proto::SUBPROTOCOL])
        .read_buffer_size(crate::agent::WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(crate::agent::max_frame())
        .max_frame_size(crate::agent::max_frame())
        .on_upgrade(move |socket| crate::agent::session(socket, app, claim, permit))
}

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/owner", get(owner_get).put(owner_put))
        .route("/devices", get(devices_list).post(devices_preauthorize))
        .route("/devices/{id}", get(device_get))
        .route("/devices/{id}/accept", post(device_accept))
        .route("/devices/{id}/reject", post(device_reject))
        .route("/devices/{id}/tags", put(device_tags))
        .route(
            "/devices/{id}/commands",
            get(command_list).post(command_create),
        )
        .route("/claim-tokens", post(claim_create))
        .route("/grants", get(grant_list).post(grant_create))
        .route("/grants/{id}/revoke", post(grant_revoke))
        .route("/commands/{id}", get(command_get))
        .route(
            "/blobs/{sha256}",
            get(blob_get)
                .put(blob_put)
                .layer(DefaultBodyLimit::max(8 << 20)),
        )
        .route("/deployments", get(deployment_list).post(deployment_create))
        .route("/deployments/{id}", get(deployment_get))
        .route("/audit", get(audit_list))
        .route("/tokens", get(token_list).post(token_create))
        .route("/devices/{id}/logs/{chute}", get(live_logs))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/agent", get(agent_ws))
        .nest("/api/v1", api)
        .merge(crate::console::router(app.clone()))
        .with_state(app)
}
