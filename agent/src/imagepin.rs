//! Images pinned by content, and whose archive brought them.
//!
//! Several developers share one Podman image store, where a tag is a mutable pointer:
//! an archive can carry any tags, and `podman load` applies them all. So:
//!
//! * a deploy must pin its image by content: an archive beside the manifest (or sent
//!   over the link), verified by its sha256, or a reference with `@sha256:`. A local
//!   `chuted deploy` may name a plain tag only when the owner set
//!   `allow_unpinned_images = true`; a cloud deploy never may.
//! * an archive is inspected before it is loaded: it must hold exactly one image,
//!   tagged only with the chute's own reference (anything else is refused, naming the
//!   foreign tags), and that reference must not belong to another chute's archive.
//! * after loading, the reference must resolve to the archive's own image id, and the
//!   pin (chute, reference, image id, from an archive or not) is recorded in
//!   `<state>/image-pins.json`.
//! * containers are created from the pinned image id, never from a tag; an image id
//!   another chute's archive brought is refused.
//!
//! * the pin of an archive also records the archive's sha256, so a later deploy of the
//!   same chute with the same archive (a directory holding only `image.tar.sha256`, as
//!   the cloud link makes when the image is still here: [`loaded_archive`]) needs no
//!   bytes: the reference must still resolve to the recorded image id.
//!
//! Only `podman save --format docker-archive` archives are accepted (their
//! `manifest.json` names the image id and its tags; `build-image.sh --archive` writes
//! them).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use chutes::Manifest;
use serde::{Deserialize, Serialize};

use crate::snapshot::write_atomic;
use crate::supervisor::ContainerRuntime;

pub const PINS_FILE: &str = "image-pins.json";
/// The archive file beside a manifest (same name as the supervisor's).
const ARCHIVE: &str = "image.tar";
/// Its sha256 (same name as the supervisor's).
const DIGEST: &str = "image.tar.sha256";
/// Largest `manifest.json` / `repositories` read from an archive.
const MAX_META: u64 = 1 << 20;

/// Whether `image` names its content: `…@sha256:<64 hex>`.
pub fn is_digest_ref(image: &str) -> bool {
    image.rsplit_once("@sha256:").is_some_and(|(name, hex)| {
        !name.is_empty()
            && hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A reference in the form Podman stores it: `docker.io/library/` for bare names, the
/// `docker.io/` registry for `user/name`, `:latest` when no tag or digest is given.
pub fn normalize(reference: &str) -> String {
    let (name, suffix) = match reference.rsplit_once('@') {
        Some((n, d)) => (n, format!("@{d}")),
        None => {
            let slash = reference.rfind('/').map_or(0, |i| i + 1);
            match reference[slash..].rfind(':') {
                Some(i) => (&reference[..slash + i], reference[slash + i..].to_owned()),
                None => (reference, ":latest".to_owned()),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_registry =
        name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_registry {
        name.to_owned()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{suffix}")
}

/// What an image archive holds, read from its metadata without loading it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveImage {
    /// The image id (sha256 hex of its config).
    pub id: String,
    /// Every reference the archive would tag (normalized).
    pub refs: Vec<String>,
}

#[derive(Deserialize)]
struct DockerManifest {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
}

fn octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c: char| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// Reads the top-level `manifest.json` and `repositories` of a tar archive (seeking
/// over everything else, so a large archive costs a few header reads).
/// The bytes of `manifest.json` and `repositories`, when present.
type ArchiveMeta = (Option<Vec<u8>>, Option<Vec<u8>>);

fn archive_meta(path: &Path) -> Result<ArchiveMeta, String> {
    let mut f =
        std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let bad = |why: &str| format!("{} is not a tar archive: {why}", path.display());
    let (mut manifest, mut repositories) = (None, None);
    let mut header = [0u8; 512];
    loop {
        match f.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        if header.iter().all(|b| *b == 0) {
            break;
        }
        let name_end = header[..100].iter().position(|b| *b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&header[..name_end]);
        let name = name.trim_start_matches("./");
        let size = octal(&header[124..136]).ok_or_else(|| bad("bad size field"))?;
        let kind = header[156];
        let padded = size.div_ceil(512) * 512;
        let wanted = match name {
            "manifest.json" => Some(&mut manifest),
            "repositories" => Some(&mut repositories),
            _ => None,
        };
        match wanted {
            Some(slot) if kind == b'0' || kind == 0 => {
                if size > MAX_META {
                    return Err(format!(
                        "{}: {name} is {size} bytes, over {MAX_META}",
                        path.display()
                    ));
                }
                let mut buf = vec![0u8; size as usize];
                f.read_exact(&mut buf).map_err(|_| bad("truncated"))?;
                *slot = Some(buf);
                f.seek(SeekFrom::Current((padded - size) as i64))
                    .map_err(|_| bad("truncated"))?;
            }
            _ => {
                f.seek(SeekFrom::Current(padded as i64))
                    .map_err(|_| bad("truncated"))?;
            }
        }
    }
    Ok((manifest, repositories))
}

/// What a docker-archive would load: one image and its tags.
pub fn inspect_archive(path: &Path) -> Result<ArchiveImage, String> {
    let (manifest, repositories) = archive_meta(path)?;
    let manifest = manifest.ok_or_else(|| {
        format!(
            "{} has no manifest.json: only `podman save --format docker-archive` archives are accepted",
            path.display()
        )
    })?;
    let entries: Vec<DockerManifest> = serde_json::from_slice(&manifest)
        .map_err(|e| format!("{}: manifest.json: {e}", path.display()))?;
    let [entry] = entries.as_slice() else {
        return Err(format!(
            "{} holds {} images; an archive must hold exactly the chute's one image",
            path.display(),
            entries.len()
        ));
    };
    let id = entry
        .config
        .trim_start_matches("blobs/sha256/")
        .trim_end_matches(".json")
        .to_owned();
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "{}: config {:?} does not name an image id",
            path.display(),
            entry.config
        ));
    }
    let mut refs: Vec<String> = entry
        .repo_tags
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|r| normalize(r))
        .collect();
    // The legacy `repositories` file can tag images too: {"repo": {"tag": "id"}}.
    if let Some(bytes) = repositories {
        let repos: std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>> =
            serde_json::from_slice(&bytes)
                .map_err(|e| format!("{}: repositories: {e}", path.display()))?;
        for (repo, tags) in repos {
            for tag in tags.keys() {
                refs.push(normalize(&format!("{repo}:{tag}")));
            }
        }
    }
    refs.sort();
    refs.dedup();
    Ok(ArchiveImage { id, refs })
}

/// Refuses an archive that would tag anything but `wanted`.
pub fn check_archive_refs(img: &ArchiveImage, wanted: &str, path: &Path) -> Result<(), String> {
    let own = normalize(wanted);
    let foreign: Vec<&str> = img
        .refs
        .iter()
        .filter(|r| **r != own)
        .map(String::as_str)
        .collect();
    if !foreign.is_empty() {
        return Err(format!(
            "{} would also tag {}; an archive may tag only the chute's own image {wanted:?}, refusing to load it",
            path.display(),
            foreign.join(", ")
        ));
    }
    if img.refs.is_empty() {
        return Err(format!(
            "{} tags no image; it must tag the chute's image {wanted:?}",
            path.display()
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    chute: String,
    reference: String,
    id: String,
    from_archive: bool,
    /// sha256 (hex) of the archive that brought the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    archive_sha256: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Pins {
    version: u32,
    pins: Vec<Pin>,
}

fn load_pins(state_dir: &Path) -> Result<Pins, String> {
    let path = state_dir.join(PINS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            format!(
                "{} is unreadable ({e}); move it aside to start over (each chute pins its image again on its next deploy)",
                path.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pins {
            version: 1,
            pins: Vec::new(),
        }),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn save_pins(state_dir: &Path, pins: &Pins) -> Result<(), String> {
    let path = state_dir.join(PINS_FILE);
    let bytes = serde_json::to_vec(pins).map_err(|e| e.to_string())?;
    write_atomic(&path, &bytes, 0o600).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The sha256 named by `dir`'s digest file when `dir` holds no archive: a deploy of an
/// archive loaded before.
fn digest_only(dir: Option<&Path>) -> Option<String> {
    let dir = dir?;
    if dir.join(ARCHIVE).exists() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(DIGEST)).ok()?;
    Some(text.split_whitespace().next()?.to_ascii_lowercase())
}

/// The image id that chute `m.name`'s archive `sha256` (hex) brought for `m.image`,
/// when this chute loaded exactly that archive before (the caller still checks that the
/// image is present and the reference resolves to it).
pub fn loaded_archive(state_dir: &Path, m: &Manifest, sha256: &str) -> Option<String> {
    let own = normalize(&m.image);
    load_pins(state_dir).ok()?.pins.into_iter().find_map(|p| {
        (p.from_archive
            && p.chute == m.name.as_str()
            && p.reference == own
            && p.archive_sha256.as_deref() == Some(sha256))
        .then_some(p.id)
    })
}

/// Before anything is loaded or created: the deploy pins its image by content (unless
/// `allow_unpinned` for a local deploy), and an archive tags only the chute's own
/// reference, which no other chute's archive owns.
pub fn check_deploy(
    state_dir: &Path,
    allow_unpinned: bool,
    m: &Manifest,
    dir: Option<&Path>,
) -> Result<(), String> {
    if let Some(sha) = digest_only(dir) {
        // Pinned by the archive's digest; the archive itself was checked when it was loaded.
        if loaded_archive(state_dir, m, &sha).is_some() {
            return Ok(());
        }
        return Err(format!(
            "{DIGEST} names archive {sha} but {ARCHIVE} is missing, and chute `{}` has not \
             loaded that archive for {:?} before; put {ARCHIVE} beside it",
            m.name, m.image
        ));
    }
    let archive = dir.map(|d| d.join(ARCHIVE)).filter(|a| a.exists());
    let Some(archive) = archive else {
        if is_digest_ref(&m.image) || allow_unpinned {
            return Ok(());
        }
        return Err(format!(
            "{:?} is a mutable tag; pin the image by content: put {ARCHIVE} and its sha256 \
             beside chute.toml, or name it as NAME@sha256:DIGEST (the owner may allow tags \
             for local deploys with allow_unpinned_images = true)",
            m.image
        ));
    };
    let img = inspect_archive(&archive)?;
    check_archive_refs(&img, &m.image, &archive)?;
    let own = normalize(&m.image);
    let pins = load_pins(state_dir)?;
    if let Some(other) = pins
        .pins
        .iter()
        .find(|p| p.from_archive && p.reference == own && p.chute != m.name.as_str())
    {
        return Err(format!(
            "image {:?} was brought by chute `{}`'s archive; a chute's archive may tag only a \
             reference no other chute uses",
            m.image, other.chute
        ));
    }
    Ok(())
}

/// After the image is available: resolves the chute's reference to an image id (which
/// must be the archive's own when one was loaded), refuses an id another chute's
/// archive brought, and records the pin. Returns the id.
pub async fn pin(
    podman: &dyn ContainerRuntime,
    state_dir: &Path,
    m: &Manifest,
    dir: Option<&Path>,
) -> Result<String, String> {
    let archive = dir.map(|d| d.join(ARCHIVE)).filter(|a| a.exists());
    // The archive's digest file was verified against it before loading.
    let sha = dir
        .and_then(|d| std::fs::read_to_string(d.join(DIGEST)).ok())
        .and_then(|t| Some(t.split_whitespace().next()?.to_ascii_lowercase()));
    let from_archive = match (&archive, digest_only(dir)) {
        (Some(a), _) => {
            let a = a.clone();
            Some(smol::unblock(move || inspect_archive(&a)).await?.id)
        }
        (None, Some(sha)) => Some(loaded_archive(state_dir, m, &sha).ok_or_else(|| {
            format!("archive {sha} was not loaded for chute `{}` before", m.name)
        })?),
        (None, None) => None,
    };
    let id = podman
        .image_id(&m.image)
        .await
        .map_err(|e| format!("cannot resolve {:?}: {e}", m.image))?;
    if let Some(want) = &from_archive {
        if *want != id {
            return Err(format!(
                "after loading, {:?} resolves to image {} but the archive holds image {}; refusing it",
                m.image,
                &id[..12.min(id.len())],
                &want[..12]
            ));
        }
    }
    let sha = sha.filter(|_| from_archive.is_some());
    record_archive(state_dir, m, &id, from_archive.is_some(), sha)?;
    Ok(id)
}

#[cfg(test)]
fn record(state_dir: &Path, m: &Manifest, id: &str, from_archive: bool) -> Result<(), String> {
    record_archive(state_dir, m, id, from_archive, None)
}

fn record_archive(
    state_dir: &Path,
    m: &Manifest,
    id: &str,
    from_archive: bool,
    archive_sha256: Option<String>,
) -> Result<(), String> {
    let mut pins = load_pins(state_dir)?;
    let chute = m.name.as_str();
    if let Some(other) = pins
        .pins
        .iter()
        .find(|p| p.from_archive && p.id == id && p.chute != chute)
    {
        return Err(format!(
            "{:?} is image {}, which chute `{}`'s archive brought; a chute never runs another chute's image",
            m.image,
            &id[..12.min(id.len())],
            other.chute
        ));
    }
    pins.pins.retain(|p| p.chute != chute);
    pins.pins.push(Pin {
        chute: chute.to_owned(),
        reference: normalize(&m.image),
        id: id.to_owned(),
        from_archive,
        archive_sha256,
    });
    pins.version = 1;
    save_pins(state_dir, &pins)
}

/// The image id a chute's container is created from: its pin when the pin is for the
/// manifest's reference and the image is still present, else the reference resolved
/// and pinned now (a chute deployed before pins existed).
pub async fn image_for(
    podman: &dyn ContainerRuntime,
    state_dir: &Path,
    m: &Manifest,
) -> Result<String, String> {
    let own = normalize(&m.image);
    let pinned = load_pins(state_dir)?
        .pins
        .into_iter()
        .find(|p| p.chute == m.name.as_str() && p.reference == own);
    if let Some(p) = pinned {
        if podman.image_exists(&p.id).await.unwrap_or(false) {
            return Ok(p.id);
        }
        if p.from_archive {
            return Err(format!(
                "image {} (from the chute's archive) is no longer in the image store; deploy the chute again",
                &p.id[..12.min(p.id.len())]
            ));
        }
    }
    pin(podman, state_dir, m, None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_refs_and_normal_forms() {
        let d = "a".repeat(64);
        assert!(is_digest_ref(&format!("ghcr.io/acme/web@sha256:{d}")));
        assert!(!is_digest_ref("localhost/web:1"));
        assert!(!is_digest_ref(&format!("web@sha256:{}", &d[..63])));
        assert!(!is_digest_ref(&format!("@sha256:{d}")));
        assert_eq!(normalize("alpine"), "docker.io/library/alpine:latest");
        assert_eq!(normalize("acme/web:2"), "docker.io/acme/web:2");
        assert_eq!(normalize("localhost/b-web:1"), "localhost/b-web:1");
        assert_eq!(normalize("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(
            normalize(&format!("ghcr.io/a/b@sha256:{d}")),
            format!("ghcr.io/a/b@sha256:{d}")
        );
    }

    fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in files {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            let size = format!("{:011o}\0", data.len());
            h[124..136].copy_from_slice(size.as_bytes());
            h[156] = b'0';
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    #[test]
    fn an_archive_tagging_another_chutes_image_is_refused_naming_the_tag() {
        let dir = tempfile::tempdir().unwrap();
        let id = "b".repeat(64);
        let manifest = format!(
            r#"[{{"Config":"{id}.json","RepoTags":["localhost/a-web:1","localhost/b-web:1"],"Layers":[]}}]"#
        );
        let path = dir.path().join("image.tar");
        std::fs::write(
            &path,
            tar_with(&[
                ("layer.tar", &[7u8; 700]),
                ("manifest.json", manifest.as_bytes()),
            ]),
        )
        .unwrap();
        let img = inspect_archive(&path).unwrap();
        assert_eq!(img.id, id);
        let e = check_archive_refs(&img, "localhost/a-web:1", &path).unwrap_err();
        assert!(
            e.contains("localhost/b-web:1") && e.contains("refusing"),
            "{e}"
        );
        // Tags in the legacy `repositories` file count too.
        let manifest = format!(r#"[{{"Config":"{id}.json","RepoTags":["localhost/a-web:1"]}}]"#);
        std::fs::write(
            &path,
            tar_with(&[
                ("manifest.json", manifest.as_bytes()),
                ("repositories", br#"{"localhost/b-web":{"1":"x"}}"#),
            ]),
        )
        .unwrap();
        let e = check_archive_refs(&inspect_archive(&path).unwrap(), "localhost/a-web:1", &path)
            .unwrap_err();
        assert!(e.contains("localhost/b-web:1"), "{e}");
        // Only the own tag: fine.
        std::fs::write(&path, tar_with(&[("manifest.json", manifest.as_bytes())])).unwrap();
        check_archive_refs(&inspect_archive(&path).unwrap(), "localhost/a-web:1", &path).unwrap();
        // Not a docker-archive.
        std::fs::write(&path, tar_with(&[("index.json", b"{}")])).unwrap();
        assert!(inspect_archive(&path)
            .unwrap_err()
            .contains("docker-archive"));
    }

    #[test]
    fn unpinned_deploys_are_refused_unless_the_owner_allows_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = |image: &str| {
            Manifest::from_toml_str(&format!(
                "name = \"web\"\nversion = \"1\"\nimage = \"{image}\"\n"
            ))
            .unwrap()
        };
        let e = check_deploy(dir.path(), false, &m("localhost/web:1"), None).unwrap_err();
        assert!(
            e.contains("mutable tag") && e.contains("allow_unpinned_images"),
            "{e}"
        );
        check_deploy(dir.path(), true, &m("localhost/web:1"), None).unwrap();
        check_deploy(
            dir.path(),
            false,
            &m(&format!("localhost/web@sha256:{}", "c".repeat(64))),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_reference_or_image_brought_by_another_chutes_archive_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let m = |name: &str, image: &str| {
            Manifest::from_toml_str(&format!(
                "name = \"{name}\"\nversion = \"1\"\nimage = \"{image}\"\n"
            ))
            .unwrap()
        };
        let id = "d".repeat(64);
        record(dir.path(), &m("a-web", "localhost/a-web:1"), &id, true).unwrap();
        // B names A's image id through another reference.
        let e = record(dir.path(), &m("b-web", "localhost/a-alias:1"), &id, false).unwrap_err();
        assert!(e.contains("a-web") && e.contains("archive"), "{e}");
        // B's archive would tag A's reference.
        let archive_dir = dir.path().join("b");
        std::fs::create_dir(&archive_dir).unwrap();
        let manifest = format!(
            r#"[{{"Config":"{}.json","RepoTags":["localhost/a-web:1"]}}]"#,
            "e".repeat(64)
        );
        std::fs::write(
            archive_dir.join("image.tar"),
            tar_with(&[("manifest.json", manifest.as_bytes())]),
        )
        .unwrap();
        let e = check_deploy(
            dir.path(),
            false,
            &m("b-web", "localhost/a-web:1"),
            Some(&archive_dir),
        )
        .unwrap_err();
        assert!(e.contains("a-web") && e.contains("brought"), "{e}");
        // A itself may update from its own archive.
        check_deploy(
            dir.path(),
            false,
            &m("a-web", "localhost/a-web:1"),
            Some(&archive_dir),
        )
        .unwrap();
    }

    /// A chute that loaded an archive may deploy it again by its digest alone (nothing
    /// transferred); nobody else may, and another digest needs its archive.
    #[test]
    fn an_archive_loaded_before_is_known_by_digest_to_its_own_chute_only() {
        let dir = tempfile::tempdir().unwrap();
        let m = |name: &str, image: &str| {
            Manifest::from_toml_str(&format!(
                "name = \"{name}\"\nversion = \"1\"\nimage = \"{image}\"\n"
            ))
            .unwrap()
        };
        let (id, sha) = ("f".repeat(64), "1".repeat(64));
        let a = m("a-web", "localhost/a-web:1");
        record_archive(dir.path(), &a, &id, true, Some(sha.clone())).unwrap();
        assert_eq!(loaded_archive(dir.path(), &a, &sha), Some(id.clone()));
        assert_eq!(loaded_archive(dir.path(), &a, &"2".repeat(64)), None);
        assert_eq!(
            loaded_archive(dir.path(), &m("a-web", "localhost/a-web:2"), &sha),
            None,
            "another reference is not what the archive tagged"
        );
        let b = m("b-web", "localhost/a-web:1");
        assert_eq!(loaded_archive(dir.path(), &b, &sha), None);

        let held = dir.path().join("held");
        std::fs::create_dir(&held).unwrap();
        std::fs::write(held.join(DIGEST), format!("{sha}  image.tar\n")).unwrap();
        check_deploy(dir.path(), false, &a, Some(&held)).unwrap();
        let e = check_deploy(dir.path(), false, &b, Some(&held)).unwrap_err();
        assert!(
            e.contains("image.tar is missing") && e.contains(&sha),
            "{e}"
        );
        std::fs::write(
            held.join(DIGEST),
            format!("{}  image.tar\n", "3".repeat(64)),
        )
        .unwrap();
        assert!(check_deploy(dir.path(), false, &a, Some(&held)).is_err());
        // Pins written before digests were recorded still read.
        std::fs::write(
            dir.path().join(PINS_FILE),
            format!(r#"{{"version":1,"pins":[{{"chute":"a-web","reference":"localhost/a-web:1","id":"{id}","from_archive":true}}]}}"#),
        )
        .unwrap();
        assert_eq!(loaded_archive(dir.path(), &a, &sha), None);
    }
}
