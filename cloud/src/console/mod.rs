//! The web console, served at `/` by chute-cloud itself: server-rendered pages on the
//! same store and hub as the REST API, plus one ES module (`assets/console.js`) that
//! signs commands in the browser with a non-extractable WebCrypto Ed25519 key and
//! verifies device results there. The server never holds a developer key: buttons
//! that change a chute build the command in the browser, show it decoded from the
//! bytes about to be signed, and submit it to the REST API like `chutectl` does.
//!
//! What it is not: a second API. Pages read the store directly; everything a script
//! does goes through `/api/v1` with the session cookie and a CSRF header (see
//! [`api_session`]). Live parts (chute states, logs, deployment outcomes) are SSE.
//! Sessions are in memory ([`session`]): one replica.

pub mod history;
pub mod html;
pub mod session;
#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::store::{CommandRow, DeviceRow, TokenRow};
use crate::{now, wire, App};
use html::{esc, url, Who};

/// Console state kept by the server.
#[derive(Default)]
pub struct Console {
    pub sessions: session::Sessions,
    pub history: history::History,
    /// Mark cookies `Secure` (set when chute-cloud itself serves TLS).
    pub secure: bool,
    /// Whether the heartbeat sampler runs (started once, by the first router built).
    sampling: std::sync::atomic::AtomicBool,
}

impl Console {
    /// `secure`: chute-cloud serves TLS itself, so session cookies are `Secure`.
    pub fn new(secure: bool) -> Self {
        Self {
            secure,
            ..Self::default()
        }
    }
}

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

static CONSOLE_JS: &str = include_str!("../../assets/console.js");
static CODEC_JS: &str = include_str!("../../assets/codec.js");
static CONSOLE_CSS: &str = include_str!("../../assets/console.css");

/// The signed-in user of a console request.
struct Ctx {
    id: String,
    session: session::Session,
    token: TokenRow,
}

impl Ctx {
    fn who(&self) -> Who<'_> {
        Who {
            name: &self.token.name,
            role: &self.token.role,
            csrf: &self.session.csrf,
        }
    }
}

fn secure(app: &App, headers: &HeaderMap) -> bool {
    app.console.secure
        || headers
            .get("x-forwarded-proto")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
}

fn error_page(status: StatusCode, msg: &str) -> Response {
    (
        status,
        axum::response::Html(html::page(
            "Error",
            None,
            &format!(
                "<p class=\"error\">{}</p><p><a href=\"/devices\">Back</a></p>",
                esc(msg)
            ),
        )),
    )
        .into_response()
}

fn store_error(e: crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "store error (console)");
    error_page(StatusCode::INTERNAL_SERVER_ERROR, "storage error")
}

/// The session of this request, with its still-valid API token; else a redirect to
/// the sign-in page.
async fn signed_in(app: &App, headers: &HeaderMap) -> Result<Ctx, Response> {
    let to_signin = || Redirect::to("/signin").into_response();
    let id = session::cookie(headers, session::COOKIE).ok_or_else(to_signin)?;
    let s = app.console.sessions.get(id, now()).ok_or_else(to_signin)?;
    let token = app
        .store
        .token_lookup(&s.token_hash)
        .await
        .map_err(store_error)?
        .ok_or_else(to_signin)?;
    Ok(Ctx {
        id: id.to_owned(),
        session: s,
        token,
    })
}

/// For `/api/v1` calls made by the console's script: the API-token hash behind the
/// session cookie. Mutating calls must carry the session's CSRF token in
/// `X-CSRF-Token`. `Ok(None)`: no session cookie (the caller answers 401).
pub fn api_session(app: &App, req: &Request) -> Result<Option<String>, String> {
    let Some(id) = session::cookie(req.headers(), session::COOKIE) else {
        return Ok(None);
    };
    let Some(s) = app.console.sessions.get(id, now()) else {
        return Ok(None);
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let sent = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !session::same(sent, &s.csrf) {
            return Err("missing or wrong X-CSRF-Token for a console session".into());
        }
    }
    Ok(Some(s.token_hash))
}

fn page(ctx: Option<&Ctx>, title: &str, body: &str) -> Response {
    let who = ctx.map(Ctx::who);
    axum::response::Html(html::page(title, who.as_ref(), body)).into_response()
}

async fn security_headers(req: Request, next: axum::middleware::Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

pub fn router(app: Arc<App>) -> Router<Arc<App>> {
    if tokio::runtime::Handle::try_current().is_ok()
        && !app
            .console
            .sampling
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        tokio::spawn(sample_heartbeats(app.clone()));
    }
    Router::new()
        .route("/", get(|| async { Redirect::to("/devices") }))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/devices", get(devices_page))
        .route("/devices/{id}", get(device_page))
        .route("/devices/{id}/accept", post(accept))
        .route("/devices/{id}/reject", post(reject))
        .route("/devices/{id}/logs/{chute}", get(logs_page))
        .route("/deploy", get(deploy_page))
        .route("/commands", get(commands_page))
        .route("/keys", get(keys_page))
        .route("/console/validate", post(validate))
        .route("/console/events/device/{id}", get(device_events))
        .route("/console/events/logs/{id}/{chute}", get(log_events))
        .route("/console/events/deployment/{id}", get(deployment_events))
        .route("/assets/{file}", get(asset))
        // Browsers ask for it; there is none (and no 404 noise in their consoles).
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .layer(axum::middleware::from_fn(security_headers))
}

async fn asset(Path(file): Path<String>) -> Response {
    let (ctype, body) = match file.as_str() {
        "console.js" => ("text/javascript; charset=utf-8", CONSOLE_JS),
        "codec.js" => ("text/javascript; charset=utf-8", CODEC_JS),
        "console.css" => ("text/css; charset=utf-8", CONSOLE_CSS),
        _ => return error_page(StatusCode::NOT_FOUND, "no such asset"),
    };
    (
        [
            (header::CONTENT_TYPE, ctype),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

// ---------- sign in / out ----------

async fn signin_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if signed_in(&app, &headers).await.is_ok() {
        return Redirect::to("/devices").into_response();
    }
    let Ok(pre) = proto::random_bytes::<16>().map(|b| proto::hex_encode(&b)) else {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    };
    let body = format!(
        r#"<form method="post" action="/signin" class="signin">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<input type="hidden" name="csrf" value="{pre}">
<button type="submit">Sign in</button>
</form>
<p>Use an API token (the admin token is in the cloud's data directory; <code>chutectl token create NAME</code> makes a developer token).</p>"#
    );
    let mut r = page(None, "Sign in", &body);
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        session::PRE_COOKIE,
        &pre,
        600,
        secure(&app, &headers),
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct SigninForm {
    token: String,
    csrf: String,
}

async fn signin(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(f): Form<SigninForm>,
) -> Response {
    let pre = session::cookie(&headers, session::PRE_COOKIE).unwrap_or("");
    if !session::same(pre, &f.csrf) {
        return error_page(
            StatusCode::FORBIDDEN,
            "the sign-in form expired or was not sent by this console; reload the sign-in page",
        );
    }
    let hash = crate::api::token_hash(f.token.trim());
    let row = match app.store.token_lookup(&hash).await {
        Ok(Some(r)) => r,
        Ok(None) => return error_page(StatusCode::UNAUTHORIZED, "unknown or revoked API token"),
        Err(e) => return store_error(e),
    };
    let Some((id, _)) = app.console.sessions.open(hash, now()) else {
        return error_page(StatusCode::INTERNAL_SERVER_ERROR, "cannot open a session");
    };
    tracing::info!(token = %row.name, "console sign-in");
    let _ = app
        .store
        .audit(now(), Some(row.id), "POST", "/signin", 303)
        .await;
    let sec = secure(&app, &headers);
    let mut r = Redirect::to("/devices").into_response();
    for c in [
        session::set_cookie(session::COOKIE, &id, session::LIFETIME, sec),
        session::set_cookie(session::PRE_COOKIE, "", 0, sec),
    ] {
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    r
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn signout(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !session::same(&f.csrf, &ctx.session.csrf) {
        return error_page(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    app.console.sessions.close(&ctx.id);
    let mut r = Redirect::to("/signin").into_response();
    if let Ok(v) = HeaderValue::from_str(&session::set_cookie(
        session::COOKIE,
        "",
        0,
        secure(&app, &headers),
    )) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

// ---------- devices ----------

fn tags_of(d: &DeviceRow) -> Vec<String> {
    serde_json::from_str(&d.tags).unwrap_or_default()
}

fn heartbeat_of(d: &DeviceRow) -> Value {
    d.heartbeat
        .as_deref()
        .and_then(|h| serde_json::from_str(h).ok())
        .unwrap_or(Value::Null)
}

fn fingerprint(d: &DeviceRow) -> String {
    proto::PublicKey::from_hex(&d.pubkey)
        .map(|k| wire::fingerprint(&k))
        .unwrap_or_default()
}

/// What the agent last said about its clock, if it reports one.
/// The device clock as people read it: its state and its skew against the cloud's clock
/// when the last heartbeat arrived (`ok (+0 s)`), as `chutectl device list` prints it.
fn clock_of(hb: &Value) -> String {
    match hb.get("clock").or_else(|| hb.get("clock_state")) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "not reported".into(),
        Some(v) => match (
            v.get("state").and_then(Value::as_str),
            v.get("skew_secs").and_then(Value::as_i64),
        ) {
            (Some(state), Some(skew)) => format!("{state} ({skew:+} s skew)"),
            (Some(state), None) => state.to_string(),
            _ => v.to_string(),
        },
    }
}

#[derive(Deserialize)]
struct TagQuery {
    tag: Option<String>,
}

async fn devices_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Query(q): Query<TagQuery>,
) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let devices = match app.store.device_list().await {
        Ok(d) => d,
        Err(e) => return store_error(e),
    };
    let tag = q.tag.filter(|t| !t.is_empty());
    let t = now();
    let mut rows = String::new();
    let mut pending = String::new();
    for d in &devices {
        let tags = tags_of(d);
        if d.status == "pending" {
            pending.push_str(&format!(
                r#"<tr><td><code>{id}</code></td><td><code class="fp">{fp}</code></td><td><code class="key">{key}</code></td><td>{conn}</td>
<td><form method="post" action="/devices/{uid}/accept"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" aria-label="Accept {id}">Accept</button></form>
<form method="post" action="/devices/{uid}/reject"><input type="hidden" name="csrf" value="{csrf}"><button type="submit" aria-label="Reject {id}">Reject</button></form></td></tr>"#,
                id = esc(&d.id),
                uid = url(&d.id),
                fp = esc(&fingerprint(d)),
                key = esc(&d.pubkey),
                conn = if app.hub.get(&d.id).is_some() { "connected" } else { "offline" },
                csrf = esc(&ctx.session.csrf),
            ));
            continue;
        }
        if tag.as_ref().is_some_and(|t| !tags.contains(t)) {
            continue;
        }
        let hb = heartbeat_of(d);
        let live = app.hub.get(&d.id);
        rows.push_str(&format!(
            r#"<tr><td><a href="/devices/{uid}">{id}</a></td><td>{status}</td><td>{conn}</td><td>{hbage}</td><td>{run} / {total}</td><td>{ver}</td><td>{clock}</td><td>{tags}</td></tr>"#,
            uid = url(&d.id),
            id = esc(&d.id),
            status = esc(&d.status),
            conn = live.map_or("offline".to_owned(), |l| format!("connected since {}", html::time(l.since))),
            hbage = d.last_heartbeat.map_or("never".to_owned(), |h| html::age((t - h).max(0))),
            run = hb["chutes_running"].as_i64().map_or("?".into(), |n| n.to_string()),
            total = hb["chutes_total"].as_i64().map_or("?".into(), |n| n.to_string()),
            ver = esc(d.agent_version.as_deref().unwrap_or("?")),
            clock = esc(&clock_of(&hb)),
            tags = esc(&tags.join(", ")),
        ));
    }
    let body = format!(
        r#"<form method="get" action="/devices" class="filter"><label for="tag">Filter by tag</label> <input id="tag" name="tag" value="{tag}"> <button type="submit">Filter</button></form>
<table id="devices"><caption>Devices{tagcap}</caption>
<thead><tr><th scope="col">Device</th><th scope="col">Status</th><th scope="col">Connection</th><th scope="col">Last heartbeat</th><th scope="col">Chutes running / total</th><th scope="col">Agent version</th><th scope="col">Clock</th><th scope="col">Tags</th></tr></thead>
<tbody>{rows}</tbody></table>
<h2>Pending devices</h2>
<p>Compare each fingerprint with what <code>chuted id</code> prints on the device before accepting it.</p>
<table id="pending"><thead><tr><th scope="col">Device</th><th scope="col">Fingerprint</th><th scope="col">Public key</th><th scope="col">Connection</th><th scope="col">Decision</th></tr></thead>
<tbody>{pending}</tbody></table>"#,
        tag = esc(tag.as_deref().unwrap_or("")),
        tagcap = tag
            .as_ref()
            .map_or(String::new(), |t| format!(" tagged {}", esc(t))),
        rows = if rows.is_empty() {
            "<tr><td colspan=\"8\">No devices.</td></tr>".to_owned()
        } else {
            rows
        },
        pending = if pending.is_empty() {
            "<tr><td colspan=\"5\">None.</td></tr>".to_owned()
        } else {
            pending
        },
    );
    page(Some(&ctx), "Devices", &body)
}

async fn decide(app: &App, headers: &HeaderMap, id: &str, csrf: &str, status: &str) -> Response {
    let ctx = match signed_in(app, headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if !session::same(csrf, &ctx.session.csrf) {
        return error_page(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    let verb = if status == "accepted" {
        "accept"
    } else {
        "reject"
    };
    let path = format!("/api/v1/devices/{id}/{verb}");
    if !crate::api::allowed(&ctx.token.role, &Method::POST, &path) {
        return error_page(
            StatusCode::FORBIDDEN,
            &format!(
                "a {} token may not {verb} devices; sign in with the owner's admin token",
                ctx.token.role
            ),
        );
    }
    if proto::DeviceId::from_hex(id).is_err() {
        return error_page(StatusCode::BAD_REQUEST, "not a device id (16 hex digits)");
    }
    let code = match app.store.device_set_status(id, status, now()).await {
        Ok(true) => 303,
        Ok(false) => 404,
        Err(e) => return store_error(e),
    };
    app.hub.wake(id);
    let _ = app
        .store
        .audit(now(), Some(ctx.token.id), "POST", &path, code)
        .await;
    tracing::info!(token = %ctx.token.name, device = %id, status, "console decision");
    if code == 404 {
        return error_page(StatusCode::NOT_FOUND, "no such device");
    }
    Redirect::to("/devices").into_response()
}

async fn accept(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    decide(&app, &headers, &id, &f.csrf, "accepted").await
}

async fn reject(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<CsrfForm>,
) -> Response {
    decide(&app, &headers, &id, &f.csrf, "rejected").await
}

/// The manifest of the newest succeeded deploy of `chute` on `device`: its caps.
fn deployed_manifest(cmds: &[CommandRow], chute: &str) -> Option<chutes::Manifest> {
    let c = cmds.iter().find(|c| {
        c.procedure == "deploy" && c.chute.as_deref() == Some(chute) && c.status == "succeeded"
    })?;
    match wire::decode_command(&c.signed).ok()?.command.args {
        proto::Args::Deploy(d) => chutes::Manifest::from_toml_str(d.manifest_toml.as_str()).ok(),
        _ => None,
    }
}

async fn device_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if proto::DeviceId::from_hex(&id).is_err() {
        return error_page(StatusCode::BAD_REQUEST, "not a device id (16 hex digits)");
    }
    let d = match app.store.device_get(&id).await {
        Ok(Some(d)) => d,
        Ok(None) => return error_page(StatusCode::NOT_FOUND, "no such device"),
        Err(e) => return store_error(e),
    };
    let cmds = match app.store.command_list(Some(&id), None, 500).await {
        Ok(c) => c,
        Err(e) => return store_error(e),
    };
    let hb = heartbeat_of(&d);
    let t = now();
    let mut rows = String::new();
    for c in hb["chutes"].as_array().into_iter().flatten() {
        let Some(name) = c["name"].as_str() else {
            continue;
        };
        let m = deployed_manifest(&cmds, name);
        let s = app.console.history.series(&id, name, t);
        let cpu_cap = m.as_ref().map(|m| f64::from(m.resources.cpu_millicores));
        let mem_cap = m.as_ref().map(|m| m.resources.memory_bytes as f64);
        let down = m.as_ref().and_then(|m| m.network.bandwidth_down_bps);
        let up = m.as_ref().and_then(|m| m.network.bandwidth_up_bps);
        let used = |k: &str| c[k].as_u64();
        let caps = |v: Option<u64>, cap: Option<String>, f: fn(u64) -> String| {
            format!(
                "{} of {}",
                v.map_or("?".into(), f),
                cap.unwrap_or_else(|| "no known cap".into())
            )
        };
        let buttons: String = ["Start", "Stop", "Restart", "Remove"]
            .iter()
            .map(|b| {
                format!(
                    r#"<button type="button" class="sign" data-device="{id}" data-procedure="{p}" data-chute="{n}" aria-label="{b} {n}">{b}</button> "#,
                    id = esc(&id),
                    p = b.to_lowercase(),
                    n = esc(name),
                )
            })
            .collect();
        rows.push_str(&format!(
            r#"<tr data-chute="{n}"><th scope="row">{n}</th><td class="state">{state}</td><td class="restarts">{restarts}</td>
<td>{cpu}{cpu_chart}</td><td>{mem}{mem_chart}</td><td>{bw}{rx_chart}{tx_chart}</td>
<td>{buttons}<a href="/devices/{uid}/logs/{un}">Logs</a></td></tr>"#,
            n = esc(name),
            un = url(name),
            uid = url(&id),
            state = esc(c["state"].as_str().unwrap_or("?")),
            restarts = c["restarts"].as_u64().map_or("?".into(), |r| r.to_string()),
            cpu = esc(&format!(
                "CPU {}",
                caps(used("cpu_millicores"), cpu_cap.map(|c| chutes::format_cpu(c as u64)), chutes::format_cpu)
            )),
            mem = esc(&format!(
                "Memory {}",
                caps(used("memory_bytes"), mem_cap.map(|c| chutes::format_bytes(c as u64)), chutes::format_bytes)
            )),
            bw = esc(&format!(
                "Bandwidth caps: down {}, up {}",
                down.map_or("unshaped".into(), chutes::format_rate),
                up.map_or("unshaped".into(), chutes::format_rate)
            )),
            cpu_chart = html::chart("CPU", &s.cpu, cpu_cap, "m"),
            mem_chart = html::chart("Memory", &s.memory, mem_cap, "bytes"),
            rx_chart = html::chart("Received", &s.rx_bps, down.map(|v| v as f64), "bps"),
            tx_chart = html::chart("Sent", &s.tx_bps, up.map(|v| v as f64), "bps"),
        ));
    }
    let live = app.hub.get(&d.id);
    let body = format!(
        r#"<dl class="facts"><dt>Status</dt><dd>{status}</dd><dt>Connection</dt><dd id="connection">{conn}</dd>
<dt>Last heartbeat</dt><dd id="heartbeat-age">{hbage}</dd><dt>Agent version</dt><dd>{ver}</dd><dt>Clock</dt><dd>{clock}</dd>
<dt>Fingerprint</dt><dd><code>{fp}</code></dd><dt>Tags</dt><dd>{tags}</dd></dl>
<table id="chutes" data-device="{id}"><caption>Chutes (usage from heartbeats; charts: up to the last hour, caps dashed)</caption>
<thead><tr><th scope="col">Chute</th><th scope="col">State</th><th scope="col">Restarts</th><th scope="col">CPU</th><th scope="col">Memory</th><th scope="col">Bandwidth</th><th scope="col">Actions</th></tr></thead>
<tbody>{rows}</tbody></table>
<p id="outcome" role="status" aria-live="polite"></p>"#,
        id = esc(&id),
        status = esc(&d.status),
        conn = live.map_or("offline".to_owned(), |l| format!(
            "connected since {}",
            html::time(l.since)
        )),
        hbage = d
            .last_heartbeat
            .map_or("never".to_owned(), |h| html::age((t - h).max(0))),
        ver = esc(d.agent_version.as_deref().unwrap_or("?")),
        clock = esc(&clock_of(&hb)),
        fp = esc(&fingerprint(&d)),
        tags = esc(&tags_of(&d).join(", ")),
        rows = if rows.is_empty() {
            "<tr><td colspan=\"7\">No chutes reported.</td></tr>".to_owned()
        } else {
            rows
        },
    );
    page(Some(&ctx), &format!("Device {id}"), &body)
}

// ---------- logs ----------

async fn logs_page(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, chute)): Path<(String, String)>,
) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    if proto::DeviceId::from_hex(&id).is_err() || proto::ChuteName::new(chute.as_str()).is_err() {
        return error_page(StatusCode::BAD_REQUEST, "not a device id and chute name");
    }
    let body = format!(
        r#"<p>Live output of <strong>{c}</strong> on <a href="/devices/{uid}">{id}</a>. Following sends a signed <code>logs</code> command; lines are relayed by the cloud (not signed).</p>
<div id="logs" data-device="{id}" data-chute="{c}">
<button type="button" id="follow">Follow</button> <button type="button" id="pause" aria-pressed="false">Pause</button>
<p id="log-state" role="status" aria-live="polite">Not following.</p>
<ol id="log-lines" aria-label="Log lines"></ol>
</div>"#,
        c = esc(&chute),
        id = esc(&id),
        uid = url(&id),
    );
    page(Some(&ctx), &format!("Logs of {chute}"), &body)
}

// ---------- deploy ----------

async fn deploy_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let devices = match app.store.device_list().await {
        Ok(d) => d,
        Err(e) => return store_error(e),
    };
    let mut boxes = String::new();
    for d in devices.iter().filter(|d| d.status == "accepted") {
        boxes.push_str(&format!(
            r#"<label><input type="checkbox" name="device" value="{id}" data-tags="{tags}"> {id} {tagtxt}</label><br>"#,
            id = esc(&d.id),
            tags = esc(&tags_of(d).join(",")),
            tagtxt = esc(&tags_of(d).join(", ")),
        ));
    }
    let body = format!(
        r#"<form id="deploy-form">
<p><label for="manifest-file">chute.toml</label> <input id="manifest-file" type="file" accept=".toml,text/plain"></p>
<p id="manifest-check" role="status" aria-live="polite">Pick the chute's chute.toml: it is checked with the agent's rules before anything is sent.</p>
<p><label for="image-file">Image archive (image.tar; optional)</label> <input id="image-file" type="file"></p>
<fieldset><legend>Devices</legend>{boxes}
<p><label for="deploy-tag">Or every accepted device with tag</label> <input id="deploy-tag" name="tag"></p></fieldset>
<p><label for="upload-progress">Upload</label> <progress id="upload-progress" max="100" value="0">0%</progress> <span id="upload-text"></span></p>
<button type="submit" id="deploy">Deploy</button>
</form>
<table id="outcomes"><caption>Outcome per device</caption><thead><tr><th scope="col">Device</th><th scope="col">Status</th><th scope="col">Verified</th><th scope="col">Detail</th></tr></thead><tbody></tbody></table>"#,
        boxes = if boxes.is_empty() {
            "<p>No accepted devices.</p>".to_owned()
        } else {
            boxes
        },
    );
    page(Some(&ctx), "Deploy", &body)
}

/// Checks a manifest with the agent's own rules (the `chutes` crate), before upload.
async fn validate(State(app): State<Arc<App>>, headers: HeaderMap, body: String) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(_) => {
            return (
                StatusCode::UNAUTHORIZED,
                Json(json!({"error": "sign in first"})),
            )
                .into_response()
        }
    };
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !session::same(sent, &ctx.session.csrf) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": "missing or wrong X-CSRF-Token"})),
        )
            .into_response();
    }
    match chutes::Manifest::from_toml_str(&body) {
        Ok(m) => Json(json!({
            "ok": true,
            "name": m.name.as_str(),
            "version": m.version,
            "image": m.image,
            "cpu": chutes::format_cpu(m.resources.cpu_millicores),
            "memory": chutes::format_bytes(m.resources.memory_bytes),
            "pids": m.resources.pids,
            "bandwidth_down": m.network.bandwidth_down_bps.map(chutes::format_rate),
            "bandwidth_up": m.network.bandwidth_up_bps.map(chutes::format_rate),
        }))
        .into_response(),
        Err(e) => Json(json!({"ok": false, "error": e.to_string()})).into_response(),
    }
}

// ---------- commands ----------

async fn commands_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let (cmds, devices) = match (
        app.store.command_list(None, None, 100).await,
        app.store.device_list().await,
    ) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return store_error(e),
    };
    let mut rows = String::new();
    for c in &cmds {
        let mut timeline = String::new();
        match app.store.command_events(c.id).await {
            Ok(ev) => {
                for e in ev {
                    timeline.push_str(&format!(
                        "<li><time>{}</time> {}{}</li>",
                        html::time(e.at),
                        esc(&e.status),
                        e.detail.map_or(String::new(), |d| format!(": {}", esc(&d)))
                    ));
                }
            }
            Err(e) => return store_error(e),
        }
        let pubkey = devices
            .iter()
            .find(|d| d.id == c.device_id)
            .map_or("", |d| d.pubkey.as_str());
        rows.push_str(&format!(
            r#"<tr><td>{cid}</td><td><a href="/devices/{uid}">{dev}</a></td><td>{proc}</td><td>{chute}</td><td>{status}{reason}</td><td><ol class="timeline">{timeline}</ol></td>
<td class="decoded">{decoded_txt}</td><td class="verify" data-command="{signed}" data-result="{result}" data-pubkey="{pubkey}">{vtxt}</td></tr>"#,
            cid = c.id,
            uid = url(&c.device_id),
            dev = esc(&c.device_id),
            proc = esc(&c.procedure),
            chute = esc(c.chute.as_deref().unwrap_or("")),
            status = esc(&c.status),
            reason = c.reason.as_deref().map_or(String::new(), |r| format!("<br><small>{}</small>", esc(r))),
            signed = esc(&c.signed),
            result = esc(c.result.as_deref().unwrap_or("")),
            pubkey = esc(pubkey),
            decoded_txt = "decoding…",
            vtxt = if c.result.is_some() { "checking…" } else { "no result yet" },
        ));
    }
    let body = format!(
        r#"<p>Newest first. "Verified" is checked in this browser: the result must be signed by the device key (which must hash to the device id) for exactly the command shown.</p>
<table id="commands"><thead><tr><th scope="col">Id</th><th scope="col">Device</th><th scope="col">Procedure</th><th scope="col">Chute</th><th scope="col">Status</th><th scope="col">Timeline</th><th scope="col">Signed command (decoded here)</th><th scope="col">Device-signed result</th></tr></thead>
<tbody>{rows}</tbody></table>"#,
        rows = if rows.is_empty() {
            "<tr><td colspan=\"8\">No commands yet.</td></tr>".to_owned()
        } else {
            rows
        },
    );
    page(Some(&ctx), "Commands", &body)
}

// ---------- keys ----------

async fn keys_page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let ctx = match signed_in(&app, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let owner = match app.store.owner_get().await {
        Ok(o) => o,
        Err(e) => return store_error(e),
    };
    let body = format!(
        r#"<p>This browser signs commands with its own Ed25519 key, generated here and kept in this browser (IndexedDB, not extractable). The cloud never sees it; the fleet owner grants it rights.</p>
<p>This browser's public key: <code id="my-pubkey">…</code></p>
<p><label for="grant-chutes">Chutes to ask for (name or prefix-*)</label> <input id="grant-chutes" value="hello-*"></p>
<p>The fleet owner runs (with the owner key):</p>
<pre id="grant-line"></pre>
<p>Fleet owner key: <code>{owner}</code></p>
<table id="grants"><caption>Grants held by this browser's key</caption><thead><tr><th scope="col">Id</th><th scope="col">Procedures</th><th scope="col">Chutes</th><th scope="col">Devices</th><th scope="col">Expires</th><th scope="col">State</th></tr></thead><tbody></tbody></table>"#,
        owner = esc(owner
            .as_deref()
            .unwrap_or("none registered yet (chutectl owner init)")),
    );
    page(Some(&ctx), "Keys", &body)
}

// ---------- live parts (SSE) ----------

fn sse<S, F, Fut>(state: S, every: Duration, step: F) -> Response
where
    S: Send + 'static,
    F: FnMut(S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Option<(Vec<Event>, S)>> + Send + 'static,
{
    use futures_util::StreamExt;
    let s = futures_util::stream::unfold(
        (state, step, true),
        move |(state, mut step, first)| async move {
            if !first {
                tokio::time::sleep(every).await;
            }
            let (events, state) = step(state).await?;
            Some((futures_util::stream::iter(events), (state, step, false)))
        },
    )
    .flatten()
    .map(Ok::<Event, Infallible>)
    .boxed();
    Sse::new(s).keep_alive(KeepAlive::default()).into_response()
}

fn json_event(name: &str, v: &Value) -> Event {
    Event::default().event(name).data(v.to_string())
}

/// Chute states of a device as the agent last reported them, every second.
async fn device_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
    }
    sse(id, Duration::from_secs(1), move |id| {
        let app = app.clone();
        async move {
            let d = app.store.device_get(&id).await.ok()??;
            let hb = heartbeat_of(&d);
            let chutes: Vec<Value> = hb["chutes"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| json!({"name": c["name"], "state": c["state"], "restarts": c["restarts"]}))
                .collect();
            let v = json!({
                "connected": app.hub.get(&id).is_some(),
                "heartbeat_age_secs": d.last_heartbeat.map(|h| (now() - h).max(0)),
                "chutes": chutes,
            });
            Some((vec![json_event("device", &v)], id))
        }
    })
    .into_response()
}

#[derive(Deserialize)]
struct AfterQuery {
    after: Option<u64>,
}

/// Live log lines of a followed chute (relayed, unsigned), twice a second.
async fn log_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path((id, chute)): Path<(String, String)>,
    Query(q): Query<AfterQuery>,
) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
    }
    let after = q.after.unwrap_or(0);
    sse((after, 0u32), Duration::from_millis(500), move |(after, idle)| {
        let app = app.clone();
        let (id, chute) = (id.clone(), chute.clone());
        async move {
            match app.hub.poll_logs(&id, &chute, after) {
                Some((lines, dropped)) => {
                    let last = lines.last().map_or(after, |l| l.seq);
                    let ev = if lines.is_empty() {
                        vec![]
                    } else {
                        let v = json!({
                            "dropped": dropped,
                            "lines": lines.iter().map(|l| json!({"seq": l.seq, "ts_ms": l.ts_ms, "stream": l.stream, "text": l.text})).collect::<Vec<_>>(),
                        });
                        vec![json_event("lines", &v)]
                    };
                    Some((ev, (last, 0)))
                }
                // Not followed (yet, or any more): say so every few seconds.
                None => {
                    let ev = if idle % 6 == 0 {
                        vec![json_event("waiting", &json!({}))]
                    } else {
                        vec![]
                    };
                    Some((ev, (after, idle + 1)))
                }
            }
        }
    })
    .into_response()
}

/// Each target's newest command of a deployment, with what the browser needs to verify
/// the result itself; a final `done` event once every target has an outcome.
async fn deployment_events(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
    }
    sse(false, Duration::from_secs(1), move |finished| {
        let app = app.clone();
        async move {
            if finished {
                return None;
            }
            let dep = app.store.deployment_get(id).await.ok()??;
            let targets: Vec<String> = serde_json::from_str(&dep.targets).unwrap_or_default();
            let cmds = app.store.command_list(None, Some(id), 1000).await.ok()?;
            let mut out = Vec::new();
            let mut done = true;
            for t in &targets {
                let c = cmds.iter().find(|c| &c.device_id == t);
                let pubkey = app
                    .store
                    .device_get(t)
                    .await
                    .ok()
                    .flatten()
                    .map(|d| d.pubkey);
                let status = c.map_or("pending", |c| c.status.as_str());
                if !matches!(status, "succeeded" | "failed" | "refused" | "expired") {
                    done = false;
                }
                out.push(json!({
                    "device_id": t,
                    "command": c.map(|c| c.id),
                    "status": status,
                    "reason": c.and_then(|c| c.reason.clone()),
                    "signed": c.map(|c| c.signed.clone()),
                    "result": c.and_then(|c| c.result.clone()),
                    "pubkey": pubkey,
                }));
            }
            let mut ev = vec![json_event("outcomes", &json!(out))];
            if done {
                ev.push(json_event("done", &json!({})));
            }
            Some((ev, done))
        }
    })
    .into_response()
}

/// Copies each new heartbeat into the in-memory history (every 2 s).
async fn sample_heartbeats(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let Ok(devices) = app.store.device_list().await else {
            continue;
        };
        let t = now();
        for d in &devices {
            if let Some(at) = d.last_heartbeat {
                app.console.history.record(&d.id, at, &heartbeat_of(d), t);
            }
        }
        let ids: Vec<String> = devices.into_iter().map(|d| d.id).collect();
        app.console.history.retain(&ids);
    }
}
