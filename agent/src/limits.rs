//! The agent's own descriptor limit: raised to the hard limit at start, and the number of
//! chutes a limit carries (the budget the README quotes).
//!
//! systemd gives services a soft `nofile` of 1024 unless told otherwise; the agent holds
//! descriptors per chute (its cgroup counters stay open so sampling costs ~15 µs), so a
//! low soft limit would cap the fleet a router can run, and exhausting it breaks
//! supervision and snapshot writes. Raising soft to hard needs no privilege.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors each chute holds open for its life: the cgroup counters read every sample
/// (cpu, memory, memory.stat, pids).
pub const FDS_PER_CHUTE: u64 = 4;

/// Descriptors kept for everything that is not per chute: stdio, the state dir lock, the
/// Podman event stream, the executor's epoll and pipes, netlink, the cloud link, every
/// admin connection the server admits ([`crate::server::MAX_ADMIN_CONNECTIONS`]), and the
/// short-lived ones of operations in flight (Podman calls, snapshot writes, log streams).
pub const FDS_RESERVED: u64 = 64 + crate::server::MAX_ADMIN_CONNECTIONS as u64 + 64;

/// How many chutes a `nofile` soft limit carries with room for everything else.
pub fn chutes_carried(nofile: u64) -> u64 {
    nofile.saturating_sub(FDS_RESERVED) / FDS_PER_CHUTE
}

/// What [`raise_nofile`] found and left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot raise the open-files limit from {soft} to {hard}: {source}")]
pub struct LimitError {
    soft: u64,
    hard: u64,
    #[source]
    source: std::io::Error,
}

/// Sets the soft `RLIMIT_NOFILE` to the hard one (unlimited hard: left as it is, soft
/// already effectively bounded by the kernel's `nr_open`).
pub fn raise_nofile() -> Result<NofileLimit, LimitError> {
    let cur = getrlimit(Resource::Nofile);
    let soft_before = cur.current.unwrap_or(u64::MAX);
    let Some(hard) = cur.maximum else {
        return Ok(NofileLimit {
            soft_before,
            soft: soft_before,
            hard: None,
        });
    };
    if soft_before >= hard {
        return Ok(NofileLimit {
            soft_before,
            soft: soft_before,
            hard: Some(hard),
        });
    }
    let new = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    setrlimit(Resource::Nofile, new).map_err(|e| LimitError {
        soft: soft_before,
        hard,
        source: e.into(),
    })?;
    Ok(NofileLimit {
        soft_before,
        soft: hard,
        hard: Some(hard),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_at_common_limits() {
        // systemd's default soft limit, then the unit's LimitNOFILE.
        assert_eq!(chutes_carried(1024), 208);
        assert_eq!(chutes_carried(65536), 16_336);
        assert_eq!(chutes_carried(100), 0);
    }

    #[test]
    fn raising_leaves_soft_equal_to_hard() {
        let lowered = Rlimit {
            current: Some(256),
            maximum: getrlimit(Resource::Nofile).maximum,
        };
        setrlimit(Resource::Nofile, lowered).expect("lower the soft limit");
        let got = raise_nofile().expect("raise");
        assert_eq!(got.soft_before, 256);
        assert_eq!(Some(got.soft), got.hard.or(Some(256)));
        assert_eq!(getrlimit(Resource::Nofile).current, Some(got.soft));
    }
}
