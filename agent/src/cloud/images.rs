//! Receiving image archives for signed deploys: resumable, content-addressed by the
//! sha256 in the signed command, verified before anything loads them.
//!
//! Layout under the image directory (config `image_dir`, default `<state>/images`; on
//! OpenWrt beside Podman's storage, never in the state dir on `/etc` flash, which
//! sysupgrade would copy into RAM): `<sha>.part` while bytes arrive (kept across
//! restarts, so a re-issued deploy resumes where the last one stopped), then
//! `<sha>/image.tar` + `<sha>/image.tar.sha256`, the directory form `deploy` already
//! loads (and hashes once more right before loading). Chunks are accepted only for a
//! digest a verified deploy is waiting for, so the relay cannot fill the disk.
//!
//! Partial transfers are capped ([`Limits`]: how many and how many bytes, counting the
//! `.part` files kept on disk), a new transfer is accepted only when the file system
//! has room for the rest of it (refused with the numbers), and `.part` files nobody
//! resumed within `partial_max_age` are removed (at start and before each transfer).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use proto::{hex_encode, Chunk, ChunkAck, ErrorCode, Transfer, TransferError};
use smol::channel::{Receiver, Sender};

/// Largest archive a deploy may announce.
pub const MAX_IMAGE: u64 = 1 << 30;

pub type Waiter = Receiver<Result<PathBuf, (ErrorCode, String)>>;

struct Pending {
    /// `None` while the bytes kept from an earlier attempt are being hashed.
    transfer: Option<Transfer>,
    file: File,
    part: PathBuf,
    size: u64,
    waiters: Vec<Sender<Result<PathBuf, (ErrorCode, String)>>>,
    last_progress: Instant,
}

/// What a deploy gets when it asks for its image.
pub enum Expect {
    /// The archive is complete and verified: its directory.
    Ready(PathBuf),
    /// Wait on the receiver; send the ack (if any yet) so the sender knows where to
    /// resume.
    Pending(Waiter, Option<ChunkAck>),
    /// Bytes from an earlier attempt are on disk: hash them off the executor with
    /// [`hash_part`], hand the result to [`Images::resumed`], then wait.
    Resume(Waiter, PathBuf, u64),
}

/// Hashes a partial archive kept from an earlier attempt (blocking: run it with
/// `smol::unblock`, a large archive takes seconds on a router).
pub fn hash_part(part: &Path, sha: [u8; 32], size: u64) -> std::io::Result<Transfer> {
    let mut file = File::open(part)?;
    let mut transfer = Transfer::new(sha, size);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 || transfer.next_offset() == size {
            break;
        }
        transfer.absorb(&buf[..n]);
    }
    Ok(transfer)
}

/// What partial transfers may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_partials: usize,
    pub max_partial_bytes: u64,
    /// A `.part` file not resumed for this long is removed.
    pub partial_max_age: Duration,
    /// Left free on the state dir's file system after a transfer.
    pub reserve_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_partials: 4,
            max_partial_bytes: 2 * MAX_IMAGE,
            partial_max_age: Duration::from_secs(24 * 3600),
            reserve_bytes: 16 << 20,
        }
    }
}

/// Bytes available to unprivileged writers on the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

pub struct Images {
    dir: PathBuf,
    pending: BTreeMap<[u8; 32], Pending>,
    limits: Limits,
}

impl Images {
    /// `dir`: where archives go, [`AgentConfig::image_dir`](crate::config::AgentConfig::image_dir).
    pub fn new(dir: &Path) -> Self {
        Self::with_limits(dir, Limits::default())
    }

    pub fn with_limits(dir: &Path, limits: Limits) -> Self {
        let imgs = Self {
            dir: dir.to_path_buf(),
            pending: BTreeMap::new(),
            limits,
        };
        imgs.sweep();
        imgs
    }

    /// `.part` files on disk that no transfer in memory is using: (path, bytes, age).
    fn idle_parts(&self) -> Vec<(PathBuf, u64, Duration)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let busy: Vec<&PathBuf> = self.pending.values().map(|p| &p.part).collect();
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "part") && !busy.contains(&p))
            .filter_map(|p| {
                let meta = p.symlink_metadata().ok()?;
                let age = meta
                    .modified()
                    .ok()
                    .and_then(|m| SystemTime::now().duration_since(m).ok())
                    .unwrap_or_default();
                Some((p, meta.len(), age))
            })
            .collect()
    }

    /// Removes partial transfers nobody resumed within `partial_max_age`.
    fn sweep(&self) {
        for (path, bytes, age) in self.idle_parts() {
            if age >= self.limits.partial_max_age {
                tracing::info!(path = %path.display(), bytes, age_secs = age.as_secs(), "removing a stale partial image transfer");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Whether one more transfer of `size` bytes (`kept` already on disk) fits the caps
    /// and the file system.
    fn admit(&self, hex: &str, size: u64, kept: Option<u64>) -> Result<(), (ErrorCode, String)> {
        let idle = self.idle_parts();
        let own = self.dir.join(format!("{hex}.part"));
        let others: Vec<&(PathBuf, u64, Duration)> =
            idle.iter().filter(|(p, _, _)| *p != own).collect();
        let count = self.pending.len() + others.len();
        if kept.is_none() && count >= self.limits.max_partials {
            return Err((
                ErrorCode::InsufficientResources,
                format!(
                    "image {hex}: {count} partial transfers are already held (cap {}); finish one, or wait until unfinished ones are removed after {}s",
                    self.limits.max_partials,
                    self.limits.partial_max_age.as_secs()
                ),
            ));
        }
        let held: u64 = self.pending.values().map(|p| p.size).sum::<u64>()
            + others.iter().map(|(_, b, _)| *b).sum::<u64>();
        if held.saturating_add(size) > self.limits.max_partial_bytes {
            return Err((
                ErrorCode::InsufficientResources,
                format!(
                    "image {hex}: {size} bytes would bring partial transfers to {} bytes, over the cap of {}",
                    held.saturating_add(size),
                    self.limits.max_partial_bytes
                ),
            ));
        }
        let needed = size
            .saturating_sub(kept.unwrap_or(0))
            .saturating_add(self.limits.reserve_bytes);
        match free_bytes(&self.dir) {
            Ok(free) if free < needed => Err((
                ErrorCode::InsufficientResources,
                format!(
                    "image {hex}: {} bytes still to receive plus a {}-byte reserve need {needed} bytes, but {} has {free} free",
                    size.saturating_sub(kept.unwrap_or(0)),
                    self.limits.reserve_bytes,
                    self.dir.display()
                ),
            )),
            Ok(_) => Ok(()),
            Err(e) => Err((
                ErrorCode::Internal,
                format!("image {hex}: cannot read free space of {}: {e}", self.dir.display()),
            )),
        }
    }

    fn ready_dir(&self, sha: &[u8; 32]) -> PathBuf {
        self.dir.join(hex_encode(sha))
    }

    /// Registers interest in the archive `sha` of `size` bytes. Bytes already held in a
    /// `.part` file from an earlier attempt are hashed and kept.
    pub fn expect(&mut self, sha: [u8; 32], size: u64) -> Result<Expect, (ErrorCode, String)> {
        let hex = hex_encode(&sha);
        if size == 0 || size > MAX_IMAGE {
            return Err((
                ErrorCode::InvalidManifest,
                format!("image {hex}: size {size} is outside 1..={MAX_IMAGE} bytes"),
            ));
        }
        let ready = self.ready_dir(&sha);
        if ready.join(crate::supervisor::IMAGE_ARCHIVE).exists() {
            return Ok(Expect::Ready(ready));
        }
        let (tx, rx) = smol::channel::bounded(1);
        if let Some(p) = self.pending.get_mut(&sha) {
            if p.size != size {
                return Err((
                    ErrorCode::InvalidManifest,
                    format!(
                        "image {hex}: another deploy announced {} bytes, this one {size}",
                        p.size
                    ),
                ));
            }
            p.waiters.push(tx);
            return Ok(Expect::Pending(rx, p.transfer.as_ref().map(Transfer::ack)));
        }
        let io = |what: &str, e: std::io::Error| {
            (ErrorCode::Internal, format!("image {hex}: {what}: {e}"))
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| io("cannot create the image directory", e))?;
        let part = self.dir.join(format!("{hex}.part"));
        self.sweep();
        let kept_before = part.symlink_metadata().ok().map(|m| m.len());
        self.admit(&hex, size, kept_before)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&part)
            .map_err(|e| io("cannot open the partial archive", e))?;
        let kept = file
            .metadata()
            .map_err(|e| io("cannot stat the partial archive", e))?
            .len();
        let transfer = (kept == 0).then(|| Transfer::new(sha, size));
        let ack = transfer.as_ref().map(Transfer::ack);
        self.pending.insert(
            sha,
            Pending {
                transfer,
                file,
                part: part.clone(),
                size,
                waiters: vec![tx],
                last_progress: Instant::now(),
            },
        );
        Ok(match ack {
            Some(ack) => Expect::Pending(rx, Some(ack)),
            None => Expect::Resume(rx, part, size),
        })
    }

    /// Installs the hash of the kept bytes ([`hash_part`]); returns the ack to send.
    /// Bytes past the announced size are cut off.
    pub fn resumed(&mut self, sha: &[u8; 32], transfer: Transfer) -> Option<ChunkAck> {
        let p = self.pending.get_mut(sha)?;
        if let Err(e) = p.file.set_len(transfer.next_offset()) {
            let msg = format!(
                "image {}: cannot trim the partial archive: {e}",
                hex_encode(sha)
            );
            self.fail(sha, ErrorCode::Internal, &msg, true);
            return None;
        }
        let ack = transfer.ack();
        tracing::info!(image = %hex_encode(sha), resume_at = ack.next_offset, "resuming image transfer");
        p.transfer = Some(transfer);
        p.last_progress = Instant::now();
        Some(ack)
    }

    /// Acks for every transfer in progress (sent on reconnect so senders resume).
    pub fn acks(&self) -> Vec<ChunkAck> {
        self.pending
            .values()
            .filter_map(|p| p.transfer.as_ref().map(Transfer::ack))
            .collect()
    }

    pub fn last_progress(&self, sha: &[u8; 32]) -> Option<Instant> {
        self.pending.get(sha).map(|p| p.last_progress)
    }

    /// Stops waiting for `sha` (stalled); the partial file stays for a later resume.
    pub fn abandon(&mut self, sha: &[u8; 32], why: &str) {
        if let Some(p) = self.pending.remove(sha) {
            for w in p.waiters {
                let _ = w.try_send(Err((ErrorCode::TransferIncomplete, why.to_owned())));
            }
        }
    }

    /// A directory holding only the digest file of `sha`: a deploy of the archive the
    /// chute loaded before (see `imagepin::loaded_archive`). Removed by [`Self::release`].
    pub fn held_dir(&self, sha: &[u8; 32]) -> std::io::Result<PathBuf> {
        let dir = self.ready_dir(sha);
        std::fs::create_dir_all(&dir)?;
        crate::snapshot::write_atomic(
            &dir.join(crate::supervisor::IMAGE_DIGEST),
            format!(
                "{}  {}\n",
                hex_encode(sha),
                crate::supervisor::IMAGE_ARCHIVE
            )
            .as_bytes(),
            0o600,
        )?;
        Ok(dir)
    }

    /// Removes a finished archive once its deploy is done with it.
    pub fn release(&mut self, sha: &[u8; 32]) {
        let _ = std::fs::remove_dir_all(self.ready_dir(sha));
    }

    /// Applies one chunk. Errors carry the ack to resend (where the sender must resume)
    /// when the transfer is still going.
    pub fn accept(
        &mut self,
        chunk: &Chunk,
    ) -> Result<ChunkAck, (ErrorCode, String, Option<ChunkAck>)> {
        let hex = hex_encode(&chunk.image_sha256);
        let Some(p) = self.pending.get_mut(&chunk.image_sha256) else {
            return Err((
                ErrorCode::ProtocolViolation,
                format!(
                    "no verified deploy is waiting for image {hex}; send the deploy command first"
                ),
                None,
            ));
        };
        let Some(transfer) = p.transfer.as_mut() else {
            return Err((
                ErrorCode::TransferIncomplete,
                format!("image {hex}: still hashing the bytes kept from an earlier attempt; wait for CHUNK_ACK"),
                None,
            ));
        };
        match transfer.accept(chunk) {
            Ok(acc) => {
                if acc.new_bytes > 0 {
                    let skip =
                        usize::try_from(acc.write_offset - chunk.offset).unwrap_or(usize::MAX);
                    let fresh = &chunk.data[skip.min(chunk.data.len())..];
                    if let Err(e) = p.file.write_all_at(fresh, acc.write_offset) {
                        let msg = format!("image {hex}: cannot write the partial archive: {e}");
                        self.fail(&chunk.image_sha256, ErrorCode::Internal, &msg, true);
                        return Err((ErrorCode::Internal, msg, None));
                    }
                    p.last_progress = Instant::now();
                }
                if acc.ack.complete {
                    self.complete(&chunk.image_sha256)
                        .map_err(|(c, m)| (c, m, None))?;
                }
                Ok(acc.ack)
            }
            Err(e @ TransferError::DigestMismatch { .. }) => {
                let msg = e.to_string();
                self.fail(&chunk.image_sha256, ErrorCode::DigestMismatch, &msg, true);
                Err((ErrorCode::DigestMismatch, msg, None))
            }
            Err(e) => Err((
                ErrorCode::ProtocolViolation,
                e.to_string(),
                Some(transfer.ack()),
            )),
        }
    }

    fn fail(&mut self, sha: &[u8; 32], code: ErrorCode, msg: &str, discard: bool) {
        if let Some(p) = self.pending.remove(sha) {
            if discard {
                let _ = std::fs::remove_file(&p.part);
            }
            for w in p.waiters {
                let _ = w.try_send(Err((code, msg.to_owned())));
            }
        }
    }

    fn complete(&mut self, sha: &[u8; 32]) -> Result<(), (ErrorCode, String)> {
        let hex = hex_encode(sha);
        let ready = self.ready_dir(sha);
        let Some(mut p) = self.pending.remove(sha) else {
            return Ok(());
        };
        let result = (|| -> std::io::Result<()> {
            p.file.flush()?;
            p.file.sync_all()?;
            std::fs::create_dir_all(&ready)?;
            std::fs::rename(&p.part, ready.join(crate::supervisor::IMAGE_ARCHIVE))?;
            crate::snapshot::write_atomic(
                &ready.join(crate::supervisor::IMAGE_DIGEST),
                format!("{hex}  {}\n", crate::supervisor::IMAGE_ARCHIVE).as_bytes(),
                0o600,
            )
        })();
        match result {
            Ok(()) => {
                tracing::info!(image = %hex, "image archive received and verified");
                for w in p.waiters {
                    let _ = w.try_send(Ok(ready.clone()));
                }
                Ok(())
            }
            Err(e) => {
                let msg = format!("image {hex}: cannot store the finished archive: {e}");
                let _ = std::fs::remove_file(&p.part);
                for w in p.waiters {
                    let _ = w.try_send(Err((ErrorCode::Internal, msg.clone())));
                }
                Err((ErrorCode::Internal, msg))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::BoundedBytes;
    use sha2::Digest;

    fn chunk(sha: [u8; 32], total: u64, offset: u64, data: &[u8]) -> Chunk {
        Chunk {
            image_sha256: sha,
            total_size: total,
            offset,
            data: BoundedBytes::new(data.to_vec()).unwrap(),
        }
    }

    #[test]
    fn resumes_across_restart_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let sha: [u8; 32] = sha2::Sha256::digest(&data).into();
        let total = data.len() as u64;
        let mut imgs = Images::new(dir.path());
        let Expect::Pending(_, Some(ack)) = imgs.expect(sha, total).unwrap() else {
            panic!()
        };
        assert_eq!(ack.next_offset, 0);
        imgs.accept(&chunk(sha, total, 0, &data[..4000])).unwrap();
        drop(imgs); // agent restart
        let mut imgs = Images::new(dir.path());
        let Expect::Resume(rx, part, size) = imgs.expect(sha, total).unwrap() else {
            panic!("kept bytes must be hashed before resuming")
        };
        let e = imgs
            .accept(&chunk(sha, total, 4000, &data[4000..5000]))
            .unwrap_err();
        assert_eq!(
            e.0,
            ErrorCode::TransferIncomplete,
            "no chunk before the ack"
        );
        let ack = imgs
            .resumed(&sha, hash_part(&part, sha, size).unwrap())
            .unwrap();
        assert_eq!(ack.next_offset, 4000, "resumes after the bytes it kept");
        // A resend overlapping held bytes is fine.
        imgs.accept(&chunk(sha, total, 3000, &data[3000..8000]))
            .unwrap();
        let ack = imgs
            .accept(&chunk(sha, total, 8000, &data[8000..]))
            .unwrap();
        assert!(ack.complete);
        let ready = rx.try_recv().unwrap().unwrap();
        assert_eq!(std::fs::read(ready.join("image.tar")).unwrap(), data);
        assert!(matches!(imgs.expect(sha, total), Ok(Expect::Ready(_))));
    }

    /// Archives land in the directory the agent is given (config `image_dir`), nothing
    /// in the state dir.
    #[test]
    fn archives_go_to_the_image_dir_not_the_state_dir() {
        let state = tempfile::tempdir().unwrap();
        let store = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::AgentConfig::defaults(crate::config::HostFacts {
            cpus: 1,
            memory_bytes: 1 << 30,
        });
        cfg.image_dir = Some(store.path().join("chuted-images"));
        let data = b"an image archive".to_vec();
        let sha: [u8; 32] = sha2::Sha256::digest(&data).into();
        let mut imgs = Images::new(&cfg.image_dir(state.path()));
        let Expect::Pending(rx, _) = imgs.expect(sha, data.len() as u64).unwrap() else {
            panic!()
        };
        imgs.accept(&chunk(sha, data.len() as u64, 0, &data))
            .unwrap();
        let ready = rx.try_recv().unwrap().unwrap();
        assert!(
            ready.starts_with(store.path().join("chuted-images")),
            "{ready:?}"
        );
        assert_eq!(std::fs::read(ready.join("image.tar")).unwrap(), data);
        assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    }

    #[test]
    fn partial_transfers_are_capped_and_stale_ones_removed() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_partials: 2,
            max_partial_bytes: 10_000,
            partial_max_age: Duration::from_secs(3600),
            reserve_bytes: 0,
        };
        let mut imgs = Images::with_limits(dir.path(), limits);
        imgs.expect([1; 32], 4000).unwrap();
        let e = imgs.expect([2; 32], 7000).map(|_| ()).unwrap_err();
        assert_eq!(e.0, ErrorCode::InsufficientResources);
        assert!(e.1.contains("11000") && e.1.contains("10000"), "{}", e.1);
        imgs.expect([2; 32], 5000).unwrap();
        let e = imgs.expect([3; 32], 10).map(|_| ()).unwrap_err();
        assert!(
            e.1.contains("2 partial transfers") && e.1.contains("cap 2"),
            "{}",
            e.1
        );
        // After a restart the kept .part files still count, until they age out.
        drop(imgs);
        let mut imgs = Images::with_limits(dir.path(), limits);
        assert!(imgs.expect([3; 32], 10).is_err());
        let old = Images::with_limits(
            dir.path(),
            Limits {
                partial_max_age: Duration::ZERO,
                ..limits
            },
        );
        drop(old);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        imgs.expect([3; 32], 10).unwrap();
        // Free space: refused with the numbers when the rest would not fit.
        let free = free_bytes(dir.path()).unwrap();
        let mut imgs = Images::with_limits(
            dir.path(),
            Limits {
                max_partial_bytes: u64::MAX,
                reserve_bytes: free.saturating_add(1 << 30),
                ..limits
            },
        );
        let e = imgs.expect([4; 32], 100).map(|_| ()).unwrap_err();
        assert_eq!(e.0, ErrorCode::InsufficientResources);
        assert!(
            e.1.contains("free") && e.1.contains("100 bytes still to receive"),
            "{}",
            e.1
        );
    }

    #[test]
    fn wrong_bytes_are_discarded_and_unasked_chunks_refused() {
        let dir = tempfile::tempdir().unwrap();
        let sha = [7u8; 32];
        let mut imgs = Images::new(dir.path());
        let e = imgs.accept(&chunk(sha, 3, 0, b"abc")).unwrap_err();
        assert_eq!(e.0, ErrorCode::ProtocolViolation);
        let Expect::Pending(rx, _) = imgs.expect(sha, 3).unwrap() else {
            panic!()
        };
        let e = imgs.accept(&chunk(sha, 3, 0, b"abc")).unwrap_err();
        assert_eq!(e.0, ErrorCode::DigestMismatch);
        assert_eq!(
            rx.try_recv().unwrap().unwrap_err().0,
            ErrorCode::DigestMismatch
        );
        assert!(!dir
            .path()
            .join(format!("{}.part", hex_encode(&sha)))
            .exists());
        assert!(imgs.expect(sha, 0).is_err());
    }
}
