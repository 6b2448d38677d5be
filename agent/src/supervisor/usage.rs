//! Owns usage sampling: each running chute's cgroup counters every interval, and its
//! network counters every fifth.
//!
//! One source of network byte counters: the chute's own interfaces in
//! `/proc/<pid>/net/dev` (received = down, sent = up). It counts every chute, shaped or
//! not, is one file read with no namespace to enter, and is what the chute itself saw.
//! tc's class statistics add only what nothing else knows, for shaped chutes: packets
//! the shaper dropped and its rate estimate. `inspect`, heartbeats and the cloud all read
//! these samples.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chute_api::{NetSample, UsageSample};
use smol::Timer;
use tracing::debug;

use super::registry::Agent;

/// A chute's network counters: bytes from its interfaces (`pid` 0: none), and for a
/// shaped chute its shaping classes' packets, drops and rates.
pub fn net_sample(pid: u32, shaping: Option<&tc_shaper::ShapingStats>) -> Option<NetSample> {
    let bytes = net_bytes(pid);
    if bytes.is_none() && shaping.is_none() {
        return None;
    }
    let mut n = NetSample::default();
    if let Some((rx, tx)) = bytes {
        n.down_bytes = rx;
        n.up_bytes = tx;
    }
    if let Some(s) = shaping {
        if let Some(d) = &s.down {
            n.down_packets = d.packets;
            n.down_drops = d.drops;
            n.down_rate_bps = d.rate_bps;
        }
        if let Some(u) = &s.up {
            n.up_packets = u.packets;
            n.up_drops = u.drops;
            n.up_rate_bps = u.rate_bps;
        }
    }
    Some(n)
}

fn net_bytes(pid: u32) -> Option<(u64, u64)> {
    if pid == 0 {
        return None;
    }
    std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .ok()
        .and_then(|t| parse_net_dev(&t))
}

/// Sums the receive and transmit byte counters of every interface but `lo` in a
/// `/proc/<pid>/net/dev` text (the counters of the chute's network namespace).
pub fn parse_net_dev(text: &str) -> Option<(u64, u64)> {
    let mut total = None;
    for line in text.lines().skip(2) {
        let Some((iface, counters)) = line.split_once(':') else {
            continue;
        };
        if iface.trim() == "lo" {
            continue;
        }
        let fields: Vec<u64> = counters
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        if let (Some(rx), Some(tx)) = (fields.first(), fields.get(8)) {
            let (r, t) = total.unwrap_or((0u64, 0u64));
            total = Some((r.saturating_add(*rx), t.saturating_add(*tx)));
        }
    }
    total
}

/// Samples every running chute's cgroup counters once per interval.
pub async fn sample_usage(agent: Rc<Agent>) {
    let interval = agent.cfg.sample_interval;
    let mut warned_at: Option<Instant> = None;
    // Reading tc counters means entering the chute's network namespace; every fifth
    // sample is plenty for heartbeats and keeps 100 chutes cheap.
    const NET_EVERY: u64 = 5;
    let mut tick: u64 = 0;
    loop {
        Timer::after(interval).await;
        tick += 1;
        if tick % NET_EVERY == 0 {
            for view in agent.views() {
                let (pid, netns) = {
                    let b = view.borrow();
                    (b.pid, b.shaping.as_ref().and(b.sandbox_key.clone()))
                };
                if pid == 0 {
                    continue;
                }
                let stats = match netns {
                    Some(n) => tc_shaper::chute_stats(Path::new(&n)).await.ok(),
                    None => None,
                };
                view.borrow_mut().net = net_sample(pid, stats.as_ref());
            }
        }
        let now = agent.now_ms();
        for view in agent.views() {
            let mut v = view.borrow_mut();
            let Some(cg) = v.cgroup.as_ref() else {
                continue;
            };
            match cg.usage() {
                Ok(u) => {
                    let cpu_percent = match &v.usage {
                        Some(prev)
                            if now > prev.sampled_at_ms && u.cpu_usage_ns >= prev.cpu_usage_ns =>
                        {
                            (u.cpu_usage_ns - prev.cpu_usage_ns) as f64
                                / ((now - prev.sampled_at_ms) as f64 * 1e6)
                                * 100.0
                        }
                        _ => 0.0,
                    };
                    v.usage = Some(UsageSample {
                        cpu_usage_ns: u.cpu_usage_ns,
                        cpu_percent,
                        memory_bytes: u.memory_bytes,
                        pids: u.pids,
                        sampled_at_ms: now,
                    });
                }
                Err(e) => {
                    // A container that just died loses its cgroup; say so once a minute at most.
                    if warned_at.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        debug!(chute = %v.manifest.name, error = %e, "usage sample failed");
                        warned_at = Some(Instant::now());
                    }
                    if v.pid == 0 {
                        v.cgroup = None;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_sums_non_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0\n  \
eth0:    5000      10    0    0    0     0          0         0     7000      12    0    0    0     0       0          0\n";
        assert_eq!(parse_net_dev(text), Some((5000, 7000)));
        assert_eq!(parse_net_dev("garbage"), None);
    }
}
