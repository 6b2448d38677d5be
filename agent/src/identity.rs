//! The device's identity and its trust root, both kept in the state directory.
//!
//! * `device.key`: the device's Ed25519 secret seed as 64 hex characters, created on
//!   first use with mode 0600 from birth (never briefly readable by others). It signs
//!   the session challenge and every command result.
//! * `owner.key`: the owner's public key (64 hex characters), written by
//!   `chuted trust`. The config key `owner_key` may name it instead; if both are set
//!   they must agree, so an operator never wonders which one the agent obeys.
//!
//! What this module is not: a key store for anyone else's secrets, or a way to rotate
//! the device key (a new key is a new device id; delete `device.key` on purpose).
//! Nothing here logs key material; errors name files and lengths, never contents.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use proto::{hex_decode, hex_encode, Keypair, PublicKey};

use crate::snapshot::write_atomic;

/// File name of the device's secret key in the state dir.
pub const DEVICE_KEY_FILE: &str = "device.key";
/// File name of the trusted owner's public key in the state dir.
pub const OWNER_KEY_FILE: &str = "owner.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a key of 64 hex characters ({reason}); move it aside to create a new one"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "{path} has mode {mode:03o}: group or others may read or change it, so it is not \
         trusted; check who could have read or replaced it, then `chmod 600 {path}` (or \
         remove it to start over)"
    )]
    LooseMode { path: PathBuf, mode: u32 },
    #[error("cannot create the device key: {reason}")]
    Random { reason: String },
    #[error("owner key {given:?} is not an Ed25519 public key: {reason} (expected 64 hex characters, as printed by the owner's tool)")]
    BadOwnerKey { given: String, reason: String },
    #[error(
        "the config's owner_key ({config}) differs from {path} ({file}); \
         remove one of them so it is clear which owner this device obeys"
    )]
    OwnerConflict {
        path: PathBuf,
        config: PublicKey,
        file: PublicKey,
    },
}

/// Refuses a key file that group or others can access. Not silently tightened: a
/// secret that was readable may have been copied, and a trust root that was writable
/// may have been replaced; the owner decides.
fn check_mode(path: &Path) -> Result<(), IdentityError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(IdentityError::LooseMode {
            path: path.to_owned(),
            mode: meta.permissions().mode() & 0o777,
        }),
        _ => Ok(()),
    }
}

fn read_hex32(path: &Path) -> Result<Option<[u8; 32]>, IdentityError> {
    check_mode(path)?;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            hex_decode::<32>("key", text.trim())
                .map(Some)
                .map_err(|e| IdentityError::Corrupt {
                    path: path.to_owned(),
                    // KeyError::HexDigit echoes its input: for the secret key that would
                    // put the seed in an error message, so only the kind is kept.
                    reason: match e {
                        proto::KeyError::HexLength { got, .. } => format!("{got} characters"),
                        _ => "not hex".to_owned(),
                    },
                })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Loads the device key from `state_dir`, creating it (0600) if absent. A key file
/// that group or others can access is refused with the fix (see [`check_mode`]).
pub fn load_or_create_device_key(state_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = state_dir.join(DEVICE_KEY_FILE);
    if let Some(seed) = read_hex32(&path)? {
        return Ok(Keypair::from_seed(seed));
    }
    let key = Keypair::generate().map_err(|e| IdentityError::Random {
        reason: e.to_string(),
    })?;
    let mut text = hex_encode(&key.seed());
    text.push('\n');
    write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| IdentityError::Write {
        path: path.clone(),
        source,
    })?;
    tracing::info!(device = %key.device_id(), "created device key");
    Ok(key)
}

/// Parses an owner key as given on the command line or in the config.
pub fn parse_owner_key(hex: &str) -> Result<PublicKey, IdentityError> {
    let bad = |reason: String| IdentityError::BadOwnerKey {
        given: hex.to_owned(),
        reason,
    };
    let key = PublicKey::from_hex(hex).map_err(|e| bad(e.to_string()))?;
    key.verifying_key().map_err(|e| bad(e.to_string()))?;
    Ok(key)
}

/// Stores `owner` as this device's trust root (atomic, 0600).
pub fn trust_owner(state_dir: &Path, owner: &PublicKey) -> Result<PathBuf, IdentityError> {
    let path = state_dir.join(OWNER_KEY_FILE);
    let mut text = owner.to_hex();
    text.push('\n');
    write_atomic(&path, text.as_bytes(), 0o600).map_err(|source| IdentityError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The owner key the agent obeys: the config's `owner_key` and/or `owner.key` in the
/// state dir (they must agree when both exist). `None` means no command can be
/// authorised until one is set.
pub fn owner_key(
    state_dir: &Path,
    config_owner: Option<&str>,
) -> Result<Option<PublicKey>, IdentityError> {
    let path = state_dir.join(OWNER_KEY_FILE);
    let file = read_hex32(&path)?.map(PublicKey);
    let config = config_owner.map(parse_owner_key).transpose()?;
    match (config, file) {
        (Some(config), Some(file)) if config != file => {
            Err(IdentityError::OwnerConflict { path, config, file })
        }
        (Some(k), _) | (None, Some(k)) => Ok(Some(k)),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn device_key_is_created_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_device_key(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(DEVICE_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "device key mode {mode:o}");
        let b = load_or_create_device_key(dir.path()).unwrap();
        assert_eq!(a.public(), b.public(), "the key must survive a restart");
    }

    #[test]
    fn loose_key_files_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create_device_key(dir.path()).unwrap();
        let p = dir.path().join(DEVICE_KEY_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = load_or_create_device_key(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("device.key") && e.contains("640") && e.contains("chmod 600"),
            "{e}"
        );
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o640, "not silently changed");
        // The owner key too.
        let owner = proto::testkit::owner().public();
        let path = trust_owner(dir.path(), &owner).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        let e = owner_key(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("owner.key") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn corrupt_key_is_refused_without_echoing_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(DEVICE_KEY_FILE);
        let secretish = "zz".repeat(32);
        std::fs::write(&p, &secretish).unwrap();
        let e = load_or_create_device_key(dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("device.key"), "{e}");
        assert!(!e.contains(&secretish), "error leaks the key file: {e}");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            secretish,
            "never overwritten"
        );
    }

    #[test]
    fn owner_from_file_config_or_both() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(owner_key(dir.path(), None).unwrap(), None);
        let owner = proto::testkit::owner().public();
        let other = proto::testkit::stranger().public();
        let path = trust_owner(dir.path(), &owner).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(owner_key(dir.path(), None).unwrap(), Some(owner));
        assert_eq!(
            owner_key(dir.path(), Some(&owner.to_hex())).unwrap(),
            Some(owner)
        );
        let e = owner_key(dir.path(), Some(&other.to_hex()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs"), "{e}");
        assert!(parse_owner_key("abc").is_err());
    }
}
