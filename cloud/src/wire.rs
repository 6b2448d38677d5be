//! Protocol glue between the REST API and `proto`, in one place so a protocol change
//! touches one module: how signed commands, grants and results travel in JSON (hex of
//! their postcard encoding, decoded with proto's caps), the early checks the cloud makes
//! on a command, and the one decoder of device results.

use proto::{
    Args, Call, CallResult, DeviceId, Message, Outcome, PublicKey, SignedCommand, SignedGrant,
    SignedResult, Verifier,
};
use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("{what}: not hex ({len} characters); expected lowercase hex of a postcard encoding")]
    Hex { what: &'static str, len: usize },
    #[error("{what}: does not decode: {reason}")]
    Decode { what: &'static str, reason: String },
}

pub fn unhex(what: &'static str, s: &str) -> Result<Vec<u8>, WireError> {
    let bad = || WireError::Hex { what, len: s.len() };
    if s.len() % 2 != 0 || s.len() > 2 * proto::MAX_FRAME {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)
}

/// A signed command travels as the hex of a CALL frame (request 0): the frame codec's
/// caps apply to it on the way in.
pub fn decode_command(hex: &str) -> Result<SignedCommand, WireError> {
    let bytes = unhex("command", hex)?;
    match proto::decode(&bytes) {
        Ok(Message::Call(c)) => Ok(c.command),
        Ok(other) => Err(WireError::Decode {
            what: "command",
            reason: format!("a {} frame, expected CALL", other.message_type()),
        }),
        Err(e) => Err(WireError::Decode {
            what: "command",
            reason: e.to_string(),
        }),
    }
}

pub fn encode_command(c: &SignedCommand) -> String {
    let frame = proto::encode(&Message::Call(Box::new(Call {
        request: 0,
        command: c.clone(),
    })))
    .unwrap_or_default();
    proto::hex_encode(&frame)
}

/// A signed grant travels as hex of its postcard encoding.
pub fn decode_grant(hex: &str) -> Result<SignedGrant, WireError> {
    let bytes = unhex("grant", hex)?;
    match postcard::take_from_bytes::<SignedGrant>(&bytes) {
        Ok((g, [])) => Ok(g),
        Ok((_, rest)) => Err(WireError::Decode {
            what: "grant",
            reason: format!("{} trailing bytes", rest.len()),
        }),
        Err(e) => Err(WireError::Decode {
            what: "grant",
            reason: e.to_string(),
        }),
    }
}

/// A device result is stored as the hex of the RESULT frame it arrived in.
pub fn encode_result(r: &SignedResult) -> String {
    let frame = proto::encode(&Message::Result(CallResult {
        request: 0,
        result: r.clone(),
    }))
    .unwrap_or_default();
    proto::hex_encode(&frame)
}

pub fn decode_result(hex: &str) -> Result<SignedResult, WireError> {
    let bytes = unhex("result", hex)?;
    match proto::decode(&bytes) {
        Ok(Message::Result(r)) => Ok(r.result),
        Ok(other) => Err(WireError::Decode {
            what: "result",
            reason: format!("a {} frame, expected RESULT", other.message_type()),
        }),
        Err(e) => Err(WireError::Decode {
            what: "result",
            reason: e.to_string(),
        }),
    }
}

/// The one place agent results are interpreted: the outcome as JSON for display.
/// (The agent's replies are UTF-8 JSON today; a typed reply decoder replaces this.)
pub fn outcome_json(r: &SignedResult) -> Value {
    match &r.outcome {
        Outcome::Ok(bytes) => {
            let value = serde_json::from_slice::<Value>(bytes)
                .unwrap_or_else(|_| json!({ "raw_hex": proto::hex_encode(bytes) }));
            json!({ "ok": true, "value": value })
        }
        Outcome::Err { code, message } => json!({
            "ok": false,
            "code": code.uri(),
            "message": message.as_str(),
        }),
    }
}

pub fn procedure_chute(c: &SignedCommand) -> (String, Option<String>) {
    (
        c.command.procedure().to_string(),
        c.command.args.chute().map(|n| n.to_string()),
    )
}

pub fn image_of(c: &SignedCommand) -> Option<([u8; 32], u64)> {
    match &c.command.args {
        Args::Deploy(d) => d.image_sha256.map(|s| (s, d.image_size)),
        _ => None,
    }
}

/// The checks the device will make, made early so a refusal is fast and says why:
/// signature, lifetime, device, owner-signed grant, rights and chute pattern. The
/// device remains the authority (it also checks replays and superseded grants).
pub fn early_check(
    owner: &PublicKey,
    device: DeviceId,
    c: &SignedCommand,
    now: u64,
) -> Result<(), (String, String)> {
    Verifier::new(*owner, device)
        .check(c, now)
        .map(|_| ())
        .map_err(|e| (e.code().uri().to_owned(), e.to_string()))
}

/// Short, human-comparable fingerprint of a device key: the first 12 hex digits of its
/// device id (which `chuted id` prints), grouped.
pub fn fingerprint(key: &PublicKey) -> String {
    let id = key.device_id().to_hex();
    format!("{}-{}-{}", &id[0..4], &id[4..8], &id[8..12])
}

/// A grant as JSON for listings.
pub fn grant_summary(g: &SignedGrant) -> Value {
    json!({
        "developer": g.grant.developer.to_hex(),
        "procedures": g.grant.rights.procedures().map(|p| p.as_str()).collect::<Vec<_>>(),
        "chutes": g.grant.chute_patterns.iter().map(|p| p.as_str().to_owned()).collect::<Vec<_>>(),
        "devices": g.grant.devices.iter().map(|d| d.to_hex()).collect::<Vec<_>>(),
        "issued_at": g.grant.issued_at,
        "expires_at": g.grant.expires_at,
    })
}

/// For a `logs` command with `follow`, the chute it follows.
pub fn follow_chute(c: &SignedCommand) -> Option<String> {
    match &c.command.args {
        Args::Logs(l) if l.follow => Some(l.chute.to_string()),
        _ => None,
    }
}

/// The subscription id in a `logs` result, if it started a follow.
pub fn logs_subscription(r: &SignedResult) -> Option<u64> {
    match &r.outcome {
        Outcome::Ok(bytes) => serde_json::from_slice::<Value>(bytes).ok()?["subscription"].as_u64(),
        Outcome::Err { .. } => None,
    }
}
