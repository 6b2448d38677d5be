//! Heartbeats: device pools (total and free), agent version, uptime, and per chute its
//! state and usage. Built from plain inputs so the encoding size is easy to measure.

use std::collections::BTreeMap;

use proto::{
    BoundedString, BoundedVec, ChuteName, ChuteState, ChuteUsage, Heartbeat, Resources, StateChange,
};

use crate::supervisor::Agent;

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Bytes used by the regular files under `dir` (symlinks are not followed; unreadable
/// entries count as nothing). The state dir holds a few files and partial image
/// transfers, so the walk is short.
pub fn dir_usage(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0u64;
    for entry in entries.flatten() {
        let Ok(meta) = entry.path().symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            total = total.saturating_add(dir_usage(&entry.path()));
        } else if meta.is_file() {
            total = total.saturating_add(meta.len());
        }
    }
    total
}

/// The agent's current heartbeat. Chutes past the protocol's cap are left out (the
/// ledger would refuse that many long before). `clock` is the device clock and its
/// state against the time floor.
pub fn build(agent: &Agent, seq: u64, clock: (u64, proto::ClockState)) -> Heartbeat {
    let resources = {
        let ledger = agent.ledger.borrow();
        let cap = ledger.capacity();
        let free = ledger.free();
        Resources {
            cpu_millicores_total: clamp32(cap.cpu_millicores),
            cpu_millicores_free: clamp32(free.cpu_millicores),
            memory_total: cap.memory_bytes,
            memory_free: free.memory_bytes,
            pids_total: clamp32(cap.pids),
            pids_free: clamp32(free.pids),
        }
    };
    let mut chutes = Vec::new();
    for view in agent.views().into_iter().take(proto::MAX_HEARTBEAT_CHUTES) {
        let v = view.borrow();
        let name = ChuteName::from(v.manifest.name.clone());
        // The sampler's counters (supervisor::usage), like `inspect` shows.
        let (rx_bytes, tx_bytes) = v
            .net
            .as_ref()
            .map_or((0, 0), |n| (n.down_bytes, n.up_bytes));
        let usage = v.usage.clone().unwrap_or_default();
        chutes.push(ChuteUsage {
            name,
            state: v.state.into(),
            cpu_millicores: (usage.cpu_percent * 10.0)
                .round()
                .clamp(0.0, f64::from(u32::MAX)) as u32,
            memory_bytes: usage.memory_bytes,
            pids: clamp32(usage.pids),
            rx_bytes,
            tx_bytes,
            restarts: v.restarts,
        });
    }
    Heartbeat {
        seq,
        uptime_secs: agent.uptime().as_secs(),
        agent_version: BoundedString::truncating(env!("CARGO_PKG_VERSION")),
        resources,
        chutes: BoundedVec::new(chutes).expect("cut at MAX_HEARTBEAT_CHUTES above"),
        clock_secs: clock.0,
        clock: clock.1,
        state_dir_bytes: dir_usage(&agent.state_dir),
    }
}

/// Every chute's current state, by name.
pub fn states(agent: &Agent) -> BTreeMap<chutes::ChuteName, chutes::ChuteState> {
    agent
        .views()
        .iter()
        .map(|v| {
            let v = v.borrow();
            (v.manifest.name.clone(), v.state)
        })
        .collect()
}

/// The changes from `last` to `now` (a chute gone from `now` was removed: `Dead`),
/// as publications stamped `at` (unix seconds).
pub fn state_changes(
    last: &BTreeMap<chutes::ChuteName, chutes::ChuteState>,
    now: &BTreeMap<chutes::ChuteName, chutes::ChuteState>,
    at: u64,
) -> Vec<StateChange> {
    let mut out = Vec::new();
    for (name, state) in now {
        if last.get(name) != Some(state) {
            out.push(StateChange {
                chute: name.clone().into(),
                state: (*state).into(),
                at,
                detail: BoundedString::truncating(&state.to_string()),
            });
        }
    }
    for name in last.keys().filter(|n| !now.contains_key(*n)) {
        out.push(StateChange {
            chute: name.clone().into(),
            state: ChuteState::Dead,
            at,
            detail: BoundedString::truncating("removed"),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_report_new_changed_and_removed() {
        use chutes::ChuteState as S;
        let n = |s: &str| chutes::ChuteName::parse(s).expect("valid name");
        let last: BTreeMap<chutes::ChuteName, S> = [
            (n("a"), S::Running),
            (n("b"), S::Running),
            (n("c"), S::Stopped),
        ]
        .into();
        let now: BTreeMap<chutes::ChuteName, S> = [
            (n("a"), S::Running),
            (n("b"), S::Restarting),
            (n("d"), S::Installing),
        ]
        .into();
        let got: Vec<(String, ChuteState)> = state_changes(&last, &now, 5)
            .into_iter()
            .map(|c| (c.chute.to_string(), c.state))
            .collect();
        assert_eq!(
            got,
            [
                ("b".to_owned(), ChuteState::Zombie),
                ("d".to_owned(), ChuteState::Booting),
                ("c".to_owned(), ChuteState::Dead),
            ]
        );
        assert!(state_changes(&now, &now, 6).is_empty());
    }
}
