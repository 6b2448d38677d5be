//! The console through the real router and a real (SQLite) store: sign-in, CSRF,
//! escaping of what a device reports, CSP, sign-out. The browser flows are in
//! tests/tests/console.rs (headless Chromium).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use tower::ServiceExt;

use crate::store::{HeartbeatRow, SqlStore};
use crate::{api, now, App};

struct Env {
    app: Arc<App>,
    dir: std::path::PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn env() -> Env {
    let dir = std::env::temp_dir().join(format!(
        "chute-console-test-{}-{}",
        std::process::id(),
        proto::hex_encode(&proto::random_bytes::<4>().unwrap())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqlStore::open(&format!("sqlite://{}", dir.join("c.db").display()))
        .await
        .unwrap();
    let app = Arc::new(App {
        store: Arc::new(store),
        hub: crate::agent::Hub::default(),
        blobs: crate::blobs::Blobs::new(&dir).unwrap(),
        handshakes: Arc::new(tokio::sync::Semaphore::new(1)),
        console: super::Console::default(),
        conns: crate::conns::Limiter::new(crate::conns::Limits::default()),
    });
    Env { app, dir }
}

async fn send(app: &Arc<App>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, String) {
    let r = api::router(app.clone()).oneshot(req).await.unwrap();
    let (parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn cookie_value(h: &axum::http::HeaderMap, name: &str) -> String {
    h.get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.split(';').next())
        .expect("cookie set")
        .to_owned()
}

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf-token\" content=\"").unwrap() + 27;
    page[at..at + 64].to_owned()
}

#[tokio::test]
async fn sign_in_csrf_escaping_and_sign_out() {
    let e = env().await;
    let token = "cc-test-token";
    e.app
        .store
        .token_insert("admin", &api::token_hash(token), "admin", now())
        .await
        .unwrap();
    // A device that reports hostile names and texts in its heartbeat.
    let key = proto::Keypair::from_seed([7; 32]);
    let id = key.device_id().to_hex();
    e.app
        .store
        .device_insert(&id, &key.public().to_hex(), "accepted", now())
        .await
        .unwrap();
    let hb = serde_json::json!({"chutes_running": 1, "chutes_total": 1, "clock": "<b>synced</b>",
        "chutes": [{"name": "<script>alert(1)</script>", "state": "<img src=x onerror=alert(2)>", "restarts": 0,
            "cpu_millicores": 1, "memory_bytes": 1, "rx_bytes": 0, "tx_bytes": 0}]});
    e.app
        .store
        .device_heartbeats(&[HeartbeatRow {
            device: id.clone(),
            agent_version: "<i>1.0</i>".into(),
            json: hb.to_string(),
            at: now(),
        }])
        .await
        .unwrap();

    // Signed out: every page sends to the sign-in page.
    let (st, h, _) = send(&e.app, get("/devices", "")).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    assert_eq!(h[header::LOCATION], "/signin");

    // Sign in: the form's CSRF value must match its cookie.
    let (st, h, page) = send(&e.app, get("/signin", "")).await;
    assert_eq!(st, StatusCode::OK);
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe"),
        "{csp}"
    );
    assert!(
        !page.contains("<script>")
            && page.contains("<script type=\"module\" src=\"/assets/console.js\">")
    );
    let pre = cookie_value(&h, super::session::PRE_COOKIE);
    let signin = |csrf: &str, tok: &str| {
        Request::post("/signin")
            .header(
                header::COOKIE,
                format!("{}={pre}", super::session::PRE_COOKIE),
            )
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={tok}&csrf={csrf}")))
            .unwrap()
    };
    let (st, _, _) = send(&e.app, signin("forged", token)).await;
    assert_eq!(st, StatusCode::FORBIDDEN);
    let (st, _, _) = send(&e.app, signin(&pre, "cc-wrong")).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
    let (st, h, _) = send(&e.app, signin(&pre, token)).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let set = h[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = format!(
        "{}={}",
        super::session::COOKIE,
        cookie_value(&h, super::session::COOKIE)
    );

    // What the device reported is text on the page, never markup.
    let (st, _, page) = send(&e.app, get(&format!("/devices/{id}"), &cookie)).await;
    assert_eq!(st, StatusCode::OK);
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(page.contains("&lt;i&gt;1.0&lt;/i&gt;") && page.contains("&lt;b&gt;synced&lt;/b&gt;"));
    assert!(!page.contains("<script>alert") && !page.contains("<img src=x"));
    let (_, _, list) = send(&e.app, get("/devices", &cookie)).await;
    assert!(list.contains("&lt;b&gt;synced&lt;/b&gt;") && !list.contains("<b>synced"));

    // The API takes the session cookie; mutating calls need the page's CSRF token.
    let csrf = csrf_of(&page);
    let post = |csrf: Option<&str>| {
        let mut r = Request::post("/api/v1/claim-tokens")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(c) = csrf {
            r = r.header("x-csrf-token", c);
        }
        r.body(Body::from("{}")).unwrap()
    };
    let (st, _, body) = send(&e.app, post(None)).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, _, body) = send(&e.app, post(Some(&"0".repeat(64)))).await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{body}");
    let (st, _, body) = send(&e.app, post(Some(&csrf))).await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // Sign out ends the session for pages and the API.
    let (st, _, _) = send(
        &e.app,
        Request::post("/signout")
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={csrf}")))
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    let (st, h, _) = send(&e.app, get("/devices", &cookie)).await;
    assert_eq!(
        (st, &h[header::LOCATION]),
        (StatusCode::SEE_OTHER, &"/signin".parse().unwrap())
    );
    let (st, _, _) = send(&e.app, get("/api/v1/devices", &cookie)).await;
    assert_eq!(st, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_developer_token_cannot_admit_devices_from_the_console() {
    let e = env().await;
    e.app
        .store
        .token_insert("alice", &api::token_hash("cc-dev"), "developer", now())
        .await
        .unwrap();
    let key = proto::Keypair::from_seed([9; 32]);
    let id = key.device_id().to_hex();
    e.app
        .store
        .device_insert(&id, &key.public().to_hex(), "pending", now())
        .await
        .unwrap();
    let (id_cookie, session) = e
        .app
        .console
        .sessions
        .open(api::token_hash("cc-dev"), now())
        .unwrap();
    let cookie = format!("{}={id_cookie}", super::session::COOKIE);
    let (st, _, page) = send(
        &e.app,
        Request::post(format!("/devices/{id}/accept"))
            .header(header::COOKIE, &cookie)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("csrf={}", session.csrf)))
            .unwrap(),
    )
    .await;
    assert_eq!(st, StatusCode::FORBIDDEN, "{page}");
    assert!(page.contains("developer token may not accept"), "{page}");
    let d = e.app.store.device_get(&id).await.unwrap().unwrap();
    assert_eq!(d.status, "pending");
}

#[test]
fn the_device_clock_reads_as_its_state_and_skew() {
    use serde_json::json;
    let hb = json!({"clock": {"secs": 1_700_000_000, "state": "ok", "skew_secs": -2}});
    assert_eq!(super::clock_of(&hb), "ok (-2 s skew)");
    let hb = json!({"clock": {"secs": 0, "state": "unset", "skew_secs": 0}});
    assert_eq!(super::clock_of(&hb), "unset (+0 s skew)");
    assert_eq!(super::clock_of(&json!({})), "not reported");
}
