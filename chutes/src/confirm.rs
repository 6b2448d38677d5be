//! Telling the agent's own starts and stops from Podman's late events.
//!
//! The agent acts on a start, stop or restart when libpod's call returns; Podman's `start`
//! and `died` events for it arrive later (up to a poll interval with the file event logger)
//! and only confirm it. This machine decides what each event means, given the times the
//! agent took before its own calls and the events' own timestamps (nanoseconds since the
//! Unix epoch, Podman's unit). Pure: the times come in as arguments.
//!
//! * A `start` event is the confirmation of one of our starts while any is unconfirmed,
//!   else a start we did not make (by hand, or one whose return we never saw).
//! * A `died` event older than the latest start is stale: that run is over, this one is
//!   not. One for an exit already acted on (our stop returned) only confirms it.
//! * After a gap in the event stream (a resync), confirmations may never come: nothing
//!   pending is assumed.

use serde::{Deserialize, Serialize};

/// What a `start` event means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartEvent {
    /// The confirmation of a start the agent already acted on: swallow it. Feeding it to
    /// the lifecycle again could land after a later request (a restart) and be taken for
    /// that request's start.
    Confirms,
    /// A start the agent did not act on: a new run to take up.
    NewRun,
}

/// What a `died` event means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiedEvent {
    /// From a run older than the latest start: ignore.
    Stale,
    /// The exit of our stop, already acted on: ignore.
    Confirms,
    /// The current run exited: feed it to the lifecycle.
    Exited,
}

/// The bookkeeping of one chute's container runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmations {
    /// The latest start known: the time taken before our own start call, or a `start`
    /// event's timestamp, or a restarted run's `StartedAt`.
    last_start_nanos: i64,
    /// Our starts whose `start` event is still to come.
    unconfirmed_starts: u32,
    /// The current run's exit was acted on when our stop returned.
    exit_confirmed: bool,
    /// Runs started, by anyone, since the chute's task began (requests wait for it to grow).
    starts_seen: u64,
    /// A run started whose pid and cgroup paths are still to be read.
    refresh_pending: bool,
}

impl Confirmations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs started so far; a request that starts one waits for this to grow.
    pub fn starts_seen(&self) -> u64 {
        self.starts_seen
    }

    /// The latest start known (nanoseconds since the epoch).
    pub fn last_start_nanos(&self) -> i64 {
        self.last_start_nanos
    }

    /// Whether the current run's exit was already acted on.
    pub fn exit_confirmed(&self) -> bool {
        self.exit_confirmed
    }

    /// Our start (or restart) returned with the container running. `started_at`: the time
    /// taken before the call, or the new run's `StartedAt`; any `died` of this run is
    /// later, one of an earlier run is earlier.
    pub fn started_by_us(&mut self, started_at: i64) {
        self.last_start_nanos = self.last_start_nanos.max(started_at);
        self.exit_confirmed = false;
        self.starts_seen += 1;
        self.unconfirmed_starts += 1;
    }

    /// Our stop returned and the container has exited; its `died` event only confirms it.
    pub fn exited_by_us(&mut self) {
        self.exit_confirmed = true;
    }

    /// A `start` event stamped `time`.
    pub fn start_event(&mut self, time: i64) -> StartEvent {
        self.last_start_nanos = self.last_start_nanos.max(time);
        if self.unconfirmed_starts > 0 {
            self.unconfirmed_starts -= 1;
            // The event's run is the one we started: its pid is known only now if the
            // reply skipped reading it.
            self.refresh_pending = true;
            StartEvent::Confirms
        } else {
            self.exit_confirmed = false;
            self.starts_seen += 1;
            StartEvent::NewRun
        }
    }

    /// A `died` event stamped `time` (0: Podman gave no time).
    pub fn died_event(&self, time: i64) -> DiedEvent {
        if time != 0 && time < self.last_start_nanos {
            DiedEvent::Stale
        } else if self.exit_confirmed {
            DiedEvent::Confirms
        } else {
            DiedEvent::Exited
        }
    }

    /// After a gap in the event stream the inspect that follows is the truth: no pending
    /// confirmation is assumed.
    pub fn resynced(&mut self) {
        self.unconfirmed_starts = 0;
        self.exit_confirmed = false;
    }

    /// A run found started by an inspect (after a resync), not by an event or our call.
    pub fn start_observed(&mut self) {
        self.starts_seen += 1;
    }

    /// Asks for the run's pid and cgroup paths to be read once the current request has
    /// been answered (so the inspect does not add to its latency).
    pub fn want_refresh(&mut self) {
        self.refresh_pending = true;
    }

    /// Whether a refresh is due; clears it.
    pub fn take_refresh(&mut self) -> bool {
        std::mem::take(&mut self.refresh_pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_start_swallows_its_event_then_a_foreign_start_is_a_new_run() {
        let mut c = Confirmations::new();
        c.started_by_us(100);
        assert_eq!(c.starts_seen(), 1);
        assert_eq!(c.start_event(105), StartEvent::Confirms);
        assert_eq!(c.starts_seen(), 1);
        assert_eq!(c.start_event(200), StartEvent::NewRun);
        assert_eq!(c.starts_seen(), 2);
    }

    #[test]
    fn a_died_event_of_an_earlier_run_is_stale() {
        let mut c = Confirmations::new();
        c.started_by_us(1_000);
        assert_eq!(c.died_event(999), DiedEvent::Stale);
        assert_eq!(c.died_event(1_000), DiedEvent::Exited);
        assert_eq!(c.died_event(0), DiedEvent::Exited);
    }

    #[test]
    fn our_stop_makes_the_died_event_a_confirmation_until_the_next_start() {
        let mut c = Confirmations::new();
        c.started_by_us(10);
        c.exited_by_us();
        assert_eq!(c.died_event(20), DiedEvent::Confirms);
        c.started_by_us(30);
        assert_eq!(c.died_event(40), DiedEvent::Exited);
    }

    #[test]
    fn a_resync_forgets_pending_confirmations() {
        let mut c = Confirmations::new();
        c.started_by_us(10);
        c.exited_by_us();
        c.resynced();
        assert_eq!(c.start_event(20), StartEvent::NewRun);
        assert_eq!(c.died_event(30), DiedEvent::Exited);
    }
}
