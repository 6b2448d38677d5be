//! The cloud's REST API over plain HTTP (blocking; one request at a time).

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

impl Client {
    pub fn new(base: &str, token: &str) -> Self {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            agent,
        }
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
        let mut r =
            r.with_context(|| format!("{what}: cannot reach the cloud at {}", self.base))?;
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
