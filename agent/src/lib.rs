//! The `chuted` agent library: everything the binary wires together.
pub mod admin;
pub mod cgroup;
pub mod cloud;
pub mod config;
pub mod controllers;
pub mod identity;
pub mod podman;
pub mod server;
pub mod snapshot;
pub mod supervisor;
