//! The `chuted` agent library: everything the binary wires together.
pub mod api;
pub mod cgroup;
pub mod cloud;
pub mod config;
pub mod controllers;
pub mod daemon;
pub mod identity;
pub mod imagepin;
pub mod limits;
pub mod oom;
pub mod podman;
pub mod server;
pub mod snapshot;
pub mod supervisor;
pub mod timeout;
pub mod userns;
