//! Length-capped field types. Each one checks its cap while it is being decoded (so a
//! hostile length prefix never makes us collect more than the cap) and in its
//! constructors, so a value of these types is valid wherever it is found: parse once.
//!
//! postcard drops the text of custom serde errors, so a cap violation found during
//! decoding is also parked in a thread-local slot that [`crate::decode`] reads back
//! to produce an error naming the cap. The slot is cleared before every decode.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// A field that is present but not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("{what} is {len} long, the cap is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} {value:?} is invalid: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
    #[error("unknown {what} code {code}")]
    UnknownCode { what: &'static str, code: u64 },
}

thread_local! {
    static LAST_FIELD_ERROR: RefCell<Option<FieldError>> = const { RefCell::new(None) };
}

/// Records why a field was refused during decoding and returns the serde error.
pub(crate) fn refuse<E: de::Error>(err: FieldError) -> E {
    let text = err.to_string();
    LAST_FIELD_ERROR.with(|slot| *slot.borrow_mut() = Some(err));
    E::custom(text)
}

pub(crate) fn clear_field_error() {
    LAST_FIELD_ERROR.with(|slot| *slot.borrow_mut() = None);
}

pub(crate) fn take_field_error() -> Option<FieldError> {
    LAST_FIELD_ERROR.with(|slot| slot.borrow_mut().take())
}

/// A UTF-8 string of at most `MAX` bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BoundedString<const MAX: usize>(String);

impl<const MAX: usize> BoundedString<MAX> {
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        if s.len() > MAX {
            return Err(FieldError::TooLong {
                what: "string",
                len: s.len(),
                max: MAX,
            });
        }
        Ok(Self(s))
    }

    /// Builds from a string, cutting it at a char boundary to fit the cap (for
    /// human-readable messages where losing the tail is better than losing it all).
    pub fn truncating(s: &str) -> Self {
        let mut end = s.len().min(MAX);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(s[..end].to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl<const MAX: usize> Deref for BoundedString<MAX> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Debug for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<const MAX: usize> fmt::Display for BoundedString<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<const MAX: usize> Serialize for BoundedString<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedString<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MAX: usize>;
        impl<const MAX: usize> Visitor<'_> for V<MAX> {
            type Value = BoundedString<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string of at most {MAX} bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                BoundedString::new(v).map_err(refuse)
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                BoundedString::new(v).map_err(refuse)
            }
        }
        d.deserialize_str(V::<MAX>)
    }
}

/// A byte string of at most `MAX` bytes.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct BoundedBytes<const MAX: usize>(Vec<u8>);

impl<const MAX: usize> BoundedBytes<MAX> {
    pub fn new(b: impl Into<Vec<u8>>) -> Result<Self, FieldError> {
        let b = b.into();
        if b.len() > MAX {
            return Err(FieldError::TooLong {
                what: "byte string",
                len: b.len(),
                max: MAX,
            });
        }
        Ok(Self(b))
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl<const MAX: usize> Deref for BoundedBytes<MAX> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl<const MAX: usize> fmt::Debug for BoundedBytes<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl<const MAX: usize> Serialize for BoundedBytes<MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for BoundedBytes<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const MAX: usize>;
        impl<'de, const MAX: usize> Visitor<'de> for V<MAX> {
            type Value = BoundedBytes<MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {MAX} bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                if v.len() > MAX {
                    return Err(refuse(FieldError::TooLong {
                        what: "byte string",
                        len: v.len(),
                        max: MAX,
                    }));
                }
                Ok(BoundedBytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
                BoundedBytes::new(v).map_err(refuse)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    if out.len() == MAX {
                        return Err(refuse(FieldError::TooLong {
                            what: "byte string",
                            len: MAX + 1,
                            max: MAX,
                        }));
                    }
                    out.push(b);
                }
                Ok(BoundedBytes(out))
            }
        }
        d.deserialize_bytes(V::<MAX>)
    }
}

/// A list of at most `MAX` elements; decoding stops at element `MAX + 1`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const MAX: usize>(Vec<T>);

impl<T, const MAX: usize> Default for BoundedVec<T, MAX> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T, const MAX: usize> BoundedVec<T, MAX> {
    pub fn new(items: Vec<T>) -> Result<Self, FieldError> {
        if items.len() > MAX {
            return Err(FieldError::TooLong {
                what: "list",
                len: items.len(),
                max: MAX,
            });
        }
        Ok(Self(items))
    }

    /// Appends, refusing to grow past the cap.
    pub fn push(&mut self, item: T) -> Result<(), FieldError> {
        if self.0.len() == MAX {
            return Err(FieldError::TooLong {
                what: "list",
                len: MAX + 1,
                max: MAX,
            });
        }
        self.0.push(item);
        Ok(())
    }

    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T, const MAX: usize> Deref for BoundedVec<T, MAX> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const MAX: usize> fmt::Debug for BoundedVec<T, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl<T: Serialize, const MAX: usize> Serialize for BoundedVec<T, MAX> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for BoundedVec<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = BoundedVec<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of at most {MAX} elements")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                if let Some(n) = seq.size_hint() {
                    if n > MAX {
                        return Err(refuse(FieldError::TooLong {
                            what: "list",
                            len: n,
                            max: MAX,
                        }));
                    }
                }
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if out.len() == MAX {
                        return Err(refuse(FieldError::TooLong {
                            what: "list",
                            len: MAX + 1,
                            max: MAX,
                        }));
                    }
                    out.push(item);
                }
                Ok(BoundedVec(out))
            }
        }
        d.deserialize_seq(V::<T, MAX>(PhantomData))
    }
}

/// Longest chute name (the manifest's rule: `[a-z0-9-]`, 1..=40).
pub const MAX_CHUTE_NAME: usize = 40;

pub(crate) fn check_name_chars(what: &'static str, s: &str) -> Result<(), FieldError> {
    if s.len() > MAX_CHUTE_NAME {
        return Err(FieldError::TooLong {
            what,
            len: s.len(),
            max: MAX_CHUTE_NAME,
        });
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(FieldError::Invalid {
            what,
            value: s.to_owned(),
            why: "only a-z, 0-9 and '-' are allowed",
        });
    }
    Ok(())
}

/// A chute name: the model's (`chutes::ChuteName`), wrapped for the wire.
pub use crate::chute::ChuteName;
/// Which chutes a grant covers: an exact chute name (`web` covers `web` only) or a
/// prefix ending in `-*` (`acme-*` covers `acme-web`, never `acme` nor `acmex`). Other
/// forms (empty, a bare `*`, `acme*`, a `*` anywhere else) are refused when the pattern
/// is built (a grant being issued) and when it is decoded (a grant being verified), so
/// a pattern can never match more than its owner could read in it.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChutePattern(String);

/// What [`ChutePattern::new`] accepts, for error messages.
pub const CHUTE_PATTERN_ALLOWED: &str =
    "an exact chute name (`web`) or a prefix ending in `-*` (`acme-*`)";

impl ChutePattern {
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        let invalid = |value: String| FieldError::Invalid {
            what: "chute pattern",
            value,
            why: "a pattern is an exact chute name (`web`) or a prefix ending in `-*` (`acme-*`)",
        };
        let stem = s.strip_suffix("-*").unwrap_or(&s);
        if stem.is_empty() || stem.contains('*') {
            return Err(invalid(s));
        }
        if s.len() > MAX_CHUTE_NAME {
            return Err(FieldError::TooLong {
                what: "chute pattern",
                len: s.len(),
                max: MAX_CHUTE_NAME,
            });
        }
        check_name_chars("chute pattern", stem)?;
        Ok(Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `chute` is this exact name or lies under this `prefix-*` on a `-`
    /// boundary (with at least one character after it).
    pub fn covers(&self, chute: &str) -> bool {
        match self.0.strip_suffix('*') {
            // `acme-*`: the stem keeps its trailing `-`.
            Some(stem) => chute.len() > stem.len() && chute.starts_with(stem),
            None => chute == self.0,
        }
    }
}

impl fmt::Debug for ChutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ChutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ChutePattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChutePattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BoundedString::<MAX_CHUTE_NAME>::deserialize(d)?;
        ChutePattern::new(raw.into_string()).map_err(refuse)
    }
}
