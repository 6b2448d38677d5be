//! Whether the cgroup controllers chuted enforces — `cpu`, `memory`, `pids` — can reach
//! the cgroups its chutes are put in.
//!
//! Podman drops a limit whose controller is missing with no more than a warning in its
//! own log, so a chute would run uncapped while `chuted inspect` showed the reservation.
//! The classic way to get there on OpenWrt: its kernels enable RT group scheduling, and
//! then `+cpu` in `cgroup.subtree_control` fails (EINVAL) while any realtime task sits
//! outside the root cgroup; the chutes' parent never gets the cpu controller. Small-flash
//! targets build their kernels without cgroups at all.
//!
//! The agent checks at start (and logs each missing controller) and again on every
//! deploy, refusing a chute it cannot cap and naming the controller and why. It only
//! reads: enabling controllers is the init script's job (it logs its own failures).
//! Not a guarantee that Podman's runtime will succeed, only that it can: a v2
//! controller listed in the parent's `cgroup.controllers` is one the runtime may enable.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cgroup::{parse_mountinfo, relative};

/// The controllers every chute needs: each chute has a CPU quota, a memory cap and a
/// pids limit (the manifest's defaults apply when it names none).
pub const ENFORCED: [&str; 3] = ["cpu", "memory", "pids"];

/// One controller chutes cannot be capped with, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub controller: &'static str,
    pub reason: String,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the {} controller {}", self.controller, self.reason)
    }
}

/// A deploy refused because its caps could not be enforced.
#[derive(Debug, thiserror::Error)]
#[error("chute `{chute}` cannot be capped, so it is not deployed: {}", list(.missing))]
pub struct Uncappable {
    pub chute: String,
    pub missing: Vec<Missing>,
}

fn list(m: &[Missing]) -> String {
    m.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks the live system (`/proc`, `/sys/fs/cgroup`) for `cgroup_parent` (the agent
/// config's, `None` for Podman's default, which sits directly under the root).
pub fn check(cgroup_parent: Option<&str>) -> Vec<Missing> {
    check_in(Path::new("/"), cgroup_parent)
}

/// Refuses `chute` when any enforced controller is missing.
pub fn require(chute: &str, cgroup_parent: Option<&str>) -> Result<(), Uncappable> {
    require_in(Path::new("/"), chute, cgroup_parent)
}

pub fn require_in(root: &Path, chute: &str, cgroup_parent: Option<&str>) -> Result<(), Uncappable> {
    let missing = check_in(root, cgroup_parent);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Uncappable {
            chute: chute.to_owned(),
            missing,
        })
    }
}

/// As [`check`] with `/proc` and every mount point under `root` (a fake tree in tests).
pub fn check_in(root: &Path, cgroup_parent: Option<&str>) -> Vec<Missing> {
    let under_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mounts = fs::read_to_string(root.join("proc/self/mountinfo"))
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default();
    // `subsys hierarchy num_cgroups enabled`; absent entries mean not built in.
    let proc_cgroups = fs::read_to_string(root.join("proc/cgroups")).ok();
    let v2_dir = mounts.iter().find(|m| m.v2).map(|m| {
        let parent = match cgroup_parent {
            Some(p) => slice_path(p),
            None => String::new(),
        };
        under_root(&m.point).join(relative(&parent, &m.root))
    });

    let mut missing = Vec::new();
    for controller in ENFORCED {
        let miss = |reason: String| Missing { controller, reason };
        if let Some(pc) = &proc_cgroups {
            let line = pc
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(|l| l.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.first() == Some(&controller));
            match line {
                None => {
                    missing.push(miss(
                        "is not built into this kernel (not in /proc/cgroups; on OpenWrt small-flash \
                         targets build kernels without cgroups)"
                            .to_owned(),
                    ));
                    continue;
                }
                Some(f) if f.get(3) == Some(&"0") => {
                    missing.push(miss(format!(
                        "is disabled on the kernel command line (cgroup_disable={controller})"
                    )));
                    continue;
                }
                Some(_) => {}
            }
        }
        if mounts
            .iter()
            .any(|m| !m.v2 && m.options.split(',').any(|o| o == controller))
        {
            continue; // a cgroup v1 hierarchy carries it
        }
        let Some(dir) = &v2_dir else {
            missing.push(miss(
                "is in no mounted cgroup hierarchy (neither a v1 mount nor cgroup2 at /sys/fs/cgroup)"
                    .to_owned(),
            ));
            continue;
        };
        // The runtime creates what does not exist yet below the deepest existing
        // ancestor, which must be able to hand the controller down.
        let existing = dir
            .ancestors()
            .find(|d| d.join("cgroup.controllers").is_file())
            .map(Path::to_path_buf);
        let Some(existing) = existing else {
            missing.push(miss(format!(
                "cannot be checked: no cgroup.controllers at or above {}",
                dir.display()
            )));
            continue;
        };
        let file = existing.join("cgroup.controllers");
        let available = fs::read_to_string(&file).unwrap_or_default();
        if !available.split_whitespace().any(|c| c == controller) {
            missing.push(miss(format!(
                "is not available to chutes' cgroups: {} lists only [{}]; enable it with \
                 `echo +{controller} > {}` (on OpenWrt, with RT group scheduling, `+cpu` fails \
                 while realtime tasks run outside the root cgroup)",
                file.display(),
                available.trim(),
                parent_of(&existing)
                    .join("cgroup.subtree_control")
                    .display(),
            )));
        }
    }
    missing
}

/// The parent directory whose `subtree_control` hands controllers to `dir`.
fn parent_of(dir: &Path) -> PathBuf {
    dir.parent().unwrap_or(dir).to_path_buf()
}

/// A cgroup parent as a path under the v2 root: an absolute path as is; a systemd slice
/// `a-b.slice` where systemd puts it, `/a.slice/a-b.slice`.
fn slice_path(parent: &str) -> String {
    match parent.strip_suffix(".slice") {
        Some(name) if !parent.starts_with('/') => {
            let mut path = String::new();
            let parts: Vec<&str> = name.split('-').collect();
            for i in 1..=parts.len() {
                path.push('/');
                path.push_str(&parts[..i].join("-"));
                path.push_str(".slice");
            }
            path
        }
        _ => parent.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_MOUNT: &str =
        "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
    const PROC_CGROUPS: &str = "#subsys_name\thierarchy\tnum_cgroups\tenabled\n\
        cpuset\t0\t1\t1\ncpu\t0\t1\t1\ncpuacct\t0\t1\t1\nmemory\t0\t1\t1\npids\t0\t1\t1\n";

    /// A pure cgroup v2 host like OpenWrt's, the init's layout created, `chutes_ctrl`
    /// in chuted/chutes/cgroup.controllers.
    fn v2_tree(chutes_ctrl: &str) -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        fs::create_dir_all(r.join("proc/self")).expect("mkdir");
        fs::write(r.join("proc/self/mountinfo"), V2_MOUNT).expect("w");
        fs::write(r.join("proc/cgroups"), PROC_CGROUPS).expect("w");
        let cg = r.join("sys/fs/cgroup");
        fs::create_dir_all(cg.join("chuted/chutes")).expect("mkdir");
        fs::write(cg.join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("w");
        fs::write(
            cg.join("chuted/cgroup.controllers"),
            format!("{chutes_ctrl}\n"),
        )
        .expect("w");
        fs::write(
            cg.join("chuted/chutes/cgroup.controllers"),
            format!("{chutes_ctrl}\n"),
        )
        .expect("w");
        t
    }

    #[test]
    fn all_delegated_passes() {
        let t = v2_tree("cpu io memory pids");
        assert_eq!(check_in(t.path(), Some("/chuted/chutes")), vec![]);
        require_in(t.path(), "web", Some("/chuted/chutes")).expect("capped");
    }

    /// The RT-group-scheduling case: `+cpu` failed in the root, so the chutes' parent
    /// has memory and pids but no cpu. The deploy is refused, naming cpu and the file.
    #[test]
    fn cpu_not_delegated_refuses_naming_cpu() {
        let t = v2_tree("io memory pids");
        let missing = check_in(t.path(), Some("/chuted/chutes"));
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].controller, "cpu");
        let err = require_in(t.path(), "web", Some("/chuted/chutes")).expect_err("refused");
        let msg = err.to_string();
        assert!(msg.contains("chute `web` cannot be capped"), "{msg}");
        assert!(msg.contains("the cpu controller is not available"), "{msg}");
        assert!(
            msg.contains("chuted/chutes/cgroup.controllers lists only [io memory pids]"),
            "{msg}"
        );
        assert!(msg.contains("echo +cpu >"), "{msg}");
        assert!(msg.contains("chuted/cgroup.subtree_control"), "{msg}");
    }

    /// Podman creates a parent that does not exist yet under its deepest existing
    /// ancestor: that ancestor's controllers decide.
    #[test]
    fn absent_parent_uses_deepest_existing_ancestor() {
        let t = v2_tree("memory");
        let missing = check_in(t.path(), Some("/chuted/chutes/not-yet"));
        let names: Vec<_> = missing.iter().map(|m| m.controller).collect();
        assert_eq!(names, ["cpu", "pids"]);
        // Podman's default parent sits under the root, which has everything.
        assert_eq!(check_in(t.path(), None), vec![]);
    }

    #[test]
    fn kernel_without_a_controller_or_with_it_disabled() {
        let t = v2_tree("cpu io memory pids");
        fs::write(
            t.path().join("proc/cgroups"),
            "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t0\t1\t1\nmemory\t0\t1\t0\n",
        )
        .expect("w");
        let missing = check_in(t.path(), Some("/chuted/chutes"));
        assert_eq!(missing.len(), 2, "{missing:?}");
        assert_eq!(missing[0].controller, "memory");
        assert!(missing[0].reason.contains("cgroup_disable=memory"));
        assert_eq!(missing[1].controller, "pids");
        assert!(missing[1].reason.contains("not built into this kernel"));
    }

    #[test]
    fn no_cgroups_mounted_names_every_controller() {
        let t = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(t.path().join("proc/self")).expect("mkdir");
        fs::write(t.path().join("proc/self/mountinfo"), "").expect("w");
        let missing = check_in(t.path(), None);
        let names: Vec<_> = missing.iter().map(|m| m.controller).collect();
        assert_eq!(names, ENFORCED);
    }

    /// cgroup v1 (or hybrid): each controller has its own hierarchy; v2 is not consulted.
    #[test]
    fn v1_hierarchies_count() {
        let t = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(t.path().join("proc/self")).expect("mkdir");
        fs::write(
            t.path().join("proc/self/mountinfo"),
            "35 25 0:30 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
             36 25 0:31 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
             37 25 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n",
        )
        .expect("w");
        fs::create_dir_all(t.path().join("sys/fs/cgroup/unified")).expect("mkdir");
        fs::write(
            t.path().join("sys/fs/cgroup/unified/cgroup.controllers"),
            "\n",
        )
        .expect("w");
        let missing = check_in(t.path(), None);
        let names: Vec<_> = missing.iter().map(|m| m.controller).collect();
        assert_eq!(names, ["pids"]);
    }

    #[test]
    fn systemd_slices_nest_by_dash() {
        assert_eq!(slice_path("machine.slice"), "/machine.slice");
        assert_eq!(
            slice_path("chuted-chutes.slice"),
            "/chuted.slice/chuted-chutes.slice"
        );
        assert_eq!(slice_path("/chuted/chutes"), "/chuted/chutes");
    }
}
