//! Errors with stable codes: the code says what kind of failure it was (scripts, the cloud
//! and exit codes steer by it), the message says what was wrong and what is allowed.

use serde::{Deserialize, Serialize};

/// A refused or failed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// What kind of failure. The kebab-case string of each code is stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request itself could not be read (malformed, oversized, unknown op).
    BadRequest,
    /// `chute.toml` (or a chute name) is not valid.
    InvalidManifest,
    NoSuchChute,
    /// The pools cannot fit the chute's reservation.
    InsufficientResources,
    /// The chute's state does not allow the request (stop a stopped chute...).
    InvalidState,
    /// The chute asks for something this agent's config forbids (the host network).
    NotAllowed,
    /// Another operation on the chute is in progress.
    Busy,
    /// The image could not be found, pulled or loaded.
    Image,
    /// An image archive does not match its sha256.
    DigestMismatch,
    /// An update failed; the previous version runs again.
    RolledBack,
    /// The chute did not reach the wanted state in time.
    Timeout,
    /// Podman refused or failed.
    Podman,
    /// Anything else: a fault in the agent or the machine.
    Internal,
    /// A code this front end does not know (sent by a newer agent).
    #[serde(other)]
    Unknown,
}

/// How a CLI should exit on an error of this code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller sent something invalid: fix the input.
    BadInput,
    /// Valid, but the agent refused it in its current state.
    Refused,
    /// It failed on the agent's side.
    Internal,
}

impl ErrorCode {
    /// The stable string form.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::InvalidManifest => "invalid-manifest",
            ErrorCode::NoSuchChute => "no-such-chute",
            ErrorCode::InsufficientResources => "insufficient-resources",
            ErrorCode::InvalidState => "invalid-state",
            ErrorCode::NotAllowed => "not-allowed",
            ErrorCode::Busy => "busy",
            ErrorCode::Image => "image",
            ErrorCode::DigestMismatch => "digest-mismatch",
            ErrorCode::RolledBack => "rolled-back",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Podman => "podman",
            ErrorCode::Internal => "internal",
            ErrorCode::Unknown => "unknown",
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            ErrorCode::BadRequest
            | ErrorCode::InvalidManifest
            | ErrorCode::NoSuchChute
            | ErrorCode::DigestMismatch => ErrorClass::BadInput,
            ErrorCode::InsufficientResources
            | ErrorCode::InvalidState
            | ErrorCode::NotAllowed
            | ErrorCode::Busy
            | ErrorCode::Image
            | ErrorCode::RolledBack => ErrorClass::Refused,
            ErrorCode::Timeout | ErrorCode::Podman | ErrorCode::Internal | ErrorCode::Unknown => {
                ErrorClass::Internal
            }
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_stable_strings() {
        for code in [
            ErrorCode::BadRequest,
            ErrorCode::InvalidManifest,
            ErrorCode::NoSuchChute,
            ErrorCode::InsufficientResources,
            ErrorCode::InvalidState,
            ErrorCode::NotAllowed,
            ErrorCode::Busy,
            ErrorCode::Image,
            ErrorCode::DigestMismatch,
            ErrorCode::RolledBack,
            ErrorCode::Timeout,
            ErrorCode::Podman,
            ErrorCode::Internal,
        ] {
            let json = serde_json::to_string(&code).expect("a code serializes");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).expect("and reads back");
            assert_eq!(back, code);
        }
    }

    #[test]
    fn a_code_from_a_newer_agent_reads_as_unknown_and_internal() {
        let e: ApiError =
            serde_json::from_str(r#"{"code":"quota-exceeded","message":"m"}"#).expect("reads");
        assert_eq!(e.code, ErrorCode::Unknown);
        assert_eq!(e.code.class(), ErrorClass::Internal);
    }
}
