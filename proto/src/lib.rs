//! The chuted wire protocol: WAMP-shaped messages encoded with postcard, one per
//! binary websocket frame under the subprotocol [`SUBPROTOCOL`], plus the end-to-end
//! security layer: Ed25519 session challenge-response, developer-signed commands
//! authorised by owner-signed grants, a persistable replay window, and device-signed
//! results.
//!
//! The trust model: the device trusts only its owner's key. The cloud relays frames
//! and can drop or delay them, but cannot forge a command (it needs a developer key
//! with an owner-signed grant) nor a result (it needs the device key).
//!
//! What this crate deliberately is not: a transport (no sockets, no async runtime, no
//! websocket), a router, or a store. It has no clock: everything time-dependent takes
//! `now` as unix seconds. It never panics on input: every refusal is a typed error.
//!
//! Caps: a frame over [`MAX_FRAME`] is refused before decoding; every string, byte
//! string and list has a cap checked while decoding (see the `MAX_*` constants).
//!
//! Protocol version 2 (subprotocol `chute.v2.postcard`; version-1 frames are refused by
//! their version byte) changed, for devices shared by several developers:
//! * [`Grant::chute_patterns`] (was `chute_prefixes`): each [`ChutePattern`] is an
//!   exact chute name or a prefix ending in `-*`, matched on name boundaries; other
//!   forms are refused when built and when decoded.
//! * [`Command::grant_digest`]: the developer's signature covers the digest of the
//!   grant it is issued under; [`SignedCommand::sign`] fills it in, so a developer tool
//!   signs exactly as before (`SignedCommand::sign(command, &key, grant)`).
//! * [`Rights`] refuses bits that name no procedure (`Rights::from_bits`; the field is
//!   private).
//! * [`Heartbeat`] carries the device clock, its [`ClockState`] and the state
//!   directory's disk usage.
//! * New refusal codes [`ErrorCode::Stale`] and [`ErrorCode::GrantStoreUnavailable`];
//!   the default command lifetime is 300 s ([`Policy`]), at most
//!   [`MAX_COMMAND_LIFETIME`]; [`CommandOrder`] (per-chute order and the time floor) and
//!   [`GrantFloors`] (never evicted) are what a device persists besides the
//!   [`ReplayWindow`].

mod bounded;
mod chute;
mod code;
mod command;
mod keys;
mod message;
pub mod testkit;
mod transfer;
mod verify;

pub use bounded::{
    BoundedBytes, BoundedString, BoundedVec, ChuteName, ChutePattern, FieldError,
    CHUTE_PATTERN_ALLOWED, MAX_CHUTE_NAME,
};
pub use code::ErrorCode;
pub use command::{
    Args, ChuteArgs, Command, DeployArgs, Grant, LogsArgs, Outcome, Procedure, ResultError, Rights,
    SignedCommand, SignedGrant, SignedResult, StopArgs, UpdateGrantArgs,
};
pub use keys::{
    hex_decode, hex_encode, random_bytes, DeviceId, KeyError, Keypair, PublicKey, SignatureBytes,
};
pub use message::{
    auth_message, decode, encode, Abort, AuthError, AuthMethod, Authenticate, Call, CallResult,
    Challenge, Chunk, ChunkAck, ChuteState, ChuteUsage, ErrorMsg, Event, Goodbye, Heartbeat, Hello,
    LogBatch, LogLine, LogStream, Message, MessageType, ProtoError, Publication, Publish, Reply,
    Resources, StateChange, Subscribe, Subscribed, Topic, TopicKind, Unsubscribe, Unsubscribed,
    Welcome,
};
pub use transfer::{Accepted, Transfer, TransferError};
pub use verify::{
    ClockState, CommandOrder, GrantFloors, GrantUpdateError, Policy, ReplayReason, ReplayWindow,
    Verified, Verifier, VerifyError, WindowLoadError, DEFAULT_COMMAND_LIFETIME,
    MAX_COMMAND_LIFETIME, MAX_GRANT_FLOORS, MAX_ORDERED_CHUTES, REPLAY_IDS, REPLAY_SIGNERS,
};

/// Websocket subprotocol name; the version in it matches [`VERSION`].
pub const SUBPROTOCOL: &str = "chute.v2.postcard";
/// First byte of every frame.
pub const VERSION: u8 = 2;
/// Largest frame accepted or produced (1 MiB): one image chunk plus headroom.
pub const MAX_FRAME: usize = 1024 * 1024;
/// Largest image chunk payload (512 KiB).
pub const MAX_CHUNK: usize = 512 * 1024;
/// Largest result payload (512 KiB).
pub const MAX_PAYLOAD: usize = 512 * 1024;
/// Largest manifest in a deploy command (64 KiB).
pub const MAX_MANIFEST: usize = 64 * 1024;
/// Short strings: realm, agent version, state details.
pub const MAX_SHORT: usize = 128;
/// Human-readable messages in ERROR / ABORT / GOODBYE / failed outcomes.
pub const MAX_TEXT: usize = 1024;
/// Chute patterns in one grant.
pub const MAX_GRANT_PATTERNS: usize = 16;
/// Devices named in one grant.
pub const MAX_GRANT_DEVICES: usize = 64;
/// Chutes in one heartbeat.
pub const MAX_HEARTBEAT_CHUTES: usize = 256;
/// Lines in one log batch.
pub const MAX_LOG_LINES: usize = 128;
/// Bytes in one log line.
pub const MAX_LOG_LINE: usize = 2048;

/// A short string (at most [`MAX_SHORT`] bytes).
pub type ShortText = BoundedString<MAX_SHORT>;
/// A message string (at most [`MAX_TEXT`] bytes).
pub type Text = BoundedString<MAX_TEXT>;

/// End-to-end check of the signing path on this machine (used by `chuted selftest` on
/// the ARM smoke test): fresh keys, a signed grant and command through the frame
/// codec, verification, a forged copy and a replay refused, a signed result verified.
pub fn selftest() -> Result<String, ProtoError> {
    let fail = |what: String| ProtoError::Selftest(what);
    let owner = Keypair::generate().map_err(|e| fail(e.to_string()))?;
    let developer = Keypair::generate().map_err(|e| fail(e.to_string()))?;
    let device = Keypair::generate().map_err(|e| fail(e.to_string()))?;
    let now = 1_700_000_000;
    let signed = testkit::signed_command(
        &owner,
        &developer,
        device.device_id(),
        1,
        now,
        testkit::start_args("selftest"),
    );

    let frame = encode(&Message::Call(Box::new(Call {
        request: 1,
        command: signed.clone(),
    })))?;
    let Message::Call(call) = decode(&frame)? else {
        return Err(fail("CALL decoded as another message".into()));
    };
    let verifier = Verifier::new(owner.public(), device.device_id());
    let mut window = ReplayWindow::new();
    let started = std::time::Instant::now();
    let verified = verifier
        .verify(&call.command, now, &mut window)
        .map_err(|e| fail(format!("valid command refused: {e}")))?;
    let verify_us = started.elapsed().as_micros();

    let mut forged = signed.clone();
    forged.command.request_id = 2;
    if verifier.verify(&forged, now, &mut window).is_ok() {
        return Err(fail("forged command accepted".into()));
    }
    if verifier.verify(&signed, now, &mut window).is_ok() {
        return Err(fail("replayed command accepted".into()));
    }
    let result = SignedResult::sign(
        &device,
        &signed.command,
        Outcome::Ok(BoundedBytes::default()),
    );
    result
        .verify(&device.public(), &signed.command)
        .map_err(|e| fail(format!("device result refused: {e}")))?;
    Ok(format!(
        "proto selftest ok: device {} verified {} ({} byte frame, {} us), forged and replayed refused, result verified",
        device.device_id(),
        verified.procedure,
        frame.len(),
        verify_us
    ))
}
