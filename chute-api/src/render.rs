//! The human output every front end prints: `chuted` and `chutectl` show the same text for
//! the same answer. Each function returns the text with its final newline.

use std::fmt::Write as _;

use chutes::{format_bytes, format_cpu, format_rate, Amounts, Manifest};

use crate::{AgentStatus, ChuteAck, ChuteDetail, ChuteSummary, DeployOutcome, DeployResult};

/// A container id as people read it: its first 12 characters.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// `list`: one row per chute.
pub fn list(chutes: &[ChuteSummary]) -> String {
    let mut out = format!(
        "{:<24} {:<11} {:>8}  {:<12}  VERSION\n",
        "NAME", "STATE", "RESTARTS", "CONTAINER"
    );
    for c in chutes {
        let _ = writeln!(
            out,
            "{:<24} {:<11} {:>8}  {:<12}  {}",
            c.name.as_str(),
            c.state.to_string(),
            c.restarts,
            short_id(c.container_id.as_deref().unwrap_or("-")),
            c.version
        );
    }
    out
}

/// `deploy`: what happened, in one line.
pub fn deploy(r: &DeployResult) -> String {
    let live = match r.outcome {
        DeployOutcome::Updated { live: true } => ", bandwidth changed live",
        _ => "",
    };
    format!(
        "{} {} ({}, container {}{live})\n",
        r.outcome.as_str(),
        r.chute.name,
        r.chute.state,
        short_id(r.chute.container_id.as_deref().unwrap_or("-"))
    )
}

/// start, stop, restart, remove: the chute and its state now.
pub fn ack(a: &ChuteAck) -> String {
    format!("{} {}\n", a.name, a.state)
}

fn opt_rate(bps: Option<u64>) -> String {
    bps.map(format_rate).unwrap_or_else(|| "unshaped".into())
}

fn amounts(a: &Amounts) -> String {
    format!(
        "cpu {}, memory {}, pids {}, down {}, up {}",
        format_cpu(a.cpu_millicores),
        format_bytes(a.memory_bytes),
        a.pids,
        format_rate(a.bandwidth_down_bps),
        format_rate(a.bandwidth_up_bps)
    )
}

fn limit(v: Option<u64>, fmt: impl Fn(u64) -> String) -> String {
    v.map(fmt).unwrap_or_else(|| "unlimited".into())
}

/// `inspect`: everything about one chute, one fact a line.
pub fn inspect(d: &ChuteDetail) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "name:          {}", d.name);
    let _ = writeln!(o, "state:         {}", d.state);
    let _ = writeln!(o, "version:       {}", d.version);
    let _ = writeln!(o, "image:         {}", d.image);
    if !d.command.is_empty() {
        let _ = writeln!(o, "command:       {}", d.command.join(" "));
    }
    let _ = writeln!(
        o,
        "container:     {} ({})",
        d.container_id.as_deref().map(short_id).unwrap_or("-"),
        d.container_name
    );
    if d.pid != 0 {
        let _ = writeln!(o, "pid:           {}", d.pid);
    }
    let _ = writeln!(
        o,
        "restarts:      {} (policy {})",
        d.restarts, d.restart_policy
    );
    if let Some(code) = d.last_exit_code {
        let _ = writeln!(o, "last exit:     {code}");
    }
    if let Some(e) = &d.last_error {
        let _ = writeln!(o, "last error:    {e}");
    }
    let _ = writeln!(
        o,
        "caps:          cpu {}, memory {}, pids {}, down {}, up {}",
        format_cpu(u64::from(d.resources.cpu_millicores)),
        format_bytes(d.resources.memory_bytes),
        d.resources.pids,
        opt_rate(d.network.bandwidth_down_bps),
        opt_rate(d.network.bandwidth_up_bps)
    );
    let _ = writeln!(
        o,
        "reservation:   {}{}",
        amounts(&d.reservation),
        if d.reservation_held {
            ""
        } else {
            " (not held)"
        }
    );
    if d.network.host_network {
        let _ = writeln!(o, "network:       host");
    }
    if !d.network.ports.is_empty() {
        let _ = writeln!(o, "ports:         {}", d.network.ports.join(", "));
    }
    if let Some(l) = &d.cgroup_limits {
        let cpu = match l.cpu_quota_us {
            Some(q) if l.cpu_period_us > 0 => {
                format!("{q} us per {} us", l.cpu_period_us)
            }
            _ => "unlimited".into(),
        };
        let _ = writeln!(
            o,
            "kernel limits: memory {}, swap beyond it {}, cpu {cpu}, pids {}",
            limit(l.memory_max, format_bytes),
            limit(l.memory_swap_max, format_bytes),
            limit(l.pids_max, |p| p.to_string())
        );
    }
    if let Some(u) = &d.usage {
        let _ = writeln!(
            o,
            "usage:         cpu {:.1}%, memory {}, pids {}",
            u.cpu_percent,
            format_bytes(u.memory_bytes),
            u.pids
        );
    }
    if let Some(s) = &d.shaping {
        let _ = writeln!(
            o,
            "shaping:       down on {}, up on {} (in the chute)",
            s.host_interface, s.chute_interface
        );
    }
    if let Some(n) = &d.net {
        let _ = writeln!(
            o,
            "traffic:       down {} B ({} drops, now {}), up {} B ({} drops, now {})",
            n.down_bytes,
            n.down_drops,
            format_rate(n.down_rate_bps),
            n.up_bytes,
            n.up_drops,
            format_rate(n.up_rate_bps)
        );
    }
    if let Some(e) = &d.net_error {
        let _ = writeln!(o, "traffic:       unreadable: {e}");
    }
    o
}

/// `status`: the agent, its pools and what it does not know.
pub fn status(s: &AgentStatus) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "chuted {}, up {}s, {} chute{}",
        s.agent_version,
        s.uptime_secs,
        s.chutes,
        if s.chutes == 1 { "" } else { "s" }
    );
    let _ = writeln!(
        o,
        "{:<10} {:>10} {:>10} {:>10}",
        "POOL", "CAPACITY", "USED", "FREE"
    );
    let p = &s.pools;
    type Column = fn(&Amounts) -> String;
    let rows: [(&str, Column); 5] = [
        ("cpu", |a| format_cpu(a.cpu_millicores)),
        ("memory", |a| format_bytes(a.memory_bytes)),
        ("pids", |a| a.pids.to_string()),
        ("down", |a| format_rate(a.bandwidth_down_bps)),
        ("up", |a| format_rate(a.bandwidth_up_bps)),
    ];
    for (name, f) in rows {
        let _ = writeln!(
            o,
            "{name:<10} {:>10} {:>10} {:>10}",
            f(&p.capacity),
            f(&p.used),
            f(&p.free)
        );
    }
    if let Some(c) = &s.clock {
        let _ = writeln!(
            o,
            "clock: {} (device time {}, time floor {})",
            c.state, c.secs, c.time_floor
        );
    }
    if let Some(b) = s.state_dir_bytes {
        let _ = writeln!(o, "state dir: {}", format_bytes(b));
    }
    if s.unknown_containers.is_empty() {
        let _ = writeln!(o, "unknown containers: none");
    } else {
        let _ = writeln!(
            o,
            "unknown containers (our labels, not in our records; left alone):"
        );
        for c in &s.unknown_containers {
            let _ = writeln!(
                o,
                "  {} {}",
                short_id(&c.container_id),
                c.chute.as_deref().unwrap_or("(no chute label)")
            );
        }
    }
    o
}

/// `validate`: what a valid manifest asks for, in one line.
pub fn validate(m: &Manifest) -> String {
    format!(
        "{} {}: image {}, cpu {}, memory {}, pids {}, down {}, up {}, restart {}\n",
        m.name,
        m.version,
        m.image,
        format_cpu(u64::from(m.resources.cpu_millicores)),
        format_bytes(m.resources.memory_bytes),
        m.resources.pids,
        opt_rate(m.network.bandwidth_down_bps),
        opt_rate(m.network.bandwidth_up_bps),
        m.restart
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChuteState, PoolStatus, UnknownContainer};

    fn name(s: &str) -> chutes::ChuteName {
        s.parse().expect("valid name")
    }

    #[test]
    fn list_shows_one_aligned_row_per_chute_with_short_ids() {
        let out = list(&[ChuteSummary {
            name: name("web"),
            state: ChuteState::Running,
            container_id: Some("0123456789abcdef0123".into()),
            restarts: 3,
            version: "1.0".into(),
            image: "localhost/web:1".into(),
        }]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(lines[1].starts_with("web "), "{out}");
        assert!(lines[1].contains(" running "), "{out}");
        assert!(lines[1].contains("0123456789ab "), "{out}");
        assert!(!lines[1].contains("0123456789abc"), "{out}");
    }

    #[test]
    fn deploy_names_what_happened() {
        let chute = ChuteAck {
            name: name("web"),
            state: ChuteState::Running,
            container_id: None,
            restarts: 0,
        };
        let r = |outcome| DeployResult {
            chute: chute.clone(),
            outcome,
        };
        assert_eq!(
            deploy(&r(DeployOutcome::Deployed)),
            "deployed web (running, container -)\n"
        );
        assert!(deploy(&r(DeployOutcome::Updated { live: true })).contains("changed live"));
        assert!(deploy(&r(DeployOutcome::Unchanged)).starts_with("unchanged web"));
    }

    #[test]
    fn status_is_a_pool_table_and_names_unknown_containers() {
        let cap = Amounts {
            cpu_millicores: 2000,
            memory_bytes: 512 << 20,
            pids: 100,
            bandwidth_down_bps: 100_000_000,
            bandwidth_up_bps: 20_000_000,
        };
        let s = AgentStatus {
            agent_version: "0.1.0".into(),
            uptime_secs: 5,
            unix_time_secs: 0,
            chutes: 1,
            pools: PoolStatus {
                capacity: cap,
                used: Amounts::ZERO,
                free: cap,
            },
            unknown_containers: vec![UnknownContainer {
                container_id: "feedfacecafe0000".into(),
                chute: Some("old".into()),
            }],
            clock: Some(crate::ClockStatus {
                secs: 1_800_000_000,
                state: "behind floor".into(),
                time_floor: 1_800_000_100,
            }),
            state_dir_bytes: Some(3 << 20),
        };
        let out = status(&s);
        assert!(
            out.contains("1 chute,") || out.contains("1 chute\n"),
            "{out}"
        );
        assert!(
            out.lines()
                .any(|l| l.starts_with("memory") && l.contains("512 MiB")),
            "{out}"
        );
        assert!(out.contains("feedfacecafe old"), "{out}");
        assert!(out.contains("clock: behind floor"), "{out}");
        assert!(out.contains("state dir: 3 MiB"), "{out}");
        assert!(!out.trim_start().starts_with('{'), "not JSON: {out}");
    }

    #[test]
    fn validate_summarises_the_manifest() {
        let m = Manifest::from_toml_str(
            "name = \"web\"\nversion = \"1\"\nimage = \"localhost/web:1\"\n[network]\nbandwidth_down = \"8mbit\"\n",
        )
        .expect("valid manifest");
        let out = validate(&m);
        assert!(out.starts_with("web 1: image localhost/web:1"), "{out}");
        assert!(out.contains("down 8 mbit, up unshaped"), "{out}");
    }
}
