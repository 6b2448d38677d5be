//! What the cloud link keeps on disk and in bounded memory: the replay window and the
//! command order (both persisted before any command runs), and recent signed results
//! (so a resent request gets its result again instead of a second execution). The
//! grant floors are in `grants.rs`.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use proto::{Command, CommandOrder, PublicKey, ReplayReason, ReplayWindow, SignedResult};

use crate::snapshot::write_atomic;

pub const WINDOW_FILE: &str = "replay.window";
pub const ORDER_FILE: &str = "order.bin";
/// Results remembered for resends, by count and by payload bytes.
pub const RESULT_CACHE: usize = 64;
pub const RESULT_CACHE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{reason}")]
    Replay { reason: ReplayReason },
    #[error(
        "command issued at {issued_at} predates {not_before}, when this agent found its replay \
         window unreadable; it may have run already, re-issue it"
    )]
    WindowLost { issued_at: u64, not_before: u64 },
    #[error("cannot persist {path}: {source}; the command was not run")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The replay window and its file.
#[derive(Debug)]
pub struct ReplayStore {
    window: ReplayWindow,
    path: PathBuf,
    /// Set when the window file was unreadable: commands issued at or before this may
    /// have run before, so they are refused.
    not_before: u64,
}

impl ReplayStore {
    /// Loads the window; an unreadable one is moved aside and replaced by an empty
    /// window that refuses everything issued up to `now + max_skew`.
    pub fn load(state_dir: &Path, now: u64, max_skew: u64) -> Self {
        let path = state_dir.join(WINDOW_FILE);
        let (window, not_before) = match std::fs::read(&path) {
            Ok(bytes) => match ReplayWindow::from_bytes(&bytes) {
                Ok(w) => (w, 0),
                Err(e) => {
                    let aside = state_dir.join(format!("{WINDOW_FILE}.corrupt"));
                    let _ = std::fs::rename(&path, &aside);
                    tracing::warn!(path = %path.display(), error = %e, moved_to = %aside.display(),
                        "replay window unreadable; refusing commands issued before now");
                    (ReplayWindow::new(), now.saturating_add(max_skew))
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ReplayWindow::new(), 0),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e,
                    "replay window unreadable; refusing commands issued before now");
                (ReplayWindow::new(), now.saturating_add(max_skew))
            }
        };
        Self {
            window,
            path,
            not_before,
        }
    }

    /// Records `(signer, request_id)` and writes the window to disk before returning,
    /// so a crash right after cannot make the command runnable again. On any failure
    /// the window is unchanged.
    pub fn accept(
        &mut self,
        signer: &PublicKey,
        request_id: u64,
        issued_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        if self.not_before > 0 && issued_at <= self.not_before {
            return Err(StoreError::WindowLost {
                issued_at,
                not_before: self.not_before,
            });
        }
        let mut next = self.window.clone();
        next.accept(signer, request_id, issued_at, now)
            .map_err(|reason| StoreError::Replay { reason })?;
        write_atomic(&self.path, &next.to_bytes(), 0o600).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.window = next;
        Ok(())
    }
}

/// Per-chute order and the time floor ([`CommandOrder`]) and their file, written before
/// a command runs. An unreadable file is moved aside; the agent then judges time from
/// at least the moment it found it so (its clock), and refuses commands issued before
/// that plus the skew, like the replay window.
#[derive(Debug)]
pub struct OrderStore {
    order: CommandOrder,
    path: PathBuf,
    not_before: u64,
}

impl OrderStore {
    pub fn load(state_dir: &Path, now: u64, max_skew: u64) -> Self {
        let path = state_dir.join(ORDER_FILE);
        let lost = |why: String| {
            let aside = state_dir.join(format!("{ORDER_FILE}.corrupt"));
            let _ = std::fs::rename(&path, &aside);
            tracing::warn!(path = %path.display(), error = %why, moved_to = %aside.display(),
                "command order unreadable; refusing commands issued before now");
            (CommandOrder::new(), now.saturating_add(max_skew))
        };
        let (order, not_before) = match std::fs::read(&path) {
            Ok(bytes) => match CommandOrder::from_bytes(&bytes) {
                Ok(o) => (o, 0),
                Err(e) => lost(e.to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (CommandOrder::new(), 0),
            Err(e) => lost(e.to_string()),
        };
        Self {
            order,
            path,
            not_before,
        }
    }

    pub fn order(&self) -> &CommandOrder {
        &self.order
    }

    /// The device time commands are judged by (never below the floor nor, after a lost
    /// file, below the moment it was found lost).
    pub fn judge_time(&self, clock: u64) -> u64 {
        self.order
            .judge_time(clock)
            .max(self.not_before.saturating_sub(1))
    }

    pub fn note_expired_on_arrival(&mut self, issued_at: u64) {
        self.order.note_expired_on_arrival(issued_at);
    }

    /// Refuses a stale command (and, after a lost file, any issued before the loss).
    pub fn check(&self, cmd: &Command) -> Result<(), (proto::ErrorCode, String)> {
        if self.not_before > 0 && cmd.issued_at <= self.not_before {
            return Err((
                proto::ErrorCode::Stale,
                format!(
                    "request {}: issued at {}, before {} when this agent found its command order \
                 unreadable; re-issue it",
                    cmd.request_id, cmd.issued_at, self.not_before
                ),
            ));
        }
        self.order.check(cmd).map_err(|e| (e.code(), e.to_string()))
    }

    /// Records an accepted command and writes the file before returning; unchanged on
    /// failure.
    pub fn record(&mut self, cmd: &Command) -> Result<(), StoreError> {
        let mut next = self.order.clone();
        next.record(cmd);
        write_atomic(&self.path, &next.to_bytes(), 0o600).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.order = next;
        Ok(())
    }
}

/// Recent results, keyed by signer and signed request id.
#[derive(Debug, Default)]
pub struct ResultCache {
    entries: VecDeque<(PublicKey, SignedResult)>,
    bytes: usize,
}

fn result_bytes(r: &SignedResult) -> usize {
    match &r.outcome {
        proto::Outcome::Ok(b) => b.len(),
        proto::Outcome::Err { message, .. } => message.len(),
    }
}

impl ResultCache {
    pub fn get(&self, signer: &PublicKey, request_id: u64) -> Option<&SignedResult> {
        self.entries
            .iter()
            .find(|(s, r)| s == signer && r.request_id == request_id)
            .map(|(_, r)| r)
    }

    pub fn insert(&mut self, signer: PublicKey, result: SignedResult) {
        self.bytes += result_bytes(&result);
        self.entries.push_back((signer, result));
        while self.entries.len() > RESULT_CACHE
            || (self.bytes > RESULT_CACHE_BYTES && self.entries.len() > 1)
        {
            if let Some((_, old)) = self.entries.pop_front() {
                self.bytes -= result_bytes(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::testkit;

    #[test]
    fn window_survives_reload_and_refuses_replay() {
        let dir = tempfile::tempdir().unwrap();
        let dev = testkit::developer().public();
        let mut s = ReplayStore::load(dir.path(), 100, 60);
        s.accept(&dev, 7, 100, 100).unwrap();
        let mut s = ReplayStore::load(dir.path(), 200, 60);
        assert!(matches!(
            s.accept(&dev, 7, 100, 200),
            Err(StoreError::Replay { .. })
        ));
        s.accept(&dev, 8, 100, 200).unwrap();
    }

    #[test]
    fn corrupt_window_refuses_older_commands() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(WINDOW_FILE), b"\xff\xff\xff garbage").unwrap();
        let dev = testkit::developer().public();
        let mut s = ReplayStore::load(dir.path(), 1000, 60);
        assert!(matches!(
            s.accept(&dev, 1, 1050, 1000),
            Err(StoreError::WindowLost { .. })
        ));
        s.accept(&dev, 1, 1061, 1000).unwrap();
        assert!(dir.path().join("replay.window.corrupt").exists());
    }

    #[test]
    fn failed_persist_leaves_window_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let dev = testkit::developer().public();
        let mut s = ReplayStore::load(dir.path(), 100, 60);
        s.path = dir.path().join("missing-dir").join(WINDOW_FILE);
        assert!(matches!(
            s.accept(&dev, 1, 100, 100),
            Err(StoreError::Io { .. })
        ));
        s.path = dir.path().join(WINDOW_FILE);
        s.accept(&dev, 1, 100, 100).unwrap();
    }

    #[test]
    fn stale_commands_stay_refused_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let new = |id, issued_at| Command {
            device_id: testkit::device().device_id(),
            request_id: id,
            issued_at,
            expires_at: issued_at + 300,
            args: testkit::start_args("web"),
            grant_digest: [0; 32],
        };
        let mut s = OrderStore::load(dir.path(), 1000, 60);
        s.check(&new(2, 1000)).unwrap();
        s.record(&new(2, 1000)).unwrap();
        let s = OrderStore::load(dir.path(), 10, 60);
        let (code, e) = s.check(&new(1, 990)).unwrap_err();
        assert_eq!(code, proto::ErrorCode::Stale);
        assert!(e.contains("stale"), "{e}");
        assert_eq!(
            s.judge_time(10),
            1000,
            "the clock set back is judged at the floor"
        );
        assert_eq!(s.order().clock_state(10), proto::ClockState::BehindFloor);
    }
}
