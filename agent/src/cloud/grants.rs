//! The grant-supersession floors on disk (`grants.bin`): the one rule of
//! [`proto::GrantFloors`], persisted. Written by `update-grant` over the link and by
//! `chuted revoke` on the device, read afresh for every command, so a local revocation
//! applies to the running agent's next command without a restart.
//!
//! Fail closed: a store that cannot be read or does not check out refuses every command
//! (a lost floor would silently revive revoked grants) until the owner acts with
//! `chuted revoke --all`, which sets the broken file aside and starts a store that
//! supersedes every grant issued until then.
//!
//! Layout: `CHGF`, format version (u16 LE), payload length (u32 LE), CRC-32 (u32 LE),
//! postcard of [`GrantFloors`]. The version-1 file (a postcard list of installed
//! grants, no header) is read once and converted.

use std::path::{Path, PathBuf};

use proto::{GrantFloors, GrantUpdateError, PublicKey, SignedGrant};

use crate::snapshot::{crc32, write_atomic};

pub const GRANTS_FILE: &str = "grants.bin";
const MAGIC: [u8; 4] = *b"CHGF";
const FORMAT: u16 = 2;
const HEADER: usize = 4 + 2 + 4 + 4;

#[derive(Debug, thiserror::Error)]
pub enum GrantStoreError {
    #[error(
        "grant store {path} is unreadable ({reason}); every command is refused because \
         revocations in it could be lost. Inspect it, then run `chuted revoke --all \
         --state-dir {dir}` to set it aside and supersede every grant issued until now \
         (re-issue the grants that should still work)"
    )]
    Unreadable {
        path: PathBuf,
        dir: PathBuf,
        reason: String,
    },
    #[error("cannot write grant store {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Update(#[from] GrantUpdateError),
    #[error("developer key {given:?}: {reason} (expected 64 hex characters)")]
    BadKey { given: String, reason: String },
    #[error("give exactly one of --developer HEX or --all")]
    Usage,
}

/// The floors file of one state directory.
#[derive(Debug, Clone)]
pub struct GrantStore {
    path: PathBuf,
}

fn encode(floors: &GrantFloors) -> Vec<u8> {
    let payload = floors.to_bytes();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode(bytes: &[u8]) -> Result<GrantFloors, String> {
    if !bytes.starts_with(&MAGIC) {
        // Version 1: the installed grants themselves; their issue times are the floors.
        let legacy: Vec<SignedGrant> = postcard::from_bytes(bytes)
            .map_err(|e| format!("neither a grant store nor a version-1 grant list: {e}"))?;
        let mut floors = GrantFloors::default();
        for g in legacy {
            floors
                .raise(&g.grant.developer, g.grant.issued_at)
                .map_err(|e| e.to_string())?;
        }
        return Ok(floors);
    }
    if bytes.len() < HEADER {
        return Err(format!("truncated at {} bytes", bytes.len()));
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != FORMAT {
        return Err(format!(
            "format version {version}, this agent reads {FORMAT}"
        ));
    }
    let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    let stored = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    let payload = &bytes[HEADER..];
    if payload.len() != len {
        return Err(format!(
            "payload is {} bytes, header says {len}",
            payload.len()
        ));
    }
    if crc32(payload) != stored {
        return Err("checksum mismatch".into());
    }
    GrantFloors::from_bytes(payload).map_err(|e| e.to_string())
}

impl GrantStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join(GRANTS_FILE),
        }
    }

    fn unreadable(&self, reason: String) -> GrantStoreError {
        GrantStoreError::Unreadable {
            path: self.path.clone(),
            dir: self
                .path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            reason,
        }
    }

    /// The floors now on disk (none yet: no grant superseded).
    pub fn load(&self) -> Result<GrantFloors, GrantStoreError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => decode(&bytes).map_err(|r| self.unreadable(r)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GrantFloors::default()),
            Err(e) => Err(self.unreadable(e.to_string())),
        }
    }

    pub fn save(&self, floors: &GrantFloors) -> Result<(), GrantStoreError> {
        write_atomic(&self.path, &encode(floors), 0o600).map_err(|source| GrantStoreError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// `chuted revoke --developer`: grants for `developer` issued at or before `now`
    /// stop working. Refused on a broken store (use [`GrantStore::revoke_all`]).
    pub fn revoke(&self, developer: &PublicKey, now: u64) -> Result<GrantFloors, GrantStoreError> {
        let mut floors = self.load()?;
        floors.revoke(developer, now)?;
        self.save(&floors)?;
        Ok(floors)
    }

    /// `chuted revoke --all`: every grant issued at or before `now` stops working. A
    /// broken store is set aside (`grants.bin.broken`) and replaced; a readable one
    /// keeps its per-developer floors.
    pub fn revoke_all(&self, now: u64) -> Result<(GrantFloors, Option<PathBuf>), GrantStoreError> {
        let (mut floors, aside) = match self.load() {
            Ok(f) => (f, None),
            Err(GrantStoreError::Unreadable { .. }) => {
                let aside = self.path.with_extension("bin.broken");
                std::fs::rename(&self.path, &aside).map_err(|source| GrantStoreError::Write {
                    path: aside.clone(),
                    source,
                })?;
                (GrantFloors::default(), Some(aside))
            }
            Err(e) => return Err(e),
        };
        floors.revoke_all(now);
        self.save(&floors)?;
        Ok((floors, aside))
    }
}

/// `chuted revoke`: what to print on success.
pub fn revoke_cli(
    state_dir: &Path,
    developer: Option<&str>,
    all: bool,
    now: u64,
) -> Result<String, GrantStoreError> {
    let store = GrantStore::new(state_dir);
    match (developer, all) {
        (Some(hex), false) => {
            let key = PublicKey::from_hex(hex).map_err(|e| GrantStoreError::BadKey {
                given: hex.to_owned(),
                reason: e.to_string(),
            })?;
            store.revoke(&key, now)?;
            Ok(format!(
                "revoked grants for developer {key} issued at or before {now} ({})",
                store.path.display()
            ))
        }
        (None, true) => {
            let (_, aside) = store.revoke_all(now)?;
            let note = aside
                .map(|p| format!("; the unreadable store was kept as {}", p.display()))
                .unwrap_or_default();
            Ok(format!(
                "revoked every developer grant issued at or before {now} ({}){note}",
                store.path.display()
            ))
        }
        _ => Err(GrantStoreError::Usage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{testkit, Rights};

    #[test]
    fn floors_round_trip_and_legacy_lists_convert() {
        let dir = tempfile::tempdir().unwrap();
        let s = GrantStore::new(dir.path());
        assert_eq!(s.load().unwrap(), GrantFloors::default());
        let dev = testkit::developer();
        s.revoke(&dev.public(), 1000).unwrap();
        assert_eq!(s.load().unwrap().floor_for(&dev.public()), 1001);
        // A version-1 file: the list of installed grants.
        let g = testkit::grant_for(&dev, Rights::NONE, &["web"], 200_000).sign(&testkit::owner());
        std::fs::write(
            dir.path().join(GRANTS_FILE),
            postcard::to_allocvec(&vec![g.clone()]).unwrap(),
        )
        .unwrap();
        assert_eq!(
            s.load().unwrap().floor_for(&dev.public()),
            g.grant.issued_at
        );
    }

    #[test]
    fn a_corrupt_grant_store_refuses_until_the_owner_resets_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = GrantStore::new(dir.path());
        let dev = testkit::developer().public();
        s.revoke(&dev, 1000).unwrap();
        let mut bytes = std::fs::read(dir.path().join(GRANTS_FILE)).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(dir.path().join(GRANTS_FILE), &bytes).unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("grants.bin") && e.contains("checksum"), "{e}");
        assert!(e.contains("chuted revoke --all"), "says what to do: {e}");
        // Revoking one developer would drop the others' floors: refused.
        assert!(s.revoke(&dev, 2000).is_err());
        let (floors, aside) = s.revoke_all(5000).unwrap();
        assert!(aside.unwrap().exists(), "the broken file is kept");
        assert_eq!(floors.floor_for(&dev), 5001);
        assert_eq!(s.load().unwrap(), floors);
    }
}
