//! Protocol glue in one place: keys on disk, grants from command-line patterns, signed
//! commands, their transport encoding (hex of a CALL frame / of postcard), and the one
//! decoder and verifier of device results.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use proto::{
    Args, BoundedVec, Call, ChutePattern, Command, DeviceId, Grant, Keypair, Message, Outcome,
    Procedure, PublicKey, Rights, SignedCommand, SignedGrant, SignedResult,
};
use serde_json::{json, Value};

/// Reads a key file: 64 hex digits of the Ed25519 seed.
pub fn load_key(path: &Path) -> anyhow::Result<Keypair> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read key {} (create one with `chutectl keygen`)",
            path.display()
        )
    })?;
    let seed = proto::hex_decode::<32>("key file", &text)
        .with_context(|| format!("key file {}", path.display()))?;
    Ok(Keypair::from_seed(seed))
}

/// Writes a fresh key, 0600, refusing to overwrite one.
pub fn write_new_key(path: &Path) -> anyhow::Result<Keypair> {
    if path.exists() {
        bail!(
            "{} already exists; refusing to overwrite a key",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let key = Keypair::generate()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{}", proto::hex_encode(&key.seed()))?;
    f.sync_all()?;
    Ok(key)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Request ids: the issue time in microseconds, unique per process call.
pub fn request_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    let prev = LAST.fetch_max(micros, Ordering::SeqCst);
    if prev >= micros {
        LAST.fetch_add(1, Ordering::SeqCst) + 1
    } else {
        micros
    }
}

/// `1h`, `30d`, `300s`, `15m` or plain seconds.
pub fn parse_duration(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        Some('d') => (&s[..s.len() - 1], 86400),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| {
        anyhow::anyhow!("duration {s:?}: use a number with s, m, h or d (e.g. 1h, 30d)")
    })?;
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| anyhow::anyhow!("duration {s:?} must be positive and not absurdly large"))
}

/// A `--chutes` pattern: an exact chute name (`web`) or a prefix ending in `-*`
/// (`acme-*` covers `acme-web`, never `acme` nor `acmex`); any other form is refused
/// with what is allowed, as the device would refuse it.
pub fn parse_pattern(p: &str) -> anyhow::Result<ChutePattern> {
    ChutePattern::new(p).map_err(|e| {
        anyhow::anyhow!(
            "chute pattern {p:?}: {e}; use {}",
            proto::CHUTE_PATTERN_ALLOWED
        )
    })
}

pub fn procedures(list: &str) -> anyhow::Result<Rights> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let p: Procedure = name.parse().map_err(|_| {
            let all: Vec<&str> = Procedure::ALL.iter().map(|p| p.as_str()).collect();
            anyhow::anyhow!("procedure {name:?} is not one of {}", all.join(","))
        })?;
        out.push(p);
    }
    if out.is_empty() {
        bail!("--procedures is empty");
    }
    Ok(Rights::of(&out))
}

pub fn make_grant(
    owner: &Keypair,
    developer: PublicKey,
    rights: Rights,
    patterns: &[String],
    devices: &[DeviceId],
    lifetime: u64,
) -> anyhow::Result<SignedGrant> {
    let patterns = patterns
        .iter()
        .map(|p| parse_pattern(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let now = unix_now();
    let grant = Grant {
        developer,
        rights,
        chute_patterns: BoundedVec::new(patterns).map_err(|e| anyhow::anyhow!("--chutes: {e}"))?,
        devices: BoundedVec::new(devices.to_vec())
            .map_err(|e| anyhow::anyhow!("--devices: {e}"))?,
        issued_at: now,
        expires_at: now.saturating_add(lifetime),
    };
    Ok(grant.sign(owner))
}

pub fn grant_hex(g: &SignedGrant) -> String {
    proto::hex_encode(&postcard::to_allocvec(g).unwrap_or_default())
}

fn unhex(what: &str, s: &str) -> anyhow::Result<Vec<u8>> {
    if s.len() % 2 != 0 {
        bail!("{what}: odd-length hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| anyhow::anyhow!("{what}: not hex"))
        })
        .collect()
}

pub fn decode_grant(hex: &str) -> anyhow::Result<SignedGrant> {
    let bytes = unhex("grant", hex)?;
    let (g, rest) =
        postcard::take_from_bytes::<SignedGrant>(&bytes).context("grant does not decode")?;
    if !rest.is_empty() {
        bail!("grant has {} trailing bytes", rest.len());
    }
    Ok(g)
}

/// Signs `args` for `device` with the developer key under `grant`, valid `lifetime` s.
pub fn sign_command(
    key: &Keypair,
    grant: &SignedGrant,
    device: DeviceId,
    args: Args,
    lifetime: u64,
) -> SignedCommand {
    let now = unix_now();
    let command = Command {
        device_id: device,
        request_id: request_id(),
        issued_at: now,
        expires_at: now + lifetime,
        args,
        // Filled in by `SignedCommand::sign`: the signature covers the grant's digest.
        grant_digest: [0; 32],
    };
    SignedCommand::sign(command, key, grant.clone())
}

pub fn command_hex(c: &SignedCommand) -> anyhow::Result<String> {
    let frame = proto::encode(&Message::Call(Box::new(Call {
        request: 0,
        command: c.clone(),
    })))
    .context("command too large for one frame")?;
    Ok(proto::hex_encode(&frame))
}

/// What a verified result says.
pub struct Verified {
    pub ok: bool,
    /// The outcome as JSON (the agent's reply, or `{code, message}`).
    pub value: Value,
}

/// Decodes the RESULT frame hex the cloud kept and verifies it: the key the cloud
/// names must hash to the device id we addressed, and the result must be signed by it
/// for exactly our command. The cloud cannot forge either.
pub fn verify_result(
    result_hex: &str,
    device_pubkey_hex: &str,
    command: &SignedCommand,
) -> anyhow::Result<Verified> {
    let key = PublicKey::from_hex(device_pubkey_hex).context("device key from the cloud")?;
    if key.device_id() != command.command.device_id {
        bail!(
            "the cloud named key {key} for device {}, but that key is device {}: refusing to trust it",
            command.command.device_id,
            key.device_id()
        );
    }
    let bytes = unhex("result", result_hex)?;
    let result: SignedResult = match proto::decode(&bytes).context("result frame")? {
        Message::Result(r) => r.result,
        other => bail!("result is a {} frame", other.message_type()),
    };
    result
        .verify(&key, &command.command)
        .context("the result is NOT signed by the device for this command")?;
    Ok(match &result.outcome {
        Outcome::Ok(b) => Verified {
            ok: true,
            value: serde_json::from_slice(b)
                .unwrap_or_else(|_| json!({ "raw_hex": proto::hex_encode(b) })),
        },
        Outcome::Err { code, message } => Verified {
            ok: false,
            value: json!({ "code": code.uri(), "message": message.as_str() }),
        },
    })
}
