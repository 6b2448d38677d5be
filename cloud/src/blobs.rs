//! Content-addressed blob store (image archives) on disk, named by sha256.
//!
//! Uploads are resumable: bytes go to `<data>/blobs/<sha>.part` at the offset the client
//! names, which must be where the stored part ends (the client asks first, or reads
//! the offset from a 409). When the last byte arrives the whole file is hashed; a
//! mismatch discards it. Complete blobs live at `<data>/blobs/<sha>`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

/// Largest blob (matches what an agent accepts for one image).
pub const MAX_BLOB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob name {0:?} is not a sha256 (64 lowercase hex digits)")]
    BadName(String),
    #[error("blob size {size} is outside 1..={MAX_BLOB} bytes")]
    BadSize { size: u64 },
    #[error("blob {sha}: the upload so far says {expected} bytes, this request says {got}")]
    SizeChanged {
        sha: String,
        expected: u64,
        got: u64,
    },
    #[error("blob {sha}: upload continues at offset {expected}, not {got}")]
    WrongOffset {
        sha: String,
        expected: u64,
        got: u64,
    },
    #[error("blob {sha}: {len} bytes at offset {offset} run past the size {size}")]
    PastEnd {
        sha: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("blob {sha}: the uploaded bytes hash to {actual}; discarded, upload again")]
    DigestMismatch { sha: String, actual: String },
    #[error("blob storage {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Where an upload stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub size: u64,
    pub received: u64,
    pub complete: bool,
}

pub struct Blobs {
    dir: PathBuf,
    /// Uploads are serialised: they are rare and this keeps offsets honest.
    lock: Mutex<()>,
}

pub fn check_name(sha: &str) -> Result<[u8; 32], BlobError> {
    if sha.len() != 64
        || !sha
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(BlobError::BadName(sha.chars().take(80).collect()));
    }
    proto::hex_decode::<32>("blob", sha).map_err(|_| BlobError::BadName(sha.to_owned()))
}

impl Blobs {
    pub fn new(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            lock: Mutex::new(()),
        })
    }

    pub fn path(&self, sha: &str) -> PathBuf {
        self.dir.join(sha)
    }

    fn part(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.part"))
    }

    /// Current state on disk (`None`: nothing uploaded yet).
    pub fn progress(&self, sha: &str, size_hint: u64) -> Option<Progress> {
        if let Ok(m) = std::fs::metadata(self.path(sha)) {
            return Some(Progress {
                size: m.len(),
                received: m.len(),
                complete: true,
            });
        }
        std::fs::metadata(self.part(sha)).ok().map(|m| Progress {
            size: size_hint,
            received: m.len(),
            complete: false,
        })
    }

    /// Writes `data` at `offset` of the blob `sha` of `size` bytes.
    pub async fn write(
        &self,
        sha: &str,
        size: u64,
        known_size: Option<u64>,
        offset: u64,
        data: &[u8],
    ) -> Result<Progress, BlobError> {
        let want = check_name(sha)?;
        if size == 0 || size > MAX_BLOB {
            return Err(BlobError::BadSize { size });
        }
        if let Some(k) = known_size.filter(|k| *k != size) {
            return Err(BlobError::SizeChanged {
                sha: sha.to_owned(),
                expected: k,
                got: size,
            });
        }
        let _guard = self.lock.lock().await;
        if let Some(p) = self.progress(sha, size).filter(|p| p.complete) {
            return Ok(p);
        }
        let part = self.part(sha);
        let io = |source| BlobError::Io {
            path: part.display().to_string(),
            source,
        };
        let held = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        if offset != held {
            return Err(BlobError::WrongOffset {
                sha: sha.to_owned(),
                expected: held,
                got: offset,
            });
        }
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlobError::PastEnd {
                sha: sha.to_owned(),
                offset,
                len,
                size,
            });
        }
        let part2 = part.clone();
        let data = data.to_vec();
        let final_path = self.path(sha);
        let sha_s = sha.to_owned();
        tokio::task::spawn_blocking(move || -> Result<Progress, BlobError> {
            let io = |source| BlobError::Io {
                path: part2.display().to_string(),
                source,
            };
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&part2)
                .map_err(io)?;
            f.write_all(&data).map_err(io)?;
            f.sync_data().map_err(io)?;
            let received = offset + data.len() as u64;
            if received < size {
                return Ok(Progress {
                    size,
                    received,
                    complete: false,
                });
            }
            let mut f = std::fs::File::open(&part2).map_err(io)?;
            f.seek(SeekFrom::Start(0)).map_err(io)?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = f.read(&mut buf).map_err(io)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            let actual: [u8; 32] = h.finalize().into();
            if actual != want {
                let _ = std::fs::remove_file(&part2);
                return Err(BlobError::DigestMismatch {
                    sha: sha_s,
                    actual: proto::hex_encode(&actual),
                });
            }
            std::fs::rename(&part2, &final_path).map_err(io)?;
            Ok(Progress {
                size,
                received: size,
                complete: true,
            })
        })
        .await
        .map_err(|e| io(std::io::Error::other(e.to_string())))?
    }

    /// Reads up to `len` bytes at `offset` of a complete blob.
    pub async fn read_at(&self, sha: &str, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let path = self.path(sha);
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::with_capacity(len);
            f.take(len as u64).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(data: &[u8]) -> String {
        proto::hex_encode(&Sha256::digest(data))
    }

    fn temp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "chute-cloud-blobs-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn an_interrupted_upload_resumes_and_is_verified() {
        let dir = temp();
        let blobs = Blobs::new(&dir).expect("blob dir");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let s = sha(&data);
        let size = data.len() as u64;
        let p = blobs
            .write(&s, size, None, 0, &data[..40_000])
            .await
            .expect("first piece");
        assert_eq!((p.received, p.complete), (40_000, false));
        // The connection dropped; the client asks where to continue.
        assert_eq!(blobs.progress(&s, size).map(|p| p.received), Some(40_000));
        // A piece at the wrong offset is refused and changes nothing.
        let e = blobs
            .write(&s, size, Some(size), 10, &data[10..20])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                BlobError::WrongOffset {
                    expected: 40_000,
                    got: 10,
                    ..
                }
            ),
            "{e}"
        );
        let e = blobs
            .write(&s, size + 1, Some(size), 40_000, &data[40_000..])
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::SizeChanged { .. }), "{e}");
        let p = blobs
            .write(&s, size, Some(size), 40_000, &data[40_000..])
            .await
            .expect("rest");
        assert!(p.complete);
        assert_eq!(std::fs::read(blobs.path(&s)).expect("stored"), data);
        assert_eq!(blobs.read_at(&s, 99_990, 64).await.expect("read").len(), 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn bytes_that_do_not_hash_to_the_name_are_discarded() {
        let dir = temp();
        let blobs = Blobs::new(&dir).expect("blob dir");
        let s = sha(b"the real bytes");
        let e = blobs
            .write(&s, 14, None, 0, b"forged bytes!!")
            .await
            .unwrap_err();
        assert!(matches!(e, BlobError::DigestMismatch { .. }), "{e}");
        assert!(blobs.progress(&s, 14).is_none(), "the bad upload was kept");
        assert!(matches!(
            blobs.write("not-a-sha", 1, None, 0, b"x").await,
            Err(BlobError::BadName(_))
        ));
        assert!(matches!(
            blobs.write(&s, MAX_BLOB + 1, None, 0, b"x").await,
            Err(BlobError::BadSize { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
