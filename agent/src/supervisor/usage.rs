//! Owns usage sampling: each running chute's cgroup counters every interval, and its shaping
//! classes' counters every fifth.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use chute_api::{NetSample, UsageSample};
use smol::Timer;
use tracing::debug;

use super::registry::Agent;

/// Per-direction counters of the chute's shaping classes (L2 bytes).
pub fn net_sample(s: &tc_shaper::ShapingStats) -> NetSample {
    {
        let mut n = NetSample::default();
        if let Some(d) = &s.down {
            n.down_bytes = d.bytes;
            n.down_packets = d.packets;
            n.down_drops = d.drops;
            n.down_rate_bps = d.rate_bps;
        }
        if let Some(u) = &s.up {
            n.up_bytes = u.bytes;
            n.up_packets = u.packets;
            n.up_drops = u.drops;
            n.up_rate_bps = u.rate_bps;
        }
        n
    }
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
        if tick.is_multiple_of(NET_EVERY) {
            let shaped: Vec<_> = agent
                .views()
                .into_iter()
                .filter_map(|v| {
                    let netns = {
                        let b = v.borrow();
                        b.shaping.as_ref().and(b.sandbox_key.clone())
                    };
                    netns.map(|n| (v, n))
                })
                .collect();
            for (view, netns) in shaped {
                if let Ok(stats) = tc_shaper::chute_stats(Path::new(&netns)).await {
                    view.borrow_mut().net = Some(net_sample(&stats));
                }
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
