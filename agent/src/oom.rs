//! Tells a chute killed for exceeding its memory cap from any other SIGKILL (exit 137).
//!
//! Neither Podman nor the cgroup keeps the fact: Podman 4.3 under runc on cgroup v1
//! reports `OOMKilled: false` for a memory-cgroup kill, and the container's cgroup (with
//! its `oom_kill` counter) is removed with the container, before the agent hears of the
//! exit. The kernel logs every memory-cgroup OOM kill to `/dev/kmsg`, naming the cgroup,
//! which carries the container id; that record is the evidence read here. Only exits
//! with 137 are looked up, so the log is read rarely.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// Whether one kernel log record is a memory-cgroup OOM kill inside the container
/// `container_id` (the `oom-kill:` record's `oom_memcg=` path names it).
pub fn record_is_oom_kill_in(record: &str, container_id: &str) -> bool {
    // A short id could match by chance; our ids are libpod's full 64 hex digits.
    if container_id.len() < 32 {
        return false;
    }
    let Some((_, body)) = record.split_once("oom-kill:") else {
        return false;
    };
    body.split(',').any(|field| {
        field
            .trim()
            .strip_prefix("oom_memcg=")
            .is_some_and(|path| path.contains(container_id))
    })
}

/// The record's time, microseconds since boot (`PRIO,SEQ,USEC,FLAGS;TEXT`).
pub fn record_time_us(record: &str) -> Option<u64> {
    record.split(',').nth(2)?.parse().ok()
}

/// Reads the kernel log (without blocking, at most `MAX_RECORDS` records) for an OOM kill
/// inside `container_id` logged at or after `since_unix_nanos` (0: any time; a container
/// restarted in place keeps its id, so an earlier run's kill must not count). Any error
/// reading the log reads as "no evidence".
pub fn killed_for_memory(container_id: &str, since_unix_nanos: i64) -> bool {
    // Kernel log times count from boot; map `since` onto that clock. A second of slack
    // covers the two clocks being read a moment apart.
    let boot_us = |unix_nanos: i64| -> Option<u64> {
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let mono_us =
            u64::try_from(mono.tv_sec).ok()? * 1_000_000 + u64::try_from(mono.tv_nsec).ok()? / 1000;
        let now_unix_us = u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_micros(),
        )
        .ok()?;
        let since_us = u64::try_from(unix_nanos / 1000).ok()?;
        let ago = now_unix_us.saturating_sub(since_us);
        Some(mono_us.saturating_sub(ago).saturating_sub(1_000_000))
    };
    let not_before = if since_unix_nanos > 0 {
        boot_us(since_unix_nanos).unwrap_or(0)
    } else {
        0
    };
    const MAX_RECORDS: usize = 100_000;
    let nonblock = rustix::fs::OFlags::NONBLOCK.bits() as i32;
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nonblock)
        .open("/dev/kmsg")
    else {
        return false;
    };
    // /dev/kmsg hands out one record per read; 8 KiB holds the longest.
    let mut buf = vec![0u8; 8192];
    for _ in 0..MAX_RECORDS {
        match kmsg.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                let record = String::from_utf8_lossy(&buf[..n]);
                if record_is_oom_kill_in(&record, container_id)
                    && record_time_us(&record).is_some_and(|t| t >= not_before)
                {
                    return true;
                }
            }
            // A record overwritten while we read: the next read goes on.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::PIPE.raw_os_error()) => {}
            Err(_) => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5a85104208d325aff89eeea6f803e77b84a8d4ee9bc9723378d0f39d55a559a5";

    #[test]
    fn an_oom_kill_record_names_its_container() {
        let rec = format!(
            "6,13796,5131153532,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),\
             cpuset=libpod-{ID},mems_allowed=0,oom_memcg=/libpod_parent/libpod-{ID},\
             task_memcg=/libpod_parent/libpod-{ID},task=sh,pid=2572,uid=0\n"
        );
        assert!(record_is_oom_kill_in(&rec, ID));
        let other = ID.replace("5", "6");
        assert!(!record_is_oom_kill_in(&rec, &other));
        assert!(
            !record_is_oom_kill_in(&rec, &ID[..12]),
            "short ids never match"
        );
        // The summary line and unrelated records are not the evidence.
        assert!(!record_is_oom_kill_in(
            "3,13797,5131153546,-;Memory cgroup out of memory: Killed process 2572 (sh)",
            ID
        ));
        assert!(!record_is_oom_kill_in(
            &format!("6,1,1,-;cpuset=libpod-{ID}"),
            ID
        ));
        assert_eq!(record_time_us(&rec), Some(5_131_153_532));
    }
}
