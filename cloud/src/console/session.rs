//! Console sessions: signing in with an API token gives a random session id in an
//! `HttpOnly`, `SameSite=Strict` cookie (`Secure` under TLS) and a CSRF token that
//! every form and every script POST must carry.
//!
//! Sessions live in memory (one replica; a restart signs everyone out). The session
//! keeps the hash of the API token it was opened with, so revoking that token ends
//! the session at the next request; the token itself is never kept.

use std::collections::HashMap;
use std::sync::Mutex;

use axum::http::HeaderMap;

/// Session lifetime (seconds).
pub const LIFETIME: i64 = 12 * 3600;
/// Sessions kept at most (oldest dropped beyond it), so sign-in floods cannot grow memory.
pub const MAX_SESSIONS: usize = 10_000;
pub const COOKIE: &str = "chute_session";
/// Double-submit cookie protecting the sign-in form itself (before any session exists).
pub const PRE_COOKIE: &str = "chute_signin";

#[derive(Debug, Clone)]
pub struct Session {
    pub token_hash: String,
    pub csrf: String,
    pub expires_at: i64,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn key(id: &str) -> String {
    crate::api::token_hash(id)
}

impl Sessions {
    /// Opens a session; returns (session id for the cookie, the session).
    pub fn open(&self, token_hash: String, now: i64) -> Option<(String, Session)> {
        let id = proto::random_bytes::<32>()
            .ok()
            .map(|b| proto::hex_encode(&b))?;
        let csrf = proto::random_bytes::<32>()
            .ok()
            .map(|b| proto::hex_encode(&b))?;
        let s = Session {
            token_hash,
            csrf,
            expires_at: now + LIFETIME,
        };
        let mut m = self.map.lock().ok()?;
        m.retain(|_, s| s.expires_at > now);
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(k, _)| k.clone())
            {
                m.remove(&oldest);
            }
        }
        m.insert(key(&id), s.clone());
        Some((id, s))
    }

    pub fn get(&self, id: &str, now: i64) -> Option<Session> {
        let m = self.map.lock().ok()?;
        m.get(&key(id)).filter(|s| s.expires_at > now).cloned()
    }

    pub fn close(&self, id: &str) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(&key(id));
        }
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Constant-time comparison for CSRF tokens.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && !a.is_empty()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// `Set-Cookie` for `name=value` with the console's attributes; `max_age` 0 deletes.
pub fn set_cookie(name: &str, value: &str, max_age: i64, secure: bool) -> String {
    format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_close() {
        let s = Sessions::default();
        let (id, sess) = s.open("h".into(), 100).expect("opens");
        assert_eq!(s.get(&id, 101).expect("open").csrf, sess.csrf);
        assert!(s.get(&id, 100 + LIFETIME).is_none(), "expired");
        assert!(s.get("other", 101).is_none());
        s.close(&id);
        assert!(s.get(&id, 101).is_none(), "closed");
    }

    #[test]
    fn cookies_and_csrf() {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::header::COOKIE,
            "a=1; chute_session=abc; b=2".parse().expect("header"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), None);
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("", "") && !same("ab", "abc"));
        assert!(
            set_cookie("x", "y", 5, true).contains("HttpOnly; SameSite=Strict; Max-Age=5; Secure")
        );
    }
}
