//! Signed commands, owner-signed grants and device-signed results.
//!
//! Canonical encoding: a signature covers `DOMAIN_TAG || postcard(value)`, where the
//! tag names the purpose (`chute.v2 command\0`, `chute.v2 grant\0`, `chute.v1 result\0`)
//! so a signature made for one purpose is worthless for another. Verification always
//! re-encodes the *decoded* value, so only what the device acts on is what was signed.
//! A tag's version is the protocol version in which that structure last changed.
//!
//! How a developer signs a command (protocol v2): build the [`Command`] (any value in
//! `grant_digest`), then [`SignedCommand::sign`] with the developer key and the grant
//! the owner issued; `sign` writes [`SignedGrant::digest`] into `grant_digest` before
//! signing, so the signature covers the grant and nobody relaying the command can
//! attach another (older, broader) grant of the same developer.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::bounded::{
    refuse, BoundedBytes, BoundedString, BoundedVec, ChuteName, ChutePattern, FieldError,
};
use crate::code::ErrorCode;
use crate::keys::{DeviceId, Keypair, PublicKey, SignatureBytes};
use crate::{Text, MAX_GRANT_DEVICES, MAX_GRANT_PATTERNS, MAX_MANIFEST, MAX_PAYLOAD};

pub(crate) const COMMAND_TAG: &[u8] = b"chute.v2 command\0";
pub(crate) const GRANT_TAG: &[u8] = b"chute.v2 grant\0";
pub(crate) const RESULT_TAG: &[u8] = b"chute.v1 result\0";

pub(crate) fn canonical<T: Serialize>(tag: &[u8], value: &T) -> Vec<u8> {
    let mut out = tag.to_vec();
    // Our types have known lengths and infallible Serialize impls; writing into a
    // growable Vec cannot run out of room.
    out.extend(
        postcard::to_allocvec(value)
            .expect("postcard encoding of in-memory protocol values cannot fail"),
    );
    out
}

macro_rules! procedures {
    ($( $(#[$doc:meta])* $name:ident = $num:literal => $label:literal, )*) => {
        /// A procedure a command can call. Each is a separate right in a [`Grant`].
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Procedure {
            $( $(#[$doc])* $name, )*
        }

        impl Procedure {
            pub const ALL: &'static [Procedure] = &[ $( Procedure::$name, )* ];

            /// The stable wire code.
            pub fn code(self) -> u8 {
                match self { $( Procedure::$name => $num, )* }
            }

            pub fn from_code(code: u8) -> Result<Self, FieldError> {
                match code {
                    $( $num => Ok(Procedure::$name), )*
                    other => Err(FieldError::UnknownCode { what: "procedure", code: u64::from(other) }),
                }
            }

            /// Lowercase name, e.g. `deploy`.
            pub fn as_str(self) -> &'static str {
                match self { $( Procedure::$name => $label, )* }
            }
        }
    };
}

procedures! {
    /// Create or replace a chute from a manifest and (optionally) a transferred image.
    Deploy = 1 => "deploy",
    Start = 2 => "start",
    Stop = 3 => "stop",
    Restart = 4 => "restart",
    Remove = 5 => "remove",
    /// Read (and optionally follow) a chute's logs.
    Logs = 6 => "logs",
    Inspect = 7 => "inspect",
    /// Device status: resources and every chute's state.
    Status = 8 => "status",
    /// Install a newer grant for a developer key (supersedes older ones).
    UpdateGrant = 9 => "update-grant",
}

impl fmt::Display for Procedure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Procedure {
    type Err = FieldError;
    fn from_str(s: &str) -> Result<Self, FieldError> {
        Procedure::ALL
            .iter()
            .copied()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| FieldError::Invalid {
                what: "procedure",
                value: s.to_owned(),
                why: "not a known procedure name",
            })
    }
}

impl Serialize for Procedure {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.code())
    }
}

impl<'de> Deserialize<'de> for Procedure {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = u8::deserialize(d)?;
        Procedure::from_code(code).map_err(refuse)
    }
}

/// A set of procedures, one bit per procedure code. Only bits of procedures that exist
/// can be set: an unknown bit is refused when rights are built ([`Rights::from_bits`])
/// and when a grant is decoded, so a grant never carries rights for procedures a later
/// version might add.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Rights(u32);

impl<'de> Deserialize<'de> for Rights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Rights::from_bits(u32::deserialize(d)?).map_err(refuse)
    }
}

impl Rights {
    pub const NONE: Rights = Rights(0);

    /// Rights from their wire bits, refusing bits that name no procedure.
    pub fn from_bits(bits: u32) -> Result<Self, FieldError> {
        let unknown = bits & !Self::all().0;
        if unknown != 0 {
            return Err(FieldError::UnknownCode {
                what: "rights bit",
                code: u64::from(unknown.trailing_zeros()),
            });
        }
        Ok(Rights(bits))
    }

    /// The wire bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn of(procedures: &[Procedure]) -> Self {
        Rights(procedures.iter().fold(0, |acc, p| acc | (1u32 << p.code())))
    }

    pub fn all() -> Self {
        Self::of(Procedure::ALL)
    }

    pub fn contains(self, p: Procedure) -> bool {
        self.0 & (1u32 << p.code()) != 0
    }

    pub fn procedures(self) -> impl Iterator<Item = Procedure> {
        Procedure::ALL
            .iter()
            .copied()
            .filter(move |p| self.contains(*p))
    }
}

impl fmt::Debug for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.procedures().map(Procedure::as_str))
            .finish()
    }
}

impl fmt::Display for Rights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.procedures().map(Procedure::as_str).collect();
        write!(f, "[{}]", names.join(","))
    }
}

/// Arguments of `deploy`. The agent must refuse a manifest whose `name` differs from
/// `chute`: the grant's prefix check is made on `chute`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployArgs {
    pub chute: ChuteName,
    pub manifest_toml: BoundedString<MAX_MANIFEST>,
    /// sha256 of the OCI image archive to transfer with CHUNKs; `None` uses an image
    /// already present on the device.
    pub image_sha256: Option<[u8; 32]>,
    pub image_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChuteArgs {
    pub chute: ChuteName,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopArgs {
    pub chute: ChuteName,
    /// Seconds to wait after SIGTERM before SIGKILL.
    pub timeout_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsArgs {
    pub chute: ChuteName,
    /// Lines of history to send first.
    pub tail: u32,
    /// Keep streaming new lines as EVENTs until unsubscribed.
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateGrantArgs {
    pub grant: SignedGrant,
}

/// Typed arguments; the variant *is* the procedure, so the two cannot disagree.
/// On the wire: procedure code (u8), then that procedure's argument struct.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Args {
    Deploy(DeployArgs),
    Start(ChuteArgs),
    Stop(StopArgs),
    Restart(ChuteArgs),
    Remove(ChuteArgs),
    Logs(LogsArgs),
    Inspect(ChuteArgs),
    Status,
    UpdateGrant(UpdateGrantArgs),
}

impl Args {
    pub fn procedure(&self) -> Procedure {
        match self {
            Args::Deploy(_) => Procedure::Deploy,
            Args::Start(_) => Procedure::Start,
            Args::Stop(_) => Procedure::Stop,
            Args::Restart(_) => Procedure::Restart,
            Args::Remove(_) => Procedure::Remove,
            Args::Logs(_) => Procedure::Logs,
            Args::Inspect(_) => Procedure::Inspect,
            Args::Status => Procedure::Status,
            Args::UpdateGrant(_) => Procedure::UpdateGrant,
        }
    }

    /// The chute this command touches, if any (checked against the grant's prefixes).
    pub fn chute(&self) -> Option<&ChuteName> {
        match self {
            Args::Deploy(a) => Some(&a.chute),
            Args::Start(a) | Args::Restart(a) | Args::Remove(a) | Args::Inspect(a) => {
                Some(&a.chute)
            }
            Args::Stop(a) => Some(&a.chute),
            Args::Logs(a) => Some(&a.chute),
            Args::Status | Args::UpdateGrant(_) => None,
        }
    }
}

impl Serialize for Args {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(2)?;
        t.serialize_element(&self.procedure())?;
        match self {
            Args::Deploy(a) => t.serialize_element(a)?,
            Args::Start(a) | Args::Restart(a) | Args::Remove(a) | Args::Inspect(a) => {
                t.serialize_element(a)?
            }
            Args::Stop(a) => t.serialize_element(a)?,
            Args::Logs(a) => t.serialize_element(a)?,
            Args::Status => t.serialize_element(&())?,
            Args::UpdateGrant(a) => t.serialize_element(a)?,
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for Args {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Args;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a procedure code and its arguments")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Args, A::Error> {
                let procedure: Procedure = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let missing = || de::Error::invalid_length(1, &"procedure arguments");
                Ok(match procedure {
                    Procedure::Deploy => Args::Deploy(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Start => Args::Start(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Stop => Args::Stop(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Restart => Args::Restart(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Remove => Args::Remove(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Logs => Args::Logs(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Inspect => Args::Inspect(seq.next_element()?.ok_or_else(missing)?),
                    Procedure::Status => {
                        seq.next_element::<()>()?.ok_or_else(missing)?;
                        Args::Status
                    }
                    Procedure::UpdateGrant => {
                        Args::UpdateGrant(seq.next_element()?.ok_or_else(missing)?)
                    }
                })
            }
        }
        d.deserialize_tuple(2, V)
    }
}

/// What a developer signs. Field order is the canonical order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub device_id: DeviceId,
    /// Unique per signer; the replay window refuses a repeat or one far below the
    /// newest seen. A CLI can use a counter or the issue time in microseconds.
    pub request_id: u64,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the command is refused after this.
    pub expires_at: u64,
    pub args: Args,
    /// [`SignedGrant::digest`] of the grant this command is issued under (set by
    /// [`SignedCommand::sign`]); a command carrying any other grant is refused.
    pub grant_digest: [u8; 32],
}

impl Command {
    pub fn procedure(&self) -> Procedure {
        self.args.procedure()
    }

    /// The exact bytes a signature covers.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical(COMMAND_TAG, self)
    }

    /// sha256 of the canonical bytes: names this command in results and logs.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.canonical_bytes()).into()
    }
}

/// An owner's statement: `developer` may call `rights` on chutes matched by one of
/// `chute_patterns` (see [`ChutePattern`]), on `devices` (empty = every device that
/// trusts this owner), from `issued_at` until `expires_at` (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub developer: PublicKey,
    pub rights: Rights,
    pub chute_patterns: BoundedVec<ChutePattern, MAX_GRANT_PATTERNS>,
    pub devices: BoundedVec<DeviceId, MAX_GRANT_DEVICES>,
    pub issued_at: u64,
    pub expires_at: u64,
}

impl Grant {
    pub fn canonical_bytes(&self) -> Vec<u8> {
        canonical(GRANT_TAG, self)
    }

    /// Signs with the owner's key.
    pub fn sign(self, owner: &Keypair) -> SignedGrant {
        let signature = owner.sign_raw(&self.canonical_bytes());
        SignedGrant {
            grant: self,
            signature,
        }
    }

    /// Whether one of the granted patterns covers `chute` (on name boundaries).
    pub fn covers_chute(&self, chute: &str) -> bool {
        self.chute_patterns.iter().any(|p| p.covers(chute))
    }

    pub fn covers_device(&self, device: &DeviceId) -> bool {
        self.devices.is_empty() || self.devices.contains(device)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedGrant {
    pub grant: Grant,
    /// By the device owner's key over [`Grant::canonical_bytes`].
    pub signature: SignatureBytes,
}

impl SignedGrant {
    /// sha256 of the grant's canonical bytes: what a command's `grant_digest` names.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.grant.canonical_bytes()).into()
    }

    /// Whether `owner` signed this grant.
    pub fn is_signed_by(&self, owner: &PublicKey) -> bool {
        owner.verify_strict(&self.grant.canonical_bytes(), &self.signature)
    }
}

/// A command with its signature and the grant that authorises the signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommand {
    pub command: Command,
    pub signer: PublicKey,
    pub signature: SignatureBytes,
    pub grant: SignedGrant,
}

impl SignedCommand {
    /// Binds `command` to `grant` (sets `grant_digest`), signs it with the developer
    /// key and attaches the grant.
    pub fn sign(mut command: Command, developer: &Keypair, grant: SignedGrant) -> Self {
        command.grant_digest = grant.digest();
        let signature = developer.sign_raw(&command.canonical_bytes());
        Self {
            command,
            signer: developer.public(),
            signature,
            grant,
        }
    }
}

/// What a procedure returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Procedure-specific payload (postcard of the reply type).
    Ok(BoundedBytes<MAX_PAYLOAD>),
    Err {
        code: ErrorCode,
        message: Text,
    },
}

#[derive(Serialize)]
struct ResultBody<'a> {
    request_id: u64,
    device_id: &'a DeviceId,
    command_digest: &'a [u8; 32],
    outcome: &'a Outcome,
}

/// A result signed by the device key, bound to the exact command it answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedResult {
    pub request_id: u64,
    pub device_id: DeviceId,
    /// [`Command::digest`] of the command this answers.
    pub command_digest: [u8; 32],
    pub outcome: Outcome,
    pub signature: SignatureBytes,
}

/// Why a result was not accepted as coming from the device for this command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    #[error("result claims device {claimed}, but the key {key} is device {actual}")]
    WrongDevice {
        claimed: DeviceId,
        actual: DeviceId,
        key: PublicKey,
    },
    #[error("result answers request {got}, expected {expected}")]
    WrongRequest { expected: u64, got: u64 },
    #[error("result for request {request_id} answers a different command (digest mismatch)")]
    WrongCommand { request_id: u64 },
    #[error("result for request {request_id} is not signed by device key {key}")]
    BadSignature { request_id: u64, key: PublicKey },
}

impl SignedResult {
    fn body_bytes(
        request_id: u64,
        device_id: &DeviceId,
        digest: &[u8; 32],
        outcome: &Outcome,
    ) -> Vec<u8> {
        canonical(
            RESULT_TAG,
            &ResultBody {
                request_id,
                device_id,
                command_digest: digest,
                outcome,
            },
        )
    }

    /// Signs the outcome of `command` with the device key.
    pub fn sign(device: &Keypair, command: &Command, outcome: Outcome) -> Self {
        let device_id = device.device_id();
        let command_digest = command.digest();
        let signature = device.sign_raw(&Self::body_bytes(
            command.request_id,
            &device_id,
            &command_digest,
            &outcome,
        ));
        Self {
            request_id: command.request_id,
            device_id,
            command_digest,
            outcome,
            signature,
        }
    }

    /// Checks that the device holding `device_key` produced this result for `command`.
    pub fn verify(&self, device_key: &PublicKey, command: &Command) -> Result<(), ResultError> {
        let actual = device_key.device_id();
        if self.device_id != actual {
            return Err(ResultError::WrongDevice {
                claimed: self.device_id,
                actual,
                key: *device_key,
            });
        }
        if self.request_id != command.request_id {
            return Err(ResultError::WrongRequest {
                expected: command.request_id,
                got: self.request_id,
            });
        }
        if self.command_digest != command.digest() {
            return Err(ResultError::WrongCommand {
                request_id: self.request_id,
            });
        }
        let body = Self::body_bytes(
            self.request_id,
            &self.device_id,
            &self.command_digest,
            &self.outcome,
        );
        if !device_key.verify_strict(&body, &self.signature) {
            return Err(ResultError::BadSignature {
                request_id: self.request_id,
                key: *device_key,
            });
        }
        Ok(())
    }
}
