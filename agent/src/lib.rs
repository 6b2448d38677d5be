//! The `chuted` agent library: everything the binary wires together.
pub mod cgroup;
pub mod podman;
pub mod admin;
pub mod config;
pub mod server;
pub mod snapshot;
pub mod supervisor;
