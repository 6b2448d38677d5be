//! What the cloud link keeps on disk and in bounded memory: the replay window (persisted
//! before any command runs), installed grants, and recent signed results (so a resent
//! request gets its result again instead of a second execution).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use proto::{Grant, PublicKey, ReplayReason, ReplayWindow, SignedGrant, SignedResult};

use crate::snapshot::write_atomic;

pub const WINDOW_FILE: &str = "replay.window";
pub const GRANTS_FILE: &str = "grants.bin";
/// Developer keys with an installed grant.
pub const MAX_GRANTS: usize = 64;
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

/// The newest owner-signed grant per developer key, installed by `update-grant`. A
/// command carrying an older grant than the installed one is refused, which is how an
/// owner narrows or revokes a developer's rights before the old grant expires.
#[derive(Debug)]
pub struct GrantStore {
    grants: Vec<SignedGrant>,
    path: PathBuf,
}

impl GrantStore {
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(GRANTS_FILE);
        let grants = match std::fs::read(&path) {
            Ok(bytes) => match postcard::from_bytes::<Vec<SignedGrant>>(&bytes) {
                Ok(g) => g,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "installed grants unreadable; ignoring them");
                    Vec::new()
                }
            },
            Err(_) => Vec::new(),
        };
        Self { grants, path }
    }

    /// `Some(newer issued_at)` when a newer grant for the same developer is installed.
    pub fn superseded_by(&self, grant: &Grant) -> Option<u64> {
        self.grants
            .iter()
            .find(|g| g.grant.developer == grant.developer)
            .map(|g| g.grant.issued_at)
            .filter(|newest| *newest > grant.issued_at)
    }

    /// Installs `grant` (already checked to be signed by the owner) if it is newer than
    /// the one held for its developer. Returns whether it was installed.
    pub fn install(&mut self, grant: SignedGrant) -> Result<bool, StoreError> {
        let mut next = self.grants.clone();
        match next
            .iter_mut()
            .find(|g| g.grant.developer == grant.grant.developer)
        {
            Some(old) if old.grant.issued_at >= grant.grant.issued_at => return Ok(false),
            Some(old) => *old = grant,
            None => {
                if next.len() >= MAX_GRANTS {
                    // Forget the grant that expires first: it is the least useful.
                    if let Some(pos) = next
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, g)| g.grant.expires_at)
                        .map(|(i, _)| i)
                    {
                        next.swap_remove(pos);
                    }
                }
                next.push(grant);
            }
        }
        let bytes = postcard::to_allocvec(&next).expect("postcard encoding of grants cannot fail");
        write_atomic(&self.path, &bytes, 0o600).map_err(|source| StoreError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.grants = next;
        Ok(true)
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
    fn newer_grant_supersedes_older() {
        let dir = tempfile::tempdir().unwrap();
        let (own, dev) = (testkit::owner(), testkit::developer());
        let old = testkit::grant_for(&dev, proto::Rights::all(), &[""], 100_000);
        let new = testkit::grant_for(&dev, proto::Rights::NONE, &[""], 200_000);
        let mut g = GrantStore::load(dir.path());
        assert_eq!(g.superseded_by(&old), None);
        assert!(g.install(new.clone().sign(&own)).unwrap());
        assert!(
            !g.install(old.clone().sign(&own)).unwrap(),
            "older never replaces newer"
        );
        let g = GrantStore::load(dir.path());
        assert_eq!(g.superseded_by(&old), Some(new.issued_at));
        assert_eq!(g.superseded_by(&new), None);
    }
}
