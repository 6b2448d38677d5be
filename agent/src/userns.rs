//! A user namespace per chute (config `userns_base`): chute `n` gets host ids
//! `base + n * 65536 ..+65536`, so uid 0 in a chute is an unprivileged uid on the host
//! and no two chutes share ids. Slots are kept in `<state>/userns.json` so a chute keeps
//! its range across agent restarts and updates (its files stay its own).
//!
//! Off by default: the first start under a new range makes Podman copy the image with
//! shifted ownership (disk per chute on a router), and `userns=auto` needs `/etc/subuid`
//! ranges for the `containers` user that not every install has.

use std::collections::BTreeMap;
use std::path::Path;

use crate::snapshot::write_atomic;

pub const USERNS_FILE: &str = "userns.json";
/// Ids per chute.
pub const RANGE: u32 = 65536;

/// The host id range `(first host id, size)` for `chute`, allocating a slot if needed.
pub fn range_for(base: u32, state_dir: &Path, chute: &str) -> Result<(u32, u32), String> {
    let path = state_dir.join(USERNS_FILE);
    let mut slots: BTreeMap<String, u32> = match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            format!(
                "{} is unreadable ({e}); fix or remove it (chutes then get new id ranges)",
                path.display()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let slot = match slots.get(chute) {
        Some(s) => *s,
        None => {
            let free = (0u32..)
                .find(|s| !slots.values().any(|v| v == s))
                .expect("fewer slots are used than exist");
            slots.insert(chute.to_owned(), free);
            let bytes = serde_json::to_vec(&slots).map_err(|e| e.to_string())?;
            write_atomic(&path, &bytes, 0o600)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            free
        }
    };
    let first = slot
        .checked_mul(RANGE)
        .and_then(|o| base.checked_add(o))
        .filter(|f| f.checked_add(RANGE).is_some())
        .ok_or_else(|| format!("no id range left above userns_base {base} for slot {slot}"))?;
    Ok((first, RANGE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_chute_keeps_its_own_range() {
        let d = tempfile::tempdir().unwrap();
        let a = range_for(1_000_000, d.path(), "a").unwrap();
        let b = range_for(1_000_000, d.path(), "b").unwrap();
        assert_eq!(a, (1_000_000, RANGE));
        assert_eq!(b, (1_000_000 + RANGE, RANGE));
        assert_eq!(range_for(1_000_000, d.path(), "a").unwrap(), a, "stable");
        assert!(range_for(u32::MAX - 10, d.path(), "a").is_err());
    }
}
