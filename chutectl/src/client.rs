//! The cloud's REST API over http or https (blocking; one request at a time).
//!
//! https trusts the CA certificates of `--ca FILE` (a private CA, or the cloud's
//! self-signed certificate itself), else the system bundle [`SYSTEM_CA_BUNDLE`].

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

/// Upload piece size (the cloud accepts up to 8 MiB per request).
const PIECE: usize = 1 << 20;

/// Where https finds CA certificates without `--ca` (Debian's and OpenWrt's bundle, as
/// the agent's `--cloud-ca` default).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The CA certificates in a PEM file (at least one).
fn roots(path: &Path) -> anyhow::Result<Vec<ureq::tls::Certificate<'static>>> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("CA file {}: {e}", path.display()))?
        .into_iter()
        .map(|c| ureq::tls::Certificate::from_der(&c).to_owned())
        .collect();
    if certs.is_empty() {
        bail!(
            "CA file {}: no CERTIFICATE in it (a PEM file of CA certificates, or the cloud's self-signed certificate, is needed)",
            path.display()
        );
    }
    Ok(certs)
}

impl Client {
    /// `ca`: PEM CA certificates for https (default [`SYSTEM_CA_BUNDLE`]); read only
    /// for an https URL.
    pub fn new(base: &str, token: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let mut cfg = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)));
        if base.starts_with("https://") {
            let path = ca.unwrap_or(Path::new(SYSTEM_CA_BUNDLE));
            let certs = roots(path).with_context(|| {
                format!("https to {base}: pass --ca FILE (or set CHUTECTL_CA) to trust the cloud's CA or certificate")
            })?;
            cfg = cfg.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .unversioned_rustls_crypto_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .build(),
            );
        } else if !base.starts_with("http://") {
            bail!("cloud URL {base:?}: use http://HOST:PORT or https://HOST:PORT");
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            agent: cfg.build().into(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn answer(
        &self,
        what: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<(u16, Value)> {
        let mut r = r.map_err(|e| {
            let e = e.to_string();
            let hint = if e.contains("certificate") {
                " (trust the cloud's CA, or its self-signed certificate, with --ca FILE; a \
                 self-signed certificate must say basicConstraints CA:FALSE)"
            } else {
                ""
            };
            anyhow::anyhow!("{what}: cannot reach the cloud at {}: {e}{hint}", self.base)
        })?;
        let status = r.status().as_u16();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    fn ok(what: &str, (status, v): (u16, Value)) -> anyhow::Result<Value> {
        if (200..300).contains(&status) {
            return Ok(v);
        }
        let msg = v["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        bail!("{what}: the cloud answered {status}: {msg}")
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        let what = format!("GET {path}");
        let r = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.auth())
            .call();
        Self::ok(&what, self.answer(&what, r)?)
    }

    pub fn get_raw(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let what = format!("GET {path}");
        let r = self
            .agent
            .get(&self.url(path))
            .header("Authorization", &self.auth())
            .call();
        self.answer(&what, r)
    }

    pub fn post(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let what = format!("POST {path}");
        let r = self
            .agent
            .post(&self.url(path))
            .header("Authorization", &self.auth())
            .send_json(body);
        Self::ok(&what, self.answer(&what, r)?)
    }

    pub fn put(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        let what = format!("PUT {path}");
        let r = self
            .agent
            .put(&self.url(path))
            .header("Authorization", &self.auth())
            .send_json(body);
        Self::ok(&what, self.answer(&what, r)?)
    }

    pub fn put_bytes(&self, path: &str, bytes: &[u8]) -> anyhow::Result<(u16, Value)> {
        let what = format!("PUT {path}");
        let r = self
            .agent
            .put(&self.url(path))
            .header("Authorization", &self.auth())
            .content_type("application/octet-stream")
            .send(bytes);
        self.answer(&what, r)
    }
}

/// Uploads `file` as blob `sha` of `size` bytes, continuing from what the cloud holds.
pub fn upload_blob(
    c: &Client,
    file: &Path,
    sha: &str,
    size: u64,
    quiet: bool,
) -> anyhow::Result<()> {
    let (status, v) = c.get_raw(&format!("/api/v1/blobs/{sha}"))?;
    let mut offset = match status {
        200 if v["complete"] == Value::Bool(true) => {
            if !quiet {
                eprintln!("image {}…: already in the cloud ({size} bytes)", &sha[..12]);
            }
            return Ok(());
        }
        200 => v["received"].as_u64().unwrap_or(0),
        404 => 0,
        _ => bail!("GET /api/v1/blobs/{sha}: the cloud answered {status}: {v}"),
    };
    if offset > 0 && !quiet {
        eprintln!(
            "image {}…: resuming upload at {offset} of {size} bytes",
            &sha[..12]
        );
    }
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    let mut buf = vec![0u8; PIECE];
    while offset < size {
        f.seek(SeekFrom::Start(offset))?;
        let want = PIECE.min((size - offset) as usize);
        f.read_exact(&mut buf[..want])
            .with_context(|| format!("{} changed while uploading", file.display()))?;
        let (status, v) = c.put_bytes(
            &format!("/api/v1/blobs/{sha}?offset={offset}&size={size}"),
            &buf[..want],
        )?;
        match status {
            200 => offset = v["received"].as_u64().unwrap_or(offset + want as u64),
            // Someone else (or an earlier try) moved the upload on: continue from there.
            409 => {
                let (_, now) = c.get_raw(&format!("/api/v1/blobs/{sha}"))?;
                match now["received"].as_u64() {
                    Some(r) if r != offset => offset = r,
                    _ => bail!(
                        "upload of {sha}: {}",
                        v["error"].as_str().unwrap_or("conflict")
                    ),
                }
            }
            _ => bail!(
                "upload of {sha} at {offset}: the cloud answered {status}: {}",
                v["error"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            ),
        }
        if !quiet {
            let pct = offset * 100 / size.max(1);
            let bar = "#".repeat((pct / 4) as usize);
            eprint!(
                "\rimage {}… [{bar:<25}] {pct:>3}% {offset}/{size} bytes",
                &sha[..12]
            );
        }
    }
    if !quiet {
        eprintln!();
    }
    Ok(())
}
