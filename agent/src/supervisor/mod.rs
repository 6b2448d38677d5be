//! The supervisor: one task per chute that alone owns that chute's lifecycle (Spawnpoint's
//! design), a router that feeds Podman's event stream to those tasks, a usage sampler, and
//! reconciliation with what Podman reports when the agent starts.
//!
//! Everything runs on one single-threaded executor; shared state lives in `RefCell`s that
//! are never borrowed across an `.await`. The rooms:
//!
//! * [`registry`]: `Agent`, the chutes' handles and views, snapshot writes, list/inspect/status
//! * `actor`: the per-chute task, its messages, Podman calls and their confirmations
//! * `deploy`: deploy, update, rollback
//! * [`reconcile`]: rebuilding every chute's task at start-up
//! * [`images`]: image archives, the local store, pulls
//! * [`spec`]: labels and the libpod container spec
//! * `shaping`: a running chute's bandwidth shaping
//! * [`usage`]: cgroup and shaping counters, sampled
//! * [`events`]: Podman's event stream, routed to the tasks
//! * [`runtime`]: the trait in front of Podman that the rooms above call

mod actor;
mod deploy;
mod error;
pub mod events;
pub mod images;
pub mod reconcile;
pub mod registry;
pub mod runtime;
pub mod shaping;
pub mod spec;
pub mod usage;

#[cfg(test)]
mod durability_tests;
#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

pub use actor::ChuteOp;
pub use error::{OpError, ReconcileError};
pub use events::route_events;
pub use images::{ensure_image, sha256_file, IMAGE_ARCHIVE, IMAGE_DIGEST};
pub use registry::{Agent, ChuteView};
pub use runtime::ContainerRuntime;
pub use spec::{container_spec, LABEL_CHUTE, LABEL_INSTANCE, LABEL_MANAGED, LABEL_MANIFEST};
pub use usage::{net_sample, sample_usage};

/// Wall-clock time in Podman's event timestamp unit.
fn wall_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A named point at which a debug build kills itself (SIGKILL, as `kill -9` would) when
/// `CHUTED_CRASH_AT` names it, so crash tests interrupt an operation exactly there rather
/// than by timing luck. Compiled out of release builds.
#[cfg(debug_assertions)]
pub(crate) fn crash_point(point: &str) {
    if std::env::var("CHUTED_CRASH_AT").is_ok_and(|p| p == point) {
        eprintln!("CHUTED_CRASH_AT={point}: killing myself");
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &std::process::id().to_string()])
            .status();
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(crate) fn crash_point(_point: &str) {}

pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
