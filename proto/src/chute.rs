//! The wire's chute types, wrapping the model's (`chutes`): one name rule and one state set
//! for the whole system.

use std::fmt;
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::bounded::{check_name_chars, refuse, BoundedString, FieldError, MAX_CHUTE_NAME};
use crate::message::ChuteState;

/// A chute name on the wire: a [`chutes::ChuteName`] (`[a-z0-9-]`, 1..=40, not starting or
/// ending with `-`), encoded as a string whose length is capped before it is copied.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChuteName(chutes::ChuteName);

const WHAT: &str = "chute name";

impl ChuteName {
    pub fn new(s: impl Into<String>) -> Result<Self, FieldError> {
        let s = s.into();
        if s.is_empty() {
            return Err(FieldError::Invalid {
                what: WHAT,
                value: s,
                why: "must not be empty",
            });
        }
        check_name_chars(WHAT, &s)?;
        match chutes::ChuteName::parse(&s) {
            Ok(n) => Ok(ChuteName(n)),
            Err(_) => Err(FieldError::Invalid {
                what: WHAT,
                value: s,
                why: "must not start or end with '-'",
            }),
        }
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The model's name.
    pub fn name(&self) -> &chutes::ChuteName {
        &self.0
    }
}

impl From<chutes::ChuteName> for ChuteName {
    fn from(n: chutes::ChuteName) -> Self {
        ChuteName(n)
    }
}

impl From<ChuteName> for chutes::ChuteName {
    fn from(n: ChuteName) -> Self {
        n.0
    }
}

impl Deref for ChuteName {
    type Target = str;
    fn deref(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Debug for ChuteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.0.as_str(), f)
    }
}

impl fmt::Display for ChuteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

impl Serialize for ChuteName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for ChuteName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The cap is checked on the borrowed length before anything is copied.
        let raw = BoundedString::<MAX_CHUTE_NAME>::deserialize(d)?;
        ChuteName::new(raw.into_string()).map_err(refuse)
    }
}

/// The agent's lifecycle state as the wire reports it (the wire's set is append-only).
impl From<chutes::ChuteState> for ChuteState {
    fn from(s: chutes::ChuteState) -> Self {
        match s {
            chutes::ChuteState::Installing => ChuteState::Booting,
            chutes::ChuteState::Running => ChuteState::Running,
            // Exited, waiting for its restart delay: Spawnpoint's "zombie".
            chutes::ChuteState::Restarting => ChuteState::Zombie,
            chutes::ChuteState::Stopped => ChuteState::Stopped,
            chutes::ChuteState::Failed => ChuteState::Failed,
            chutes::ChuteState::Dead => ChuteState::Dead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_name_is_the_model_name() {
        for ok in ["a", "web-1", "x".repeat(40).as_str()] {
            assert_eq!(ChuteName::new(ok).expect("valid").as_str(), ok);
            assert!(chutes::ChuteName::parse(ok).is_ok());
        }
        for bad in ["", "-web", "web-", "Web", "a b", "x".repeat(41).as_str()] {
            assert!(ChuteName::new(bad).is_err(), "{bad:?}");
            assert!(chutes::ChuteName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_model_state_has_a_wire_state() {
        use chutes::ChuteState as S;
        let all = [
            S::Installing,
            S::Running,
            S::Restarting,
            S::Stopped,
            S::Failed,
            S::Dead,
        ];
        let wire: Vec<ChuteState> = all.into_iter().map(ChuteState::from).collect();
        assert_eq!(wire[1], ChuteState::Running);
        assert_eq!(wire[2], ChuteState::Zombie);
        assert_eq!(wire[5], ChuteState::Dead);
    }
}
