//! Command verification and the replay window. Pure: the caller passes `now` (unix
//! seconds) and owns the window, which it persists so replays stay refused after a
//! restart.
//!
//! Order of checks: command signature, the command names the grant it carries (its
//! digest is signed), validity period, device id, grant signature by the owner, grant
//! not superseded by an installed update, grant names the signer, grant validity period
//! and device scope, grant covers the procedure and the chute, and only then the replay
//! window, which is the only step that mutates anything. A refused command leaves the
//! window untouched.
//!
//! Time: the device has no trusted clock (routers rarely have an RTC and NTP is not
//! authenticated). [`CommandOrder`] keeps a time floor, the newest verified
//! `issued_at`, and commands are judged at `max(clock, floor)` ([`CommandOrder::judge_time`]),
//! so setting the clock back cannot revive an expired command. It also refuses, per
//! chute, a command issued before the last one that changed that chute (the cloud may
//! hold and reorder commands). Persist it with the replay window.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bounded::{BoundedVec, ChuteName};
use crate::code::ErrorCode;
use crate::command::{Args, Command, Procedure, Rights, SignedCommand, SignedGrant};
use crate::keys::{DeviceId, PublicKey};

/// Signers tracked by the replay window at once.
pub const REPLAY_SIGNERS: usize = 16;
/// Request ids remembered per signer.
pub const REPLAY_IDS: usize = 64;

/// Developers whose newest installed grant (or local revocation) is tracked. A floor
/// is never dropped to make room: when the table is full, installing a grant for one
/// more developer is refused ([`GrantUpdateError::Full`]).
pub const MAX_GRANT_FLOORS: usize = 256;

/// Which grants have been superseded: per developer key, grants issued before the
/// newest installed one (or before a local revocation) are refused, so the owner
/// narrows or revokes a key by installing a newer grant (with no rights, to revoke) or
/// with `chuted revoke`. `all` is a floor for every key (a reset after a lost store).
/// This is the one supersession rule: [`Verifier::check`] applies it and the agent
/// persists it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GrantFloors {
    per_key: BoundedVec<(PublicKey, u64), MAX_GRANT_FLOORS>,
    all: u64,
}

/// An `update-grant` (or a local revocation) that was not installed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantUpdateError {
    #[error("grant for {developer} is not signed by the owner key {owner}")]
    NotByOwner {
        developer: PublicKey,
        owner: PublicKey,
    },
    #[error(
        "grant for {developer} issued at {issued_at} is older than the installed one ({floor})"
    )]
    Older {
        developer: PublicKey,
        issued_at: u64,
        floor: u64,
    },
    #[error(
        "grant for {developer} not installed: {max} developers already have a grant floor and \
         floors are never forgotten (a forgotten floor would revive revoked grants); \
         reset with `chuted revoke --all` and re-issue the grants still wanted"
    )]
    Full { developer: PublicKey, max: usize },
}

impl GrantFloors {
    /// Grants for `developer` issued before this are superseded.
    pub fn floor_for(&self, developer: &PublicKey) -> u64 {
        let own = self
            .per_key
            .iter()
            .find(|(k, _)| k == developer)
            .map_or(0, |(_, f)| *f);
        own.max(self.all)
    }

    /// Raises `developer`'s floor to `floor` (never lowers it). Unchanged on error.
    pub fn raise(&mut self, developer: &PublicKey, floor: u64) -> Result<(), GrantUpdateError> {
        if let Some(pos) = self.per_key.iter().position(|(k, _)| k == developer) {
            let mut entries = std::mem::take(&mut self.per_key).into_vec();
            entries[pos].1 = entries[pos].1.max(floor);
            self.per_key = BoundedVec::new(entries).expect("same length as before");
            return Ok(());
        }
        self.per_key
            .push((*developer, floor))
            .map_err(|_| GrantUpdateError::Full {
                developer: *developer,
                max: MAX_GRANT_FLOORS,
            })
    }

    /// Local revocation at device time `now`: every grant for `developer` issued at
    /// or before `now` is superseded; a grant the owner issues later works again.
    pub fn revoke(&mut self, developer: &PublicKey, now: u64) -> Result<(), GrantUpdateError> {
        self.raise(developer, now.saturating_add(1))
    }

    /// Supersedes every grant of every developer issued at or before `now`.
    pub fn revoke_all(&mut self, now: u64) {
        self.all = self.all.max(now.saturating_add(1));
    }

    /// Developers with a floor of their own, and the floor for all keys.
    pub fn entries(&self) -> (&[(PublicKey, u64)], u64) {
        (self.per_key.as_slice(), self.all)
    }

    /// Persistable form (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding of grant floors cannot fail")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WindowLoadError> {
        postcard::from_bytes(bytes).map_err(|source| WindowLoadError { source })
    }
}

/// Time rules for commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How far in the future `issued_at` may be (device clock behind the developer's).
    pub max_skew_secs: u64,
    /// Longest allowed `expires_at - issued_at`. Bounds how long a captured command
    /// stays useful, and with it how long the replay window must remember it. At most
    /// [`MAX_COMMAND_LIFETIME`] ([`CommandOrder`] relies on that bound).
    pub max_lifetime_secs: u64,
}

/// Default command lifetime (5 minutes).
pub const DEFAULT_COMMAND_LIFETIME: u64 = 300;
/// Longest command lifetime a device may be configured to accept (1 hour).
pub const MAX_COMMAND_LIFETIME: u64 = 3600;

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_skew_secs: 60,
            max_lifetime_secs: DEFAULT_COMMAND_LIFETIME,
        }
    }
}

/// Why a command was refused. Every variant names the values that decided it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("request {request_id}: signature does not verify for signer {signer}")]
    BadSignature { request_id: u64, signer: PublicKey },
    #[error("request {request_id}: issued at {issued_at}, later than device time {now} + {max_skew_secs}s skew")]
    NotYetValid {
        request_id: u64,
        issued_at: u64,
        now: u64,
        max_skew_secs: u64,
    },
    #[error("request {request_id}: expired at {expires_at}; device time is {now}")]
    Expired {
        request_id: u64,
        expires_at: u64,
        now: u64,
    },
    #[error("request {request_id}: lifetime {issued_at}..{expires_at} is not within 0..={max_lifetime_secs}s")]
    BadLifetime {
        request_id: u64,
        issued_at: u64,
        expires_at: u64,
        max_lifetime_secs: u64,
    },
    #[error(
        "request {request_id}: the signature covers grant {signed} but grant {carried} is \
         attached (a command only runs under the grant its developer signed it with)"
    )]
    GrantNotBound {
        request_id: u64,
        signed: String,
        carried: String,
    },
    #[error("request {request_id}: addressed to device {got}, this is device {expected}")]
    WrongDevice {
        request_id: u64,
        expected: DeviceId,
        got: DeviceId,
    },
    #[error("request {request_id}: grant for {developer} is not signed by the owner key {owner}")]
    GrantNotByOwner {
        request_id: u64,
        developer: PublicKey,
        owner: PublicKey,
    },
    #[error(
        "request {request_id}: grant for {developer} issued at {issued_at} was superseded \
         by one issued at {floor}"
    )]
    GrantSuperseded {
        request_id: u64,
        developer: PublicKey,
        issued_at: u64,
        floor: u64,
    },
    #[error("request {request_id}: signed by {signer}, but the grant is for {developer}")]
    GrantForOtherKey {
        request_id: u64,
        signer: PublicKey,
        developer: PublicKey,
    },
    #[error(
        "request {request_id}: grant for {developer} expired at {expires_at}; device time is {now}"
    )]
    GrantExpired {
        request_id: u64,
        developer: PublicKey,
        expires_at: u64,
        now: u64,
    },
    #[error(
        "request {request_id}: grant for {developer} is valid only from {issued_at}; device time is {now}"
    )]
    GrantNotYetValid {
        request_id: u64,
        developer: PublicKey,
        issued_at: u64,
        now: u64,
    },
    #[error("request {request_id}: grant for {developer} does not include device {device}")]
    GrantOtherDevice {
        request_id: u64,
        developer: PublicKey,
        device: DeviceId,
    },
    #[error("request {request_id}: {developer} may not call {procedure}; granted {granted}")]
    ProcedureNotGranted {
        request_id: u64,
        developer: PublicKey,
        procedure: Procedure,
        granted: Rights,
    },
    #[error("request {request_id}: {developer} may not touch chute {chute:?}; granted patterns {patterns:?}")]
    ChuteNotGranted {
        request_id: u64,
        developer: PublicKey,
        chute: String,
        patterns: Vec<String>,
    },
    #[error(
        "request {request_id}: stale: issued at {issued_at}, before the last command that \
         changed chute {chute:?} (issued at {last}); re-issue it"
    )]
    Stale {
        request_id: u64,
        chute: String,
        issued_at: u64,
        last: u64,
    },
    #[error("request {request_id} from {signer}: {reason}")]
    Replay {
        request_id: u64,
        signer: PublicKey,
        reason: ReplayReason,
    },
}

impl VerifyError {
    /// The stable code to put in the ERROR sent back.
    pub fn code(&self) -> ErrorCode {
        match self {
            VerifyError::BadSignature { .. } => ErrorCode::InvalidSignature,
            VerifyError::NotYetValid { .. } => ErrorCode::NotYetValid,
            VerifyError::Expired { .. } | VerifyError::BadLifetime { .. } => ErrorCode::Expired,
            VerifyError::WrongDevice { .. } => ErrorCode::WrongDevice,
            VerifyError::GrantNotByOwner { .. }
            | VerifyError::GrantNotBound { .. }
            | VerifyError::GrantForOtherKey { .. }
            | VerifyError::GrantSuperseded { .. } => ErrorCode::InvalidGrant,
            VerifyError::GrantExpired { .. } => ErrorCode::Expired,
            VerifyError::GrantNotYetValid { .. }
            | VerifyError::GrantOtherDevice { .. }
            | VerifyError::ProcedureNotGranted { .. }
            | VerifyError::ChuteNotGranted { .. } => ErrorCode::NotAuthorized,
            VerifyError::Replay { .. } => ErrorCode::Replayed,
            VerifyError::Stale { .. } => ErrorCode::Stale,
        }
    }
}

/// Why the replay window refused a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayReason {
    #[error("request id already used")]
    AlreadySeen,
    #[error("request id is below the window's low-water mark {low_water}")]
    BelowLowWater { low_water: u64 },
    #[error(
        "signer not in the window and the command was issued at {issued_at}, \
         not after the floor {floor} left by an evicted signer; re-issue it"
    )]
    BeforeFloor { issued_at: u64, floor: u64 },
}

/// A command that passed every check (returned by [`Verifier::verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub signer: PublicKey,
    pub request_id: u64,
    pub procedure: Procedure,
    /// [`crate::Command::digest`]; sign the result with it.
    pub command_digest: [u8; 32],
}

/// Checks signed commands for one device, rooted in the owner's key.
#[derive(Debug, Clone)]
pub struct Verifier {
    pub owner: PublicKey,
    pub device_id: DeviceId,
    pub policy: Policy,
    /// Superseded grants (from `update-grant`); persist with the replay window.
    pub grants: GrantFloors,
}

impl Verifier {
    pub fn new(owner: PublicKey, device_id: DeviceId) -> Self {
        Self {
            owner,
            device_id,
            policy: Policy::default(),
            grants: GrantFloors::default(),
        }
    }

    /// Installs the grant carried by a verified `update-grant` command: grants for
    /// the same developer issued before it are refused from now on.
    pub fn install_grant(&mut self, grant: &SignedGrant) -> Result<(), GrantUpdateError> {
        let developer = grant.grant.developer;
        if !grant.is_signed_by(&self.owner) {
            return Err(GrantUpdateError::NotByOwner {
                developer,
                owner: self.owner,
            });
        }
        let floor = self.grants.floor_for(&developer);
        if grant.grant.issued_at < floor {
            return Err(GrantUpdateError::Older {
                developer,
                issued_at: grant.grant.issued_at,
                floor,
            });
        }
        self.grants.raise(&developer, grant.grant.issued_at)
    }

    /// Every check except the replay window; mutates nothing.
    pub fn check(&self, sc: &SignedCommand, now: u64) -> Result<Verified, VerifyError> {
        let cmd = &sc.command;
        let request_id = cmd.request_id;
        let canonical = cmd.canonical_bytes();
        if !sc.signer.verify_strict(&canonical, &sc.signature) {
            return Err(VerifyError::BadSignature {
                request_id,
                signer: sc.signer,
            });
        }
        let carried = sc.grant.digest();
        if cmd.grant_digest != carried {
            return Err(VerifyError::GrantNotBound {
                request_id,
                signed: crate::keys::hex_encode(&cmd.grant_digest[..8]),
                carried: crate::keys::hex_encode(&carried[..8]),
            });
        }
        if cmd.expires_at < cmd.issued_at
            || cmd.expires_at - cmd.issued_at > self.policy.max_lifetime_secs
        {
            return Err(VerifyError::BadLifetime {
                request_id,
                issued_at: cmd.issued_at,
                expires_at: cmd.expires_at,
                max_lifetime_secs: self.policy.max_lifetime_secs,
            });
        }
        if cmd.issued_at > now.saturating_add(self.policy.max_skew_secs) {
            return Err(VerifyError::NotYetValid {
                request_id,
                issued_at: cmd.issued_at,
                now,
                max_skew_secs: self.policy.max_skew_secs,
            });
        }
        if now > cmd.expires_at {
            return Err(VerifyError::Expired {
                request_id,
                expires_at: cmd.expires_at,
                now,
            });
        }
        if cmd.device_id != self.device_id {
            return Err(VerifyError::WrongDevice {
                request_id,
                expected: self.device_id,
                got: cmd.device_id,
            });
        }
        let grant = &sc.grant.grant;
        let developer = grant.developer;
        if !sc.grant.is_signed_by(&self.owner) {
            return Err(VerifyError::GrantNotByOwner {
                request_id,
                developer,
                owner: self.owner,
            });
        }
        let floor = self.grants.floor_for(&developer);
        if grant.issued_at < floor {
            return Err(VerifyError::GrantSuperseded {
                request_id,
                developer,
                issued_at: grant.issued_at,
                floor,
            });
        }
        if developer != sc.signer {
            return Err(VerifyError::GrantForOtherKey {
                request_id,
                signer: sc.signer,
                developer,
            });
        }
        if now > grant.expires_at {
            return Err(VerifyError::GrantExpired {
                request_id,
                developer,
                expires_at: grant.expires_at,
                now,
            });
        }
        if grant.issued_at > now.saturating_add(self.policy.max_skew_secs) {
            return Err(VerifyError::GrantNotYetValid {
                request_id,
                developer,
                issued_at: grant.issued_at,
                now,
            });
        }
        if !grant.covers_device(&self.device_id) {
            return Err(VerifyError::GrantOtherDevice {
                request_id,
                developer,
                device: self.device_id,
            });
        }
        let procedure = cmd.procedure();
        if !grant.rights.contains(procedure) {
            return Err(VerifyError::ProcedureNotGranted {
                request_id,
                developer,
                procedure,
                granted: grant.rights,
            });
        }
        if let Some(chute) = cmd.args.chute() {
            if !grant.covers_chute(chute) {
                return Err(VerifyError::ChuteNotGranted {
                    request_id,
                    developer,
                    chute: chute.to_string(),
                    patterns: grant.chute_patterns.iter().map(|p| p.to_string()).collect(),
                });
            }
        }
        Ok(Verified {
            signer: sc.signer,
            request_id,
            procedure,
            command_digest: Sha256::digest(&canonical).into(),
        })
    }

    /// Every check, then records the request id in `window`. The window changes only
    /// when the command is accepted. The caller should persist the window before
    /// acting on the command, so a crash cannot turn into a second execution.
    pub fn verify(
        &self,
        sc: &SignedCommand,
        now: u64,
        window: &mut ReplayWindow,
    ) -> Result<Verified, VerifyError> {
        let verified = self.check(sc, now)?;
        window
            .accept(&sc.signer, sc.command.request_id, sc.command.issued_at, now)
            .map_err(|reason| VerifyError::Replay {
                request_id: sc.command.request_id,
                signer: sc.signer,
                reason,
            })?;
        Ok(verified)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SignerWindow {
    signer: PublicKey,
    /// Ids below this are refused: everything under it was seen or given up on.
    low_water: u64,
    seen: heapless::Vec<u64, REPLAY_IDS>,
    /// Newest `issued_at` accepted from this signer (becomes the floor on eviction).
    max_issued_at: u64,
    /// `now` of the last acceptance, for least-recently-used eviction.
    last_used: u64,
    /// The window's floor when this entry was created. If the signer was evicted
    /// earlier, its old commands are at or below it and must stay refused even though
    /// this fresh entry does not list their ids.
    created_floor: u64,
}

/// Fixed-capacity memory of accepted (signer, request id) pairs.
///
/// Per signer it keeps the last [`REPLAY_IDS`] ids; when one more arrives, the lowest
/// is dropped and the low-water mark rises above it, so any id ever accepted is either
/// remembered or below the mark. Ids need not be consecutive (timestamps work) and may
/// arrive out of order within the window. At most [`REPLAY_SIGNERS`] signers are
/// tracked; evicting the least recently used one raises a floor on `issued_at` that a
/// signer not in the table must exceed, so the evicted signer's old commands stay
/// refused, also once it returns (a command issued at or before the floor by a signer
/// that was not in the table must be re-issued).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReplayWindow {
    signers: heapless::Vec<SignerWindow, REPLAY_SIGNERS>,
    floor: u64,
}

/// The persisted window could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replay window state is corrupt or from another version: {source}")]
pub struct WindowLoadError {
    #[source]
    pub source: postcard::Error,
}

impl ReplayWindow {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `(signer, request_id)` would be accepted now.
    pub fn check(
        &self,
        signer: &PublicKey,
        request_id: u64,
        issued_at: u64,
    ) -> Result<(), ReplayReason> {
        match self.signers.iter().find(|w| &w.signer == signer) {
            Some(w) => {
                if w.created_floor > 0 && issued_at <= w.created_floor {
                    Err(ReplayReason::BeforeFloor {
                        issued_at,
                        floor: w.created_floor,
                    })
                } else if request_id < w.low_water {
                    Err(ReplayReason::BelowLowWater {
                        low_water: w.low_water,
                    })
                } else if w.seen.contains(&request_id) {
                    Err(ReplayReason::AlreadySeen)
                } else {
                    Ok(())
                }
            }
            None if self.floor > 0 && issued_at <= self.floor => Err(ReplayReason::BeforeFloor {
                issued_at,
                floor: self.floor,
            }),
            None => Ok(()),
        }
    }

    /// Checks and, if fresh, records `(signer, request_id)`; unchanged on refusal.
    /// [`Verifier::verify`] calls this last; use it directly only for a command that
    /// passed [`Verifier::check`].
    pub fn accept(
        &mut self,
        signer: &PublicKey,
        request_id: u64,
        issued_at: u64,
        now: u64,
    ) -> Result<(), ReplayReason> {
        self.check(signer, request_id, issued_at)?;
        self.record(signer, request_id, issued_at, now);
        Ok(())
    }

    fn record(&mut self, signer: &PublicKey, request_id: u64, issued_at: u64, now: u64) {
        let idx = match self.signers.iter().position(|w| &w.signer == signer) {
            Some(i) => i,
            None => {
                if self.signers.is_full() {
                    let lru = self
                        .signers
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, w)| w.last_used)
                        .map(|(i, _)| i)
                        .expect("a full window has signers");
                    let evicted = self.signers.swap_remove(lru);
                    self.floor = self.floor.max(evicted.max_issued_at);
                }
                let fresh = SignerWindow {
                    signer: *signer,
                    low_water: 0,
                    seen: heapless::Vec::new(),
                    max_issued_at: 0,
                    last_used: now,
                    created_floor: self.floor,
                };
                self.signers.push(fresh).expect("a slot was freed above");
                self.signers.len() - 1
            }
        };
        let w = &mut self.signers[idx];
        if w.seen.is_full() {
            let (pos, lowest) = w
                .seen
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, id)| *id)
                .expect("a full list has a minimum");
            if lowest < request_id {
                w.seen.swap_remove(pos);
                w.low_water = w.low_water.max(lowest.saturating_add(1));
            } else {
                // The new id is itself the lowest: remember it through the mark.
                w.low_water = w.low_water.max(request_id.saturating_add(1));
                w.max_issued_at = w.max_issued_at.max(issued_at);
                w.last_used = w.last_used.max(now);
                return;
            }
        }
        w.seen.push(request_id).expect("a slot was freed above");
        w.max_issued_at = w.max_issued_at.max(issued_at);
        w.last_used = w.last_used.max(now);
    }

    /// Number of signers currently tracked.
    pub fn signers(&self) -> usize {
        self.signers.len()
    }

    /// Persistable form (postcard; a few KB at most).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding of the replay window cannot fail")
    }

    /// Reads back [`ReplayWindow::to_bytes`]; the capacities are enforced while reading.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WindowLoadError> {
        postcard::from_bytes(bytes).map_err(|source| WindowLoadError { source })
    }
}

/// Chutes whose last change is remembered individually by [`CommandOrder`].
pub const MAX_ORDERED_CHUTES: usize = 1024;

/// How the device clock compares with what signed commands have shown of real time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ClockState {
    /// At or past the time floor, and no recent command arrived already expired.
    Ok,
    /// Behind the newest verified `issued_at`: commands are judged at the floor.
    BehindFloor,
    /// The newest authentic command arrived already expired: the clock is probably
    /// ahead (or the cloud held the command too long).
    Ahead,
}

impl ClockState {
    /// `ok`, `behind floor` or `ahead` (as shown in `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            ClockState::Ok => "ok",
            ClockState::BehindFloor => "behind floor",
            ClockState::Ahead => "ahead",
        }
    }
}

impl std::fmt::Display for ClockState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order and time across commands, persisted by the device:
///
/// * a time floor, the newest `issued_at` of a verified command: commands are judged
///   at `max(clock, floor)`, so a clock set back (no RTC, forged NTP) cannot revive an
///   expired command;
/// * per chute, the `issued_at` of the last command that changed it (deploy, start,
///   stop, restart, remove): an older one is refused as stale, so a held and reordered
///   deploy cannot roll a fix back. Reads (inspect, logs, status) neither count nor are
///   refused.
///
/// Bounded: an entry older than the floor minus [`MAX_COMMAND_LIFETIME`] is dropped
/// (any command issued before it has expired at the judged time); if the table is
/// still full, the oldest entry is folded into `chutes_floor`, which then applies to
/// every chute not in the table (stricter, never looser).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CommandOrder {
    time_floor: u64,
    chutes: BoundedVec<(ChuteName, u64), MAX_ORDERED_CHUTES>,
    chutes_floor: u64,
    /// `issued_at` of the newest authentic command that arrived already expired, when
    /// it is newer than the floor (evidence that the clock runs ahead).
    expired_on_arrival: u64,
}

impl CommandOrder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest verified `issued_at`.
    pub fn time_floor(&self) -> u64 {
        self.time_floor
    }

    /// The device time a command is judged by: the clock, never below the floor.
    pub fn judge_time(&self, clock: u64) -> u64 {
        clock.max(self.time_floor)
    }

    pub fn clock_state(&self, clock: u64) -> ClockState {
        if clock < self.time_floor {
            ClockState::BehindFloor
        } else if self.expired_on_arrival > self.time_floor {
            ClockState::Ahead
        } else {
            ClockState::Ok
        }
    }

    /// Notes that an authentic command (it passes every check at its own `issued_at`)
    /// arrived already expired.
    pub fn note_expired_on_arrival(&mut self, issued_at: u64) {
        self.expired_on_arrival = self.expired_on_arrival.max(issued_at);
    }

    fn changes_chute(cmd: &Command) -> Option<&ChuteName> {
        match &cmd.args {
            Args::Deploy(_)
            | Args::Start(_)
            | Args::Stop(_)
            | Args::Restart(_)
            | Args::Remove(_) => cmd.args.chute(),
            _ => None,
        }
    }

    /// When the last command that changed `chute` was issued (0: none remembered).
    pub fn last_change(&self, chute: &str) -> u64 {
        self.chutes
            .iter()
            .find(|(c, _)| c.as_str() == chute)
            .map_or(self.chutes_floor, |(_, t)| *t)
    }

    /// Refuses a command that changes a chute and was issued before the last command
    /// that changed it. Mutates nothing.
    pub fn check(&self, cmd: &Command) -> Result<(), VerifyError> {
        let Some(chute) = Self::changes_chute(cmd) else {
            return Ok(());
        };
        let last = self.last_change(chute);
        if cmd.issued_at < last {
            return Err(VerifyError::Stale {
                request_id: cmd.request_id,
                chute: chute.to_string(),
                issued_at: cmd.issued_at,
                last,
            });
        }
        Ok(())
    }

    /// Records an accepted command: raises the time floor and, for a command that
    /// changes a chute, that chute's last change.
    pub fn record(&mut self, cmd: &Command) {
        self.time_floor = self.time_floor.max(cmd.issued_at);
        let Some(chute) = Self::changes_chute(cmd) else {
            return;
        };
        let mut entries = std::mem::take(&mut self.chutes).into_vec();
        match entries.iter_mut().find(|(c, _)| c == chute) {
            Some(e) => e.1 = e.1.max(cmd.issued_at),
            None => {
                if entries.len() >= MAX_ORDERED_CHUTES {
                    let horizon = self.time_floor.saturating_sub(MAX_COMMAND_LIFETIME);
                    entries.retain(|(_, t)| *t >= horizon);
                }
                if entries.len() >= MAX_ORDERED_CHUTES {
                    let (pos, oldest) = entries
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, t))| *t)
                        .map(|(i, (_, t))| (i, *t))
                        .expect("a full table has a minimum");
                    entries.swap_remove(pos);
                    self.chutes_floor = self.chutes_floor.max(oldest);
                }
                entries.push((chute.clone(), cmd.issued_at.max(self.chutes_floor)));
            }
        }
        self.chutes = BoundedVec::new(entries).expect("kept within the cap above");
    }

    /// Persistable form (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("postcard encoding of command order cannot fail")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WindowLoadError> {
        postcard::from_bytes(bytes).map_err(|source| WindowLoadError { source })
    }
}
