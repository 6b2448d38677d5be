//! Keys, device ids and the fixed-size byte newtypes that travel on the wire.
//!
//! A device id is the first 8 bytes of `sha256(device public key)`, shown as 16
//! lowercase hex characters. It is short enough to type and read in a console, and it
//! is derived, never assigned, so a device cannot claim another's id without its key.
//! Anything security-relevant binds the full public key as well (session auth signs
//! the key; results are verified against the key), so 64 bits only has to avoid
//! accidental collisions within one owner's fleet.

use std::fmt;
use std::str::FromStr;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Errors of key handling: parsing hex, loading a seed, drawing randomness.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{what}: expected {expected} hex characters, got {got}")]
    HexLength {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: {input:?} is not lowercase or uppercase hex")]
    HexDigit { what: &'static str, input: String },
    #[error("public key {key} is not a valid Ed25519 point")]
    InvalidPublicKey { key: PublicKey },
    #[error("system randomness unavailable: {reason}")]
    Random { reason: String },
}

/// Lowercase hex of `bytes`.
pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Decodes exactly `N` bytes of hex (either case).
pub fn hex_decode<const N: usize>(what: &'static str, input: &str) -> Result<[u8; N], KeyError> {
    let input = input.trim();
    if input.len() != N * 2 {
        return Err(KeyError::HexLength {
            what,
            expected: N * 2,
            got: input.len(),
        });
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let mut out = [0u8; N];
    for (i, pair) in input.as_bytes().chunks_exact(2).enumerate() {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = (hi << 4) | lo,
            _ => {
                return Err(KeyError::HexDigit {
                    what,
                    input: input.to_owned(),
                })
            }
        }
    }
    Ok(out)
}

/// Fills `buf` from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| KeyError::Random {
        reason: e.to_string(),
    })?;
    Ok(buf)
}

/// An Ed25519 public key as 32 raw bytes (not yet checked to be a valid point; see
/// [`PublicKey::verifying_key`]).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses 64 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        hex_decode::<32>("public key", s).map(Self)
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// The device id this key would have as a device key.
    pub fn device_id(&self) -> DeviceId {
        let digest = Sha256::digest(self.0);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        DeviceId(id)
    }

    /// The key as a curve point, refusing encodings that are not valid points.
    pub fn verifying_key(&self) -> Result<VerifyingKey, KeyError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| KeyError::InvalidPublicKey { key: *self })
    }

    /// Strict Ed25519 verification (rejects small-order keys and non-canonical `s`).
    pub(crate) fn verify_strict(&self, message: &[u8], signature: &SignatureBytes) -> bool {
        let Ok(key) = self.verifying_key() else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig).is_ok()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

/// A device id: first 8 bytes of sha256 of the device public key (16 hex chars).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 8]);

impl DeviceId {
    /// Parses 16 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, KeyError> {
        hex_decode::<8>("device id", s).map(Self)
    }

    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DeviceId({})", self.to_hex())
    }
}

impl FromStr for DeviceId {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_hex(s)
    }
}

/// A 64-byte Ed25519 signature. Serde has no impls for arrays over 32 elements, so this
/// one is written out; on the wire it is 64 raw bytes (a postcard tuple, no length).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SignatureBytes(pub [u8; 64]);

impl fmt::Debug for SignatureBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({})", hex_encode(&self.0))
    }
}

impl Serialize for SignatureBytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut tup = serializer.serialize_tuple(64)?;
        for b in &self.0 {
            tup.serialize_element(b)?;
        }
        tup.end()
    }
}

impl<'de> Deserialize<'de> for SignatureBytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = SignatureBytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; 64];
                for (i, slot) in out.iter_mut().enumerate() {
                    *slot = seq
                        .next_element()?
                        .ok_or_else(|| serde::de::Error::invalid_length(i, &self))?;
                }
                Ok(SignatureBytes(out))
            }
        }
        deserializer.deserialize_tuple(64, V)
    }
}

/// An Ed25519 key pair (device key, owner key or developer key).
#[derive(Clone)]
pub struct Keypair {
    signing: SigningKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Keypair({})", self.public())
    }
}

impl Keypair {
    /// A fresh key from the OS CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        Ok(Self::from_seed(random_bytes::<32>()?))
    }

    /// The key whose 32-byte secret seed is `seed` (the form stored on disk, 0600).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&seed),
        }
    }

    /// The 32-byte secret seed, for persisting the key.
    pub fn seed(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// Hex of the public key (64 characters), as printed by `chuted id`.
    pub fn public_hex(&self) -> String {
        self.public().to_hex()
    }

    /// The device id of this key (see the module docs).
    pub fn device_id(&self) -> DeviceId {
        self.public().device_id()
    }

    /// Raw Ed25519 signature over `message`. Callers inside this crate always prefix a
    /// domain-separation tag so a signature for one purpose is useless for another.
    pub(crate) fn sign_raw(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.signing.sign(message).to_bytes())
    }
}
