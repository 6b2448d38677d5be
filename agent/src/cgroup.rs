//! cgroup usage reader (placeholder).
