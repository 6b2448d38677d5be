//! WAMP-shaped messages and the frame codec.
//!
//! Frame layout: `[VERSION][type][postcard body]`, one frame per binary websocket
//! message. Type numbers follow the WAMP basic profile (HELLO 1 … RESULT 50);
//! CHUNK / CHUNK_ACK use 0x80.. for the image transfer extension. The body must use
//! every byte of the frame.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bounded::{
    clear_field_error, take_field_error, BoundedBytes, BoundedString, BoundedVec, ChuteName,
    FieldError,
};
use crate::code::ErrorCode;
use crate::command::{SignedCommand, SignedResult};
use crate::keys::{random_bytes, DeviceId, KeyError, Keypair, PublicKey, SignatureBytes};
use crate::{
    ShortText, Text, MAX_CHUNK, MAX_FRAME, MAX_HEARTBEAT_CHUTES, MAX_LOG_LINE, MAX_LOG_LINES,
    VERSION,
};

/// How a device authenticates its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthMethod {
    /// Ed25519 challenge-response, after WAMP-cryptosign.
    Cryptosign,
}

/// Device → router: opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Which fleet/tenant the device joins; bound into the auth signature.
    pub realm: ShortText,
    pub pubkey: PublicKey,
    pub agent_version: ShortText,
    pub auth_method: AuthMethod,
}

impl Hello {
    /// The device id the key implies (never sent separately, so it cannot disagree).
    pub fn device_id(&self) -> DeviceId {
        self.pubkey.device_id()
    }
}

/// Router → device: prove you hold the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The session id the router will WELCOME with; bound into the signature so an
    /// answer is good for this session only.
    pub session_id: u64,
    pub nonce: [u8; 32],
}

impl Challenge {
    /// A challenge with 32 bytes from the OS CSPRNG.
    pub fn random(session_id: u64) -> Result<Self, KeyError> {
        Ok(Self {
            session_id,
            nonce: random_bytes::<32>()?,
        })
    }
}

/// Device → router: the signature over [`auth_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Authenticate {
    pub signature: SignatureBytes,
}

pub(crate) const AUTH_TAG: &[u8] = b"chute.v1 auth";

/// What the device signs to authenticate:
/// `b"chute.v1 auth" || postcard((realm, session_id, device pubkey)) || nonce`.
pub fn auth_message(realm: &str, pubkey: &PublicKey, challenge: &Challenge) -> Vec<u8> {
    let mut out = AUTH_TAG.to_vec();
    let context = postcard::to_allocvec(&(realm, challenge.session_id, pubkey))
        .expect("postcard encoding of in-memory values cannot fail");
    out.extend(context);
    out.extend(challenge.nonce);
    out
}

impl Authenticate {
    /// The device's answer to `challenge` in `realm`.
    pub fn answer(device: &Keypair, realm: &str, challenge: &Challenge) -> Self {
        Self {
            signature: device.sign_raw(&auth_message(realm, &device.public(), challenge)),
        }
    }

    /// Router side: did the holder of `pubkey` answer this challenge in this realm?
    pub fn verify(
        &self,
        realm: &str,
        pubkey: &PublicKey,
        challenge: &Challenge,
    ) -> Result<(), AuthError> {
        if pubkey.verify_strict(&auth_message(realm, pubkey, challenge), &self.signature) {
            Ok(())
        } else {
            Err(AuthError {
                device: pubkey.device_id(),
                session_id: challenge.session_id,
            })
        }
    }
}

/// The session challenge was not answered by the key named in HELLO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device {device} failed the challenge for session {session_id}")]
pub struct AuthError {
    pub device: DeviceId,
    pub session_id: u64,
}

/// Router → device: session open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub session_id: u64,
    /// Heartbeat period the router asks for (0: keep the device's own setting).
    pub heartbeat_secs: u32,
}

/// Either side: session refused or torn down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Abort {
    pub code: ErrorCode,
    pub message: Text,
}

/// Either side: orderly close.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub code: ErrorCode,
    pub message: Text,
}

/// Router → device: run a signed command. `request` is the session-level id the
/// RESULT/ERROR refers to; the command carries its own signed request id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub request: u64,
    pub command: SignedCommand,
}

/// Device → router: the signed outcome of a CALL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallResult {
    pub request: u64,
    pub result: SignedResult,
}

/// Refusal of a request (CALL, SUBSCRIBE, CHUNK …) before it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Type byte of the message refused (WAMP's `REQUEST.Type`).
    pub request_type: u8,
    pub request: u64,
    pub code: ErrorCode,
    pub message: Text,
}

/// What a subscription is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TopicKind {
    Heartbeat,
    /// Logs of one chute, or all chutes with `None`.
    Logs(Option<ChuteName>),
    State,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Topic {
    /// `None`: every device the subscriber may see.
    pub device: Option<DeviceId>,
    pub kind: TopicKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe {
    pub request: u64,
    pub topic: Topic,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    pub request: u64,
    pub subscription: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribe {
    pub request: u64,
    pub subscription: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribed {
    pub request: u64,
}

/// Chute state as reported on the wire (mirrors the lifecycle in `chutes`; append
/// only, the variant index is the wire value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChuteState {
    Booting,
    Running,
    Stopped,
    Zombie,
    Dead,
    Failed,
}

/// Device resource pools, total and free. Varints keep small values small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millicores_total: u32,
    pub cpu_millicores_free: u32,
    pub memory_total: u64,
    pub memory_free: u64,
    pub pids_total: u32,
    pub pids_free: u32,
}

/// One chute in a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChuteUsage {
    pub name: ChuteName,
    pub state: ChuteState,
    /// Average over the last heartbeat period.
    pub cpu_millicores: u32,
    pub memory_bytes: u64,
    pub pids: u32,
    /// Cumulative counters.
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub seq: u64,
    pub uptime_secs: u64,
    pub agent_version: ShortText,
    pub resources: Resources,
    pub chutes: BoundedVec<ChuteUsage, MAX_HEARTBEAT_CHUTES>,
    /// The device clock (unix seconds) and how it compares with the time floor kept
    /// from verified commands (v2).
    pub clock_secs: u64,
    pub clock: crate::verify::ClockState,
    /// Bytes used by the agent's state directory (partial image transfers included) (v2).
    pub state_dir_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Unix milliseconds.
    pub ts_ms: u64,
    pub stream: LogStream,
    pub text: BoundedString<MAX_LOG_LINE>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogBatch {
    pub chute: ChuteName,
    pub lines: BoundedVec<LogLine, MAX_LOG_LINES>,
    /// Lines lost to the bounded buffer since the previous batch.
    pub dropped: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    pub chute: ChuteName,
    pub state: ChuteState,
    /// Unix seconds.
    pub at: u64,
    pub detail: ShortText,
}

/// A device publication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Publication {
    Heartbeat(Heartbeat),
    Logs(LogBatch),
    State(StateChange),
}

/// Device → router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    pub request: u64,
    pub publication: Publication,
}

/// Router → subscriber.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub subscription: u64,
    pub publication_id: u64,
    pub device: DeviceId,
    pub publication: Publication,
}

/// One piece of an image archive. The archive is named by its sha256 (the digest in
/// the signed deploy command), so a chunk cannot be spliced into another transfer and
/// the whole is verified against the signed digest at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub image_sha256: [u8; 32],
    pub total_size: u64,
    pub offset: u64,
    pub data: BoundedBytes<MAX_CHUNK>,
}

/// Receiver → sender: "I hold bytes `0..next_offset`"; sent on each chunk and on
/// (re)connect so the sender resumes from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAck {
    pub image_sha256: [u8; 32],
    pub next_offset: u64,
    /// The whole archive arrived and matched its digest.
    pub complete: bool,
}

macro_rules! messages {
    ($( $variant:ident($body:ty) = $code:literal => $label:literal, )*) => {
        /// Every message of the protocol.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Message {
            $( $variant($body), )*
        }

        /// The type byte of a message.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum MessageType {
            $( $variant, )*
        }

        impl MessageType {
            pub const ALL: &'static [MessageType] = &[ $( MessageType::$variant, )* ];

            pub fn code(self) -> u8 {
                match self { $( MessageType::$variant => $code, )* }
            }

            pub fn from_code(code: u8) -> Option<Self> {
                match code {
                    $( $code => Some(MessageType::$variant), )*
                    _ => None,
                }
            }

            /// Upper-case WAMP-style name.
            pub fn as_str(self) -> &'static str {
                match self { $( MessageType::$variant => $label, )* }
            }
        }

        impl Message {
            pub fn message_type(&self) -> MessageType {
                match self { $( Message::$variant(_) => MessageType::$variant, )* }
            }

            fn encode_body(&self, out: Vec<u8>) -> Result<Vec<u8>, postcard::Error> {
                match self {
                    $( Message::$variant(body) => postcard::to_extend(body, out), )*
                }
            }

            fn decode_body(kind: MessageType, body: &[u8]) -> Result<(Self, usize), postcard::Error> {
                match kind {
                    $( MessageType::$variant => {
                        let (value, rest) = postcard::take_from_bytes::<$body>(body)?;
                        Ok((Message::$variant(value), rest.len()))
                    } )*
                }
            }
        }
    };
}

messages! {
    Hello(Hello) = 1 => "HELLO",
    Welcome(Welcome) = 2 => "WELCOME",
    Abort(Abort) = 3 => "ABORT",
    Challenge(Challenge) = 4 => "CHALLENGE",
    Authenticate(Authenticate) = 5 => "AUTHENTICATE",
    Goodbye(Goodbye) = 6 => "GOODBYE",
    Error(ErrorMsg) = 8 => "ERROR",
    Publish(Publish) = 16 => "PUBLISH",
    Subscribe(Subscribe) = 32 => "SUBSCRIBE",
    Subscribed(Subscribed) = 33 => "SUBSCRIBED",
    Unsubscribe(Unsubscribe) = 34 => "UNSUBSCRIBE",
    Unsubscribed(Unsubscribed) = 35 => "UNSUBSCRIBED",
    Event(Event) = 36 => "EVENT",
    Call(Box<Call>) = 48 => "CALL",
    Result(CallResult) = 50 => "RESULT",
    Chunk(Chunk) = 128 => "CHUNK",
    ChunkAck(ChunkAck) = 129 => "CHUNK_ACK",
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {len} bytes exceeds the {max}-byte cap")]
    FrameTooLarge { len: usize, max: usize },
    #[error("unsupported protocol version {got} (this peer speaks version {supported})")]
    UnsupportedVersion { got: u8, supported: u8 },
    #[error("frame ends after the version byte; the message type is missing")]
    MissingType,
    #[error("unknown message type {code} (0x{code:02x})")]
    UnknownType { code: u8 },
    #[error("{kind} message refused: {field}")]
    Field {
        kind: MessageType,
        field: FieldError,
    },
    #[error("{kind} message is malformed: {source}")]
    Malformed {
        kind: MessageType,
        #[source]
        source: postcard::Error,
    },
    #[error("{kind} message has {extra} trailing bytes")]
    TrailingBytes { kind: MessageType, extra: usize },
    #[error("{kind} message encodes to {len} bytes, over the {max}-byte frame cap")]
    EncodeTooLarge {
        kind: MessageType,
        len: usize,
        max: usize,
    },
    #[error("selftest failed: {0}")]
    Selftest(String),
}

impl ProtoError {
    /// The stable code to put in an ERROR or ABORT about this frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtoError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ProtoError::Field {
                field:
                    FieldError::UnknownCode {
                        what: "procedure", ..
                    },
                ..
            } => ErrorCode::NoSuchProcedure,
            ProtoError::EncodeTooLarge { .. } | ProtoError::Selftest(_) => ErrorCode::Internal,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Encodes one frame: version byte, type byte, postcard body. Refuses to produce a
/// frame the peer would refuse for size.
pub fn encode(msg: &Message) -> Result<Vec<u8>, ProtoError> {
    let kind = msg.message_type();
    let out = msg
        .encode_body(vec![VERSION, kind.code()])
        .map_err(|source| ProtoError::Malformed { kind, source })?;
    if out.len() > MAX_FRAME {
        return Err(ProtoError::EncodeTooLarge {
            kind,
            len: out.len(),
            max: MAX_FRAME,
        });
    }
    Ok(out)
}

/// Decodes one frame. The size cap is checked before anything else; field caps are
/// enforced while the body is read, so no field is ever materialised past its cap.
pub fn decode(frame: &[u8]) -> Result<Message, ProtoError> {
    if frame.len() > MAX_FRAME {
        return Err(ProtoError::FrameTooLarge {
            len: frame.len(),
            max: MAX_FRAME,
        });
    }
    let (&version, rest) = frame.split_first().ok_or(ProtoError::Empty)?;
    if version != VERSION {
        return Err(ProtoError::UnsupportedVersion {
            got: version,
            supported: VERSION,
        });
    }
    let (&code, body) = rest.split_first().ok_or(ProtoError::MissingType)?;
    let kind = MessageType::from_code(code).ok_or(ProtoError::UnknownType { code })?;
    clear_field_error();
    match Message::decode_body(kind, body) {
        Ok((msg, 0)) => Ok(msg),
        Ok((_, extra)) => Err(ProtoError::TrailingBytes { kind, extra }),
        Err(source) => Err(match take_field_error() {
            Some(field) => ProtoError::Field { kind, field },
            None => ProtoError::Malformed { kind, source },
        }),
    }
}

/// What a successful procedure returns, carried postcard-encoded in
/// [`crate::Outcome::Ok`] (so the device's signature covers it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// deploy, start, stop, restart, remove, update-grant: done, nothing to add.
    Done,
    /// status: the same shape as a heartbeat.
    Status(Heartbeat),
    /// inspect: the chute's usage and the manifest it runs.
    Inspect {
        usage: ChuteUsage,
        manifest_toml: BoundedString<{ crate::MAX_MANIFEST }>,
    },
    /// logs: the requested tail; with `follow`, new lines arrive as EVENTs on
    /// `subscription` until it is unsubscribed.
    Logs {
        batch: LogBatch,
        subscription: Option<u64>,
    },
}

impl Reply {
    /// Encodes into an [`crate::Outcome::Ok`]; refuses replies over the payload cap.
    pub fn to_outcome(&self) -> Result<crate::Outcome, FieldError> {
        let bytes =
            postcard::to_allocvec(self).expect("postcard encoding of in-memory values cannot fail");
        Ok(crate::Outcome::Ok(BoundedBytes::new(bytes)?))
    }

    /// Decodes the payload of an [`crate::Outcome::Ok`].
    pub fn from_payload(payload: &[u8]) -> Result<Self, ProtoError> {
        clear_field_error();
        match postcard::take_from_bytes::<Reply>(payload) {
            Ok((reply, [])) => Ok(reply),
            Ok((_, rest)) => Err(ProtoError::TrailingBytes {
                kind: MessageType::Result,
                extra: rest.len(),
            }),
            Err(source) => Err(match take_field_error() {
                Some(field) => ProtoError::Field {
                    kind: MessageType::Result,
                    field,
                },
                None => ProtoError::Malformed {
                    kind: MessageType::Result,
                    source,
                },
            }),
        }
    }
}
