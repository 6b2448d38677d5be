//! Stable error codes carried by ERROR, ABORT, GOODBYE and failed results.
//!
//! Each code has a number (what travels, as a varint) and a URI (what humans and logs
//! see). Numbers are never reused; a code this build does not know decodes to
//! [`ErrorCode::Other`] so a newer peer's errors still reach the user.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $num:literal => $uri:literal, )*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
            /// A code from a newer peer.
            Other(u16),
        }

        impl ErrorCode {
            pub fn as_u16(self) -> u16 {
                match self {
                    $( ErrorCode::$name => $num, )*
                    ErrorCode::Other(n) => n,
                }
            }

            pub fn from_u16(n: u16) -> Self {
                match n {
                    $( $num => ErrorCode::$name, )*
                    other => ErrorCode::Other(other),
                }
            }

            /// The stable URI, e.g. `chute.error.replayed`.
            pub fn uri(self) -> &'static str {
                match self {
                    $( ErrorCode::$name => $uri, )*
                    ErrorCode::Other(_) => "chute.error.unknown",
                }
            }

            /// Every known code (for tests and documentation).
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$name, )* ];
        }
    };
}

codes! {
    /// The peer broke the protocol (wrong message for the session state, etc.).
    ProtocolViolation = 1 => "chute.error.protocol_violation",
    /// A frame could not be decoded (garbage, truncated, over a cap).
    Malformed = 2 => "chute.error.malformed",
    /// The frame's version byte is not one this peer speaks.
    UnsupportedVersion = 3 => "chute.error.unsupported_version",
    /// Session challenge-response failed.
    AuthenticationFailed = 4 => "chute.error.authentication_failed",
    /// Unknown procedure code.
    NoSuchProcedure = 5 => "chute.error.no_such_procedure",
    /// A command or grant signature did not verify.
    InvalidSignature = 10 => "chute.error.invalid_signature",
    /// The command or grant has expired.
    Expired = 11 => "chute.error.expired",
    /// The command was issued in the future (beyond the allowed clock skew).
    NotYetValid = 12 => "chute.error.not_yet_valid",
    /// The command names another device.
    WrongDevice = 13 => "chute.error.wrong_device",
    /// The signer's grant does not cover this procedure or chute.
    NotAuthorized = 14 => "chute.error.not_authorized",
    /// The request id was already used or is below the replay window.
    Replayed = 15 => "chute.error.replayed",
    /// The grant is not signed by the device owner or does not name the signer.
    InvalidGrant = 16 => "chute.error.invalid_grant",
    /// Issued before the last command that changed the same chute (reordered delivery).
    Stale = 17 => "chute.error.stale",
    /// The device's grant store is unreadable: every command is refused until the owner
    /// acts (revocations could otherwise be lost).
    GrantStoreUnavailable = 18 => "chute.error.grant_store_unavailable",
    /// No chute of that name.
    NoSuchChute = 20 => "chute.error.no_such_chute",
    /// A chute of that name already exists.
    AlreadyExists = 21 => "chute.error.already_exists",
    /// Admission refused: not enough CPU, memory or pids left in the pools.
    InsufficientResources = 22 => "chute.error.insufficient_resources",
    /// The manifest does not parse or validate.
    InvalidManifest = 23 => "chute.error.invalid_manifest",
    /// The transferred image does not match the digest in the signed command.
    DigestMismatch = 24 => "chute.error.digest_mismatch",
    /// The image transfer has not finished.
    TransferIncomplete = 25 => "chute.error.transfer_incomplete",
    /// Another operation on that chute is in progress.
    Busy = 26 => "chute.error.busy",
    /// The device failed for a reason of its own.
    Internal = 30 => "chute.error.internal",
    /// The operation took too long.
    Timeout = 31 => "chute.error.timeout",
    /// The operation was canceled.
    Canceled = 32 => "chute.error.canceled",
    /// Normal close (GOODBYE).
    CloseNormal = 40 => "chute.close.normal",
    /// The peer is shutting down (GOODBYE).
    SystemShutdown = 41 => "chute.close.system_shutdown",
    /// Reply to a GOODBYE.
    GoodbyeAndOut = 42 => "chute.close.goodbye_and_out",
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorCode::Other(n) => write!(f, "chute.error.unknown({n})"),
            known => f.write_str(known.uri()),
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u16::deserialize(d).map(ErrorCode::from_u16)
    }
}
