//! The local admin protocol: newline-delimited JSON over a root-only (0600) Unix socket.
//!
//! One request per connection. The agent answers with zero or more `progress` / `log`
//! lines and then exactly one final line, `{"ok": ...}` or `{"error": "..."}`. JSON keeps
//! the CLI scriptable with `--json` and costs nothing extra: the Podman API already needs
//! serde_json.

use serde::{Deserialize, Serialize};

/// Longest request line the agent reads; a manifest is a few KB.
pub const MAX_REQUEST: usize = 256 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// `dir` is where the CLI found `chute.toml`; an image archive beside it is loaded.
    Deploy {
        manifest_toml: String,
        dir: Option<String>,
    },
    List,
    Inspect {
        name: String,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    Remove {
        name: String,
    },
    Logs {
        name: String,
        follow: bool,
        tail: Option<u32>,
    },
    Status,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress(String),
    Log { stream: String, line: String },
    Ok(serde_json::Value),
    Error(String),
}

/// What `list` shows of a chute (and the head of `inspect`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChuteSummary {
    pub name: String,
    pub state: chutes::ChuteState,
    pub container_id: Option<String>,
    pub restarts: u32,
    pub version: String,
    pub image: String,
}
