//! Owns image handling: an archive beside chute.toml verified by its sha256 and loaded
//! (or, with only its sha256 there, the image that archive loaded before), else the
//! local store, else a pull.

use std::path::Path;

use chutes::Manifest;
use smol::channel::Sender;

use super::runtime::ContainerRuntime;
use super::OpError;

/// Name of an image archive beside `chute.toml`, and of the file holding its sha256.
pub const IMAGE_ARCHIVE: &str = "image.tar";
pub const IMAGE_DIGEST: &str = "image.tar.sha256";

/// Makes the manifest's image available: from an archive beside chute.toml (verified by
/// its sha256 before loading), else the local store, else a pull.
pub async fn ensure_image(
    podman: &dyn ContainerRuntime,
    manifest: &Manifest,
    dir: Option<&Path>,
    progress: &Sender<String>,
) -> Result<(), OpError> {
    let chute = manifest.name.to_string();
    let image_err = |message: String| OpError::Image {
        chute: chute.clone(),
        message,
    };
    if let Some(dir) = dir {
        let archive = dir.join(IMAGE_ARCHIVE);
        if archive.exists() {
            let digest_file = dir.join(IMAGE_DIGEST);
            let expected = std::fs::read_to_string(&digest_file).map_err(|e| {
                image_err(format!(
                    "{} has no digest: cannot read {} ({e}); create it with `sha256sum {IMAGE_ARCHIVE} > {IMAGE_DIGEST}`",
                    archive.display(),
                    digest_file.display()
                ))
            })?;
            let expected = expected
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            let _ = progress.try_send(format!("verifying {}", archive.display()));
            let path = archive.clone();
            let actual = smol::unblock(move || sha256_file(&path))
                .await
                .map_err(|e| image_err(format!("cannot read {}: {e}", archive.display())))?;
            if actual != expected {
                return Err(OpError::DigestMismatch {
                    chute: chute.clone(),
                    message: format!(
                        "{} has sha256 {actual} but {} says {expected}; refusing to load it",
                        archive.display(),
                        digest_file.display()
                    ),
                });
            }
            let _ = progress.try_send(format!(
                "loading {} (sha256 {})",
                archive.display(),
                &actual[..12]
            ));
            let names = podman
                .image_load(&archive)
                .await
                .map_err(|e| image_err(format!("loading {}: {e}", archive.display())))?;
            if !podman.image_exists(&manifest.image).await.unwrap_or(false) {
                return Err(image_err(format!(
                    "{} holds {} but chute.toml asks for image {:?}",
                    archive.display(),
                    names.join(", "),
                    manifest.image
                )));
            }
            return Ok(());
        }
        if dir.join(IMAGE_DIGEST).exists() {
            // The archive of that digest was loaded before (`imagepin::check_deploy`
            // allowed it); pinning checks the reference still resolves to its image.
            // Never a pull: the deploy is pinned to the archive's content.
            let _ = progress.try_send("image archive already loaded".to_owned());
            return Ok(());
        }
    }
    match podman.image_exists(&manifest.image).await {
        Ok(true) => return Ok(()),
        Ok(false) => {}
        Err(e) => return Err(OpError::Podman { chute, source: e }),
    }
    let _ = progress.try_send(format!("pulling {}", manifest.image));
    podman.image_pull(&manifest.image).await.map_err(|e| {
        image_err(format!(
            "{:?} is not in the local store and could not be pulled ({e}); build it locally or put {IMAGE_ARCHIVE} and {IMAGE_DIGEST} beside chute.toml",
            manifest.image
        ))
    })
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
