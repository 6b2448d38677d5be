//! Owns the container spec: the labels that mark our containers and the libpod spec that
//! enforces a chute's caps.

use std::collections::BTreeMap;

use chutes::Manifest;

use crate::config::AgentConfig;
use crate::podman::ContainerSpec;

pub const LABEL_MANAGED: &str = "chuted.managed";
pub const LABEL_CHUTE: &str = "chuted.chute";
pub const LABEL_MANIFEST: &str = "chuted.manifest";
pub const LABEL_INSTANCE: &str = "chuted.instance";

/// The libpod spec for a chute: caps enforced by the kernel, nothing privileged.
pub fn container_spec(cfg: &AgentConfig, m: &Manifest, manifest_toml: &str) -> ContainerSpec {
    const CPU_PERIOD_US: u64 = 100_000;
    // The kernel refuses CFS quotas under 1 ms.
    let quota = (i64::from(m.resources.cpu_millicores) * CPU_PERIOD_US as i64 / 1000).max(1000);
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_MANAGED.to_owned(), "true".to_owned());
    labels.insert(LABEL_INSTANCE.to_owned(), cfg.instance.clone());
    labels.insert(LABEL_CHUTE.to_owned(), m.name.to_string());
    labels.insert(LABEL_MANIFEST.to_owned(), manifest_toml.to_owned());
    labels.insert("chuted.version".to_owned(), m.version.clone());
    ContainerSpec {
        name: m.name.container_name(),
        image: m.image.clone(),
        command: m.command.clone(),
        env: m.env.clone(),
        labels,
        memory_bytes: m.resources.memory_bytes,
        cpu_quota_us: quota,
        cpu_period_us: CPU_PERIOD_US,
        pids_limit: i64::from(m.resources.pids),
        ulimits: vec![
            ("nofile".to_owned(), cfg.ulimit_nofile, cfg.ulimit_nofile),
            ("nproc".to_owned(), cfg.ulimit_nproc, cfg.ulimit_nproc),
        ],
        cap_add: cfg.cap_add.clone(),
        no_new_privileges: true,
        host_network: m.network.host_network,
        ports: m
            .network
            .ports
            .iter()
            .map(|p| (p.host, p.container, p.protocol.to_string()))
            .collect(),
        host_ip: cfg.host_bind.map(|ip| ip.to_string()),
        // Set per chute by create_container (a persisted slot), not from the config alone.
        userns: None,
        oci_runtime: cfg.oci_runtime.clone(),
        stop_timeout_secs: cfg.lifecycle.stop_timeout_secs,
        cgroup_parent: cfg.cgroup_parent.clone(),
    }
}
