//! Crash-safe state: the agent's snapshot of its chutes.
//!
//! Layout: `CHSN` magic, format major (u8) and minor (u8) version, payload length (u32
//! LE), CRC-32 of the payload (u32 LE), then the postcard payload. Written atomically (temp file in the same
//! directory, fsync, rename, fsync of the directory) so a crash at any instant leaves either
//! the old or the new snapshot, never a mix. A snapshot that fails any check is reported
//! and set aside.
//!
//! Two copies: `snapshot.bin` and `journal.bin`, the same bytes, written as a pair (both
//! temp files written and fsynced before either is renamed into place, so a full disk
//! fails the pair before either file changes). A corrupt or deleted snapshot is then
//! recovered whole from the journal: desired states, current manifests (including live
//! bandwidth changes, which container labels cannot carry: labels are fixed at create),
//! restart counters. Only when both are unusable does the agent fall back to the manifest
//! each container carries in its labels.
//!
//! Compatibility is by rule, not equality: a reader accepts any snapshot of its own major
//! version, whatever the minor. A minor version may only append fields at the end of
//! [`Snapshot`] (postcard leaves trailing bytes unread, so an older reader ignores them);
//! any other change is a new major version, which older agents set aside.
//!
//! The manifest is stored as its TOML source and parsed again on load: the snapshot then
//! never depends on the in-memory layout of the manifest types.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use chutes::ChuteState;
use serde::{Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"CHSN";
/// The format this agent writes. Snapshots of version 1 before the major/minor split
/// stored the u16 1 in little endian: the same bytes as major 1, minor 0.
pub const FORMAT_MAJOR: u8 = 1;
pub const FORMAT_MINOR: u8 = 0;

/// Whether this agent reads a snapshot of format `major.minor`.
pub fn readable(major: u8, _minor: u8) -> bool {
    major == FORMAT_MAJOR
}
const HEADER_LEN: usize = 4 + 2 + 4 + 4;
/// Far above any real snapshot (100 chutes is ~100 KB) but small enough that a corrupt
/// length field cannot make us allocate the machine's memory.
const MAX_PAYLOAD: usize = 16 << 20;
pub const FILE_NAME: &str = "snapshot.bin";
/// The second, independent copy of the snapshot.
pub const JOURNAL_NAME: &str = "journal.bin";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Snapshot {
    pub chutes: Vec<ChuteRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChuteRecord {
    pub name: String,
    pub manifest_toml: String,
    pub container_id: Option<String>,
    pub state: ChuteState,
    pub restarts: u32,
    pub reservation_held: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: not a chuted snapshot (bad magic)")]
    BadMagic { path: PathBuf },
    #[error(
        "snapshot {path}: format {major}.{minor} is not supported (this agent reads {}.x)",
        FORMAT_MAJOR
    )]
    UnsupportedVersion { path: PathBuf, major: u8, minor: u8 },
    #[error("snapshot {path}: truncated ({found} bytes, expected {expected})")]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("snapshot {path}: {found} bytes, longer than the {expected} its header declares (trailing data)")]
    TooLong {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("snapshot {path}: checksum mismatch (stored {stored:08x}, computed {computed:08x})")]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("snapshot {path}: payload does not decode: {message}")]
    Decode { path: PathBuf, message: String },
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// CRC-32 (IEEE). Bitwise: snapshots are small and written rarely, so a table would be
/// bytes spent for nothing.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let payload =
        postcard::to_allocvec(snapshot).expect("serializing plain data into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[FORMAT_MAJOR, FORMAT_MINOR]);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

pub fn decode(bytes: &[u8], path: &Path) -> Result<Snapshot, SnapshotError> {
    let path = path.to_owned();
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 4 && bytes[..4] != MAGIC {
            return Err(SnapshotError::BadMagic { path });
        }
        return Err(SnapshotError::Truncated {
            path,
            expected: HEADER_LEN,
            found: bytes.len(),
        });
    }
    if bytes[..4] != MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let (major, minor) = (bytes[4], bytes[5]);
    if !readable(major, minor) {
        return Err(SnapshotError::UnsupportedVersion { path, major, minor });
    }
    let len = u32::from_le_bytes([bytes[6], bytes[7], bytes[8], bytes[9]]) as usize;
    let stored = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::Decode {
            path,
            message: format!("payload length {len} exceeds the {MAX_PAYLOAD}-byte limit"),
        });
    }
    let payload = &bytes[HEADER_LEN..];
    if payload.len() > len {
        return Err(SnapshotError::TooLong {
            path,
            expected: HEADER_LEN + len,
            found: bytes.len(),
        });
    }
    if payload.len() < len {
        return Err(SnapshotError::Truncated {
            path,
            expected: HEADER_LEN + len,
            found: bytes.len(),
        });
    }
    let computed = crc32(payload);
    if computed != stored {
        return Err(SnapshotError::Checksum {
            path,
            stored,
            computed,
        });
    }
    postcard::from_bytes(payload).map_err(|e| SnapshotError::Decode {
        path,
        message: e.to_string(),
    })
}

/// Writes `bytes` to `path` atomically: temp file (created `O_EXCL|O_NOFOLLOW` with
/// `mode`), fsync, rename, fsync of the directory.
/// `mode` applies to the new file from its creation (key files are 0600 from birth, never
/// briefly world-readable).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    // A leftover of a crash (or anything planted there, a symlink included) is removed,
    // not followed; then the file is created exclusively (O_EXCL|O_NOFOLLOW).
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Writes the snapshot and its journal copy. Both temp files are written and fsynced before
/// either is renamed, so an error (a full disk) leaves both files as they were.
pub fn save(state_dir: &Path, snapshot: &Snapshot) -> Result<(), SnapshotError> {
    save_bytes(state_dir, &encode(snapshot))
}

pub fn save_bytes(state_dir: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let pid = std::process::id();
    let names = [FILE_NAME, JOURNAL_NAME];
    let tmps: Vec<PathBuf> = names
        .iter()
        .map(|n| state_dir.join(format!(".{n}.tmp.{pid}")))
        .collect();
    let cleanup = |tmps: &[PathBuf]| {
        for t in tmps {
            let _ = fs::remove_file(t);
        }
    };
    for tmp in &tmps {
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        if let Err(source) = written {
            cleanup(&tmps);
            return Err(SnapshotError::Io {
                path: state_dir.join(FILE_NAME),
                source,
            });
        }
    }
    for (tmp, name) in tmps.iter().zip(names) {
        if let Err(source) = fs::rename(tmp, state_dir.join(name)) {
            cleanup(&tmps);
            return Err(SnapshotError::Io {
                path: state_dir.join(name),
                source,
            });
        }
    }
    File::open(state_dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| SnapshotError::Io {
            path: state_dir.to_owned(),
            source,
        })
}

/// What `load` found.
#[derive(Debug)]
pub struct Loaded {
    /// The state, from the snapshot or (if that is unusable) the journal; `None` when
    /// neither exists or neither is usable.
    pub snapshot: Option<Snapshot>,
    /// Why the snapshot file could not be used (absent when it was fine or missing).
    pub snapshot_error: Option<SnapshotError>,
    /// Why the journal could not be used (absent when it was fine, missing or not needed).
    pub journal_error: Option<SnapshotError>,
    /// The state came from the journal.
    pub from_journal: bool,
    /// Neither file exists.
    pub none_found: bool,
}

/// `Ok(None)` when there is no snapshot yet (first start).
pub fn load(state_dir: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    load_file(&state_dir.join(FILE_NAME))
}

fn load_file(path: &Path) -> Result<Option<Snapshot>, SnapshotError> {
    match fs::read(path) {
        Ok(bytes) => decode(&bytes, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SnapshotError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The snapshot, or its journal copy when the snapshot is missing or fails a check.
pub fn load_with_journal(state_dir: &Path) -> Loaded {
    let mut out = Loaded {
        snapshot: None,
        snapshot_error: None,
        journal_error: None,
        from_journal: false,
        none_found: false,
    };
    let snap_missing = match load_file(&state_dir.join(FILE_NAME)) {
        Ok(Some(s)) => {
            out.snapshot = Some(s);
            return out;
        }
        Ok(None) => true,
        Err(e) => {
            out.snapshot_error = Some(e);
            false
        }
    };
    match load_file(&state_dir.join(JOURNAL_NAME)) {
        Ok(Some(s)) => {
            out.snapshot = Some(s);
            out.from_journal = true;
        }
        Ok(None) => out.none_found = snap_missing,
        Err(e) => out.journal_error = Some(e),
    }
    out
}

/// Moves a snapshot (or journal: `file`) that failed to load out of the way, keeping it
/// for a post-mortem.
pub fn set_aside(state_dir: &Path, file: &str) -> Option<PathBuf> {
    let from = state_dir.join(file);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let to = state_dir.join(format!("{file}.corrupt-{secs}"));
    fs::rename(&from, &to).ok().map(|_| to)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            chutes: vec![ChuteRecord {
                name: "hello-web".into(),
                manifest_toml: "name = \"hello-web\"\n".into(),
                container_id: Some("abc123".into()),
                state: ChuteState::Running,
                restarts: 3,
                reservation_held: true,
            }],
        }
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn round_trips_through_disk() {
        let dir = tempdir();
        save(&dir, &sample()).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(sample()));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(FILE_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused_without_panicking() {
        let bytes = encode(&sample());
        let p = Path::new("/x/snapshot.bin");
        for cut in 0..bytes.len() {
            assert!(
                decode(&bytes[..cut], p).is_err(),
                "truncated at {cut} accepted"
            );
        }
        // Byte 5 is the minor version, which by rule does not decide readability.
        for i in (0..bytes.len()).filter(|&i| i != 5) {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(
                    decode(&b, p).is_err(),
                    "flip at byte {i} bit {bit} accepted"
                );
            }
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let p = Path::new("/x/snapshot.bin");
        let mut b = encode(&sample());
        b[4] = 9;
        assert!(decode(&b, p)
            .unwrap_err()
            .to_string()
            .contains("format 9.0"));
        let b = encode(&sample());
        assert!(decode(&b[..b.len() - 1], p)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let mut long = encode(&sample());
        long.extend_from_slice(b"extra");
        let err = decode(&long, p).unwrap_err().to_string();
        assert!(
            err.contains("longer than") && !err.contains("truncated"),
            "{err}"
        );
        assert!(decode(b"garbage-garbage", p)
            .unwrap_err()
            .to_string()
            .contains("magic"));
    }

    #[test]
    fn a_corrupt_or_deleted_snapshot_is_recovered_from_the_journal() {
        let dir = tempdir();
        save(&dir, &sample()).unwrap();
        assert_eq!(load(&dir).unwrap(), Some(sample()));
        let mut b = fs::read(dir.join(FILE_NAME)).unwrap();
        let last = b.len() - 1;
        b[last] ^= 0xff;
        fs::write(dir.join(FILE_NAME), &b).unwrap();
        let l = load_with_journal(&dir);
        assert!(l.from_journal && l.snapshot_error.is_some());
        assert_eq!(l.snapshot, Some(sample()));
        fs::remove_file(dir.join(FILE_NAME)).unwrap();
        let l = load_with_journal(&dir);
        assert!(l.from_journal && l.snapshot_error.is_none() && !l.none_found);
        assert_eq!(l.snapshot, Some(sample()));
        fs::write(dir.join(JOURNAL_NAME), b"garbage").unwrap();
        let l = load_with_journal(&dir);
        assert!(l.snapshot.is_none() && l.journal_error.is_some() && !l.none_found);
        fs::remove_file(dir.join(JOURNAL_NAME)).unwrap();
        assert!(load_with_journal(&dir).none_found);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_changes_neither_file() {
        let dir = tempdir();
        save(&dir, &sample()).unwrap();
        let before = fs::read(dir.join(FILE_NAME)).unwrap();
        // A directory where the journal's temp file goes makes the second write fail.
        let blocker = dir.join(format!(".{JOURNAL_NAME}.tmp.{}", std::process::id()));
        fs::create_dir(&blocker).unwrap();
        let mut other = sample();
        other.chutes[0].state = ChuteState::Stopped;
        let e = save(&dir, &other).unwrap_err();
        assert!(e.to_string().contains(FILE_NAME), "{e}");
        assert_eq!(fs::read(dir.join(FILE_NAME)).unwrap(), before);
        assert_eq!(fs::read(dir.join(JOURNAL_NAME)).unwrap(), before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_newer_minor_is_read_and_a_newer_major_is_refused() {
        let p = Path::new("/x/snapshot.bin");
        // What version 1 agents wrote: the u16 1, little endian, is major 1 minor 0.
        let mut b = encode(&sample());
        assert_eq!(&b[4..6], &1u16.to_le_bytes());
        // A later minor appends a field to the end of the payload: still readable here.
        b[5] = 3;
        let mut payload = b[HEADER_LEN..].to_vec();
        payload.extend_from_slice(&[7, 1, 2, 3]);
        b.truncate(HEADER_LEN);
        b[6..10].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b[10..14].copy_from_slice(&crc32(&payload).to_le_bytes());
        b.extend_from_slice(&payload);
        assert_eq!(decode(&b, p).unwrap(), sample());
        b[4] = FORMAT_MAJOR + 1;
        assert!(matches!(
            decode(&b, p),
            Err(SnapshotError::UnsupportedVersion {
                major: 2,
                minor: 3,
                ..
            })
        ));
    }

    #[test]
    fn missing_snapshot_is_a_first_start() {
        let dir = tempdir();
        assert_eq!(load(&dir).unwrap(), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "chuted-snap-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_atomic_never_follows_a_planted_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let tmp = d
            .path()
            .join(format!(".state.bin.tmp.{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        write_atomic(&d.path().join("state.bin"), b"new", 0o600).unwrap();
        assert_eq!(
            fs::read(&victim).unwrap(),
            b"keep",
            "wrote through the symlink"
        );
        let meta = fs::metadata(d.path().join("state.bin")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read(d.path().join("state.bin")).unwrap(), b"new");
    }
}
