//! Reconnect pacing: capped exponential backoff with jitter, as pure state.
//!
//! The delay only resets after a session that stayed healthy for a while, so a peer
//! that welcomes and then drops us (or one that sends garbage) is retried at a growing
//! interval, never in a hot loop.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    current: Option<Duration>,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            current: None,
        }
    }

    /// Forget past failures: the next delay is `initial` again.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// The next delay before reconnecting. `jitter` in `0..=u16::MAX` picks a point in
    /// the upper half of the current step (`[d/2, d]`), so a fleet that lost its cloud
    /// at the same moment does not come back in lockstep.
    pub fn next_delay(&mut self, jitter: u16) -> Duration {
        let step = match self.current {
            None => self.initial,
            Some(d) => d.saturating_mul(2).min(self.max),
        };
        self.current = Some(step);
        let half = step / 2;
        half + half.mul_f64(f64::from(jitter) / f64::from(u16::MAX))
    }

    /// The current step (before jitter), for logs.
    pub fn step(&self) -> Duration {
        self.current.unwrap_or(self.initial)
    }
}

/// Jitter from the OS CSPRNG; if it is unavailable the delay is simply not jittered.
pub fn jitter() -> u16 {
    proto::random_bytes::<2>()
        .map(u16::from_le_bytes)
        .unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let full: Vec<u64> = (0..9).map(|_| b.next_delay(u16::MAX).as_secs()).collect();
        assert_eq!(full, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(u16::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_in_upper_half() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(8));
        assert_eq!(b.next_delay(0), Duration::from_secs(4));
        assert_eq!(b.next_delay(u16::MAX), Duration::from_secs(8));
        let mid = b.next_delay(u16::MAX / 2);
        assert!(mid > Duration::from_secs(5) && mid < Duration::from_secs(7));
    }
}
