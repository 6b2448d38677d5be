//! The `chuted` agent library: everything the binary wires together.
pub mod cgroup;
pub mod podman;
