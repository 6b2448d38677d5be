//! Owns the supervisor's errors: what an operation on a chute can fail with, and its stable API code.

use chute_api::{ApiError, ErrorCode};
use chutes::{AdmissionError, ChuteState, ManifestError};

use crate::podman::PodmanError;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("no chute named `{name}` (known: {known})")]
    NoSuchChute { name: String, known: String },
    /// The lifecycle refuses the request in the chute's current state.
    #[error("chute `{chute}`: {source}")]
    Refused {
        chute: String,
        #[source]
        source: chutes::LifecycleError,
    },
    #[error("chute `{chute}` was removed")]
    Removed { chute: String },
    #[error("chute `{chute}` has no container")]
    NoContainer { chute: String },
    #[error("chute `{chute}`: exited right after starting (exit code {exit_code:?}); see `chuted logs {chute}`")]
    ExitedAtStart {
        chute: String,
        exit_code: Option<i32>,
    },
    #[error("chute `{chute}`: version {version} could not start: {why}")]
    NotStarted {
        chute: String,
        version: String,
        why: String,
    },
    #[error("chute `{chute}`: cannot change bandwidth: {source}; previous rates kept")]
    Bandwidth {
        chute: String,
        #[source]
        source: super::shaping::ShapingError,
    },
    #[error("chute `{chute}` asks for the host network, which this agent's config does not allow (set allow_host_network = true to permit it)")]
    HostNetworkRefused { chute: String },
    #[error("chute `{chute}`: image: {message}")]
    Image { chute: String, message: String },
    /// An image archive whose bytes do not match its sha256.
    #[error("chute `{chute}`: image: {message}")]
    DigestMismatch { chute: String, message: String },
    #[error("chute `{chute}`: podman: {source}")]
    Podman {
        chute: String,
        #[source]
        source: PodmanError,
    },
    #[error("chute `{chute}`: update failed and the previous version was restored: {message}")]
    UpdateRolledBack { chute: String, message: String },
    #[error("chute `{chute}`: timed out waiting to become {wanted} (now {now}){detail}")]
    Timeout {
        chute: String,
        wanted: &'static str,
        now: ChuteState,
        detail: String,
    },
    #[error("chute `{chute}` is busy with another operation; try again")]
    Busy { chute: String },
    /// The state could not be made durable, so the operation was refused or undone.
    #[error("chute `{chute}`: not done, the agent's state could not be saved ({source}); free space on the state dir's disk and try again")]
    NotSaved {
        chute: String,
        #[source]
        source: crate::snapshot::SnapshotError,
    },
    #[error(transparent)]
    HostPort(#[from] crate::config::HostPortRefused),
    #[error(transparent)]
    Uncappable(#[from] crate::controllers::Uncappable),
    /// A per-chute user namespace range could not be assigned or recorded.
    #[error("chute `{chute}`: user namespace: {message}")]
    Userns { chute: String, message: String },
}

impl OpError {
    /// The stable code front ends and the cloud steer by.
    pub fn code(&self) -> ErrorCode {
        match self {
            OpError::Manifest(_) => ErrorCode::InvalidManifest,
            OpError::Admission(_) => ErrorCode::InsufficientResources,
            OpError::NoSuchChute { .. } | OpError::Removed { .. } => ErrorCode::NoSuchChute,
            OpError::NoContainer { .. } | OpError::Refused { .. } => ErrorCode::InvalidState,
            OpError::HostNetworkRefused { .. } | OpError::HostPort(_) | OpError::Uncappable(_) => {
                ErrorCode::NotAllowed
            }
            OpError::Userns { .. } => ErrorCode::Internal,
            OpError::Image { .. } => ErrorCode::Image,
            OpError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            OpError::Podman { .. } | OpError::Bandwidth { .. } => ErrorCode::Podman,
            OpError::UpdateRolledBack { .. } => ErrorCode::RolledBack,
            OpError::ExitedAtStart { .. } | OpError::NotStarted { .. } => ErrorCode::InvalidState,
            OpError::Timeout { .. } => ErrorCode::Timeout,
            OpError::Busy { .. } => ErrorCode::Busy,
            OpError::NotSaved { .. } => ErrorCode::Internal,
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        ApiError::new(e.code(), e.to_string())
    }
}

/// Why the agent could not start reconciling (it then refuses to run).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot list containers: {0}")]
    List(#[source] PodmanError),
}
